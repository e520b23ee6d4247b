//! HL7 v2 ingestion (`$hl7v2`; HL7 v2.x chapter 2 acknowledgement rules, HL7 v2-to-FHIR
//! IG): one message in, one acknowledgement out. Shared by `POST [base]/$hl7v2` and the
//! MLLP listener.
//!
//! Every message is stored raw with its outcome. The resources a message produces are
//! written in the same database transaction as its stored row, so `AA` (or `CA`) is sent
//! only after both are committed; a redelivered message (same MSH-3, MSH-4, MSH-10) gets
//! the stored acknowledgement and writes nothing.

use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::{ErrorKind, FhirError, Result};
use crate::hl7v2::ack::{self, AckCode, AckError, Outcome};
use crate::hl7v2::map::terminology::Terminology;
use crate::hl7v2::map::{MapContext, MapError, map};
use crate::hl7v2::message::Message;
use crate::hl7v2::parse;
use crate::interaction::{Body, FhirRequest, FhirResponse, RequestBody, SharedCtx};
use crate::store::{Arg, Db, Ty};

/// The message types and trigger events the mapping handles.
const SUPPORTED: &[(&str, &str)] = &[
    ("ADT", "A01"),
    ("ADT", "A02"),
    ("ADT", "A03"),
    ("ADT", "A04"),
    ("ADT", "A05"),
    ("ADT", "A08"),
    ("ADT", "A11"),
    ("ADT", "A13"),
    ("ADT", "A28"),
    ("ADT", "A31"),
    ("ADT", "A40"),
    ("ORU", "R01"),
    ("RDE", "O11"),
    ("RAS", "O17"),
];
const VERSIONS: &[&str] = &[
    "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9",
];

/// The MDC → LOINC and MDC unit → UCUM ConceptMaps of `terminology/`, embedded.
const CONCEPT_MAPS: &[&str] = &[
    include_str!("../../terminology/mdc-to-loinc.json"),
    include_str!("../../terminology/mdc-units-to-ucum.json"),
];

/// The terminology the mapping uses, loaded once (the server loads it at start-up so a bad
/// ConceptMap stops the start, not the first message).
pub fn terminology() -> std::result::Result<&'static Terminology, String> {
    static T: OnceLock<std::result::Result<Terminology, String>> = OnceLock::new();
    T.get_or_init(|| {
        let maps = CONCEPT_MAPS
            .iter()
            .map(|m| serde_json::from_str::<Value>(m).map_err(|e| format!("terminology/: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Terminology::from_concept_maps(&maps)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The ids of the ConceptMaps in `terminology/`: served read-only.
pub fn is_managed_concept_map(ty: &str, id: &str) -> bool {
    ty == "ConceptMap"
        && CONCEPT_MAPS.iter().any(|m| {
            serde_json::from_str::<Value>(m)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_str).map(|i| i == id))
                .unwrap_or(false)
        })
}

/// Stores the ConceptMaps of `terminology/` (at start-up, through the normal write path; an
/// unchanged map writes nothing), so clients can read what the mapping uses.
pub async fn publish_concept_maps(ctx: &SharedCtx) -> std::result::Result<(), String> {
    for text in CONCEPT_MAPS {
        let mut map: Value =
            serde_json::from_str(text).map_err(|e| format!("terminology/: {e}"))?;
        let id = map
            .get("id")
            .and_then(Value::as_str)
            .ok_or("terminology/: a ConceptMap without an id")?
            .to_string();
        crate::interaction::write::check(ctx, "ConceptMap", &mut map, Some(&id))
            .map_err(|e| format!("terminology/{id}: {e}"))?;
        let prepared =
            crate::interaction::write::prepare_with_id(ctx, map, &id).map_err(|e| e.to_string())?;
        let t = id.clone();
        ctx.store
            .write(move |db| {
                Box::pin(async move {
                    crate::interaction::update::update_in(db, "ConceptMap", &t, &prepared, None)
                        .await
                })
            })
            .await
            .map_err(|e| format!("storing terminology/{id}: {e}"))?;
    }
    Ok(())
}

/// What became of one message.
#[derive(Debug, Clone)]
pub struct Ingested {
    /// The acknowledgement(s), as text with `\r` segment separators.
    pub ack: String,
    /// The acknowledgement encoded for the wire (the message's MSH-18 charset).
    pub wire: Vec<u8>,
    pub code: AckCode,
    /// `Type/id/_history/n` of everything written.
    pub resources: Vec<String>,
    pub error: Option<String>,
    /// The message had been received before; nothing was written.
    pub duplicate: bool,
}

fn dedup_key(msg: &Message) -> Option<String> {
    let msh = msg.first("MSH")?;
    let part = |f: usize| msh.get(f, 0, 1, 1).unwrap_or("");
    Some(format!("{}|{}|{}", part(3), part(4), msg.control_id()?))
}

/// Builds the acknowledgement for `outcome` (one or, in enhanced mode, two messages).
fn acknowledge(
    msg: Option<&Message>,
    outcome: Outcome,
    error: Option<&AckError>,
) -> (String, AckCode) {
    let codes = ack::acks_for(msg, outcome);
    let code = codes.last().copied().unwrap_or(match outcome {
        Outcome::Committed => AckCode::AA,
        Outcome::Error => AckCode::AE,
        Outcome::Rejected => AckCode::AR,
    });
    let text: String = codes.iter().map(|c| ack::ack(msg, *c, error)).collect();
    // A sender that wants no acknowledgement at all still gets the original-mode answer
    // on a synchronous transport.
    let text = if text.is_empty() {
        ack::ack(msg, code, error)
    } else {
        text
    };
    (text, code)
}

/// Processes one message: parse, check, map, write, acknowledge. Never fails: every
/// problem becomes an AE/AR acknowledgement, and the message is stored either way.
pub async fn ingest(ctx: &SharedCtx, bytes: &[u8], peer: &str) -> Ingested {
    let received_at = crate::time::now_micros();
    let msg = match parse::parse(bytes) {
        Ok(m) => m,
        Err(e) => {
            let header = parse::parse_header(bytes);
            let err = AckError::from(&e);
            return reject(
                ctx,
                bytes,
                peer,
                received_at,
                header.as_ref(),
                Outcome::Rejected,
                &err,
                e.to_string(),
            )
            .await;
        }
    };
    if let Err(err) = ack::check_header(&msg, SUPPORTED, VERSIONS) {
        return reject(
            ctx,
            bytes,
            peer,
            received_at,
            Some(&msg),
            Outcome::Rejected,
            &err,
            err.text.clone(),
        )
        .await;
    }
    let key = dedup_key(&msg);
    if let Some(k) = &key
        && let Some(previous) = stored_ack(ctx, k).await
    {
        return previous_answer(previous, &msg);
    }
    let terminology = match terminology() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "terminology unavailable");
            let err = AckError::new(ack::APPLICATION_INTERNAL_ERROR, "terminology unavailable");
            return reject(
                ctx,
                bytes,
                peer,
                received_at,
                Some(&msg),
                Outcome::Error,
                &err,
                e,
            )
            .await;
        }
    };
    let map_ctx = MapContext {
        terminology,
        message_ref: format!("urn:hl7v2:message:{}", key.clone().unwrap_or_default()),
    };
    let mapped = match map(&msg, &map_ctx) {
        Ok(m) => m,
        Err(errors) => {
            let first = errors.first();
            let err = first.map_or_else(
                || {
                    AckError::new(
                        ack::APPLICATION_INTERNAL_ERROR,
                        "the message could not be mapped",
                    )
                },
                ack_error,
            );
            let text = errors
                .iter()
                .map(MapError::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            return reject(
                ctx,
                bytes,
                peer,
                received_at,
                Some(&msg),
                Outcome::Error,
                &err,
                text,
            )
            .await;
        }
    };
    // The acknowledgement is decided before the write and stored with the message; it is
    // sent only once the transaction holding both has committed.
    let (ack_text, code) = acknowledge(Some(&msg), Outcome::Committed, None);
    let row = MessageRow::new(
        bytes,
        peer,
        received_at,
        Some(&msg),
        &ack_text,
        code,
        None,
        key.clone(),
    );
    // Parse, validate, resolve and serialise outside the writer; inside, the ids are
    // checked again and the resources written.
    let written = match crate::interaction::transaction::plan_bundle(ctx, mapped.bundle) {
        Err(e) => Err(e),
        Ok(mut planned) => {
            crate::interaction::transaction::speculate(ctx, &mut planned).await;
            let c = ctx.clone();
            ctx.store
                .write(move |db| {
                    Box::pin(async move {
                        let resources =
                            crate::interaction::transaction::run_planned(db, &c, planned).await?;
                        let mut row = row;
                        row.resources = resources.clone();
                        row.insert(db).await?;
                        Ok(resources)
                    })
                })
                .await
        }
    };
    match written {
        Ok(resources) => Ingested {
            wire: ack::to_wire(&ack_text, Some(&msg)),
            ack: ack_text,
            code,
            resources,
            error: None,
            duplicate: false,
        },
        Err(e) => {
            // A concurrent delivery of the same message may have won the race.
            if let Some(k) = &key
                && let Some(previous) = stored_ack(ctx, k).await
            {
                return previous_answer(previous, &msg);
            }
            let text = e.diagnostics();
            let err = AckError::new(ack::APPLICATION_INTERNAL_ERROR, text.clone());
            reject(
                ctx,
                bytes,
                peer,
                received_at,
                Some(&msg),
                Outcome::Error,
                &err,
                text,
            )
            .await
        }
    }
}

fn ack_error(e: &MapError) -> AckError {
    AckError::new(e.code, e.text.clone()).at(&e.segment, e.sequence, e.field)
}

fn previous_answer(previous: (String, String), msg: &Message) -> Ingested {
    let (ack_text, outcome) = previous;
    let code = match outcome.as_str() {
        "AA" | "CA" => AckCode::AA,
        "AR" | "CR" => AckCode::AR,
        _ => AckCode::AE,
    };
    Ingested {
        wire: ack::to_wire(&ack_text, Some(msg)),
        ack: ack_text,
        code,
        resources: Vec::new(),
        error: None,
        duplicate: true,
    }
}

/// The stored acknowledgement and outcome of an earlier delivery of the same message.
async fn stored_ack(ctx: &SharedCtx, key: &str) -> Option<(String, String)> {
    let mut db = ctx.store.reader().await.ok()?;
    let row = db
        .fetch_optional(
            "SELECT ack, outcome FROM hl7_message WHERE dedup_key = $1",
            &[Arg::Text(key.to_string())],
            &[Ty::Text, Ty::Text],
        )
        .await
        .ok()??;
    let mut it = row.into_iter();
    Some((it.next()?.text()?, it.next()?.text()?))
}

/// A stored message.
struct MessageRow {
    received_at: i64,
    peer: String,
    sending_application: Option<String>,
    sending_facility: Option<String>,
    control_id: Option<String>,
    message_type: Option<String>,
    raw_base64: String,
    outcome: &'static str,
    ack: String,
    resources: Vec<String>,
    error: Option<String>,
    /// Only committed messages claim their key: a message answered AE/AR may be resent.
    dedup_key: Option<String>,
}

impl MessageRow {
    #[allow(clippy::too_many_arguments)]
    fn new(
        bytes: &[u8],
        peer: &str,
        received_at: i64,
        msg: Option<&Message>,
        ack: &str,
        code: AckCode,
        error: Option<String>,
        dedup_key: Option<String>,
    ) -> Self {
        let msh = msg.and_then(|m| m.first("MSH"));
        let field = |f: usize| msh.and_then(|s| s.get(f, 0, 1, 1)).map(str::to_string);
        let (ty, trigger, _) = msg.map(Message::message_type).unwrap_or((None, None, None));
        MessageRow {
            received_at,
            peer: peer.to_string(),
            sending_application: field(3),
            sending_facility: field(4),
            control_id: msg.and_then(Message::control_id).map(str::to_string),
            message_type: ty.map(|t| format!("{t}^{}", trigger.unwrap_or(""))),
            raw_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            outcome: match code {
                AckCode::AA | AckCode::CA => "AA",
                AckCode::AE | AckCode::CE => "AE",
                AckCode::AR | AckCode::CR => "AR",
            },
            ack: ack.to_string(),
            resources: Vec::new(),
            error,
            dedup_key,
        }
    }

    /// Stores the row. A committed message's row is its job's last write and goes out with
    /// the job's resources in one round trip (`Db::execute_final`); a redelivery racing the
    /// first delivery finds the key taken and stores nothing (its writes are no-ops: every
    /// entry is conditional on identifiers the first delivery wrote).
    async fn insert(&self, db: &mut Db) -> Result<()> {
        db.execute_final(
            "INSERT INTO hl7_message (received_at, peer, sending_application, sending_facility, control_id, message_type, raw_base64, outcome, ack, resources, error, dedup_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (dedup_key) DO NOTHING",
            vec![
                Arg::Int(self.received_at),
                Arg::Text(self.peer.clone()),
                Arg::OptText(self.sending_application.clone()),
                Arg::OptText(self.sending_facility.clone()),
                Arg::OptText(self.control_id.clone()),
                Arg::OptText(self.message_type.clone()),
                Arg::Text(self.raw_base64.clone()),
                Arg::Text(self.outcome.to_string()),
                Arg::Text(self.ack.clone()),
                Arg::Text(json!(self.resources).to_string()),
                Arg::OptText(self.error.clone()),
                Arg::OptText(self.dedup_key.clone()),
            ],
        )
        .await
    }
}

/// Answers a message that writes nothing (AE/AR): builds the acknowledgement carrying
/// `err`, stores the message with it, and returns the answer. If even storing fails, the
/// sender gets an AE so it resends: nothing accepted is lost.
#[allow(clippy::too_many_arguments)]
async fn reject(
    ctx: &SharedCtx,
    bytes: &[u8],
    peer: &str,
    received_at: i64,
    msg: Option<&Message>,
    outcome: Outcome,
    err: &AckError,
    error: String,
) -> Ingested {
    let (ack_text, code) = acknowledge(msg, outcome, Some(err));
    let row = MessageRow::new(
        bytes,
        peer,
        received_at,
        msg,
        &ack_text,
        code,
        Some(error.clone()),
        None,
    );
    let stored = ctx
        .store
        .write(move |db| Box::pin(async move { row.insert(db).await }))
        .await;
    let (ack_text, code) = match stored {
        Ok(()) => (ack_text, code),
        Err(e) => {
            tracing::error!(error = %e, "could not store an HL7 v2 message");
            let err = AckError::new(
                ack::APPLICATION_INTERNAL_ERROR,
                "the message could not be stored; resend it",
            );
            acknowledge(msg, Outcome::Error, Some(&err))
        }
    };
    Ingested {
        wire: ack::to_wire(&ack_text, msg),
        ack: ack_text,
        code,
        resources: Vec::new(),
        error: Some(error),
        duplicate: false,
    }
}

/// `POST [base]/$hl7v2`: the body is one message (or an FHS/BHS batch); the answer is the
/// acknowledgement, or an OperationOutcome when the client accepts FHIR JSON.
pub async fn http(ctx: &SharedCtx, req: FhirRequest) -> Result<FhirResponse> {
    let RequestBody::Bytes(bytes) = &req.body else {
        return Err(FhirError::new(
            ErrorKind::UnsupportedMediaType,
            "$hl7v2 takes an HL7 v2 message (Content-Type x-application/hl7-v2+er7 or text/plain)",
        ));
    };
    let messages = if bytes.windows(3).any(|w| w == b"FHS" || w == b"BHS") {
        parse::split_batch(bytes).map_err(|e| FhirError::invalid(format!("HL7 v2 batch: {e}")))?
    } else {
        vec![bytes.clone()]
    };
    let mut results = Vec::with_capacity(messages.len());
    for m in &messages {
        results.push(ingest(ctx, m, "http").await);
    }
    if req.wants_fhir_json {
        let issues: Vec<Value> = results
            .iter()
            .map(|r| {
                let (severity, code) = match r.code {
                    AckCode::AA | AckCode::CA => ("information", "informational"),
                    AckCode::AE | AckCode::CE => ("error", "processing"),
                    AckCode::AR | AckCode::CR => ("error", "not-supported"),
                };
                let mut text = format!("{:?}", r.code);
                if r.duplicate {
                    text.push_str(" (duplicate: already processed, nothing written)");
                }
                if let Some(e) = &r.error {
                    text.push_str(": ");
                    text.push_str(e);
                }
                if !r.resources.is_empty() {
                    text.push_str(&format!("; wrote {}", r.resources.join(", ")));
                }
                json!({"severity": severity, "code": code, "diagnostics": text})
            })
            .collect();
        let status = if results
            .iter()
            .all(|r| matches!(r.code, AckCode::AA | AckCode::CA))
        {
            200
        } else if results
            .iter()
            .any(|r| matches!(r.code, AckCode::AR | AckCode::CR))
        {
            400
        } else {
            422
        };
        return Ok(FhirResponse::json(
            status,
            json!({"resourceType": "OperationOutcome", "issue": issues}),
        ));
    }
    let text: Vec<u8> = results
        .iter()
        .flat_map(|r| r.wire.iter().copied())
        .collect();
    let mut r = FhirResponse::json(200, Value::Null);
    r.body = Body::Bytes("x-application/hl7-v2+er7; charset=utf-8", text);
    Ok(r)
}

/// One stored message, as listed (the raw bytes are left out; replay reads them).
pub async fn list(
    ctx: &SharedCtx,
    outcome: Option<&str>,
    after: i64,
    limit: i64,
) -> Result<Vec<Value>> {
    let mut db = ctx.store.reader().await?;
    let mut b = crate::store::SqlBuilder::new(
        "SELECT id, received_at, peer, sending_application, sending_facility, control_id, message_type, outcome, error, resources FROM hl7_message WHERE id > ",
    );
    b.int(after);
    if let Some(o) = outcome {
        b.push(" AND outcome = ").text(o);
    }
    b.push(" ORDER BY id LIMIT ").int(limit);
    let rows = db
        .fetch_all(
            &b.sql,
            &b.args,
            &[
                Ty::Int,
                Ty::Int,
                Ty::OptText,
                Ty::OptText,
                Ty::OptText,
                Ty::OptText,
                Ty::OptText,
                Ty::Text,
                Ty::OptText,
                Ty::OptText,
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let t = |i: usize| match &r[i] {
                crate::store::Val::Text(s) => Value::String(s.clone()),
                _ => Value::Null,
            };
            json!({
                "id": r[0].int(),
                "receivedAt": crate::time::format_instant(r[1].int()),
                "peer": t(2),
                "sendingApplication": t(3),
                "sendingFacility": t(4),
                "controlId": t(5),
                "messageType": t(6),
                "outcome": t(7),
                "error": t(8),
                "resources": match &r[9] {
                    crate::store::Val::Text(s) => serde_json::from_str(s).unwrap_or(Value::Null),
                    _ => Value::Null,
                },
            })
        })
        .collect())
}

/// Processes stored messages again (after a mapping fix, say): by id, or every message with
/// an outcome. Each replay is a new delivery with its own stored row; a message that was
/// committed before is a duplicate and writes nothing.
pub async fn replay(
    ctx: &SharedCtx,
    id: Option<i64>,
    outcome: Option<&str>,
) -> Result<Vec<(i64, Ingested)>> {
    let mut db = ctx.store.reader().await?;
    let mut b = crate::store::SqlBuilder::new("SELECT id, raw_base64 FROM hl7_message WHERE 1 = 1");
    if let Some(id) = id {
        b.push(" AND id = ").int(id);
    }
    if let Some(o) = outcome {
        b.push(" AND outcome = ").text(o);
    }
    if id.is_none() && outcome.is_none() {
        return Err(FhirError::invalid(
            "say which messages to replay: an id or an outcome (AE, AR)",
        ));
    }
    b.push(" ORDER BY id");
    let rows = db.fetch_all(&b.sql, &b.args, &[Ty::Int, Ty::Text]).await?;
    drop(db);
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let mut it = r.into_iter();
        let (Some(id), Some(raw)) = (it.next().map(|v| v.int()), it.next().and_then(|v| v.text()))
        else {
            continue;
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(|e| FhirError::internal(format!("stored message {id} is not base64: {e}")))?;
        out.push((id, ingest(ctx, &bytes, "replay").await));
    }
    Ok(out)
}

/// `GET [base]/$hl7v2-messages?outcome=AE&after=<id>&_count=50`.
pub async fn http_list(ctx: &SharedCtx, req: &FhirRequest) -> Result<FhirResponse> {
    let outcome = req.param("outcome").map(str::to_string);
    if let Some(o) = &outcome
        && !matches!(o.as_str(), "AA" | "AE" | "AR")
    {
        return Err(FhirError::invalid("outcome must be AA, AE or AR"));
    }
    let (after, count) = req.listing_window(&ctx.limits)?;
    let messages = list(ctx, outcome.as_deref(), after, count).await?;
    Ok(FhirResponse::json(200, json!({ "messages": messages })))
}

/// `POST [base]/$hl7v2-replay?id=<id>` or `?outcome=AE`.
pub async fn http_replay(ctx: &SharedCtx, req: &FhirRequest) -> Result<FhirResponse> {
    let id = req
        .param("id")
        .map(str::parse::<i64>)
        .transpose()
        .map_err(|_| FhirError::invalid("id must be a message id"))?;
    let outcome = req.param("outcome");
    let results = replay(ctx, id, outcome).await?;
    let replayed: Vec<Value> = results
        .iter()
        .map(|(id, r)| json!({"id": id, "ack": format!("{:?}", r.code), "duplicate": r.duplicate, "error": r.error, "resources": r.resources}))
        .collect();
    Ok(FhirResponse::json(200, json!({ "replayed": replayed })))
}
