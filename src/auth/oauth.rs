//! The OAuth 2.0 endpoints (RFC 6749, 7662, 7009) as SMART Backend Services uses them, and
//! the discovery document (`.well-known/smart-configuration`). HTTP-free: the transport
//! hands in the form and gets back a status and a JSON body.

use serde_json::{Value, json};

use crate::auth::access::Grant;
use crate::auth::clients::{self, Kind};
use crate::auth::scope::{self, Context, Scope};
use crate::auth::{jwt, new_token, token_hash};
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

fn form<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `POST /auth/token`.
pub async fn token(ctx: &Ctx, params: &[(String, String)]) -> Result<Value, OAuthError> {
    for (k, _) in params {
        if params.iter().filter(|(x, _)| x == k).count() > 1 {
            return Err(invalid_request(format!("parameter {k} is repeated")));
        }
    }
    match form(params, "grant_type") {
        Some("client_credentials") => client_credentials(ctx, params).await,
        Some(g @ ("authorization_code" | "refresh_token")) => Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            format!(
                "grant_type {g} is not offered yet; this server supports SMART Backend Services (client_credentials)"
            ),
        )),
        Some(g) => Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            format!("grant_type {g:?} is not supported"),
        )),
        None => Err(invalid_request("grant_type is required")),
    }
}

/// SMART Backend Services (backend-services.html): the client proves itself with a JWT
/// signed by a key it registered.
async fn client_credentials(ctx: &Ctx, params: &[(String, String)]) -> Result<Value, OAuthError> {
    if form(params, "client_assertion_type") != Some(JWT_BEARER) {
        return Err(invalid_client(format!(
            "client_assertion_type must be {JWT_BEARER}"
        )));
    }
    let assertion = form(params, "client_assertion")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid_client("client_assertion is required"))?;
    let asked = form(params, "scope")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| OAuthError::new(400, "invalid_scope", "scope is required"))?;
    let asked = scope::parse_list(asked).map_err(|e| OAuthError::new(400, "invalid_scope", e))?;

    let unverified = jwt::decode_unverified(assertion).map_err(|e| invalid_client(e.0))?;
    let claim = |name: &str| unverified.claims.get(name).and_then(Value::as_str);
    let iss = claim("iss").ok_or_else(|| invalid_client("the assertion has no iss"))?;
    if claim("sub") != Some(iss) {
        return Err(invalid_client(
            "the assertion's sub must equal its iss (the client id)",
        ));
    }
    if let Some(id) = form(params, "client_id")
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
            "client {iss:?} is {}; backend services need a confidential-asymmetric client",
            client.kind.as_str()
        )));
    }
    if unverified.header.get("jku").is_some() {
        return Err(invalid_client(
            "jku is not accepted: this client's keys are registered with the server",
        ));
    }
    let jwks = client
        .jwks
        .as_ref()
        .ok_or_else(|| invalid_client("the client has no keys"))?;
    let verified = jwt::verify(assertion, jwks).map_err(|e| invalid_client(e.0))?;
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
    let now = crate::time::now_micros();
    let now_s = now / 1_000_000;
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
    let row = IssuedToken {
        hash: token_hash(&token),
        kind: "access",
        client_id: client.id.clone(),
        scope: scope_text.clone(),
        patient: None,
        encounter: None,
        fhir_user: None,
        issued_at: now,
        expires_at: now + BACKEND_TOKEN_SECS * 1_000_000,
    };
    let prune = ctx
        .auth
        .issued
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .is_multiple_of(1000);
    let jti_expires = (exp + SKEW_SECS) * 1_000_000;
    let client_id = client.id.clone();
    let fresh = ctx
        .store
        .write(move |db| {
            Box::pin(async move {
                let fresh = db
                    .execute(
                        "INSERT INTO auth_jti (client_id, jti, expires_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        &[Arg::Text(client_id), Arg::Text(jti), Arg::Int(jti_expires)],
                    )
                    .await?
                    == 1;
                if fresh {
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
                Ok(fresh)
            })
        })
        .await
        .map_err(server_error)?;
    if !fresh {
        return Err(invalid_client("the assertion's jti was already used"));
    }
    Ok(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": BACKEND_TOKEN_SECS,
        "scope": scope_text,
    }))
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
}

impl IssuedToken {
    pub async fn insert(self, db: &mut crate::store::Db) -> crate::error::Result<()> {
        db.execute(
            "INSERT INTO auth_token (hash, kind, client_id, scope, patient, encounter, fhir_user, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
            ],
        )
        .await?;
        Ok(())
    }
}

/// `POST /auth/introspect` (RFC 7662), for a caller holding a valid access token.
/// Anything not live is `{"active": false}`, whatever the reason.
pub async fn introspect(ctx: &Ctx, params: &[(String, String)]) -> Result<Value, OAuthError> {
    let token = form(params, "token").ok_or_else(|| invalid_request("token is required"))?;
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
    let token = form(params, "token").ok_or_else(|| invalid_request("token is required"))?;
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
        "issuer": origin(ctx),
        "token_endpoint": endpoint(ctx, "token"),
        "introspection_endpoint": endpoint(ctx, "introspect"),
        "revocation_endpoint": endpoint(ctx, "revoke"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write", "system/*.*"],
        "response_types_supported": [],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    })
}
