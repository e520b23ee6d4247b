//! Integration tests: the real server on 127.0.0.1:0, spoken to over HTTP like a client.
//! Store tests run on SQLite always and on PostgreSQL when IOMT_FHIR_TEST_POSTGRES_URL is
//! set (`.ci/run` sets it and fails if PostgreSQL is unreachable).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod cli;
mod conformance;
mod crud;
mod devices;
mod errors;
mod hl7;
mod mqtt;
mod search;
mod smart;
mod transactions;
