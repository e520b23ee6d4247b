-- SMART on FHIR (authorization issue): registered clients, issued tokens (stored as SHA-256
-- hashes, never in clear), and the client-assertion ids (jti) already used.
CREATE TABLE auth_client (
    id            TEXT PRIMARY KEY,
    kind          TEXT    NOT NULL,      -- public | confidential-symmetric | confidential-asymmetric
    secret_hash   TEXT,                  -- confidential-symmetric: SHA-256 hex of the secret
    jwks          TEXT,                  -- confidential-asymmetric: the JWK Set (public keys)
    jwks_url      TEXT,                  -- ... or where the client publishes it
    scopes        TEXT    NOT NULL,      -- the scopes the client may be granted
    redirect_uris TEXT    NOT NULL,      -- space-separated
    origins       TEXT    NOT NULL,      -- space-separated CORS origins
    created_at    INTEGER NOT NULL
);
CREATE TABLE auth_token (
    hash       TEXT PRIMARY KEY,         -- SHA-256 hex of the token
    kind       TEXT    NOT NULL,         -- access | refresh | code | launch
    client_id  TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    patient    TEXT,
    encounter  TEXT,
    fhir_user  TEXT,
    issued_at  INTEGER NOT NULL,         -- microseconds since the Unix epoch, UTC
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    redirect_uri   TEXT,                 -- code: the redirect_uri it was issued for
    code_challenge TEXT,                 -- code: the PKCE S256 challenge
    need_banner    INTEGER,                -- 1 when the app should show a patient banner
    nonce          TEXT                  -- code: the OpenID Connect nonce to echo in the id_token
);
CREATE INDEX auth_token_expiry ON auth_token (expires_at);
CREATE TABLE auth_jti (
    client_id  TEXT    NOT NULL,
    jti        TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX auth_jti_expiry ON auth_jti (expires_at);
-- Local accounts for the authorization code flow (practitioners and patients, linked to
-- their FHIR record through fhir_user).
CREATE TABLE auth_user (
    username      TEXT PRIMARY KEY,
    password_hash TEXT    NOT NULL,      -- pbkdf2-sha256$iterations$salt$hash (base64url)
    fhir_user     TEXT    NOT NULL,      -- Practitioner/1, Patient/2, ...
    created_at    INTEGER NOT NULL
);
-- Server secrets made on first start (the HMAC key for sessions and login forms).
CREATE TABLE auth_secret (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The server's id_token signing keys (RS256), newest first in use; `iomt-fhir keys rotate`
-- adds one, and the previous stays published until the next rotation.
CREATE TABLE auth_key (
    kid        TEXT PRIMARY KEY,
    pkcs8      TEXT    NOT NULL,         -- base64 PKCS#8 DER of the RSA private key
    created_at INTEGER NOT NULL
);
