//! CORS under `--auth smart` (SMART App Launch 2.0: browser apps call the token endpoint and
//! the API from their own origin). Discovery (`.well-known/smart-configuration`, `metadata`)
//! is open to any origin; the API and the token, introspection and revocation endpoints
//! answer cross-origin only to origins registered for some client (`clients add --origin`).
//! The sign-in and consent pages are navigations, never cross-origin calls.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, Either};

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

/// The CORS layer around the whole router (see `rest::service`); it answers cross-origin
/// only under `--auth smart`. A request without an `Origin` header (every non-browser
/// client), and every request without `--auth smart`, goes straight to the router's own
/// future: nothing is boxed or copied for it.
#[derive(Clone)]
pub struct CorsLayer {
    ctx: SharedCtx,
}

impl CorsLayer {
    pub fn new(ctx: SharedCtx) -> CorsLayer {
        CorsLayer { ctx }
    }
}

impl<S> tower::Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            inner,
            enabled: self.ctx.auth.enabled(),
            ctx: self.ctx.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    /// `--auth smart`: cross-origin answers exist only then.
    enabled: bool,
    ctx: SharedCtx,
}

impl<S> tower::Service<Request> for Cors<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if !self.enabled {
            return Either::Left(self.inner.call(request));
        }
        let Some(origin) = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_string)
        else {
            return Either::Left(self.inner.call(request));
        };
        // The service made ready by `poll_ready` handles this request; a fresh clone
        // takes its place for the next one.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let ctx = self.ctx.clone();
        Either::Right(Box::pin(async move {
            Ok(cross_origin(ctx, origin, request, ready).await)
        }))
    }
}

/// A request with an `Origin` header: its CORS answer, or the inner service's answer with
/// the CORS headers the origin may see.
async fn cross_origin<S>(ctx: SharedCtx, origin: String, request: Request, mut next: S) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    let allowed = match policy(request.uri().path()) {
        Policy::None => return run(&mut next, request).await,
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
        return run(&mut next, request).await;
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
        run(&mut next, request).await
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

/// The inner service's answer (it cannot fail).
async fn run<S>(next: &mut S, request: Request) -> Response
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    match next.call(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}
