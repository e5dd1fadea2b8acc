DROP TABLE audit_archives;
