//! Pharmacy orders and administrations (HL7 v2 chapter 4A): RDE^O11 → Medication +
//! MedicationRequest, RAS^O17 → Medication + MedicationAdministration, after the
//! v2-to-FHIR IG segment maps ORC[MedicationRequest], RXE[MedicationRequest],
//! RXR[MedicationRequest.dosageInstruction], RXA[MedicationAdministration].

use serde_json::{Map, Value, json};

use crate::hl7v2::map::adt::{self, EncounterRef, PatientRef};
use crate::hl7v2::map::bundle::{Entry, Method, token_query};
use crate::hl7v2::map::datatypes::{
    RepExt, SegmentExt, UCUM, cwe, cwe_key, ei, id_type, identifier, nm, xcn_reference,
};
use crate::hl7v2::map::{Builder, MapError, Seg};
use crate::hl7v2::message::Repetition;

pub(crate) const SEGMENTS: &[&str] = &["PID", "PV1", "ORC", "RXE", "RXR", "RXA"];

/// One ORDER group: ORC, then RXE (RDE) or RXAs each with their RXR (RAS).
struct Order<'m> {
    orc: Seg<'m>,
    rxe: Option<Seg<'m>>,
    /// RXR of the order (after RXE).
    rxr: Option<Seg<'m>>,
    /// Administrations with the RXR that follows each.
    rxas: Vec<(Seg<'m>, Option<Seg<'m>>)>,
}

/// Who the orders are for; both resources require a subject.
struct Context {
    patient: PatientRef,
    encounter: Option<EncounterRef>,
}

pub(crate) fn map(b: &mut Builder) {
    let rde = b.message_code == "RDE";
    let mut orders: Vec<Order> = Vec::new();
    let mut patient: Option<PatientRef> = None;
    let mut encounter: Option<EncounterRef> = None;
    for seg in b.segs.clone() {
        match seg.id.as_str() {
            "PID" if patient.is_none() => patient = adt::patient(b, seg, Method::CreateIfNoneExist),
            "PV1" => {
                if let Some(p) = &patient {
                    encounter = adt::encounter_reference(b, seg, p);
                }
            }
            "ORC" => orders.push(Order {
                orc: seg,
                rxe: None,
                rxr: None,
                rxas: Vec::new(),
            }),
            "RXE" | "RXR" | "RXA" => {
                let Some(o) = orders.last_mut() else {
                    b.error(
                        seg,
                        None,
                        MapError::SEGMENT_SEQUENCE_ERROR,
                        format!("{} before any ORC", seg.id),
                    );
                    continue;
                };
                match seg.id.as_str() {
                    "RXE" => o.rxe = Some(seg),
                    "RXA" => o.rxas.push((seg, None)),
                    _ => match o.rxas.last_mut() {
                        Some((_, rxr @ None)) => *rxr = Some(seg),
                        _ => o.rxr = o.rxr.or(Some(seg)),
                    },
                }
            }
            _ => {}
        }
    }
    if orders.is_empty() {
        b.missing_segment("ORC", 1, &format!("in {}^{}", b.message_code, b.trigger));
        return;
    }
    let Some(patient) = patient else {
        if !b.segs.iter().any(|s| s.id == "PID") {
            b.missing_segment("PID", 1, "to map medication orders (subject is required)");
        }
        return;
    };
    let ctx = Context { patient, encounter };
    for (n, o) in orders.iter().enumerate() {
        if rde {
            medication_request(b, &ctx, o, n + 1);
        } else {
            administrations(b, &ctx, o, n + 1);
        }
    }
}

/// RXE-2 / RXA-5 → Medication, matched on its code so that every order and administration
/// of the same product shares one resource. The content is the code only: RDE and RAS then
/// write identical Medications and neither overwrites the other.
fn medication(b: &mut Builder, seg: Seg, field: usize, what: &str) -> Option<String> {
    let rep = seg.rep(field);
    let Some(((system, code), mut cc)) = rep.and_then(|r| Some((cwe_key(r)?, cwe(r, None)?)))
    else {
        b.missing(seg, field, what);
        return None;
    };
    let system = match system {
        Some(s) => s,
        None => {
            // A code without a coding system can only be matched within its sender.
            let local = b.sender_urn("codesystem");
            b.warn(format!(
                "{}-{field} has no coding system; {local} assumed",
                seg.id
            ));
            if let Some(c) = cc.pointer_mut("/coding/0").and_then(Value::as_object_mut) {
                let mut with_system = Map::new();
                with_system.insert("system".into(), json!(local));
                with_system.extend(std::mem::take(c));
                *c = with_system;
            }
            local
        }
    };
    let m = json!({"resourceType": "Medication", "code": cc});
    Some(b.add(Entry::new(
        "Medication",
        token_query("code", &system, &code),
        Method::Update,
        m,
    )))
}

/// Placer (ORC-2) and filler (ORC-3) as typed identifiers, and the one that identifies the
/// order: the placer's, which every later message about the order repeats.
fn order_identifiers(b: &Builder, orc: Seg) -> (Vec<Value>, Option<(String, String)>) {
    let placer = orc.rep(2).and_then(|r| ei(r, &b.sender_urn("placer")));
    let filler = orc.rep(3).and_then(|r| ei(r, &b.sender_urn("filler")));
    let mut ids = Vec::new();
    for (id, ty) in [(&placer, "PLAC"), (&filler, "FILL")] {
        if let Some((system, value)) = id {
            ids.push(json!({"type": id_type(ty), "system": system, "value": value}));
        }
    }
    (ids, placer.or(filler))
}

/// ORC-5 order status (table 0038), else ORC-1 order control (table 0119) →
/// MedicationRequest.status.
fn order_status(orc: Seg) -> &'static str {
    match orc.v(5) {
        Some("A" | "IP" | "SC") => return "active",
        Some("CA" | "RP") => return "cancelled",
        Some("CM") => return "completed",
        Some("DC") => return "stopped",
        Some("ER") => return "entered-in-error",
        Some("HD") => return "on-hold",
        _ => {}
    }
    match orc.v(1) {
        Some("NW" | "OK" | "SC" | "XO" | "XX" | "RL" | "RO" | "RP" | "SN" | "RE") => "active",
        Some("CA" | "OC" | "CR") => "cancelled",
        Some("DC" | "OD" | "DR") => "stopped",
        Some("HD" | "OH") => "on-hold",
        _ => "unknown",
    }
}

/// A CWE unit (RXE-5, RXE-11, RXA-7): UCUM when coded in UCUM, else the text.
fn cwe_unit(rep: Option<&Repetition>) -> Map<String, Value> {
    let mut q = Map::new();
    let Some(rep) = rep else { return q };
    if let Some(text) = rep.c(2).or(rep.c(1)) {
        q.insert("unit".into(), json!(text));
    }
    if let (Some(code), Some("UCUM")) = (rep.c(1), rep.c(3)) {
        q.insert("system".into(), json!(UCUM));
        q.insert("code".into(), json!(code));
    }
    q
}

fn quantity(
    b: &mut Builder,
    seg: Seg,
    value_field: usize,
    unit_field: usize,
    what: &str,
) -> Option<Value> {
    let raw = seg.v(value_field)?;
    let Some(v) = nm(raw) else {
        b.bad(seg, value_field, what, raw);
        return None;
    };
    let mut q = Map::new();
    q.insert("value".into(), v);
    q.extend(cwe_unit(seg.rep(unit_field)));
    Some(Value::Object(q))
}

fn route(rxr: Option<Seg>) -> Option<Value> {
    rxr.and_then(|r| r.s.rep(1))
        .and_then(|r| cwe(r, Some("HL70162")))
}

fn medication_request(b: &mut Builder, ctx: &Context, o: &Order, n: usize) {
    let Some(rxe) = o.rxe else {
        b.missing_segment("RXE", n, "in every RDE^O11 order");
        return;
    };
    let Some(med) = medication(b, rxe, 2, "give code") else {
        return;
    };
    let (mut ids, key) = order_identifiers(b, o.orc);
    let (system, value) =
        key.unwrap_or_else(|| (b.sender_urn("message"), format!("{}|{n}", b.control_id)));
    if ids.is_empty() {
        ids.push(identifier(&system, &value));
    }
    let mut r = Map::new();
    r.insert("resourceType".into(), json!("MedicationRequest"));
    r.insert("identifier".into(), Value::Array(ids));
    r.insert("status".into(), json!(order_status(o.orc)));
    r.insert("intent".into(), json!("order"));
    r.insert("medicationReference".into(), json!({"reference": med}));
    r.insert("subject".into(), json!({"reference": ctx.patient.full_url}));
    if let Some(e) = &ctx.encounter {
        r.insert("encounter".into(), json!({"reference": e.full_url}));
    }
    if let Some(t) = b.ts(o.orc, 9, "date/time of transaction") {
        r.insert("authoredOn".into(), json!(t));
    }
    if let Some(who) = o
        .orc
        .rep(12)
        .and_then(|x| xcn_reference(x, &b.sender_urn("authority")))
    {
        r.insert("requester".into(), who);
    }
    let mut dosage = Map::new();
    if let Some(i) = rxe.rep(7).and_then(|x| cwe(x, None)) {
        dosage.insert("additionalInstruction".into(), json!([i]));
    }
    if let Some(rt) = route(o.rxr) {
        dosage.insert("route".into(), rt);
    }
    let low = quantity(b, rxe, 3, 5, "give amount - minimum");
    let high = quantity(b, rxe, 4, 5, "give amount - maximum");
    let dose = match (low, high) {
        (Some(l), Some(h)) => Some(json!({"doseRange": {"low": l, "high": h}})),
        (Some(q), None) => Some(json!({"doseQuantity": q})),
        _ => None,
    };
    if let Some(d) = dose {
        dosage.insert("doseAndRate".into(), json!([d]));
    }
    if !dosage.is_empty() {
        r.insert("dosageInstruction".into(), json!([dosage]));
    }
    let mut dispense = Map::new();
    if let Some(raw) = rxe.v(12) {
        match raw.parse::<u32>() {
            Ok(n) => {
                dispense.insert("numberOfRepeatsAllowed".into(), json!(n));
            }
            Err(_) => b.bad(rxe, 12, "number of refills", raw),
        }
    }
    if let Some(q) = quantity(b, rxe, 10, 11, "dispense amount") {
        dispense.insert("quantity".into(), q);
    }
    if !dispense.is_empty() {
        r.insert("dispenseRequest".into(), Value::Object(dispense));
    }
    b.add(Entry::new(
        "MedicationRequest",
        token_query("identifier", &system, &value),
        Method::Update,
        Value::Object(r),
    ));
}

fn administrations(b: &mut Builder, ctx: &Context, o: &Order, n: usize) {
    if o.rxas.is_empty() {
        b.missing_segment("RXA", n, "in every RAS^O17 order");
        return;
    }
    let (ids, key) = order_identifiers(b, o.orc);
    let order_key = key
        .as_ref()
        .map_or_else(|| b.control_id.clone(), |(_, v)| v.clone());
    let mut request: Option<String> = None;
    for (rxa, rxr) in &o.rxas {
        let (rxa, rxr) = (*rxa, *rxr);
        let Some(med) = medication(b, rxa, 5, "administered code") else {
            continue;
        };
        // The order is referenced through a create-if-absent MedicationRequest: it matches the
        // one RDE wrote, or stands in for it when the administration arrives first.
        if let (None, Some((system, value))) = (&request, &key) {
            let query = token_query("identifier", system, value);
            let r = json!({
                "resourceType": "MedicationRequest",
                "identifier": ids,
                "status": order_status(o.orc),
                "intent": "order",
                "medicationReference": {"reference": med},
                "subject": {"reference": ctx.patient.full_url},
            });
            request = Some(b.add(Entry::new(
                "MedicationRequest",
                query,
                Method::CreateIfNoneExist,
                r,
            )));
        }
        let Some(start_raw) = rxa.v(3) else {
            b.missing(rxa, 3, "date/time start of administration");
            continue;
        };
        let start = b.ts(rxa, 3, "date/time start of administration");
        let end = b.ts(rxa, 4, "date/time end of administration");
        // Table 0322 completion status; RXA-21 action code D marks an entry made in error.
        let status = match (rxa.v(21), rxa.v(20)) {
            (Some("D"), _) => "entered-in-error",
            (_, Some("RE" | "NA")) => "not-done",
            _ => "completed",
        };
        let system = "urn:hl7v2:rxa".to_string();
        let sub = |f: usize| rxa.v(f).unwrap_or_default();
        let value = format!("{}|{order_key}|{}|{}|{start_raw}", b.sender, sub(1), sub(2));
        let mut a = Map::new();
        a.insert("resourceType".into(), json!("MedicationAdministration"));
        a.insert("identifier".into(), json!([identifier(&system, &value)]));
        a.insert("status".into(), json!(status));
        let reasons: Vec<Value> = rxa.reps(18).iter().filter_map(|r| cwe(r, None)).collect();
        if status == "not-done" && !reasons.is_empty() {
            a.insert("statusReason".into(), Value::Array(reasons));
        }
        a.insert("medicationReference".into(), json!({"reference": med}));
        a.insert("subject".into(), json!({"reference": ctx.patient.full_url}));
        if let Some(e) = &ctx.encounter {
            a.insert("context".into(), json!({"reference": e.full_url}));
        }
        match (start, end) {
            (Some(s), Some(e)) if s != e => {
                a.insert("effectivePeriod".into(), json!({"start": s, "end": e}));
            }
            (Some(s), _) => {
                a.insert("effectiveDateTime".into(), json!(s));
            }
            _ => {}
        }
        let performers: Vec<Value> = rxa
            .reps(10)
            .iter()
            .filter_map(|r| xcn_reference(r, &b.sender_urn("authority")))
            .map(|who| json!({"actor": who}))
            .collect();
        if !performers.is_empty() {
            a.insert("performer".into(), Value::Array(performers));
        }
        if let Some(r) = &request {
            a.insert("request".into(), json!({"reference": r}));
        }
        let mut dosage = Map::new();
        if let Some(rt) = route(rxr.or(o.rxr)) {
            dosage.insert("route".into(), rt);
        }
        if let Some(q) = quantity(b, rxa, 6, 7, "administered amount") {
            dosage.insert("dose".into(), q);
        }
        if !dosage.is_empty() {
            a.insert("dosage".into(), Value::Object(dosage));
        }
        b.add(Entry::new(
            "MedicationAdministration",
            token_query("identifier", &system, &value),
            Method::Update,
            Value::Object(a),
        ));
    }
}
