//! Interactions under an access token (`--auth smart`): the scope check before anything is
//! read (403), the rewrite that narrows a restricted search to what the token may see (so
//! paging and totals stay exact), and the filter every response passes through. A resource
//! outside the token's reach answers exactly as a resource that does not exist (404 with
//! the same text), so a token never learns what it may not see.

use std::sync::Arc;

use serde_json::Value;

use crate::auth::access::{self, Grant, Narrowing};
use crate::auth::scope::Perms;
use crate::error::{ErrorKind, FhirError, Result};
use crate::interaction::read::{no_version, not_known};
use crate::interaction::{Body, FhirRequest, FhirResponse, Interaction, RequestBody, SharedCtx};

fn outside(what: &str) -> FhirError {
    FhirError::new(
        ErrorKind::Forbidden,
        format!("{what}: the resource would be outside this token's scopes"),
    )
}

/// Handles `req` for the holder of `grant`.
pub async fn handle(
    ctx: &SharedCtx,
    grant: Arc<Grant>,
    interaction: Interaction,
    mut req: FhirRequest,
) -> Result<FhirResponse> {
    use Interaction as I;
    let params = req.search_params();
    access::check(&grant, &interaction, &params)?;
    let rs = Perms::R.union(Perms::S);
    check_change(ctx, &grant, &interaction, &req).await?;
    // Whether the search as run returns only what the token may see (totals can be told).
    let mut exact = true;
    let interaction = match interaction {
        I::SearchType(t) => match access::narrowing(&grant, &t) {
            Narrowing::None => I::SearchType(t),
            Narrowing::Exact { patient, params } => {
                for p in params {
                    if !req.query.contains(&p) {
                        req.query.push(p);
                    }
                }
                let member = ctx.defs.compartments.params("Patient", &t).is_some();
                match patient {
                    Some(p) if t == "Patient" => {
                        req.query.push(("_id".into(), p));
                        I::SearchType(t)
                    }
                    Some(p) if member => I::SearchCompartment("Patient".into(), p, t),
                    _ => I::SearchType(t),
                }
            }
            Narrowing::Filter => {
                exact = false;
                I::SearchType(t)
            }
        },
        I::SearchSystem => {
            exact = params
                .iter()
                .filter(|(k, _)| k == "_type")
                .flat_map(|(_, v)| v.split(','))
                .all(|t| grant.unrestricted(t, Perms::S));
            I::SearchSystem
        }
        I::SearchCompartment(c, id, t) => {
            exact = t != "*" && grant.unrestricted(&t, Perms::S);
            I::SearchCompartment(c, id, t)
        }
        I::HistoryType(t) => {
            exact = grant.unrestricted(&t, Perms::S);
            I::HistoryType(t)
        }
        I::Everything(id) => {
            exact = grant.reads_everything();
            I::Everything(id)
        }
        I::Create(t) => {
            if !grant.unrestricted(&t, Perms::C)
                && let RequestBody::Resource(r) = &req.body
                && !grant.permits(ctx, Perms::C, r)
            {
                return Err(outside("create"));
            }
            I::Create(t)
        }
        // A conditional read (304) would tell that an out-of-reach resource exists: under a
        // restricted scope the resource is always read, then checked.
        I::Read(t, id) if !grant.unrestricted(&t, Perms::R) => {
            req.if_none_match = None;
            req.if_modified_since = None;
            I::Read(t, id)
        }
        other => other,
    };
    // A search narrowed exactly, without includes, returns only what the token may see:
    // nothing to filter.
    let includes = params
        .iter()
        .any(|(k, _)| k.starts_with("_include") || k.starts_with("_revinclude"));
    let narrowed =
        exact && !includes && matches!(interaction, I::SearchType(_) | I::SearchCompartment(..));
    if grant.reads_everything() || narrowed {
        return crate::interaction::dispatch(ctx, interaction, req).await;
    }
    let result = crate::interaction::dispatch(ctx, interaction.clone(), req).await;
    match (&interaction, result) {
        // Reads of something out of reach, deleted or absent all look alike.
        (I::Read(t, id) | I::HistoryInstance(t, id), Err(e))
            if matches!(e.kind, ErrorKind::NotFound | ErrorKind::Gone) =>
        {
            Err(not_known(t, id))
        }
        (I::Vread(t, id, vid), Err(e))
            if matches!(e.kind, ErrorKind::NotFound | ErrorKind::Gone) =>
        {
            Err(no_version(t, id, vid))
        }
        (I::Read(t, id), Ok(r)) => {
            single(ctx, &grant, t, id, r, Perms::R).ok_or_else(|| not_known(t, id))
        }
        (I::Vread(t, id, vid), Ok(r)) => {
            single(ctx, &grant, t, id, r, Perms::R).ok_or_else(|| no_version(t, id, vid))
        }
        (I::HistoryInstance(t, id), Ok(r)) => {
            let (r, kept) = filtered(ctx, &grant, r, rs, false);
            if kept == 0 {
                Err(not_known(t, id))
            } else {
                Ok(r)
            }
        }
        (I::Everything(id), Ok(r)) => {
            let (r, _) = filtered(ctx, &grant, r, rs, exact);
            if everything_has_patient(&r, id) {
                Ok(r)
            } else {
                Err(not_known("Patient", id))
            }
        }
        (_, Ok(r)) => Ok(filtered(ctx, &grant, r, rs, exact).0),
        (_, Err(e)) => Err(e),
    }
}

/// Update, patch and delete by id under a restricted scope: only an existing resource the
/// token may change can be changed (an id that does not exist and one out of reach answer
/// alike), and an update may not move it out of reach. A JSON Patch's result is only known
/// once applied, inside the write, so such a token sends the whole resource instead.
async fn check_change(
    ctx: &SharedCtx,
    grant: &Grant,
    interaction: &Interaction,
    req: &FhirRequest,
) -> Result<()> {
    let (Interaction::Update(t, id) | Interaction::Patch(t, id) | Interaction::Delete(t, id)) =
        interaction
    else {
        return Ok(());
    };
    let perm = if matches!(interaction, Interaction::Delete(..)) {
        Perms::D
    } else {
        Perms::U
    };
    if grant.unrestricted(t, perm) {
        return Ok(());
    }
    if matches!(interaction, Interaction::Patch(..)) {
        return Err(FhirError::new(
            ErrorKind::Forbidden,
            format!("patch on {t} needs an unrestricted scope; use update (PUT) under this token"),
        ));
    }
    let current = ctx.store.read(t, id).await?;
    let reachable = current
        .as_ref()
        .and_then(|s| s.body.as_deref())
        .and_then(|b| serde_json::from_str::<Value>(b).ok())
        .is_some_and(|v| grant.permits(ctx, perm, &v));
    if !reachable {
        return Err(not_known(t, id));
    }
    if let RequestBody::Resource(r) = &req.body
        && !grant.permits(ctx, perm, r)
    {
        return Err(outside("update"));
    }
    Ok(())
}

/// A single-resource response, if the token may see it.
fn single(
    ctx: &SharedCtx,
    grant: &Grant,
    ty: &str,
    id: &str,
    r: FhirResponse,
    perm: Perms,
) -> Option<FhirResponse> {
    let ok = match &r.body {
        Body::None | Body::Bytes(..) => true,
        Body::Json(v) => grant.permits(ctx, perm, v),
        // The stored text goes out as is: only what the check reads is parsed.
        Body::Raw(s) => match r.version {
            Some(version) => grant.permits_stored(ctx, ty, id, version, perm, s),
            None => grant.permits_text(ctx, ty, perm, s),
        },
    };
    ok.then_some(r)
}

fn everything_has_patient(r: &FhirResponse, id: &str) -> bool {
    let Body::Json(v) = &r.body else {
        return false;
    };
    v.get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|e| {
            e.pointer("/resource/resourceType").and_then(Value::as_str) == Some("Patient")
                && e.pointer("/resource/id").and_then(Value::as_str) == Some(id)
        })
}

/// Drops from a response every resource the token may not see; returns the response and
/// how many resources it kept.
fn filtered(
    ctx: &SharedCtx,
    grant: &Grant,
    mut r: FhirResponse,
    perm: Perms,
    exact: bool,
) -> (FhirResponse, usize) {
    let mut v = match std::mem::replace(&mut r.body, Body::None) {
        Body::Raw(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v) => v,
            Err(_) => return (r, 0),
        },
        Body::Json(v) => v,
        other => {
            r.body = other;
            return (r, 0);
        }
    };
    let kept = if v.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        filter_bundle(ctx, grant, &mut v, perm, exact)
    } else if v.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
        || grant.permits(ctx, perm, &v)
    {
        1
    } else {
        v = Value::Null;
        0
    };
    if v.is_null() {
        r.body = Body::None;
    } else {
        r.body = Body::Json(v);
    }
    (r, kept)
}

fn filter_bundle(
    ctx: &SharedCtx,
    grant: &Grant,
    bundle: &mut Value,
    perm: Perms,
    exact: bool,
) -> usize {
    let history = bundle.get("type").and_then(Value::as_str) == Some("history");
    let mut dropped_match = false;
    let mut kept = 0;
    if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
        entries.retain_mut(|e| {
            let keep = match e.get_mut("resource") {
                Some(res) => match res.get("resourceType").and_then(Value::as_str) {
                    Some("OperationOutcome") => true,
                    Some("Bundle") => {
                        filter_bundle(ctx, grant, res, perm, exact);
                        true
                    }
                    _ => grant.permits(ctx, perm, res),
                },
                // A history entry of a deletion carries no resource to test: only a token
                // that sees the whole type sees it.
                None if history => e
                    .pointer("/request/url")
                    .and_then(Value::as_str)
                    .and_then(|u| u.split('/').next())
                    .is_some_and(|t| grant.unrestricted(t, perm)),
                None => true,
            };
            if keep {
                kept += 1;
            } else if e.pointer("/search/mode").and_then(Value::as_str) != Some("include") {
                dropped_match = true;
            }
            keep
        });
    }
    if (dropped_match || !exact)
        && let Some(b) = bundle.as_object_mut()
    {
        b.shift_remove("total");
    }
    kept
}
