-- Inventory keys whose Redis copy may hold a quantity that was never
-- committed (a write-through whose Redis reply timed out, or whose commit
-- failed after Redis took it). Kept in Postgres, not only in memory, so a
-- restarted service still repairs them before it serves them.
CREATE TABLE inventory_cache_repairs (
    sku text PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);
