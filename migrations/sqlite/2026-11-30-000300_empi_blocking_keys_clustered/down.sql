CREATE TABLE empi_blocking_keys_rowid (
    record_id TEXT NOT NULL REFERENCES empi_source_records (id),
    key TEXT NOT NULL,
    PRIMARY KEY (record_id, key)
);
INSERT INTO empi_blocking_keys_rowid (record_id, key)
    SELECT record_id, key FROM empi_blocking_keys;
DROP TABLE empi_blocking_keys;
ALTER TABLE empi_blocking_keys_rowid RENAME TO empi_blocking_keys;
CREATE INDEX empi_blocking_keys_key_record_idx ON empi_blocking_keys (key, record_id);
