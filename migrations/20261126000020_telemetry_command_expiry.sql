-- A command is worth applying only while it is fresh: a setpoint sent to a
-- thermostat that is away waited `pending` forever, and a device with a
-- persistent session would have applied it whenever it next connected.
-- Each command now carries when it expires (60 s after it is sent, unless
-- the request says otherwise; the MQTT message gets the same expiry, so the
-- broker drops it rather than deliver it late). A pending command past its
-- expiry *is* expired: the API says `expired` from `status` and
-- `expires_at`, with no job to flip rows and no moment when a row says
-- `pending` past its time; an ack stored after it changes nothing and is
-- kept as a reject. Commands sent before this migration get the default.
ALTER TABLE commands ADD COLUMN expires_at timestamptz;
UPDATE commands SET expires_at = created_at + interval '60 seconds';
ALTER TABLE commands ALTER COLUMN expires_at SET NOT NULL;
