//! The FHIR REST transport (FHIR R4 http.html): turns HTTP requests into
//! [`FhirRequest`]s and [`FhirResponse`]s into HTTP responses. Content negotiation
//! (`Accept`, `_format`, `Content-Type`), `_pretty`, `_summary`, `_elements`, the
//! conditional and `Prefer` headers, body limits and panic containment live here and
//! nowhere else. This is the only module that knows axum.

mod auth;
mod contain;
mod cors;
mod format;

use axum::Router;
use axum::body::Body as AxumBody;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tower::Layer;

use crate::error::{ErrorKind, FhirError};
use crate::interaction::{
    self, Body, FhirRequest, FhirResponse, Method, RequestBody, Return, SharedCtx,
};
use format::Negotiation;

/// The path the FHIR API is served under; `--base-url` is what clients are told.
pub const FHIR_PREFIX: &str = "/fhir";

/// The HTTP service: all routes, behind panic containment and the CORS wrapper (active
/// under `--auth smart` only). Both wrap the router as a whole: `Router::layer` would wrap
/// every route instead, and each such layer costs a boxed clone of the route's service on
/// every request.
pub type Service = contain::Contain<cors::Cors<Router>>;

/// The HTTP service (see [`Service`]).
pub fn service(ctx: SharedCtx) -> Service {
    let cors = cors::CorsLayer::new(ctx.clone());
    contain::Contain::new(cors.layer(router(ctx)))
}

/// All routes of the server.
fn router(ctx: SharedCtx) -> Router {
    Router::new()
        .route(FHIR_PREFIX, any(fhir))
        .route("/fhir/", any(fhir))
        .route("/fhir/{*rest}", any(fhir))
        .route("/health", any(health))
        .route("/auth/smart-style.json", get(auth::smart_style))
        .merge(auth::routes(ctx.clone()))
        .fallback(not_found)
        .with_state(ctx)
}

async fn health() -> &'static str {
    "ok"
}

async fn not_found() -> Response {
    let e = FhirError::not_found(format!("nothing here: the FHIR API is under {FHIR_PREFIX}"));
    render_error(&e, &Negotiation::default())
}

fn panic_response() -> Response {
    // The panic message itself was already printed by the panic hook with the backtrace
    // location; the client gets no internals.
    tracing::error!("panic while handling a request");
    render_error(&FhirError::internal("panic"), &Negotiation::default())
}

async fn fhir(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let query = parts
        .uri
        .query()
        .map(interaction::parse_query)
        .unwrap_or_default();
    // `$hl7v2` answers with an HL7 acknowledgement unless the client accepts FHIR JSON.
    let hl7 = parts.uri.path().ends_with("/$hl7v2");
    let accept = parts
        .headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let wants_fhir_json =
        accept.contains("application/fhir+json") || accept.contains("application/json");
    let negotiation = match Negotiation::from_request(&parts.headers, &query) {
        Ok(n) => n,
        Err(_) if hl7 => Negotiation::default(),
        Err(e) => return render_error(&e, &Negotiation::default()),
    };
    let head = parts.method == axum::http::Method::HEAD;
    // The token is checked before the body is read; only the CapabilityStatement is open
    // without one (clients discover the OAuth endpoints there).
    let audited = ctx.auth.enabled() && !is_metadata(parts.uri.path());
    let grant = if audited {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        Some(ctx.auth.authenticate(&ctx.store, header).await)
    } else {
        None
    };
    let (granted, denied) = match grant {
        Some(Ok(g)) => (Some(g), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let result = async {
        if let Some(e) = denied {
            return Err(e);
        }
        let mut req = build_request(&ctx, &parts, query, body).await?;
        req.wants_fhir_json = wants_fhir_json;
        req.grant = granted.clone();
        interaction::handle(&ctx, req).await
    }
    .await;
    let mut response = match result {
        Ok(r) => render(&ctx, r, &negotiation),
        Err(e) => render_error(&e, &negotiation),
    };
    if head {
        *response.body_mut() = AxumBody::empty();
    }
    let read = matches!(
        parts.method,
        axum::http::Method::GET | axum::http::Method::HEAD
    ) || parts.uri.path().ends_with("/_search");
    if audited && (ctx.auth.audit_reads || !read || response.status().as_u16() >= 400) {
        let address = parts
            .extensions
            .get::<axum::extract::ConnectInfo<crate::tls::PeerAddr>>()
            .map(|c| c.0.0.ip());
        let at = crate::time::now_micros();
        let target = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let status = response.status().as_u16();
        // A successful GET read is counted in the audit ledger (no record queued); the
        // rest queue a record each.
        let counted = parts.method == axum::http::Method::GET
            && status < 400
            && granted
                .as_ref()
                .is_some_and(|g| ctx.audit.read(ctx.defs, g, address, target, status, at));
        if !counted {
            ctx.audit
                .record(interaction::audit::Record {
                    at,
                    method: Method::parse(parts.method.as_str()),
                    target: target.to_string(),
                    status,
                    grant: granted,
                    address,
                })
                .await;
        }
    }
    response
}

fn is_metadata(path: &str) -> bool {
    // Slashes trimmed bytewise: `trim_matches` decodes every character of every path.
    path.strip_prefix(FHIR_PREFIX).is_some_and(|p| {
        let b = p.as_bytes();
        if b.first() != Some(&b'/') {
            return false;
        }
        let start = b.iter().position(|&c| c != b'/').unwrap_or(b.len());
        let end = b.iter().rposition(|&c| c != b'/').map_or(start, |e| e + 1);
        &b[start..end] == b"metadata"
    })
}

async fn build_request(
    ctx: &SharedCtx,
    parts: &axum::http::request::Parts,
    query: Vec<(String, String)>,
    body: AxumBody,
) -> Result<FhirRequest, FhirError> {
    let path = parts
        .uri
        .path()
        .strip_prefix(FHIR_PREFIX)
        .unwrap_or(parts.uri.path());
    let segments = interaction::split_path(path);
    let method = Method::parse(parts.method.as_str());
    let mut req = FhirRequest::new(method, segments, query);
    let h = &parts.headers;
    let text = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    req.if_match = text("if-match");
    req.if_none_match = text("if-none-match");
    req.if_none_exist = text("if-none-exist");
    req.if_modified_since = match text("if-modified-since") {
        Some(s) => Some(crate::time::parse_http_date(&s).ok_or_else(|| {
            FhirError::invalid(format!("If-Modified-Since {s:?} is not an HTTP date"))
        })?),
        None => None,
    };
    if let Some(prefer) = text("prefer") {
        for part in prefer.split([',', ';']).map(str::trim) {
            match part {
                "return=minimal" => req.prefer_return = Some(Return::Minimal),
                "return=representation" => req.prefer_return = Some(Return::Representation),
                "return=OperationOutcome" => req.prefer_return = Some(Return::OperationOutcome),
                "handling=lenient" => req.prefer_lenient = true,
                "handling=strict" => req.prefer_lenient = false,
                _ => {}
            }
        }
    }
    if let Some(len) = text("content-length").and_then(|l| l.parse::<usize>().ok())
        && len > ctx.limits.max_body_bytes
    {
        return Err(too_large(ctx.limits.max_body_bytes));
    }
    let bytes = axum::body::to_bytes(body, ctx.limits.max_body_bytes)
        .await
        .map_err(|_| too_large(ctx.limits.max_body_bytes))?;
    if bytes.is_empty() {
        return Ok(req);
    }
    let content_type = text("content-type")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    req.body = match media.as_str() {
        "application/json-patch+json" => RequestBody::JsonPatch(parse_json(&bytes)?),
        "x-application/hl7-v2+er7"
        | "application/hl7-v2"
        | "application/edi-hl7"
        | "text/plain"
            if req.segments.last().is_some_and(|s| s == "$hl7v2") =>
        {
            RequestBody::Bytes(bytes.to_vec())
        }
        ""
        | "application/json"
        | "application/x-ndjson"
        | "application/ndjson"
        | "application/fhir+ndjson"
        | "text/plain"
            if req.segments.first().is_some_and(|s| s == "$device-data") =>
        {
            RequestBody::Bytes(bytes.to_vec())
        }
        "application/x-www-form-urlencoded"
            if req.segments.last().is_none_or(|s| s != "_search") =>
        {
            return Err(FhirError::new(
                ErrorKind::UnsupportedMediaType,
                "Content-Type application/x-www-form-urlencoded is only for POST [type]/_search; send resources as application/fhir+json",
            ));
        }
        "application/x-www-form-urlencoded" => RequestBody::Form(
            form_urlencoded::parse(&bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ),
        // A missing Content-Type is read as JSON: curl users and some device gateways omit it.
        "" | "application/fhir+json" | "application/json" | "application/json+fhir" => {
            let v = parse_json(&bytes)?;
            if method == Method::Patch {
                return Err(FhirError::new(
                    ErrorKind::UnsupportedMediaType,
                    "PATCH takes JSON Patch (application/json-patch+json); FHIRPath Patch is not supported",
                ));
            }
            RequestBody::Resource(v)
        }
        m => {
            return Err(FhirError::new(
                ErrorKind::UnsupportedMediaType,
                format!("Content-Type {m:?} is not supported; send application/fhir+json"),
            ));
        }
    };
    Ok(req)
}

fn too_large(limit: usize) -> FhirError {
    FhirError::new(
        ErrorKind::TooLarge,
        format!("the request body exceeds the limit of {limit} bytes"),
    )
}

fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, FhirError> {
    serde_json::from_slice(bytes)
        .map_err(|e| FhirError::invalid(format!("the body is not valid JSON: {e}")))
}

fn render(ctx: &SharedCtx, r: FhirResponse, n: &Negotiation) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = HeaderMap::new();
    if let Some(v) = r.version
        && let Ok(h) = HeaderValue::from_str(&format!("W/\"{v}\""))
    {
        headers.insert(header::ETAG, h);
    }
    if let Some(t) = r.last_modified
        && let Ok(h) = HeaderValue::from_str(&crate::time::format_http_date(t))
    {
        headers.insert(header::LAST_MODIFIED, h);
    }
    if let Some(l) = &r.location
        && let Ok(h) = HeaderValue::from_str(&format!("{}/{l}", ctx.base))
    {
        headers.insert(header::LOCATION, h.clone());
        headers.insert(header::CONTENT_LOCATION, h);
    }
    let text = match r.body {
        Body::Bytes(content_type, bytes) => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            return (status, headers, bytes).into_response();
        }
        Body::None => None,
        Body::Raw(s) if !n.transforms() => Some(s),
        Body::Raw(s) => match serde_json::from_str::<serde_json::Value>(&s) {
            Ok(v) => Some(n.serialise(ctx, v, r.is_resource)),
            Err(_) => Some(s),
        },
        Body::Json(v) => Some(n.serialise(ctx, v, r.is_resource)),
    };
    match text {
        None => (status, headers).into_response(),
        Some(t) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(n.content_type),
            );
            (status, headers, t).into_response()
        }
    }
}

fn render_error(e: &FhirError, n: &Negotiation) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let oo = e.to_operation_outcome();
    let text = if n.pretty {
        serde_json::to_string_pretty(&oo)
    } else {
        serde_json::to_string(&oo)
    }
    .unwrap_or_default();
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(n.content_type),
        )],
        text,
    )
        .into_response();
    if e.kind == ErrorKind::Unauthorized {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"iomt-fhir\", error=\"invalid_token\""),
        );
    }
    if e.kind == ErrorKind::Unavailable {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_capability_statement_counts_as_metadata() {
        for p in ["/fhir/metadata", "/fhir//metadata/", "/fhir/metadata//"] {
            assert!(super::is_metadata(p), "{p}");
        }
        for p in [
            "/fhir",
            "/fhir/",
            "/fhir/metadatax",
            "/fhir/meta",
            "/fhir/Observation/metadata",
            "/metadata",
            "/fhirmetadata",
        ] {
            assert!(!super::is_metadata(p), "{p}");
        }
    }
}
