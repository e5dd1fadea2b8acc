-- Audit retention (issue 6): audit_events partitioned by month of recorded_at, partitions made
-- ahead of time by yiqiao_audit_ensure_partition (start-up and periodic maintenance), a DEFAULT
-- partition as the safety net, and the signed manifests of archived months.
--
-- A partitioned table's unique keys must contain the partition key: the primary key becomes
-- (seq, recorded_at). Uniqueness of seq alone is kept by the chain-head lock every append takes
-- (positions are assigned under it) and checked by verification (a position stored twice is
-- reported as inserted).
ALTER TABLE audit_events RENAME TO audit_events_unpartitioned;
ALTER INDEX audit_events_pkey RENAME TO audit_events_unpartitioned_pkey;
DROP INDEX audit_events_recorded_at_idx;
DROP INDEX audit_events_patient_idx;
DROP INDEX audit_events_agent_idx;
DROP INDEX audit_events_event_id_idx;
DROP INDEX audit_events_request_id_idx;
DROP INDEX audit_events_agent_user_idx;

CREATE TABLE audit_events (
    seq BIGINT NOT NULL,
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
    hash TEXT NOT NULL,
    PRIMARY KEY (seq, recorded_at)
) PARTITION BY RANGE (recorded_at);
-- Rows whose month has no partition (maintenance did not run, a clock far off) land here;
-- yiqiao_audit_ensure_partition moves them into their month's partition when it creates it.
CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT;
CREATE INDEX audit_events_recorded_at_idx ON audit_events (recorded_at);
CREATE INDEX audit_events_patient_idx ON audit_events (patient_id);
CREATE INDEX audit_events_agent_idx ON audit_events (agent_institution);
CREATE INDEX audit_events_event_id_idx ON audit_events (event_id);
CREATE INDEX audit_events_request_id_idx ON audit_events (request_id);
CREATE INDEX audit_events_agent_user_idx ON audit_events (agent_user);

-- Create the partition audit_events_pYYYYMM of the month containing month_start, unless it
-- exists; rows of that month already in the DEFAULT partition are moved into it. True when it
-- created the partition. Concurrent callers are serialised by a transaction advisory lock; the
-- lock on audit_events is waited for at most 2 s (lock_timeout, for the rest of the transaction).
CREATE FUNCTION yiqiao_audit_ensure_partition(month_start DATE) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    lower_bound TIMESTAMP := date_trunc('month', month_start::TIMESTAMP);
    upper_bound TIMESTAMP := date_trunc('month', month_start::TIMESTAMP) + INTERVAL '1 month';
    part TEXT := 'audit_events_p' || to_char(date_trunc('month', month_start::TIMESTAMP), 'YYYYMM');
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN FALSE;
    END IF;
    -- Creating a partition locks audit_events: appends queue behind a waiting lock, so give up
    -- after 2 s rather than hold them (the next maintenance run tries again).
    PERFORM set_config('lock_timeout', '2s', true);
    PERFORM pg_advisory_xact_lock(730520261130);
    IF to_regclass(part) IS NOT NULL THEN
        RETURN FALSE;
    END IF;
    IF EXISTS (SELECT 1 FROM audit_events_default
               WHERE recorded_at >= lower_bound AND recorded_at < upper_bound) THEN
        LOCK TABLE audit_events_default IN ACCESS EXCLUSIVE MODE;
        EXECUTE format('CREATE TABLE %I (LIKE audit_events INCLUDING DEFAULTS)', part);
        EXECUTE format('WITH moved AS (DELETE FROM audit_events_default WHERE recorded_at >= %L '
                       'AND recorded_at < %L RETURNING *) INSERT INTO %I SELECT * FROM moved',
                       lower_bound, upper_bound, part);
        EXECUTE format('ALTER TABLE audit_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       part, lower_bound, upper_bound);
    ELSE
        EXECUTE format('CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                       part, lower_bound, upper_bound);
    END IF;
    RETURN TRUE;
END
$$;

-- One partition for every month that has records, and this month and the next three.
SELECT yiqiao_audit_ensure_partition(m)
FROM (SELECT DISTINCT date_trunc('month', recorded_at)::DATE AS m FROM audit_events_unpartitioned
      UNION
      SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i))::DATE
      FROM generate_series(0, 3) AS i) AS months
ORDER BY m;

INSERT INTO audit_events (seq, event_id, recorded_at, type_code, subtype_code, outcome,
    agent_institution, agent_user, purpose_of_use, patient_id, consent_decision, request_id,
    source_replica, resource, prev_hash, hash)
SELECT seq, event_id, recorded_at, type_code, subtype_code, outcome,
    agent_institution, agent_user, purpose_of_use, patient_id, consent_decision, request_id,
    source_replica, resource, prev_hash, hash
FROM audit_events_unpartitioned;
DROP TABLE audit_events_unpartitioned;

-- One row per archive (normally one per month; a month whose late records arrive after it was
-- archived gets a second): the chain positions its archive file holds, the hash before the
-- first and of the last, the file and its SM3, signed with the gateway's SM2 key. Verification
-- of the remaining records starts from the last row's last_hash.
CREATE TABLE audit_archives (
    first_seq BIGINT PRIMARY KEY NOT NULL,
    month TEXT NOT NULL,
    last_seq BIGINT NOT NULL,
    record_count BIGINT NOT NULL,
    anchor_prev_hash TEXT NOT NULL,
    last_hash TEXT NOT NULL,
    file_name TEXT NOT NULL,
    file_sm3 TEXT NOT NULL,
    archived_at TIMESTAMP NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE INDEX audit_archives_month_idx ON audit_archives (month);
