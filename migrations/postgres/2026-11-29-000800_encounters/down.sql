DROP TABLE encounters;
