-- SMART on FHIR (authorization issue): registered clients, issued tokens (stored as SHA-256
-- hashes, never in clear), and the client-assertion ids (jti) already used.
CREATE TABLE auth_client (
    id            TEXT COLLATE "C" PRIMARY KEY,
    kind          TEXT    NOT NULL,      -- public | confidential-symmetric | confidential-asymmetric
    secret_hash   TEXT,                  -- confidential-symmetric: SHA-256 hex of the secret
    jwks          TEXT,                  -- confidential-asymmetric: the JWK Set (public keys)
    scopes        TEXT    NOT NULL,      -- the scopes the client may be granted
    redirect_uris TEXT    NOT NULL,      -- space-separated
    origins       TEXT    NOT NULL,      -- space-separated CORS origins
    created_at    BIGINT NOT NULL
);
CREATE TABLE auth_token (
    hash       TEXT COLLATE "C" PRIMARY KEY,         -- SHA-256 hex of the token
    kind       TEXT    NOT NULL,         -- access | refresh
    client_id  TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    patient    TEXT,
    encounter  TEXT,
    fhir_user  TEXT,
    issued_at  BIGINT NOT NULL,         -- microseconds since the Unix epoch, UTC
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX auth_token_expiry ON auth_token (expires_at);
CREATE TABLE auth_jti (
    client_id  TEXT    NOT NULL,
    jti        TEXT    NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX auth_jti_expiry ON auth_jti (expires_at);
