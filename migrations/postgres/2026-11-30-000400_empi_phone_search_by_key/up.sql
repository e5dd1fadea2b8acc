-- PDQm `telecom` searches look the phone up through the record's `ph:` blocking keys (every
-- phone of the record, not only the first one the column keeps), so the column's index is
-- one random index insert per registration that no query uses any more.
DROP INDEX empi_source_records_phone_idx;
