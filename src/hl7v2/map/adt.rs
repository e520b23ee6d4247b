//! ADT (HL7 v2 chapter 3) → Patient, Encounter, Location, RelatedPerson,
//! AllergyIntolerance, Condition, after the v2-to-FHIR IG segment maps PID[Patient],
//! PV1[Encounter], PL[Location], NK1[RelatedPerson], AL1[AllergyIntolerance],
//! DG1[Condition].

use serde_json::{Map, Value, json};

use crate::hl7v2::map::bundle::{Entry, Method, token_query};
use crate::hl7v2::map::datatypes::{
    RepExt, SegmentExt, coded, cwe, cwe_key, cx_identifier, ei, gender, hl7_ts_to_date, id_type,
    identifier, xad, xcn_reference, xpn, xtn,
};
use crate::hl7v2::map::{Builder, Seg};
use crate::hl7v2::message::Repetition;

/// Trigger events mapped: admit, transfer, discharge, register, pre-admit, update, the
/// cancellations A11/A13, pending admit A14, the person-only A28/A31, and the merge A40.
pub(crate) const TRIGGERS: &[&str] = &[
    "A01", "A02", "A03", "A04", "A05", "A08", "A11", "A13", "A14", "A28", "A31", "A40",
];
/// Segments this mapping reads (anything else is reported as not mapped).
pub(crate) const SEGMENTS: &[&str] = &["EVN", "PID", "PV1", "NK1", "AL1", "DG1", "MRG"];

const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const NULL_FLAVOR: &str = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor";

/// A Patient entry and the `system|value` key other identities are scoped by.
#[derive(Clone)]
pub(crate) struct PatientRef {
    pub full_url: String,
    pub key: String,
}

/// An Encounter entry and its `system|value` key.
#[derive(Clone)]
pub(crate) struct EncounterRef {
    pub full_url: String,
    pub key: String,
}

pub(crate) fn first<'m>(b: &Builder<'m>, id: &str) -> Option<Seg<'m>> {
    b.segs.iter().find(|s| s.id == id).copied()
}

pub(crate) fn map(b: &mut Builder) {
    let Some(pid) = first(b, "PID") else {
        b.missing_segment("PID", 1, "in ADT messages");
        return;
    };
    if b.trigger == "A40" {
        merge(b, pid);
        return;
    }
    let patient = patient(b, pid, Method::Update);
    // A28/A31 maintain the person only; their PV1, if any, is a placeholder.
    let person_only = matches!(b.trigger.as_str(), "A28" | "A31");
    let mut encounter = None;
    match (first(b, "PV1"), &patient) {
        _ if person_only => {}
        (Some(pv1), Some(p)) => encounter = adt_encounter(b, pv1, p),
        (Some(_), None) => {}
        (None, _) if b.trigger == "A08" => {}
        (None, _) => {
            let why = format!("for ADT^{}", b.trigger);
            b.missing_segment("PV1", 1, &why);
        }
    }
    let Some(patient) = patient else { return };
    let segs = b.segs.clone();
    let mut nk1_ordinal = 0;
    for seg in segs {
        match seg.id.as_str() {
            "NK1" => {
                nk1_ordinal += 1;
                related_person(b, seg, &patient, nk1_ordinal);
            }
            "AL1" => allergy(b, seg, &patient),
            "DG1" => condition(b, seg, &patient, encounter.as_ref()),
            _ => {}
        }
    }
}

/// ADT^A40 (merge patient, patient identifier list; v2-to-FHIR IG MRG[Patient]): PID is
/// the surviving patient, MRG-1 the prior patient's identifiers. The survivor is written
/// from PID as for any ADT event, with a `replaces` link; the prior record's current
/// version becomes an inactive Patient carrying MRG-1's identifiers and a `replaced-by`
/// link to the survivor (patient.html#links). Its earlier versions keep its demographics in
/// its history; resources that refer to it keep doing so, and clients follow the link.
fn merge(b: &mut Builder, pid: Seg) {
    let Some(mrg) = first(b, "MRG") else {
        b.missing_segment("MRG", 1, "for ADT^A40");
        return;
    };
    let default_system = b.sender_urn("authority");
    let prior_ids: Vec<Value> = mrg
        .reps(1)
        .iter()
        .filter_map(|r| cx_identifier(r, &default_system))
        .collect();
    let Some(first_id) = prior_ids.first() else {
        b.missing(mrg, 1, "prior patient identifier list");
        return;
    };
    let primary = prior_ids
        .iter()
        .find(|i| i.pointer("/type/coding/0/code").and_then(Value::as_str) == Some("MR"))
        .unwrap_or(first_id);
    let system = primary["system"].as_str().unwrap_or_default().to_string();
    let value = primary["value"].as_str().unwrap_or_default().to_string();
    let prior_query = token_query("identifier", &system, &value);
    let prior_url = crate::hl7v2::map::bundle::uuid_urn(&format!("Patient?{prior_query}"));
    let Some(survivor) = patient(b, pid, Method::Update) else {
        return;
    };
    if survivor.key == format!("{system}|{value}") {
        b.bad(mrg, 1, "prior patient identifier list", &value);
        return;
    }
    if let Some(p) = b.resource_mut(&survivor.full_url) {
        p.insert(
            "link".into(),
            json!([{"other": {"reference": prior_url}, "type": "replaces"}]),
        );
    }
    let prior = json!({
        "resourceType": "Patient",
        "identifier": prior_ids,
        "active": false,
        "link": [{"other": {"reference": survivor.full_url}, "type": "replaced-by"}]
    });
    b.add(Entry::new("Patient", prior_query, Method::Update, prior));
}

/// PID → Patient. `method` is `Update` for ADT (the authoritative demographics feed) and
/// `CreateIfNoneExist` for results and orders, whose PID must not overwrite what ADT wrote.
pub(crate) fn patient(b: &mut Builder, pid: Seg, method: Method) -> Option<PatientRef> {
    let default_system = b.sender_urn("authority");
    let ids: Vec<Value> = pid
        .reps(3)
        .iter()
        .filter_map(|r| cx_identifier(r, &default_system))
        .collect();
    let Some(first_id) = ids.first() else {
        b.missing(pid, 3, "patient identifier list");
        return None;
    };
    // The medical record number is the identity; any other identifier is only carried.
    let primary = ids
        .iter()
        .find(|i| i.pointer("/type/coding/0/code").and_then(Value::as_str) == Some("MR"))
        .unwrap_or(first_id);
    let system = primary["system"].as_str().unwrap_or_default().to_string();
    let value = primary["value"].as_str().unwrap_or_default().to_string();

    let mut p = Map::new();
    p.insert("resourceType".into(), json!("Patient"));
    p.insert("identifier".into(), Value::Array(ids.clone()));
    let names: Vec<Value> = pid.reps(5).iter().filter_map(xpn).collect();
    if !names.is_empty() {
        p.insert("name".into(), Value::Array(names));
    }
    let telecom: Vec<Value> = pid
        .reps(13)
        .iter()
        .filter_map(|r| xtn(r, "home"))
        .chain(pid.reps(14).iter().filter_map(|r| xtn(r, "work")))
        .collect();
    if !telecom.is_empty() {
        p.insert("telecom".into(), Value::Array(telecom));
    }
    if let Some(sex) = pid.v(8) {
        match gender(sex) {
            Some(g) => {
                p.insert("gender".into(), json!(g));
            }
            None => b.warn(format!(
                "PID-8 administrative sex {sex:?} is not in table 0001; gender omitted"
            )),
        }
    }
    if let Some(raw) = pid.v(7) {
        match hl7_ts_to_date(raw) {
            Some(d) => {
                p.insert("birthDate".into(), json!(d));
            }
            None => b.bad(pid, 7, "date/time of birth", raw),
        }
    }
    if let Some(t) = b.ts(pid, 29, "patient death date and time") {
        p.insert("deceasedDateTime".into(), json!(t));
    } else {
        match pid.v(30) {
            Some("Y") => {
                p.insert("deceasedBoolean".into(), json!(true));
            }
            Some("N") => {
                p.insert("deceasedBoolean".into(), json!(false));
            }
            _ => {}
        }
    }
    let addresses: Vec<Value> = pid.reps(11).iter().filter_map(xad).collect();
    if !addresses.is_empty() {
        p.insert("address".into(), Value::Array(addresses));
    }
    let query = token_query("identifier", &system, &value);
    let full_url = b.add(Entry::new("Patient", query, method, Value::Object(p)));
    Some(PatientRef {
        full_url,
        key: format!("{system}|{value}"),
    })
}

/// The Encounter's identifier: PV1-19 visit number (CX-4 authority, else scoped by the
/// sender). Without one, ADT still needs an Encounter, so `fallback` derives one from the
/// patient and the admit time (PV1-44), else from the message control id — the latter
/// cannot link later events of the same visit, which is why it is the last resort.
fn encounter_identifier(
    b: &Builder,
    pv1: Seg,
    patient: &PatientRef,
    fallback: bool,
) -> Option<(String, String, Value)> {
    if let Some(rep) = pv1.rep(19) {
        let mut id = cx_identifier(rep, &b.sender_urn("visit"))?;
        if let Some(o) = id.as_object_mut()
            && !o.contains_key("type")
        {
            let mut with_type = Map::new();
            with_type.insert("type".into(), id_type("VN"));
            with_type.extend(std::mem::take(o));
            *o = with_type;
        }
        let system = id["system"].as_str().unwrap_or_default().to_string();
        let value = id["value"].as_str().unwrap_or_default().to_string();
        return Some((system, value, id));
    }
    if !fallback {
        return None;
    }
    let (system, value) = match pv1.v(44) {
        Some(admit) => (
            b.sender_urn("encounter"),
            format!("{}|{admit}", patient.key),
        ),
        None => (b.sender_urn("message"), format!("{}|PV1", b.control_id)),
    };
    let id = identifier(&system, &value);
    Some((system, value, id))
}

/// PV1-2 patient class → Encounter.class (v3 ActCode, the IG's PatientClass map).
fn encounter_class(b: &mut Builder, pv1: Seg) -> Value {
    let (system, code, display) = match pv1.v(2) {
        Some("I") => (ACT_CODE, "IMP", "inpatient encounter"),
        Some("O") => (ACT_CODE, "AMB", "ambulatory"),
        Some("E") => (ACT_CODE, "EMER", "emergency"),
        Some("P") => (ACT_CODE, "PRENC", "pre-admission"),
        Some("U") => (NULL_FLAVOR, "UNK", "unknown"),
        other => {
            b.warn(format!(
                "PV1-2 patient class {other:?} has no ActCode mapping; Encounter.class is UNK"
            ));
            (NULL_FLAVOR, "UNK", "unknown")
        }
    };
    json!({"system": system, "code": code, "display": display})
}

/// Encounter.status from the trigger event. A08 (update) implies none, so it follows the
/// dates sent; A11 (cancel admit) cancels; A13 (cancel discharge) puts the visit back in
/// progress and drops the discharge date.
fn encounter_status(trigger: &str, pv1: Seg) -> &'static str {
    match trigger {
        "A01" | "A02" | "A04" | "A13" => "in-progress",
        "A03" => "finished",
        "A05" | "A14" => "planned",
        "A11" => "cancelled",
        _ if pv1.v(45).is_some() => "finished",
        _ if pv1.v(44).is_some() => "in-progress",
        _ => "unknown",
    }
}

fn adt_encounter(b: &mut Builder, pv1: Seg, patient: &PatientRef) -> Option<EncounterRef> {
    let (system, value, id) = encounter_identifier(b, pv1, patient, true)?;
    let trigger = b.trigger.clone();
    let status = encounter_status(&trigger, pv1);
    let mut e = Map::new();
    e.insert("resourceType".into(), json!("Encounter"));
    e.insert("identifier".into(), json!([id]));
    e.insert("status".into(), json!(status));
    e.insert("class".into(), encounter_class(b, pv1));
    e.insert("subject".into(), json!({"reference": patient.full_url}));
    let default_system = b.sender_urn("authority");
    let mut participants = Vec::new();
    for (field, code, display) in [
        (7, "ATND", "attender"),
        (8, "REF", "referrer"),
        (9, "CON", "consultant"),
        (17, "ADM", "admitter"),
    ] {
        for who in pv1
            .reps(field)
            .iter()
            .filter_map(|r| xcn_reference(r, &default_system))
        {
            participants.push(json!({
                "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": code, "display": display}]}],
                "individual": who,
            }));
        }
    }
    if !participants.is_empty() {
        e.insert("participant".into(), Value::Array(participants));
    }
    let mut period = Map::new();
    if let Some(start) = b.ts(pv1, 44, "admit date/time") {
        period.insert("start".into(), json!(start));
    }
    if let Some(end) = b.ts(pv1, 45, "discharge date/time")
        && trigger != "A13"
    {
        period.insert("end".into(), json!(end));
    }
    if !period.is_empty() {
        e.insert("period".into(), Value::Object(period));
    }
    let mut hospitalization = Map::new();
    if let Some(src) = pv1.v(14) {
        hospitalization.insert(
            "admitSource".into(),
            coded("http://terminology.hl7.org/CodeSystem/v2-0023", src),
        );
    }
    if let Some(disp) = pv1.v(36) {
        hospitalization.insert(
            "dischargeDisposition".into(),
            coded("http://terminology.hl7.org/CodeSystem/v2-0112", disp),
        );
    }
    if !hospitalization.is_empty() {
        e.insert("hospitalization".into(), Value::Object(hospitalization));
    }
    let mut locations = Vec::new();
    let current_status = if status == "finished" {
        "completed"
    } else {
        "active"
    };
    if let Some(bed) = pv1.rep(3).and_then(|pl| location_chain(b, pl)) {
        locations.push(json!({"location": {"reference": bed}, "status": current_status}));
    }
    // A transfer names the location left in PV1-6.
    if trigger == "A02"
        && let Some(prior) = pv1.rep(6).and_then(|pl| location_chain(b, pl))
    {
        locations.push(json!({"location": {"reference": prior}, "status": "completed"}));
    }
    if !locations.is_empty() {
        e.insert("location".into(), Value::Array(locations));
    }
    let query = token_query("identifier", &system, &value);
    let full_url = b.add(Entry::new(
        "Encounter",
        query,
        Method::Update,
        Value::Object(e),
    ));
    Some(EncounterRef {
        full_url,
        key: format!("{system}|{value}"),
    })
}

/// PV1 in a result or order message: an Encounter is only referenced when the visit number
/// identifies it, and only created if ADT has not already (device feeds send PV1 with a
/// location and no visit number on every message; minting Encounters from that would create
/// one per message).
pub(crate) fn encounter_reference(
    b: &mut Builder,
    pv1: Seg,
    patient: &PatientRef,
) -> Option<EncounterRef> {
    let (system, value, id) = encounter_identifier(b, pv1, patient, false)?;
    let class = encounter_class(b, pv1);
    let e = json!({
        "resourceType": "Encounter",
        "identifier": [id],
        "status": "unknown",
        "class": class,
        "subject": {"reference": patient.full_url},
    });
    let query = token_query("identifier", &system, &value);
    let full_url = b.add(Entry::new("Encounter", query, Method::CreateIfNoneExist, e));
    Some(EncounterRef {
        full_url,
        key: format!("{system}|{value}"),
    })
}

/// PL → a chain of Locations, facility (PL-4) → building (PL-7) → floor (PL-8) → point of
/// care (PL-1) → room (PL-2) → bed (PL-3), each `partOf` the one above. A level's identifier
/// is its path from the top (`wa:ICU|ro:12|bd:A`), so the same bed is the same Location in
/// every message; returns the deepest level.
pub(crate) fn location_chain(b: &mut Builder, pl: &Repetition) -> Option<String> {
    const LEVELS: [(usize, &str, &str); 6] = [
        (4, "si", "Site"),
        (7, "bu", "Building"),
        (8, "lvl", "Level"),
        (1, "wa", "Ward"),
        (2, "ro", "Room"),
        (3, "bd", "Bed"),
    ];
    let system = b.sender_urn("location");
    let mut path = String::new();
    let mut parent: Option<String> = None;
    for (comp, code, display) in LEVELS {
        let Some(name) = pl.sc(comp, 1) else { continue };
        if !path.is_empty() {
            path.push('|');
        }
        path.push_str(&format!("{code}:{name}"));
        let mut l = Map::new();
        l.insert("resourceType".into(), json!("Location"));
        l.insert("identifier".into(), json!([identifier(&system, &path)]));
        l.insert("status".into(), json!("active"));
        l.insert("name".into(), json!(name));
        l.insert("mode".into(), json!("instance"));
        l.insert(
            "physicalType".into(),
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": code, "display": display}]}),
        );
        if let Some(p) = &parent {
            l.insert("partOf".into(), json!({"reference": p}));
        }
        let query = token_query("identifier", &system, &path);
        parent = Some(b.add(Entry::new(
            "Location",
            query,
            Method::Update,
            Value::Object(l),
        )));
    }
    if let (Some(deepest), Some(desc)) = (&parent, pl.c(9))
        && let Some(r) = b.resource_mut(deepest)
    {
        r.insert("description".into(), json!(desc));
    }
    parent
}

/// NK1 → RelatedPerson. The NK1 list is a snapshot, so a contact is identified by its set
/// id (NK1-1) under the patient: an update rewrites the same slots.
fn related_person(b: &mut Builder, nk1: Seg, patient: &PatientRef, ordinal: usize) {
    let set_id = nk1.v(1).map_or_else(|| ordinal.to_string(), str::to_string);
    let system = b.sender_urn("related-person");
    let value = format!("{}|{set_id}", patient.key);
    let mut r = Map::new();
    r.insert("resourceType".into(), json!("RelatedPerson"));
    r.insert("identifier".into(), json!([identifier(&system, &value)]));
    r.insert("active".into(), json!(true));
    r.insert("patient".into(), json!({"reference": patient.full_url}));
    let relationship: Vec<Value> = nk1
        .rep(3)
        .and_then(|x| cwe(x, Some("HL70063")))
        .into_iter()
        .chain(nk1.rep(7).and_then(|x| cwe(x, Some("HL70131"))))
        .collect();
    if !relationship.is_empty() {
        r.insert("relationship".into(), Value::Array(relationship));
    }
    let mut names: Vec<Value> = nk1.reps(2).iter().filter_map(xpn).collect();
    if names.is_empty() {
        names = nk1.reps(30).iter().filter_map(xpn).collect();
    }
    if !names.is_empty() {
        r.insert("name".into(), Value::Array(names));
    }
    let telecom: Vec<Value> = nk1
        .reps(5)
        .iter()
        .filter_map(|x| xtn(x, "home"))
        .chain(nk1.reps(6).iter().filter_map(|x| xtn(x, "work")))
        .collect();
    if !telecom.is_empty() {
        r.insert("telecom".into(), Value::Array(telecom));
    }
    if let Some(g) = nk1.v(15).and_then(gender) {
        r.insert("gender".into(), json!(g));
    }
    if let Some(raw) = nk1.v(16) {
        match hl7_ts_to_date(raw) {
            Some(d) => {
                r.insert("birthDate".into(), json!(d));
            }
            None => b.bad(nk1, 16, "date/time of birth", raw),
        }
    }
    let addresses: Vec<Value> = nk1.reps(4).iter().filter_map(xad).collect();
    if !addresses.is_empty() {
        r.insert("address".into(), Value::Array(addresses));
    }
    let query = token_query("identifier", &system, &value);
    b.add(Entry::new(
        "RelatedPerson",
        query,
        Method::Update,
        Value::Object(r),
    ));
}

/// AL1 → AllergyIntolerance, identified by the allergen under the patient so that a
/// reordered AL1 list still updates the same resources.
fn allergy(b: &mut Builder, al1: Seg, patient: &PatientRef) {
    let allergen = al1.rep(3).and_then(|x| {
        let key = match cwe_key(x) {
            Some((system, code)) => format!("{}|{code}", system.unwrap_or_default()),
            None => format!("|{}", x.c(2)?),
        };
        Some((cwe(x, None)?, key))
    });
    let Some((code, key)) = allergen else {
        b.missing(al1, 3, "allergen code/mnemonic/description");
        return;
    };
    let system = b.sender_urn("allergy");
    let value = format!("{}|{key}", patient.key);
    let mut a = Map::new();
    a.insert("resourceType".into(), json!("AllergyIntolerance"));
    a.insert("identifier".into(), json!([identifier(&system, &value)]));
    a.insert(
        "clinicalStatus".into(),
        json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]}),
    );
    // Table 0127 allergen type → type and category.
    let (ty, category) = match al1.v(2) {
        Some("DA") => (Some("allergy"), Some("medication")),
        Some("DI") => (Some("intolerance"), Some("medication")),
        Some("FA") => (Some("allergy"), Some("food")),
        Some("FI") => (Some("intolerance"), Some("food")),
        Some("EA" | "AA" | "PA" | "LA") => (Some("allergy"), Some("environment")),
        Some("MA") => (Some("allergy"), None),
        _ => (None, None),
    };
    if let Some(t) = ty {
        a.insert("type".into(), json!(t));
    }
    if let Some(c) = category {
        a.insert("category".into(), json!([c]));
    }
    // Table 0128 allergy severity → criticality.
    let criticality = match al1.v(4) {
        Some("SV") => Some("high"),
        Some("MO" | "MI") => Some("low"),
        Some("U") => Some("unable-to-assess"),
        _ => None,
    };
    if let Some(c) = criticality {
        a.insert("criticality".into(), json!(c));
    }
    a.insert("code".into(), code);
    a.insert("patient".into(), json!({"reference": patient.full_url}));
    if let Some(raw) = al1.v(6) {
        match crate::hl7v2::map::datatypes::hl7_ts_to_fhir(raw, b.offset.as_deref()) {
            Some(d) => {
                a.insert("onsetDateTime".into(), json!(d));
            }
            None => b.bad(al1, 6, "identification date", raw),
        }
    }
    let manifestations: Vec<Value> = al1
        .reps(5)
        .iter()
        .filter_map(|r| r.c(1))
        .map(|t| json!({"text": t}))
        .collect();
    if !manifestations.is_empty() {
        a.insert(
            "reaction".into(),
            json!([{"manifestation": manifestations}]),
        );
    }
    let query = token_query("identifier", &system, &value);
    b.add(Entry::new(
        "AllergyIntolerance",
        query,
        Method::Update,
        Value::Object(a),
    ));
}

/// DG1 → Condition (category encounter-diagnosis), identified by DG1-20 when sent, else by
/// the diagnosis code within the encounter (or patient).
fn condition(b: &mut Builder, dg1: Seg, patient: &PatientRef, encounter: Option<&EncounterRef>) {
    let Some((code, key)) = dg1.rep(3).and_then(|x| Some((cwe(x, None)?, cwe_key(x)?))) else {
        b.missing(dg1, 3, "diagnosis code");
        return;
    };
    let (system, value) = match dg1.rep(20).and_then(|x| ei(x, &b.sender_urn("diagnosis"))) {
        Some(id) => id,
        None => {
            let scope = encounter.map_or(&patient.key, |e| &e.key);
            (
                b.sender_urn("diagnosis"),
                format!("{scope}|{}|{}", key.0.unwrap_or_default(), key.1),
            )
        }
    };
    let mut c = Map::new();
    c.insert("resourceType".into(), json!("Condition"));
    c.insert("identifier".into(), json!([identifier(&system, &value)]));
    // Table 0052 diagnosis type: final is confirmed, admitting and working are provisional.
    let verification = match dg1.v(6) {
        Some("F") => Some("confirmed"),
        Some("A" | "W") => Some("provisional"),
        _ => None,
    };
    if let Some(v) = verification {
        c.insert(
            "verificationStatus".into(),
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": v}]}),
        );
    }
    c.insert(
        "category".into(),
        json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}]),
    );
    c.insert("code".into(), code);
    c.insert("subject".into(), json!({"reference": patient.full_url}));
    if let Some(e) = encounter {
        c.insert("encounter".into(), json!({"reference": e.full_url}));
    }
    if let Some(t) = b.ts(dg1, 5, "diagnosis date/time") {
        c.insert("onsetDateTime".into(), json!(t));
    }
    if let Some(t) = b.ts(dg1, 19, "attestation date/time") {
        c.insert("recordedDate".into(), json!(t));
    }
    let query = token_query("identifier", &system, &value);
    b.add(Entry::new(
        "Condition",
        query,
        Method::Update,
        Value::Object(c),
    ));
}
