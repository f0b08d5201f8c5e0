-- The transaction that created each product, so that a listing can be one
-- snapshot: a page serves only the products whose creating transaction had
-- committed when the listing's first page was read (pg_visible_in_snapshot).
ALTER TABLE products ADD COLUMN created_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
