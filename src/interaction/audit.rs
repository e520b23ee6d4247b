//! The audit trail under `--auth smart`: one AuditEvent (FHIR R4 auditevent.html, shaped as
//! IHE BALP's RESTful-interaction events) per authenticated request and per denied one: who
//! (client, user), for which patient, what interaction on what, the outcome, and the network
//! address. Requests queue their event and go on; a background task writes the queue in
//! batches through the normal write path (so AuditEvents are searchable like any resource),
//! and a full queue makes requests wait rather than lose events. Under `--auth smart` the
//! API cannot create, change or delete AuditEvents.

use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::interaction::{Ctx, Interaction, SharedCtx, create, new_id, write};

/// Events waiting to be written, at most.
const QUEUE: usize = 100_000;
/// Events per write job, at most.
const BATCH: usize = 1000;

pub struct Audit {
    tx: mpsc::Sender<Value>,
    rx: Mutex<Option<mpsc::Receiver<Value>>>,
}

impl Default for Audit {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Audit {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Audit {
    /// Queues an event; waits only when the queue is full.
    pub async fn record(&self, event: Value) {
        if let Err(mpsc::error::TrySendError::Full(e)) = self.tx.try_send(event) {
            let _ = self.tx.send(e).await;
        }
    }

    /// The receiving end, once (for [`run`]).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<Value>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Writes queued events until `stop`, then what is still queued.
pub async fn run(
    ctx: SharedCtx,
    mut rx: mpsc::Receiver<Value>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = stop.changed() => None,
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        write_batch(&ctx, batch).await;
    }
    // Shutting down: nothing queued is dropped.
    let mut rest = Vec::new();
    while let Ok(e) = rx.try_recv() {
        rest.push(e);
        if rest.len() == BATCH {
            write_batch(&ctx, std::mem::take(&mut rest)).await;
        }
    }
    if !rest.is_empty() {
        write_batch(&ctx, rest).await;
    }
}

async fn write_batch(ctx: &SharedCtx, events: Vec<Value>) {
    let mut prepared = Vec::with_capacity(events.len());
    for e in events {
        let id = new_id();
        match write::prepare_with_id(ctx, e, &id) {
            Ok(p) => prepared.push((id, p)),
            Err(err) => tracing::error!(error = %err, "an AuditEvent could not be prepared"),
        }
    }
    let c = ctx.clone();
    let n = prepared.len();
    let result = ctx
        .store
        .write(move |db| {
            Box::pin(async move {
                for (id, p) in &prepared {
                    create::create_in(db, &c, "AuditEvent", id, p, None).await?;
                }
                Ok(())
            })
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, events = n, "writing AuditEvents failed");
    }
}

/// What the transport knows about one request.
pub struct Request<'a> {
    pub method: &'a str,
    /// Path below the server root (`/fhir/Patient/1`, `/auth/token`).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub status: u16,
    pub client: Option<&'a str>,
    pub fhir_user: Option<&'a str>,
    pub patient: Option<&'a str>,
    pub address: Option<String>,
}

/// The restful-interaction code of a routed interaction.
fn subtype(i: &Interaction) -> &'static str {
    use Interaction as I;
    match i {
        I::Capabilities => "capabilities",
        I::Bundle => "transaction",
        I::Read(..) => "read",
        I::Vread(..) => "vread",
        I::Update(..) | I::ConditionalUpdate(_) => "update",
        I::Patch(..) | I::ConditionalPatch(_) => "patch",
        I::Delete(..) | I::ConditionalDelete(_) => "delete",
        I::Create(_) => "create",
        I::HistoryInstance(..) => "history-instance",
        I::HistoryType(_) => "history-type",
        I::HistorySystem => "history-system",
        I::SearchType(_) | I::SearchCompartment(..) => "search-type",
        I::SearchSystem => "search-system",
        _ => "operation",
    }
}

/// The AuditEvent of one request.
pub fn event(ctx: &Ctx, r: &Request<'_>) -> Value {
    let fhir_path = r.path.strip_prefix(crate::rest::FHIR_PREFIX);
    let method = crate::interaction::Method::parse(r.method);
    let routed = fhir_path.and_then(|p| {
        crate::interaction::route(ctx.defs, method, &crate::interaction::split_path(p)).ok()
    });
    let code = match (&routed, fhir_path) {
        (Some(i), _) => subtype(i),
        (None, None) => "operation",
        (None, Some(_)) => "read",
    };
    let action = match code {
        "create" => "C",
        "update" | "patch" => "U",
        "delete" => "D",
        "read" | "vread" | "history-instance" | "capabilities" => "R",
        _ => "E",
    };
    let outcome = match r.status {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let network = |a: &Option<String>| match a {
        Some(a) => json!({"address": a, "type": "2"}),
        None => Value::Null,
    };
    let mut agents = Vec::new();
    match r.client {
        Some(client) => agents.push(json!({
            "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110150", "display": "Application"}]},
            "who": {"identifier": {"system": format!("{}/auth/clients", crate::auth::oauth::origin(ctx)), "value": client}},
            "requestor": r.fhir_user.is_none(),
            "network": network(&r.address),
        })),
        None => agents.push(json!({
            "who": {"display": "unauthenticated caller"},
            "requestor": true,
            "network": network(&r.address),
        })),
    }
    if let Some(user) = r.fhir_user {
        agents.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient"}]},
            "who": {"reference": user},
            "requestor": true,
        }));
    }
    for a in &mut agents {
        if a["network"].is_null()
            && let Some(o) = a.as_object_mut()
        {
            o.shift_remove("network");
        }
    }
    let mut entities = Vec::new();
    if let Some(p) = r.patient {
        entities.push(json!({
            "what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}
        }));
    }
    if let Some(
        Interaction::Read(t, id)
        | Interaction::Vread(t, id, _)
        | Interaction::Update(t, id)
        | Interaction::Patch(t, id)
        | Interaction::Delete(t, id)
        | Interaction::HistoryInstance(t, id),
    ) = &routed
    {
        entities.push(json!({"what": {"reference": format!("{t}/{id}")}}));
    }
    if let Some(q) = r.query.filter(|q| !q.is_empty()) {
        use base64::Engine;
        entities.push(json!({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
            "query": base64::engine::general_purpose::STANDARD.encode(q),
        }));
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": code}],
        "action": action,
        "recorded": crate::time::format_instant(crate::time::now_micros()),
        "outcome": outcome,
        "outcomeDesc": format!("{} {}{} -> {}", r.method, r.path, r.query.map(|q| format!("?{q}")).unwrap_or_default(), r.status),
        "agent": agents,
        "source": {
            "observer": {"display": "iomt-fhir"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]
        },
    });
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}
