-- A device's retained status says how it left: `offline` when it said
-- goodbye (a clean stop), `lost` when the broker published its last will
-- for it (it vanished). Both were `offline` before, and printed alike.
-- `online` stays, as `status = 'online'`, for what reads it.
ALTER TABLE devices ADD COLUMN status text NOT NULL DEFAULT 'offline'
    CHECK (status IN ('online', 'offline', 'lost'));
UPDATE devices SET status = 'online' WHERE online;
