//! The audit trail under `--auth smart`: one AuditEvent (FHIR R4 auditevent.html, shaped as
//! IHE BALP's RESTful-interaction events) per authenticated request and per denied one: who
//! (client, user), for which patient, what interaction on what, the outcome, and the network
//! address. Requests queue their event and go on; a background task writes the queue in
//! batches through the normal write path (so AuditEvents are searchable like any resource),
//! and a full queue makes requests wait rather than lose events. Under `--auth smart` the
//! API cannot create, change or delete AuditEvents.
//!
//! A request queues a compact [`Record`], not JSON; a successful GET read (read, vread,
//! search, history) with a token is instead counted in the [`Ledger`], under its token,
//! address and target, so a read of something already read in this second allocates
//! nothing and queues nothing. The writer takes the queue and the ledger at most once a
//! second; successful reads that share a token, address and interaction are coalesced into
//! one event listing each resource or query they touched once as an entity (at most
//! [`ENTITIES`] per event; more make more events), with the first and last time as
//! `period` and the number of requests; so are requests refused for want of a valid token
//! (401: anyone can send them, as fast as they like), per address and interaction. Other
//! denials and writes always get an event of their own. Under light load every request has
//! its own event.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::auth::access::Grant;
use crate::interaction::{Ctx, Interaction, Method, SharedCtx, create, new_id, write};
use crate::time::Micros;

/// Events waiting to be written, at most.
const QUEUE: usize = 200_000;
/// Records taken from the queue at once, at most (one write a second must keep up with
/// the fastest reads).
const BATCH: usize = 100_000;
/// Entities in one coalesced event, at most.
pub const ENTITIES: usize = 100;

pub struct Audit {
    tx: mpsc::Sender<Record>,
    rx: Mutex<Option<mpsc::Receiver<Record>>>,
    /// The ledger in shards, one per request thread (by [`shard`]), merged when taken: a
    /// read counts under its own thread's lock and in memory that thread alone writes, so
    /// the request threads do not pass one lock word and one map back and forth.
    reads: Box<[Shard]>,
    /// Tells the writer the ledger is no longer empty.
    wake: tokio::sync::Notify,
}

/// One shard of the ledger, on cache lines of its own.
#[derive(Default)]
#[repr(align(128))]
struct Shard(Mutex<Ledger>);

impl Default for Audit {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        // Twice the cores: tokio's workers plus blocking threads rarely share a shard.
        let shards = std::thread::available_parallelism().map_or(2, |n| n.get() * 2);
        Audit {
            tx,
            rx: Mutex::new(Some(rx)),
            reads: (0..shards.min(64)).map(|_| Shard::default()).collect(),
            wake: tokio::sync::Notify::new(),
        }
    }
}

/// This thread's number, for picking its ledger shard.
fn shard() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    MINE.with(|n| *n)
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Successful GET reads with a token since the last write, counted per caller (token and
/// address) and target: what [`Record`]s of them would say once coalesced, without a
/// record per request.
#[derive(Default)]
struct Ledger {
    callers: FastMap<(u64, Option<IpAddr>), Caller>,
    /// Distinct (caller, target) entries, bounded by [`QUEUE`] like the queue (each shard
    /// by its part of it).
    entries: usize,
}

struct Caller {
    /// One copy of the grant (they share the `origin` that keys the caller).
    grant: Arc<Grant>,
    address: Option<IpAddr>,
    /// Target (path and query) -> its reads, in the order first seen.
    targets: FastMap<Box<str>, Reads>,
}

/// The reads of one target by one caller.
struct Reads {
    order: usize,
    first: Micros,
    last: Micros,
    count: usize,
    /// The first read's status (what an event for a single read tells).
    status: u16,
}

impl Reads {
    /// Adds the reads another shard counted of the same target by the same caller.
    fn absorb(&mut self, other: Reads) {
        if other.first < self.first {
            self.status = other.status;
        }
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.count += other.count;
    }
}

impl Audit {
    /// Counts a successful GET of `target` under `grant` in the ledger, if it is a read
    /// that would be coalesced; `false`: it was not counted (not a read, or the ledger is
    /// full), and the caller queues a [`Record`] instead.
    pub fn read(
        &self,
        defs: &crate::definitions::Definitions,
        grant: &Arc<Grant>,
        address: Option<IpAddr>,
        target: &str,
        status: u16,
        at: Micros,
    ) -> bool {
        let key = (grant.origin.0, address);
        let shard = &self.reads[shard() % self.reads.len()].0;
        {
            let mut ledger = shard.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = ledger
                .callers
                .get_mut(&key)
                .and_then(|c| c.targets.get_mut(target))
            {
                r.last = r.last.max(at);
                r.count += 1;
                return true;
            }
        }
        // First read of this target in this second: is it a read at all? (Routed outside
        // the lock.)
        let reading =
            route_target(defs, Method::Get, target).is_some_and(|i| is_reading(subtype(&i)));
        if !reading {
            return false;
        }
        let mut ledger = shard.lock().unwrap_or_else(|p| p.into_inner());
        if ledger.entries >= QUEUE / self.reads.len() {
            return false;
        }
        let was_empty = ledger.entries == 0;
        let caller = ledger.callers.entry(key).or_insert_with(|| Caller {
            grant: grant.clone(),
            address,
            targets: FastMap::default(),
        });
        let order = caller.targets.len();
        let mut added = false;
        let r = caller.targets.entry(target.into()).or_insert_with(|| {
            added = true;
            Reads {
                order,
                first: at,
                last: at,
                count: 0,
                status,
            }
        });
        r.first = r.first.min(at);
        r.last = r.last.max(at);
        r.count += 1;
        if added {
            ledger.entries += 1;
        }
        drop(ledger);
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// What the ledger holds, as records (each with its last time and number of requests);
    /// the ledger starts again empty. The shards' counts of one caller and target are
    /// merged, and each caller's targets come in the order first read.
    fn take_reads(&self) -> Vec<Counted> {
        let mut callers: FastMap<(u64, Option<IpAddr>), Caller> = FastMap::default();
        let mut entries = 0;
        for shard in &self.reads {
            // Drained in place: a caller that keeps reading keeps its table, which the next
            // window fills again without growing it (or touching fresh memory). A caller
            // with no reads in a whole window is forgotten.
            let taken: Vec<_> = {
                let mut ledger = shard.0.lock().unwrap_or_else(|p| p.into_inner());
                ledger.entries = 0;
                ledger.callers.retain(|_, c| !c.targets.is_empty());
                ledger
                    .callers
                    .iter_mut()
                    .map(|(key, c)| {
                        let targets: Vec<(Box<str>, Reads)> = c.targets.drain().collect();
                        (*key, c.grant.clone(), c.address, targets)
                    })
                    .collect()
            };
            for (key, grant, address, targets) in taken {
                let Some(merged) = callers.get_mut(&key) else {
                    entries += targets.len();
                    callers.insert(
                        key,
                        Caller {
                            grant,
                            address,
                            targets: targets.into_iter().collect(),
                        },
                    );
                    continue;
                };
                for (target, r) in targets {
                    match merged.targets.get_mut(&target) {
                        Some(m) => m.absorb(r),
                        None => {
                            entries += 1;
                            merged.targets.insert(target, r);
                        }
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(entries);
        for caller in callers.into_values() {
            let mut targets: Vec<(Box<str>, Reads)> = caller.targets.into_iter().collect();
            targets.sort_by_key(|(_, r)| (r.first, r.order));
            for (target, r) in targets {
                out.push(Counted {
                    record: Record {
                        at: r.first,
                        method: Method::Get,
                        target: target.into(),
                        status: r.status,
                        grant: Some(caller.grant.clone()),
                        address: caller.address,
                    },
                    last: r.last,
                    count: r.count,
                });
            }
        }
        out
    }

    /// Queues an event; waits only when the queue is full.
    pub async fn record(&self, record: Record) {
        if let Err(mpsc::error::TrySendError::Full(e)) = self.tx.try_send(record) {
            let _ = self.tx.send(e).await;
        }
    }

    /// The receiving end, once (for [`run`]).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<Record>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Time between two audit writes at most once per this interval: every commit makes the
/// SQLite readers drop their page caches, so a steady trickle of small audit commits slows
/// every read; one commit a second does not.
const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes queued events (within about [`INTERVAL`]) and the ledger's reads (once per
/// `--audit-read-window`) until `stop`, then what is still queued or counted.
///
/// Queued records (writes, denials) wait at most about a second. Counted reads wait until
/// their window ends: what a window costs to write (its events, their index rows, one
/// commit) depends on how many distinct resources and queries were read in it, not on how
/// many reads, so a longer window writes a polling dashboard's reads once where a
/// one-second window wrote them again every second.
pub async fn run(
    ctx: SharedCtx,
    mut rx: mpsc::Receiver<Record>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let window = ctx.auth.audit_read_window.max(INTERVAL);
    let start = tokio::time::Instant::now();
    let mut last = start - INTERVAL;
    // Reads counted after a quiet window are written at the next tick.
    let mut reads_last = start - window;
    // The ledger told us it holds reads, not yet taken.
    let mut reads_pending = false;
    let mut batch = Vec::new();
    let mut stopping = false;
    while !stopping {
        // Idle (nothing queued or counted): wait for a record or the ledger's first read.
        if batch.is_empty() && !reads_pending {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => batch.push(counted(e)),
                    None => break,
                },
                _ = ctx.audit.wake.notified() => reads_pending = true,
                _ = stop.changed() => break,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(last + INTERVAL) => {}
            _ = stop.changed() => stopping = true,
        }
        last = tokio::time::Instant::now();
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(counted(e)),
                Err(_) => break,
            }
        }
        if reads_pending && last >= reads_last + window {
            batch.extend(ctx.audit.take_reads());
            reads_last = last;
            reads_pending = false;
        }
        if !batch.is_empty() {
            write_batch(&ctx, std::mem::take(&mut batch)).await;
        }
    }
    // Shutting down: nothing queued or counted is dropped.
    let mut rest = batch;
    rest.extend(ctx.audit.take_reads());
    while let Ok(e) = rx.try_recv() {
        rest.push(counted(e));
        if rest.len() >= BATCH {
            write_batch(&ctx, std::mem::take(&mut rest)).await;
        }
    }
    if !rest.is_empty() {
        write_batch(&ctx, rest).await;
    }
}

/// A record standing for `count` requests like it, the last at `last`.
struct Counted {
    record: Record,
    last: Micros,
    count: usize,
}

/// One queued request.
fn counted(record: Record) -> Counted {
    Counted {
        last: record.at,
        record,
        count: 1,
    }
}

async fn write_batch(ctx: &SharedCtx, records: Vec<Counted>) {
    // Tens of thousands of records take milliseconds to coalesce: off the request workers.
    let c = ctx.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let mut prepared = Vec::new();
        for e in events(&c, records) {
            let id = new_id();
            match write::prepare_with_id(&c, e, &id) {
                Ok(p) => prepared.push((id, p)),
                Err(err) => tracing::error!(error = %err, "an AuditEvent could not be prepared"),
            }
        }
        prepared
    })
    .await;
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "preparing AuditEvents failed");
            return;
        }
    };
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
pub struct Record {
    pub at: Micros,
    pub method: Method,
    /// The request target, path and query (`/fhir/Patient/1?...`), copied: a `Uri`
    /// clone would share, and keep alive, the connection's whole read buffer.
    pub target: String,
    pub status: u16,
    /// `None`: no valid token (a 401).
    pub grant: Option<Arc<Grant>>,
    pub address: Option<IpAddr>,
}

impl Record {
    fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
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

/// What a request touched: a resource, or a query.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Entity {
    Resource(String),
    Query(String),
}

impl Entity {
    fn to_json(&self) -> Value {
        match self {
            Entity::Resource(r) => json!({"what": {"reference": r}}),
            Entity::Query(q) => {
                use base64::Engine;
                json!({
                    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                    "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
                    "query": base64::engine::general_purpose::STANDARD.encode(q),
                })
            }
        }
    }
}

/// A record, understood: its interaction code and the entities it touched.
struct Seen {
    code: &'static str,
    entities: Vec<Entity>,
}

/// The interaction a request target (`/fhir/...`, its query ignored) routes to.
fn route_target(
    defs: &crate::definitions::Definitions,
    method: Method,
    target: &str,
) -> Option<Interaction> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let path = path.strip_prefix(crate::rest::FHIR_PREFIX)?;
    crate::interaction::route(defs, method, &crate::interaction::split_path(path)).ok()
}

fn understand(ctx: &Ctx, r: &Record) -> Seen {
    let routed = route_target(ctx.defs, r.method, &r.target);
    let code = routed.as_ref().map_or("operation", subtype);
    let mut entities = Vec::new();
    if let Some(
        Interaction::Read(t, id)
        | Interaction::Vread(t, id, _)
        | Interaction::Update(t, id)
        | Interaction::Patch(t, id)
        | Interaction::Delete(t, id)
        | Interaction::HistoryInstance(t, id),
    ) = &routed
    {
        entities.push(Entity::Resource(format!("{t}/{id}")));
    }
    if let Some(q) = r.query().filter(|q| !q.is_empty()) {
        entities.push(Entity::Query(q.to_string()));
    }
    Seen { code, entities }
}

/// The entities of one batch, each once.
#[derive(Default)]
struct Entities {
    table: Vec<Entity>,
    index: HashMap<Entity, usize>,
}

impl Entities {
    /// `r`'s interaction code and its entities' indexes in `table`.
    fn understand(&mut self, ctx: &Ctx, r: &Record) -> (&'static str, Vec<usize>) {
        let seen = understand(ctx, r);
        let ids = seen
            .entities
            .into_iter()
            .map(|e| {
                *self.index.entry(e).or_insert_with_key(|e| {
                    self.table.push(e.clone());
                    self.table.len() - 1
                })
            })
            .collect();
        (seen.code, ids)
    }
}

/// Successful reads of one caller (token), address and interaction in one batch.
struct Group {
    /// The earliest request's record.
    first: usize,
    last: Micros,
    requests: usize,
    /// Each resource or query once (indexes into the batch's entity table), in the order
    /// first seen.
    entities: Vec<usize>,
    seen: std::collections::HashSet<usize>,
}

/// The interaction codes whose successful requests are coalesced.
fn is_reading(code: &str) -> bool {
    matches!(
        code,
        "read"
            | "vread"
            | "search-type"
            | "search-system"
            | "history-instance"
            | "history-type"
            | "history-system"
    )
}

/// Turns queued records into AuditEvents. Successful reads of one token from one address
/// with one interaction code become one event per [`ENTITIES`] distinct resources or queries
/// they touched (each listed once however often it was read), with the period they span
/// and how many requests they were; everything else gets an event of its own. Reads repeat
/// (dashboards poll the same resources), so each distinct GET target is routed once.
fn events(ctx: &Ctx, records: Vec<Counted>) -> Vec<Value> {
    // Every entity of the batch once; records refer to them by index.
    let mut entities = Entities::default();
    let mut routed: HashMap<&str, (&'static str, Vec<usize>)> = HashMap::new();
    // Keyed by the grant's origin (shared by every thread's copy of one token's grant; 0
    // for requests without a valid token), the address and the interaction.
    let mut groups: HashMap<(u64, Option<IpAddr>, &'static str), Group> = HashMap::new();
    let mut out = Vec::new();
    for (i, c) in records.iter().enumerate() {
        let r = &c.record;
        let own;
        let (code, ids): (&'static str, &[usize]) = if matches!(r.method, Method::Get) {
            // Routed once per distinct target; later requests borrow the answer.
            let (code, ids) = routed
                .entry(r.target.as_str())
                .or_insert_with(|| entities.understand(ctx, r));
            (code, ids)
        } else {
            own = entities.understand(ctx, r);
            (own.0, &own.1)
        };
        let caller = match r.grant.as_ref() {
            Some(grant) if is_reading(code) && r.status < 400 => grant.origin.0,
            // Refused for want of a valid token: anyone can send these, as fast as they
            // like, so they are coalesced too (per address and interaction; origins start
            // at 1), and a flood of them costs a few events a second, not one per request.
            None if r.status == 401 => 0,
            _ => {
                let entities = ids.iter().map(|&e| entities.table[e].to_json()).collect();
                out.push(event(ctx, r, code, entities, None, 1, None));
                continue;
            }
        };
        let group = groups
            .entry((caller, r.address, code))
            .or_insert_with(|| Group {
                first: i,
                last: c.last,
                requests: 0,
                entities: Vec::new(),
                seen: Default::default(),
            });
        if r.at < records[group.first].record.at {
            group.first = i;
        }
        group.last = group.last.max(c.last);
        group.requests += c.count;
        for &e in ids {
            if group.seen.insert(e) {
                group.entities.push(e);
            }
        }
    }
    for ((_, _, code), g) in groups {
        let first = &records[g.first].record;
        let period = Some((first.at, g.last));
        let parts = g.entities.len().div_ceil(ENTITIES).max(1);
        let mut chunks = g.entities.chunks(ENTITIES);
        for part in 1..=parts {
            let entities = chunks
                .next()
                .map(|c| c.iter().map(|&e| entities.table[e].to_json()).collect())
                .unwrap_or_default();
            let of = (parts > 1).then_some((part, parts));
            out.push(event(ctx, first, code, entities, period, g.requests, of));
        }
    }
    out
}

/// One AuditEvent for `r` (and `count - 1` like it, coalesced, between `period`).
fn event(
    ctx: &Ctx,
    r: &Record,
    code: &'static str,
    mut entities: Vec<Value>,
    period: Option<(Micros, Micros)>,
    count: usize,
    part: Option<(usize, usize)>,
) -> Value {
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
    let network = r
        .address
        .map(|a| json!({"address": a.to_string(), "type": "2"}));
    let g = r.grant.as_deref();
    let mut client = match g {
        Some(g) => json!({
            "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110150", "display": "Application"}]},
            "who": {"identifier": {"system": format!("{}/auth/clients", crate::auth::oauth::origin(ctx)), "value": g.client_id}},
            "requestor": g.fhir_user.is_none(),
        }),
        None => json!({"who": {"display": "unauthenticated caller"}, "requestor": true}),
    };
    if let Some(n) = network {
        client["network"] = n;
    }
    let mut agents = vec![client];
    if let Some(user) = g.and_then(|g| g.fhir_user.as_deref()) {
        agents.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient"}]},
            "who": {"reference": user},
            "requestor": true,
        }));
    }
    if let Some(p) = g.and_then(|g| g.patient.as_deref()) {
        entities.insert(0, json!({
            "what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}
        }));
    }
    let description = if count > 1 || part.is_some() {
        let part = part
            .map(|(i, n)| format!(" (what they read: part {i} of {n})"))
            .unwrap_or_default();
        if r.status >= 400 {
            format!(
                "{count} {code} requests, all refused with {}{part}",
                r.status
            )
        } else {
            format!("{count} {code} requests, all answered without error{part}")
        }
    } else {
        format!(
            "{:?} {}{} -> {}",
            r.method,
            r.path(),
            r.query().map(|q| format!("?{q}")).unwrap_or_default(),
            r.status
        )
    };
    let mut event = json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": code}],
        "action": action,
        "recorded": crate::time::format_instant(r.at),
        "outcome": outcome,
        "outcomeDesc": description,
        "agent": agents,
        "source": {
            "observer": {"display": "iomt-fhir"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]
        },
    });
    if let Some((first, last)) = period {
        event["period"] = json!({
            "start": crate::time::format_instant(first),
            "end": crate::time::format_instant(last),
        });
    }
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Arc<Grant> {
        Arc::new(Grant {
            client_id: "c".into(),
            scopes: Vec::new(),
            scope_text: String::new(),
            patient: None,
            encounter: None,
            fhir_user: None,
            issued_at: 0,
            expires_at: i64::MAX,
            verdicts: Default::default(),
            origin: crate::auth::access::Origin::new(),
        })
    }

    #[test]
    fn reads_counted_on_several_threads_come_out_merged() {
        let defs = crate::definitions::Definitions::get().expect("definitions");
        let audit = Audit::default();
        let (g, other) = (grant(), grant());
        let a = "/fhir/Observation/a";
        let address = Some(IpAddr::from([127, 0, 0, 1]));
        std::thread::scope(|s| {
            for t in 0..4i64 {
                let (audit, g) = (&audit, &g);
                s.spawn(move || {
                    for i in 0..10 {
                        assert!(audit.read(defs, g, address, a, 200, 100 + t * 10 + i));
                    }
                });
            }
        });
        assert!(audit.read(defs, &g, address, "/fhir/Observation/b", 200, 5));
        assert!(audit.read(defs, &other, address, a, 200, 7));
        // Not a read: queued as a record of its own instead.
        assert!(!audit.read(defs, &g, address, "/fhir/Observation/a/$validate", 200, 8));
        let mut out = audit.take_reads();
        out.sort_by_key(|c| (c.record.grant.as_ref().map(|g| g.origin.0), c.record.at));
        let summary: Vec<(u64, &str, Micros, Micros, usize)> = out
            .iter()
            .map(|c| {
                let origin = c.record.grant.as_ref().map_or(0, |g| g.origin.0);
                (origin, &*c.record.target, c.record.at, c.last, c.count)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (g.origin.0, "/fhir/Observation/b", 5, 5, 1),
                (g.origin.0, a, 100, 139, 40),
                (other.origin.0, a, 7, 7, 1),
            ]
        );
        assert!(audit.take_reads().is_empty(), "taken means emptied");
    }
}
