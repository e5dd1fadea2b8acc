-- Care relationships (encounters): who treats whom, and when. The treating institution registers
-- its visits (FHIR Encounter, or HL7 v2 ADT A01/A04/A03/A11 with PV1); the consent engine reads
-- them (rule 6: an internet hospital sees a patient only during an active encounter or with a
-- consent naming it). Not clinical content. docs/consent.md.
CREATE TABLE encounters (
    id TEXT PRIMARY KEY NOT NULL,
    -- Encounter.serviceProvider: the registering (treating) institution
    institution_id TEXT NOT NULL REFERENCES institutions (id),
    -- Encounter.identifier value (the institution's visit number): unique per institution,
    -- so registering the same visit again is idempotent
    institution_encounter_id TEXT NOT NULL,
    -- the EMPI source record of the patient; the enterprise person is read through empi_links
    -- at query time, so merges and unmerges are followed
    patient_record_id TEXT NOT NULL REFERENCES empi_source_records (id),
    -- planned | arrived | in-progress | onleave | finished | cancelled | entered-in-error
    status TEXT NOT NULL,
    -- v3 ActCode: AMB | IMP | EMER | VR
    class_code TEXT NOT NULL,
    period_start TIMESTAMP NOT NULL,
    period_end TIMESTAMP,
    -- the Encounter as registered (without id and meta, serviceProvider set)
    resource TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE UNIQUE INDEX encounters_identifier_idx ON encounters (institution_id, institution_encounter_id);
CREATE INDEX encounters_record_idx ON encounters (patient_record_id, status);
