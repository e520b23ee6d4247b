//! The server's signing keys for OpenID Connect id_tokens (RS256, as SMART requires): RSA
//! 2048 keys made on first start (with the `rsa` crate: ring signs with RSA keys but cannot
//! make them) and kept in `auth_key`; the newest signs, the newest two are published in the
//! JWK Set so tokens signed before a rotation (`iomt-fhir keys rotate`) still verify.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{self, KeyPair};
use serde_json::{Value, json};

use crate::error::{FhirError, Result};
use crate::store::{Arg, Store, Ty};

pub struct SigningKey {
    pub kid: String,
    pair: signature::RsaKeyPair,
    pub jwk: Value,
}

impl SigningKey {
    pub fn from_pkcs8(kid: &str, der: &[u8]) -> Result<SigningKey> {
        let pair = signature::RsaKeyPair::from_pkcs8(der)
            .map_err(|e| FhirError::internal(format!("signing key {kid}: {e}")))?;
        let c: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
        let jwk = json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(&c.n),
            "e": URL_SAFE_NO_PAD.encode(&c.e),
        });
        let _ = pair.public_key();
        Ok(SigningKey {
            kid: kid.to_string(),
            pair,
            jwk,
        })
    }

    /// A compact JWS (RS256) of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        let header = json!({"alg": "RS256", "kid": self.kid, "typ": "JWT"});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut sig,
            )
            .map_err(|_| FhirError::internal("signing an id_token failed"))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// A new RSA 2048 key as PKCS#8 DER.
fn generate() -> Result<Vec<u8>> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand_core_06::OsRng, 2048)
        .map_err(|e| FhirError::internal(format!("RSA key generation: {e}")))?;
    let der = key
        .to_pkcs8_der()
        .map_err(|e| FhirError::internal(format!("RSA key encoding: {e}")))?;
    Ok(der.as_bytes().to_vec())
}

/// Adds a new signing key (first start, or a rotation).
pub async fn add(store: &Store) -> Result<String> {
    let der = tokio::task::spawn_blocking(generate)
        .await
        .map_err(|_| FhirError::internal("key generation stopped"))??;
    let kid = crate::interaction::new_id();
    let k = kid.clone();
    store
        .write(move |db| {
            Box::pin(async move {
                db.execute(
                    "INSERT INTO auth_key (kid, pkcs8, created_at) VALUES ($1, $2, $3)",
                    &[
                        Arg::Text(k),
                        Arg::Text(STANDARD.encode(der)),
                        Arg::Int(crate::time::now_micros()),
                    ],
                )
                .await
            })
        })
        .await?;
    Ok(kid)
}

/// The newest two keys, newest first; makes the first one if there is none.
pub async fn load(store: &Store) -> Result<Vec<SigningKey>> {
    let read = |store: &Store| {
        let store = store.clone();
        async move {
            let mut db = store.reader().await?;
            db.fetch_all(
                "SELECT kid, pkcs8 FROM auth_key ORDER BY created_at DESC, kid LIMIT 2",
                &[],
                &[Ty::Text, Ty::Text],
            )
            .await
        }
    };
    let mut rows = read(store).await?;
    if rows.is_empty() {
        add(store).await?;
        rows = read(store).await?;
    }
    let mut keys = Vec::new();
    for r in rows {
        let mut it = r.into_iter();
        let (Some(kid), Some(der)) = (
            it.next().and_then(|v| v.text()),
            it.next().and_then(|v| v.text()),
        ) else {
            continue;
        };
        let der = STANDARD
            .decode(der)
            .map_err(|_| FhirError::internal(format!("signing key {kid} is corrupt")))?;
        keys.push(SigningKey::from_pkcs8(&kid, &der)?);
    }
    Ok(keys)
}
