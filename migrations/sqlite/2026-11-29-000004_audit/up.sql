-- Tamper-evident audit trail (issue 6): hash-chained FHIR AuditEvents (IHE BALP), signed checkpoints.
-- The columns index the hashed `resource`; action, agent role, entities and consent reasons
-- are only in the resource (diesel's 16-column table limit).
CREATE TABLE audit_events (
    seq BIGINT PRIMARY KEY NOT NULL,
    event_id TEXT NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    type_code TEXT NOT NULL,
    subtype_code TEXT NOT NULL,
    outcome TEXT NOT NULL,
    agent_institution TEXT,
    agent_user TEXT,
    purpose_of_use TEXT,
    patient_id TEXT,
    consent_decision TEXT,
    request_id TEXT,
    source_replica TEXT NOT NULL,
    resource TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_events_recorded_at_idx ON audit_events (recorded_at);
CREATE INDEX audit_events_patient_idx ON audit_events (patient_id);
CREATE INDEX audit_events_agent_idx ON audit_events (agent_institution);

CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY NOT NULL,
    head_hash TEXT NOT NULL,
    signed_at TIMESTAMP NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);

-- The one chain head: locked (PostgreSQL SELECT ... FOR UPDATE; SQLite immediate transaction)
-- by every append so chain positions are dense and race-free across replicas.
CREATE TABLE audit_chain_head (
    id INTEGER PRIMARY KEY NOT NULL,
    head_seq BIGINT NOT NULL,
    head_hash TEXT NOT NULL,
    checkpoint_seq BIGINT NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
INSERT INTO audit_chain_head (id, head_seq, head_hash, checkpoint_seq, updated_at)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', 0, '2026-11-29 00:00:00');
