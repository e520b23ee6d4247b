//! Compact JWS (RFC 7515) verification for client assertions (SMART Backend Services,
//! `private_key_jwt`): RS384 and ES384, the two algorithms SMART requires servers to accept,
//! with keys from a client's registered JWK Set (RFC 7517), verified with `ring`. Pure code.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature;
use serde_json::Value;

/// A JWS whose signature was checked, with its header and claims.
#[derive(Debug, Clone)]
pub struct Verified {
    pub header: Value,
    pub claims: Value,
}

/// What is wrong with an assertion; the text goes into `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtError(pub String);

fn err(s: impl Into<String>) -> JwtError {
    JwtError(s.into())
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| err(format!("the {what} is not base64url")))
}

/// Splits and decodes a compact JWS without checking the signature: the header says which
/// key to use, the claims say which client it claims to be.
pub fn decode_unverified(token: &str) -> Result<Verified, JwtError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err(
            "the assertion is not a compact JWS (three dot-separated parts)",
        ));
    };
    let header: Value = serde_json::from_slice(&b64(h, "JWS header")?)
        .map_err(|_| err("the JWS header is not JSON"))?;
    let claims: Value = serde_json::from_slice(&b64(c, "JWT claims")?)
        .map_err(|_| err("the JWT claims are not JSON"))?;
    if !header.is_object() || !claims.is_object() {
        return Err(err("the JWS header and claims must be JSON objects"));
    }
    Ok(Verified { header, claims })
}

/// Verifies `token` with the key of `jwks` that its header's `kid` and `alg` select.
pub fn verify(token: &str, jwks: &Value) -> Result<Verified, JwtError> {
    let decoded = decode_unverified(token)?;
    let alg = decoded
        .header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kty = match alg {
        "RS384" => "RSA",
        "ES384" => "EC",
        other => {
            return Err(err(format!(
                "alg {other:?} is not accepted; use RS384 or ES384"
            )));
        }
    };
    let kid = decoded
        .header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| err("the JWS header has no kid"))?;
    let key = jwks
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|k| {
            k.get("kid").and_then(Value::as_str) == Some(kid)
                && k.get("kty").and_then(Value::as_str) == Some(kty)
                && k.get("alg")
                    .and_then(Value::as_str)
                    .is_none_or(|a| a == alg)
        })
        .ok_or_else(|| {
            err(format!(
                "no registered {kty} key with kid {kid:?} for alg {alg}"
            ))
        })?;
    let (signed, sig) = token
        .rsplit_once('.')
        .ok_or_else(|| err("the assertion is not a compact JWS"))?;
    let sig = b64(sig, "signature")?;
    let ok = match alg {
        "RS384" => {
            let n = b64(jwk_str(key, "n")?, "RSA modulus")?;
            let e = b64(jwk_str(key, "e")?, "RSA exponent")?;
            signature::RsaPublicKeyComponents { n: &n, e: &e }
                .verify(
                    &signature::RSA_PKCS1_2048_8192_SHA384,
                    signed.as_bytes(),
                    &sig,
                )
                .is_ok()
        }
        _ => {
            if key.get("crv").and_then(Value::as_str) != Some("P-384") {
                return Err(err(format!("key {kid:?} is not on curve P-384")));
            }
            let x = b64(jwk_str(key, "x")?, "EC x")?;
            let y = b64(jwk_str(key, "y")?, "EC y")?;
            if x.len() != 48 || y.len() != 48 {
                return Err(err(format!("key {kid:?} has malformed P-384 coordinates")));
            }
            let mut point = Vec::with_capacity(97);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, &point)
                .verify(signed.as_bytes(), &sig)
                .is_ok()
        }
    };
    if !ok {
        return Err(err("the assertion's signature does not verify"));
    }
    Ok(decoded)
}

fn jwk_str<'a>(key: &'a Value, name: &str) -> Result<&'a str, JwtError> {
    key.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("the registered key has no {name}")))
}

/// Checks a JWK Set a client registers: an object with `keys`, each an RSA or P-384 key
/// with a `kid`, public parts only.
pub fn check_jwks(jwks: &Value) -> Result<(), String> {
    let keys = jwks
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("a JWK Set is an object with a keys array")?;
    if keys.is_empty() {
        return Err("the JWK Set has no keys".into());
    }
    for k in keys {
        let kid = k
            .get("kid")
            .and_then(Value::as_str)
            .ok_or("every key needs a kid")?;
        if k.get("d").is_some() {
            return Err(format!(
                "key {kid:?} contains a private part (d); register public keys only"
            ));
        }
        match k.get("kty").and_then(Value::as_str) {
            Some("RSA") if k.get("n").is_some() && k.get("e").is_some() => {}
            Some("EC") if k.get("crv").and_then(Value::as_str) == Some("P-384") => {}
            _ => {
                return Err(format!(
                    "key {kid:?} must be RSA (n, e) or EC on P-384 (x, y)"
                ));
            }
        }
    }
    Ok(())
}

/// Test and bench helpers: sign compact JWS with ring keys.
pub mod sign {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::KeyPair;

    /// A client key pair for tests and the benchmark.
    pub enum Key {
        Es384(Box<signature::EcdsaKeyPair>),
        Rs384(Box<signature::RsaKeyPair>),
    }

    impl Key {
        /// A fresh P-384 key.
        pub fn generate_es384() -> Result<Key, String> {
            let rng = SystemRandom::new();
            let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &rng,
            )
            .map_err(|_| "P-384 key generation failed")?;
            signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                pkcs8.as_ref(),
                &rng,
            )
            .map(|k| Key::Es384(Box::new(k)))
            .map_err(|e| e.to_string())
        }

        /// An RSA key from PKCS#8 DER (ring cannot generate RSA keys).
        pub fn rs384_from_pkcs8(der: &[u8]) -> Result<Key, String> {
            signature::RsaKeyPair::from_pkcs8(der)
                .map(|k| Key::Rs384(Box::new(k)))
                .map_err(|e| e.to_string())
        }

        /// An RSA key from a PEM `PRIVATE KEY` (PKCS#8) block.
        pub fn rs384_from_pem(pem: &str) -> Result<Key, String> {
            let der = base64::engine::general_purpose::STANDARD
                .decode(
                    pem.lines()
                        .filter(|l| !l.starts_with("-----"))
                        .collect::<String>(),
                )
                .map_err(|e| format!("not PEM: {e}"))?;
            Key::rs384_from_pkcs8(&der)
        }

        pub fn alg(&self) -> &'static str {
            match self {
                Key::Es384(_) => "ES384",
                Key::Rs384(_) => "RS384",
            }
        }

        /// The public JWK with `kid`.
        pub fn jwk(&self, kid: &str) -> Value {
            match self {
                Key::Es384(k) => {
                    let p = k.public_key().as_ref();
                    serde_json::json!({
                        "kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384",
                        "x": URL_SAFE_NO_PAD.encode(&p[1..49]),
                        "y": URL_SAFE_NO_PAD.encode(&p[49..97]),
                    })
                }
                Key::Rs384(k) => {
                    let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                    serde_json::json!({
                        "kty": "RSA", "kid": kid, "alg": "RS384",
                        "n": URL_SAFE_NO_PAD.encode(&c.n),
                        "e": URL_SAFE_NO_PAD.encode(&c.e),
                    })
                }
            }
        }

        /// A compact JWS of `claims` with header `{alg, kid, typ: JWT}` plus `extra_header`.
        pub fn sign(&self, kid: &str, claims: &Value, extra_header: &Value) -> String {
            let mut header = serde_json::json!({"alg": self.alg(), "kid": kid, "typ": "JWT"});
            if let (Some(h), Some(x)) = (header.as_object_mut(), extra_header.as_object()) {
                for (k, v) in x {
                    h.insert(k.clone(), v.clone());
                }
            }
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let rng = SystemRandom::new();
            let sig = match self {
                Key::Es384(k) => k
                    .sign(&rng, signed.as_bytes())
                    .map(|s| s.as_ref().to_vec())
                    .unwrap_or_default(),
                Key::Rs384(k) => {
                    let mut sig = vec![0; k.public().modulus_len()];
                    match k.sign(
                        &signature::RSA_PKCS1_SHA384,
                        &rng,
                        signed.as_bytes(),
                        &mut sig,
                    ) {
                        Ok(()) => sig,
                        Err(_) => Vec::new(),
                    }
                }
            };
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sign::Key;
    use super::*;
    use serde_json::json;

    fn rsa() -> Key {
        let pem = include_str!("../../tests/fixtures/jwt/rs384-client.pk8.pem");
        match Key::rs384_from_pem(pem) {
            Ok(k) => k,
            Err(e) => panic!("fixture key: {e}"),
        }
    }

    fn es() -> Key {
        match Key::generate_es384() {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn es384_and_rs384_verify_with_the_registered_key() {
        for key in [es(), rsa()] {
            let jwks = json!({"keys": [key.jwk("k1")]});
            assert_eq!(check_jwks(&jwks), Ok(()));
            let token = key.sign("k1", &json!({"iss": "c"}), &json!({}));
            let v = match verify(&token, &jwks) {
                Ok(v) => v,
                Err(e) => panic!("{}: {e:?}", key.alg()),
            };
            assert_eq!(v.claims["iss"], "c");
        }
    }

    #[test]
    fn wrong_key_kid_alg_or_tampering_is_rejected() {
        let key = es();
        let other = es();
        let jwks = json!({"keys": [key.jwk("k1")]});
        let token = other.sign("k1", &json!({"iss": "c"}), &json!({}));
        assert!(
            verify(&token, &jwks)
                .unwrap_err()
                .0
                .contains("does not verify")
        );
        let token = key.sign("k2", &json!({"iss": "c"}), &json!({}));
        assert!(verify(&token, &jwks).unwrap_err().0.contains("kid"));
        // An RSA signature cannot select the EC key of the same kid.
        let token = rsa().sign("k1", &json!({"iss": "c"}), &json!({}));
        assert!(verify(&token, &jwks).is_err());
        let token = key.sign("k1", &json!({"iss": "c"}), &json!({"alg": "none"}));
        assert!(
            verify(&token, &jwks)
                .unwrap_err()
                .0
                .contains("not accepted")
        );
        let token = key.sign("k1", &json!({"iss": "c"}), &json!({}));
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(json!({"iss": "admin"}).to_string());
        parts[1] = &forged;
        assert!(verify(&parts.join("."), &jwks).is_err());
        for junk in ["", "a.b", "a.b.c.d", "!!.??.**"] {
            assert!(verify(junk, &jwks).is_err(), "{junk}");
        }
    }

    #[test]
    fn registered_key_sets_hold_public_keys_only() {
        assert!(check_jwks(&json!({"keys": []})).is_err());
        assert!(check_jwks(&json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "a"}]})).is_err());
        let mut private = rsa().jwk("a");
        private["d"] = json!("secret");
        assert!(check_jwks(&json!({"keys": [private]})).is_err());
    }
}
