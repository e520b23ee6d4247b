//! Search (FHIR R4 search.html): parameter registry, index extraction, queries.

pub mod compartment;
pub mod extract;
pub mod fhirpath;
pub mod query;
pub mod registry;
