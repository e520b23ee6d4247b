//! The real binary: `import` of the Synthea bundles, configuration errors, SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::POSTGRES_ENV;

const BIN: &str = env!("CARGO_BIN_EXE_iomt-fhir");
const SYNTHEA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/synthea");

fn import_synthea(database: &str) {
    let out = Command::new(BIN)
        .args(["import", "--database", database, SYNTHEA])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run import");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "import failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("imported 5665 resources from 20 files"),
        "{stdout}"
    );
    assert!(stdout.contains("; 0 failures"), "{stdout}");
}

#[test]
fn import_loads_all_of_synthea_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/synthea.db", dir.path().display());
    import_synthea(&db);
    // loading again adds the same number of new resources (POST entries), and still succeeds
    import_synthea(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_loads_all_of_synthea_postgres() {
    let Ok(base) = std::env::var(POSTGRES_ENV) else {
        eprintln!("skipped: {POSTGRES_ENV} is not set");
        return;
    };
    // A database of its own, so the count is exact.
    use sqlx::Connection;
    let name = format!("import_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("PostgreSQL reachable");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = match base.rfind('/') {
        Some(i) => format!("{}/{name}", &base[..i]),
        None => panic!("{POSTGRES_ENV} must end in /DATABASE"),
    };
    let u = url.clone();
    tokio::task::spawn_blocking(move || import_synthea(&u))
        .await
        .unwrap();
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM resource")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 5665);
    let dangling: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM resource_version WHERE body LIKE '%\"reference\":\"urn:uuid:%'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(dangling, 0, "every urn:uuid reference was rewritten");
    drop(c);
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
        .execute(&mut conn)
        .await;
}

#[test]
fn bad_configuration_fails_with_one_line() {
    for args in [
        vec!["serve", "--listen", "not-an-address"],
        vec!["serve", "--database", "mysql://x"],
        vec!["serve", "--base-url", "ftp://x"],
        vec!["serve", "--max-count", "0"],
        // Reachable from the network without authorization: refused.
        vec!["serve", "--listen", "0.0.0.0:0"],
        // SMART without TLS off loopback: refused.
        vec!["serve", "--listen", "0.0.0.0:0", "--auth", "smart"],
        vec!["serve", "--tls-cert", "x.pem"],
        // HL7 v2 reachable from the network without client certificates: refused.
        vec!["serve", "--mllp-listen", "0.0.0.0:0"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("iomt-fhir: ") || err.starts_with("error: "),
            "{err}"
        );
    }
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--auth smart"));
    // a config file with an unknown key
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\ncolour = \"blue\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
}

#[test]
fn sigterm_shuts_down_cleanly_and_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/t.db", dir.path().display());
    let port = free_port();
    let start = || serve(&db, port);
    let base = format!("http://127.0.0.1:{port}/fhir");
    let mut child = start();
    wait_up(port);
    let client = raw_http::blocking_client();
    let r = client(
        &format!("{base}/Patient/keep"),
        r#"{"resourceType":"Patient","id":"keep"}"#,
    );
    assert_eq!(r, 201);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    let mut child = start();
    wait_up(port);
    let body = reqwest_get(&format!("{base}/Patient/keep"));
    assert!(body.contains("\"id\":\"keep\""), "{body}");
    // a second process may not write the same SQLite database
    let out = Command::new(BIN)
        .args(["import", "--database", &db, SYNTHEA])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another iomt-fhir process"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `iomt-fhir serve` on `database` and 127.0.0.1:`port`, durable commits.
fn serve(database: &str, port: u16) -> std::process::Child {
    Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database",
            database,
        ])
        .env("IOMT_FHIR_DURABILITY", "full")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the server on `port` accepts connections.
fn wait_up(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not start");
}

/// Minimal blocking HTTP over std, to keep the test free of a second runtime.
mod raw_http {
    use std::io::{Read, Write};

    fn exchange(url: &str, method: &str, body: &str) -> String {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = std::net::TcpStream::connect(host).unwrap();
        write!(
            s,
            "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    pub fn blocking_client() -> impl Fn(&str, &str) -> u16 {
        |url, body| {
            let resp = exchange(url, "PUT", body);
            resp.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
    }

    pub fn get(url: &str) -> String {
        exchange(url, "GET", "")
    }
}

fn reqwest_get(url: &str) -> String {
    raw_http::get(url)
}

/// Imports a custom SearchParameter and two Patients into `db`, then `iomt-fhir reindex`.
fn import_eye_colours(dir: &std::path::Path, db: &str) {
    let file = dir.join("data.ndjson");
    let eye = |id: &str, colour: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","extension":[{{"url":"http://example.org/eye-colour","valueCode":"{colour}"}}]}}"#
        )
    };
    let sp = r#"{"resourceType":"SearchParameter","id":"eye","url":"http://example.org/SearchParameter/eye-colour","name":"EyeColour","status":"active","description":"Eye colour","code":"eye-colour","base":["Patient"],"type":"token","expression":"Patient.extension('http://example.org/eye-colour').value"}"#;
    std::fs::write(
        &file,
        format!(
            "{sp}\n{}\n{}\n",
            eye("blue1", "blue"),
            eye("green1", "green")
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["import", "--database", db, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["reindex", "--database", db])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("activated SearchParameter/eye (eye-colour)"),
        "{stdout}"
    );
    assert!(stdout.contains("reindexed 3 resources"), "{stdout}");
}

/// `iomt-fhir reindex` activates stored SearchParameters; the next start keeps them.
#[test]
fn reindex_activates_custom_search_parameters_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/t.db", dir.path().display());
    import_eye_colours(dir.path(), &db);

    let port = free_port();
    let mut child = serve(&db, port);
    wait_up(port);
    let body = reqwest_get(&format!(
        "http://127.0.0.1:{port}/fhir/Patient?eye-colour=blue"
    ));
    let _ = child.kill();
    let _ = child.wait();
    assert!(body.contains("\"id\":\"blue1\""), "{body}");
    assert!(!body.contains("\"id\":\"green1\""), "{body}");
}

/// A database from before migration 7 (index rows keyed by type and code as text) is
/// migrated, and its indexes are rebuilt from the stored bodies at the next start, custom
/// SearchParameters included, before the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_index_layout_is_rebuilt_at_start() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/t.db", dir.path().display());
    import_eye_colours(dir.path(), &db);
    // Back to the layout of migration 6, with no rows.
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    let mut old = String::new();
    for (table, cols) in [
        ("idx_token", "system TEXT, value TEXT, text TEXT"),
        ("idx_string", "norm TEXT, exact TEXT"),
        (
            "idx_reference",
            "target_type TEXT, target_id TEXT, url TEXT",
        ),
        ("idx_date", "lo INTEGER, hi INTEGER"),
        ("idx_number", "value REAL"),
        (
            "idx_quantity",
            "value REAL, system TEXT, unit_code TEXT, unit TEXT",
        ),
        ("idx_uri", "value TEXT"),
    ] {
        old.push_str(&format!(
            "DROP TABLE {table}; CREATE TABLE {table} (rid INTEGER NOT NULL, \
             res_type TEXT NOT NULL, code TEXT NOT NULL, {cols});\n"
        ));
    }
    old.push_str("DROP TABLE store_task; DELETE FROM schema_migration WHERE version >= 7;");
    sqlx::raw_sql(sqlx::AssertSqlSafe(old))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let port = free_port();
    let mut child = serve(&db, port);
    wait_up(port);
    let base = format!("http://127.0.0.1:{port}/fhir");
    let blue = reqwest_get(&format!("{base}/Patient?eye-colour=blue"));
    let all = reqwest_get(&format!("{base}/Patient?_sort=_id&_elements=id"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(blue.contains("\"id\":\"blue1\""), "{blue}");
    assert!(!blue.contains("\"id\":\"green1\""), "{blue}");
    assert!(all.contains("\"total\":2"), "{all}");
}
