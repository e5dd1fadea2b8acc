DROP INDEX empi_review_items_record_b_idx;
CREATE INDEX empi_blocking_keys_key_idx ON empi_blocking_keys (key);
DROP INDEX empi_blocking_keys_key_record_idx;
