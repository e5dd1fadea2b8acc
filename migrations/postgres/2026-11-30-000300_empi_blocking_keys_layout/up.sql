-- Blocking keys are an index of the source records: written only by the store, with their
-- record and in its transaction, and never left behind (source records are not deleted). The
-- foreign key's check — a trigger and a locking read of the record for every key row, ≈ 6 per
-- record — was the largest single cost of bulk registration (BENCHMARKS.md, EMPI store).
ALTER TABLE empi_blocking_keys DROP CONSTRAINT empi_blocking_keys_record_id_fkey;
