-- Every HL7 v2 message received, raw, with what became of it (HL7 v2 ingestion issue).
CREATE TABLE hl7_message (
    id                  INTEGER PRIMARY KEY,
    received_at         INTEGER NOT NULL,          -- microseconds since the Unix epoch, UTC
    peer                TEXT,                      -- remote address, or "http"
    sending_application TEXT,
    sending_facility    TEXT,
    control_id          TEXT,
    message_type        TEXT,
    raw_base64          TEXT    NOT NULL,          -- the bytes as received (any charset)
    outcome             TEXT    NOT NULL,          -- AA, AE or AR
    ack                 TEXT    NOT NULL,          -- the acknowledgement sent
    resources           TEXT,                      -- JSON array of Type/id/_history/n written
    error               TEXT,
    dedup_key           TEXT UNIQUE                -- MSH-3|MSH-4|MSH-10 of committed messages
);
CREATE INDEX hl7_message_received ON hl7_message (received_at);
