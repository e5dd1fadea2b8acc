-- Auditors' workspace (issue 6): search indexes, anomaly alerts, the scanner's cursor, flagged
-- (VIP) patients.
CREATE INDEX audit_events_event_id_idx ON audit_events (event_id);
CREATE INDEX audit_events_request_id_idx ON audit_events (request_id);
CREATE INDEX audit_events_agent_user_idx ON audit_events (agent_user);

CREATE TABLE audit_alerts (
    id TEXT PRIMARY KEY NOT NULL,
    rule TEXT NOT NULL,
    -- One alert per rule and subject and window: a rescan never duplicates an alert.
    dedupe_key TEXT NOT NULL UNIQUE,
    agent TEXT,
    patient_id TEXT,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    detail TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    status TEXT NOT NULL,
    ack_by TEXT,
    ack_note TEXT,
    ack_at TIMESTAMP,
    webhook_state TEXT NOT NULL,
    webhook_attempts INTEGER NOT NULL,
    next_attempt_at TIMESTAMP NOT NULL
);
CREATE INDEX audit_alerts_status_idx ON audit_alerts (status, created_at);
CREATE INDEX audit_alerts_webhook_idx ON audit_alerts (webhook_state, next_attempt_at);

-- The last chain position the anomaly scanner has evaluated; moved in the same transaction as
-- the alerts it raised. Starts at the current head: history before this migration is not scanned.
CREATE TABLE audit_alert_cursor (
    id INTEGER PRIMARY KEY NOT NULL,
    last_seq BIGINT NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
INSERT INTO audit_alert_cursor (id, last_seq, updated_at)
SELECT 1, head_seq, updated_at FROM audit_chain_head WHERE id = 1;

CREATE TABLE audit_flagged_patients (
    patient_id TEXT PRIMARY KEY NOT NULL,
    note TEXT NOT NULL,
    flagged_by TEXT NOT NULL,
    flagged_at TIMESTAMP NOT NULL
);
