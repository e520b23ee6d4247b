//! Registered OAuth clients (`iomt-fhir clients add|list|remove`): their kind, the scopes
//! they may be granted, and how they authenticate (a JWK Set of public keys for
//! confidential-asymmetric clients; a secret, stored as its SHA-256, for symmetric ones).

use serde_json::{Value, json};

use crate::auth::scope::{self, Scope};
use crate::error::{FhirError, Result};
use crate::store::{Arg, Store, Ty, Val};

/// SMART client types (app-launch.html#support-for-public-and-confidential-apps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Public,
    ConfidentialSymmetric,
    ConfidentialAsymmetric,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Public => "public",
            Kind::ConfidentialSymmetric => "confidential-symmetric",
            Kind::ConfidentialAsymmetric => "confidential-asymmetric",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Public,
            Kind::ConfidentialSymmetric,
            Kind::ConfidentialAsymmetric,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    pub id: String,
    pub kind: Kind,
    pub secret_hash: Option<String>,
    pub jwks: Option<Value>,
    /// Where a confidential-asymmetric client publishes its JWK Set (instead of `jwks`).
    pub jwks_url: Option<String>,
    pub scopes: Vec<Scope>,
    pub redirect_uris: Vec<String>,
    pub origins: Vec<String>,
}

impl Client {
    /// Checks a registration before it is stored.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 128
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            return Err(format!(
                "client id {:?}: 1-128 characters of A-Z a-z 0-9 - . _ ~",
                self.id
            ));
        }
        match self.kind {
            Kind::ConfidentialAsymmetric => match (&self.jwks, &self.jwks_url) {
                (Some(jwks), None) => crate::auth::jwt::check_jwks(jwks)?,
                (None, Some(url)) => check_jwks_url(url)?,
                _ => {
                    return Err("a confidential-asymmetric client needs either --jwks (its public keys) or --jwks-url".into());
                }
            },
            Kind::ConfidentialSymmetric if self.secret_hash.is_none() => {
                return Err("a confidential-symmetric client needs --secret".into());
            }
            _ => {}
        }
        if self.scopes.is_empty() {
            return Err("give the scopes the client may be granted (--scope)".into());
        }
        Ok(())
    }

    /// The registration as JSON, without secrets (listings, the admin view).
    pub fn to_json(&self) -> Value {
        json!({
            "client_id": self.id,
            "kind": self.kind.as_str(),
            "scope": scope::to_text(&self.scopes),
            "redirect_uris": self.redirect_uris,
            "origins": self.origins,
            "jwks": self.jwks,
            "jwks_url": self.jwks_url,
        })
    }
}

const COLUMNS: &str = "id, kind, secret_hash, jwks, jwks_url, scopes, redirect_uris, origins";
const SHAPE: [Ty; 8] = [
    Ty::Text,
    Ty::Text,
    Ty::OptText,
    Ty::OptText,
    Ty::OptText,
    Ty::Text,
    Ty::Text,
    Ty::Text,
];

fn from_row(row: Vec<Val>) -> Option<Client> {
    let mut it = row.into_iter();
    let id = it.next()?.text()?;
    let kind = Kind::parse(&it.next()?.text()?)?;
    let secret_hash = it.next()?.text();
    let jwks = it
        .next()?
        .text()
        .and_then(|j| serde_json::from_str(&j).ok());
    let jwks_url = it.next()?.text();
    let scopes = scope::parse_list(&it.next()?.text()?).ok()?;
    let words = |v: Option<String>| -> Vec<String> {
        v.unwrap_or_default()
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    let redirect_uris = words(it.next()?.text());
    let origins = words(it.next()?.text());
    Some(Client {
        id,
        kind,
        secret_hash,
        jwks,
        jwks_url,
        scopes,
        redirect_uris,
        origins,
    })
}

/// A JWKS URL must be https, except on loopback (development and tests).
fn check_jwks_url(url: &str) -> Result<(), String> {
    if crate::auth::https_or_loopback(url) {
        Ok(())
    } else {
        Err(format!(
            "--jwks-url {url:?} must be https:// (http:// only on loopback)"
        ))
    }
}

pub async fn get(store: &Store, id: &str) -> Result<Option<Client>> {
    let mut db = store.reader().await?;
    let row = db
        .fetch_optional(
            &format!("SELECT {COLUMNS} FROM auth_client WHERE id = $1"),
            &[Arg::Text(id.to_string())],
            &SHAPE,
        )
        .await?;
    Ok(row.and_then(from_row))
}

pub async fn list(store: &Store) -> Result<Vec<Client>> {
    let mut db = store.reader().await?;
    let rows = db
        .fetch_all(
            &format!("SELECT {COLUMNS} FROM auth_client ORDER BY id"),
            &[],
            &SHAPE,
        )
        .await?;
    Ok(rows.into_iter().filter_map(from_row).collect())
}

/// Registers a client; an existing id is an error (remove it first).
pub async fn add(store: &Store, client: Client) -> Result<()> {
    client.check().map_err(FhirError::invalid)?;
    let id = client.id.clone();
    let added = store
        .write(move |db| {
            Box::pin(async move {
                db.execute(
                    "INSERT INTO auth_client (id, kind, secret_hash, jwks, jwks_url, scopes, redirect_uris, origins, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
                    &[
                        Arg::Text(client.id.clone()),
                        Arg::Text(client.kind.as_str().to_string()),
                        Arg::OptText(client.secret_hash.clone()),
                        Arg::OptText(client.jwks.as_ref().map(Value::to_string)),
                        Arg::OptText(client.jwks_url.clone()),
                        Arg::Text(scope::to_text(&client.scopes)),
                        Arg::Text(client.redirect_uris.join(" ")),
                        Arg::Text(client.origins.join(" ")),
                        Arg::Int(crate::time::now_micros()),
                    ],
                )
                .await
            })
        })
        .await?;
    if added == 0 {
        return Err(FhirError::conflict(format!(
            "client {id:?} is already registered"
        )));
    }
    Ok(())
}

/// Removes a client and revokes its tokens; false if there was none.
pub async fn remove(store: &Store, id: &str) -> Result<bool> {
    let id = id.to_string();
    store
        .write(move |db| {
            Box::pin(async move {
                let n = db
                    .execute(
                        "DELETE FROM auth_client WHERE id = $1",
                        &[Arg::Text(id.clone())],
                    )
                    .await?;
                db.execute(
                    "UPDATE auth_token SET revoked_at = $1 WHERE client_id = $2 AND revoked_at IS NULL",
                    &[Arg::Int(crate::time::now_micros()), Arg::Text(id)],
                )
                .await?;
                Ok(n > 0)
            })
        })
        .await
}

/// Whether some registered client lists `origin` (`clients add --origin`). The list is read
/// again at most every [`ORIGINS_TTL`], so a client added by another process counts soon.
pub async fn origin_registered(ctx: &crate::interaction::Ctx, origin: &str) -> bool {
    let cache = &ctx.auth.origins;
    {
        let c = cache.read().unwrap_or_else(|p| p.into_inner());
        if let Some((at, set)) = &*c
            && at.elapsed() < ORIGINS_TTL
        {
            return set.contains(origin);
        }
    }
    // Boxed: the database read's future is kilobytes, and the CORS layer awaiting this
    // one is copied on every request.
    let set: std::collections::HashSet<String> = match Box::pin(list(&ctx.store)).await {
        Ok(clients) => clients.into_iter().flat_map(|c| c.origins).collect(),
        Err(_) => return false,
    };
    let found = set.contains(origin);
    *cache.write().unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), set));
    found
}

/// How long the registered origins are trusted before being read again.
pub const ORIGINS_TTL: std::time::Duration = std::time::Duration::from_secs(10);
