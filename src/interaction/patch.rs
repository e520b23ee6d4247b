//! patch with JSON Patch (FHIR R4 http.html#patch, RFC 6902), plain and conditional.

use serde_json::Value;

use crate::error::{FhirError, Result};
use crate::interaction::update::condition_query;
use crate::interaction::{Ctx, FhirRequest, FhirResponse, RequestBody, SharedCtx, write};
use crate::store::Db;
use crate::store::resource::Written;

/// Applies a JSON Patch to the current `ty/id` inside the caller's transaction.
pub async fn patch_in(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    id: &str,
    patch: &Value,
    if_match: Option<&str>,
) -> Result<Written> {
    let prior = db.current_for_update(ty, id).await?;
    write::check_if_match(if_match, prior.as_ref(), &format!("{ty}/{id}"))?;
    let prior = match prior {
        Some(c) if !c.deleted => c,
        Some(_) => {
            return Err(FhirError::new(
                crate::error::ErrorKind::Gone,
                format!("{ty}/{id} is deleted"),
            ));
        }
        None => return Err(FhirError::not_found(format!("{ty}/{id} does not exist"))),
    };
    let stored = db
        .read(ty, id)
        .await?
        .and_then(|s| s.body)
        .ok_or_else(|| FhirError::internal("current version has no body"))?;
    let mut resource: Value = serde_json::from_str(&stored)
        .map_err(|e| FhirError::internal(format!("stored JSON unreadable: {e}")))?;
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| FhirError::invalid(format!("not a JSON Patch document: {e}")))?;
    json_patch::patch(&mut resource, &ops).map_err(|e| {
        FhirError::new(
            crate::error::ErrorKind::Unprocessable,
            format!("the patch cannot be applied: {e}"),
        )
    })?;
    write::check(ctx, ty, &mut resource, Some(id))?;
    let prepared = write::prepare_with_id(ctx, resource, id)?;
    let now = crate::time::now_micros();
    db.write_version(ty, id, Some(&prior), Some(&prepared), "PATCH", now)
        .await
}

/// `PATCH [base]/[type]/[id]` and `PATCH [base]/[type]?[search]`.
pub async fn patch(
    ctx: &SharedCtx,
    ty: &str,
    id: Option<String>,
    req: FhirRequest,
) -> Result<FhirResponse> {
    let RequestBody::JsonPatch(ops) = req.body.clone() else {
        return Err(FhirError::new(
            crate::error::ErrorKind::UnsupportedMediaType,
            "PATCH needs a JSON Patch body (Content-Type: application/json-patch+json)",
        ));
    };
    let query = match id {
        Some(_) => None,
        None => Some(condition_query(&req)?),
    };
    let (c, t, if_match) = (ctx.clone(), ty.to_string(), req.if_match.clone());
    let w = ctx
        .store
        .write(move |db| {
            Box::pin(async move {
                let id = match (id, query) {
                    (Some(id), _) => id,
                    (None, Some(q)) => {
                        db.lock_condition(&t, &q).await?;
                        let ids = write::matching_ids(db, &c, &t, &q, 2).await?;
                        match ids.as_slice() {
                            [one] => one.clone(),
                            [] => {
                                return Err(FhirError::not_found(format!("no {t} matches {q:?}")));
                            }
                            _ => {
                                return Err(FhirError::precondition(format!(
                                    "{q:?} matches more than one {t}"
                                )));
                            }
                        }
                    }
                    (None, None) => return Err(FhirError::invalid("nothing to patch")),
                };
                patch_in(db, &c, &t, &id, &ops, if_match.as_deref()).await
            })
        })
        .await?;
    Ok(FhirResponse::written(ty, &w, 200, req.prefer_return))
}
