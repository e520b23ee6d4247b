//! Device telemetry ingestion (`POST [base]/$device-data`, the MQTT subscriber and
//! `iomt-fhir devices replay`): JSON messages → templates → Device, Observation and
//! Location resources, written in one database transaction per batch; the caller hears
//! back (HTTP 202, MQTT PUBACK) only after that commit.
//!
//! Exactly once: Observation ids derive from the reading (device, type, time, value-set
//! id), so a redelivered message rewrites identical Observations, which stores nothing
//! new. Messages that cannot be mapped are kept in the same transaction as dead letters,
//! with the payload and the reason, and can be replayed once a template is fixed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::devices::map::{self, GroupPoints, Reading};
use crate::devices::{Template, Templates};
use crate::error::{ErrorKind, FhirError, Result};
use crate::interaction::update::update_in;
use crate::interaction::{FhirRequest, FhirResponse, RequestBody, SharedCtx, write};
use crate::store::resource::Prepared;
use crate::store::{Arg, Db, Ty};

/// Identifier system for patient ids sent by devices when the template names none.
pub const PATIENT_ID_SYSTEM: &str = "urn:iomt-fhir:patient-id";

/// Device feed settings and the templates in force.
pub struct DeviceFeeds {
    pub templates: Templates,
    /// Create a Device the first time an unknown device id is seen (else: dead letter).
    pub auto_create: bool,
    /// Messages accepted but not yet committed, bounded: HTTP gets 503 + Retry-After and
    /// MQTT stops reading when it is exhausted.
    pub queue: Arc<tokio::sync::Semaphore>,
    pub queue_capacity: usize,
}

impl DeviceFeeds {
    pub fn new(templates: Templates, auto_create: bool, queue_capacity: usize) -> DeviceFeeds {
        DeviceFeeds {
            templates,
            auto_create,
            queue: Arc::new(tokio::sync::Semaphore::new(queue_capacity)),
            queue_capacity,
        }
    }
}

/// What became of a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    /// Messages received.
    pub accepted: usize,
    /// Messages turned into resources.
    pub mapped: usize,
    /// Messages kept as dead letters, with (position, reason).
    pub rejected: Vec<(usize, String)>,
    /// Observations written or confirmed unchanged.
    pub observations: usize,
    /// Observations written without a subject (the device has no patient).
    pub without_patient: usize,
    /// Devices created on first sight.
    pub devices_created: usize,
}

impl Outcome {
    pub fn to_json(&self) -> Value {
        json!({
            "accepted": self.accepted,
            "mapped": self.mapped,
            "rejected": self.rejected.len(),
            "observations": self.observations,
            "withoutPatient": self.without_patient,
            "devicesCreated": self.devices_created,
            "errors": self.rejected.iter().map(|(i, why)| json!({"message": i, "reason": why})).collect::<Vec<_>>(),
        })
    }
}

/// The id of the Device created for a device id seen first: derived from the identifier,
/// so concurrent first sightings create one Device.
fn device_id_for(system: &str, value: &str) -> String {
    crate::hl7v2::map::bundle::uuid_urn(&format!("Device?identifier={system}|{value}"))
        .trim_start_matches("urn:uuid:")
        .to_string()
}

/// A message split from a request body: its text (kept for dead letters) and its JSON.
#[derive(Clone)]
pub struct Message {
    pub text: String,
    pub json: std::result::Result<Value, String>,
    /// Where it came from when that differs per message (an MQTT topic), for dead letters.
    pub source: Option<String>,
}

/// One JSON message, a JSON array of messages, or NDJSON (one message per line).
pub fn split_body(bytes: &[u8]) -> Result<Vec<Message>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| FhirError::invalid("device data must be UTF-8 JSON"))?
        .trim_start_matches('\u{feff}');
    let whole: std::result::Result<Value, _> = serde_json::from_str(text);
    Ok(match whole {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|v| Message {
                text: v.to_string(),
                json: Ok(v),
                source: None,
            })
            .collect(),
        Ok(v) => vec![Message {
            text: text.trim().to_string(),
            json: Ok(v),
            source: None,
        }],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Message {
                text: l.to_string(),
                json: serde_json::from_str(l).map_err(|e| format!("not JSON: {e}")),
                source: None,
            })
            .collect(),
    })
}

struct Planned {
    /// Devices to create if still absent: (id, prepared).
    new_devices: Vec<(String, Prepared)>,
    /// Resources to write by id: Observations, zone Locations.
    writes: Vec<(&'static str, String, Prepared)>,
    /// Grouped Observations' new samples, one entry per Observation.
    groups: Vec<GroupPoints>,
    /// Devices whose location changes: (id, zone Location id).
    moves: Vec<(String, String)>,
    /// (source, payload, reason)
    dead: Vec<(String, String, String)>,
}

/// Maps and writes one batch of messages; `source` is recorded with dead letters.
pub async fn ingest(ctx: &SharedCtx, messages: Vec<Message>, source: &str) -> Result<Outcome> {
    ingest_with(ctx, messages, source, true).await
}

/// [`ingest`]; `keep_dead: false` stores no dead letters (a replay updates its own rows).
async fn ingest_with(
    ctx: &SharedCtx,
    messages: Vec<Message>,
    source: &str,
    keep_dead: bool,
) -> Result<Outcome> {
    let feeds = &ctx.devices;
    let mut outcome = Outcome {
        accepted: messages.len(),
        ..Outcome::default()
    };
    // Stage one: normalise.
    let mut normalised: Vec<(usize, Vec<Reading>)> = Vec::new();
    let mut dead: Vec<(usize, String)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match &m.json {
            Err(e) => dead.push((i, e.clone())),
            Ok(v) => match map::normalise(&feeds.templates, v) {
                Ok(r) => normalised.push((i, r)),
                Err(e) => dead.push((i, e)),
            },
        }
    }
    // Devices and patients, resolved on a reader (committed state) outside the writer.
    let mut devices: Vec<(String, String, String)> = Vec::new();
    let mut patients: Vec<(String, String, String)> = Vec::new();
    for (_, readings) in &normalised {
        for r in readings {
            devices.push((
                "Device".into(),
                r.device_system.clone(),
                r.device_id.clone(),
            ));
            if let Some((system, value)) = &r.patient {
                let system = system
                    .clone()
                    .unwrap_or_else(|| PATIENT_ID_SYSTEM.to_string());
                patients.push(("Patient".into(), system, value.clone()));
            }
        }
    }
    devices.sort();
    devices.dedup();
    patients.sort();
    patients.dedup();
    let mut reader = ctx.store.reader().await?;
    let found_devices = if devices.is_empty() {
        Vec::new()
    } else {
        reader.ids_by_identifier(&devices, 1).await?
    };
    let found_patients = if patients.is_empty() {
        Vec::new()
    } else {
        reader.ids_by_identifier(&patients, 1).await?
    };
    drop(reader);
    let patient_ids: HashMap<(String, String), String> = patients
        .into_iter()
        .zip(found_patients)
        .filter_map(|((_, s, v), ids)| ids.into_iter().next().map(|id| ((s, v), id)))
        .collect();
    // (system, value) → (device id, its body if it exists)
    let mut device_ids: HashMap<(String, String), (String, Option<Value>)> = HashMap::new();
    for ((_, s, v), ids) in devices.into_iter().zip(found_devices) {
        match ids.into_iter().next() {
            Some(id) => {
                let body = ctx
                    .store
                    .read("Device", &id)
                    .await?
                    .and_then(|st| st.body)
                    .and_then(|b| serde_json::from_str::<Value>(&b).ok());
                device_ids.insert((s, v), (id, body));
            }
            None if feeds.auto_create => {
                let id = device_id_for(&s, &v);
                device_ids.insert((s, v), (id, None));
            }
            None => {}
        }
    }
    // Stage two: map, validate and prepare, still outside the writer.
    let loinc = |mdc: &str| {
        crate::interaction::hl7v2::terminology()
            .ok()
            .and_then(|t| t.loinc_for_mdc(mdc))
    };
    let mut plan = Planned {
        new_devices: Vec::new(),
        writes: Vec::new(),
        groups: Vec::new(),
        moves: Vec::new(),
        dead: Vec::new(),
    };
    let mut creating: HashSet<String> = HashSet::new();
    for (i, readings) in normalised {
        let mut staged = Vec::new();
        let mut staged_groups = Vec::new();
        let mut error = None;
        let (mut obs, mut without) = (0, 0);
        for r in &readings {
            let Some(t) = feeds.templates.all.iter().find(|t| t.name == r.template) else {
                continue;
            };
            let key = (r.device_system.clone(), r.device_id.clone());
            let Some((device_id, device_body)) = device_ids.get(&key) else {
                error = Some(format!(
                    "unknown device {}|{} (register a Device with that identifier, or start with --devices-auto-create true)",
                    r.device_system, r.device_id
                ));
                break;
            };
            let subject = match &r.patient {
                Some((system, value)) => {
                    let system = system
                        .clone()
                        .unwrap_or_else(|| PATIENT_ID_SYSTEM.to_string());
                    patient_ids
                        .get(&(system, value.clone()))
                        .map(|id| format!("Patient/{id}"))
                }
                None => None,
            }
            .or_else(|| {
                device_body
                    .as_ref()
                    .and_then(|d| d.pointer("/patient/reference"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
            match plan_reading(
                ctx,
                t,
                r,
                messages[i].json.as_ref().ok(),
                device_id,
                subject.as_deref(),
                &loinc,
            ) {
                Ok((writes, groups, moved)) => {
                    let n = writes.iter().filter(|w| w.0 == "Observation").count() + groups.len();
                    obs += n;
                    if subject.is_none() {
                        without += n;
                    }
                    staged.extend(writes);
                    staged_groups.extend(groups);
                    if let Some(zone) = moved {
                        plan.moves.push((device_id.clone(), zone));
                    }
                    if device_body.is_none() && creating.insert(device_id.clone()) {
                        let device = json!({
                            "resourceType": "Device",
                            "id": device_id,
                            "identifier": [{"system": r.device_system, "value": r.device_id}],
                            "status": "active",
                        });
                        match prepare(ctx, "Device", device, device_id) {
                            Ok(p) => plan.new_devices.push((device_id.clone(), p)),
                            Err(e) => {
                                error = Some(e);
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    error = Some(format!("template {:?}: {e}", t.name));
                    break;
                }
            }
        }
        match error {
            Some(e) => dead.push((i, e)),
            None => {
                outcome.mapped += 1;
                outcome.observations += obs;
                outcome.without_patient += without;
                plan.writes.extend(staged);
                plan.groups.extend(staged_groups);
            }
        }
    }
    dead.sort();
    if keep_dead {
        for (i, why) in &dead {
            if let Some(m) = messages.get(*i) {
                let from = m.source.clone().unwrap_or_else(|| source.to_string());
                plan.dead.push((from, m.text.clone(), why.clone()));
            }
        }
    }
    outcome.rejected = dead;
    plan.groups = coalesce(std::mem::take(&mut plan.groups));
    let c = ctx.clone();
    let created = ctx
        .store
        .write(move |db| Box::pin(async move { commit(db, &c, plan).await }))
        .await?;
    outcome.devices_created = created;
    Ok(outcome)
}

/// One entry per grouped Observation: points in arrival order, the last skeleton (subject)
/// seen.
fn coalesce(groups: Vec<GroupPoints>) -> Vec<GroupPoints> {
    let mut out: Vec<GroupPoints> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for g in groups {
        match at.get(&g.id) {
            Some(&i) => {
                out[i].points.extend(g.points);
                out[i].skeleton = g.skeleton;
            }
            None => {
                at.insert(g.id.clone(), out.len());
                out.push(g);
            }
        }
    }
    out
}

fn prepare(
    ctx: &crate::interaction::Ctx,
    ty: &str,
    mut r: Value,
    id: &str,
) -> std::result::Result<Prepared, String> {
    write::check(ctx, ty, &mut r, Some(id)).map_err(|e| e.diagnostics())?;
    write::prepare_with_id(ctx, r, id).map_err(|e| e.diagnostics())
}

type Writes = Vec<(&'static str, String, Prepared)>;

/// The resources one reading writes, and the zone Location a tag moved to.
fn plan_reading(
    ctx: &SharedCtx,
    t: &Template,
    r: &Reading,
    msg: Option<&Value>,
    device_id: &str,
    subject: Option<&str>,
    loinc: &dyn Fn(&str) -> Option<(String, String)>,
) -> std::result::Result<(Writes, Vec<GroupPoints>, Option<String>), String> {
    let mut out = Vec::new();
    let device_ref = format!("Device/{device_id}");
    for o in map::observations(t, r, &device_ref, subject, loinc)? {
        let id = o["id"].as_str().unwrap_or_default().to_string();
        let p = prepare(ctx, "Observation", o, &id)?;
        out.push(("Observation", id, p));
    }
    let groups = map::grouped(t, r, &device_ref, subject, loinc)?;
    for g in &groups {
        // Checked here so that a template's mistake is this message's dead letter; the
        // writer merges the samples into the stored version and prepares that.
        let mut o = map::merge_group(None, g);
        write::check(ctx, "Observation", &mut o, Some(&g.id)).map_err(|e| e.diagnostics())?;
    }
    let mut moved = None;
    if let Some(msg) = msg
        && let Some((id, location)) = map::zone_location(t, msg)?
    {
        let p = prepare(ctx, "Location", location, &id)?;
        out.push(("Location", id.clone(), p));
        moved = Some(id);
    }
    Ok((out, groups, moved))
}

/// The writer job: create missing Devices, write resources (no-ops when unchanged), move
/// tagged Devices, keep dead letters. Returns how many Devices it created.
async fn commit(db: &mut Db, ctx: &crate::interaction::Ctx, plan: Planned) -> Result<usize> {
    let mut keys: Vec<(String, String)> = plan
        .writes
        .iter()
        .map(|(t, id, _)| (t.to_string(), id.clone()))
        .collect();
    keys.extend(
        plan.new_devices
            .iter()
            .map(|(id, _)| ("Device".to_string(), id.clone())),
    );
    keys.extend(
        plan.groups
            .iter()
            .map(|g| ("Observation".to_string(), g.id.clone())),
    );
    keys.extend(
        plan.moves
            .iter()
            .map(|(id, _)| ("Device".to_string(), id.clone())),
    );
    keys.sort();
    keys.dedup();
    db.prefetch(&keys).await?;
    let now = crate::time::now_micros();
    let mut created = 0;
    for (id, p) in &plan.new_devices {
        // Locked on PostgreSQL: another process or batch may be creating the same device
        // at this moment; the second waits for the first and then finds it.
        let current = db.current_for_update("Device", id).await?;
        if current.as_ref().is_none_or(|c| c.deleted) {
            // A deleted Device comes back as its next version (its row exists).
            db.write_version("Device", id, current.as_ref(), Some(p), "PUT", now)
                .await?;
            created += 1;
        }
    }
    for (ty, id, p) in &plan.writes {
        update_in(db, ty, id, p, None).await?;
    }
    for g in &plan.groups {
        let stored = read_for_update(db, "Observation", &g.id).await?;
        let mut merged = map::merge_group(stored.as_ref(), g);
        write::check(ctx, "Observation", &mut merged, Some(&g.id))?;
        let p = write::prepare_with_id(ctx, merged, &g.id)?;
        update_in(db, "Observation", &g.id, &p, None).await?;
    }
    let mut moved: HashMap<&str, &str> = HashMap::new();
    for (device, zone) in &plan.moves {
        moved.insert(device, zone);
    }
    for (device, zone) in moved {
        let Some(mut body) = read_for_update(db, "Device", device).await? else {
            continue;
        };
        let reference = format!("Location/{zone}");
        if body.pointer("/location/reference").and_then(Value::as_str) == Some(reference.as_str()) {
            continue;
        }
        body["location"] = json!({"reference": reference});
        if let Some(m) = body.get_mut("meta").and_then(Value::as_object_mut) {
            m.shift_remove("versionId");
            m.shift_remove("lastUpdated");
        }
        let p = write::prepare_with_id(ctx, body, device)?;
        update_in(db, "Device", device, &p, None).await?;
    }
    for (source, payload, reason) in &plan.dead {
        db.execute(
            "INSERT INTO device_message (received_at, source, payload, reason) VALUES ($1, $2, $3, $4)",
            &[
                Arg::Int(now),
                Arg::Text(source.clone()),
                Arg::Text(payload.clone()),
                Arg::Text(reason.clone()),
            ],
        )
        .await?;
    }
    Ok(created)
}

/// The current body of `ty/id`, for a change made from it: locked first on PostgreSQL (if
/// `prefetch` did not already), since another process or batch may be writing it right now.
/// `None` if absent or deleted.
async fn read_for_update(db: &mut Db, ty: &str, id: &str) -> Result<Option<Value>> {
    db.current_for_update(ty, id).await?;
    Ok(db
        .read(ty, id)
        .await?
        .and_then(|s| s.body)
        .and_then(|b| serde_json::from_str::<Value>(&b).ok()))
}

/// `POST [base]/$device-data`: one JSON message, a JSON array of them, or NDJSON. 202 with
/// the counts once committed; 503 with Retry-After when the queue is full.
pub async fn http(ctx: &SharedCtx, req: FhirRequest) -> Result<FhirResponse> {
    let messages = match &req.body {
        RequestBody::Bytes(bytes) => split_body(bytes)?,
        RequestBody::None => Vec::new(),
        _ => {
            return Err(FhirError::new(
                ErrorKind::UnsupportedMediaType,
                "$device-data takes JSON or NDJSON (application/json, application/x-ndjson)",
            ));
        }
    };
    if messages.is_empty() {
        return Err(FhirError::invalid("no device messages in the body"));
    }
    let n = messages.len();
    if n > ctx.devices.queue_capacity {
        return Err(FhirError::invalid(format!(
            "{n} messages in one request; the device queue holds {} (send smaller batches)",
            ctx.devices.queue_capacity
        )));
    }
    let permit = u32::try_from(n)
        .ok()
        .and_then(|n| ctx.devices.queue.clone().try_acquire_many_owned(n).ok())
        .ok_or_else(|| {
            FhirError::new(
                ErrorKind::Unavailable,
                "the device queue is full; retry after a moment",
            )
        })?;
    let outcome = ingest(ctx, messages, "http").await?;
    drop(permit);
    Ok(FhirResponse::json(202, outcome.to_json()))
}

/// A dead letter as listed.
pub async fn dead_letters(
    ctx: &SharedCtx,
    include_replayed: bool,
    after: i64,
    limit: i64,
) -> Result<Vec<Value>> {
    let mut db = ctx.store.reader().await?;
    let mut b = crate::store::SqlBuilder::new(
        "SELECT id, received_at, source, reason, payload, COALESCE(replayed_at, 0) FROM device_message WHERE id > ",
    );
    b.int(after);
    if !include_replayed {
        b.push(" AND replayed_at IS NULL");
    }
    b.push(" ORDER BY id LIMIT ").int(limit);
    let rows = db
        .fetch_all(
            &b.sql,
            &b.args,
            &[Ty::Int, Ty::Int, Ty::Text, Ty::Text, Ty::Text, Ty::Int],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let payload = match &r[4] {
                crate::store::Val::Text(s) => {
                    serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.clone()))
                }
                _ => Value::Null,
            };
            let text = |i: usize| match &r[i] {
                crate::store::Val::Text(s) => Value::String(s.clone()),
                _ => Value::Null,
            };
            json!({
                "id": r[0].int(),
                "receivedAt": crate::time::format_instant(r[1].int()),
                "source": text(2),
                "reason": text(3),
                "payload": payload,
                "replayedAt": match r[5].int() {
                    0 => Value::Null,
                    t => Value::String(crate::time::format_instant(t)),
                },
            })
        })
        .collect())
}

/// Maps the open dead letters again (all, or one by id), e.g. after a template fix. Those
/// that map now are marked replayed; the others keep their row with the new reason.
/// Replaying twice is harmless: the Observations' ids are deterministic.
pub async fn replay(ctx: &SharedCtx, id: Option<i64>) -> Result<(usize, Outcome)> {
    let mut db = ctx.store.reader().await?;
    let mut b = crate::store::SqlBuilder::new(
        "SELECT id, payload FROM device_message WHERE replayed_at IS NULL",
    );
    if let Some(id) = id {
        b.push(" AND id = ").int(id);
    }
    b.push(" ORDER BY id");
    let rows = db.fetch_all(&b.sql, &b.args, &[Ty::Int, Ty::Text]).await?;
    drop(db);
    let mut ids = Vec::with_capacity(rows.len());
    let mut messages = Vec::with_capacity(rows.len());
    for r in rows {
        let mut it = r.into_iter();
        let (Some(id), Some(text)) = (it.next().map(|v| v.int()), it.next().and_then(|v| v.text()))
        else {
            continue;
        };
        ids.push(id);
        messages.push(Message {
            json: serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}")),
            text,
            source: None,
        });
    }
    if messages.is_empty() {
        return Ok((0, Outcome::default()));
    }
    let outcome = ingest_with(ctx, messages, "replay", false).await?;
    let failed: HashMap<usize, String> = outcome.rejected.iter().cloned().collect();
    let now = crate::time::now_micros();
    let updates: Vec<(i64, Option<String>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, failed.get(&i).cloned()))
        .collect();
    ctx.store
        .write(move |db| {
            Box::pin(async move {
                for (id, reason) in updates {
                    match reason {
                        Some(r) => {
                            db.execute(
                                "UPDATE device_message SET reason = $1 WHERE id = $2",
                                &[Arg::Text(r), Arg::Int(id)],
                            )
                            .await?
                        }
                        None => {
                            db.execute(
                                "UPDATE device_message SET replayed_at = $1 WHERE id = $2",
                                &[Arg::Int(now), Arg::Int(id)],
                            )
                            .await?
                        }
                    };
                }
                Ok(())
            })
        })
        .await?;
    Ok((ids.len(), outcome))
}

/// `GET [base]/$device-data/errors?after=<id>&_count=50&replayed=true`.
pub async fn http_errors(ctx: &SharedCtx, req: &FhirRequest) -> Result<FhirResponse> {
    let (after, count) = req.listing_window(&ctx.limits)?;
    let all = match req.param("replayed") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(FhirError::invalid("replayed must be true or false")),
    };
    let messages = dead_letters(ctx, all, after, count).await?;
    Ok(FhirResponse::json(200, json!({ "messages": messages })))
}

/// `POST [base]/$device-data/replay[?id=<id>]`.
pub async fn http_replay(ctx: &SharedCtx, req: &FhirRequest) -> Result<FhirResponse> {
    let id = req
        .param("id")
        .map(str::parse::<i64>)
        .transpose()
        .map_err(|_| FhirError::invalid("id must be a dead-letter id"))?;
    let (n, outcome) = replay(ctx, id).await?;
    let mut body = outcome.to_json();
    body["replayed"] = json!(n);
    Ok(FhirResponse::json(200, body))
}

/// `GET [base]/$device-data/templates`: the templates in force, read-only.
pub fn http_templates(ctx: &SharedCtx) -> FhirResponse {
    let list: Vec<Value> = ctx
        .devices
        .templates
        .all
        .iter()
        .map(|t| json!({"name": t.name, "description": t.description, "source": t.source, "template": t.json}))
        .collect();
    FhirResponse::json(200, json!({ "templates": list }))
}
