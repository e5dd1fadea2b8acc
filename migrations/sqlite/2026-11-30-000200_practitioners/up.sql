-- The staff roster (practitioner directory): member institutions register the people who use
-- their systems as FHIR Practitioners (identifier = the staff number in the institution's
-- practitioner namespace https://yiqiao.health/fhir/sid/practitioner/<institution id>), so an
-- end user named in X-Yiqiao-User can be compared with the patients they access (anomaly rule
-- same-surname-address, docs/audit.md).
CREATE TABLE practitioners (
    id TEXT PRIMARY KEY NOT NULL,
    institution_id TEXT NOT NULL REFERENCES institutions (id),
    -- the staff number: unique per institution, so registering it again is idempotent
    identifier_value TEXT NOT NULL,
    -- HumanName.family / given as sent
    family TEXT NOT NULL,
    given TEXT NOT NULL,
    -- comparison keys (registry/src/practitioners.rs): NFKC, lower case, letters and digits only
    surname_key TEXT NOT NULL,
    address_key TEXT,
    -- the Practitioner as registered (without id and meta)
    resource TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX practitioners_identifier_idx ON practitioners (institution_id, identifier_value);
