//! The OAuth 2.0 endpoints (RFC 6749, 7662, 7009) as SMART Backend Services uses them, and
//! the discovery document (`.well-known/smart-configuration`). HTTP-free: the transport
//! hands in the form and gets back a status and a JSON body.

use serde_json::{Value, json};

use crate::auth::access::Grant;
use crate::auth::clients::{self, Kind};
use crate::auth::scope::{self, Context, Scope};
use crate::auth::{TokenRow, jwt, new_token, param, repeated, token_hash};
use crate::interaction::Ctx;
use crate::store::Arg;
use crate::time::Micros;

/// Lifetime of a backend-services access token (SMART: at most five minutes).
pub const BACKEND_TOKEN_SECS: i64 = 300;
/// A client assertion may not claim to live longer than this.
const MAX_ASSERTION_SECS: i64 = 300;
/// Clock difference tolerated on `exp`.
const SKEW_SECS: i64 = 30;
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// An OAuth error response (RFC 6749 section 5.2).
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            error,
            description: description.into(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"error": self.error, "error_description": self.description})
    }
}

fn invalid_client(d: impl Into<String>) -> OAuthError {
    OAuthError::new(401, "invalid_client", d)
}

fn invalid_request(d: impl Into<String>) -> OAuthError {
    OAuthError::new(400, "invalid_request", d)
}

fn server_error(e: crate::error::FhirError) -> OAuthError {
    if e.kind == crate::error::ErrorKind::Unavailable {
        return OAuthError::new(503, "temporarily_unavailable", e.diagnostics());
    }
    tracing::error!(error = %e, "token endpoint");
    OAuthError::new(
        500,
        "server_error",
        "the server could not complete the request",
    )
}

/// `https://host:port` of the server: the FHIR base without its `/fhir`.
pub fn origin(ctx: &Ctx) -> &str {
    ctx.base.strip_suffix("/fhir").unwrap_or(&ctx.base)
}

pub fn endpoint(ctx: &Ctx, name: &str) -> String {
    format!("{}/auth/{name}", origin(ctx))
}

/// `POST /auth/token`; `basic` is the HTTP Basic client id and secret, if sent.
pub async fn token(
    ctx: &Ctx,
    params: &[(String, String)],
    basic: Option<&(String, String)>,
) -> Result<Value, OAuthError> {
    if let Some(k) = repeated(params) {
        return Err(invalid_request(format!("parameter {k} is repeated")));
    }
    match param(params, "grant_type") {
        Some("client_credentials") => client_credentials(ctx, params).await,
        Some("authorization_code") => authorization_code(ctx, params, basic).await,
        Some("refresh_token") => refresh_token(ctx, params, basic).await,
        Some(g) => Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            format!("grant_type {g:?} is not supported"),
        )),
        None => Err(invalid_request("grant_type is required")),
    }
}

/// A client that proved who it is, and the assertion id to record as used (if it signed
/// one).
struct Authenticated {
    client: clients::Client,
    jti: Option<(String, Micros)>,
}

/// Client authentication at the token endpoint: a `private_key_jwt` assertion
/// (confidential-asymmetric), HTTP Basic with the secret (confidential-symmetric), or just
/// `client_id` (public clients only).
async fn authenticate_client(
    ctx: &Ctx,
    params: &[(String, String)],
    basic: Option<&(String, String)>,
) -> Result<Authenticated, OAuthError> {
    if param(params, "client_assertion").is_some()
        || param(params, "client_assertion_type").is_some()
    {
        return assertion_client(ctx, params).await;
    }
    if let Some((id, secret)) = basic {
        let client = clients::get(&ctx.store, id)
            .await
            .map_err(server_error)?
            .filter(|c| c.kind == Kind::ConfidentialSymmetric)
            .ok_or_else(|| invalid_client("unknown client or wrong secret"))?;
        if client.secret_hash.as_deref() != Some(token_hash(secret).as_str()) {
            return Err(invalid_client("unknown client or wrong secret"));
        }
        return Ok(Authenticated { client, jti: None });
    }
    let id = param(params, "client_id")
        .ok_or_else(|| invalid_client("client authentication is required"))?;
    let client = clients::get(&ctx.store, id)
        .await
        .map_err(server_error)?
        .ok_or_else(|| invalid_client(format!("client {id:?} is not registered")))?;
    if client.kind != Kind::Public {
        return Err(invalid_client(format!(
            "client {id:?} is {} and must authenticate",
            client.kind.as_str()
        )));
    }
    Ok(Authenticated { client, jti: None })
}

/// A `private_key_jwt` client assertion (backend-services.html#authenticating-to-the-token-endpoint).
async fn assertion_client(
    ctx: &Ctx,
    params: &[(String, String)],
) -> Result<Authenticated, OAuthError> {
    if param(params, "client_assertion_type") != Some(JWT_BEARER) {
        return Err(invalid_client(format!(
            "client_assertion_type must be {JWT_BEARER}"
        )));
    }
    let assertion = param(params, "client_assertion")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid_client("client_assertion is required"))?;
    let unverified = jwt::decode_unverified(assertion).map_err(|e| invalid_client(e.0))?;
    let claim = |name: &str| unverified.claims.get(name).and_then(Value::as_str);
    let iss = claim("iss").ok_or_else(|| invalid_client("the assertion has no iss"))?;
    if claim("sub") != Some(iss) {
        return Err(invalid_client(
            "the assertion's sub must equal its iss (the client id)",
        ));
    }
    if let Some(id) = param(params, "client_id")
        && id != iss
    {
        return Err(invalid_client(
            "client_id does not match the assertion's iss",
        ));
    }
    let client = clients::get(&ctx.store, iss)
        .await
        .map_err(server_error)?
        .ok_or_else(|| invalid_client(format!("client {iss:?} is not registered")))?;
    if client.kind != Kind::ConfidentialAsymmetric {
        return Err(invalid_client(format!(
            "client {iss:?} is {}; a client assertion needs a confidential-asymmetric client",
            client.kind.as_str()
        )));
    }
    // `jku` only if it names the registered JWKS URL.
    if let Some(jku) = unverified.header.get("jku")
        && (jku.as_str().is_none() || jku.as_str() != client.jwks_url.as_deref())
    {
        return Err(invalid_client(
            "jku is accepted only when it is the JWKS URL registered for this client",
        ));
    }
    let verified = match (&client.jwks, &client.jwks_url) {
        (Some(jwks), _) => jwt::verify(assertion, jwks).map_err(|e| invalid_client(e.0))?,
        (None, Some(url)) => {
            let jwks = crate::auth::remote_jwks(ctx, url, false)
                .await
                .map_err(invalid_client)?;
            match jwt::verify(assertion, &jwks) {
                Ok(v) => v,
                // A key the cached set does not have: the client may have rotated; look again.
                Err(e) if e.0.contains("no registered") => {
                    let jwks = crate::auth::remote_jwks(ctx, url, true)
                        .await
                        .map_err(invalid_client)?;
                    jwt::verify(assertion, &jwks).map_err(|e| invalid_client(e.0))?
                }
                Err(e) => return Err(invalid_client(e.0)),
            }
        }
        (None, None) => return Err(invalid_client("the client has no keys")),
    };
    let claims = &verified.claims;
    let token_url = endpoint(ctx, "token");
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => *a == token_url,
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(token_url.as_str())),
        _ => false,
    };
    if !aud_ok {
        return Err(invalid_client(format!(
            "the assertion's aud must be {token_url}"
        )));
    }
    let now_s = crate::time::now_micros() / 1_000_000;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| invalid_client("the assertion has no numeric exp"))?;
    if exp + SKEW_SECS <= now_s {
        return Err(invalid_client("the assertion has expired"));
    }
    if exp > now_s + MAX_ASSERTION_SECS + SKEW_SECS {
        return Err(invalid_client(format!(
            "the assertion's exp is more than {MAX_ASSERTION_SECS} s ahead"
        )));
    }
    if claims
        .get("nbf")
        .and_then(Value::as_i64)
        .is_some_and(|nbf| nbf > now_s + SKEW_SECS)
    {
        return Err(invalid_client("the assertion is not valid yet (nbf)"));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| invalid_client("the assertion needs a jti (at most 256 characters)"))?
        .to_string();
    Ok(Authenticated {
        client,
        jti: Some((jti, (exp + SKEW_SECS) * 1_000_000)),
    })
}

/// Records the assertion's jti (false: it was used before) and, if fresh, writes the rows,
/// all in one transaction; now and then prunes what has expired.
async fn record(
    ctx: &Ctx,
    client_id: &str,
    jti: Option<(String, Micros)>,
    rows: Vec<IssuedToken>,
    revoke: Option<String>,
) -> Result<bool, OAuthError> {
    let prune = ctx
        .auth
        .issued
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .is_multiple_of(1000);
    let now = crate::time::now_micros();
    let client_id = client_id.to_string();
    ctx.store
        .write(move |db| {
            Box::pin(async move {
                if let Some((jti, expires)) = jti {
                    let fresh = db
                        .execute(
                            "INSERT INTO auth_jti (client_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                            &[Arg::Text(client_id.clone()), Arg::Text(jti), Arg::Int(expires)],
                        )
                        .await?
                        == 1;
                    if !fresh {
                        return Ok(false);
                    }
                }
                if let Some(hash) = revoke {
                    // Refresh token rotation: the old one may be used once.
                    let n = db
                        .execute(
                            "UPDATE auth_token SET revoked_at = $1 WHERE hash = $2 AND revoked_at IS NULL",
                            &[Arg::Int(now), Arg::Text(hash)],
                        )
                        .await?;
                    if n != 1 {
                        return Ok(false);
                    }
                }
                for row in rows {
                    row.insert(db).await?;
                }
                if prune {
                    db.execute("DELETE FROM auth_jti WHERE expires_at < $1", &[Arg::Int(now)])
                        .await?;
                    db.execute(
                        "DELETE FROM auth_token WHERE expires_at < $1",
                        &[Arg::Int(now - 86_400 * 1_000_000)],
                    )
                    .await?;
                }
                Ok(true)
            })
        })
        .await
        .map_err(server_error)
}

/// SMART Backend Services (backend-services.html): the client proves itself with a JWT
/// signed by a key it registered.
async fn client_credentials(ctx: &Ctx, params: &[(String, String)]) -> Result<Value, OAuthError> {
    let auth = assertion_client(ctx, params).await?;
    let asked = param(params, "scope")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| OAuthError::new(400, "invalid_scope", "scope is required"))?;
    let asked = scope::parse_list(asked).map_err(|e| OAuthError::new(400, "invalid_scope", e))?;
    let client = auth.client;
    // Only system/ scopes make sense without a user; the rest is narrowed to the
    // registration.
    let asked: Vec<Scope> = asked
        .into_iter()
        .filter(|s| matches!(s, Scope::Resource(r) if r.context == Context::System))
        .collect();
    let granted = scope::narrow(&client.scopes, &asked);
    if granted.is_empty() {
        return Err(OAuthError::new(
            400,
            "invalid_scope",
            format!(
                "none of the requested scopes is allowed for this client (allowed: {})",
                scope::to_text(&client.scopes)
            ),
        ));
    }
    let scope_text = scope::to_text(&granted);
    let token = new_token().map_err(server_error)?;
    let row = IssuedToken::new(
        "access",
        &token,
        &client.id,
        &scope_text,
        BACKEND_TOKEN_SECS,
    );
    if !record(ctx, &client.id, auth.jti, vec![row], None).await? {
        return Err(invalid_client("the assertion's jti was already used"));
    }
    Ok(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": BACKEND_TOKEN_SECS,
        "scope": scope_text,
    }))
}

fn invalid_grant(d: impl Into<String>) -> OAuthError {
    OAuthError::new(400, "invalid_grant", d)
}

async fn stored(ctx: &Ctx, hash: &str, kind: &str) -> Result<Option<TokenRow>, OAuthError> {
    crate::auth::live_token(&ctx.store, hash, kind, crate::time::now_micros())
        .await
        .map_err(server_error)
}

/// Access token lifetime for apps (SMART: at most an hour).
pub const APP_TOKEN_SECS: i64 = 3600;
/// Refresh token lifetimes: `offline_access` outlives the session, `online_access` does not.
const OFFLINE_SECS: i64 = 90 * 86_400;
const ONLINE_SECS: i64 = 8 * 3600;

/// The token response of the authorization code and refresh grants: a new access token,
/// and a (rotated) refresh token when the scopes ask for one.
async fn app_tokens(
    ctx: &Ctx,
    auth: Authenticated,
    scope_text: &str,
    context: &TokenRow,
    revoke: Option<String>,
) -> Result<Value, OAuthError> {
    let access = new_token().map_err(server_error)?;
    let mut row = IssuedToken::new(
        "access",
        &access,
        &auth.client.id,
        scope_text,
        APP_TOKEN_SECS,
    );
    row.patient = context.patient.clone();
    row.encounter = context.encounter.clone();
    row.fhir_user = context.fhir_user.clone();
    let mut rows = vec![row];
    let words: Vec<&str> = scope_text.split(' ').collect();
    let refresh_life = if words.contains(&"offline_access") {
        Some(OFFLINE_SECS)
    } else if words.contains(&"online_access") {
        Some(ONLINE_SECS)
    } else {
        None
    };
    let mut refresh = None;
    if let Some(life) = refresh_life {
        let t = new_token().map_err(server_error)?;
        let mut r = IssuedToken::new("refresh", &t, &auth.client.id, scope_text, life);
        r.patient = context.patient.clone();
        r.encounter = context.encounter.clone();
        r.fhir_user = context.fhir_user.clone();
        r.need_banner = context.need_banner;
        rows.push(r);
        refresh = Some(t);
    }
    if !record(ctx, &auth.client.id, auth.jti, rows, revoke).await? {
        return Err(invalid_grant("the grant was already used"));
    }
    let mut out = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": APP_TOKEN_SECS,
        "scope": scope_text,
        "need_patient_banner": context.need_banner,
        "smart_style_url": endpoint(ctx, "smart-style.json"),
    });
    if let Some(p) = &context.patient {
        out["patient"] = json!(p);
    }
    if let Some(e) = &context.encounter {
        out["encounter"] = json!(e);
    }
    if let Some(r) = refresh {
        out["refresh_token"] = json!(r);
    }
    if words.contains(&"openid")
        && let Some(user) = &context.fhir_user
    {
        out["id_token"] = json!(id_token(
            ctx,
            &auth.client.id,
            user,
            words.contains(&"fhirUser"),
            context.nonce.as_deref()
        )?);
    }
    Ok(out)
}

/// An OpenID Connect id_token (RS256) for the signed-in user (SMART: `fhirUser` as the
/// absolute URL of the user's FHIR resource).
fn id_token(
    ctx: &Ctx,
    client_id: &str,
    fhir_user: &str,
    with_fhir_user: bool,
    nonce: Option<&str>,
) -> Result<String, OAuthError> {
    let key = ctx
        .auth
        .signing_keys()
        .first()
        .ok_or_else(|| server_error(crate::error::FhirError::internal("no signing key")))?;
    let now = crate::time::now_micros() / 1_000_000;
    let mut claims = json!({
        "iss": ctx.base,
        "sub": fhir_user,
        "aud": client_id,
        "iat": now,
        "exp": now + APP_TOKEN_SECS,
    });
    if with_fhir_user {
        claims["fhirUser"] = json!(format!("{}/{fhir_user}", ctx.base));
    }
    if let Some(n) = nonce {
        claims["nonce"] = json!(n);
    }
    key.sign(&claims).map_err(server_error)
}

/// `GET [base]/.well-known/openid-configuration` (OpenID Connect Discovery 1.0).
pub fn openid_configuration(ctx: &Ctx) -> Value {
    json!({
        "issuer": ctx.base,
        "authorization_endpoint": endpoint(ctx, "authorize"),
        "token_endpoint": endpoint(ctx, "token"),
        "jwks_uri": endpoint(ctx, "jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "fhirUser", "launch", "launch/patient", "offline_access", "online_access"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "private_key_jwt"],
        "code_challenge_methods_supported": ["S256"],
    })
}

/// `GET /auth/jwks`: the public halves of the signing keys.
pub fn jwks(ctx: &Ctx) -> Value {
    json!({"keys": ctx.auth.signing_keys().iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

/// base64url(SHA-256(verifier)) (RFC 7636 S256).
fn s256(verifier: &str) -> String {
    use base64::Engine;
    let d = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref())
}

/// `grant_type=authorization_code` with PKCE.
async fn authorization_code(
    ctx: &Ctx,
    params: &[(String, String)],
    basic: Option<&(String, String)>,
) -> Result<Value, OAuthError> {
    let auth = authenticate_client(ctx, params, basic).await?;
    let code = param(params, "code").ok_or_else(|| invalid_request("code is required"))?;
    let hash = token_hash(code);
    let grant = stored(ctx, &hash, "code")
        .await?
        .ok_or_else(|| invalid_grant("the code is unknown, expired or already used"))?;
    // A code is spent by any attempt to redeem it, right or wrong.
    let spent = {
        let h = hash.clone();
        ctx.store
            .write(move |db| {
                Box::pin(async move {
                    db.execute(
                        "UPDATE auth_token SET revoked_at = $1 WHERE hash = $2 AND revoked_at IS NULL",
                        &[Arg::Int(crate::time::now_micros()), Arg::Text(h)],
                    )
                    .await
                })
            })
            .await
            .map_err(server_error)?
    };
    if spent != 1 {
        return Err(invalid_grant("the code was already used"));
    }
    if grant.client_id != auth.client.id {
        return Err(invalid_grant("the code was issued to another client"));
    }
    if param(params, "redirect_uri") != grant.redirect_uri.as_deref() {
        return Err(invalid_grant(
            "redirect_uri differs from the authorization request",
        ));
    }
    let verifier = param(params, "code_verifier").unwrap_or("");
    let verifier_ok = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    let challenge = grant.code_challenge.as_deref().unwrap_or("");
    if !verifier_ok || verifier == challenge || s256(verifier) != challenge {
        return Err(invalid_grant(
            "code_verifier does not match the code_challenge (PKCE S256)",
        ));
    }
    let scope_text = grant.scope.clone();
    app_tokens(ctx, auth, &scope_text, &grant, None).await
}

/// `grant_type=refresh_token`: scopes may shrink, never grow; the refresh token rotates.
async fn refresh_token(
    ctx: &Ctx,
    params: &[(String, String)],
    basic: Option<&(String, String)>,
) -> Result<Value, OAuthError> {
    let auth = authenticate_client(ctx, params, basic).await?;
    let token = param(params, "refresh_token")
        .ok_or_else(|| invalid_request("refresh_token is required"))?;
    let hash = token_hash(token);
    let grant = stored(ctx, &hash, "refresh")
        .await?
        .filter(|g| g.client_id == auth.client.id)
        .ok_or_else(|| {
            invalid_grant("the refresh token is unknown, expired, revoked or another client's")
        })?;
    let scope_text = match param(params, "scope").filter(|s| !s.trim().is_empty()) {
        None => grant.scope.clone(),
        Some(asked) => {
            let had: Vec<&str> = grant.scope.split(' ').collect();
            let asked =
                scope::parse_list(asked).map_err(|e| OAuthError::new(400, "invalid_scope", e))?;
            if let Some(extra) = asked.iter().find(|s| !had.contains(&s.text())) {
                return Err(OAuthError::new(
                    400,
                    "invalid_scope",
                    format!(
                        "{} was not granted; a refresh cannot widen the scopes",
                        extra.text()
                    ),
                ));
            }
            scope::to_text(&asked)
        }
    };
    app_tokens(ctx, auth, &scope_text, &grant, Some(hash)).await
}

/// A token row to store.
pub struct IssuedToken {
    pub hash: String,
    pub kind: &'static str,
    pub client_id: String,
    pub scope: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub fhir_user: Option<String>,
    pub issued_at: Micros,
    pub expires_at: Micros,
    /// Authorization codes: the redirect_uri and PKCE challenge they were issued for.
    pub redirect_uri: Option<String>,
    pub code_challenge: Option<String>,
    pub need_banner: bool,
    /// Codes: the OpenID Connect nonce of the authorization request.
    pub nonce: Option<String>,
}

impl IssuedToken {
    /// A token row for `client_id` with `scope`, no launch context yet.
    pub fn new(
        kind: &'static str,
        token: &str,
        client_id: &str,
        scope: &str,
        lifetime_secs: i64,
    ) -> Self {
        let now = crate::time::now_micros();
        IssuedToken {
            hash: token_hash(token),
            kind,
            client_id: client_id.to_string(),
            scope: scope.to_string(),
            patient: None,
            encounter: None,
            fhir_user: None,
            issued_at: now,
            expires_at: now + lifetime_secs * 1_000_000,
            redirect_uri: None,
            code_challenge: None,
            need_banner: false,
            nonce: None,
        }
    }

    pub async fn insert(self, db: &mut crate::store::Db) -> crate::error::Result<()> {
        db.execute(
            "INSERT INTO auth_token (hash, kind, client_id, scope, patient, encounter, fhir_user, issued_at, expires_at, redirect_uri, code_challenge, need_banner, nonce) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            &[
                Arg::Text(self.hash),
                Arg::Text(self.kind.to_string()),
                Arg::Text(self.client_id),
                Arg::Text(self.scope),
                Arg::OptText(self.patient),
                Arg::OptText(self.encounter),
                Arg::OptText(self.fhir_user),
                Arg::Int(self.issued_at),
                Arg::Int(self.expires_at),
                Arg::OptText(self.redirect_uri),
                Arg::OptText(self.code_challenge),
                Arg::Int(i64::from(self.need_banner)),
                Arg::OptText(self.nonce),
            ],
        )
        .await?;
        Ok(())
    }
}

/// `POST /auth/introspect` (RFC 7662), for a caller holding a valid access token.
/// Anything not live is `{"active": false}`, whatever the reason.
pub async fn introspect(ctx: &Ctx, params: &[(String, String)]) -> Result<Value, OAuthError> {
    let token = param(params, "token").ok_or_else(|| invalid_request("token is required"))?;
    let now = crate::time::now_micros();
    let hash = token_hash(token);
    let grant = match crate::auth::lookup(&ctx.store, &hash, "access", now)
        .await
        .map_err(server_error)?
    {
        Some(g) => Some((g, "access")),
        None => crate::auth::lookup(&ctx.store, &hash, "refresh", now)
            .await
            .map_err(server_error)?
            .map(|g| (g, "refresh")),
    };
    let Some((g, kind)) = grant else {
        return Ok(json!({"active": false}));
    };
    let mut out = json!({
        "active": true,
        "scope": g.scope_text,
        "client_id": g.client_id,
        "iat": g.issued_at / 1_000_000,
        "exp": g.expires_at / 1_000_000,
        "iss": origin(ctx),
        "aud": ctx.base,
    });
    if kind == "access" {
        out["token_type"] = json!("Bearer");
    }
    let extra = [
        ("patient", &g.patient),
        ("encounter", &g.encounter),
        ("fhirUser", &g.fhir_user),
    ];
    for (k, v) in extra {
        if let Some(v) = v {
            out[k] = json!(v);
        }
    }
    Ok(out)
}

/// `POST /auth/revoke` (RFC 7009): the caller may revoke its own client's tokens. The answer
/// is 200 whether or not the token existed.
pub async fn revoke(
    ctx: &Ctx,
    caller: &Grant,
    params: &[(String, String)],
) -> Result<Value, OAuthError> {
    let token = param(params, "token").ok_or_else(|| invalid_request("token is required"))?;
    let hash = token_hash(token);
    let client = caller.client_id.clone();
    let h = hash.clone();
    ctx.store
        .write(move |db| {
            Box::pin(async move {
                db.execute(
                    "UPDATE auth_token SET revoked_at = $1 WHERE hash = $2 AND client_id = $3 AND revoked_at IS NULL",
                    &[Arg::Int(crate::time::now_micros()), Arg::Text(h), Arg::Text(client)],
                )
                .await
            })
        })
        .await
        .map_err(server_error)?;
    ctx.auth.forget(token);
    Ok(json!({}))
}

/// `GET [base]/.well-known/smart-configuration` (conformance.html): only what this server
/// does today is announced.
pub fn smart_configuration(ctx: &Ctx) -> Value {
    json!({
        "issuer": ctx.base,
        "jwks_uri": endpoint(ctx, "jwks"),
        "token_endpoint": endpoint(ctx, "token"),
        "introspection_endpoint": endpoint(ctx, "introspect"),
        "revocation_endpoint": endpoint(ctx, "revoke"),
        "authorization_endpoint": endpoint(ctx, "authorize"),
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": [
            "openid", "fhirUser", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access",
            "patient/*.cruds", "patient/*.rs", "patient/*.read", "patient/*.write",
            "user/*.cruds", "user/*.rs", "user/*.read", "user/*.write",
            "system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"
        ],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-ehr", "launch-standalone", "authorize-post",
            "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "context-ehr-patient", "context-ehr-encounter", "context-standalone-patient",
            "context-banner", "context-style", "sso-openid-connect",
            "permission-offline", "permission-online", "permission-patient", "permission-user",
            "permission-v1", "permission-v2"
        ],
    })
}
