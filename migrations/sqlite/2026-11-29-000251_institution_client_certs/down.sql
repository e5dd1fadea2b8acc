DROP TABLE institution_client_certs;
