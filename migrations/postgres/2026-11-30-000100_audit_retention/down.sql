DROP TABLE audit_archives;
ALTER TABLE audit_events RENAME TO audit_events_partitioned;
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
INSERT INTO audit_events SELECT seq, event_id, recorded_at, type_code, subtype_code, outcome,
    agent_institution, agent_user, purpose_of_use, patient_id, consent_decision, request_id,
    source_replica, resource, prev_hash, hash FROM audit_events_partitioned;
DROP TABLE audit_events_partitioned;
DROP FUNCTION yiqiao_audit_ensure_partition(DATE);
CREATE INDEX audit_events_recorded_at_idx ON audit_events (recorded_at);
CREATE INDEX audit_events_patient_idx ON audit_events (patient_id);
CREATE INDEX audit_events_agent_idx ON audit_events (agent_institution);
CREATE INDEX audit_events_event_id_idx ON audit_events (event_id);
CREATE INDEX audit_events_request_id_idx ON audit_events (request_id);
CREATE INDEX audit_events_agent_user_idx ON audit_events (agent_user);
