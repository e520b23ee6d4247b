//! batch and transaction (FHIR R4 http.html#transaction, bundle.html#transaction).
//!
//! A transaction is one database transaction: every entry succeeds or nothing is written.
//! Entries run in the spec's order (DELETE, POST, PUT/PATCH, GET); `urn:uuid:` fullUrls and
//! conditional references (`Patient?identifier=...`) are rewritten to the ids the server
//! assigned, everywhere in the bundle. When a bundle has no conditional parts (the common
//! case, e.g. Synthea), ids are assigned and resources validated, rewritten and serialised
//! before the transaction starts, so the database transaction itself only writes. When it
//! has conditions (HL7 v2 messages, feeds), the same work is done speculatively with the ids
//! a reader resolves ([`speculate`]); the transaction resolves them again and keeps that work
//! only if every id agrees.
//!
//! A batch runs each entry as its own request through [`crate::interaction::handle`].

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::error::{ErrorKind, FhirError, Result};
use crate::interaction::bundle_text::BundleText;
use crate::interaction::create::{Created, create_in};
use crate::interaction::delete::{conditional_delete_in, delete_in};
use crate::interaction::patch::patch_in;
use crate::interaction::update::update_in;
use crate::interaction::{
    Body, Ctx, FhirRequest, FhirResponse, Interaction, Method, RequestBody, Return, SharedCtx,
    new_id, route, write,
};
use crate::store::Db;
use crate::store::resource::Prepared;

/// One parsed Bundle entry.
struct Entry {
    index: usize,
    full_url: Option<String>,
    req: FhirRequest,
    interaction: Interaction,
    /// The condition of a conditional update or create (`ifNoneExist`), and when it is one
    /// `parameter=system|code` on a token parameter, its parts (see [`token_condition`]).
    /// Worked out by [`plan`], outside the writer.
    condition: Option<String>,
    token: Option<TokenCondition>,
}

/// `(type, parameter, system, code)`.
type TokenCondition = (String, String, String, String);

/// Where an entry's resource stands on its way to storage.
enum Payload {
    None,
    /// Checked, references not yet rewritten (needs the database to resolve).
    Raw(Value),
    Prepared(Prepared),
    /// Found identical to the stored current version outside the writer (see [`speculate`]):
    /// no new version is written while that version is still current.
    Unchanged(Box<Unchanged>),
}

struct Unchanged {
    version: i64,
    last_updated: i64,
    /// The stored text.
    body: String,
    /// The resource with its references rewritten, to prepare if another version is current.
    resource: Value,
}

/// What one entry did, for the response Bundle.
struct Outcome {
    status: &'static str,
    location: Option<String>,
    version: Option<i64>,
    last_modified: Option<i64>,
    resource: Option<String>,
}

fn entry_error(index: usize, e: FhirError) -> FhirError {
    let mut e = e;
    for issue in &mut e.issues {
        issue.diagnostics = format!("Bundle.entry[{index}]: {}", issue.diagnostics);
        if issue.expression.is_empty() {
            issue.expression.push(format!("Bundle.entry[{index}]"));
        }
    }
    e
}

/// `POST [base]` with a batch or transaction Bundle.
pub async fn bundle(ctx: &SharedCtx, req: &mut FhirRequest) -> Result<FhirResponse> {
    let bundle = req.take_resource()?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::invalid("POST to the base needs a Bundle").at("resourceType"));
    }
    let kind = bundle
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind != "transaction" && kind != "batch" {
        return Err(FhirError::invalid(format!(
            "Bundle.type must be transaction or batch, not {kind:?}"
        ))
        .at("Bundle.type"));
    }
    let raw_entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => {
            return Err(FhirError::invalid("Bundle.entry must be an array").at("Bundle.entry"));
        }
    };
    if raw_entries.len() > ctx.limits.max_bundle_entries {
        return Err(FhirError::new(
            ErrorKind::TooLarge,
            format!(
                "the Bundle has {} entries; this server takes at most {}",
                raw_entries.len(),
                ctx.limits.max_bundle_entries
            ),
        ));
    }
    let mut entries = Vec::with_capacity(raw_entries.len());
    for (index, e) in raw_entries.into_iter().enumerate() {
        match parse_entry(ctx, index, e) {
            Ok(entry) => entries.push(Ok(entry)),
            Err(err) if kind == "batch" => entries.push(Err(err)),
            Err(err) => return Err(err),
        }
    }
    if kind == "batch" {
        // Each entry is its own interaction, authorized as one.
        for e in entries.iter_mut().flatten() {
            e.req.grant = req.grant.clone();
        }
        return batch(ctx, entries, req.prefer_return).await;
    }
    let entries: Vec<Entry> = entries.into_iter().collect::<Result<_>>()?;
    if let Some(grant) = &req.grant {
        for e in &entries {
            authorize_transaction_entry(grant, e).map_err(|err| entry_error(e.index, err))?;
        }
    }
    transaction(ctx, entries, req.prefer_return).await
}

/// A transaction runs its entries in one database transaction, past the per-request checks:
/// under a token, every entry must pass the scope check and its type must be open to the
/// token without restriction (a restricted token uses a batch, whose entries are checked
/// one by one).
fn authorize_transaction_entry(grant: &crate::auth::access::Grant, e: &Entry) -> Result<()> {
    use crate::auth::scope::Perms;
    use Interaction as I;
    crate::auth::access::check(grant, &e.interaction, &e.req.query)?;
    let (ty, perms) = match &e.interaction {
        I::Create(t) => (t, Perms::C),
        I::Update(t, _) | I::Patch(t, _) | I::ConditionalUpdate(t) | I::ConditionalPatch(t) => {
            (t, Perms::U)
        }
        I::Delete(t, _) | I::ConditionalDelete(t) => (t, Perms::D),
        I::Read(t, _) | I::Vread(t, _, _) | I::HistoryInstance(t, _) => (t, Perms::R),
        I::SearchType(t) | I::HistoryType(t) => (t, Perms::S),
        other => {
            return Err(FhirError::new(
                crate::error::ErrorKind::Forbidden,
                format!("{other:?} is not allowed inside a transaction under an access token"),
            ));
        }
    };
    if grant.unrestricted(ty, perms) {
        Ok(())
    } else {
        Err(FhirError::new(
            crate::error::ErrorKind::Forbidden,
            format!("a transaction needs unrestricted scopes on {ty}; send a batch instead"),
        ))
    }
}

fn parse_entry(ctx: &Ctx, index: usize, mut e: Value) -> Result<Entry> {
    let at = |m: &str| entry_error(index, FhirError::invalid(m.to_string()));
    // Moved out, not copied: the entry is ours.
    let resource = e.get_mut("resource").map(Value::take);
    let request = e
        .get("request")
        .ok_or_else(|| at("entry.request is required in a batch or transaction"))?;
    let method = Method::parse(
        request
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| at("entry.request.url is required"))?;
    let url = url
        .strip_prefix(ctx.base.as_str())
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let segments = crate::interaction::split_path(path);
    let query = crate::interaction::parse_query(query);
    let mut req = FhirRequest::new(method, segments, query);
    let text = |k: &str| request.get(k).and_then(Value::as_str).map(str::to_string);
    req.if_match = text("ifMatch");
    req.if_none_match = text("ifNoneMatch");
    req.if_none_exist = text("ifNoneExist");
    req.if_modified_since = text("ifModifiedSince")
        .and_then(|s| crate::search::extract::parse_fhir_date_range(&s))
        .map(|r| r.0);
    req.body = match (method, resource) {
        (Method::Patch, Some(binary)) => {
            RequestBody::JsonPatch(patch_from_binary(&binary).map_err(|m| at(&m))?)
        }
        (_, Some(r)) => RequestBody::Resource(r),
        (_, None) => RequestBody::None,
    };
    let interaction = route(ctx.defs, method, &req.segments).map_err(|e| entry_error(index, e))?;
    if ctx.auth.enabled() {
        crate::interaction::server_written(&interaction).map_err(|e| entry_error(index, e))?;
    }
    let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_string);
    Ok(Entry {
        index,
        full_url,
        req,
        interaction,
        condition: None,
        token: None,
    })
}

/// A JSON Patch travels in a Bundle as a Binary (http.html#patch).
fn patch_from_binary(binary: &Value) -> std::result::Result<Value, String> {
    use base64::Engine as _;
    if binary.get("resourceType").and_then(Value::as_str) != Some("Binary") {
        return Err("a PATCH entry carries its JSON Patch as a Binary resource".into());
    }
    let data = binary
        .get("data")
        .and_then(Value::as_str)
        .ok_or("the Binary has no data")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("Binary.data is not base64: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("Binary.data is not a JSON Patch: {e}"))
}

async fn batch(
    ctx: &SharedCtx,
    entries: Vec<Result<Entry>>,
    ret: Option<Return>,
) -> Result<FhirResponse> {
    let mut b = BundleText::new("batch-response", None, &[]);
    for entry in entries {
        let result = match entry {
            Ok(e) if e.interaction == Interaction::Bundle => Err(entry_error(
                e.index,
                FhirError::invalid("a batch entry cannot be another Bundle"),
            )),
            Ok(mut e) => {
                if e.req.prefer_return.is_none() {
                    e.req.prefer_return = Some(ret.unwrap_or(Return::Minimal));
                }
                let index = e.index;
                Box::pin(crate::interaction::handle(ctx, e.req))
                    .await
                    .map_err(|err| entry_error(index, err))
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(r) => write_response_entry(&mut b, ctx, &r),
            Err(e) => b.entry(
                None,
                None,
                &[(
                    "response",
                    json!({
                        "status": status_line(e.status()),
                        "outcome": e.to_operation_outcome(),
                    }),
                )],
            ),
        }
    }
    Ok(raw_bundle(b))
}

fn raw_bundle(b: BundleText) -> FhirResponse {
    FhirResponse {
        body: Body::Raw(b.finish()),
        ..FhirResponse::json(200, Value::Null)
    }
}

/// `Bundle.entry.response` (bundle.html#BundleEntryResponse) and the entry's fullUrl.
fn entry_response(
    ctx: &Ctx,
    status: String,
    location: Option<&str>,
    version: Option<i64>,
    last_modified: Option<i64>,
) -> (Value, Option<String>) {
    let mut response = json!({ "status": status });
    if let Some(l) = location {
        response["location"] = Value::String(l.to_string());
    }
    if let Some(v) = version {
        response["etag"] = Value::String(format!("W/\"{v}\""));
    }
    if let Some(t) = last_modified {
        response["lastModified"] = Value::String(crate::time::format_instant(t));
    }
    let full_url = location
        .and_then(|l| l.split("/_history").next())
        .map(|l| format!("{}/{l}", ctx.base));
    (response, full_url)
}

fn write_response_entry(b: &mut BundleText, ctx: &Ctx, r: &FhirResponse) {
    let (mut response, full_url) = entry_response(
        ctx,
        status_line(r.status),
        r.location.as_deref(),
        r.version,
        r.last_modified,
    );
    let body = match &r.body {
        Body::Raw(s) => Some(s.clone()),
        Body::Json(v) if r.status < 300 => Some(v.to_string()),
        Body::Json(v) => {
            response["outcome"] = v.clone();
            None
        }
        Body::None | Body::Bytes(..) => None,
    };
    b.entry(
        full_url.as_deref(),
        body.as_deref(),
        &[("response", response)],
    );
}

fn status_line(status: u16) -> String {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("{status} {reason}").trim_end().to_string()
}

fn processing_order(i: &Interaction) -> u8 {
    use Interaction as I;
    match i {
        I::Delete(..) | I::ConditionalDelete(_) => 0,
        I::Create(_) => 1,
        I::Update(..) | I::ConditionalUpdate(_) | I::Patch(..) | I::ConditionalPatch(_) => 2,
        _ => 3,
    }
}

/// Rewrites references through `ids` (fullUrl → `Type/id`).
fn rewrite(v: &mut Value, ids: &HashMap<String, String>) -> Result<()> {
    write::walk_references(v, &mut |r| {
        if let Some(new) = ids.get(r.as_str()) {
            *r = new.clone();
        } else if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
            return Err(FhirError::invalid(format!(
                "the reference {r:?} names no entry of this Bundle"
            )));
        }
        Ok(())
    })
}

/// Checks every entry and refuses what a transaction cannot hold, before any write.
/// Returns each entry's payload and whether resolving ids needs the database.
fn plan(ctx: &Ctx, entries: &mut [Entry]) -> Result<(Vec<Payload>, bool)> {
    use Interaction as I;
    // Check every resource and refuse what a transaction cannot hold, before any write.
    let mut payloads: Vec<Payload> = Vec::with_capacity(entries.len());
    let mut needs_db = false;
    let mut targets = std::collections::HashSet::new();
    for e in entries.iter_mut() {
        let index = e.index;
        let payload = match &e.interaction {
            I::Create(t) | I::ConditionalUpdate(t) | I::Update(t, _) => {
                let url_id = match &e.interaction {
                    I::Update(_, id) => Some(id.clone()),
                    _ => None,
                };
                let mut r = e
                    .req
                    .take_resource()
                    .map_err(|err| entry_error(index, err))?;
                write::check(ctx, t, &mut r, url_id.as_deref())
                    .map_err(|err| entry_error(index, err))?;
                needs_db |= write::has_conditional_reference(&r);
                Payload::Raw(r)
            }
            I::Patch(..) | I::ConditionalPatch(_) => {
                if !matches!(e.req.body, RequestBody::JsonPatch(_)) {
                    return Err(entry_error(
                        index,
                        FhirError::invalid("a PATCH entry needs a JSON Patch"),
                    ));
                }
                Payload::None
            }
            I::Delete(..)
            | I::ConditionalDelete(_)
            | I::Read(..)
            | I::Vread(..)
            | I::SearchType(_) => Payload::None,
            other => {
                return Err(entry_error(
                    index,
                    FhirError::not_supported(format!("{other:?} cannot be part of a transaction")),
                ));
            }
        };
        needs_db |= e.req.if_none_exist.is_some()
            || matches!(
                e.interaction,
                I::ConditionalUpdate(_) | I::ConditionalDelete(_) | I::ConditionalPatch(_)
            );
        // The spec forbids two entries writing the same resource.
        if let I::Update(t, id) | I::Delete(t, id) | I::Patch(t, id) = &e.interaction
            && !targets.insert(format!("{t}/{id}"))
        {
            return Err(entry_error(
                index,
                FhirError::invalid(format!("{t}/{id} appears twice in the transaction")),
            ));
        }
        e.condition = match &e.interaction {
            I::ConditionalUpdate(_) => crate::interaction::update::condition_query(&e.req).ok(),
            I::Create(_) => e.req.if_none_exist.clone(),
            _ => None,
        };
        e.token = token_condition(ctx, e);
        payloads.push(payload);
    }
    Ok((payloads, needs_db))
}

/// A transaction Bundle checked and validated outside any database transaction, ready for
/// [`run_planned`].
pub struct Planned {
    entries: Vec<Entry>,
    payloads: Vec<Payload>,
    speculation: Option<Speculation>,
}

/// Ids a transaction's conditions resolved to on a reader, outside the writer, with every
/// payload already rewritten and prepared for them (see [`speculate`]).
struct Speculation {
    ids: Vec<Option<String>>,
    fresh: Vec<bool>,
    /// `Prepared` or `Unchanged`, by entry.
    prepared: Vec<Option<Payload>>,
}

/// Parses and validates a transaction Bundle without touching the database: the CPU work
/// that should not run inside the single SQLite writer.
pub fn plan_bundle(ctx: &Ctx, mut bundle: Value) -> Result<Planned> {
    let raw_entries = match bundle.get_mut("entry").map(Value::take) {
        Some(Value::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let mut entries = Vec::with_capacity(raw_entries.len());
    for (index, e) in raw_entries.into_iter().enumerate() {
        entries.push(parse_entry(ctx, index, e)?);
    }
    let (payloads, _) = plan(ctx, &mut entries)?;
    Ok(Planned {
        entries,
        payloads,
        speculation: None,
    })
}

/// Resolves the planned transaction's conditions on a reader and prepares every payload for
/// the ids found, so that this CPU work runs outside the single writer. The writer resolves
/// again and uses the result only if every id agrees ([`run`]): a concurrent write costs
/// time, never correctness.
pub async fn speculate(ctx: &Ctx, planned: &mut Planned) {
    planned.speculation = speculation(ctx, &planned.entries, &planned.payloads).await;
}

async fn speculation(ctx: &Ctx, entries: &[Entry], payloads: &[Payload]) -> Option<Speculation> {
    fn raw(p: &Payload) -> Option<&Value> {
        match p {
            Payload::Raw(r) => Some(r),
            _ => None,
        }
    }
    // Conditional references resolve inside the writer only.
    if payloads.iter().filter_map(raw).next().is_none()
        || payloads
            .iter()
            .filter_map(raw)
            .any(write::has_conditional_reference)
    {
        return None;
    }
    use Interaction as I;
    let order = processing_sequence(entries);
    let mut db = ctx.store.reader().await.ok()?;
    let resolved = resolve_ids(&mut db, ctx, entries, payloads, &order, false, &mut |_| {
        new_id()
    })
    .await
    .ok()?;
    // The current versions of what already exists: most updates from a feed (its patient,
    // devices, metrics) change nothing, and need neither a search index nor a write.
    let existing = |i: usize| match (&entries[i].interaction, &resolved.ids[i]) {
        (I::Update(t, _) | I::ConditionalUpdate(t), Some(id))
            if !resolved.fresh[i] && entries[i].req.if_match.is_none() =>
        {
            Some((t.clone(), id.clone()))
        }
        _ => None,
    };
    let keys: Vec<(String, String)> = (0..entries.len()).filter_map(existing).collect();
    let currents = if keys.is_empty() {
        HashMap::new()
    } else {
        db.currents(&keys).await.ok()?
    };
    drop(db);
    let map = full_url_map(entries, &resolved.ids);
    let mut prepared = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let (Some(r), Some(id)) = (raw(p), &resolved.ids[i]) else {
            prepared.push(None);
            continue;
        };
        let mut r = r.clone();
        rewrite(&mut r, &map).ok()?;
        // `prepare_with_id` in two steps: serialise first, and extract the index only for
        // what will be written (extraction ignores the versionId/lastUpdated placeholders).
        let mut resource = write::shape(r, id).ok()?;
        let mut p = crate::store::resource::prepare(&mut resource, Vec::new()).ok()?;
        let current = existing(i).and_then(|k| currents.get(&k));
        if let Some((c, Some(stored))) = current
            && !c.deleted
            && crate::store::resource::finish_body(&p.body, c.version, c.last_updated) == *stored
        {
            prepared.push(Some(Payload::Unchanged(Box::new(Unchanged {
                version: c.version,
                last_updated: c.last_updated,
                body: stored.clone(),
                resource,
            }))));
        } else {
            p.index = write::index(ctx, &resource);
            prepared.push(Some(Payload::Prepared(p)));
        }
    }
    Some(Speculation {
        ids: resolved.ids,
        fresh: resolved.fresh,
        prepared,
    })
}

/// Runs a planned transaction inside the caller's database transaction (used where other
/// rows must commit together with the Bundle's resources, e.g. an HL7 v2 message and what it
/// produced). Returns the location (`Type/id/_history/n`) of every entry that has one.
pub async fn run_planned(db: &mut Db, ctx: &Ctx, planned: Planned) -> Result<Vec<String>> {
    let ids = vec![None; planned.entries.len()];
    let outcomes = run(
        db,
        ctx,
        planned.entries,
        planned.payloads,
        ids,
        planned.speculation,
    )
    .await?;
    Ok(outcomes.into_iter().filter_map(|o| o.location).collect())
}

async fn transaction(
    ctx: &SharedCtx,
    mut entries: Vec<Entry>,
    ret: Option<Return>,
) -> Result<FhirResponse> {
    use Interaction as I;
    let (mut payloads, needs_db) = plan(ctx, &mut entries)?;
    let speculation = if needs_db {
        speculation(ctx, &entries, &payloads).await
    } else {
        None
    };
    // Without conditions, ids are known now: assign, rewrite and serialise outside the
    // database transaction.
    let mut ids: Vec<Option<String>> = vec![None; entries.len()];
    if !needs_db {
        let mut map = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let id = match &e.interaction {
                I::Create(_) => new_id(),
                I::Update(_, id) => id.clone(),
                _ => continue,
            };
            if let (Some(full), I::Create(t) | I::Update(t, _)) = (&e.full_url, &e.interaction) {
                map.insert(full.clone(), format!("{t}/{id}"));
            }
            ids[i] = Some(id);
        }
        for (i, p) in payloads.iter_mut().enumerate() {
            if let (Payload::Raw(r), Some(id)) = (&mut *p, &ids[i]) {
                let mut r = std::mem::take(r);
                rewrite(&mut r, &map).map_err(|err| entry_error(entries[i].index, err))?;
                *p = Payload::Prepared(write::prepare_with_id(ctx, r, id)?);
            }
        }
    }
    let c = ctx.clone();
    let outcomes = ctx
        .store
        .write(move |db| {
            Box::pin(async move { run(db, &c, entries, payloads, ids, speculation).await })
        })
        .await?;
    let mut b = BundleText::new("transaction-response", None, &[]);
    for o in outcomes {
        let (response, full_url) = entry_response(
            ctx,
            o.status.to_string(),
            o.location.as_deref(),
            o.version,
            o.last_modified,
        );
        let body = if ret == Some(Return::Representation) {
            o.resource.as_deref()
        } else {
            None
        };
        b.entry(full_url.as_deref(), body, &[("response", response)]);
    }
    Ok(raw_bundle(b))
}

/// An entry's condition when it is one `parameter=system|code` on a token parameter, the
/// commonest kind (HL7 v2 and device feeds match patients, devices, observations and
/// provenance by identifier or tag).
fn token_condition(ctx: &Ctx, e: &Entry) -> Option<TokenCondition> {
    let (Interaction::ConditionalUpdate(t) | Interaction::Create(t)) = &e.interaction else {
        return None;
    };
    let pairs = crate::interaction::parse_query(e.condition.as_deref()?);
    let [(k, v)] = pairs.as_slice() else {
        return None;
    };
    ctx.registry()
        .get(t, k)
        .filter(|p| p.kind == crate::search::registry::ParamType::Token)?;
    let (system, code) = crate::search::query::single_system_code(v)?;
    Some((t.clone(), k.clone(), system, code))
}

/// Resolves every [`token_condition`] of the transaction in one query instead of one
/// search each. Answers by entry position; entries with any other condition are left to
/// [`write::matching_ids`]. Inside the writer (`lock`), PostgreSQL conditions are locked
/// first, in a fixed order, as the callers of `matching_ids` would.
async fn resolve_token_conditions(
    db: &mut Db,
    entries: &[Entry],
    lock: bool,
) -> Result<HashMap<usize, Vec<String>>> {
    let mut at = Vec::new();
    let mut items = Vec::new();
    let mut conditions = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (Some(token), Some(condition)) = (&e.token, &e.condition) else {
            continue;
        };
        at.push(i);
        items.push(token.clone());
        conditions.push((token.0.clone(), condition.clone()));
    }
    if items.len() < 2 {
        return Ok(HashMap::new());
    }
    if lock {
        if db.is_postgres() {
            conditions.sort();
            conditions.dedup();
            for (t, q) in &conditions {
                db.lock_condition(t, q).await?;
            }
        }
        // Earlier writes of this job must be visible to the conditions.
        db.flush().await?;
    }
    let found = db.ids_by_token(&items, 2).await?;
    Ok(at.into_iter().zip(found).collect())
}

/// The ids a transaction's entries resolve to.
struct ResolvedIds {
    ids: Vec<Option<String>>,
    /// Entries whose id was newly minted (nothing matched).
    fresh: Vec<bool>,
    /// Creates whose `ifNoneExist` matched an existing resource.
    matched: Vec<usize>,
}

/// Entry positions in the spec's processing order.
fn processing_sequence(entries: &[Entry]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| processing_order(&entries[i].interaction));
    order
}

/// Resolves the id of every create and update: conditions are searched (and, inside the
/// writer, locked), unmatched entries get `mint(position)`.
async fn resolve_ids(
    db: &mut Db,
    ctx: &Ctx,
    entries: &[Entry],
    payloads: &[Payload],
    order: &[usize],
    lock: bool,
    mint: &mut (dyn FnMut(usize) -> String + Send),
) -> Result<ResolvedIds> {
    use Interaction as I;
    let mut resolved = resolve_token_conditions(db, entries, lock).await?;
    let mut out = ResolvedIds {
        ids: vec![None; entries.len()],
        fresh: vec![false; entries.len()],
        matched: Vec::new(),
    };
    for &i in order {
        let e = &entries[i];
        let at = |err| entry_error(e.index, err);
        // `plan` worked the conditions out; a conditional update without one is refused here.
        let (t, condition) = match &e.interaction {
            I::Create(t) => (t, e.condition.clone()),
            I::Update(_, id) => {
                out.ids[i] = Some(id.clone());
                continue;
            }
            I::ConditionalUpdate(t) => match &e.condition {
                Some(q) => (t, Some(q.clone())),
                None => (
                    t,
                    Some(crate::interaction::update::condition_query(&e.req).map_err(at)?),
                ),
            },
            _ => continue,
        };
        let found = if let Some(found) = resolved.remove(&i) {
            found
        } else if let Some(condition) = &condition {
            if lock {
                db.lock_condition(t, condition).await.map_err(at)?;
            }
            write::matching_ids(db, ctx, t, condition, 2)
                .await
                .map_err(at)?
        } else {
            Vec::new()
        };
        let condition = condition.unwrap_or_default();
        let id = match (found.as_slice(), &e.interaction) {
            ([], I::ConditionalUpdate(_)) => match &payloads[i] {
                Payload::Raw(r) => r.get("id").and_then(Value::as_str).map(str::to_string),
                _ => None,
            },
            ([], _) => None,
            ([one], I::Create(_)) => {
                out.matched.push(i);
                Some(one.clone())
            }
            ([one], _) => Some(one.clone()),
            (_, I::Create(_)) => {
                return Err(at(FhirError::precondition(format!(
                    "ifNoneExist {condition:?} matches more than one {t}"
                ))));
            }
            _ => {
                return Err(at(FhirError::precondition(format!(
                    "the condition {condition:?} matches more than one {t}"
                ))));
            }
        };
        out.ids[i] = Some(id.unwrap_or_else(|| {
            out.fresh[i] = true;
            mint(i)
        }));
    }
    Ok(out)
}

/// fullUrl → `Type/id` for every entry that has both.
fn full_url_map(entries: &[Entry], ids: &[Option<String>]) -> HashMap<String, String> {
    use Interaction as I;
    let mut map = HashMap::new();
    for (e, id) in entries.iter().zip(ids) {
        if let (Some(full), Some(id), I::Create(t) | I::Update(t, _) | I::ConditionalUpdate(t)) =
            (&e.full_url, id, &e.interaction)
        {
            map.insert(full.clone(), format!("{t}/{id}"));
        }
    }
    map
}

/// The transaction body: runs inside one database transaction.
async fn run(
    db: &mut Db,
    ctx: &Ctx,
    mut entries: Vec<Entry>,
    mut payloads: Vec<Payload>,
    mut ids: Vec<Option<String>>,
    speculation: Option<Speculation>,
) -> Result<Vec<Outcome>> {
    use Interaction as I;
    let mut outcomes: Vec<Option<Outcome>> = (0..entries.len()).map(|_| None).collect();
    let order = processing_sequence(&entries);
    // Every entry but a plain create may lock a key (PostgreSQL): a transaction with many
    // such entries takes the write gate exclusively before its first lock, whatever kind
    // of entry takes it (see `store::resource::Gate`).
    let locking = entries
        .iter()
        .filter(|e| !matches!(e.interaction, I::Create(_)))
        .count();
    if locking > crate::store::resource::KEY_LOCKS_PER_JOB {
        db.hold_write_gate().await?;
    }

    // 1. Deletes.
    for &i in &order {
        let e = &entries[i];
        let at = |err| entry_error(e.index, err);
        match &e.interaction {
            I::Delete(t, id) => {
                let w = delete_in(db, t, id, e.req.if_match.as_deref())
                    .await
                    .map_err(at)?;
                outcomes[i] = Some(Outcome {
                    status: "204 No Content",
                    location: None,
                    version: w.as_ref().map(|w| w.version),
                    last_modified: w.as_ref().map(|w| w.last_updated),
                    resource: None,
                });
            }
            I::ConditionalDelete(t) => {
                let q = crate::interaction::update::condition_query(&e.req).map_err(at)?;
                conditional_delete_in(db, ctx, t, &q, ctx.conditional_delete)
                    .await
                    .map_err(at)?;
                outcomes[i] = Some(Outcome {
                    status: "204 No Content",
                    location: None,
                    version: None,
                    last_modified: None,
                    resource: None,
                });
            }
            _ => {}
        }
    }

    // 2. Resolve ids that depend on the database, then rewrite references. Ids minted for
    // unmatched entries are the speculation's, so that when every condition resolves as it
    // did outside the writer, its prepared payloads are used as they are.
    let mut existing: HashMap<usize, crate::store::resource::Stored> = HashMap::new();
    if payloads.iter().any(|p| matches!(p, Payload::Raw(_))) {
        let mut mint = |i: usize| {
            speculation
                .as_ref()
                .filter(|s| s.fresh[i])
                .and_then(|s| s.ids[i].clone())
                .unwrap_or_else(new_id)
        };
        let resolved = resolve_ids(db, ctx, &entries, &payloads, &order, true, &mut mint).await?;
        for &i in &resolved.matched {
            let (I::Create(t), Some(id)) = (&entries[i].interaction, &resolved.ids[i]) else {
                continue;
            };
            if let Some(s) = db
                .read(t, id)
                .await
                .map_err(|err| entry_error(entries[i].index, err))?
            {
                existing.insert(i, s);
            }
        }
        ids = resolved.ids;
        tracing::debug!(
            speculated = speculation.is_some(),
            agreed = speculation.as_ref().is_some_and(|s| s.ids == ids),
            "transaction ids resolved"
        );
        match speculation {
            Some(s) if s.ids == ids => {
                for (p, prepared) in payloads.iter_mut().zip(s.prepared) {
                    if let Some(prepared) = prepared {
                        *p = prepared;
                    }
                }
            }
            _ => {
                let mut map = full_url_map(&entries, &ids);
                for &i in &order {
                    let index = entries[i].index;
                    let at = |err| entry_error(index, err);
                    let Payload::Raw(r) = &mut payloads[i] else {
                        continue;
                    };
                    let mut r = std::mem::take(r);
                    write::resolve_conditional_references(db, ctx, &mut r, &mut map)
                        .await
                        .map_err(at)?;
                    rewrite(&mut r, &map).map_err(at)?;
                    let id = ids[i]
                        .clone()
                        .ok_or_else(|| FhirError::internal("entry without id"))?;
                    payloads[i] =
                        Payload::Prepared(write::prepare_with_id(ctx, r, &id).map_err(at)?);
                }
            }
        }
    }

    // 3. Creates, then updates and patches, then reads. The current versions of every
    // resource written by id are read ahead in one query.
    let keys: Vec<(String, String)> = order
        .iter()
        .filter_map(|&i| match (&entries[i].interaction, &ids[i]) {
            (I::Update(t, _) | I::ConditionalUpdate(t), Some(id)) => Some((t.clone(), id.clone())),
            _ => None,
        })
        .collect();
    db.prefetch(&keys).await?;
    let now_status = |created: bool| if created { "201 Created" } else { "200 OK" };
    for &i in &order {
        let e = &mut entries[i];
        let index = e.index;
        let at = |err| entry_error(index, err);
        let outcome = match (&e.interaction, &payloads[i], &ids[i]) {
            (I::Create(t), Payload::Prepared(p), Some(id)) => {
                if let Some(s) = existing.remove(&i) {
                    Outcome {
                        status: "200 OK",
                        location: Some(format!("{t}/{}/_history/{}", s.id, s.version)),
                        version: Some(s.version),
                        last_modified: Some(s.last_updated),
                        resource: s.body,
                    }
                } else {
                    match create_in(db, ctx, t, id, p, None).await.map_err(at)? {
                        Created::New(w) => written(t, "201 Created", w),
                        Created::Existing(s) => Outcome {
                            status: "200 OK",
                            location: Some(format!("{t}/{}/_history/{}", s.id, s.version)),
                            version: Some(s.version),
                            last_modified: Some(s.last_updated),
                            resource: s.body,
                        },
                    }
                }
            }
            (I::Update(t, _) | I::ConditionalUpdate(t), Payload::Unchanged(u), Some(id)) => {
                let current = db.current_for_update(t, id).await.map_err(at)?;
                if current.is_some_and(|c| !c.deleted && c.version == u.version) {
                    Outcome {
                        status: "200 OK",
                        location: Some(format!("{t}/{id}/_history/{}", u.version)),
                        version: Some(u.version),
                        last_modified: Some(u.last_updated),
                        resource: Some(u.body.clone()),
                    }
                } else {
                    let p = write::prepare_with_id(ctx, u.resource.clone(), id).map_err(at)?;
                    let w = update_in(db, t, id, &p, e.req.if_match.as_deref())
                        .await
                        .map_err(at)?;
                    written(t, now_status(w.created), w)
                }
            }
            (I::Update(t, _) | I::ConditionalUpdate(t), Payload::Prepared(p), Some(id)) => {
                let w = update_in(db, t, id, p, e.req.if_match.as_deref())
                    .await
                    .map_err(at)?;
                written(t, now_status(w.created), w)
            }
            (I::Patch(t, id), _, _) => {
                let RequestBody::JsonPatch(ops) = &e.req.body else {
                    continue;
                };
                let w = patch_in(db, ctx, t, id, ops, e.req.if_match.as_deref())
                    .await
                    .map_err(at)?;
                written(t, "200 OK", w)
            }
            (I::ConditionalPatch(t), _, _) => {
                let RequestBody::JsonPatch(ops) = &e.req.body else {
                    continue;
                };
                let q = crate::interaction::update::condition_query(&e.req).map_err(at)?;
                let found = write::matching_ids(db, ctx, t, &q, 2).await.map_err(at)?;
                let [id] = found.as_slice() else {
                    return Err(at(FhirError::precondition(format!(
                        "{q:?} must match exactly one {t}"
                    ))));
                };
                let w = patch_in(db, ctx, t, id, ops, e.req.if_match.as_deref())
                    .await
                    .map_err(at)?;
                written(t, "200 OK", w)
            }
            (I::Read(t, id), _, _) => {
                let s = db.read(t, id).await.map_err(at)?;
                match s {
                    Some(s) if s.body.is_some() => Outcome {
                        status: "200 OK",
                        location: None,
                        version: Some(s.version),
                        last_modified: Some(s.last_updated),
                        resource: s.body,
                    },
                    Some(_) => {
                        return Err(at(FhirError::new(
                            ErrorKind::Gone,
                            format!("{t}/{id} was deleted"),
                        )));
                    }
                    None => return Err(at(crate::interaction::read::not_known(t, id))),
                }
            }
            (I::Vread(t, id, vid), _, _) => {
                let v: i64 = vid
                    .parse()
                    .map_err(|_| at(FhirError::not_found(format!("no version {vid}"))))?;
                match db.vread(t, id, v).await.map_err(at)? {
                    Some(s) if s.body.is_some() => Outcome {
                        status: "200 OK",
                        location: None,
                        version: Some(s.version),
                        last_modified: Some(s.last_updated),
                        resource: s.body,
                    },
                    _ => {
                        return Err(at(crate::interaction::read::no_version(t, id, vid)));
                    }
                }
            }
            (I::SearchType(t), _, _) => {
                let body = crate::interaction::search_type::search_in(
                    db,
                    ctx,
                    t,
                    e.req.query.clone(),
                    false,
                )
                .await
                .map_err(at)?;
                Outcome {
                    status: "200 OK",
                    location: None,
                    version: None,
                    last_modified: None,
                    resource: Some(body),
                }
            }
            _ => continue,
        };
        outcomes[i] = Some(outcome);
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| FhirError::internal("a transaction entry produced no outcome")))
        .collect()
}

fn written(t: &str, status: &'static str, w: crate::store::resource::Written) -> Outcome {
    Outcome {
        status,
        location: Some(format!("{t}/{}/_history/{}", w.id, w.version)),
        version: Some(w.version),
        last_modified: Some(w.last_updated),
        resource: w.body,
    }
}
