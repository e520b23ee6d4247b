//! SMART on FHIR authorization (`--auth smart`): registered clients, the OAuth 2.0 token,
//! introspection and revocation endpoints for SMART Backend Services (`client_credentials`
//! with a `private_key_jwt` assertion), SMART v1/v2 scopes, and their enforcement on every
//! interaction (`access`). Access tokens are opaque random strings; the server keeps only
//! their SHA-256, so a database dump yields no usable token. Several server processes
//! sharing one PostgreSQL accept each other's tokens (the table is shared); a process caches
//! a token it has seen for [`REVALIDATE`] and re-reads it after that, so a revocation made
//! elsewhere takes effect within that time (at once in the process that revoked it).

pub mod access;
pub mod authorize;
pub mod clients;
pub mod federation;
pub mod jwt;
pub mod keys;
pub mod oauth;
pub mod scope;
pub mod seal;
pub mod users;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;

use crate::error::{ErrorKind, FhirError, Result};
use crate::store::{Arg, Store, Ty};
use access::Grant;

/// How long a process trusts a cached token before reading it again.
pub const REVALIDATE: Duration = Duration::from_secs(5);
/// Cached tokens at most; the cache is emptied when it would grow beyond.
const CACHE_MAX: usize = 100_000;

/// `--auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No authorization: every request may do everything (loopback only).
    #[default]
    Off,
    /// SMART on FHIR: a Bearer token on every request but discovery and `metadata`.
    Smart,
}

/// Authorization state shared by all requests.
pub struct Auth {
    pub mode: Mode,
    /// Audit successful reads too (`--audit-reads`).
    pub audit_reads: bool,
    /// How long successful reads are counted before they are written (`--audit-read-window`).
    pub audit_read_window: std::time::Duration,
    /// Keyed by the token itself (memory only; the database has hashes): a request that
    /// hits the cache computes no digest.
    /// Token -> its grant and when it was read (microseconds since the epoch: the same clock
    /// read as the expiry check, one clock read per request). Hashed with foldhash: only
    /// tokens found valid are ever inserted, so a caller cannot choose colliding keys.
    cache: RwLock<HashMap<String, (Arc<Grant>, crate::time::Micros), foldhash::fast::RandomState>>,
    /// Token issuances since start, to prune expired rows now and then.
    pub(crate) issued: std::sync::atomic::AtomicU64,
    /// The key for sealed forms and session cookies (loaded by [`Auth::init`]).
    sealer: std::sync::OnceLock<seal::Sealer>,
    /// id_token signing keys, newest first (loaded by [`Auth::init`]).
    keys: std::sync::OnceLock<Vec<keys::SigningKey>>,
    /// Client JWK Sets fetched from their URLs: (fetched at, set).
    jwks_cache: RwLock<HashMap<String, (Instant, serde_json::Value)>>,
    /// Registered CORS origins, with when they were read (see `clients::origin_registered`).
    pub(crate) origins: RwLock<Option<(Instant, std::collections::HashSet<String>)>>,
    /// The hospital's OpenID Connect provider, if users may sign in there (`--oidc-issuer`).
    pub federation: Option<federation::Federation>,
    /// This `Auth` among the process's (tests run many servers in one process): the key of
    /// its tokens in each thread's [`LOCAL`] cache.
    id: u64,
    /// Bumped when a token is forgotten: every thread's copies made before are stale.
    epoch: std::sync::atomic::AtomicU64,
}

/// Tokens per thread and `Auth`, at most; the thread's map is emptied when it would grow
/// beyond.
const LOCAL_MAX: usize = 10_000;

thread_local! {
    /// Each request thread's own view of the token cache: a hit reads and writes only
    /// memory of this thread (no lock word, no shared reference count), so the threads of
    /// a busy server do not pass the cache's cache lines back and forth on every request.
    /// A thread's grant is its own copy of the shared one, with its own verdicts.
    /// By [`Auth::id`]: one entry per server in the process, so a short list (the oldest
    /// goes beyond [`SERVERS_MAX`]) is searched faster than a map is hashed.
    static LOCAL: std::cell::RefCell<Vec<Local>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `Auth`s whose tokens one thread keeps copies of, at most.
const SERVERS_MAX: usize = 8;

#[derive(Default)]
struct Local {
    /// [`Auth::id`] of the server these are of.
    auth: u64,
    /// [`Auth::epoch`] when these were copied.
    epoch: u64,
    tokens: HashMap<String, LocalGrant, foldhash::fast::RandomState>,
}

struct LocalGrant {
    /// The shared cache's grant this is a copy of.
    shared: Arc<Grant>,
    copy: Arc<Grant>,
    /// When the shared grant was read from the database.
    seen: crate::time::Micros,
}

/// Whether a grant read at `seen` may be used at `now` without reading it again.
fn fresh(grant: &Grant, seen: crate::time::Micros, now: crate::time::Micros) -> bool {
    grant.expires_at > now && (seen..=seen + REVALIDATE.as_micros() as i64).contains(&now)
}

impl Auth {
    pub fn new(
        mode: Mode,
        audit_reads: bool,
        audit_read_window: std::time::Duration,
        oidc: Option<federation::Config>,
    ) -> Auth {
        Auth {
            audit_read_window,
            federation: oidc.map(federation::Federation::new),
            mode,
            audit_reads,
            cache: RwLock::new(HashMap::default()),
            issued: Default::default(),
            sealer: std::sync::OnceLock::new(),
            origins: RwLock::new(None),
            jwks_cache: RwLock::new(HashMap::new()),
            keys: std::sync::OnceLock::new(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            epoch: Default::default(),
        }
    }

    /// Loads (or makes, on first start) the server's sealing key and signing keys.
    pub async fn init(&self, store: &Store) -> Result<()> {
        if self.sealer.get().is_none() {
            let s = seal::Sealer::load(store).await?;
            let _ = self.sealer.set(s);
        }
        if self.keys.get().is_none() {
            let k = keys::load(store).await?;
            let _ = self.keys.set(k);
        }
        Ok(())
    }

    /// The id_token signing keys, newest (the one in use) first.
    pub fn signing_keys(&self) -> &[keys::SigningKey] {
        self.keys.get().map_or(&[], Vec::as_slice)
    }

    pub fn sealer(&self) -> Option<&seal::Sealer> {
        self.sealer.get()
    }

    pub fn enabled(&self) -> bool {
        self.mode == Mode::Smart
    }

    /// The grant of an `Authorization: Bearer ...` header value; 401 for a missing,
    /// unknown, expired or revoked token (the reason goes to the client, the token does not).
    pub async fn authenticate(&self, store: &Store, header: Option<&str>) -> Result<Arc<Grant>> {
        let token = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                unauthorized("this server requires an access token (Authorization: Bearer ...)")
            })?;
        let now = crate::time::now_micros();
        if let Some(grant) = self.local(token, now) {
            return Ok(grant);
        }
        // The epoch before the shared cache is read: a `forget` meanwhile makes the copy
        // taken below stale at once.
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
        if let Some((grant, seen)) = self.cached(token, now) {
            return Ok(self.copy(token, grant, seen, epoch));
        }
        // Boxed: the database read's future is kilobytes, carried otherwise by every
        // request's future though the cache answers almost all of them.
        match Box::pin(lookup(store, &token_hash(token), "access", now)).await? {
            Some(grant) => {
                let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
                // Revalidated and unchanged: the same `Grant` goes on (with the verdicts it
                // has remembered).
                let grant = match cache.get(token) {
                    Some((old, _)) if **old == grant => old.clone(),
                    _ => Arc::new(grant),
                };
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(token.to_string(), (grant.clone(), now));
                drop(cache);
                Ok(self.copy(token, grant, now, epoch))
            }
            None => {
                // Gone since it was read: the shared entry goes. Every thread's copy is as
                // old as it, so none is fresh either (no epoch bump; a stream of unknown
                // tokens does not empty the threads' caches).
                self.cache
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(token);
                Err(unauthorized(
                    "the access token is not valid (unknown, expired or revoked)",
                ))
            }
        }
    }

    /// This thread's copy of `token`'s grant, if it is fresh.
    fn local(&self, token: &str, now: crate::time::Micros) -> Option<Arc<Grant>> {
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
        LOCAL.with_borrow(|local| {
            let mine = local
                .iter()
                .find(|l| l.auth == self.id)
                .filter(|l| l.epoch == epoch)?;
            let g = mine.tokens.get(token)?;
            fresh(&g.shared, g.seen, now).then(|| g.copy.clone())
        })
    }

    /// This thread's copy of the shared `grant` (read from the database at `seen`), kept
    /// for the next request: the copy it already has while the shared grant is the same (so
    /// its verdicts go on), else a new one.
    fn copy(
        &self,
        token: &str,
        grant: Arc<Grant>,
        seen: crate::time::Micros,
        epoch: u64,
    ) -> Arc<Grant> {
        LOCAL.with_borrow_mut(|local| {
            let i = match local.iter().position(|l| l.auth == self.id) {
                Some(i) => i,
                None => {
                    if local.len() >= SERVERS_MAX {
                        local.remove(0);
                    }
                    local.push(Local {
                        auth: self.id,
                        ..Local::default()
                    });
                    local.len() - 1
                }
            };
            let mine = &mut local[i];
            if mine.epoch != epoch {
                mine.tokens.clear();
                mine.epoch = epoch;
            }
            if let Some(g) = mine.tokens.get_mut(token)
                && Arc::ptr_eq(&g.shared, &grant)
            {
                g.seen = seen;
                return g.copy.clone();
            }
            if mine.tokens.len() >= LOCAL_MAX {
                mine.tokens.clear();
            }
            let copy = Arc::new(Grant::clone(&grant));
            mine.tokens.insert(
                token.to_string(),
                LocalGrant {
                    shared: grant,
                    copy: copy.clone(),
                    seen,
                },
            );
            copy
        })
    }

    fn cached(
        &self,
        token: &str,
        now: crate::time::Micros,
    ) -> Option<(Arc<Grant>, crate::time::Micros)> {
        {
            let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
            let (grant, seen) = cache.get(token)?;
            if fresh(grant, *seen, now) {
                return Some((grant.clone(), *seen));
            }
            if grant.expires_at > now {
                // Due for revalidation: kept until then, so an unchanged grant is reused.
                return None;
            }
        }
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
        None
    }

    /// Drops a token from this process's cache (after revoking it), and with it every
    /// thread's copies of all tokens (they are copied again from the shared cache).
    pub fn forget(&self, token: &str) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The value of parameter `name` among form or query parameters.
pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A parameter given more than once (OAuth requests must not repeat one).
pub fn repeated(params: &[(String, String)]) -> Option<&str> {
    params
        .iter()
        .map(|(k, _)| k.as_str())
        .find(|k| params.iter().filter(|(x, _)| x == k).count() > 1)
}

pub fn unauthorized(d: impl Into<String>) -> FhirError {
    FhirError::new(ErrorKind::Unauthorized, d)
}

/// SHA-256 of a token, in hex: the key tokens are stored under.
pub fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: 256 random bits, base64url.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| FhirError::internal("no randomness for a token"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// A stored token, code or launch handle (`auth_token`), read whole.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub client_id: String,
    pub scope: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub fhir_user: Option<String>,
    pub issued_at: crate::time::Micros,
    pub expires_at: crate::time::Micros,
    /// Codes: the redirect_uri and PKCE challenge they were issued for, the OIDC nonce.
    pub redirect_uri: Option<String>,
    pub code_challenge: Option<String>,
    pub nonce: Option<String>,
    pub need_banner: bool,
}

impl TokenRow {
    /// What an access token row grants.
    pub fn grant(self) -> Grant {
        let scopes = scope::parse_list(&self.scope)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| match s {
                scope::Scope::Resource(r) => Some(r),
                scope::Scope::Other(_) => None,
            })
            .collect();
        Grant {
            client_id: self.client_id,
            scopes,
            scope_text: self.scope,
            patient: self.patient,
            encounter: self.encounter,
            fhir_user: self.fhir_user,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            verdicts: access::Verdicts::default(),
            origin: access::Origin::new(),
        }
    }
}

/// A live row of `kind` by hash: not expired, not revoked.
pub async fn live_token(
    store: &Store,
    hash: &str,
    kind: &str,
    now: crate::time::Micros,
) -> Result<Option<TokenRow>> {
    let mut db = store.reader().await?;
    let row = db
        .fetch_optional(
            "SELECT client_id, scope, patient, encounter, fhir_user, issued_at, expires_at, redirect_uri, code_challenge, nonce, COALESCE(need_banner, 0) FROM auth_token WHERE hash = $1 AND kind = $2 AND revoked_at IS NULL AND expires_at > $3",
            &[Arg::Text(hash.to_string()), Arg::Text(kind.to_string()), Arg::Int(now)],
            &[
                Ty::Text,
                Ty::Text,
                Ty::OptText,
                Ty::OptText,
                Ty::OptText,
                Ty::Int,
                Ty::Int,
                Ty::OptText,
                Ty::OptText,
                Ty::OptText,
                Ty::Int,
            ],
        )
        .await?;
    Ok(row.map(|r| {
        let mut it = r.into_iter();
        let mut next = || it.next().unwrap_or(crate::store::Val::Null);
        TokenRow {
            client_id: next().text().unwrap_or_default(),
            scope: next().text().unwrap_or_default(),
            patient: next().text(),
            encounter: next().text(),
            fhir_user: next().text(),
            issued_at: next().int(),
            expires_at: next().int(),
            redirect_uri: next().text(),
            code_challenge: next().text(),
            nonce: next().text(),
            need_banner: next().int() == 1,
        }
    }))
}

/// The grant of a live token of `kind` by hash.
pub async fn lookup(
    store: &Store,
    hash: &str,
    kind: &str,
    now: crate::time::Micros,
) -> Result<Option<Grant>> {
    Ok(live_token(store, hash, kind, now)
        .await?
        .map(TokenRow::grant))
}

/// A fetched JWK Set is used for this long before it is fetched again.
const JWKS_TTL: Duration = Duration::from_secs(300);
/// A forced refetch (unknown `kid`) happens at most this often per URL.
const JWKS_REFETCH: Duration = Duration::from_secs(10);
/// Largest JWK Set accepted from a URL.
const JWKS_MAX_BYTES: usize = 64 * 1024;

/// The JWK Set a client publishes at `url` (`clients add --jwks-url`), cached for
/// [`JWKS_TTL`]; `refetch` asks for a fresh copy (a `kid` the cached one lacks), at most
/// every [`JWKS_REFETCH`]. HTTPS certificates are checked against the system's CA bundle.
pub async fn remote_jwks(
    ctx: &crate::interaction::Ctx,
    url: &str,
    refetch: bool,
) -> std::result::Result<serde_json::Value, String> {
    {
        let cache = ctx
            .auth
            .jwks_cache
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((at, set)) = cache.get(url) {
            let age = at.elapsed();
            if age < JWKS_REFETCH || (!refetch && age < JWKS_TTL) {
                return Ok(set.clone());
            }
        }
    }
    let client = http_client().map_err(|e| format!("cannot fetch the JWK Set: {e}"))?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("cannot fetch the JWK Set at {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "the JWK Set at {url} answered {}",
            response.status()
        ));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| format!("reading the JWK Set at {url}: {e}"))?;
    if bytes.len() > JWKS_MAX_BYTES {
        return Err(format!(
            "the JWK Set at {url} is larger than {JWKS_MAX_BYTES} bytes"
        ));
    }
    let set: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| format!("the JWK Set at {url} is not JSON"))?;
    jwt::check_jwks(&set).map_err(|e| format!("the JWK Set at {url}: {e}"))?;
    ctx.auth
        .jwks_cache
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(url.to_string(), (Instant::now(), set.clone()));
    Ok(set)
}

/// Whether `url` is `https://`, or `http://` on a loopback address (development and tests):
/// what the server accepts for URLs it fetches keys from.
pub fn https_or_loopback(url: &str) -> bool {
    let loopback = [
        "http://127.0.0.1:",
        "http://127.0.0.1/",
        "http://localhost:",
        "http://localhost/",
        "http://[::1]:",
    ];
    url.starts_with("https://") || loopback.iter().any(|p| url.starts_with(p))
}

/// The HTTP client for JWKS URLs and the OpenID Connect provider: 5 s timeout, no redirects, the system CA bundle.
pub(crate) fn http_client() -> std::result::Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<std::result::Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let mut b = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .tls_built_in_root_certs(false);
            for path in [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
            ] {
                if let Ok(pem) = std::fs::read(path) {
                    for cert in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
                        b = b.add_root_certificate(cert);
                    }
                    break;
                }
            }
            b.build().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}
