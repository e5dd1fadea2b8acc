DROP TABLE audit_chain_head;
DROP TABLE audit_checkpoints;
DROP TABLE audit_events;
