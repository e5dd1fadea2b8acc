-- Persons whose applicable consents changed without a consent row changing: an EMPI merge makes
-- the merged-away person's consents apply to the survivor, an unmerge takes them back. Written
-- in the merge's transaction with the consent change counter (consent_change_seq), so every
-- replica's consent cache drops both persons on its next sync.
CREATE TABLE consent_subject_changes (
    change_seq BIGINT NOT NULL,
    person_id TEXT NOT NULL,
    PRIMARY KEY (change_seq, person_id)
);
