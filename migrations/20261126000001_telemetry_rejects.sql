-- The telemetry ingest deletes rejects past their retention
-- (TELEMETRY_REJECTS_RETENTION_SECS) every so often: without an index that
-- delete reads the whole table each time.
CREATE INDEX rejects_received_at ON rejects (received_at);
