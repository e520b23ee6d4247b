-- Reference rows are written once per reference:
-- - parameters that restrict another to one target type (Observation `patient` is
--   `subject` whose target is a Patient; `Registry::restricted`) have no rows of their own
--   any more: their searches read the base parameter's rows and their `target_type`;
-- - `idx_reference_target` goes: compartments and `_revinclude` now name their parameters
--   and seek the lookup index (param, target_id, target_type, rid) instead.
-- Each generated Observation wrote four reference index entries at random places of big
-- indexes (subject and patient, lookup and target); it now writes one.
-- The rows already stored are rebuilt at the next start (the `patient` rows go, and a
-- `urn:uuid:` reference with `Reference.type` gets that type), like after migration 7.
DROP INDEX idx_reference_target;
INSERT INTO store_task (name) SELECT 'rebuild-search-index' WHERE EXISTS (SELECT 1 FROM resource)
    ON CONFLICT (name) DO NOTHING;
