-- Enterprise master patient index (issue 4): source records as institutions registered them,
-- enterprise persons, links with their evidence, blocking keys, the review queue, stored
-- match parameters, data-quality issues and a durable event log.
CREATE TABLE empi_persons (
    id TEXT PRIMARY KEY NOT NULL,
    -- active | merged (into merged_into) | empty (no linked record left)
    status TEXT NOT NULL,
    merged_into TEXT,
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE empi_source_records (
    id TEXT PRIMARY KEY NOT NULL,
    institution_id TEXT NOT NULL REFERENCES institutions (id),
    id_system TEXT NOT NULL,
    id_value TEXT NOT NULL,
    -- normalised demographics (search columns)
    -- normalised name and its romanised (pinyin) form, space-separated
    name_search TEXT NOT NULL,
    family TEXT NOT NULL,
    given TEXT NOT NULL,
    sex TEXT,
    birth_date TEXT,
    resident_id TEXT,
    phone TEXT,
    -- the engine's SourceRecord (JSON) and the FHIR Patient as received
    record_json TEXT NOT NULL,
    resource TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    UNIQUE (id_system, id_value)
);
CREATE INDEX empi_source_records_institution_idx ON empi_source_records (institution_id);
CREATE INDEX empi_source_records_family_idx ON empi_source_records (family);
CREATE INDEX empi_source_records_birth_idx ON empi_source_records (birth_date);
CREATE INDEX empi_source_records_rid_idx ON empi_source_records (resident_id);
CREATE INDEX empi_source_records_phone_idx ON empi_source_records (phone);
CREATE TABLE empi_links (
    record_id TEXT PRIMARY KEY NOT NULL REFERENCES empi_source_records (id),
    person_id TEXT NOT NULL REFERENCES empi_persons (id),
    score DOUBLE PRECISION,
    explanation TEXT,
    -- auto | manual | merge
    decided_by TEXT NOT NULL,
    actor TEXT NOT NULL,
    decided_at TIMESTAMP NOT NULL
);
CREATE INDEX empi_links_person_idx ON empi_links (person_id);
CREATE TABLE empi_blocking_keys (
    record_id TEXT NOT NULL REFERENCES empi_source_records (id),
    key TEXT NOT NULL,
    PRIMARY KEY (record_id, key)
);
CREATE INDEX empi_blocking_keys_key_idx ON empi_blocking_keys (key);
CREATE TABLE empi_review_items (
    id TEXT PRIMARY KEY NOT NULL,
    record_a TEXT NOT NULL REFERENCES empi_source_records (id),
    record_b TEXT NOT NULL REFERENCES empi_source_records (id),
    score DOUBLE PRECISION NOT NULL,
    explanation TEXT NOT NULL,
    -- open | linked | kept-separate
    status TEXT NOT NULL,
    resolver TEXT,
    note TEXT,
    created_at TIMESTAMP NOT NULL,
    resolved_at TIMESTAMP,
    UNIQUE (record_a, record_b)
);
CREATE INDEX empi_review_items_status_idx ON empi_review_items (status);
CREATE TABLE empi_parameters (
    version BIGINT PRIMARY KEY NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE empi_quality_issues (
    record_id TEXT NOT NULL REFERENCES empi_source_records (id),
    issue TEXT NOT NULL,
    PRIMARY KEY (record_id, issue)
);
CREATE TABLE empi_events (
    id TEXT PRIMARY KEY NOT NULL,
    -- register | relink | link | keep-separate | merge | unmerge
    kind TEXT NOT NULL,
    person_id TEXT,
    other_person_id TEXT,
    record_id TEXT,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    notified_at TIMESTAMP
);
CREATE INDEX empi_events_created_idx ON empi_events (created_at);
-- One row; SQLite registrations write it first so the transaction takes the write lock at once.
CREATE TABLE empi_write_lock (
    id INTEGER PRIMARY KEY NOT NULL,
    counter BIGINT NOT NULL
);
INSERT INTO empi_write_lock (id, counter) VALUES (1, 0);
