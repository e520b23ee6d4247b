//! Device telemetry (JSON messages over HTTP and MQTT): templates, normalisation and
//! mapping to FHIR. Pure code: no I/O beyond reading template files at start-up.

pub mod jsonpath;
pub mod map;
pub mod template;

pub use template::{Template, Templates};
