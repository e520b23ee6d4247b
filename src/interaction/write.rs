//! The steps every write shares (FHIR R4 http.html create/update/patch/delete): checking a
//! resource against its URL, validating it, preparing it for storage, resolving
//! conditional URLs and checking `If-Match`.

use serde_json::{Map, Value};

use crate::error::{ErrorKind, FhirError, Issue, Result};
use crate::interaction::{Ctx, parse_etag};
use crate::search::extract::extract;
use crate::search::query::parse_condition;
use crate::store::resource::{Current, Prepared, prepare};
use crate::store::{Db, Ty};

/// Checks the rules the JSON schema cannot express and validates against the R4
/// definitions. `url_id` is the id from the URL of an update (the body must carry it).
pub fn check(ctx: &Ctx, ty: &str, resource: &mut Value, url_id: Option<&str>) -> Result<()> {
    let obj = resource
        .as_object_mut()
        .ok_or_else(|| FhirError::invalid("the body must be a JSON object (a FHIR resource)"))?;
    match obj.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == ty => {}
        Some(t) => {
            return Err(FhirError::invalid(format!(
                "resourceType {t:?} does not match the URL's type {ty:?}"
            ))
            .at("resourceType"));
        }
        None => return Err(FhirError::invalid("the body has no resourceType").at("resourceType")),
    }
    if let Some(url_id) = url_id {
        match obj.get("id").and_then(Value::as_str) {
            Some(id) if id == url_id => {}
            Some(id) => {
                return Err(FhirError::invalid(format!(
                    "the body's id {id:?} does not match the URL's id {url_id:?}"
                ))
                .at(format!("{ty}.id")));
            }
            None => {
                return Err(
                    FhirError::invalid("an update needs the resource id in the body")
                        .at(format!("{ty}.id")),
                );
            }
        }
    }
    // meta.versionId and meta.lastUpdated belong to the server: whatever the client sent is
    // replaced when stored; drop them here so validation does not judge them.
    if let Some(meta) = obj.get_mut("meta").and_then(Value::as_object_mut) {
        meta.shift_remove("versionId");
        meta.shift_remove("lastUpdated");
    }
    validate(ctx, resource)
}

/// Validates a resource; problems become one 422 OperationOutcome listing them all.
pub fn validate(ctx: &Ctx, resource: &Value) -> Result<()> {
    let problems = ctx.defs.validator.validate(resource);
    if problems.is_empty() {
        return Ok(());
    }
    Err(FhirError {
        kind: ErrorKind::Unprocessable,
        issues: problems
            .into_iter()
            .map(|p| Issue {
                severity: "error",
                code: p.code.as_code(),
                diagnostics: p.message,
                expression: if p.expression.is_empty() {
                    vec![]
                } else {
                    vec![p.expression]
                },
            })
            .collect(),
    })
}

/// Sets the id, orders `resourceType, id, meta` first, extracts search index entries and
/// serialises the resource for storage.
pub fn prepare_with_id(ctx: &Ctx, resource: Value, id: &str) -> Result<Prepared> {
    let mut resource = shape(resource, id)?;
    let index = index(ctx, &resource);
    prepare(&mut resource, index)
}

/// The search index entries of a resource (none when indexing is off).
pub fn index(ctx: &Ctx, resource: &Value) -> Vec<crate::search::extract::IndexEntry> {
    if ctx.search_indexing {
        extract(&ctx.registry(), resource)
    } else {
        Vec::new()
    }
}

/// Sets the id and orders `resourceType, id, meta` first.
pub fn shape(resource: Value, id: &str) -> Result<Value> {
    let Value::Object(obj) = resource else {
        return Err(FhirError::invalid(
            "the body must be a JSON object (a FHIR resource)",
        ));
    };
    let mut ordered = Map::with_capacity(obj.len() + 2);
    let mut rest = obj;
    if let Some(t) = rest.shift_remove("resourceType") {
        ordered.insert("resourceType".into(), t);
    }
    rest.shift_remove("id");
    ordered.insert("id".into(), Value::String(id.to_string()));
    // meta goes third even when absent: storage fills in versionId and lastUpdated.
    let meta = rest
        .shift_remove("meta")
        .unwrap_or_else(|| Value::Object(Map::new()));
    ordered.insert("meta".into(), meta);
    ordered.extend(rest);
    Ok(Value::Object(ordered))
}

/// The ids matching a conditional URL's query, at most `limit` of them, seen from inside
/// the caller's transaction.
pub async fn matching_ids(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    query: &str,
    limit: usize,
) -> Result<Vec<String>> {
    let mut q = parse_condition(&ctx.registry(), ty, query)?;
    crate::interaction::search_type::bind_value_sets(db, &mut q).await?;
    // Earlier writes of this job must be visible to the condition.
    db.flush().await?;
    let b = q.ids_sql(limit);
    let rows = db.search_rows(&b.sql, &b.args, &[Ty::Text]).await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.into_iter().next().and_then(|v| v.text()))
        .collect())
}

/// Checks `If-Match` against the current version (http.html#concurrency).
pub fn check_if_match(if_match: Option<&str>, current: Option<&Current>, what: &str) -> Result<()> {
    let Some(expected) = if_match else {
        return Ok(());
    };
    let expected = parse_etag(expected).ok_or_else(|| {
        FhirError::invalid(format!("If-Match {expected:?} is not an ETag like W/\"3\""))
    })?;
    match current {
        Some(c) if !c.deleted && c.version == expected => Ok(()),
        Some(c) => Err(FhirError::precondition(format!(
            "{what} is at version {}{}, not {expected}",
            c.version,
            if c.deleted { " (deleted)" } else { "" }
        ))),
        None => Err(FhirError::precondition(format!("{what} does not exist"))),
    }
}

/// True when a reference value is conditional (`Patient?identifier=...`).
pub fn is_conditional_reference(r: &str) -> bool {
    r.split_once('?')
        .is_some_and(|(t, _)| !t.contains('/') && !t.contains(':'))
}

/// Calls `f` on every `reference` string in a resource.
pub fn walk_references(v: &mut Value, f: &mut dyn FnMut(&mut String) -> Result<()>) -> Result<()> {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                {
                    f(s)?;
                } else {
                    walk_references(child, f)?;
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                walk_references(item, f)?;
            }
        }
        _ => {}
    }
    Ok(())
}

pub fn has_conditional_reference(v: &Value) -> bool {
    // Read-only twin of `walk_references`: called for every write, so no clone.
    match v {
        Value::Object(map) => map.iter().any(|(k, child)| match child {
            Value::String(r) if k == "reference" => is_conditional_reference(r),
            _ => has_conditional_reference(child),
        }),
        Value::Array(items) => items.iter().any(has_conditional_reference),
        _ => false,
    }
}

/// Resolves every conditional reference of `resource` to the one resource it matches
/// (http.html#trules), inside the caller's transaction; `resolved` caches answers.
pub async fn resolve_conditional_references(
    db: &mut Db,
    ctx: &Ctx,
    resource: &mut Value,
    resolved: &mut std::collections::HashMap<String, String>,
) -> Result<()> {
    let mut pending = Vec::new();
    walk_references(resource, &mut |s| {
        if is_conditional_reference(s) && !resolved.contains_key(s.as_str()) {
            pending.push(s.clone());
        }
        Ok(())
    })?;
    for cref in pending {
        let Some((t, q)) = cref.split_once('?') else {
            continue;
        };
        if !ctx.defs.is_resource_type(t) {
            return Err(FhirError::invalid(format!(
                "{cref:?} names no resource type"
            )));
        }
        let found = matching_ids(db, ctx, t, q, 2).await?;
        match found.as_slice() {
            [one] => {
                resolved.insert(cref.clone(), format!("{t}/{one}"));
            }
            [] => {
                return Err(FhirError::precondition(format!(
                    "the conditional reference {cref:?} matches nothing"
                )));
            }
            _ => {
                return Err(FhirError::precondition(format!(
                    "the conditional reference {cref:?} matches more than one {t}"
                )));
            }
        }
    }
    walk_references(resource, &mut |s| {
        if let Some(new) = resolved.get(s.as_str()) {
            *s = new.clone();
        }
        Ok(())
    })
}

/// Resolves conditional references inside the job, then prepares the resource for storage
/// (for writes whose resource needs the database before it can be serialised).
pub async fn resolve_and_prepare(
    db: &mut Db,
    ctx: &Ctx,
    mut resource: Value,
    id: &str,
) -> Result<Prepared> {
    resolve_conditional_references(db, ctx, &mut resource, &mut Default::default()).await?;
    prepare_with_id(ctx, resource, id)
}
