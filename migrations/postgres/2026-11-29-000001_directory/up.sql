-- Institution directory (WS/T 790.7 institution registration).
CREATE TABLE institutions (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    uscc TEXT NOT NULL UNIQUE,
    region_code TEXT NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    endpoint_url TEXT,
    jwks TEXT NOT NULL,
    sm2_keys TEXT NOT NULL,
    patient_id_system TEXT NOT NULL UNIQUE,
    allowed_scopes TEXT NOT NULL,
    require_sm_envelope BOOLEAN NOT NULL DEFAULT FALSE,
    status TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE INDEX institutions_status_idx ON institutions (status);
CREATE INDEX institutions_kind_idx ON institutions (kind);
