//! Tamper-evident values the server hands to browsers and reads back: the pending
//! authorization request carried through the login and consent forms, and the session
//! cookie. `seal` = base64url(payload) `.` base64url(HMAC-SHA256); the key is made on first
//! start and kept in the database (`auth_secret`), so every process sharing the database
//! accepts what another sealed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::SecureRandom;
use serde_json::Value;

use crate::error::{FhirError, Result};
use crate::store::{Arg, Store, Ty};

pub struct Sealer {
    key: hmac::Key,
}

impl Sealer {
    /// Loads the key, making it first if this database has none.
    pub async fn load(store: &Store) -> Result<Sealer> {
        let mut fresh = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut fresh)
            .map_err(|_| FhirError::internal("no randomness for a key"))?;
        let candidate = URL_SAFE_NO_PAD.encode(fresh);
        store
            .write(move |db| {
                Box::pin(async move {
                    db.execute(
                        "INSERT INTO auth_secret (name, value) VALUES ('seal', $1) ON CONFLICT (name) DO NOTHING",
                        &[Arg::Text(candidate)],
                    )
                    .await
                })
            })
            .await?;
        let mut db = store.reader().await?;
        let value = db
            .fetch_optional(
                "SELECT value FROM auth_secret WHERE name = 'seal'",
                &[],
                &[Ty::Text],
            )
            .await?
            .and_then(|r| r.into_iter().next())
            .and_then(|v| v.text())
            .ok_or_else(|| FhirError::internal("the sealing key is missing"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| FhirError::internal("the sealing key is corrupt"))?;
        Ok(Sealer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// Seals `payload` with an expiry (seconds since the epoch).
    pub fn seal(&self, payload: &Value, expires: i64) -> String {
        let body =
            URL_SAFE_NO_PAD.encode(serde_json::json!({"p": payload, "exp": expires}).to_string());
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The payload of a sealed value that is intact and not expired.
    pub fn open(&self, sealed: &str, now: i64) -> Option<Value> {
        let (body, tag) = sealed.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        hmac::verify(&self.key, body.as_bytes(), &tag).ok()?;
        let v: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
        if v.get("exp").and_then(Value::as_i64)? <= now {
            return None;
        }
        v.get("p").cloned()
    }
}
