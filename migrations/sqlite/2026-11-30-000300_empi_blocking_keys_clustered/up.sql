-- Blocking keys stored clustered on (key, record_id): a WITHOUT ROWID table is that one
-- B-tree, instead of a rowid table plus its (record_id, key) primary-key index plus the
-- (key, record_id) index, so each key a registration writes is one random B-tree insert and
-- one near-append (the record_id index; ids are time-ordered) instead of three inserts.
-- Lookups by record (a changed record's old keys, merge locks) use the record_id index.
CREATE TABLE empi_blocking_keys_clustered (
    record_id TEXT NOT NULL REFERENCES empi_source_records (id),
    key TEXT NOT NULL,
    PRIMARY KEY (key, record_id)
) WITHOUT ROWID;
INSERT INTO empi_blocking_keys_clustered (record_id, key)
    SELECT record_id, key FROM empi_blocking_keys ORDER BY key, record_id;
DROP TABLE empi_blocking_keys;
ALTER TABLE empi_blocking_keys_clustered RENAME TO empi_blocking_keys;
CREATE INDEX empi_blocking_keys_record_idx ON empi_blocking_keys (record_id);
