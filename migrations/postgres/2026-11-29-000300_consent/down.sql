DROP TABLE consent_change_seq;
DROP TABLE data_sharing_agreements;
DROP TABLE consent_history;
DROP TABLE consents;
