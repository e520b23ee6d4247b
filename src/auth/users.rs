//! Local user accounts for the authorization code flow (`iomt-fhir users add`): a username,
//! a password stored as PBKDF2-HMAC-SHA256 (salted, 100,000 iterations), and the FHIR
//! resource the user is (`fhirUser`: `Practitioner/1`, `Patient/2`, ...).

use std::num::NonZeroU32;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;

use crate::error::{FhirError, Result};
use crate::store::{Arg, Store, Ty};

const ITERATIONS: u32 = 100_000;

/// `pbkdf2-sha256$iterations$salt$hash`.
pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| FhirError::internal("no randomness for a salt"))?;
    let mut out = [0u8; 32];
    let iterations = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        password.as_bytes(),
        &mut out,
    );
    Ok(format!(
        "pbkdf2-sha256${ITERATIONS}${}${}",
        URL_SAFE_NO_PAD.encode(salt),
        URL_SAFE_NO_PAD.encode(out)
    ))
}

/// Whether `password` matches a stored hash (constant-time comparison inside ring).
pub fn verify_password(stored: &str, password: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some("pbkdf2-sha256"), Some(iter), Some(salt), Some(hash), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Some(iter), Ok(salt), Ok(hash)) = (
        iter.parse::<u32>().ok().and_then(NonZeroU32::new),
        URL_SAFE_NO_PAD.decode(salt),
        URL_SAFE_NO_PAD.decode(hash),
    ) else {
        return false;
    };
    ring::pbkdf2::verify(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iter,
        &salt,
        password.as_bytes(),
        &hash,
    )
    .is_ok()
}

/// Resource types a `fhirUser` may be (SMART App Launch).
pub const FHIR_USER_TYPES: [&str; 4] = ["Practitioner", "Patient", "RelatedPerson", "Person"];

/// `reference` is `TYPE/id` with TYPE one of [`FHIR_USER_TYPES`].
pub fn is_fhir_user(reference: &str) -> bool {
    reference.split_once('/').is_some_and(|(ty, id)| {
        FHIR_USER_TYPES.contains(&ty) && crate::interaction::is_valid_id(id)
    })
}

/// Adds (or replaces) an account.
pub async fn add(store: &Store, username: &str, password: &str, fhir_user: &str) -> Result<()> {
    if username.is_empty() || username.len() > 128 {
        return Err(FhirError::invalid("a username has 1-128 characters"));
    }
    if password.chars().count() < 8 {
        return Err(FhirError::invalid("a password has at least 8 characters"));
    }
    if !is_fhir_user(fhir_user) {
        return Err(FhirError::invalid(
            "--fhir-user must be Practitioner/ID, Patient/ID, RelatedPerson/ID or Person/ID",
        ));
    }
    let hash = hash_password(password)?;
    let (u, f) = (username.to_string(), fhir_user.to_string());
    store
        .write(move |db| {
            Box::pin(async move {
                db.execute("DELETE FROM auth_user WHERE username = $1", &[Arg::Text(u.clone())])
                    .await?;
                db.execute(
                    "INSERT INTO auth_user (username, password_hash, fhir_user, created_at) VALUES ($1, $2, $3, $4)",
                    &[Arg::Text(u), Arg::Text(hash), Arg::Text(f), Arg::Int(crate::time::now_micros())],
                )
                .await?;
                Ok(())
            })
        })
        .await
}

/// The user's `fhirUser` if the password is right.
pub async fn check(store: &Store, username: &str, password: &str) -> Result<Option<String>> {
    let mut db = store.reader().await?;
    let row = db
        .fetch_optional(
            "SELECT password_hash, fhir_user FROM auth_user WHERE username = $1",
            &[Arg::Text(username.to_string())],
            &[Ty::Text, Ty::Text],
        )
        .await?;
    let Some(row) = row else {
        // Spend the same time as a wrong password, so timing does not tell which users exist.
        let _ = verify_password(DUMMY, password);
        return Ok(None);
    };
    let mut it = row.into_iter();
    let (hash, fhir_user) = (
        it.next().and_then(|v| v.text()).unwrap_or_default(),
        it.next().and_then(|v| v.text()).unwrap_or_default(),
    );
    Ok(verify_password(&hash, password).then_some(fhir_user))
}

const DUMMY: &str =
    "pbkdf2-sha256$100000$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").unwrap_or_default();
        assert!(verify_password(&h, "correct horse"));
        assert!(!verify_password(&h, "correct hors"));
        assert!(!verify_password("garbage", "x"));
        assert!(!verify_password(DUMMY, "x"));
        assert_ne!(h, hash_password("correct horse").unwrap_or_default());
    }
}
