//! Device messages → normalised readings → FHIR (stage one and two of the templates).
//! Pure code: device and patient resolution happen in `interaction::device_data`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::devices::template::{
    Grouping, ObservationDef, ObservationKind, Template, Templates, UCUM, Unit,
};

/// Identifier system of the Observations made from device readings; the value is the
/// Observation's id, derived from the reading's identity.
pub const OBSERVATION_ID_SYSTEM: &str = "urn:iomt-fhir:device-observation";
/// Identifier system of the Locations kept per RTLS zone.
pub const ZONE_SYSTEM: &str = "urn:iomt-fhir:zone";
const LOINC: &str = "http://loinc.org";
const MDC: &str = "urn:iso:std:iso:11073:10101";

/// One message normalised by one template.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub template: String,
    pub device_system: String,
    pub device_id: String,
    /// (identifier system, value) of the patient the message names, if any.
    pub patient: Option<(Option<String>, String)>,
    /// FHIR instant.
    pub time: String,
    pub set_id: Option<String>,
    pub values: BTreeMap<String, Value>,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A device timestamp as a FHIR instant: an RFC 3339 date-time with a zone, or Unix time
/// as a number (seconds, or milliseconds when above 10^11).
pub fn instant(v: &Value) -> Result<String, String> {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().ok_or("timestamp is not a finite number")?;
            if !f.is_finite() || f < 0.0 {
                return Err(format!("timestamp {n} is not a Unix time"));
            }
            let micros = if f > 1e11 {
                f * 1000.0
            } else {
                f * 1_000_000.0
            };
            if micros > 253_402_300_799e6 {
                return Err(format!("timestamp {n} is after the year 9999"));
            }
            Ok(instant_text(micros as i64))
        }
        Value::String(s) => {
            let s = s.trim();
            let b = s.as_bytes();
            let zoned = s.ends_with('Z')
                || (b.len() > 6 && matches!(b[b.len() - 6], b'+' | b'-') && b[b.len() - 3] == b':');
            if s.len() < 20 || b.get(10) != Some(&b'T') || !zoned {
                return Err(format!(
                    "timestamp {s:?} is not a date-time with a time zone (e.g. 2024-03-06T10:15:00Z)"
                ));
            }
            match crate::search::extract::parse_fhir_date_range(s) {
                Some(_) => Ok(s.to_string()),
                None => Err(format!("timestamp {s:?} is not a valid date-time")),
            }
        }
        _ => Err("timestamp is neither a date-time string nor a number".into()),
    }
}

/// Microseconds since 1970 as a FHIR instant, without a fraction when it is zero.
fn instant_text(micros: i64) -> String {
    let t = crate::time::format_instant(micros);
    match t.strip_suffix(".000000Z") {
        Some(whole) => format!("{whole}Z"),
        None => t,
    }
}

/// Stage one: every template that applies to `msg` gives one reading. An error (no
/// template applies, or one that applies cannot read what it needs) sends the message to
/// the dead letters with that reason.
pub fn normalise(templates: &Templates, msg: &Value) -> Result<Vec<Reading>, String> {
    let mut out = Vec::new();
    for t in templates.all.iter().filter(|t| t.applies(msg)) {
        out.push(read(t, msg).map_err(|e| format!("template {:?}: {e}", t.name))?);
    }
    if out.is_empty() {
        return Err("no device mapping template matches this message".into());
    }
    Ok(out)
}

fn read(t: &Template, msg: &Value) -> Result<Reading, String> {
    let device_id = t
        .device_id
        .first(msg)
        .and_then(scalar)
        .ok_or_else(|| format!("no device id at {}", t.device_id.as_str()))?;
    let time = instant(
        t.timestamp
            .first(msg)
            .ok_or_else(|| format!("no timestamp at {}", t.timestamp.as_str()))?,
    )?;
    let patient = t
        .patient_id
        .as_ref()
        .and_then(|p| p.first(msg))
        .and_then(scalar)
        .map(|id| (t.patient_system.clone(), id));
    let set_id = t
        .set_id
        .as_ref()
        .and_then(|p| p.first(msg))
        .and_then(scalar);
    let mut values = BTreeMap::new();
    for (name, path, required) in &t.values {
        match path.first(msg) {
            Some(v) => {
                values.insert(name.clone(), v.clone());
            }
            None if *required => {
                return Err(format!(
                    "required value {name:?} missing at {}",
                    path.as_str()
                ));
            }
            None => {}
        }
    }
    Ok(Reading {
        template: t.name.clone(),
        device_system: t.device_system.clone(),
        device_id,
        patient,
        time,
        set_id,
        values,
    })
}

fn number(name: &str, v: &Value) -> Result<f64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    n.filter(|f| f.is_finite())
        .ok_or_else(|| format!("value {name:?} is not a number: {v}"))
}

fn quantity(value: f64, u: &Unit) -> Value {
    json!({
        "value": value,
        "unit": u.unit.clone().unwrap_or_else(|| u.code.clone()),
        "system": UCUM,
        "code": u.code,
    })
}

/// The Observation id for one reading and Observation type: the same device, type, time
/// and value-set id always give the same id, so a redelivered message rewrites the same
/// Observation with the same content (which stores nothing new). The id starts with the
/// reading's time (a version 7 style UUID prefix), so a feed's new Observations are written
/// at the end of the id indexes rather than all over them.
pub fn observation_id(r: &Reading, code: &str) -> String {
    let key = format!(
        "{}|{}\n{}\n{}\n{}",
        r.device_system,
        r.device_id,
        code,
        r.time,
        r.set_id.as_deref().unwrap_or("")
    );
    let millis = crate::search::extract::parse_fhir_date_range(&r.time)
        .map_or(0, |(start, _)| u64::try_from(start / 1000).unwrap_or(0));
    crate::hl7v2::map::bundle::uuid_time_ordered(&key, millis)
}

/// An Observation of `def` without its effective time and value: id, identifier, status,
/// category, code (with the LOINC code the shared ConceptMap gives an MDC code), subject.
fn base(
    def: &ObservationDef,
    id: &str,
    subject: Option<&str>,
    loinc_for_mdc: &dyn Fn(&str) -> Option<(String, String)>,
) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("resourceType".into(), json!("Observation"));
    o.insert("id".into(), json!(id));
    o.insert(
        "identifier".into(),
        json!([{"system": OBSERVATION_ID_SYSTEM, "value": id}]),
    );
    o.insert("status".into(), json!("final"));
    if let Some(c) = &def.category {
        o.insert(
            "category".into(),
            json!([{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": c
            }]}]),
        );
    }
    let mut codings = serde_json::to_value(&def.code).unwrap_or_default();
    if !def.code.iter().any(|c| c.system == LOINC)
        && let Some((code, display)) = def
            .code
            .iter()
            .find(|c| c.system == MDC)
            .and_then(|c| loinc_for_mdc(&c.code))
        && let Some(list) = codings.as_array_mut()
    {
        list.insert(
            0,
            json!({"system": LOINC, "code": code, "display": display}),
        );
    }
    let mut code = json!({"coding": codings});
    if let Some(text) = &def.text {
        code["text"] = json!(text);
    }
    o.insert("code".into(), code);
    if let Some(s) = subject {
        o.insert("subject".into(), json!({"reference": s}));
    }
    o
}

/// The samples of a `sampledData` value, as decimal texts.
fn samples(value: &str, v: &Value) -> Result<Vec<String>, String> {
    let samples = v
        .as_array()
        .ok_or_else(|| format!("value {value:?} is not an array of samples"))?;
    if samples.is_empty() {
        return Err(format!("value {value:?} holds no samples"));
    }
    samples
        .iter()
        .map(|s| number(value, s).map(|f| f.to_string()))
        .collect()
}

/// Stage two: the Observations of one reading (those of grouped definitions come from
/// [`grouped`]). `device` and `subject` are references (`Device/x`, `Patient/y`).
/// Observations whose values are absent are skipped; a value of the wrong shape is an error
/// for the whole message.
pub fn observations(
    t: &Template,
    r: &Reading,
    device: &str,
    subject: Option<&str>,
    loinc_for_mdc: &dyn Fn(&str) -> Option<(String, String)>,
) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for def in t.observations.iter().filter(|d| d.grouping.is_none()) {
        if def.value_names().iter().any(|n| !r.values.contains_key(*n)) {
            continue;
        }
        let first = &def.code[0];
        let id = observation_id(r, &format!("{}|{}", first.system, first.code));
        let mut o = base(def, &id, subject, loinc_for_mdc);
        o.insert("effectiveDateTime".into(), json!(r.time));
        match &def.kind {
            ObservationKind::Quantity { value, unit } => {
                let v = number(value, &r.values[value])?;
                o.insert("valueQuantity".into(), quantity(v, unit));
            }
            ObservationKind::Components(parts) => {
                let mut comps = Vec::new();
                for (codes, value, unit) in parts {
                    let v = number(value, &r.values[value])?;
                    comps.push(
                        json!({"code": {"coding": codes}, "valueQuantity": quantity(v, unit)}),
                    );
                }
                o.insert("component".into(), Value::Array(comps));
            }
            ObservationKind::Sampled {
                value,
                period_ms,
                unit,
                origin,
            } => {
                let data = samples(value, &r.values[value])?.join(" ");
                o.insert(
                    "valueSampledData".into(),
                    json!({
                        "origin": quantity(*origin, unit),
                        "period": period_ms,
                        "dimensions": 1,
                        "data": data,
                    }),
                );
            }
        }
        o.insert("device".into(), json!({"reference": device}));
        out.push(Value::Object(o));
    }
    Ok(out)
}

/// What one batch puts into one grouped Observation: the Observation without its value, and
/// the samples for its slots. The writer merges them into the stored version
/// ([`merge_group`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPoints {
    pub id: String,
    /// The Observation without `valueSampledData`.
    pub skeleton: Value,
    pub grouping: Grouping,
    /// `valueSampledData.origin`.
    pub origin: Value,
    /// (slot, decimal) in arrival order: a later value for a slot replaces an earlier one.
    pub points: Vec<(usize, String)>,
}

/// The id of the grouped Observation for one device, type and period (and set id, if the
/// template has one): time-ordered like [`observation_id`], and never equal to a reading's.
fn group_id(r: &Reading, code: &str, g: &Grouping, start: i64) -> String {
    let key = format!(
        "{}|{}\n{}\ngroup of {} minutes from {}\n{}",
        r.device_system,
        r.device_id,
        code,
        g.period_minutes,
        start,
        r.set_id.as_deref().unwrap_or("")
    );
    let millis = u64::try_from(start / 1000).unwrap_or(0);
    crate::hl7v2::map::bundle::uuid_time_ordered(&key, millis)
}

/// Stage two for grouped definitions: each reading's samples, placed in the slot of the
/// period that holds their time (slot k covers `[start + k·sampleMs, start + (k+1)·sampleMs)`).
/// A waveform that crosses a period's end continues in the next period's Observation.
pub fn grouped(
    t: &Template,
    r: &Reading,
    device: &str,
    subject: Option<&str>,
    loinc_for_mdc: &dyn Fn(&str) -> Option<(String, String)>,
) -> Result<Vec<GroupPoints>, String> {
    let mut out = Vec::new();
    for def in &t.observations {
        let Some(g) = def.grouping else { continue };
        if def.value_names().iter().any(|n| !r.values.contains_key(*n)) {
            continue;
        }
        let time = crate::search::extract::parse_fhir_date_range(&r.time)
            .map(|(start, _)| start)
            .ok_or_else(|| format!("timestamp {:?} is not a valid date-time", r.time))?;
        let sample_us = g.sample_ms * 1000.0;
        // (time in µs, value) of every sample.
        let (unit, origin, timed): (&Unit, f64, Vec<(i64, String)>) = match &def.kind {
            ObservationKind::Quantity { value, unit } => {
                let v = number(value, &r.values[value])?;
                (unit, 0.0, vec![(time, v.to_string())])
            }
            ObservationKind::Sampled {
                value,
                unit,
                origin,
                ..
            } => {
                let timed = samples(value, &r.values[value])?
                    .into_iter()
                    .enumerate()
                    .map(|(j, v)| (time + (j as f64 * sample_us).round() as i64, v))
                    .collect();
                (unit, *origin, timed)
            }
            ObservationKind::Components(_) => continue,
        };
        let first = &def.code[0];
        let code = format!("{}|{}", first.system, first.code);
        let period = g.period_micros();
        let last = g.slots().saturating_sub(1);
        let mut by_start: BTreeMap<i64, Vec<(usize, String)>> = BTreeMap::new();
        for (at, v) in timed {
            let start = at.div_euclid(period) * period;
            let slot = (((at - start) as f64) / sample_us).floor() as usize;
            by_start.entry(start).or_default().push((slot.min(last), v));
        }
        for (start, points) in by_start {
            let id = group_id(r, &code, &g, start);
            let mut o = base(def, &id, subject, loinc_for_mdc);
            o.insert(
                "effectivePeriod".into(),
                json!({"start": instant_text(start), "end": instant_text(start + period)}),
            );
            o.insert("device".into(), json!({"reference": device}));
            out.push(GroupPoints {
                id,
                skeleton: Value::Object(o),
                grouping: g,
                origin: quantity(origin, unit),
                points,
            });
        }
    }
    Ok(out)
}

/// The grouped Observation after `g`: the stored slots (if the stored version has the same
/// sample period), overwritten by `g`'s; "E" marks slots no reading filled. The same points
/// merged again give the same Observation, so a redelivery writes nothing.
pub fn merge_group(stored: Option<&Value>, g: &GroupPoints) -> Value {
    let mut slots: Vec<Option<String>> = stored
        .filter(|s| {
            s.pointer("/valueSampledData/period")
                .and_then(Value::as_f64)
                == Some(g.grouping.sample_ms)
        })
        .and_then(|s| s.pointer("/valueSampledData/data"))
        .and_then(Value::as_str)
        .map(|d| {
            d.split_whitespace()
                .take(g.grouping.slots())
                .map(|x| (x != "E").then(|| x.to_string()))
                .collect()
        })
        .unwrap_or_default();
    for (slot, v) in &g.points {
        if slots.len() <= *slot {
            slots.resize(slot + 1, None);
        }
        slots[*slot] = Some(v.clone());
    }
    let data = slots
        .iter()
        .map(|s| s.as_deref().unwrap_or("E"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut o = g.skeleton.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert(
            "valueSampledData".into(),
            json!({
                "origin": g.origin,
                "period": g.grouping.sample_ms,
                "dimensions": 1,
                "data": data,
            }),
        );
    }
    o
}

/// The Location of an RTLS reading's zone: (id, resource). One Location per zone, its id
/// derived from the zone, so every tag seen in a zone points at the same one.
pub fn zone_location(t: &Template, msg_values: &Value) -> Result<Option<(String, Value)>, String> {
    let Some((zone_path, name_path)) = &t.location else {
        return Ok(None);
    };
    let zone = zone_path
        .first(msg_values)
        .and_then(scalar)
        .ok_or_else(|| format!("no zone at {}", zone_path.as_str()))?;
    let name = name_path
        .as_ref()
        .and_then(|p| p.first(msg_values))
        .and_then(scalar)
        .unwrap_or_else(|| zone.clone());
    let id = crate::hl7v2::map::bundle::uuid_urn(&format!("{ZONE_SYSTEM}|{zone}"))
        .trim_start_matches("urn:uuid:")
        .to_string();
    let location = json!({
        "resourceType": "Location",
        "id": id,
        "identifier": [{"system": ZONE_SYSTEM, "value": zone}],
        "status": "active",
        "name": name,
        "mode": "instance",
    });
    Ok(Some((id, location)))
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
