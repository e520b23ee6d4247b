-- Every HL7 v2 message received, raw, with what became of it (HL7 v2 ingestion issue).
CREATE TABLE hl7_message (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at         BIGINT NOT NULL,          -- microseconds since the Unix epoch, UTC
    peer                TEXT COLLATE "C",                      -- remote address, or "http"
    sending_application TEXT COLLATE "C",
    sending_facility    TEXT COLLATE "C",
    control_id          TEXT COLLATE "C",
    message_type        TEXT COLLATE "C",
    raw_base64          TEXT COLLATE "C"    NOT NULL,          -- the bytes as received (any charset)
    outcome             TEXT COLLATE "C"    NOT NULL,          -- AA, AE or AR
    ack                 TEXT COLLATE "C"    NOT NULL,          -- the acknowledgement sent
    resources           TEXT COLLATE "C",                      -- JSON array of Type/id/_history/n written
    error               TEXT COLLATE "C",
    dedup_key           TEXT COLLATE "C" UNIQUE                -- MSH-3|MSH-4|MSH-10 of committed messages
);
CREATE INDEX hl7_message_received ON hl7_message (received_at);
