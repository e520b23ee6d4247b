//! Configuration: command-line flags, each also an environment variable
//! `IOMT_FHIR_<NAME>`, over an optional TOML file (`--config`), over defaults. Bad
//! configuration fails at start with one clear line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::interaction::delete::ConditionalDeleteMode;
use crate::store::Durability;

#[derive(Parser, Debug)]
#[command(
    name = "iomt-fhir",
    version,
    about = "FHIR R4 server for the Internet of Medical Things"
)]
pub struct Cli {
    /// TOML file with defaults for any option below (keys as the long flag names, with `_`).
    #[arg(long, global = true, env = "IOMT_FHIR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the FHIR server.
    Serve(ServerArgs),
    /// Load transaction/batch Bundles (JSON) and bulk NDJSON files through the write path.
    Import {
        #[command(flatten)]
        server: ServerArgs,
        /// Files or directories (searched recursively for *.json and *.ndjson).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Files loaded concurrently.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
    },
    /// List or replay stored HL7 v2 messages.
    #[command(subcommand)]
    Hl7(Hl7Command),
    /// Device feed dead letters: list them, or map them again after a template fix.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// OAuth clients of the SMART authorization server (`--auth smart`).
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Local accounts that sign in to authorize SMART apps (`--auth smart`).
    #[command(subcommand)]
    Users(UsersCommand),
    /// The id_token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Mint an EHR launch handle with a patient (and encounter) in context; prints it.
    Launch {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        encounter: Option<String>,
    },
    /// Put the stored SearchParameter resources in force and rebuild the search indexes
    /// (after adding or changing SearchParameters, or upgrading the server).
    Reindex {
        #[command(flatten)]
        server: ServerArgs,
        /// Only resources of these types (comma-separated) [default: every type].
        #[arg(long = "type", value_delimiter = ',')]
        types: Vec<String>,
    },
}

/// `iomt-fhir clients ...`: register, list and remove OAuth clients.
#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// Register a client.
    Add {
        #[command(flatten)]
        server: ServerArgs,
        /// The client id (1-128 of A-Z a-z 0-9 - . _ ~).
        #[arg(long = "client-id")]
        client_id: String,
        #[arg(long, value_enum)]
        kind: crate::auth::clients::Kind,
        /// confidential-asymmetric: a file holding the client's JWK Set (public keys).
        #[arg(long)]
        jwks: Option<PathBuf>,
        /// confidential-asymmetric: where the client publishes its JWK Set (https://).
        #[arg(long = "jwks-url")]
        jwks_url: Option<String>,
        /// confidential-symmetric: the client secret (stored as its SHA-256).
        #[arg(long, env = "IOMT_FHIR_CLIENT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Scopes the client may be granted, e.g. 'system/*.rs' (repeat, or space-separate).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Exact redirect URIs (authorization code flow; repeat).
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// Browser origins allowed to call the token endpoint and the API (repeat).
        #[arg(long = "origin")]
        origins: Vec<String>,
    },
    /// List the registered clients (JSON lines).
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Remove a client and revoke its tokens.
    Remove {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long = "client-id")]
        client_id: String,
    },
}

/// `iomt-fhir keys ...`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new signing key; it signs from the next start on, and the previous one stays
    /// in the JWK Set until the rotation after.
    Rotate {
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `iomt-fhir users ...`.
#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Add a user (or replace its password and fhirUser).
    Add {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        username: String,
        /// At least 8 characters; better given through the environment.
        #[arg(long, env = "IOMT_FHIR_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// The user's FHIR record: Practitioner/ID, Patient/ID, RelatedPerson/ID or Person/ID.
        #[arg(long = "fhir-user")]
        fhir_user: String,
    },
}

/// `iomt-fhir devices ...`: device messages that could not be mapped.
#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// List the open dead letters (JSON lines), oldest first.
    Errors {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Map the open dead letters again (all, or the one with --id).
    Replay {
        #[command(flatten)]
        server: ServerArgs,
        #[arg(long)]
        id: Option<i64>,
    },
}

/// `iomt-fhir hl7 ...`: the stored HL7 v2 messages.
#[derive(Subcommand, Debug)]
pub enum Hl7Command {
    /// List stored messages (JSON lines), oldest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Only messages answered AA, AE or AR.
        #[arg(long)]
        outcome: Option<String>,
        /// Only messages after this id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Process stored messages again (e.g. after a mapping fix).
    Replay {
        #[command(flatten)]
        server: ServerArgs,
        /// The message with this id.
        #[arg(long)]
        id: Option<i64>,
        /// Every message answered with this outcome (AE or AR).
        #[arg(long)]
        outcome: Option<String>,
    },
}

/// Options shared by `serve` and `import`. Every field is optional here so that the
/// config file can fill what the command line and environment leave out.
#[derive(Args, Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServerArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "IOMT_FHIR_LISTEN")]
    pub listen: Option<String>,
    /// sqlite://PATH or postgres://USER@HOST/DB [default: sqlite://./data/iomt-fhir.db].
    #[arg(long, env = "IOMT_FHIR_DATABASE")]
    pub database: Option<String>,
    /// Public base URL used in links, Location and fullUrl [default: http://LISTEN/fhir].
    #[arg(long, env = "IOMT_FHIR_BASE_URL")]
    pub base_url: Option<String>,
    /// full: acknowledged writes survive power loss; relaxed: faster, may lose the last
    /// commits on power loss (never corrupts) [default: full].
    #[arg(long, env = "IOMT_FHIR_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// Largest request body in bytes [default: 16 MiB].
    #[arg(long, env = "IOMT_FHIR_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Most entries in a batch or transaction Bundle [default: 10000].
    #[arg(long, env = "IOMT_FHIR_MAX_BUNDLE_ENTRIES")]
    pub max_bundle_entries: Option<usize>,
    /// Page size when a search or history gives no _count [default: 50].
    #[arg(long, env = "IOMT_FHIR_DEFAULT_COUNT")]
    pub default_count: Option<usize>,
    /// Largest _count honoured [default: 1000].
    #[arg(long, env = "IOMT_FHIR_MAX_COUNT")]
    pub max_count: Option<usize>,
    /// Database connections (SQLite readers, or the PostgreSQL pool) [default: 16].
    #[arg(long, env = "IOMT_FHIR_DB_POOL_SIZE")]
    pub db_pool_size: Option<u32>,
    /// Most writes the SQLite writer commits together [default: 256].
    #[arg(long, env = "IOMT_FHIR_GROUP_COMMIT_MAX")]
    pub group_commit_max: Option<usize>,
    /// Address for the HL7 v2 MLLP listener (off unless given), e.g. 127.0.0.1:2575.
    #[arg(long, env = "IOMT_FHIR_MLLP_LISTEN")]
    pub mllp_listen: Option<String>,
    /// Largest HL7 v2 message over MLLP, in bytes [default: 1 MiB].
    #[arg(long, env = "IOMT_FHIR_MLLP_MAX_BYTES")]
    pub mllp_max_bytes: Option<usize>,
    /// Seconds an idle MLLP connection stays open [default: 300].
    #[arg(long, env = "IOMT_FHIR_MLLP_IDLE_SECS")]
    pub mllp_idle_secs: Option<u64>,
    /// MQTT broker to subscribe to for device data: mqtt://HOST:PORT or mqtts://HOST:PORT.
    #[arg(long, env = "IOMT_FHIR_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// Topic filter to subscribe to (repeat, or comma-separate), e.g. 'devices/+/telemetry'.
    #[arg(long, env = "IOMT_FHIR_MQTT_TOPIC", value_delimiter = ',')]
    #[serde(default)]
    pub mqtt_topic: Vec<String>,
    /// MQTT client id; the broker keeps the session (and queued messages) under it
    /// [default: iomt-fhir].
    #[arg(long, env = "IOMT_FHIR_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    #[arg(long, env = "IOMT_FHIR_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    #[arg(long, env = "IOMT_FHIR_MQTT_PASSWORD", hide_env_values = true)]
    pub mqtt_password: Option<String>,
    /// PEM CA certificates that signed the broker's certificate (mqtts://).
    #[arg(long, env = "IOMT_FHIR_MQTT_TLS_CA")]
    pub mqtt_tls_ca: Option<PathBuf>,
    /// Directory of device mapping templates (`*.json`) replacing the shipped ones.
    #[arg(long, env = "IOMT_FHIR_DEVICE_MAPPINGS")]
    pub device_mappings: Option<PathBuf>,
    /// Create a Device the first time an unknown device id sends data; with false such
    /// messages become dead letters [default: true].
    #[arg(long, env = "IOMT_FHIR_DEVICES_AUTO_CREATE")]
    pub devices_auto_create: Option<bool>,
    /// Device messages accepted but not yet committed, at most; beyond it HTTP answers 503
    /// and MQTT stops reading [default: 100000].
    #[arg(long, env = "IOMT_FHIR_DEVICE_QUEUE")]
    pub device_queue: Option<usize>,
    /// PEM certificate chain: MLLP over TLS (needs --mllp-tls-key).
    #[arg(long, env = "IOMT_FHIR_MLLP_TLS_CERT")]
    pub mllp_tls_cert: Option<PathBuf>,
    /// PEM private key of --mllp-tls-cert.
    #[arg(long, env = "IOMT_FHIR_MLLP_TLS_KEY")]
    pub mllp_tls_key: Option<PathBuf>,
    /// PEM CA certificates: MLLP clients must present a certificate issued by one of them.
    #[arg(long, env = "IOMT_FHIR_MLLP_TLS_CLIENT_CA")]
    pub mllp_tls_client_ca: Option<PathBuf>,
    /// MiB of current resource versions cached for reads by id (SQLite only; 0 turns it
    /// off) [default: 64].
    #[arg(long, env = "IOMT_FHIR_CACHE_MIB")]
    pub cache_mib: Option<usize>,
    /// Conditional delete matching several resources: single (412) or multiple [default: single].
    #[arg(long, env = "IOMT_FHIR_CONDITIONAL_DELETE", value_enum)]
    pub conditional_delete: Option<ConditionalDeleteMode>,
    /// off: no authorization (allowed only on a loopback --listen address); smart: SMART on
    /// FHIR, a Bearer token on every request [default: off].
    #[arg(long, env = "IOMT_FHIR_AUTH", value_enum)]
    pub auth: Option<crate::auth::Mode>,
    /// With --auth smart, also audit reads and searches that succeeded (writes and every
    /// denied request are always audited) [default: true].
    #[arg(long, env = "IOMT_FHIR_AUDIT_READS")]
    pub audit_reads: Option<bool>,
    /// With --auth smart, seconds over which successful reads by one token from one address
    /// are counted before their AuditEvents are written (each resource or query once per
    /// window); writes and denials are written within a second [default: 5].
    #[arg(long, env = "IOMT_FHIR_AUDIT_READ_WINDOW")]
    pub audit_read_window: Option<usize>,
    /// OpenID Connect issuer of the hospital's single sign-on, e.g.
    /// https://login.hospital.example/realms/staff: the SMART login page offers it beside
    /// local accounts. Register {origin}/auth/oidc/callback there as the redirect URI.
    #[arg(long, env = "IOMT_FHIR_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// This server's client id at the --oidc-issuer.
    #[arg(long, env = "IOMT_FHIR_OIDC_CLIENT_ID")]
    pub oidc_client_id: Option<String>,
    /// This server's client secret at the --oidc-issuer (better in the environment).
    #[arg(long, env = "IOMT_FHIR_OIDC_CLIENT_SECRET", hide_env_values = true)]
    pub oidc_client_secret: Option<String>,
    /// The fhirUser of a user signed in at the --oidc-issuer, from id_token claims:
    /// 'Practitioner/{employee_id}', a search that must match one resource
    /// ('Practitioner?identifier=urn:oid:1.2.3|{employee_id}'), or the claim itself
    /// [default: {fhirUser}].
    #[arg(long, env = "IOMT_FHIR_OIDC_FHIR_USER")]
    pub oidc_fhir_user: Option<String>,
    /// Scopes asked of the --oidc-issuer, space-separated [default: openid profile].
    #[arg(long, env = "IOMT_FHIR_OIDC_SCOPE")]
    pub oidc_scope: Option<String>,
    /// Name of the --oidc-issuer on the login page [default: hospital sign-in].
    #[arg(long, env = "IOMT_FHIR_OIDC_LABEL")]
    pub oidc_label: Option<String>,
    /// PEM certificate chain: serve HTTPS (needs --tls-key).
    #[arg(long, env = "IOMT_FHIR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "IOMT_FHIR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Extract search index values on write; `false` only to measure what indexing costs
    /// (searches then find nothing written meanwhile) [default: true].
    #[arg(long, env = "IOMT_FHIR_SEARCH_INDEXING")]
    pub search_indexing: Option<bool>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database: String,
    /// `None`: derived from the bound address (so port 0 works).
    pub base_url: Option<String>,
    pub durability: Durability,
    pub max_body_bytes: usize,
    pub max_bundle_entries: usize,
    pub default_count: usize,
    pub max_count: usize,
    pub db_pool_size: u32,
    pub group_commit_max: usize,
    pub cache_mib: usize,
    pub conditional_delete: ConditionalDeleteMode,
    pub search_indexing: bool,
    pub mllp_listen: Option<SocketAddr>,
    pub mllp_max_bytes: usize,
    pub mllp_idle_secs: u64,
    pub mllp_tls: Option<crate::tls::TlsFiles>,
    pub device_mappings: Option<PathBuf>,
    pub devices_auto_create: bool,
    pub device_queue: usize,
    pub mqtt: Option<crate::mqtt::MqttConfig>,
    pub auth: crate::auth::Mode,
    pub audit_reads: bool,
    pub audit_read_window: std::time::Duration,
    /// HTTPS for the REST API.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Sign-in at the hospital's OpenID Connect provider.
    pub oidc: Option<crate::auth::federation::Config>,
}

impl Settings {
    /// Serving without authorization is for a loopback address only: anything reachable
    /// from the network needs `--auth smart`. SMART needs TLS, directly (`--tls-cert`) or in
    /// front of the server (an `https://` `--base-url`), except on loopback.
    pub fn check_exposure(&self) -> Result<(), String> {
        let loopback = self.listen.ip().is_loopback();
        if self.auth == crate::auth::Mode::Off && !loopback {
            return Err(format!(
                "refusing to serve without authorization on {}: --auth off is allowed only on a loopback address (127.0.0.1, ::1); use --auth smart",
                self.listen
            ));
        }
        // HL7 v2 senders are authenticated by client certificates: an MLLP listener
        // reachable from the network needs mutual TLS.
        if let Some(mllp) = self.mllp_listen
            && !mllp.ip().is_loopback()
            && self.mllp_tls.as_ref().is_none_or(|t| t.client_ca.is_none())
        {
            return Err(format!(
                "refusing unauthenticated HL7 v2 on {mllp}: an MLLP listener off loopback needs mutual TLS (--mllp-tls-cert, --mllp-tls-key and --mllp-tls-client-ca)"
            ));
        }
        let https_base = self
            .base_url
            .as_deref()
            .is_some_and(|b| b.starts_with("https://"));
        if self.auth == crate::auth::Mode::Smart && !loopback && self.tls.is_none() && !https_base {
            return Err(format!(
                "--auth smart on {} needs TLS: give --tls-cert and --tls-key, or an https:// --base-url when a proxy terminates TLS",
                self.listen
            ));
        }
        Ok(())
    }

    /// Merges flags/environment over the config file over defaults, and checks them.
    pub fn resolve(args: &ServerArgs, config_file: Option<&PathBuf>) -> Result<Settings, String> {
        let file: ServerArgs = match config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| {
                    // toml's message spans several lines (with a source excerpt); keep the
                    // position and the reason on one.
                    let msg = e.to_string();
                    let mut lines = msg.lines().filter(|l| !l.trim().is_empty());
                    let first = lines.next().unwrap_or("");
                    let last = lines.next_back().unwrap_or("");
                    format!("config file {}: {first}: {last}", path.display())
                })?
            }
            None => ServerArgs::default(),
        };
        let listen_text = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            format!("--listen {listen_text:?} is not an address like 127.0.0.1:8080")
        })?;
        let base_url = args.base_url.clone().or(file.base_url);
        if let Some(b) = &base_url
            && !(b.starts_with("http://") || b.starts_with("https://"))
        {
            return Err(format!(
                "--base-url {b:?} must start with http:// or https://"
            ));
        }
        let database = args
            .database
            .clone()
            .or(file.database)
            .unwrap_or_else(|| "sqlite://./data/iomt-fhir.db".into());
        if !(database.starts_with("sqlite:")
            || database.starts_with("postgres://")
            || database.starts_with("postgresql://"))
        {
            return Err(format!(
                "--database {database:?} must be sqlite://PATH or postgres://USER@HOST/DB"
            ));
        }
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(format!("--{name} must be at least 1"))
            } else {
                Ok(v)
            }
        };
        let mllp_listen = match args.mllp_listen.clone().or(file.mllp_listen) {
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                format!("--mllp-listen {a:?} is not an address like 127.0.0.1:2575")
            })?),
            None => None,
        };
        let mllp_tls = match (
            args.mllp_tls_cert.clone().or(file.mllp_tls_cert),
            args.mllp_tls_key.clone().or(file.mllp_tls_key),
            args.mllp_tls_client_ca.clone().or(file.mllp_tls_client_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            _ => {
                return Err(
                    "MLLP over TLS needs both --mllp-tls-cert and --mllp-tls-key".to_string(),
                );
            }
        };
        if mllp_tls.is_some() && mllp_listen.is_none() {
            return Err("--mllp-tls-cert is given but --mllp-listen is not".to_string());
        }
        let topics = if args.mqtt_topic.is_empty() {
            file.mqtt_topic.clone()
        } else {
            args.mqtt_topic.clone()
        };
        let mqtt = match args.mqtt_url.clone().or(file.mqtt_url.clone()) {
            None if !topics.is_empty() => {
                return Err("--mqtt-topic is given but --mqtt-url is not".to_string());
            }
            None => None,
            Some(url) => {
                let c = crate::mqtt::MqttConfig {
                    url,
                    topics,
                    client_id: args
                        .mqtt_client_id
                        .clone()
                        .or(file.mqtt_client_id.clone())
                        .unwrap_or_else(|| "iomt-fhir".to_string()),
                    username: args.mqtt_username.clone().or(file.mqtt_username.clone()),
                    password: args.mqtt_password.clone().or(file.mqtt_password.clone()),
                    tls_ca: args.mqtt_tls_ca.clone().or(file.mqtt_tls_ca.clone()),
                    batch: 500,
                };
                crate::mqtt::options(&c)?;
                Some(c)
            }
        };
        let tls = match (
            args.tls_cert.clone().or(file.tls_cert.clone()),
            args.tls_key.clone().or(file.tls_key.clone()),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca: None,
            }),
            _ => return Err("HTTPS needs both --tls-cert and --tls-key".to_string()),
        };
        let auth = args.auth.or(file.auth).unwrap_or_default();
        let oidc = match (
            args.oidc_issuer.clone().or(file.oidc_issuer.clone()),
            args.oidc_client_id.clone().or(file.oidc_client_id.clone()),
        ) {
            (None, None) => None,
            (Some(issuer), Some(client_id)) => {
                let c = crate::auth::federation::Config {
                    issuer,
                    client_id,
                    client_secret: args
                        .oidc_client_secret
                        .clone()
                        .or(file.oidc_client_secret.clone()),
                    fhir_user: args
                        .oidc_fhir_user
                        .clone()
                        .or(file.oidc_fhir_user.clone())
                        .unwrap_or_else(|| crate::auth::federation::DEFAULT_TEMPLATE.into()),
                    scopes: args
                        .oidc_scope
                        .clone()
                        .or(file.oidc_scope.clone())
                        .unwrap_or_else(|| "openid profile".into())
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                    label: args
                        .oidc_label
                        .clone()
                        .or(file.oidc_label.clone())
                        .unwrap_or_else(|| "hospital sign-in".into()),
                };
                c.check()?;
                if auth != crate::auth::Mode::Smart {
                    return Err("--oidc-issuer needs --auth smart".to_string());
                }
                Some(c)
            }
            _ => return Err("--oidc-issuer and --oidc-client-id go together".to_string()),
        };
        Ok(Settings {
            auth,
            oidc,
            audit_reads: args.audit_reads.or(file.audit_reads).unwrap_or(true),
            audit_read_window: std::time::Duration::from_secs(positive(
                "audit-read-window",
                args.audit_read_window
                    .or(file.audit_read_window)
                    .unwrap_or(5),
            )? as u64),
            tls,
            mqtt,
            device_mappings: args.device_mappings.clone().or(file.device_mappings),
            devices_auto_create: args
                .devices_auto_create
                .or(file.devices_auto_create)
                .unwrap_or(true),
            device_queue: positive(
                "device-queue",
                args.device_queue.or(file.device_queue).unwrap_or(100_000),
            )?,
            mllp_listen,
            mllp_tls,
            mllp_max_bytes: positive(
                "mllp-max-bytes",
                args.mllp_max_bytes
                    .or(file.mllp_max_bytes)
                    .unwrap_or(1 << 20),
            )?,
            mllp_idle_secs: args
                .mllp_idle_secs
                .or(file.mllp_idle_secs)
                .unwrap_or(300)
                .max(1),
            listen,
            database,
            base_url: base_url.map(|b| b.trim_end_matches('/').to_string()),
            durability: args
                .durability
                .or(file.durability)
                .unwrap_or(Durability::Full),
            max_body_bytes: positive(
                "max-body-bytes",
                args.max_body_bytes
                    .or(file.max_body_bytes)
                    .unwrap_or(16 << 20),
            )?,
            max_bundle_entries: positive(
                "max-bundle-entries",
                args.max_bundle_entries
                    .or(file.max_bundle_entries)
                    .unwrap_or(10_000),
            )?,
            default_count: positive(
                "default-count",
                args.default_count.or(file.default_count).unwrap_or(50),
            )?,
            max_count: positive(
                "max-count",
                args.max_count.or(file.max_count).unwrap_or(1000),
            )?,
            db_pool_size: args.db_pool_size.or(file.db_pool_size).unwrap_or(16).max(1),
            group_commit_max: positive(
                "group-commit-max",
                args.group_commit_max
                    .or(file.group_commit_max)
                    .unwrap_or(256),
            )?,
            cache_mib: args.cache_mib.or(file.cache_mib).unwrap_or(64),
            conditional_delete: args
                .conditional_delete
                .or(file.conditional_delete)
                .unwrap_or(ConditionalDeleteMode::Single),
            search_indexing: args
                .search_indexing
                .or(file.search_indexing)
                .unwrap_or(true),
        })
    }
}
