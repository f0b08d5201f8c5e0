-- The outbox lab: orders, the outbox the relay drains, and the consumer's
-- side of the story (what it has handled, what it did).

CREATE TABLE orders (
    id          uuid PRIMARY KEY,
    customer_id text NOT NULL,
    items       jsonb NOT NULL,
    total_cents bigint NOT NULL CHECK (total_cents >= 0),
    status      text NOT NULL CHECK (status IN ('created', 'cancelled')),
    -- How this order's events leave: through the outbox, or the naive dual write.
    delivery    text NOT NULL CHECK (delivery IN ('outbox', 'dual-write')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A retried POST with the same Idempotency-Key gets the first response back.
-- Written in the order's transaction, so a key exists only for an order that does.
CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    request      jsonb NOT NULL,
    order_id     uuid NOT NULL REFERENCES orders (id),
    response     jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per event, written in the same transaction as the change it
-- describes. `id` gives the publishing order; `published_at IS NULL` (not
-- `id > last seen`) finds the rows still to send, because ids are handed
-- out before commit and a lower id can commit after a higher one.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    aggregate_id uuid NOT NULL,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Wakes the relay as soon as an event commits (NOTIFY is delivered at
-- commit). A connection can opt out with `SET outbox.notify = 'off'`, which
-- `lab bench outbox` uses to measure what NOTIFY costs: it takes a global
-- lock at commit.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('outbox.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_inserted AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- The consumer's memory: an event id here has been acted on, so a redelivery
-- is acknowledged without acting twice.
CREATE TABLE processed_events (
    event_id     uuid PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);

-- The consumer's side effect, written in the same transaction as
-- processed_events.
CREATE TABLE notifications (
    id          bigserial PRIMARY KEY,
    event_id    uuid NOT NULL UNIQUE,
    order_id    uuid NOT NULL,
    event_type  text NOT NULL,
    message     text NOT NULL,
    -- When the event was committed, and when it was handled: the difference
    -- is the end-to-end latency `lab bench outbox` reports.
    occurred_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX notifications_order ON notifications (order_id, id);
