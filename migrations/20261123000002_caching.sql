-- The caching lab: one table per strategy.

-- Cache-aside: read-heavy profiles.
CREATE TABLE profiles (
    id         uuid PRIMARY KEY,
    name       text NOT NULL,
    email      text NOT NULL,
    bio        text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Write-through: stock levels. `version` rises with every write, so Redis
-- never replaces a newer cached value with an older one.
CREATE TABLE inventory (
    sku        text PRIMARY KEY,
    quantity   bigint NOT NULL CHECK (quantity >= 0),
    version    bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Write-behind: page views, flushed from a Redis Stream in batches.
CREATE TABLE page_views (
    page       text PRIMARY KEY,
    views      bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Stream entries already counted, so a batch applied twice (a flusher that
-- crashed after commit, before XACK) is not counted twice.
CREATE TABLE page_view_entries (
    entry      text PRIMARY KEY,             -- '<stream key> <entry id>'
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX page_view_entries_applied_at ON page_view_entries (applied_at);
