//! CORS under `--auth smart` (SMART App Launch 2.0: browser apps call the token endpoint and
//! the API from their own origin). Discovery (`.well-known/smart-configuration`, `metadata`)
//! is open to any origin; the API and the token, introspection and revocation endpoints
//! answer cross-origin only to origins registered for some client (`clients add --origin`).
//! The sign-in and consent pages are navigations, never cross-origin calls.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::interaction::SharedCtx;

const ALLOW_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";
const ALLOW_HEADERS: &str = "Authorization, Content-Type, Accept, If-Match, If-None-Match, If-None-Exist, If-Modified-Since, Prefer";
const EXPOSE_HEADERS: &str = "Location, Content-Location, ETag, Last-Modified, WWW-Authenticate";

enum Policy {
    /// Any origin (discovery).
    Open,
    /// Registered origins only.
    Registered,
    /// No CORS at all.
    None,
}

fn policy(path: &str) -> Policy {
    match path {
        "/fhir/.well-known/smart-configuration"
        | "/fhir/.well-known/openid-configuration"
        | "/fhir/metadata"
        | "/auth/jwks"
        | "/auth/smart-style.json" => Policy::Open,
        "/auth/token" | "/auth/introspect" | "/auth/revoke" => Policy::Registered,
        p if p == "/fhir" || p.starts_with("/fhir/") => Policy::Registered,
        _ => Policy::None,
    }
}

/// Installed only under `--auth smart` (see `rest::router`).
pub async fn layer(State(ctx): State<SharedCtx>, request: Request, next: Next) -> Response {
    let Some(origin) = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string)
    else {
        return next.run(request).await;
    };
    let allowed = match policy(request.uri().path()) {
        Policy::None => return next.run(request).await,
        Policy::Open => Some(HeaderValue::from_static("*")),
        Policy::Registered => {
            if crate::auth::clients::origin_registered(&ctx, &origin).await {
                HeaderValue::from_str(&origin).ok()
            } else {
                None
            }
        }
    };
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let Some(allowed) = allowed else {
        if preflight {
            return StatusCode::FORBIDDEN.into_response();
        }
        // Answered without CORS headers: the browser withholds the response.
        return next.run(request).await;
    };
    let mut response = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}
