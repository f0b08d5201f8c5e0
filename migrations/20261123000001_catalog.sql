-- The catalog lab: one table of products, served over REST and gRPC.
CREATE TABLE products (
    id          uuid PRIMARY KEY,            -- UUID v7: time-ordered, so keyset paging by id follows insertion order
    sku         text NOT NULL UNIQUE,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    price_cents bigint NOT NULL CHECK (price_cents BETWEEN 0 AND 1000000000),
    currency    char(3) NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
