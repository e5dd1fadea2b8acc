-- The delivery worker's claim asks, for every due pending delivery, whether an earlier one of
-- the same subscription is still pending (per-subscriber order). Without an index on pending
-- rows that check scans the subscription's deliveries, so draining a backlog of n cost O(n^2)
-- (BENCHMARKS.md, "Notification delivery"). A partial index keeps it to an index probe.
CREATE INDEX doc_deliveries_pending_idx ON doc_deliveries (subscription_id, event_seq) WHERE status = 'pending';
