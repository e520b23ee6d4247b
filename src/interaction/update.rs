//! update, update-as-create and conditional update (FHIR R4 http.html#update, #cond-update).

use serde_json::Value;

use crate::error::{FhirError, Result};
use crate::interaction::{Ctx, FhirRequest, FhirResponse, SharedCtx, new_id, write};
use crate::store::Db;
use crate::store::resource::{Prepared, Written, finish_body};

/// Writes a new version of `ty/id` (creating it if absent) inside the caller's transaction.
pub async fn update_in(
    db: &mut Db,
    ty: &str,
    id: &str,
    prepared: &Prepared,
    if_match: Option<&str>,
) -> Result<Written> {
    let prior = db.current_for_update(ty, id).await?;
    write::check_if_match(if_match, prior.as_ref(), &format!("{ty}/{id}"))?;
    // An update that changes nothing writes nothing (no new version): redelivered HL7 v2
    // messages and device readings stay no-ops. Both texts come from the same serialiser, so
    // the prepared body with the current meta filled in equals the stored text exactly when
    // the content is the same.
    if let Some(c) = prior.as_ref().filter(|c| !c.deleted)
        && let Some(current) = db.vread(ty, id, c.version).await?.and_then(|s| s.body)
        && finish_body(&prepared.body, c.version, c.last_updated) == current
    {
        return Ok(Written {
            id: id.to_string(),
            version: c.version,
            last_updated: c.last_updated,
            body: Some(current),
            created: false,
        });
    }
    let now = crate::time::now_micros();
    let mut w = db
        .write_version(ty, id, prior.as_ref(), Some(prepared), "PUT", now)
        .await?;
    // Re-creating a deleted resource is a create for the client.
    w.created = prior.as_ref().is_none_or(|c| c.deleted);
    Ok(w)
}

/// `PUT [base]/[type]/[id]`.
pub async fn update(
    ctx: &SharedCtx,
    ty: &str,
    id: &str,
    mut req: FhirRequest,
) -> Result<FhirResponse> {
    let mut resource = req.take_resource()?;
    write::check(ctx, ty, &mut resource, Some(id))?;
    let (c, t, i, if_match) = (
        ctx.clone(),
        ty.to_string(),
        id.to_string(),
        req.if_match.clone(),
    );
    let w = if write::has_conditional_reference(&resource) {
        ctx.store
            .write(move |db| {
                Box::pin(async move {
                    let prepared = write::resolve_and_prepare(db, &c, resource, &i).await?;
                    update_in(db, &t, &i, &prepared, if_match.as_deref()).await
                })
            })
            .await?
    } else {
        let prepared = write::prepare_with_id(ctx, resource, id)?;
        ctx.store
            .write(move |db| {
                Box::pin(async move { update_in(db, &t, &i, &prepared, if_match.as_deref()).await })
            })
            .await?
    };
    Ok(FhirResponse::written(
        ty,
        &w,
        if w.created { 201 } else { 200 },
        req.prefer_return,
    ))
}

/// Resolves a conditional update's target and writes it, inside the caller's transaction.
/// `resource` has passed [`write::check`] without a URL id.
pub async fn conditional_update_in(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    query: &str,
    resource: Value,
    if_match: Option<&str>,
) -> Result<Written> {
    db.lock_condition(ty, query).await?;
    let mut resource = resource;
    write::resolve_conditional_references(db, ctx, &mut resource, &mut Default::default()).await?;
    let ids = write::matching_ids(db, ctx, ty, query, 2).await?;
    let body_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string);
    let id = match (ids.as_slice(), body_id) {
        ([], Some(id)) => id,
        ([], None) => new_id(),
        ([one], Some(id)) if *one != id => {
            return Err(FhirError::invalid(format!(
                "the condition matches {ty}/{one} but the body's id is {id:?}"
            )));
        }
        ([one], _) => one.clone(),
        _ => {
            return Err(FhirError::precondition(format!(
                "the condition {query:?} matches more than one {ty}"
            )));
        }
    };
    let prepared = write::prepare_with_id(ctx, resource, &id)?;
    update_in(db, ty, &id, &prepared, if_match).await
}

/// `PUT [base]/[type]?[search]`.
pub async fn conditional_update(
    ctx: &SharedCtx,
    ty: &str,
    mut req: FhirRequest,
) -> Result<FhirResponse> {
    let query = condition_query(&req)?;
    let mut resource = req.take_resource()?;
    if let Some(id) = resource.get("id").and_then(Value::as_str) {
        crate::interaction::parse_id(id)?;
    }
    write::check(ctx, ty, &mut resource, None)?;
    let (c, t, if_match) = (ctx.clone(), ty.to_string(), req.if_match.clone());
    let w = ctx
        .store
        .write(move |db| {
            Box::pin(async move {
                conditional_update_in(db, &c, &t, &query, resource, if_match.as_deref()).await
            })
        })
        .await?;
    Ok(FhirResponse::written(
        ty,
        &w,
        if w.created { 201 } else { 200 },
        req.prefer_return,
    ))
}

/// The search part of a conditional URL, re-encoded (control parameters dropped).
pub fn condition_query(req: &FhirRequest) -> Result<String> {
    let mut s = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in &req.query {
        if matches!(k.as_str(), "_format" | "_pretty") {
            continue;
        }
        s.append_pair(k, v);
        any = true;
    }
    if !any {
        return Err(FhirError::invalid(
            "a conditional interaction needs search parameters in the URL",
        ));
    }
    Ok(s.finish())
}
