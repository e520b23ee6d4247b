-- PostgreSQL twin of migrations/sqlite/0001_resources.sql. Text uses the "C" collation so
-- that range scans (string prefix search) compare bytes, as SQLite does.
-- Resource storage: every version kept, deletes are tombstones (body NULL).
CREATE TABLE resource_version (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,         -- global write order, for system history
    res_type     TEXT COLLATE "C"    NOT NULL,
    res_id       TEXT COLLATE "C"    NOT NULL,
    version      BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,             -- microseconds since the Unix epoch, UTC
    method       TEXT COLLATE "C"    NOT NULL,             -- POST, PUT, PATCH or DELETE
    body         TEXT COLLATE "C",                         -- the stored JSON, meta included; NULL = deleted
    UNIQUE (res_type, res_id, version)
);
CREATE INDEX resource_version_type_seq ON resource_version (res_type, seq);
CREATE INDEX resource_version_updated ON resource_version (last_updated);

-- The current version of each resource; search indexes hang off `rid`.
CREATE TABLE resource (
    rid          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    res_type     TEXT COLLATE "C"    NOT NULL,
    res_id       TEXT COLLATE "C"    NOT NULL,
    version      BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted      BIGINT NOT NULL,
    seq          BIGINT NOT NULL,             -- resource_version.seq of the current version
    idx_mask     BIGINT NOT NULL DEFAULT 0,   -- which idx_* tables hold rows for this resource
    UNIQUE (res_type, res_id)
);
CREATE INDEX resource_type_updated ON resource (res_type, last_updated);

-- Search indexes over current, non-deleted versions (search.html parameter types).
CREATE TABLE idx_token (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    system TEXT COLLATE "C", value TEXT COLLATE "C", text TEXT COLLATE "C");
CREATE INDEX idx_token_lookup ON idx_token (res_type, code, value, system);
CREATE INDEX idx_token_rid ON idx_token (rid);

CREATE TABLE idx_string (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    norm TEXT COLLATE "C" NOT NULL, exact TEXT COLLATE "C" NOT NULL);
CREATE INDEX idx_string_lookup ON idx_string (res_type, code, norm);
CREATE INDEX idx_string_rid ON idx_string (rid);

CREATE TABLE idx_reference (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    target_type TEXT COLLATE "C", target_id TEXT COLLATE "C", url TEXT COLLATE "C" NOT NULL);
CREATE INDEX idx_reference_lookup ON idx_reference (res_type, code, target_id, target_type);
CREATE INDEX idx_reference_target ON idx_reference (target_type, target_id);
CREATE INDEX idx_reference_rid ON idx_reference (rid);

CREATE TABLE idx_date (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    lo BIGINT NOT NULL, hi BIGINT NOT NULL);
CREATE INDEX idx_date_lookup ON idx_date (res_type, code, lo);
CREATE INDEX idx_date_rid ON idx_date (rid);

CREATE TABLE idx_number (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    value DOUBLE PRECISION NOT NULL);
CREATE INDEX idx_number_lookup ON idx_number (res_type, code, value);
CREATE INDEX idx_number_rid ON idx_number (rid);

CREATE TABLE idx_quantity (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    value DOUBLE PRECISION NOT NULL, system TEXT COLLATE "C", unit_code TEXT COLLATE "C", unit TEXT COLLATE "C");
CREATE INDEX idx_quantity_lookup ON idx_quantity (res_type, code, value);
CREATE INDEX idx_quantity_rid ON idx_quantity (rid);

CREATE TABLE idx_uri (rid BIGINT NOT NULL, res_type TEXT COLLATE "C" NOT NULL, code TEXT COLLATE "C" NOT NULL,
    value TEXT COLLATE "C" NOT NULL);
CREATE INDEX idx_uri_lookup ON idx_uri (res_type, code, value);
CREATE INDEX idx_uri_rid ON idx_uri (rid);
