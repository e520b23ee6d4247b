//! Test harness: `spawn_app` starts the server on port 0 with a fresh database.

#![allow(dead_code)]

use std::time::Duration;

use iomt_fhir::app::Application;
use iomt_fhir::config::{ServerArgs, Settings};
use serde_json::Value;
use tokio::sync::oneshot;

pub const POSTGRES_ENV: &str = "IOMT_FHIR_TEST_POSTGRES_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub base: String,
    /// The MLLP port, when the test asked for a listener.
    pub mllp_port: Option<u16>,
    pub client: reqwest::Client,
    pub database: String,
    pub ctx: iomt_fhir::interaction::SharedCtx,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), String>>>,
    _dir: tempfile::TempDir,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// GET with `Prefer: handling=lenient`.
    pub async fn get_lenient(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("prefer", "handling=lenient")
            .send()
            .await
            .expect("request")
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .expect("request")
    }

    pub async fn put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .expect("request")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// Stops the server gracefully and waits for the database to close. The returned
    /// directory holds the SQLite database; it is deleted when dropped.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = h.await;
        }
        self._dir
    }
}

pub async fn json(r: reqwest::Response) -> Value {
    let text = r.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A file under `tests/fixtures/`.
pub fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// A client builder that trusts only the test CA (`tests/fixtures/tls/ca.pem`), for the
/// servers started with the test certificates.
pub fn trusting_test_ca(builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    let ca = std::fs::read(fixture("tls/ca.pem")).expect("test CA");
    builder
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA PEM"))
}

/// A fresh PostgreSQL schema per test, selected through `search_path`.
async fn postgres_url(base: &str) -> String {
    use sqlx::Connection;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base).await.unwrap_or_else(|e| {
        panic!("{POSTGRES_ENV}={base} is set but PostgreSQL is unreachable: {e}")
    });
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

/// Starts a server; `None` when the backend is PostgreSQL and no URL is configured.
pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_with(backend, |_| {}).await
}

pub async fn spawn_with(backend: Backend, tweak: impl FnOnce(&mut ServerArgs)) -> Option<TestApp> {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = match backend {
        Backend::Sqlite => format!("sqlite://{}/test.db", dir.path().display()),
        Backend::Postgres => match std::env::var(POSTGRES_ENV) {
            Ok(url) => postgres_url(&url).await,
            Err(_) => {
                eprintln!("skipped: {POSTGRES_ENV} is not set");
                return None;
            }
        },
    };
    let mut args = ServerArgs {
        listen: Some("127.0.0.1:0".into()),
        database: Some(database.clone()),
        ..ServerArgs::default()
    };
    tweak(&mut args);
    let settings = Settings::resolve(&args, None).expect("settings");
    let app = Application::build(settings).await.expect("server starts");
    let base = app.base_url().to_string();
    let mllp_port = app.mllp_port();
    let ctx = app.context();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if base.starts_with("https://") {
        builder = trusting_test_ca(builder);
    }
    let client = builder.build().expect("client");
    Some(TestApp {
        base,
        mllp_port,
        client,
        database,
        ctx,
        shutdown: Some(tx),
        server: Some(server),
        _dir: dir,
    })
}

/// Defines `sqlite_NAME` and `postgres_NAME` tests running `NAME(app)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        pub mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::helpers::spawn_app($crate::helpers::Backend::Sqlite).await.expect("sqlite");
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
        pub mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(app) = $crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await else { return };
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
    };
}

/// `n` letters and digits from a fixed pseudo-random sequence (xorshift): a value that
/// compression cannot shrink, for tests of size limits.
pub fn incompressible(n: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    [(x % 62) as usize],
            )
        })
        .collect()
}
