-- Document registry and subscriptions (issue 8): DocumentReference metadata registered by
-- custodian institutions, the transactional outbox of document/merge events, topic-based
-- subscriptions and their per-subscriber deliveries. docs/documents.md.
CREATE TABLE doc_references (
    id TEXT PRIMARY KEY NOT NULL,
    custodian_id TEXT NOT NULL REFERENCES institutions (id),
    -- DocumentReference.masterIdentifier.value: unique per custodian (idempotent registration)
    custodian_doc_id TEXT NOT NULL,
    -- the EMPI source record of the patient's identifier, and its person at registration time
    patient_record_id TEXT NOT NULL REFERENCES empi_source_records (id),
    person_id TEXT NOT NULL,
    -- system|code
    type_code TEXT NOT NULL,
    category_code TEXT NOT NULL,
    doc_date TIMESTAMP NOT NULL,
    author_id TEXT,
    -- v3 Confidentiality code (U L M N R V)
    confidentiality TEXT NOT NULL,
    -- current | superseded | entered-in-error
    status TEXT NOT NULL,
    -- the document this one replaces (relatesTo code=replaces)
    replaces TEXT REFERENCES doc_references (id),
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    UNIQUE (custodian_id, custodian_doc_id)
);
CREATE INDEX doc_references_record_idx ON doc_references (patient_record_id, doc_date);
CREATE INDEX doc_references_type_idx ON doc_references (type_code, doc_date);
CREATE INDEX doc_references_date_idx ON doc_references (doc_date);
CREATE INDEX doc_references_replaces_idx ON doc_references (replaces);
CREATE TABLE doc_contents (
    document_id TEXT PRIMARY KEY NOT NULL REFERENCES doc_references (id),
    -- sensitivity codes (v3 ActCode), space-separated, may be empty
    sensitivity TEXT NOT NULL,
    content_type TEXT NOT NULL,
    content_size BIGINT NOT NULL,
    -- SM3 of the content, 64 lowercase hex digits
    sm3_hash TEXT NOT NULL,
    -- where the custodian serves the content (never shown to other callers)
    location TEXT NOT NULL,
    -- the DocumentReference as received (normalised: id, status, meta set by the registry)
    resource TEXT NOT NULL
);
-- One row: the last event sequence number. Writing it serialises event-producing transactions
-- so events commit in sequence order (per-subscriber ordering needs that).
CREATE TABLE doc_event_counter (
    id INTEGER PRIMARY KEY NOT NULL,
    last_seq BIGINT NOT NULL
);
INSERT INTO doc_event_counter (id, last_seq) VALUES (1, 0);
CREATE TABLE doc_events (
    seq BIGINT PRIMARY KEY NOT NULL,
    -- document-new | document-replaced | patient-merged
    kind TEXT NOT NULL,
    document_id TEXT,
    person_id TEXT,
    type_code TEXT,
    custodian_id TEXT,
    detail TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX doc_events_person_idx ON doc_events (person_id);
-- Event fan-out looks up persons merged into the event's person.
CREATE INDEX doc_empi_persons_merged_idx ON empi_persons (merged_into);
CREATE TABLE doc_subscriptions (
    id TEXT PRIMARY KEY NOT NULL,
    owner_id TEXT NOT NULL REFERENCES institutions (id),
    -- document | patient-merge
    topic TEXT NOT NULL,
    filter_person TEXT,
    filter_type TEXT,
    endpoint TEXT NOT NULL,
    -- active | off
    status TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX doc_subscriptions_topic_idx ON doc_subscriptions (topic, status);
CREATE TABLE doc_deliveries (
    subscription_id TEXT NOT NULL REFERENCES doc_subscriptions (id),
    event_seq BIGINT NOT NULL REFERENCES doc_events (seq),
    -- pending | delivered | dead | withheld
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at TIMESTAMP NOT NULL,
    lease_owner TEXT,
    lease_until TIMESTAMP,
    last_error TEXT,
    delivered_at TIMESTAMP,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (subscription_id, event_seq)
);
CREATE INDEX doc_deliveries_due_idx ON doc_deliveries (status, next_attempt_at);
