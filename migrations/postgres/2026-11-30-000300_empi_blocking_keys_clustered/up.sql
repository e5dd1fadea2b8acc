-- SQLite only (its blocking keys become a WITHOUT ROWID table clustered on (key, record_id)).
-- PostgreSQL tables are heaps: the (key, record_id) index of 2026-11-29-000720 already serves
-- candidate selection; nothing changes here.
SELECT 1;
