-- Device messages that could not be mapped (device telemetry issue): the dead letters,
-- kept with the raw payload and the reason until a replay maps them.
CREATE TABLE device_message (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,          -- microseconds since the Unix epoch, UTC
    source      TEXT    NOT NULL,          -- "http", "mqtt:<topic>" or "replay"
    payload     TEXT    NOT NULL,          -- the message as received
    reason      TEXT    NOT NULL,
    replayed_at INTEGER                    -- set once a replay mapped it
);
CREATE INDEX device_message_open ON device_message (replayed_at, id);
