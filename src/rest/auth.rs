//! HTTP side of the authorization server: the OAuth endpoints (`/auth/token`,
//! `/auth/introspect`, `/auth/revoke`, form-encoded in, JSON out, never cached) and the
//! SMART discovery document.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::oauth::{self, OAuthError};
use crate::interaction::SharedCtx;

/// Largest OAuth request body (a form with a client assertion).
const MAX_FORM_BYTES: usize = 64 * 1024;

fn json_response(status: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn oauth_error(e: &OAuthError) -> Response {
    let mut r = json_response(e.status, &e.to_json());
    if e.status == 401 {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"iomt-fhir\""),
        );
    }
    r
}

async fn form(request: Request) -> Result<Vec<(String, String)>, OAuthError> {
    let (parts, body) = request.into_parts();
    let media = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media != "application/x-www-form-urlencoded" {
        return Err(OAuthError {
            status: 400,
            error: "invalid_request",
            description: "send the parameters as application/x-www-form-urlencoded".into(),
        });
    }
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| OAuthError {
            status: 400,
            error: "invalid_request",
            description: format!("the request body exceeds {MAX_FORM_BYTES} bytes"),
        })?;
    Ok(form_urlencoded::parse(&bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

fn disabled() -> Response {
    json_response(
        404,
        &json!({"error": "invalid_request", "error_description": "authorization is off (--auth off)"}),
    )
}

/// `POST /auth/token`.
pub async fn token(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if !ctx.auth.enabled() {
        return disabled();
    }
    let params = match form(request).await {
        Ok(p) => p,
        Err(e) => return oauth_error(&e),
    };
    match oauth::token(&ctx, &params).await {
        Ok(body) => json_response(200, &body),
        Err(e) => oauth_error(&e),
    }
}

/// The caller of introspection and revocation shows a valid access token.
async fn caller(
    ctx: &SharedCtx,
    request: &axum::http::HeaderMap,
) -> Result<std::sync::Arc<crate::auth::access::Grant>, OAuthError> {
    let header = request
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    ctx.auth
        .authenticate(&ctx.store, header.as_deref())
        .await
        .map_err(|e| OAuthError {
            status: 401,
            error: "invalid_client",
            description: e.diagnostics(),
        })
}

/// `POST /auth/introspect`.
pub async fn introspect(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if !ctx.auth.enabled() {
        return disabled();
    }
    if let Err(e) = caller(&ctx, &request.headers().clone()).await {
        return oauth_error(&e);
    }
    let params = match form(request).await {
        Ok(p) => p,
        Err(e) => return oauth_error(&e),
    };
    match oauth::introspect(&ctx, &params).await {
        Ok(body) => json_response(200, &body),
        Err(e) => oauth_error(&e),
    }
}

/// `POST /auth/revoke`.
pub async fn revoke(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if !ctx.auth.enabled() {
        return disabled();
    }
    let grant = match caller(&ctx, &request.headers().clone()).await {
        Ok(g) => g,
        Err(e) => return oauth_error(&e),
    };
    let params = match form(request).await {
        Ok(p) => p,
        Err(e) => return oauth_error(&e),
    };
    match oauth::revoke(&ctx, &grant, &params).await {
        Ok(body) => json_response(200, &body),
        Err(e) => oauth_error(&e),
    }
}

/// `GET [base]/.well-known/smart-configuration`: open to any origin, always JSON.
pub async fn smart_configuration(State(ctx): State<SharedCtx>) -> Response {
    if !ctx.auth.enabled() {
        return disabled();
    }
    let mut r = json_response(200, &oauth::smart_configuration(&ctx));
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r.headers_mut().remove(header::PRAGMA);
    r
}
