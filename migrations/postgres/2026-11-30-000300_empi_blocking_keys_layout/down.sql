ALTER TABLE empi_blocking_keys ADD CONSTRAINT empi_blocking_keys_record_id_fkey
    FOREIGN KEY (record_id) REFERENCES empi_source_records (id);
