-- Per-order event order, kept by the consumer rather than hoped for on the
-- wire. Each change to an order bumps its version in the transaction that
-- writes the change's event, and the event carries that version as its
-- `sequence`. The consumer applies sequence n only after n - 1; an event
-- that arrives early waits in `parked_events` until its predecessor is
-- applied, then both are applied in one transaction.

ALTER TABLE orders ADD COLUMN version bigint NOT NULL DEFAULT 1;
UPDATE orders SET version = 2 WHERE status = 'cancelled';

-- Events still waiting in the outbox get the sequence their order's
-- version gave them (the lab's only changes: created 1, cancelled 2).
UPDATE outbox
   SET payload = payload || jsonb_build_object(
       'sequence', CASE event_type WHEN 'order.cancelled' THEN 2 ELSE 1 END)
 WHERE published_at IS NULL AND NOT payload ? 'sequence';

-- The last sequence the consumer applied for each order; its row lock
-- serializes one order's events across consumers.
CREATE TABLE order_progress (
    order_id uuid PRIMARY KEY,
    applied  bigint NOT NULL
);
INSERT INTO order_progress (order_id, applied)
SELECT order_id, max(CASE event_type WHEN 'order.cancelled' THEN 2 ELSE 1 END)
  FROM notifications GROUP BY order_id;

-- Events that arrived before their predecessor, acknowledged to the broker
-- and kept here (not requeued: that would spin, and burn delivery attempts
-- until a dead letter) until the predecessor is applied.
CREATE TABLE parked_events (
    event_id  uuid PRIMARY KEY,
    order_id  uuid NOT NULL,
    sequence  bigint NOT NULL,
    envelope  jsonb NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, sequence)
);
