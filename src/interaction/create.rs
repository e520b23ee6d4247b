//! create and conditional create (FHIR R4 http.html#create, #ccreate).

use crate::error::{FhirError, Result};
use crate::interaction::{Body, Ctx, FhirRequest, FhirResponse, SharedCtx, new_id, write};
use crate::store::Db;
use crate::store::resource::{Prepared, Stored, Written};

/// What a create did.
pub enum Created {
    New(Written),
    /// `If-None-Exist` matched this resource; nothing was written.
    Existing(Stored),
}

/// Creates `ty/id` inside the caller's transaction, unless `if_none_exist` matches.
pub async fn create_in(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    id: &str,
    prepared: &Prepared,
    if_none_exist: Option<&str>,
) -> Result<Created> {
    if let Some(condition) = if_none_exist {
        db.lock_condition(ty, condition).await?;
        let ids = write::matching_ids(db, ctx, ty, condition, 2).await?;
        match ids.as_slice() {
            [] => {}
            [one] => {
                let stored = db
                    .read(ty, one)
                    .await?
                    .ok_or_else(|| FhirError::internal("matched resource vanished"))?;
                return Ok(Created::Existing(stored));
            }
            _ => {
                return Err(FhirError::precondition(format!(
                    "If-None-Exist {condition:?} matches more than one {ty}"
                )));
            }
        }
    }
    // `id` is a fresh random UUID (`new_id`): no earlier version can exist, so there is no
    // current row to read or lock.
    let now = crate::time::now_micros();
    let w = db
        .write_version(ty, id, None, Some(prepared), "POST", now)
        .await?;
    Ok(Created::New(w))
}

/// `POST [base]/[type]`.
pub async fn create(ctx: &SharedCtx, ty: &str, mut req: FhirRequest) -> Result<FhirResponse> {
    let mut resource = req.take_resource()?;
    write::check(ctx, ty, &mut resource, None)?;
    let id = new_id();
    let (c, t, cond) = (ctx.clone(), ty.to_string(), req.if_none_exist.clone());
    let created = if write::has_conditional_reference(&resource) {
        // Conditional references need the database: resolve and serialise in the job.
        ctx.store
            .write(move |db| {
                Box::pin(async move {
                    let prepared = write::resolve_and_prepare(db, &c, resource, &id).await?;
                    create_in(db, &c, &t, &id, &prepared, cond.as_deref()).await
                })
            })
            .await?
    } else {
        let prepared = write::prepare_with_id(ctx, resource, &id)?;
        ctx.store
            .write(move |db| {
                Box::pin(
                    async move { create_in(db, &c, &t, &id, &prepared, cond.as_deref()).await },
                )
            })
            .await?
    };
    Ok(match created {
        Created::New(w) => FhirResponse::written(ty, &w, 201, req.prefer_return),
        Created::Existing(s) => stored_response(s, 200),
    })
}

/// A response carrying a stored version.
pub fn stored_response(s: Stored, status: u16) -> FhirResponse {
    FhirResponse {
        status,
        body: s.body.map_or(Body::None, Body::Raw),
        version: Some(s.version),
        last_modified: Some(s.last_updated),
        location: Some(format!("{}/{}/_history/{}", s.res_type, s.id, s.version)),
        is_resource: true,
    }
}
