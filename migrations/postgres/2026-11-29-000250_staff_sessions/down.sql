DROP TABLE staff_sessions;
DROP TABLE oidc_logins;
