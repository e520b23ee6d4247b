//! ORU^R01 (HL7 v2 chapter 7) → ServiceRequest, DiagnosticReport, Observation, after the
//! v2-to-FHIR IG message map ORU_R01 and segment maps OBR[ServiceRequest],
//! OBR[DiagnosticReport], OBX[Observation]. Device messages (IHE PCD-01) are split off to
//! `pcd.rs` per order group; the OBX value, unit, range and status rules here serve both.

use serde_json::{Map, Value, json};

use crate::hl7v2::map::adt::{self, EncounterRef, PatientRef};
use crate::hl7v2::map::bundle::{Entry, Method, token_query};
use crate::hl7v2::map::datatypes::{
    MDC, RepExt, SegmentExt, UCUM, cwe, cwe_key, ei, hl7_tm_to_fhir, hl7_ts_to_fhir, id_type,
    identifier, nm, xcn_reference,
};
use crate::hl7v2::map::{Builder, MapError, Seg, pcd};
use crate::hl7v2::message::Repetition;

pub(crate) const SEGMENTS: &[&str] = &["PID", "PV1", "ORC", "OBR", "OBX", "NTE"];

const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

/// One OBX with the NTEs that follow it.
pub(crate) struct Row<'m> {
    pub obx: Seg<'m>,
    pub notes: Vec<Seg<'m>>,
}

/// One ORDER_OBSERVATION group: ORC (optional), OBR, its OBXs, and the patient context.
pub(crate) struct Group<'m> {
    pub orc: Option<Seg<'m>>,
    pub obr: Seg<'m>,
    pub rows: Vec<Row<'m>>,
    pub patient: Option<PatientRef>,
    pub encounter: Option<EncounterRef>,
}

impl Group<'_> {
    /// The order's key for observation identities: filler (OBR-3/ORC-3), else placer.
    pub fn order_key(&self) -> Option<&str> {
        let field = |n: usize| self.obr.v(n).or_else(|| self.orc.and_then(|o| o.s.v(n)));
        field(3).or_else(|| field(2))
    }
}

pub(crate) fn map(b: &mut Builder) {
    let device = is_device_message(b);
    let mut groups: Vec<Group> = Vec::new();
    let mut patient: Option<PatientRef> = None;
    let mut encounter: Option<EncounterRef> = None;
    let mut orc: Option<Seg> = None;
    for seg in b.segs.clone() {
        match seg.id.as_str() {
            "PID" => {
                patient = adt::patient(b, seg, Method::CreateIfNoneExist);
                encounter = None;
            }
            "PV1" => {
                encounter = match &patient {
                    Some(p) => adt::encounter_reference(b, seg, p),
                    None => None,
                };
            }
            "ORC" => orc = Some(seg),
            "OBR" => groups.push(Group {
                orc: orc.take(),
                obr: seg,
                rows: Vec::new(),
                patient: patient.clone(),
                encounter: encounter.clone(),
            }),
            "OBX" => match groups.last_mut() {
                Some(g) => g.rows.push(Row {
                    obx: seg,
                    notes: Vec::new(),
                }),
                None => b.error(
                    seg,
                    None,
                    MapError::SEGMENT_SEQUENCE_ERROR,
                    "OBX outside an OBR group",
                ),
            },
            "NTE" => {
                if let Some(row) = groups.last_mut().and_then(|g| g.rows.last_mut()) {
                    row.notes.push(seg);
                }
            }
            _ => {}
        }
    }
    if groups.is_empty() {
        b.missing_segment("OBR", 1, "in ORU^R01");
    }
    if patient.is_none() && groups.iter().all(|g| g.patient.is_none()) {
        b.warn("no PID: observations have no subject");
    }
    for g in &groups {
        if device {
            pcd::map_group(b, g);
        } else {
            lab_group(b, g);
        }
    }
}

/// PCD-01 is recognised by its profile id in MSH-21 (IHE_PCD_001, or another IHE PCD
/// profile) or, since not every gateway sends MSH-21, by MDC-coded observation ids.
fn is_device_message(b: &Builder) -> bool {
    let profile = b.msh.reps(21).iter().any(|r| {
        r.c(1)
            .is_some_and(|p| p.to_ascii_uppercase().contains("PCD"))
    });
    profile
        || b.segs
            .iter()
            .any(|s| s.id == "OBX" && s.vc(3, 3) == Some("MDC"))
}

fn lab_group(b: &mut Builder, g: &Group) {
    let obr = g.obr;
    let Some(code) = obr.rep(4).and_then(|r| cwe(r, None)) else {
        b.missing(obr, 4, "universal service identifier");
        return;
    };
    let order_field = |n: usize| obr.rep(n).or_else(|| g.orc.and_then(|o| o.s.rep(n)));
    let placer = order_field(2).and_then(|r| ei(r, &b.sender_urn("placer")));
    let filler = order_field(3).and_then(|r| ei(r, &b.sender_urn("filler")));
    let mut order_ids = Vec::new();
    for (id, ty) in [(&placer, "PLAC"), (&filler, "FILL")] {
        if let Some((system, value)) = id {
            order_ids.push(json!({"type": id_type(ty), "system": system, "value": value}));
        }
    }
    let effective = b.ts(obr, 7, "observation date/time");
    let effective_end = b.ts(obr, 8, "observation end date/time");
    let status = obr.v(25);

    // ServiceRequest.subject is required: without a PID there is no order to record.
    let order_id = placer
        .as_ref()
        .or(filler.as_ref())
        .filter(|_| g.patient.is_some());
    let service_request = order_id.map(|(system, value)| {
        let mut sr = Map::new();
        sr.insert("resourceType".into(), json!("ServiceRequest"));
        sr.insert("identifier".into(), Value::Array(order_ids.clone()));
        let sr_status = match status {
            Some("F" | "C") => "completed",
            Some("X") => "revoked",
            _ => "active",
        };
        sr.insert("status".into(), json!(sr_status));
        sr.insert("intent".into(), json!("order"));
        sr.insert("code".into(), code.clone());
        insert_subject(&mut sr, "subject", g);
        if let Some(r) = obr
            .rep(16)
            .and_then(|r| xcn_reference(r, &b.sender_urn("authority")))
        {
            sr.insert("requester".into(), r);
        }
        Entry::new(
            "ServiceRequest",
            token_query("identifier", system, value),
            Method::CreateIfNoneExist,
            Value::Object(sr),
        )
    });
    let service_request = service_request.map(|e| b.add(e));

    let mut results = Vec::new();
    for (i, row) in g.rows.iter().enumerate() {
        if let Some(url) = lab_observation(b, g, row, i + 1, effective.as_deref()) {
            results.push(json!({"reference": url}));
        }
    }

    let (dr_system, dr_value) = match filler.as_ref().or(placer.as_ref()) {
        Some(id) => id.clone(),
        None => (
            b.sender_urn("message"),
            format!("{}|{}", b.control_id, obr.v(1).unwrap_or("1")),
        ),
    };
    let mut dr = Map::new();
    dr.insert("resourceType".into(), json!("DiagnosticReport"));
    if order_ids.is_empty() {
        order_ids.push(identifier(&dr_system, &dr_value));
    }
    dr.insert("identifier".into(), Value::Array(order_ids));
    if let Some(sr) = &service_request {
        dr.insert("basedOn".into(), json!([{"reference": sr}]));
    }
    dr.insert("status".into(), json!(report_status(status)));
    if let Some(section) = obr.v(24) {
        dr.insert(
            "category".into(),
            json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": section}]}]),
        );
    }
    dr.insert("code".into(), code);
    insert_subject(&mut dr, "subject", g);
    match (effective, effective_end) {
        (Some(start), Some(end)) => {
            dr.insert(
                "effectivePeriod".into(),
                json!({"start": start, "end": end}),
            );
        }
        (Some(t), None) => {
            dr.insert("effectiveDateTime".into(), json!(t));
        }
        _ => {}
    }
    if let Some(t) = b.instant(obr, 22, "results report/status change date/time") {
        dr.insert("issued".into(), json!(t));
    }
    if !results.is_empty() {
        dr.insert("result".into(), Value::Array(results));
    }
    let query = token_query("identifier", &dr_system, &dr_value);
    b.add(Entry::new(
        "DiagnosticReport",
        query,
        Method::Update,
        Value::Object(dr),
    ));
}

/// Puts `subject` (and `encounter`) references for the group's patient context.
pub(crate) fn insert_subject(r: &mut Map<String, Value>, key: &str, g: &Group) {
    if let Some(p) = &g.patient {
        r.insert(key.into(), json!({"reference": p.full_url}));
    }
    if let Some(e) = &g.encounter {
        r.insert("encounter".into(), json!({"reference": e.full_url}));
    }
}

/// The deterministic Observation identifier: sender, order, OBX-4 sub-id (else set id or
/// position), observation code and effective time — stable across re-deliveries, distinct
/// for a new measurement of the same thing.
pub(crate) fn observation_identifier(
    b: &Builder,
    g: &Group,
    sub_id: &str,
    code: &str,
    effective_raw: &str,
) -> (String, String) {
    let order = g.order_key().unwrap_or(&b.control_id);
    (
        "urn:hl7v2:obx".to_string(),
        format!("{}|{order}|{sub_id}|{code}|{effective_raw}", b.sender),
    )
}

fn lab_observation(
    b: &mut Builder,
    g: &Group,
    row: &Row,
    ordinal: usize,
    obr_effective: Option<&str>,
) -> Option<String> {
    let obx = row.obx;
    let Some((code, (_, code_key))) = obx.rep(3).and_then(|r| Some((cwe(r, None)?, cwe_key(r)?)))
    else {
        b.missing(obx, 3, "observation identifier");
        return None;
    };
    let effective = match obx.v(14) {
        Some(_) => b.ts(obx, 14, "date/time of the observation"),
        None => obr_effective.map(str::to_string),
    };
    let effective_raw = obx.v(14).or(g.obr.v(7)).unwrap_or_default();
    let sub_id = obx
        .v(4)
        .or(obx.v(1))
        .map_or_else(|| ordinal.to_string(), str::to_string);
    let (system, value) = observation_identifier(b, g, &sub_id, &code_key, effective_raw);

    let mut o = Map::new();
    o.insert("resourceType".into(), json!("Observation"));
    o.insert("identifier".into(), json!([identifier(&system, &value)]));
    o.insert("status".into(), json!(observation_status(b, obx)));
    o.insert(
        "category".into(),
        json!([{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}]),
    );
    o.insert("code".into(), code);
    insert_subject(&mut o, "subject", g);
    if let Some(t) = effective {
        o.insert("effectiveDateTime".into(), json!(t));
    }
    let unit = unit(b, obx);
    if let Some((key, v)) = obx_value(b, obx, unit.as_ref()) {
        o.insert(key.into(), v);
    }
    if let Some(i) = interpretation(obx) {
        o.insert("interpretation".into(), i);
    }
    let notes: Vec<Value> = row
        .notes
        .iter()
        .filter_map(|n| {
            let text: Vec<&str> = n.reps(3).iter().filter_map(|r| r.c(1)).collect();
            (!text.is_empty()).then(|| json!({"text": text.join("\n")}))
        })
        .collect();
    if !notes.is_empty() {
        o.insert("note".into(), Value::Array(notes));
    }
    if let Some(m) = obx.rep(17).and_then(|r| cwe(r, None)) {
        o.insert("method".into(), m);
    }
    if let Some(r) = reference_range(obx, unit.as_ref()) {
        o.insert("referenceRange".into(), json!([r]));
    }
    let query = token_query("identifier", &system, &value);
    Some(b.add(Entry::new(
        "Observation",
        query,
        Method::Update,
        Value::Object(o),
    )))
}

/// Table 0085 result status → Observation.status (IG map; `R`, unverified, is preliminary).
pub(crate) fn observation_status(b: &mut Builder, obx: Seg) -> &'static str {
    match obx.v(11) {
        Some("F" | "U") => "final",
        Some("C") => "corrected",
        Some("P" | "R" | "S") => "preliminary",
        Some("I" | "O") => "registered",
        Some("X") => "cancelled",
        Some("D" | "W") => "entered-in-error",
        other => {
            b.warn(format!(
                "OBX-11 result status {other:?} has no Observation.status; status is unknown"
            ));
            "unknown"
        }
    }
}

/// Table 0123 result status → DiagnosticReport.status.
fn report_status(s: Option<&str>) -> &'static str {
    match s {
        Some("O" | "I" | "S") => "registered",
        Some("A") => "partial",
        Some("P" | "R") => "preliminary",
        Some("C") => "corrected",
        Some("F") => "final",
        Some("X") => "cancelled",
        _ => "unknown",
    }
}

/// The unit of an OBX (OBX-6) as Quantity fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unit {
    pub unit: Option<String>,
    pub system: Option<String>,
    pub code: Option<String>,
}

impl Unit {
    pub fn quantity(&self, value: Value) -> Value {
        self.compared(value, None)
    }

    /// A Quantity with an optional comparator (`<`, `<=`, `>=`, `>`), in FHIR element order.
    pub fn compared(&self, value: Value, comparator: Option<&str>) -> Value {
        let mut q = Map::new();
        q.insert("value".into(), value);
        if let Some(c) = comparator {
            q.insert("comparator".into(), json!(c));
        }
        if let Some(u) = &self.unit {
            q.insert("unit".into(), json!(u));
        }
        // qty-3: a code only together with its system.
        if let (Some(s), Some(c)) = (&self.system, &self.code) {
            q.insert("system".into(), json!(s));
            q.insert("code".into(), json!(c));
        }
        Value::Object(q)
    }
}

/// OBX-6 → Unit: UCUM when a triplet is coded in UCUM, or in MDC with a UCUM translation
/// in the ConceptMap; otherwise the MDC code as sent, or just the text.
pub(crate) fn unit(b: &mut Builder, obx: Seg) -> Option<Unit> {
    let rep = obx.rep(6)?;
    for (code, text, system) in [(1, 2, 3), (4, 5, 6)] {
        let Some(c) = rep.c(code) else { continue };
        match rep.c(system).map(str::to_ascii_uppercase).as_deref() {
            Some("UCUM") => {
                return Some(Unit {
                    unit: Some(rep.c(text).unwrap_or(c).to_string()),
                    system: Some(UCUM.into()),
                    code: Some(c.into()),
                });
            }
            Some("MDC") => {
                if let Some((ucum, display)) = b.terminology.ucum_for_mdc_unit(c) {
                    let unit = if display.is_empty() {
                        ucum.clone()
                    } else {
                        display
                    };
                    return Some(Unit {
                        unit: Some(unit),
                        system: Some(UCUM.into()),
                        code: Some(ucum),
                    });
                }
            }
            _ => {}
        }
    }
    if let (Some(c), Some("MDC")) = (rep.c(1), rep.c(3)) {
        b.warn(format!(
            "MDC unit {c} has no UCUM translation in the ConceptMap; the MDC code is kept"
        ));
        return Some(Unit {
            unit: Some(rep.c(2).unwrap_or(c).to_string()),
            system: Some(MDC.into()),
            code: Some(c.into()),
        });
    }
    rep.c(2).or(rep.c(1)).map(|t| Unit {
        unit: Some(t.to_string()),
        ..Unit::default()
    })
}

/// A repetition's full text: components joined by `^`, subcomponents by `&` (for ST/TX/FT,
/// whose text may have been split on unescaped delimiters).
fn rep_text(rep: &Repetition) -> String {
    let mut comps: Vec<String> = rep
        .components
        .iter()
        .map(|c| c.subcomponents.join("&"))
        .collect();
    while comps.last().is_some_and(String::is_empty) {
        comps.pop();
    }
    comps.join("^")
}

/// OBX-5 by OBX-2 value type → the `value[x]` element name and value (or
/// `dataAbsentReason` for a value type FHIR has no `value[x]` for here, e.g. ED).
pub(crate) fn obx_value(
    b: &mut Builder,
    obx: Seg,
    unit: Option<&Unit>,
) -> Option<(&'static str, Value)> {
    let reps: Vec<&Repetition> = obx.reps(5).iter().filter(|r| !r.is_blank()).collect();
    let first = *reps.first()?;
    let Some(ty) = obx.v(2) else {
        b.missing(obx, 2, "value type (OBX-5 has a value)");
        return None;
    };
    let single = |b: &mut Builder| {
        if reps.len() > 1 {
            b.warn(format!(
                "OBX {}: only the first of {} {ty} values is mapped",
                obx.seq,
                reps.len()
            ));
        }
    };
    match ty {
        "NM" => {
            single(b);
            let raw = first.c(1).unwrap_or_default();
            match nm(raw) {
                Some(v) => Some((
                    "valueQuantity",
                    unit.cloned().unwrap_or_default().quantity(v),
                )),
                None => {
                    b.bad(obx, 5, "numeric value", raw);
                    None
                }
            }
        }
        "ST" | "TX" | "FT" => {
            let text: Vec<String> = reps.iter().map(|r| rep_text(r)).collect();
            Some(("valueString", json!(text.join("\n"))))
        }
        "CWE" | "CE" | "CNE" | "CF" => {
            single(b);
            cwe(first, None).map(|c| ("valueCodeableConcept", c))
        }
        "SN" => {
            single(b);
            sn(b, obx, first, unit)
        }
        "DTM" | "TS" | "DT" => {
            single(b);
            let raw = first.c(1).unwrap_or_default();
            match hl7_ts_to_fhir(raw, b.offset.as_deref()) {
                Some(t) => Some(("valueDateTime", json!(t))),
                None => {
                    b.bad(obx, 5, "date/time value", raw);
                    None
                }
            }
        }
        "TM" => {
            single(b);
            let raw = first.c(1).unwrap_or_default();
            match hl7_tm_to_fhir(raw) {
                Some(t) => Some(("valueTime", json!(t))),
                None => {
                    b.bad(obx, 5, "time value", raw);
                    None
                }
            }
        }
        "ID" | "IS" => {
            single(b);
            first.c(1).map(|v| ("valueString", json!(v)))
        }
        other => {
            b.warn(format!(
                "OBX-2 value type {other} is not mapped; the value stays in the raw message"
            ));
            let reason = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unsupported"}]});
            Some(("dataAbsentReason", reason))
        }
    }
}

/// SN: `comparator^num1^separator^num2`. A lone number (with `<`, `>`, `<=`, `>=`) is a
/// Quantity, `^1^-^5` a Range, `^1^:^128` (or `/`) a Ratio, `^2^+` a string. A leading
/// number without the comparator component (`1^-^5`) is accepted too: senders drop it.
fn sn(
    b: &mut Builder,
    obx: Seg,
    rep: &Repetition,
    unit: Option<&Unit>,
) -> Option<(&'static str, Value)> {
    let (mut cmp, mut n1, mut sep, mut n2) = (rep.c(1), rep.c(2), rep.c(3), rep.c(4));
    if cmp.is_some_and(|c| nm(c).is_some()) && n2.is_none() {
        (cmp, n1, sep, n2) = (None, cmp, n1, sep);
    }
    let text = rep_text(rep);
    let unit = unit.cloned().unwrap_or_default();
    let Some(v1) = n1.and_then(nm) else {
        b.bad(obx, 5, "structured numeric value", &text);
        return None;
    };
    match (cmp, sep, n2.map(nm)) {
        (c, None, None) => {
            let comparator = match c {
                None | Some("=") => None,
                Some(c @ ("<" | ">" | "<=" | ">=")) => Some(c),
                Some(_) => {
                    b.bad(obx, 5, "structured numeric comparator", &text);
                    return None;
                }
            };
            let q = unit.compared(v1, comparator);
            Some(("valueQuantity", q))
        }
        (None, Some("-"), Some(Some(v2))) => Some((
            "valueRange",
            json!({"low": unit.quantity(v1), "high": unit.quantity(v2)}),
        )),
        (None, Some(":" | "/"), Some(Some(v2))) => Some((
            "valueRatio",
            json!({"numerator": {"value": v1}, "denominator": {"value": v2}}),
        )),
        (None, Some("+"), None) => {
            Some(("valueString", json!(format!("{}+", n1.unwrap_or_default()))))
        }
        _ => {
            b.bad(obx, 5, "structured numeric value", &text);
            None
        }
    }
}

/// OBX-7 → referenceRange: `90-160` (low and high), `<500` / `<=500` (high), `>5` (low),
/// anything else as text. The strictness of `<`/`>` cannot be expressed in low/high, so the
/// original text is kept beside them.
pub(crate) fn reference_range(obx: Seg, unit: Option<&Unit>) -> Option<Value> {
    let raw = obx.v(7)?;
    let unit = unit.cloned().unwrap_or_default();
    let bound = |s: &str| nm(s).map(|v| unit.quantity(v));
    for (prefix, key) in [("<=", "high"), (">=", "low"), ("<", "high"), (">", "low")] {
        if let Some(rest) = raw.strip_prefix(prefix) {
            return Some(match bound(rest) {
                Some(q) => json!({key: q, "text": raw}),
                None => json!({"text": raw}),
            });
        }
    }
    // The separator is the first `-` after the first character, so `-5-5` reads -5..5.
    let split = raw.get(1..).and_then(|t| t.find('-')).map(|i| i + 1);
    if let Some(i) = split
        && let (Some(lo), Some(hi)) = (
            raw.get(..i).and_then(bound),
            raw.get(i + 1..).and_then(bound),
        )
    {
        return Some(json!({"low": lo, "high": hi}));
    }
    Some(json!({"text": raw}))
}

/// OBX-8 → interpretation: table 0078 codes are the v3 ObservationInterpretation codes.
pub(crate) fn interpretation(obx: Seg) -> Option<Value> {
    let codes: Vec<Value> = obx
        .reps(8)
        .iter()
        .filter_map(|r| r.c(1))
        .map(|c| json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": c}]}))
        .collect();
    (!codes.is_empty()).then_some(Value::Array(codes))
}
