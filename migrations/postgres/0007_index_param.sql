-- Search index rows key on one integer, `param` (`store::resource::param_key`: the search
-- parameter's code and the resource type, hashed), instead of repeating the type and the
-- code as text in every row and in every index entry: smaller indexes, and key comparisons
-- of one integer instead of two strings. The old rows cannot be converted in SQL (the hash
-- is computed in Rust), so the tables start empty and `store_task` asks the next start to
-- rebuild every resource's index from its stored body before it serves
-- (`interaction::reindex::rebuild_if_flagged`).
DROP TABLE idx_token;
DROP TABLE idx_string;
DROP TABLE idx_reference;
DROP TABLE idx_date;
DROP TABLE idx_number;
DROP TABLE idx_quantity;
DROP TABLE idx_uri;

CREATE TABLE idx_token (rid BIGINT NOT NULL, param BIGINT NOT NULL, system TEXT COLLATE "C", value TEXT COLLATE "C", text TEXT COLLATE "C");
-- Equality lookups end in `rid`, so probing "does resource rid have this value" is one seek
-- in a covering index.
CREATE INDEX idx_token_lookup ON idx_token (param, value, system, rid);
CREATE INDEX idx_token_rid ON idx_token (rid);

CREATE TABLE idx_string (rid BIGINT NOT NULL, param BIGINT NOT NULL, norm TEXT COLLATE "C" NOT NULL, exact TEXT COLLATE "C" NOT NULL);
CREATE INDEX idx_string_lookup ON idx_string (param, norm);
-- Range probes (string, date, number, quantity) seek to the resource's rows of one parameter.
CREATE INDEX idx_string_rid ON idx_string (rid, param);

CREATE TABLE idx_reference (rid BIGINT NOT NULL, param BIGINT NOT NULL, target_type TEXT COLLATE "C", target_id TEXT COLLATE "C",
    url TEXT COLLATE "C" NOT NULL);
CREATE INDEX idx_reference_lookup ON idx_reference (param, target_id, target_type, rid);
CREATE INDEX idx_reference_target ON idx_reference (target_type, target_id);
CREATE INDEX idx_reference_rid ON idx_reference (rid);

CREATE TABLE idx_date (rid BIGINT NOT NULL, param BIGINT NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL);
CREATE INDEX idx_date_lookup ON idx_date (param, lo);
CREATE INDEX idx_date_rid ON idx_date (rid, param);

CREATE TABLE idx_number (rid BIGINT NOT NULL, param BIGINT NOT NULL, value DOUBLE PRECISION NOT NULL);
CREATE INDEX idx_number_lookup ON idx_number (param, value);
CREATE INDEX idx_number_rid ON idx_number (rid, param);

CREATE TABLE idx_quantity (rid BIGINT NOT NULL, param BIGINT NOT NULL, value DOUBLE PRECISION NOT NULL, system TEXT COLLATE "C",
    unit_code TEXT COLLATE "C", unit TEXT COLLATE "C");
CREATE INDEX idx_quantity_lookup ON idx_quantity (param, value);
CREATE INDEX idx_quantity_rid ON idx_quantity (rid, param);

CREATE TABLE idx_uri (rid BIGINT NOT NULL, param BIGINT NOT NULL, value TEXT COLLATE "C" NOT NULL);
CREATE INDEX idx_uri_lookup ON idx_uri (param, value, rid);
CREATE INDEX idx_uri_rid ON idx_uri (rid);

UPDATE resource SET idx_mask = 0 WHERE idx_mask <> 0;

-- Work a start must finish before it serves; a row is removed once done.
CREATE TABLE store_task (name TEXT PRIMARY KEY);
INSERT INTO store_task (name) SELECT 'rebuild-search-index' WHERE EXISTS (SELECT 1 FROM resource);
