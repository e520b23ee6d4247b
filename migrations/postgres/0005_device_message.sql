-- Device messages that could not be mapped (device telemetry issue): the dead letters,
-- kept with the raw payload and the reason until a replay maps them.
CREATE TABLE device_message (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at BIGINT NOT NULL,                 -- microseconds since the Unix epoch, UTC
    source      TEXT COLLATE "C" NOT NULL,       -- "http", "mqtt:<topic>" or "replay"
    payload     TEXT COLLATE "C" NOT NULL,       -- the message as received
    reason      TEXT COLLATE "C" NOT NULL,
    replayed_at BIGINT                           -- set once a replay mapped it
);
CREATE INDEX device_message_open ON device_message (replayed_at, id);
