//! HTTP side of the authorization server: the OAuth endpoints (`/auth/token`,
//! `/auth/introspect`, `/auth/revoke`, form-encoded in, JSON out, never cached) and the
//! SMART discovery document.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::auth::authorize;
use crate::auth::oauth::{self, OAuthError};
use crate::interaction::SharedCtx;

/// Largest OAuth request body (a form with a client assertion).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// JSON with the given `Cache-Control`.
fn json_with(status: u16, body: &Value, cache_control: &'static str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    r
}

/// An OAuth response: never stored (RFC 6749 section 5.1, also `Pragma: no-cache`).
fn json_response(status: u16, body: &Value) -> Response {
    let mut r = json_with(status, body, "no-store");
    r.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// A 401 names the scheme to authenticate with (RFC 6750 section 3).
fn challenge(mut r: Response) -> Response {
    if r.status() == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"iomt-fhir\""),
        );
    }
    r
}

fn oauth_error(e: &OAuthError) -> Response {
    challenge(json_response(e.status, &e.to_json()))
}

/// The grant of the request's `Authorization: Bearer` token.
async fn bearer(
    ctx: &SharedCtx,
    headers: &axum::http::HeaderMap,
) -> crate::error::Result<std::sync::Arc<crate::auth::access::Grant>> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    ctx.auth.authenticate(&ctx.store, header.as_deref()).await
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

/// The routes of the authorization server and the discovery documents; with `--auth off`
/// each answers 404 (authorization is off).
pub fn routes(ctx: SharedCtx) -> axum::Router<SharedCtx> {
    use axum::routing::{delete, get, post};
    axum::Router::new()
        .route(
            "/fhir/.well-known/smart-configuration",
            get(smart_configuration),
        )
        .route(
            "/fhir/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .route("/auth/jwks", get(jwks))
        .route("/auth/launch", post(launch))
        .route("/auth/clients", get(clients_list).post(clients_add))
        .route("/auth/clients/{id}", delete(clients_remove))
        .route("/auth/token", post(token))
        .route("/auth/authorize", get(authorize).post(authorize))
        .route("/auth/login", post(login))
        .route("/auth/consent", post(consent))
        .route("/auth/oidc/start", get(oidc_start))
        .route("/auth/oidc/callback", get(oidc_callback))
        .route("/auth/introspect", post(introspect))
        .route("/auth/revoke", post(revoke))
        .route_layer(axum::middleware::from_fn_with_state(ctx, only_when_enabled))
}

async fn only_when_enabled(
    State(ctx): State<SharedCtx>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if ctx.auth.enabled() {
        next.run(request).await
    } else {
        disabled()
    }
}

fn disabled() -> Response {
    json_response(
        404,
        &json!({"error": "invalid_request", "error_description": "authorization is off (--auth off)"}),
    )
}

/// `POST /auth/token`.
pub async fn token(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let basic = basic_credentials(request.headers());
    let params = match form(request).await {
        Ok(p) => p,
        Err(e) => return oauth_error(&e),
    };
    match oauth::token(&ctx, &params, basic.as_ref()).await {
        Ok(body) => json_response(200, &body),
        Err(e) => oauth_error(&e),
    }
}

/// The caller of introspection and revocation shows a valid access token.
async fn caller(
    ctx: &SharedCtx,
    request: &axum::http::HeaderMap,
) -> Result<std::sync::Arc<crate::auth::access::Grant>, OAuthError> {
    bearer(ctx, request).await.map_err(|e| OAuthError {
        status: 401,
        error: "invalid_client",
        description: e.diagnostics(),
    })
}

/// `POST /auth/introspect`.
pub async fn introspect(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if let Err(e) = caller(&ctx, request.headers()).await {
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
    let grant = match caller(&ctx, request.headers()).await {
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
    json_with(200, &oauth::smart_configuration(&ctx), "no-store")
}

/// `Authorization: Basic base64(id:secret)` (RFC 6749 section 2.3.1: both form-encoded).
fn basic_credentials(headers: &axum::http::HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// An authorization-endpoint outcome as HTTP; the session cookie is `Secure` when the
/// server is reached over HTTPS.
fn outcome(ctx: &SharedCtx, o: authorize::Outcome) -> Response {
    let secure = ctx.base.starts_with("https://");
    let html_response = |status: u16, html: String| {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = (status, html).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // The forms must not be framed by another site (clickjacking on consent).
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert(
            "content-security-policy",
            HeaderValue::from_static(
                "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
            ),
        );
        r
    };
    match o {
        authorize::Outcome::Page { status, html } => html_response(status, html),
        authorize::Outcome::Redirect(url) => {
            let mut r = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&url) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        authorize::Outcome::SignedIn { cookie, html } => {
            let mut r = html_response(200, html);
            set_cookie(
                &mut r,
                authorize::SESSION_COOKIE,
                &cookie,
                "/auth",
                authorize::SESSION_SECS,
                secure,
            );
            // A single sign-on that led here is over.
            set_cookie(&mut r, authorize::OIDC_COOKIE, "", "/auth/oidc", 0, secure);
            r
        }
        authorize::Outcome::Federate { url, cookie } => {
            let mut r = outcome(ctx, authorize::Outcome::Redirect(url));
            set_cookie(
                &mut r,
                authorize::OIDC_COOKIE,
                &cookie,
                "/auth/oidc",
                authorize::FORM_SECS,
                secure,
            );
            r
        }
    }
}

/// Appends a `Set-Cookie` (HttpOnly; SameSite=Lax, so it comes back on the top-level
/// redirect from the hospital's sign-in).
fn set_cookie(r: &mut Response, name: &str, value: &str, path: &str, max_age: i64, secure: bool) {
    let attrs = if secure { "; Secure" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={max_age}{attrs}"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// `GET /auth/oidc/start`: off to the hospital's sign-in.
pub async fn oidc_start(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let params = query(&request);
    outcome(&ctx, authorize::oidc_start(&ctx, &params).await)
}

/// `GET /auth/oidc/callback`: back from the hospital's sign-in.
pub async fn oidc_callback(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let pending = cookie(request.headers(), authorize::OIDC_COOKIE);
    let params = query(&request);
    outcome(
        &ctx,
        authorize::oidc_callback(&ctx, &params, pending.as_deref()).await,
    )
}

fn query(request: &Request) -> Vec<(String, String)> {
    request
        .uri()
        .query()
        .map(crate::interaction::parse_query)
        .unwrap_or_default()
}

/// `GET|POST /auth/authorize` (authorize-post: the same parameters as a form).
pub async fn authorize(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let session = cookie(request.headers(), authorize::SESSION_COOKIE);
    let params = if request.method() == axum::http::Method::POST {
        match form(request).await {
            Ok(p) => p,
            Err(e) => return oauth_error(&e),
        }
    } else {
        query(&request)
    };
    outcome(
        &ctx,
        authorize::authorize(&ctx, &params, session.as_deref()).await,
    )
}

/// `POST /auth/login`.
pub async fn login(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let params = match form(request).await {
        Ok(p) => p,
        Err(e) => return oauth_error(&e),
    };
    outcome(&ctx, authorize::login(&ctx, &params).await)
}

/// `POST /auth/consent`.
pub async fn consent(State(ctx): State<SharedCtx>, request: Request) -> Response {
    let session = cookie(request.headers(), authorize::SESSION_COOKIE);
    let params = match form(request).await {
        Ok(p) => p,
        Err(e) => return oauth_error(&e),
    };
    outcome(
        &ctx,
        authorize::consent(&ctx, &params, session.as_deref()).await,
    )
}

/// `GET /auth/smart-style.json`: the `smart_style_url` of token responses.
pub async fn smart_style() -> Response {
    json_with(
        200,
        &json!({
            "color_background": "#edeae3",
            "color_error": "#9e2d2d",
            "color_highlight": "#69b5ce",
            "color_modal_backdrop": "",
            "color_success": "#498e49",
            "color_text": "#303030",
            "dim_border_radius": "6px",
            "dim_font_size": "13px",
            "dim_spacing_size": "20px",
            "font_family_body": "Georgia, Times, 'Times New Roman', serif",
            "font_family_heading": "\"HelveticaNeue-Light\", Helvetica, Arial, sans-serif"
        }),
        "max-age=3600",
    )
}

/// `GET [base]/.well-known/openid-configuration`.
pub async fn openid_configuration(State(ctx): State<SharedCtx>) -> Response {
    json_with(200, &oauth::openid_configuration(&ctx), "no-store")
}

/// `GET /auth/jwks`.
pub async fn jwks(State(ctx): State<SharedCtx>) -> Response {
    json_with(200, &oauth::jwks(&ctx), "max-age=300")
}

/// The admin API for clients (`/auth/clients`): a token with `system/*.cruds`.
async fn admin(ctx: &SharedCtx, headers: &axum::http::HeaderMap) -> Result<(), Response> {
    let grant = bearer(ctx, headers).await.map_err(|e| fhir_error(&e))?;
    grant
        .require_system_wide(crate::auth::scope::Perms::ALL, "managing clients")
        .map_err(|e| fhir_error(&e))
}

fn fhir_error(e: &crate::error::FhirError) -> Response {
    challenge(json_response(e.status(), &e.to_operation_outcome()))
}

/// The JSON body of an admin request (at most [`MAX_FORM_BYTES`]).
async fn json_body(request: Request) -> Result<Value, Response> {
    let bytes = axum::body::to_bytes(request.into_body(), MAX_FORM_BYTES)
        .await
        .map_err(|_| fhir_error(&crate::error::FhirError::invalid("the body is too large")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| fhir_error(&crate::error::FhirError::invalid(format!("not JSON: {e}"))))
}

/// `GET /auth/clients`: the registrations (no secrets).
pub async fn clients_list(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if let Err(r) = admin(&ctx, request.headers()).await {
        return r;
    }
    match crate::auth::clients::list(&ctx.store).await {
        Ok(list) => json_response(
            200,
            &Value::Array(
                list.iter()
                    .map(crate::auth::clients::Client::to_json)
                    .collect(),
            ),
        ),
        Err(e) => fhir_error(&e),
    }
}

/// `POST /auth/clients` with `{"client_id", "kind", "scope", "jwks"?, "secret"?,
/// "redirect_uris"?, "origins"?}`: registers a client (201), 409 if the id is taken.
pub async fn clients_add(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if let Err(r) = admin(&ctx, request.headers()).await {
        return r;
    }
    let body = match json_body(request).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let text = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let list = |k: &str| -> Vec<String> {
        body.get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let kind = match text("kind").as_str() {
        "public" => crate::auth::clients::Kind::Public,
        "confidential-symmetric" => crate::auth::clients::Kind::ConfidentialSymmetric,
        "confidential-asymmetric" => crate::auth::clients::Kind::ConfidentialAsymmetric,
        k => {
            return fhir_error(&crate::error::FhirError::invalid(format!(
                "kind {k:?}: public, confidential-symmetric or confidential-asymmetric"
            )));
        }
    };
    let scopes = match crate::auth::scope::parse_list(&text("scope")) {
        Ok(s) => s,
        Err(e) => return fhir_error(&crate::error::FhirError::invalid(e)),
    };
    let client = crate::auth::clients::Client {
        id: text("client_id"),
        kind,
        secret_hash: body
            .get("secret")
            .and_then(Value::as_str)
            .map(crate::auth::token_hash),
        jwks: body.get("jwks").cloned(),
        jwks_url: body
            .get("jwks_url")
            .and_then(Value::as_str)
            .map(str::to_string),
        scopes,
        redirect_uris: list("redirect_uris"),
        origins: list("origins"),
    };
    let view = client.to_json();
    match crate::auth::clients::add(&ctx.store, client).await {
        Ok(()) => json_response(201, &view),
        Err(e) => fhir_error(&e),
    }
}

/// `DELETE /auth/clients/{id}`: removes the client and revokes its tokens.
pub async fn clients_remove(
    State(ctx): State<SharedCtx>,
    axum::extract::Path(id): axum::extract::Path<String>,
    request: Request,
) -> Response {
    if let Err(r) = admin(&ctx, request.headers()).await {
        return r;
    }
    match crate::auth::clients::remove(&ctx.store, &id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => fhir_error(&crate::error::FhirError::not_found(format!(
            "no client {id:?}"
        ))),
        Err(e) => fhir_error(&e),
    }
}

/// `POST /auth/launch` with `{"patient": "...", "encounter": "..."}`: an EHR mints a launch
/// handle for the app it is about to open (a `system/*.cruds` token). Answers
/// `{"launch": "<handle>"}`, valid for an hour.
pub async fn launch(State(ctx): State<SharedCtx>, request: Request) -> Response {
    if let Err(r) = admin(&ctx, request.headers()).await {
        return r;
    }
    let body = match json_body(request).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let id = |k: &str| -> Result<Option<String>, String> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if crate::interaction::is_valid_id(s) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{k} must be a resource id")),
        }
    };
    let (patient, encounter) = match (id("patient"), id("encounter")) {
        (Ok(p), Ok(e)) => (p, e),
        (Err(m), _) | (_, Err(m)) => {
            return fhir_error(&crate::error::FhirError::invalid(m));
        }
    };
    match authorize::mint_launch(&ctx, patient.as_deref(), encounter.as_deref()).await {
        Ok(handle) => json_response(201, &json!({"launch": handle})),
        Err(e) => fhir_error(&e),
    }
}
