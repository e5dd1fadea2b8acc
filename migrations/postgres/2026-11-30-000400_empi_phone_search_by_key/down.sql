CREATE INDEX empi_source_records_phone_idx ON empi_source_records (phone);
