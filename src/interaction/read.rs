//! read and vread (FHIR R4 http.html#read, #vread), with conditional read
//! (`If-None-Match`, `If-Modified-Since`).

use crate::error::{ErrorKind, FhirError, Result};
use crate::interaction::create::stored_response;
use crate::interaction::{Body, FhirRequest, FhirResponse, SharedCtx, parse_etag};

/// The answer for a resource that does not exist. Whatever is out of a token's reach gets
/// exactly this too (`authorized.rs`), so the text must not differ between the two.
pub fn not_known(ty: &str, id: &str) -> FhirError {
    FhirError::not_found(format!("{ty}/{id} is not known"))
}

/// The answer for a version that does not exist (and for one out of reach).
pub fn no_version(ty: &str, id: &str, vid: &str) -> FhirError {
    FhirError::not_found(format!("{ty}/{id} has no version {vid}"))
}

/// `GET [base]/[type]/[id]`.
pub async fn read(ctx: &SharedCtx, ty: &str, id: &str, req: &FhirRequest) -> Result<FhirResponse> {
    let stored = ctx
        .store
        .read(ty, id)
        .await?
        .ok_or_else(|| not_known(ty, id))?;
    if stored.body.is_none() {
        let mut e = FhirError::new(ErrorKind::Gone, format!("{ty}/{id} was deleted"));
        e.issues[0]
            .diagnostics
            .push_str(&format!(" (version {})", stored.version));
        return Err(e);
    }
    let not_modified = req
        .if_none_match
        .as_deref()
        .and_then(parse_etag)
        .is_some_and(|v| v == stored.version)
        || req
            .if_modified_since
            .is_some_and(|since| stored.last_updated / 1_000_000 <= since / 1_000_000);
    let mut r = stored_response(stored, 200);
    r.location = None;
    if not_modified {
        r.status = 304;
        r.body = Body::None;
    }
    Ok(r)
}

/// `GET [base]/[type]/[id]/_history/[vid]`.
pub async fn vread(ctx: &SharedCtx, ty: &str, id: &str, vid: &str) -> Result<FhirResponse> {
    let version: i64 = vid
        .parse()
        .map_err(|_| FhirError::not_found(format!("{ty}/{id} has no version {vid:?}")))?;
    let mut db = ctx.store.reader().await?;
    let stored = db
        .vread(ty, id, version)
        .await?
        .ok_or_else(|| no_version(ty, id, vid))?;
    if stored.body.is_none() {
        return Err(FhirError::new(
            ErrorKind::Gone,
            format!("{ty}/{id} version {vid} is a deletion"),
        ));
    }
    let mut r = stored_response(stored, 200);
    r.location = None;
    Ok(r)
}
