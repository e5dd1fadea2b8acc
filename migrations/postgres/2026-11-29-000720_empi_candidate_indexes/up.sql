-- Candidate selection looks blocking keys up and reads their records' ids: a (key, record_id)
-- index answers it from the index alone (it replaces the key-only index). Re-registering a
-- changed record deletes its open review items by either side: record_b gets its own index
-- (record_a is the first column of the unique (record_a, record_b) index).
CREATE INDEX empi_blocking_keys_key_record_idx ON empi_blocking_keys (key, record_id);
DROP INDEX empi_blocking_keys_key_idx;
CREATE INDEX empi_review_items_record_b_idx ON empi_review_items (record_b);
