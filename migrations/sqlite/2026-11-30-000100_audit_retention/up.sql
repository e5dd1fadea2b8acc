-- Audit retention (issue 6). SQLite keeps audit_events as one table (archived months are
-- deleted in the archive's transaction); the signed manifests of archives (one per month): the chain
-- positions each archive file holds, the hash before the first and of the last, the file and its
-- SM3, signed with the gateway's SM2 key. Verification of the remaining records starts from the
-- last row's last_hash.
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
