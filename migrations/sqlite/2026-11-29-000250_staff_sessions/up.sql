-- People's login (issue 3): OpenID Connect logins in progress and staff sessions.
-- Tokens are never stored: rows are keyed by the SHA-256 (hex) of the random token.
CREATE TABLE oidc_logins (
    state_hash TEXT PRIMARY KEY NOT NULL,
    nonce TEXT NOT NULL,
    pkce_verifier TEXT NOT NULL,
    return_to TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL
);
CREATE INDEX oidc_logins_expires_idx ON oidc_logins (expires_at);

CREATE TABLE staff_sessions (
    id_hash TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    parent_hash TEXT,
    subject TEXT NOT NULL,
    name TEXT,
    roles TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL
);
CREATE INDEX staff_sessions_expires_idx ON staff_sessions (expires_at);
CREATE INDEX staff_sessions_parent_idx ON staff_sessions (parent_hash);
