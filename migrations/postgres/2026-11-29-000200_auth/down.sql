DROP TABLE gateway_keys;
DROP TABLE auth_events;
