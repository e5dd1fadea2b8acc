-- Consent and access policy (issue 5): patients' FHIR Consents (current version plus every
-- version in consent_history), data-sharing agreements between institutions, and one change
-- counter that every replica reads to know when its cached consents are stale.
CREATE TABLE consents (
    id TEXT PRIMARY KEY NOT NULL,
    version BIGINT NOT NULL,
    -- Enterprise (EMPI) person id.
    patient_id TEXT NOT NULL,
    -- FHIR status, or `revoked` (stored as inactive + revoked extension in the resource).
    status TEXT NOT NULL,
    provision TEXT NOT NULL,
    period_start TIMESTAMP,
    period_end TIMESTAMP,
    -- The institution that recorded (or last changed) the consent.
    recorded_by TEXT NOT NULL,
    -- The FHIR Consent JSON as served.
    resource TEXT NOT NULL,
    -- consent_change_seq.seq of the last change.
    change_seq BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX consents_patient_idx ON consents (patient_id, status);
CREATE INDEX consents_change_idx ON consents (change_seq);

CREATE TABLE consent_history (
    id TEXT NOT NULL,
    version BIGINT NOT NULL,
    status TEXT NOT NULL,
    resource TEXT NOT NULL,
    changed_by TEXT NOT NULL,
    changed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (id, version)
);

CREATE TABLE data_sharing_agreements (
    id TEXT PRIMARY KEY NOT NULL,
    custodian TEXT NOT NULL,
    recipient TEXT NOT NULL,
    -- JSON array of purpose codes (TREAT, ...).
    purposes TEXT NOT NULL,
    -- JSON array of data classes ({"system": ..., "code": ...}); empty = all data.
    classes TEXT NOT NULL,
    period_start TIMESTAMP,
    period_end TIMESTAMP,
    -- active | suspended | terminated
    status TEXT NOT NULL,
    version BIGINT NOT NULL,
    change_seq BIGINT NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX dsa_change_idx ON data_sharing_agreements (change_seq);

-- One row: the number of consent and agreement changes so far (versioned reads).
CREATE TABLE consent_change_seq (
    id INTEGER PRIMARY KEY NOT NULL,
    seq BIGINT NOT NULL
);
INSERT INTO consent_change_seq (id, seq) VALUES (1, 0);
