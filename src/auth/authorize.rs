//! The SMART App Launch authorization endpoint (app-launch.html#obtain-authorization-code):
//! the request is checked (client, exact redirect_uri, `aud` = the FHIR base, PKCE S256,
//! scopes narrowed to the registration, an EHR `launch` handle), the user signs in with a
//! local account, sees the scopes on a consent page (and picks a patient for a standalone
//! `launch/patient`), and the app gets a single-use code valid for [`CODE_SECS`]. The
//! pending request travels through the forms sealed (see `seal.rs`), never in server memory,
//! so any process sharing the database can continue it.

use serde_json::{Value, json};

use crate::auth::clients::{self, Client};
use crate::auth::federation::Federation;
use crate::auth::oauth::IssuedToken;
use crate::auth::scope::{self, Scope};
use crate::auth::{new_token, param, repeated, token_hash};
use crate::interaction::Ctx;

/// Lifetime of an authorization code.
pub const CODE_SECS: i64 = 60;
/// Lifetime of a sealed login/consent form, and of a sign-in session.
pub const FORM_SECS: i64 = 600;
pub const SESSION_SECS: i64 = 8 * 3600;
/// Lifetime of an EHR launch handle.
pub const LAUNCH_SECS: i64 = 3600;
pub const SESSION_COOKIE: &str = "iomt_session";
/// The pending sign-in at the hospital's OpenID Connect provider (see `federation.rs`).
pub const OIDC_COOKIE: &str = "iomt_oidc";

/// What the endpoint answers.
#[derive(Debug)]
pub enum Outcome {
    /// An HTML page (login, consent, or an error that cannot go back to the app).
    Page { status: u16, html: String },
    /// A redirect back to the app (a code, or an error with `state`).
    Redirect(String),
    /// Signed in: set the session cookie, then show `html`.
    SignedIn { cookie: String, html: String },
    /// Off to the hospital's sign-in (`url`), with the sealed pending sign-in as the
    /// [`OIDC_COOKIE`].
    Federate { url: String, cookie: String },
}

fn page(status: u16, title: &str, body: &str) -> Outcome {
    Outcome::Page {
        status,
        html: html(title, body),
    }
}

fn unavailable() -> Outcome {
    page(503, "Unavailable", "<p>Try again.</p>")
}

/// The sealing key, loaded at start under `--auth smart`.
fn sealer(ctx: &Ctx) -> Result<&crate::auth::seal::Sealer, Outcome> {
    ctx.auth.sealer().ok_or_else(unavailable)
}

/// The pending request a sign-in or consent form carries, if intact and not expired.
fn open_form(ctx: &Ctx, params: &[(String, String)], form: &str) -> Result<Value, Outcome> {
    let sealer = sealer(ctx)?;
    param(params, "request")
        .and_then(|r| sealer.open(r, now_s()))
        .ok_or_else(|| {
            page(
                400,
                "Expired",
                &format!("<p>This {form} form has expired; start again from the application.</p>"),
            )
        })
}

fn html(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    )
}

/// HTML escaping for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn redirect_error(
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> Outcome {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("error", error);
    q.append_pair("error_description", description);
    if let Some(s) = state {
        q.append_pair("state", s);
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    Outcome::Redirect(format!("{redirect_uri}{sep}{}", q.finish()))
}

/// A checked authorization request.
struct Checked {
    client: Client,
    request: Value,
}

async fn check(ctx: &Ctx, params: &[(String, String)]) -> Result<Checked, Outcome> {
    if let Some(k) = repeated(params) {
        return Err(page(
            400,
            "Bad request",
            &format!("<p>Parameter {} is repeated.</p>", esc(k)),
        ));
    }
    // Until the client and its redirect_uri are known good, errors stay on this server.
    let client_id = param(params, "client_id").unwrap_or("");
    let client = clients::get(&ctx.store, client_id)
        .await
        .map_err(|_| unavailable())?
        .ok_or_else(|| {
            page(
                400,
                "Unknown application",
                &format!("<p>No application is registered as {}.</p>", esc(client_id)),
            )
        })?;
    let redirect_uri = param(params, "redirect_uri").unwrap_or("");
    if !client.redirect_uris.iter().any(|u| u == redirect_uri) {
        return Err(page(
            400,
            "Bad redirect_uri",
            "<p>The redirect_uri is not one registered for this application.</p>",
        ));
    }
    let state = param(params, "state").filter(|s| !s.is_empty());
    let fail =
        |error: &str, description: &str| redirect_error(redirect_uri, error, description, state);
    if param(params, "response_type") != Some("code") {
        return Err(fail(
            "unsupported_response_type",
            "response_type must be code",
        ));
    }
    let Some(state) = state else {
        return Err(fail("invalid_request", "state is required"));
    };
    if param(params, "aud") != Some(ctx.base.as_str()) {
        return Err(fail(
            "invalid_request",
            &format!("aud must be this server's FHIR base URL, {}", ctx.base),
        ));
    }
    if param(params, "code_challenge_method") != Some("S256") {
        return Err(fail(
            "invalid_request",
            "code_challenge_method must be S256 (PKCE)",
        ));
    }
    let challenge = param(params, "code_challenge").unwrap_or("").trim();
    if challenge.len() != 43
        || !challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(fail(
            "invalid_request",
            "code_challenge must be the base64url SHA-256 of the code_verifier (43 characters)",
        ));
    }
    let asked = scope::parse_list(param(params, "scope").unwrap_or(""))
        .map_err(|e| fail("invalid_scope", &e))?;
    let granted = scope::narrow(&client.scopes, &asked);
    if !granted.iter().any(|s| matches!(s, Scope::Resource(_))) {
        return Err(fail(
            "invalid_scope",
            "none of the requested resource scopes is allowed for this application",
        ));
    }
    // EHR launch: the handle names the patient and encounter in context.
    let (mut patient, mut encounter) = (None, None);
    if let Some(launch) = param(params, "launch") {
        let ctx_row = launch_context(ctx, launch)
            .await
            .map_err(|_| fail("server_error", "try again"))?;
        match ctx_row {
            Some((p, e)) => {
                patient = p;
                encounter = e;
            }
            None => {
                return Err(fail(
                    "invalid_request",
                    "the launch handle is unknown or expired",
                ));
            }
        }
    }
    Ok(Checked {
        request: json!({
            "client_id": client.id,
            "redirect_uri": redirect_uri,
            "state": state,
            "scope": scope::to_text(&granted),
            "code_challenge": challenge,
            "launch": param(params, "launch").is_some(),
            "patient": patient,
            "encounter": encounter,
            "nonce": param(params, "nonce"),
        }),
        client,
    })
}

async fn launch_context(
    ctx: &Ctx,
    handle: &str,
) -> crate::error::Result<Option<(Option<String>, Option<String>)>> {
    let row = crate::auth::live_token(
        &ctx.store,
        &token_hash(handle),
        "launch",
        crate::time::now_micros(),
    )
    .await?;
    Ok(row.map(|r| (r.patient, r.encounter)))
}

/// Mints an EHR launch handle with this context (`iomt-fhir launch`).
pub async fn mint_launch(
    ctx: &Ctx,
    patient: Option<&str>,
    encounter: Option<&str>,
) -> crate::error::Result<String> {
    let handle = new_token()?;
    let mut row = IssuedToken::new("launch", &handle, "", "", LAUNCH_SECS);
    row.patient = patient.map(str::to_string);
    row.encounter = encounter.map(str::to_string);
    ctx.store
        .write(move |db| Box::pin(async move { row.insert(db).await }))
        .await?;
    Ok(handle)
}

fn now_s() -> i64 {
    crate::time::now_micros() / 1_000_000
}

/// The signed-in user of a session cookie: (username, fhirUser).
fn session_user(ctx: &Ctx, cookie: Option<&str>) -> Option<(String, String)> {
    let sealer = ctx.auth.sealer()?;
    let v = sealer.open(cookie?, now_s())?;
    Some((
        v.get("user")?.as_str()?.to_string(),
        v.get("fhirUser")?.as_str()?.to_string(),
    ))
}

/// `GET|POST /auth/authorize`.
pub async fn authorize(ctx: &Ctx, params: &[(String, String)], cookie: Option<&str>) -> Outcome {
    let checked = match check(ctx, params).await {
        Ok(c) => c,
        Err(o) => return o,
    };
    match session_user(ctx, cookie) {
        Some((user, fhir_user)) => {
            consent_page(ctx, &checked.client, checked.request, &user, &fhir_user).await
        }
        None => login_page(ctx, &checked.client, &checked.request, None),
    }
}

fn login_page(ctx: &Ctx, client: &Client, request: &Value, problem: Option<&str>) -> Outcome {
    let sealer = match sealer(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let sealed = sealer.seal(request, now_s() + FORM_SECS);
    let problem = problem
        .map(|p| format!("<p role=\"alert\">{}</p>", esc(p)))
        .unwrap_or_default();
    let sso = ctx
        .auth
        .federation
        .as_ref()
        .map(|f| {
            format!(
                "<p><a href=\"oidc/start?request={}\">Sign in with {}</a></p>",
                esc(&sealed),
                esc(&f.config.label)
            )
        })
        .unwrap_or_default();
    page(
        if problem.is_empty() { 200 } else { 401 },
        "Sign in",
        &format!(
            "<p>{} asks to use your account.</p>{problem}<form method=\"post\" action=\"login\"><input type=\"hidden\" name=\"request\" value=\"{}\"><label>Username <input name=\"username\" autocomplete=\"username\"></label><label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\"></label><button type=\"submit\">Sign in</button></form>{sso}",
            esc(&client.id),
            esc(&sealed)
        ),
    )
}

/// The client of a pending request, if it is still registered.
async fn registered_client(ctx: &Ctx, request: &Value) -> Result<Client, Outcome> {
    match clients::get(&ctx.store, request["client_id"].as_str().unwrap_or("")).await {
        Ok(Some(client)) => Ok(client),
        _ => Err(page(
            400,
            "Unknown application",
            "<p>The application is no longer registered.</p>",
        )),
    }
}

/// The hospital's provider and the sealing key, when single sign-on is configured.
fn federation(ctx: &Ctx) -> Result<(&Federation, &crate::auth::seal::Sealer), Outcome> {
    match (&ctx.auth.federation, sealer(ctx)) {
        (Some(f), Ok(s)) => Ok((f, s)),
        _ => Err(page(
            404,
            "Not found",
            "<p>No single sign-on is configured.</p>",
        )),
    }
}

/// `POST /auth/login`.
pub async fn login(ctx: &Ctx, params: &[(String, String)]) -> Outcome {
    let sealer = match sealer(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let request = match open_form(ctx, params, "sign-in") {
        Ok(r) => r,
        Err(o) => return o,
    };
    let client = match registered_client(ctx, &request).await {
        Ok(c) => c,
        Err(o) => return o,
    };
    let (user, password) = (
        param(params, "username").unwrap_or(""),
        param(params, "password").unwrap_or(""),
    );
    match crate::auth::users::check(&ctx.store, user, password).await {
        Ok(Some(fhir_user)) => signed_in(ctx, sealer, &client, request, user, &fhir_user).await,
        Ok(None) => login_page(ctx, &client, &request, Some("Wrong username or password.")),
        Err(_) => unavailable(),
    }
}

/// A session for `user`, and the consent page.
async fn signed_in(
    ctx: &Ctx,
    sealer: &crate::auth::seal::Sealer,
    client: &Client,
    request: Value,
    user: &str,
    fhir_user: &str,
) -> Outcome {
    let cookie = sealer.seal(
        &json!({"user": user, "fhirUser": fhir_user}),
        now_s() + SESSION_SECS,
    );
    match consent_page(ctx, client, request, user, fhir_user).await {
        Outcome::Page { html, .. } => Outcome::SignedIn { cookie, html },
        other => other,
    }
}

/// The redirect URI registered at the hospital's provider.
fn oidc_callback_url(ctx: &Ctx) -> String {
    crate::auth::oauth::endpoint(ctx, "oidc/callback")
}

/// `GET /auth/oidc/start?request=...`: the link on the login page; off to the hospital's
/// sign-in, the pending request kept in the browser's sealed cookie with the state, nonce
/// and PKCE verifier of this sign-in.
pub async fn oidc_start(ctx: &Ctx, params: &[(String, String)]) -> Outcome {
    let (federation, sealer) = match federation(ctx) {
        Ok(f) => f,
        Err(o) => return o,
    };
    let request = match open_form(ctx, params, "sign-in") {
        Ok(r) => r,
        Err(o) => return o,
    };
    match federation.start(&oidc_callback_url(ctx)).await {
        Ok((url, mut pending)) => {
            pending["request"] = request;
            Outcome::Federate {
                url,
                cookie: sealer.seal(&pending, now_s() + FORM_SECS),
            }
        }
        Err(e) => page(503, "Sign-in unavailable", &format!("<p>{}</p>", esc(&e.0))),
    }
}

/// `GET /auth/oidc/callback`: the provider's answer. The state must match the browser's
/// cookie (no sign-in started elsewhere can land here), the code is redeemed and its
/// id_token checked, the claims give the `fhirUser`; then the consent page, as after a local
/// sign-in.
pub async fn oidc_callback(
    ctx: &Ctx,
    params: &[(String, String)],
    cookie: Option<&str>,
) -> Outcome {
    let (federation, sealer) = match federation(ctx) {
        Ok(f) => f,
        Err(o) => return o,
    };
    let refused = |why: &str| page(401, "Not signed in", &format!("<p>{}</p>", esc(why)));
    let Some(pending) = cookie.and_then(|c| sealer.open(c, now_s())) else {
        return refused(
            "This sign-in has expired or was started in another browser; start again from the application.",
        );
    };
    if param(params, "state") != pending["state"].as_str() {
        return refused(
            "This answer belongs to another sign-in; start again from the application.",
        );
    }
    if let Some(error) = param(params, "error") {
        let detail = param(params, "error_description").unwrap_or(error);
        return refused(&format!("The sign-in service answered: {detail}"));
    }
    let Some(code) = param(params, "code") else {
        return refused("The sign-in service sent no code.");
    };
    let claims = match federation
        .finish(&oidc_callback_url(ctx), code, &pending)
        .await
    {
        Ok(c) => c,
        Err(e) => return refused(&e.0),
    };
    let fhir_user = match crate::auth::federation::fhir_user(
        ctx,
        &federation.config.fhir_user,
        &claims,
    )
    .await
    {
        Ok(u) => u,
        Err(e) => return refused(&e.0),
    };
    let request = pending["request"].clone();
    let client = match registered_client(ctx, &request).await {
        Ok(c) => c,
        Err(o) => return o,
    };
    let user = crate::auth::federation::display_name(&claims);
    signed_in(ctx, sealer, &client, request, &user, &fhir_user).await
}

async fn consent_page(
    ctx: &Ctx,
    client: &Client,
    mut request: Value,
    user: &str,
    fhir_user: &str,
) -> Outcome {
    let sealer = match sealer(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    request["user"] = json!(user);
    request["fhirUser"] = json!(fhir_user);
    let scopes = request["scope"].as_str().unwrap_or("").to_string();
    let wants_patient = scopes.split(' ').any(|s| s == "launch/patient");
    let mut picker = String::new();
    if request["patient"].is_null() {
        if let Some(own) = fhir_user.strip_prefix("Patient/") {
            // A patient signs in for themself.
            request["patient"] = json!(own);
        } else if wants_patient {
            picker = patient_picker(ctx).await;
        }
    }
    let sealed = sealer.seal(&request, now_s() + FORM_SECS);
    let list: String = scopes
        .split(' ')
        .map(|s| format!("<li><code>{}</code></li>", esc(s)))
        .collect();
    page(
        200,
        "Allow access?",
        &format!(
            "<p>Signed in as {} ({}).</p><p>{} asks for:</p><ul>{list}</ul><form method=\"post\" action=\"consent\"><input type=\"hidden\" name=\"request\" value=\"{}\">{picker}<button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button> <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
            esc(user),
            esc(fhir_user),
            esc(&client.id),
            esc(&sealed)
        ),
    )
}

/// A choice of the first patients on the server, by name (standalone `launch/patient`).
async fn patient_picker(ctx: &Ctx) -> String {
    let mut options = String::new();
    if let Ok(mut db) = ctx.store.reader().await
        && let Ok(text) = crate::interaction::search_type::search_in(
            &mut db,
            ctx,
            "Patient",
            vec![
                ("_count".into(), "100".into()),
                ("_elements".into(), "name".into()),
            ],
            false,
        )
        .await
        && let Ok(bundle) = serde_json::from_str::<Value>(&text)
    {
        for e in bundle["entry"].as_array().into_iter().flatten() {
            let id = e["resource"]["id"].as_str().unwrap_or("");
            let name = &e["resource"]["name"][0];
            let label = format!(
                "{} {}",
                name["given"][0].as_str().unwrap_or(""),
                name["family"].as_str().unwrap_or("")
            );
            options.push_str(&format!(
                "<option value=\"{}\">{} ({})</option>",
                esc(id),
                esc(label.trim()),
                esc(id)
            ));
        }
    }
    format!("<label>Patient <select name=\"patient\">{options}</select></label> ")
}

/// `POST /auth/consent`: the user's answer; on "allow" the app gets its code.
pub async fn consent(ctx: &Ctx, params: &[(String, String)], cookie: Option<&str>) -> Outcome {
    let request = match open_form(ctx, params, "consent") {
        Ok(r) => r,
        Err(o) => return o,
    };
    // The form must come from the browser that signed in.
    let Some((user, fhir_user)) = session_user(ctx, cookie) else {
        return page(
            401,
            "Signed out",
            "<p>Sign in again from the application.</p>",
        );
    };
    if request["user"].as_str() != Some(user.as_str()) {
        return page(
            403,
            "Wrong session",
            "<p>This form belongs to another sign-in.</p>",
        );
    }
    let text = |k: &str| request[k].as_str().unwrap_or("").to_string();
    let (redirect_uri, state) = (text("redirect_uri"), text("state"));
    if param(params, "decision") != Some("allow") {
        return redirect_error(
            &redirect_uri,
            "access_denied",
            "the user denied access",
            Some(&state),
        );
    }
    let scope_text = text("scope");
    let mut patient = request["patient"].as_str().map(str::to_string);
    if patient.is_none() && scope_text.split(' ').any(|s| s == "launch/patient") {
        match param(params, "patient").filter(|p| crate::interaction::is_valid_id(p)) {
            Some(p) => patient = Some(p.to_string()),
            None => {
                return redirect_error(
                    &redirect_uri,
                    "invalid_request",
                    "no patient was chosen",
                    Some(&state),
                );
            }
        }
    }
    let code = match new_token() {
        Ok(c) => c,
        Err(_) => return redirect_error(&redirect_uri, "server_error", "try again", Some(&state)),
    };
    let mut row = IssuedToken::new("code", &code, &text("client_id"), &scope_text, CODE_SECS);
    row.patient = patient;
    row.encounter = request["encounter"].as_str().map(str::to_string);
    row.fhir_user = Some(fhir_user);
    row.redirect_uri = Some(redirect_uri.clone());
    row.code_challenge = Some(text("code_challenge"));
    row.need_banner = !request["launch"].as_bool().unwrap_or(false);
    row.nonce = request["nonce"].as_str().map(str::to_string);
    if ctx
        .store
        .write(move |db| Box::pin(async move { row.insert(db).await }))
        .await
        .is_err()
    {
        return redirect_error(&redirect_uri, "server_error", "try again", Some(&state));
    }
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("code", &code);
    q.append_pair("state", &state);
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    Outcome::Redirect(format!("{redirect_uri}{sep}{}", q.finish()))
}
