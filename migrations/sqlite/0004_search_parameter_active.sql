-- SearchParameter resources in force (activated by $reindex / `iomt-fhir reindex`), by the
-- version that was activated; loaded at start-up on top of the official parameters.
CREATE TABLE search_parameter_active (
    res_id  TEXT    NOT NULL PRIMARY KEY,
    version INTEGER NOT NULL
);
