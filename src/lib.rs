//! iomt-fhir: a FHIR R4 server for the Internet of Medical Things.
//!
//! # Layout
//!
//! - [`config`]: flags, environment and TOML file, resolved into [`config::Settings`].
//! - [`app`]: start-up (store, definitions, listener) and graceful shutdown.
//! - [`rest`]: the HTTP transport; the only module that knows axum.
//! - [`mllp`]: the MLLP transport for HL7 v2 (`--mllp-listen`).
//! - [`interaction`]: the FHIR interactions (read, create, transaction, ...), one file each,
//!   shared by REST calls and Bundle entries.
//! - [`search`]: search parameter registry, FHIRPath index extraction, query compilation.
//! - [`validation`]: R4 JSON schema plus the rules the schema cannot express.
//! - [`store`]: the one write path (transactions, group commit) and versioned storage;
//!   the only module that knows sqlx.
//! - [`definitions`]: the official R4 definitions, embedded in the binary.
//! - [`import`]: the `import` command.
//! - [`hl7v2`]: HL7 v2 parsing, MLLP framing, ACKs and the HL7 v2 → FHIR mapping (pure).
//! - [`error`]: error kinds and OperationOutcomes, one table.

pub mod app;
pub mod auth;
pub mod config;
pub mod definitions;
pub mod devices;
pub mod error;
pub mod hl7v2;
pub mod import;
pub mod interaction;
pub mod mllp;
pub mod mqtt;
pub mod rest;
pub mod search;
pub mod store;
pub mod time;
pub mod tls;
pub mod validation;
