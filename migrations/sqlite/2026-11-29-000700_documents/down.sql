DROP INDEX doc_empi_persons_merged_idx;
DROP TABLE doc_deliveries;
DROP TABLE doc_subscriptions;
DROP TABLE doc_events;
DROP TABLE doc_event_counter;
DROP TABLE doc_contents;
DROP TABLE doc_references;
