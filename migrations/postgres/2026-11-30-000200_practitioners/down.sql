DROP TABLE practitioners;
