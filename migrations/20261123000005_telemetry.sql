-- The telemetry lab: thermostats report over MQTT; the ingest service keeps
-- what they say here.

-- One row per device: its retained status and its latest reading.
CREATE TABLE devices (
    id                 text PRIMARY KEY,
    online             boolean NOT NULL DEFAULT false,
    status_at          timestamptz,
    last_seen          timestamptz,
    last_seq           bigint,
    last_ts            timestamptz,
    last_temperature_c double precision,
    last_humidity_pct  double precision,
    last_battery_pct   double precision
);

-- A QoS 1 redelivery carries the same (device_id, seq): the primary key
-- turns it into a no-op instead of a second reading.
CREATE TABLE readings (
    device_id     text             NOT NULL,
    seq           bigint           NOT NULL,
    ts            timestamptz      NOT NULL,
    temperature_c double precision NOT NULL,
    humidity_pct  double precision NOT NULL,
    battery_pct   double precision NOT NULL,
    -- When the ingest wrote the row (clock_timestamp, not the transaction's
    -- start): `lab bench telemetry` measures publish-to-row latency with it.
    stored_at     timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX readings_device_ts ON readings (device_id, ts);

-- Payloads the ingest could not use, with why: counted and kept, never a crash.
CREATE TABLE rejects (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    payload     text        NOT NULL,
    reason      text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE commands (
    id         uuid PRIMARY KEY,
    device_id  text             NOT NULL,
    setpoint_c double precision NOT NULL,
    status     text             NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'acknowledged')),
    created_at timestamptz      NOT NULL DEFAULT now(),
    acked_at   timestamptz
);

-- One alert per run of high readings, keyed by the reading that completed
-- the run, so a redelivery cannot raise it twice (the ingest also checks the
-- run's other readings, for two instances storing it out of order).
CREATE TABLE alerts (
    id            bigserial PRIMARY KEY,
    device_id     text             NOT NULL,
    seq           bigint           NOT NULL,
    temperature_c double precision NOT NULL,
    threshold_c   double precision NOT NULL,
    readings      integer          NOT NULL,
    ts            timestamptz      NOT NULL,
    created_at    timestamptz      NOT NULL DEFAULT now(),
    UNIQUE (device_id, seq)
);
