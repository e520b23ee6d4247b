-- Resource storage: every version kept, deletes are tombstones (body NULL).
CREATE TABLE resource_version (
    seq          INTEGER PRIMARY KEY,          -- global write order, for system history
    res_type     TEXT    NOT NULL,
    res_id       TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,             -- microseconds since the Unix epoch, UTC
    method       TEXT    NOT NULL,             -- POST, PUT, PATCH or DELETE
    body         TEXT,                         -- the stored JSON, meta included; NULL = deleted
    UNIQUE (res_type, res_id, version)
);
CREATE INDEX resource_version_type_seq ON resource_version (res_type, seq);
CREATE INDEX resource_version_updated ON resource_version (last_updated);

-- The current version of each resource; search indexes hang off `rid`.
CREATE TABLE resource (
    rid          INTEGER PRIMARY KEY,
    res_type     TEXT    NOT NULL,
    res_id       TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted      INTEGER NOT NULL,
    seq          INTEGER NOT NULL,             -- resource_version.seq of the current version
    idx_mask     INTEGER NOT NULL DEFAULT 0,   -- which idx_* tables hold rows for this resource
    UNIQUE (res_type, res_id)
);
CREATE INDEX resource_type_updated ON resource (res_type, last_updated);

-- Search indexes over current, non-deleted versions (search.html parameter types).
CREATE TABLE idx_token (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    system TEXT, value TEXT, text TEXT);
CREATE INDEX idx_token_lookup ON idx_token (res_type, code, value, system);
CREATE INDEX idx_token_rid ON idx_token (rid);

CREATE TABLE idx_string (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    norm TEXT NOT NULL, exact TEXT NOT NULL);
CREATE INDEX idx_string_lookup ON idx_string (res_type, code, norm);
CREATE INDEX idx_string_rid ON idx_string (rid);

CREATE TABLE idx_reference (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    target_type TEXT, target_id TEXT, url TEXT NOT NULL);
CREATE INDEX idx_reference_lookup ON idx_reference (res_type, code, target_id, target_type);
CREATE INDEX idx_reference_target ON idx_reference (target_type, target_id);
CREATE INDEX idx_reference_rid ON idx_reference (rid);

CREATE TABLE idx_date (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    lo INTEGER NOT NULL, hi INTEGER NOT NULL);
CREATE INDEX idx_date_lookup ON idx_date (res_type, code, lo);
CREATE INDEX idx_date_rid ON idx_date (rid);

CREATE TABLE idx_number (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    value REAL NOT NULL);
CREATE INDEX idx_number_lookup ON idx_number (res_type, code, value);
CREATE INDEX idx_number_rid ON idx_number (rid);

CREATE TABLE idx_quantity (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    value REAL NOT NULL, system TEXT, unit_code TEXT, unit TEXT);
CREATE INDEX idx_quantity_lookup ON idx_quantity (res_type, code, value);
CREATE INDEX idx_quantity_rid ON idx_quantity (rid);

CREATE TABLE idx_uri (rid INTEGER NOT NULL, res_type TEXT NOT NULL, code TEXT NOT NULL,
    value TEXT NOT NULL);
CREATE INDEX idx_uri_lookup ON idx_uri (res_type, code, value);
CREATE INDEX idx_uri_rid ON idx_uri (rid);
