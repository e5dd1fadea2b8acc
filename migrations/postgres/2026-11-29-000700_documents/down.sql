DROP TABLE doc_deliveries;
DROP TABLE doc_subscriptions;
DROP TABLE doc_events;
DROP TABLE doc_event_counter;
DROP TABLE doc_contents;
DROP TABLE doc_references;
