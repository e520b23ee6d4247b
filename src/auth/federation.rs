//! Sign-in through the hospital's OpenID Connect provider (`--oidc-issuer`): the login page
//! offers it beside local accounts. The `openidconnect` crate does discovery, the code
//! exchange (with PKCE S256 and the client secret) and the id_token checks (signature against
//! the provider's JWK Set, `iss`, `aud`, `exp`, `nonce`); this module keeps the provider's
//! metadata, carries the pending sign-in in a sealed cookie between the two redirects, and
//! maps the id_token's claims to the user's `fhirUser` with the `--oidc-fhir-user` template:
//!
//! - `Practitioner/{employee_id}`: a literal reference, `{claim}` replaced by the claim;
//! - `Practitioner?identifier=urn:oid:1.2.3|{employee_id}`: a search that must match
//!   exactly one resource (claims are escaped for the search grammar);
//! - `{fhirUser}` (the default): the provider sends the reference itself.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde_json::{Map, Value, json};

use crate::auth::users::{FHIR_USER_TYPES, is_fhir_user};
use crate::interaction::Ctx;

/// How long the provider's metadata and JWK Set are kept before they are fetched again
/// (a failed id_token check fetches them at once: the provider may have rotated its keys).
const METADATA_TTL: Duration = Duration::from_secs(600);

/// `--oidc-*`.
#[derive(Debug, Clone)]
pub struct Config {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// `--oidc-fhir-user`, checked by [`Config::check`].
    pub fhir_user: String,
    /// Scopes asked of the provider (`openid` is always among them).
    pub scopes: Vec<String>,
    /// What the sign-in link says: "Sign in with {label}".
    pub label: String,
}

impl Config {
    /// The issuer is `https://`, or `http://` on a loopback host (a provider on this machine);
    /// the template is a reference or a search on a `fhirUser` type.
    pub fn check(&self) -> Result<(), String> {
        if reqwest::Url::parse(&self.issuer).is_err()
            || !crate::auth::https_or_loopback(&self.issuer)
        {
            return Err(format!(
                "--oidc-issuer {} must be an https:// URL (http:// only on a loopback address)",
                self.issuer
            ));
        }
        if self.client_id.is_empty() {
            return Err("--oidc-issuer needs --oidc-client-id".into());
        }
        let ty = self.fhir_user.split(['/', '?']).next().unwrap_or_default();
        let literal = self.fhir_user.contains('/') && !self.fhir_user.contains('?');
        let search = self.fhir_user.contains('?');
        if self.fhir_user != DEFAULT_TEMPLATE
            && !(FHIR_USER_TYPES.contains(&ty) && (literal || search))
        {
            return Err(format!(
                "--oidc-fhir-user {}: give TYPE/{{claim}} or TYPE?param={{claim}} with TYPE one of {}, or {DEFAULT_TEMPLATE}",
                self.fhir_user,
                FHIR_USER_TYPES.join(", ")
            ));
        }
        Ok(())
    }
}

pub const DEFAULT_TEMPLATE: &str = "{fhirUser}";

/// A configured provider and what was read from it.
pub struct Federation {
    pub config: Config,
    metadata: RwLock<Option<(Instant, Arc<CoreProviderMetadata>)>>,
}

/// Why a federated sign-in failed: what the user is told (details go to the log).
#[derive(Debug)]
pub struct Refused(pub String);

impl Federation {
    pub fn new(config: Config) -> Federation {
        Federation {
            config,
            metadata: RwLock::new(None),
        }
    }

    async fn metadata(&self) -> Result<Arc<CoreProviderMetadata>, Refused> {
        if let Some((at, md)) = &*self.metadata.read().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < METADATA_TTL
        {
            return Ok(md.clone());
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone())
            .map_err(|e| unreachable_provider(format!("issuer URL: {e}")))?;
        let http = crate::auth::http_client().map_err(unreachable_provider)?;
        let md = CoreProviderMetadata::discover_async(issuer, http)
            .await
            .map_err(|e| unreachable_provider(format!("discovery: {}", chain(&e))))?;
        let md = Arc::new(md);
        *self.metadata.write().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), md.clone()));
        Ok(md)
    }

    fn client(
        &self,
        md: &CoreProviderMetadata,
        redirect: &str,
    ) -> Result<
        CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        Refused,
    > {
        let redirect = RedirectUrl::new(redirect.to_string())
            .map_err(|e| unreachable_provider(format!("redirect URL: {e}")))?;
        Ok(CoreClient::from_provider_metadata(
            md.clone(),
            ClientId::new(self.config.client_id.clone()),
            self.config.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect))
    }

    /// The provider's authorization URL, and what the callback needs to check its answer
    /// (kept in the browser's sealed cookie: the state, the nonce, the PKCE verifier).
    pub async fn start(&self, redirect: &str) -> Result<(String, Value), Refused> {
        let md = self.metadata().await?;
        let client = self.client(&md, redirect)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client.authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        );
        for s in self.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(s.clone()));
        }
        let (url, state, nonce) = request.set_pkce_challenge(challenge).url();
        Ok((
            url.to_string(),
            json!({
                "state": state.secret(),
                "nonce": nonce.secret(),
                "verifier": verifier.secret(),
            }),
        ))
    }

    /// Redeems the provider's code and checks its id_token; the verified claims.
    pub async fn finish(
        &self,
        redirect: &str,
        code: &str,
        pending: &Value,
    ) -> Result<Map<String, Value>, Refused> {
        let text = |k: &str| pending[k].as_str().unwrap_or_default().to_string();
        let md = self.metadata().await?;
        let client = self.client(&md, redirect)?;
        let request = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| unreachable_provider(format!("token endpoint: {e}")))?
            .set_pkce_verifier(PkceCodeVerifier::new(text("verifier")));
        let http = crate::auth::http_client().map_err(unreachable_provider)?;
        let response = request.request_async(http).await.map_err(|e| {
            tracing::warn!(error = %chain(&e), "the identity provider refused the code");
            Refused("the sign-in service did not accept the sign-in; try again".into())
        })?;
        let Some(id_token) = response.id_token() else {
            return Err(Refused("the sign-in service sent no id_token".into()));
        };
        match id_token.claims(&client.id_token_verifier(), &Nonce::new(text("nonce"))) {
            Ok(_) => raw_claims(&id_token.to_string()),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "an id_token from the identity provider failed its checks");
                // The provider may have rotated its keys: the next sign-in fetches them
                // again (a code is single-use, so this one cannot be retried).
                *self.metadata.write().unwrap_or_else(|p| p.into_inner()) = None;
                Err(Refused(format!(
                    "the sign-in service's id_token failed its checks ({e})"
                )))
            }
        }
    }
}

fn unreachable_provider(detail: impl std::fmt::Display) -> Refused {
    tracing::warn!(%detail, "the identity provider cannot be used");
    Refused("the sign-in service cannot be reached; try again later".into())
}

/// An error with its sources, for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The payload of a compact JWS whose signature was checked already.
fn raw_claims(jwt: &str) -> Result<Map<String, Value>, Refused> {
    jwt.split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
        .ok_or_else(|| Refused("the sign-in service's id_token is not readable".into()))
}

/// The name shown for a signed-in user: `preferred_username`, `email`, or `sub`.
pub fn display_name(claims: &Map<String, Value>) -> String {
    ["preferred_username", "email", "sub"]
        .iter()
        .find_map(|k| claims.get(*k).and_then(Value::as_str))
        .unwrap_or("unknown")
        .to_string()
}

/// A claim as text (strings and numbers), if present.
fn claim(claims: &Map<String, Value>, name: &str) -> Result<String, Refused> {
    match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(Refused(format!(
            "your account has no {name} that this server knows you by; ask the administrator"
        ))),
    }
}

/// `{name}` placeholders of `template` replaced by claims, each passed through `escape`.
fn fill(
    template: &str,
    claims: &Map<String, Value>,
    escape: impl Fn(&str) -> String,
) -> Result<String, Refused> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            out.push_str(&rest[open..]);
            return Ok(out);
        };
        out.push_str(&escape(&claim(claims, &rest[open + 1..open + close])?));
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `fhirUser` the claims map to by `--oidc-fhir-user`.
pub async fn fhir_user(
    ctx: &Ctx,
    template: &str,
    claims: &Map<String, Value>,
) -> Result<String, Refused> {
    let Some((ty, query)) = template.split_once('?') else {
        let filled = fill(template, claims, str::to_string)?;
        // A provider may send the absolute URL of a resource on this server.
        let reference = filled
            .strip_prefix(&format!("{}/", ctx.base))
            .unwrap_or(&filled)
            .to_string();
        if !is_fhir_user(&reference) {
            return Err(Refused(format!(
                "your account maps to {reference}, which is not a Practitioner, Patient, RelatedPerson or Person; ask the administrator"
            )));
        }
        return Ok(reference);
    };
    // The same resolution as a conditional reference: the ids the query matches, two at
    // most (one is the answer; two says "ambiguous").
    let filled = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in crate::interaction::parse_query(query) {
            q.append_pair(&k, &fill(&v, claims, crate::search::query::escape)?);
        }
        q.finish()
    };
    let ids = async {
        let mut db = ctx.store.reader().await?;
        crate::interaction::write::matching_ids(&mut db, ctx, ty, &filled, 2).await
    }
    .await
    .map_err(|e| {
        tracing::warn!(error = %e.diagnostics(), template, "--oidc-fhir-user search failed");
        Refused("this server cannot look up your account now; try again later".into())
    })?;
    match ids.as_slice() {
        [id] => Ok(format!("{ty}/{id}")),
        [] => Err(Refused(format!(
            "no {ty} on this server matches your account; ask the administrator"
        ))),
        _ => Err(Refused(format!(
            "several {ty} resources match your account; ask the administrator"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Map<String, Value> {
        json!({"sub": "u1", "employee_id": "E,1|x", "n": 42})
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn templates_fill_claims() {
        let c = claims();
        assert_eq!(
            fill("Practitioner/{n}", &c, str::to_string)
                .map_err(|e| e.0)
                .as_deref(),
            Ok("Practitioner/42")
        );
        assert_eq!(
            fill(
                "identifier=s|{employee_id}",
                &c,
                crate::search::query::escape
            )
            .map_err(|e| e.0)
            .as_deref(),
            Ok("identifier=s|E\\,1\\|x")
        );
        assert!(fill("Practitioner/{missing}", &c, str::to_string).is_err());
        assert_eq!(display_name(&c), "u1");
    }

    #[test]
    fn configs_are_checked() {
        let ok = Config {
            issuer: "https://login.example".into(),
            client_id: "fhir".into(),
            client_secret: None,
            fhir_user: DEFAULT_TEMPLATE.into(),
            scopes: vec!["openid".into()],
            label: "SSO".into(),
        };
        assert!(ok.check().is_ok());
        for (issuer, template) in [
            ("http://login.example", DEFAULT_TEMPLATE),
            ("https://login.example", "Observation/{sub}"),
            ("https://login.example", "Practitioner"),
        ] {
            let c = Config {
                issuer: issuer.into(),
                fhir_user: template.into(),
                ..ok.clone()
            };
            assert!(c.check().is_err(), "{issuer} {template}");
        }
        let local = Config {
            issuer: "http://127.0.0.1:9/realm".into(),
            fhir_user: "Practitioner?identifier={sub}".into(),
            ..ok
        };
        assert!(local.check().is_ok());
    }
}
