DROP TABLE audit_flagged_patients;
DROP TABLE audit_alert_cursor;
DROP TABLE audit_alerts;
DROP INDEX audit_events_agent_user_idx;
DROP INDEX audit_events_request_id_idx;
DROP INDEX audit_events_event_id_idx;
