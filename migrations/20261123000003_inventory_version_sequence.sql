-- Inventory versions come from a sequence: a version handed out to a write
-- that rolled back is never handed out again, so a value Redis saw from that
-- write can never be mistaken for a later, committed one.
CREATE SEQUENCE inventory_version_seq;
SELECT setval('inventory_version_seq', coalesce((SELECT max(version) FROM inventory), 0) + 1, false);
ALTER TABLE inventory ALTER COLUMN version SET DEFAULT nextval('inventory_version_seq');
