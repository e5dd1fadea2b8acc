-- Machine authentication (issue 3): the audit trail of token requests and the gateway's
-- token-signing keys (shared by all replicas; the first replica to start creates generation 1).
CREATE TABLE auth_events (
    id TEXT PRIMARY KEY NOT NULL,
    occurred_at TIMESTAMP NOT NULL,
    client_id TEXT,
    outcome TEXT NOT NULL,
    oauth_error TEXT,
    reason TEXT NOT NULL,
    client_ip TEXT,
    jti TEXT,
    kid TEXT,
    alg TEXT,
    request_id TEXT
);
CREATE INDEX auth_events_occurred_idx ON auth_events (occurred_at);
CREATE INDEX auth_events_client_idx ON auth_events (client_id, occurred_at);

CREATE TABLE gateway_keys (
    kid TEXT PRIMARY KEY NOT NULL,
    generation BIGINT NOT NULL UNIQUE,
    alg TEXT NOT NULL,
    private_pkcs8 TEXT NOT NULL,
    public_jwk TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
