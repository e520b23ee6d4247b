//! `$reindex` and `iomt-fhir reindex`: puts the SearchParameter resources stored on the
//! server in force and rebuilds the search indexes of stored resources with them.
//!
//! Steps: read every current SearchParameter; build a registry of the official parameters
//! plus each one the server can evaluate (those it cannot are reported, not activated);
//! swap it in, so new writes index with it; walk the stored resources in `rid` order in
//! batches, extracting index values outside the writer and replacing each batch's index
//! rows in one write job (a resource written meanwhile keeps the index of its own write);
//! finally record which SearchParameter versions are active, so a restart loads them.

use serde_json::{Value, json};

use crate::error::{FhirError, Result};
use crate::interaction::{Ctx, FhirRequest, FhirResponse, SharedCtx};
use crate::search::extract::extract;
use crate::search::registry::Registry;
use crate::store::resource::Reindexed;
use crate::store::{Arg, Db, SqlBuilder, Ty};

/// Resources per write job.
const BATCH: i64 = 500;

/// What a reindex did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `SearchParameter/id` (code) of each parameter now in force.
    pub activated: Vec<String>,
    /// `SearchParameter/id` and why it is not in force.
    pub refused: Vec<(String, String)>,
    /// Resources whose index was rebuilt.
    pub resources: u64,
}

/// The stored SearchParameters (current, not deleted) as (id, version, resource).
async fn stored_parameters(db: &mut Db) -> Result<Vec<(String, i64, Value)>> {
    let rows = db
        .fetch_all(
            "SELECT r.res_id, r.version, v.body FROM resource r JOIN resource_version v ON v.seq = r.seq \
             WHERE r.res_type = 'SearchParameter' AND r.deleted = 0 ORDER BY r.res_id",
            &[],
            &[Ty::Text, Ty::Int, Ty::Text],
        )
        .await?;
    let mut out = Vec::new();
    for row in rows {
        let mut it = row.into_iter();
        let (Some(id), Some(version), Some(body)) = (
            it.next().and_then(|v| v.text()),
            it.next().map(|v| v.int()),
            it.next().and_then(|v| v.text()),
        ) else {
            continue;
        };
        let resource: Value = serde_json::from_str(&body)
            .map_err(|e| FhirError::internal(format!("stored SearchParameter/{id}: {e}")))?;
        out.push((id, version, resource));
    }
    Ok(out)
}

/// The official registry plus `params` (id, resource); returns what was refused.
fn build_registry(
    official: &Registry,
    params: &[(String, i64, Value)],
) -> (Registry, Vec<String>, Vec<(String, String)>) {
    let mut registry = official.clone();
    let mut activated = Vec::new();
    let mut refused = Vec::new();
    for (id, _, sp) in params {
        if sp.get("status").and_then(Value::as_str) == Some("retired") {
            refused.push((format!("SearchParameter/{id}"), "status is retired".into()));
            continue;
        }
        match registry.add(sp) {
            Ok(()) => activated.push(format!(
                "SearchParameter/{id} ({})",
                sp.get("code").and_then(Value::as_str).unwrap_or("?")
            )),
            Err(reason) => refused.push((format!("SearchParameter/{id}"), reason)),
        }
    }
    (registry, activated, refused)
}

/// At start-up: puts the SearchParameter versions recorded as active in force.
pub async fn load_active(ctx: &Ctx) -> Result<usize> {
    let mut db = ctx.store.reader().await?;
    let rows = db
        .fetch_all(
            "SELECT res_id, version FROM search_parameter_active ORDER BY res_id",
            &[],
            &[Ty::Text, Ty::Int],
        )
        .await?;
    let mut params = Vec::new();
    for row in rows {
        let mut it = row.into_iter();
        let (Some(id), Some(version)) =
            (it.next().and_then(|v| v.text()), it.next().map(|v| v.int()))
        else {
            continue;
        };
        if let Some(body) = db
            .vread("SearchParameter", &id, version)
            .await?
            .and_then(|s| s.body)
        {
            let resource: Value = serde_json::from_str(&body)
                .map_err(|e| FhirError::internal(format!("stored SearchParameter/{id}: {e}")))?;
            params.push((id, version, resource));
        }
    }
    if params.is_empty() {
        return Ok(0);
    }
    let (registry, activated, refused) = build_registry(&ctx.defs.registry, &params);
    for (id, reason) in &refused {
        tracing::warn!(%id, %reason, "active SearchParameter no longer loads");
    }
    ctx.set_registry(registry);
    Ok(activated.len())
}

/// Activates the stored SearchParameters and rebuilds the indexes of the resources of
/// `types` (every type when `None`). `progress(done, total)` is called after each batch.
pub async fn run(
    ctx: &Ctx,
    types: Option<&[String]>,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<Report> {
    let mut db = ctx.store.reader().await?;
    let params = stored_parameters(&mut db).await?;
    drop(db);
    let (registry, activated, refused) = build_registry(&ctx.defs.registry, &params);
    ctx.set_registry(registry);
    let done = rebuild(ctx, types, progress).await?;
    // Record what is in force, for the next start.
    let active: Vec<(String, i64)> = params
        .iter()
        .filter(|(id, _, _)| {
            activated
                .iter()
                .any(|a| a.starts_with(&format!("SearchParameter/{id} ")))
        })
        .map(|(id, v, _)| (id.clone(), *v))
        .collect();
    ctx.store
        .write(move |db| {
            Box::pin(async move {
                db.execute("DELETE FROM search_parameter_active", &[])
                    .await?;
                for (id, version) in active {
                    db.execute(
                        "INSERT INTO search_parameter_active (res_id, version) VALUES ($1, $2)",
                        &[Arg::Text(id), Arg::Int(version)],
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .await?;
    ctx.store.vacuum_analyze().await?;
    Ok(Report {
        activated,
        refused,
        resources: done,
    })
}

/// Rebuilds the search indexes of the resources of `types` (every type when `None`) with
/// the parameters in force, without activating any; returns how many were rebuilt. Also
/// what a start runs when a migration changed the index tables' layout
/// ([`rebuild_if_flagged`]).
pub async fn rebuild(
    ctx: &Ctx,
    types: Option<&[String]>,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<u64> {
    let mut db = ctx.store.reader().await?;
    let registry = ctx.registry();

    let type_filter = |b: &mut SqlBuilder| {
        if let Some(ts) = types {
            b.push(" AND r.res_type IN ").list(ts);
        }
    };
    let mut count = SqlBuilder::new("SELECT COUNT(*) FROM resource r WHERE r.deleted = 0");
    type_filter(&mut count);
    let total = db.fetch_one_int(&count.sql, &count.args).await?.max(0) as u64;
    let mut done = 0u64;
    let mut after = 0i64;
    loop {
        let mut b = SqlBuilder::new(
            "SELECT r.rid, r.version, r.res_type, v.body FROM resource r \
             JOIN resource_version v ON v.seq = r.seq WHERE r.deleted = 0 AND r.rid > ",
        );
        b.int(after);
        type_filter(&mut b);
        b.push(" ORDER BY r.rid LIMIT ").int(BATCH);
        let rows = db
            .fetch_all(&b.sql, &b.args, &[Ty::Int, Ty::Int, Ty::Text, Ty::Text])
            .await?;
        if rows.is_empty() {
            break;
        }
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            let mut it = row.into_iter();
            let (Some(rid), Some(version), Some(res_type), Some(body)) = (
                it.next().map(|v| v.int()),
                it.next().map(|v| v.int()),
                it.next().and_then(|v| v.text()),
                it.next().and_then(|v| v.text()),
            ) else {
                continue;
            };
            after = after.max(rid);
            let resource: Value = serde_json::from_str(&body).map_err(|e| {
                FhirError::internal(format!("stored {res_type} rid {rid} is not JSON: {e}"))
            })?;
            batch.push(Reindexed {
                rid,
                version,
                index: extract(&registry, &resource),
                res_type,
            });
        }
        let n = batch.len() as u64;
        ctx.store
            .write(move |db| Box::pin(async move { db.replace_indexes(batch).await }))
            .await?;
        done += n;
        progress(done, total);
    }
    Ok(done)
}

/// The `store_task` a migration leaves when it emptied the index tables.
const REBUILD_TASK: &str = "rebuild-search-index";

/// At start, before serving: when a migration changed the index tables' layout (and so
/// emptied them), rebuilds every resource's index from its stored body, logging progress,
/// then clears the task. Several processes starting together on one PostgreSQL may each
/// rebuild; the rows come out the same.
pub async fn rebuild_if_flagged(ctx: &Ctx) -> Result<()> {
    let mut db = ctx.store.reader().await?;
    let flagged = db
        .fetch_one_int(
            "SELECT COUNT(*) FROM store_task WHERE name = $1",
            &[Arg::Text(REBUILD_TASK.into())],
        )
        .await?
        > 0;
    drop(db);
    if !flagged {
        return Ok(());
    }
    tracing::warn!("the search index format changed: rebuilding every resource's index");
    let started = std::time::Instant::now();
    let last = std::sync::Mutex::new(std::time::Instant::now());
    let done = rebuild(ctx, None, &|done, total| {
        let Ok(mut last) = last.lock() else { return };
        if last.elapsed().as_secs() >= 5 || done == total {
            *last = std::time::Instant::now();
            tracing::info!(done, total, "rebuilding the search index");
        }
    })
    .await?;
    ctx.store
        .write(|db| {
            Box::pin(async move {
                db.execute(
                    "DELETE FROM store_task WHERE name = $1",
                    &[Arg::Text(REBUILD_TASK.into())],
                )
                .await?;
                Ok(())
            })
        })
        .await?;
    ctx.store.vacuum_analyze().await?;
    tracing::info!(
        resources = done,
        seconds = started.elapsed().as_secs_f64(),
        "search index rebuilt"
    );
    Ok(())
}

/// `POST [base]/$reindex[?_type=...]`: answers a Parameters resource with what was done.
pub async fn http(ctx: &SharedCtx, req: &FhirRequest) -> Result<FhirResponse> {
    let types = crate::interaction::search_type::types_param(ctx, &req.query)?;
    let report = run(ctx, types.as_deref(), &|_, _| {}).await?;
    let mut parameter = vec![json!({"name": "resources", "valueInteger": report.resources})];
    for a in &report.activated {
        parameter.push(json!({"name": "activated", "valueString": a}));
    }
    for (id, reason) in &report.refused {
        parameter.push(json!({"name": "refused", "valueString": format!("{id}: {reason}")}));
    }
    Ok(FhirResponse::json(
        200,
        json!({"resourceType": "Parameters", "parameter": parameter}),
    ))
}
