-- Mutual TLS for institutions (issue 3): an institution with a row here must present this
-- client certificate (SHA-256 of its DER, lowercase hex) on the mTLS listener to get tokens,
-- and its tokens are bound to it (RFC 8705 cnf x5t#S256).
CREATE TABLE institution_client_certs (
    institution_id TEXT PRIMARY KEY NOT NULL,
    sha256 TEXT NOT NULL,
    bound_at TIMESTAMP NOT NULL
);
