DROP TABLE consent_subject_changes;
