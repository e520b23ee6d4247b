//! HL7 v2.x message ingestion (HL7 v2.5.1 chapter 2 "Control", MLLP from the HL7 v2 transport specification).
//!
//! Layout, from the wire inwards:
//! - [`mllp`]: byte framing of the Minimal Lower Layer Protocol (`0x0B … 0x1C 0x0D`).
//! - [`parse`]: bytes → [`message::Message`] (charset, segment separators, delimiters,
//!   escape sequences, batches) plus HL7 timestamps → FHIR `dateTime`.
//! - [`message`]: the owned, decoded message model that the FHIR mappers read.
//! - [`ack`]: acknowledgement (`ACK`) messages with `MSA` and `ERR` segments.
//!
//! Architecture invariant: nothing here does I/O, and no input, however malformed,
//! makes any function here panic (see the fuzz test in `parse.rs`).

pub mod ack;
pub mod map;
pub mod message;
pub mod mllp;
pub mod parse;
