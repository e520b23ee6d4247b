-- Search plans (src/search/query.rs): one filter drives, the others probe each candidate.
-- Walking one type's resources in `rid` order (keyset paging, and the scan plan used when
-- every filter matches many resources) needs no sort with this index.
CREATE INDEX resource_type_rid ON resource (res_type, rid);
-- Equality lookups end in `rid`, so probing "does resource rid have this value" is one
-- seek in a covering index instead of a visit to every index row of the resource.
DROP INDEX idx_token_lookup;
CREATE INDEX idx_token_lookup ON idx_token (res_type, code, value, system, rid);
DROP INDEX idx_reference_lookup;
CREATE INDEX idx_reference_lookup ON idx_reference (res_type, code, target_id, target_type, rid);
DROP INDEX idx_uri_lookup;
CREATE INDEX idx_uri_lookup ON idx_uri (res_type, code, value, rid);
-- Range probes (string, date, number, quantity) seek to the resource's rows of one code.
DROP INDEX idx_string_rid;
CREATE INDEX idx_string_rid ON idx_string (rid, code);
DROP INDEX idx_date_rid;
CREATE INDEX idx_date_rid ON idx_date (rid, code);
DROP INDEX idx_number_rid;
CREATE INDEX idx_number_rid ON idx_number (rid, code);
DROP INDEX idx_quantity_rid;
CREATE INDEX idx_quantity_rid ON idx_quantity (rid, code);
