//! delete and conditional delete (FHIR R4 http.html#delete, #cdelete). Deletes are
//! versioned tombstones: history keeps every earlier version.

use crate::error::{FhirError, Result};
use crate::interaction::update::condition_query;
use crate::interaction::{Body, Ctx, FhirRequest, FhirResponse, Return, SharedCtx, write};
use crate::store::Db;
use crate::store::resource::Written;

/// Deletes `ty/id` inside the caller's transaction. `Ok(None)`: it never existed or was
/// already deleted (deletes are idempotent).
pub async fn delete_in(
    db: &mut Db,
    ty: &str,
    id: &str,
    if_match: Option<&str>,
) -> Result<Option<Written>> {
    let prior = db.current_for_update(ty, id).await?;
    write::check_if_match(if_match, prior.as_ref(), &format!("{ty}/{id}"))?;
    match prior {
        Some(c) if !c.deleted => {
            let now = crate::time::now_micros();
            Ok(Some(
                db.write_version(ty, id, Some(&c), None, "DELETE", now)
                    .await?,
            ))
        }
        _ => Ok(None),
    }
}

/// How conditional delete treats several matches (CapabilityStatement.conditionalDelete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditionalDeleteMode {
    /// More than one match is a 412.
    Single,
    /// Every match is deleted (up to the bundle entry limit).
    Multiple,
}

/// Deletes what a condition matches, inside the caller's transaction.
pub async fn conditional_delete_in(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    query: &str,
    mode: ConditionalDeleteMode,
) -> Result<Vec<Written>> {
    if mode == ConditionalDeleteMode::Multiple {
        // It may delete thousands: one key lock each would fill PostgreSQL's lock table.
        db.hold_write_gate().await?;
    }
    db.lock_condition(ty, query).await?;
    let limit = match mode {
        ConditionalDeleteMode::Single => 2,
        ConditionalDeleteMode::Multiple => ctx.limits.max_bundle_entries + 1,
    };
    let ids = write::matching_ids(db, ctx, ty, query, limit).await?;
    if ids.len() >= limit {
        return Err(FhirError::precondition(match mode {
            ConditionalDeleteMode::Single => {
                format!("the condition {query:?} matches more than one {ty}")
            }
            ConditionalDeleteMode::Multiple => {
                format!(
                    "the condition {query:?} matches more than {} resources",
                    limit - 1
                )
            }
        }));
    }
    let mut out = Vec::new();
    for id in ids {
        if let Some(w) = delete_in(db, ty, &id, None).await? {
            out.push(w);
        }
    }
    Ok(out)
}

/// `DELETE [base]/[type]/[id]`.
pub async fn delete(ctx: &SharedCtx, ty: &str, id: &str, req: FhirRequest) -> Result<FhirResponse> {
    let (t, i, if_match) = (ty.to_string(), id.to_string(), req.if_match.clone());
    let w = ctx
        .store
        .write(move |db| Box::pin(async move { delete_in(db, &t, &i, if_match.as_deref()).await }))
        .await?;
    Ok(deleted_response(ty, w.as_ref(), req.prefer_return, 1))
}

/// `DELETE [base]/[type]?[search]`.
pub async fn conditional_delete(
    ctx: &SharedCtx,
    ty: &str,
    req: FhirRequest,
) -> Result<FhirResponse> {
    let query = condition_query(&req)?;
    let (c, t, mode) = (ctx.clone(), ty.to_string(), ctx.conditional_delete);
    let ws = ctx
        .store
        .write(move |db| {
            Box::pin(async move { conditional_delete_in(db, &c, &t, &query, mode).await })
        })
        .await?;
    Ok(deleted_response(ty, ws.last(), req.prefer_return, ws.len()))
}

pub fn deleted_response(
    ty: &str,
    w: Option<&Written>,
    ret: Option<Return>,
    n: usize,
) -> FhirResponse {
    let mut r = FhirResponse::json(204, serde_json::Value::Null);
    r.body = Body::None;
    if let Some(w) = w {
        r.version = Some(w.version);
        r.last_modified = Some(w.last_updated);
    }
    if ret == Some(Return::OperationOutcome) {
        r.status = 200;
        r.body = Body::Json(crate::error::information(match w {
            Some(w) if n == 1 => format!("deleted {ty}/{} (version {})", w.id, w.version),
            Some(_) => format!("deleted {n} {ty} resources"),
            None => "nothing to delete".to_string(),
        }));
    }
    r
}
