//! HL7 v2 message → FHIR R4 transaction Bundle, after the HL7 v2-to-FHIR IG
//! (hl7.org/fhir/uv/v2mappings) for ADT, ORU and pharmacy, and IHE PCD TF-2 (PCD-01) with
//! the HL7 PoCD IG for device observations.
//!
//! Layout:
//! - `mod.rs`: the public entry point, message-type dispatch, the shared `Builder` and the
//!   Provenance every Bundle ends with.
//! - `adt.rs`: PID → Patient, PV1 → Encounter and Locations, NK1, AL1, DG1.
//! - `oru.rs`: ORU^R01 order groups; lab OBR/OBX → ServiceRequest, DiagnosticReport,
//!   Observation (and the OBX value types, shared with `pcd.rs`).
//! - `pcd.rs`: ORU^R01 from devices (PCD-01): containment tree → Device, DeviceMetric,
//!   vital-sign Observations.
//! - `pharmacy.rs`: RDE^O11, RAS^O17 → Medication, MedicationRequest,
//!   MedicationAdministration.
//! - `datatypes.rs`: v2 data types → FHIR data types; `bundle.rs`: entries and ids;
//!   `terminology.rs`: ConceptMap lookups.
//!
//! Architecture invariants: the mapping does no I/O and never panics; problems are values
//! (`MapError`s collected across the whole message, warnings for what was skipped); the same
//! message always gives the same Bundle, and every entry is addressed by a business
//! identifier so a re-delivered message writes nothing new.

mod adt;
pub(crate) mod bundle;
mod datatypes;
mod oru;
mod pcd;
mod pharmacy;
pub mod terminology;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value, json};

use crate::hl7v2::message::{Message, Segment};
use bundle::{Entry, Method};
use datatypes::{
    SegmentExt, hd_identifier, hl7_ts_offset, hl7_ts_to_fhir, hl7_ts_to_instant, urn_part,
};

pub use terminology::{Terminology, Translation};

/// What the caller supplies besides the message.
pub struct MapContext<'a> {
    /// MDC → LOINC and MDC unit → UCUM ConceptMaps.
    pub terminology: &'a Terminology,
    /// Where the raw message is kept: a reference (`Binary/<id>`, `urn:uuid:...` of an entry
    /// the caller adds) or any other identifier; it becomes the Provenance entity.
    pub message_ref: String,
}

/// A successful mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    /// A Bundle of type `transaction`.
    pub bundle: Value,
    /// What was deliberately not mapped (Z-segments, unsupported value types, ...).
    pub warnings: Vec<String>,
}

/// Why a message could not be mapped, located like an HL7 ERR segment (ERR-2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    pub segment: String,
    /// 1-based occurrence of the segment in the message.
    pub sequence: usize,
    pub field: Option<usize>,
    /// HL7 table 0357 message error condition code.
    pub code: u16,
    pub text: String,
}

impl MapError {
    pub const SEGMENT_SEQUENCE_ERROR: u16 = 100;
    pub const REQUIRED_FIELD_MISSING: u16 = 101;
    pub const DATA_TYPE_ERROR: u16 = 102;
    pub const UNSUPPORTED_MESSAGE_TYPE: u16 = 200;
    pub const APPLICATION_ERROR: u16 = 207;
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.segment, self.sequence)?;
        if let Some(field) = self.field {
            write!(f, "-{field}")?;
        }
        write!(f, ": {} ({})", self.text, self.code)
    }
}

impl std::error::Error for MapError {}

/// Maps one parsed message to a transaction Bundle.
pub fn map(msg: &Message, ctx: &MapContext) -> Result<Mapped, Vec<MapError>> {
    let Some(msh) = msg.first("MSH") else {
        return Err(vec![err(
            "MSH",
            1,
            None,
            MapError::REQUIRED_FIELD_MISSING,
            "no MSH segment",
        )]);
    };
    let (code, trigger, _) = msg.message_type();
    let (Some(code), Some(trigger)) = (datatypes::clean(code), datatypes::clean(trigger)) else {
        return Err(vec![err(
            "MSH",
            1,
            Some(9),
            MapError::REQUIRED_FIELD_MISSING,
            "MSH-9 message type and trigger event are required",
        )]);
    };
    let family = match (code, trigger) {
        ("ADT", t) if adt::TRIGGERS.contains(&t) => Family::Adt,
        ("ORU", "R01") => Family::Oru,
        ("RDE", "O11") | ("RAS", "O17") => Family::Pharmacy,
        _ => {
            return Err(vec![err(
                "MSH",
                1,
                Some(9),
                MapError::UNSUPPORTED_MESSAGE_TYPE,
                &format!("message type {code}^{trigger} is not supported"),
            )]);
        }
    };
    let mut b = Builder::new(msg, msh, ctx.terminology, code, trigger);
    let mapped: &[&str] = match family {
        Family::Adt => {
            adt::map(&mut b);
            adt::SEGMENTS
        }
        Family::Oru => {
            oru::map(&mut b);
            oru::SEGMENTS
        }
        Family::Pharmacy => {
            pharmacy::map(&mut b);
            pharmacy::SEGMENTS
        }
    };
    b.warn_unmapped(mapped);
    if !b.errors.is_empty() {
        return Err(b.errors);
    }
    if b.entries.is_empty() {
        return Err(vec![err(
            "MSH",
            1,
            None,
            MapError::APPLICATION_ERROR,
            "the message maps to no FHIR resource",
        )]);
    }
    let provenance = b.provenance(&ctx.message_ref);
    b.entries.push(provenance);
    let entries: Vec<Value> = std::mem::take(&mut b.entries)
        .into_iter()
        .map(Entry::into_json)
        .collect();
    let mut bundle = serde_json::Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("type".into(), json!("transaction"));
    // Moved in: `json!` would serialise the entries into a copy.
    bundle.insert("entry".into(), Value::Array(entries));
    Ok(Mapped {
        bundle: Value::Object(bundle),
        warnings: b.warnings,
    })
}

enum Family {
    Adt,
    Oru,
    Pharmacy,
}

fn err(segment: &str, sequence: usize, field: Option<usize>, code: u16, text: &str) -> MapError {
    MapError {
        segment: segment.into(),
        sequence,
        field,
        code,
        text: text.into(),
    }
}

/// A segment and its 1-based occurrence number, for error locations.
#[derive(Clone, Copy)]
pub(crate) struct Seg<'m> {
    pub s: &'m Segment,
    pub seq: usize,
}

impl<'m> std::ops::Deref for Seg<'m> {
    type Target = Segment;
    fn deref(&self) -> &Segment {
        self.s
    }
}

/// State shared by the message-family mappers while one message is mapped.
pub(crate) struct Builder<'m> {
    pub terminology: &'m Terminology,
    /// Every segment after MSH, in order, with its occurrence number.
    pub segs: Vec<Seg<'m>>,
    pub msh: &'m Segment,
    /// MSH-4 (else MSH-3): scopes identifiers that carry no assigning authority of their own.
    pub sender: String,
    /// The MSH-7 offset, the zone for timestamps sent without one.
    pub offset: Option<String>,
    pub control_id: String,
    pub message_code: String,
    pub trigger: String,
    pub entries: Vec<Entry>,
    /// The fullUrls in `entries`, so that adding stays linear on large device messages.
    urls: BTreeSet<String>,
    pub errors: Vec<MapError>,
    pub warnings: Vec<String>,
    warned: BTreeSet<String>,
}

impl<'m> Builder<'m> {
    fn new(
        msg: &'m Message,
        msh: &'m Segment,
        terminology: &'m Terminology,
        code: &str,
        trigger: &str,
    ) -> Builder<'m> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut segs = Vec::with_capacity(msg.segments.len());
        for s in &msg.segments {
            let n = counts.entry(s.id.as_str()).or_insert(0);
            *n += 1;
            let seq = *n;
            if s.id != "MSH" {
                segs.push(Seg { s, seq });
            }
        }
        let sender = msh
            .vc(4, 1)
            .or(msh.vc(4, 2))
            .or(msh.vc(3, 1))
            .or(msh.vc(3, 2))
            .unwrap_or("unknown")
            .to_string();
        let mut b = Builder {
            terminology,
            segs,
            msh,
            sender,
            offset: msh.v(7).and_then(hl7_ts_offset),
            control_id: String::new(),
            message_code: code.to_string(),
            trigger: trigger.to_string(),
            entries: Vec::new(),
            urls: BTreeSet::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            warned: BTreeSet::new(),
        };
        match msh.v(10) {
            Some(id) => b.control_id = id.to_string(),
            None => b.errors.push(err(
                "MSH",
                1,
                Some(10),
                MapError::REQUIRED_FIELD_MISSING,
                "MSH-10 message control id is required",
            )),
        }
        match msh.v(7) {
            None => b.errors.push(err(
                "MSH",
                1,
                Some(7),
                MapError::REQUIRED_FIELD_MISSING,
                "MSH-7 date/time of message is required",
            )),
            // Provenance.recorded is an instant: at least a full date is needed.
            Some(t) if hl7_ts_to_instant(t, b.offset.as_deref()).is_none() => {
                b.errors.push(err(
                    "MSH",
                    1,
                    Some(7),
                    MapError::DATA_TYPE_ERROR,
                    &format!("MSH-7 {t:?} is not a valid date/time"),
                ));
            }
            Some(_) => {}
        }
        b
    }

    pub fn error(&mut self, seg: Seg, field: Option<usize>, code: u16, text: impl Into<String>) {
        self.errors.push(MapError {
            segment: seg.id.clone(),
            sequence: seg.seq,
            field,
            code,
            text: text.into(),
        });
    }

    /// A required field is missing (table 0357 code 101).
    pub fn missing(&mut self, seg: Seg, field: usize, what: &str) {
        self.error(
            seg,
            Some(field),
            MapError::REQUIRED_FIELD_MISSING,
            format!("{}-{field} {what} is required", seg.id),
        );
    }

    /// A required segment is missing; `sequence` is the occurrence that was expected.
    pub fn missing_segment(&mut self, id: &str, sequence: usize, why: &str) {
        self.errors.push(err(
            id,
            sequence,
            None,
            MapError::REQUIRED_FIELD_MISSING,
            &format!("{id} segment is required {why}"),
        ));
    }

    /// A value is present but not of its data type (table 0357 code 102).
    pub fn bad(&mut self, seg: Seg, field: usize, what: &str, value: &str) {
        self.error(
            seg,
            Some(field),
            MapError::DATA_TYPE_ERROR,
            format!("{}-{field} {what}: {value:?} is not valid", seg.id),
        );
    }

    pub fn warn(&mut self, text: impl Into<String>) {
        let text = text.into();
        if self.warned.insert(text.clone()) {
            self.warnings.push(text);
        }
    }

    /// A timestamp field as FHIR dateTime/date; a malformed value is a data type error.
    pub fn ts(&mut self, seg: Seg, field: usize, what: &str) -> Option<String> {
        let raw = seg.v(field)?;
        let t = hl7_ts_to_fhir(raw, self.offset.as_deref());
        if t.is_none() {
            self.bad(seg, field, what, raw);
        }
        t
    }

    /// A timestamp field as FHIR instant (full precision); a malformed value is an error.
    pub fn instant(&mut self, seg: Seg, field: usize, what: &str) -> Option<String> {
        let raw = seg.v(field)?;
        let t = hl7_ts_to_instant(raw, self.offset.as_deref());
        if t.is_none() {
            self.bad(seg, field, what, raw);
        }
        t
    }

    /// `urn:hl7v2:<kind>:<sender>`: the system for identifiers this message defines but
    /// whose uniqueness only its sender guarantees.
    pub fn sender_urn(&self, kind: &str) -> String {
        format!("urn:hl7v2:{kind}:{}", urn_part(&self.sender))
    }

    /// Adds an entry unless one with the same fullUrl (the same resource) is already there;
    /// returns its fullUrl either way.
    pub fn add(&mut self, e: Entry) -> String {
        let url = e.full_url.clone();
        if self.urls.insert(url.clone()) {
            self.entries.push(e);
        }
        url
    }

    pub fn resource_mut(&mut self, full_url: &str) -> Option<&mut Map<String, Value>> {
        self.entries
            .iter_mut()
            .find(|e| e.full_url == full_url)
            .and_then(|e| e.resource.as_object_mut())
    }

    /// One warning per segment id the mapping did not use: the raw message keeps them.
    fn warn_unmapped(&mut self, mapped: &[&str]) {
        let mut ids: BTreeMap<&'m str, usize> = BTreeMap::new();
        for s in &self.segs {
            if !mapped.contains(&s.s.id.as_str()) {
                *ids.entry(s.s.id.as_str()).or_insert(0) += 1;
            }
        }
        for (id, n) in ids {
            let what = if id.starts_with('Z') {
                "Z-segment"
            } else {
                "segment"
            };
            self.warn(format!(
                "{what} {id} ({n}x) is not mapped; it stays in the stored raw message"
            ));
        }
    }

    /// The Provenance of everything else in the Bundle: who sent it (MSH-3/MSH-4), when
    /// (MSH-7), which message (MSH-10, `message_ref`) and why (the trigger event). Created
    /// once per message: `ifNoneExist` on a tag naming the message makes re-delivery a no-op.
    fn provenance(&self, message_ref: &str) -> Entry {
        let msh = self.msh;
        let message_system = self.sender_urn("message");
        let targets: Vec<Value> = self
            .entries
            .iter()
            .map(|e| json!({"reference": e.full_url}))
            .collect();
        let mut p = Map::new();
        p.insert("resourceType".into(), json!("Provenance"));
        p.insert(
            "meta".into(),
            json!({"tag": [{"system": message_system, "code": self.control_id}]}),
        );
        p.insert("target".into(), Value::Array(targets));
        if let Some(evn) = self.segs.iter().find(|s| s.id == "EVN") {
            let occurred = evn
                .v(6)
                .or(evn.v(2))
                .and_then(|t| hl7_ts_to_fhir(t, self.offset.as_deref()));
            if let Some(t) = occurred {
                p.insert("occurredDateTime".into(), json!(t));
            }
        }
        // MSH-7 is checked in `new`; a value that is not a timestamp was reported there too.
        let recorded = msh
            .v(7)
            .and_then(|t| hl7_ts_to_instant(t, self.offset.as_deref()));
        p.insert("recorded".into(), json!(recorded.unwrap_or_default()));
        p.insert(
            "activity".into(),
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": self.trigger}]}),
        );
        let mut agents = Vec::new();
        // An application name is only unique within its facility.
        let application_system = self.sender_urn("application");
        for (field, ty, display, reference_type, fallback) in [
            (
                3,
                "assembler",
                "Assembler",
                "Device",
                application_system.as_str(),
            ),
            (
                4,
                "custodian",
                "Custodian",
                "Organization",
                "urn:hl7v2:facility",
            ),
        ] {
            let (ns, uid, uid_type) = (msh.vc(field, 1), msh.vc(field, 2), msh.vc(field, 3));
            let Some(id) = hd_identifier(ns, uid, uid_type, fallback) else {
                continue;
            };
            let mut who = Map::new();
            who.insert("type".into(), json!(reference_type));
            who.insert("identifier".into(), id);
            if let Some(d) = ns.or(uid) {
                who.insert("display".into(), json!(d));
            }
            agents.push(json!({
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": ty, "display": display}]},
                "who": who,
            }));
        }
        if agents.is_empty() {
            // Provenance.agent is required; MSH-3 and MSH-4 were both empty.
            agents.push(json!({"who": {"display": "unidentified HL7 v2 sender"}}));
        }
        p.insert("agent".into(), Value::Array(agents));
        let mut what = Map::new();
        if is_reference(message_ref) {
            what.insert("reference".into(), json!(message_ref));
        }
        what.insert(
            "identifier".into(),
            json!({"system": message_system, "value": self.control_id}),
        );
        what.insert(
            "display".into(),
            json!(format!(
                "HL7 v2 {}^{} message {}",
                self.message_code, self.trigger, self.control_id
            )),
        );
        let mut entities = vec![json!({"role": "source", "what": what})];
        if !message_ref.is_empty() && !is_reference(message_ref) {
            entities
                .push(json!({"role": "source", "what": {"identifier": {"value": message_ref}}}));
        }
        p.insert("entity".into(), Value::Array(entities));
        let query = bundle::token_query("_tag", &message_system, &self.control_id);
        Entry::new(
            "Provenance",
            query,
            Method::CreateIfNoneExist,
            Value::Object(p),
        )
    }
}

/// `Type/id` or `urn:uuid:...`: something a Reference.reference can carry.
fn is_reference(s: &str) -> bool {
    if s.starts_with("urn:uuid:") {
        return true;
    }
    let Some((ty, id)) = s.split_once('/') else {
        return false;
    };
    ty.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && ty.chars().all(|c| c.is_ascii_alphabetic())
        && (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
}
