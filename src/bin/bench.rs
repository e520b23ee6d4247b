//! Benchmark for the FHIR R4 core (BENCHMARKS.md): starts the release server itself, then
//! measures, per backend, sequential and concurrent creates (durable commits), reads by id
//! and Synthea transaction ingest, and reports the server's peak memory.
//!
//! Creates and reads are driven by `wrk` (a C load generator, `apt-get install wrk`) so the
//! client takes as little of the two cores as possible; transaction ingest uses reqwest.
//!
//! `cargo build --release && target/release/bench [--backend sqlite|postgres|both]
//!  [--seconds 10] [--postgres-url postgres://postgres@127.0.0.1:5432/test]`
//! `target/release/bench --hl7 [--hl7-messages 4000]`: HL7 v2 PCD-01 over 8 MLLP connections.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const SYNTHEA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/synthea");

struct Options {
    backends: Vec<String>,
    seconds: u64,
    postgres_url: String,
    ingest_rounds: usize,
    /// Run only the HL7 v2 MLLP scenario.
    hl7_only: bool,
    hl7_messages: usize,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        backends: vec!["sqlite".into(), "postgres".into()],
        seconds: 10,
        postgres_url: "postgres://postgres@127.0.0.1:5432/test".into(),
        ingest_rounds: 5,
        hl7_only: false,
        hl7_messages: 4000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--backend" => {
                o.backends = match value()?.as_str() {
                    "both" => vec!["sqlite".into(), "postgres".into()],
                    b @ ("sqlite" | "postgres") => vec![b.into()],
                    b => return Err(format!("unknown backend {b}")),
                }
            }
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--postgres-url" => o.postgres_url = value()?,
            "--hl7" => o.hl7_only = true,
            "--hl7-messages" => {
                o.hl7_messages = value()?
                    .parse()
                    .map_err(|e| format!("--hl7-messages: {e}"))?
            }
            "--ingest-rounds" => {
                o.ingest_rounds = value()?
                    .parse()
                    .map_err(|e| format!("--ingest-rounds: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(database: &str) -> Result<Server, String> {
        Self::start_with(database, &[])
    }

    fn start_with(database: &str, extra: &[&str]) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let server_bin: PathBuf = exe.with_file_name("iomt-fhir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new(&server_bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database",
                database,
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", server_bin.display()))?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Server {
                    child,
                    base: format!("http://127.0.0.1:{port}/fhir"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("server did not start".into())
    }

    /// Peak resident memory (VmHWM) of the server process, in MiB.
    fn peak_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_ms(s: &str) -> f64 {
    let (num, factor) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * factor
}

fn wrk(script: &str, url: &str, connections: usize, seconds: u64) -> Result<WrkResult, String> {
    let dir = std::env::temp_dir().join(format!("iomt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join("script.lua");
    std::fs::write(&path, script).map_err(|e| e.to_string())?;
    let threads = connections.min(2);
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "-s",
            path.to_str().unwrap_or_default(),
            url,
        ])
        .output()
        .map_err(|e| format!("wrk is needed (apt-get install wrk): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut r = WrkResult {
        rps: 0.0,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
    };
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => r.p50_ms = parse_ms(v),
            ["99%", v] => r.p99_ms = parse_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    if r.rps == 0.0 {
        return Err(format!(
            "wrk gave no result:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(r)
}

const CREATE_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.body = '{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}]},"subject":{"reference":"Patient/bench"},"effectiveDateTime":"2026-11-21T08:00:00Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}'
"#;

const READ_SCRIPT: &str = r#"
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/fhir/Observation/bench-" .. math.random(0, 999))
end
"#;

fn row(label: &str, r: &WrkResult, unit: &str) {
    println!(
        "| {label} | {:.0} {unit}/s | {:.2} ms | {:.2} ms | {} |",
        r.rps, r.p50_ms, r.p99_ms, r.errors
    );
}

async fn seed_reads(client: &reqwest::Client, base: &str) -> Result<(), String> {
    let entries: Vec<Value> = (0..1000)
        .map(|i| {
            json!({
                "resource": {"resourceType": "Observation", "id": format!("bench-{i}"), "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "valueQuantity": {"value": i, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}},
                "request": {"method": "PUT", "url": format!("Observation/bench-{i}")}
            })
        })
        .collect();
    let r = client
        .post(base)
        .header("content-type", "application/fhir+json")
        .body(
            json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string(),
        )
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("seeding failed: {}", r.status()));
    }
    Ok(())
}

async fn ingest(
    client: &reqwest::Client,
    base: &str,
    rounds: usize,
) -> Result<(usize, f64), String> {
    let mut bundles = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(SYNTHEA)
        .map_err(|e| format!("{SYNTHEA}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in files {
        bundles.push(std::fs::read_to_string(&f).map_err(|e| e.to_string())?);
    }
    let per_round: usize = bundles
        .iter()
        .map(|b| {
            serde_json::from_str::<Value>(b)
                .ok()
                .and_then(|v| v["entry"].as_array().map(Vec::len))
                .unwrap_or(0)
        })
        .sum();
    let started = Instant::now();
    let work: Vec<String> = (0..rounds).flat_map(|_| bundles.iter().cloned()).collect();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(work));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, base, queue) = (client.clone(), base.to_string(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(body) = queue.lock().await.pop() else {
                    return Ok::<(), String>(());
                };
                let r = client
                    .post(&base)
                    .header("content-type", "application/fhir+json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!(
                        "ingest failed: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ));
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((per_round * rounds, secs))
}

/// PCD-01 messages made distinct: control id and every timestamp shifted by `i` seconds,
/// so each message writes new Observations instead of being a no-op.
fn pcd01_variant(template: &str, i: usize) -> String {
    let shift = |ts: &str| -> String {
        // 14-digit HL7 timestamps only: YYYYMMDDHHMMSS, shifted within the day.
        let secs = ts[8..10].parse::<usize>().unwrap_or(0) * 3600
            + ts[10..12].parse::<usize>().unwrap_or(0) * 60
            + ts[12..14].parse::<usize>().unwrap_or(0)
            + i;
        let day = ts[6..8].parse::<usize>().unwrap_or(1) + secs / 86_400;
        let secs = secs % 86_400;
        format!(
            "{}{:02}{:02}{:02}{:02}",
            &ts[..6],
            day.min(28),
            secs / 3600,
            (secs / 60) % 60,
            secs % 60
        )
    };
    let mut out = String::with_capacity(template.len());
    for (n, seg) in template.split('\r').filter(|s| !s.is_empty()).enumerate() {
        let fields: Vec<String> = seg
            .split('|')
            .enumerate()
            .map(|(k, f)| {
                if n == 0 && k == 9 {
                    format!("BENCH{i}")
                } else if f.len() >= 14
                    && f[..14].bytes().all(|b| b.is_ascii_digit())
                    && f.starts_with("20")
                {
                    format!("{}{}", shift(&f[..14]), &f[14..])
                } else {
                    f.to_string()
                }
            })
            .collect();
        out.push_str(&fields.join("|"));
        out.push('\r');
    }
    out
}

async fn run_hl7(o: &Options, backend: &str, database: &str) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mllp_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let server = Server::start_with(
        database,
        &["--mllp-listen", &format!("127.0.0.1:{mllp_port}")],
    )?;
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/samples/hl7v2/ihe_pcd_tf2_E.1.1_philips_pcd01.hl7"
    ))
    .map_err(|e| e.to_string())?;
    let obx = template
        .split('\r')
        .filter(|s| s.starts_with("OBX"))
        .count();
    // The MLLP listener opens after the definitions are loaded, later than the HTTP one.
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", mllp_port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connections = 8;
    let per = o.hl7_messages / connections;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let template = template.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", mllp_port))
                .await
                .map_err(|e| e.to_string())?;
            let mut latencies = Vec::with_capacity(per);
            let mut buf = vec![0u8; 8192];
            for k in 0..per {
                let msg = pcd01_variant(&template, c * per + k);
                let mut framed = vec![0x0b];
                framed.extend_from_slice(msg.as_bytes());
                framed.extend_from_slice(&[0x1c, 0x0d]);
                let t = Instant::now();
                s.write_all(&framed).await.map_err(|e| e.to_string())?;
                let mut ack = Vec::new();
                while !ack.ends_with(&[0x1c, 0x0d]) {
                    let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection closed".to_string());
                    }
                    ack.extend_from_slice(&buf[..n]);
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                let text = String::from_utf8_lossy(&ack);
                if !text.contains("MSA|CA") && !text.contains("MSA|AA") {
                    return Err(format!("not accepted: {text}"));
                }
            }
            Ok::<Vec<f64>, String>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!("\n### HL7 v2 over MLLP, {backend} (durable commits)\n");
    println!("| scenario | messages/s | OBX/s | p50 ACK | p99 ACK |");
    println!("|---|---|---|---|---|");
    println!(
        "| IHE PCD-01 ({obx} OBX each), 8 connections, {} messages | {:.0} | {:.0} | {:.1} ms | {:.1} ms |",
        all.len(),
        all.len() as f64 / secs,
        (all.len() * obx) as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
    println!("\nserver peak memory (VmHWM): {:.0} MiB", server.peak_mib());
    Ok(())
}

async fn run_backend(o: &Options, backend: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (database, cleanup) = match backend {
        "sqlite" => (format!("sqlite://{}/bench.db", dir.path().display()), None),
        _ => {
            use sqlx::Connection;
            let name = format!("bench_{}", std::process::id());
            let mut c = sqlx::PgConnection::connect(&o.postgres_url)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            let base = o
                .postgres_url
                .rsplit_once('/')
                .map_or(o.postgres_url.as_str(), |(b, _)| b);
            (format!("{base}/{name}"), Some((c, name)))
        }
    };
    if o.hl7_only {
        run_hl7(o, backend, &database).await?;
        if let Some((mut c, name)) = cleanup {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
                .execute(&mut c)
                .await;
        }
        return Ok(());
    }
    let server = Server::start(&database)?;
    let client = reqwest::Client::new();
    println!("\n### {backend} (durable commits)\n");
    println!("| scenario | throughput | p50 | p99 | non-2xx |");
    println!("|---|---|---|---|---|");
    let url = format!("{}/Observation", server.base);
    row(
        "create, 1 client (sequential)",
        &wrk(CREATE_SCRIPT, &url, 1, o.seconds)?,
        "creates",
    );
    for c in [16, 32] {
        row(
            &format!("create, {c} clients"),
            &wrk(CREATE_SCRIPT, &url, c, o.seconds)?,
            "creates",
        );
    }
    seed_reads(&client, &server.base).await?;
    for c in [16, 32] {
        row(
            &format!("read by id, {c} clients"),
            &wrk(READ_SCRIPT, &url, c, o.seconds)?,
            "reads",
        );
    }
    let (n, secs) = ingest(&client, &server.base, o.ingest_rounds).await?;
    println!(
        "| Synthea transaction ingest, 4 clients | {:.0} resources/s | {n} resources in {secs:.1} s | | 0 |",
        n as f64 / secs
    );
    println!("\nserver peak memory (VmHWM): {:.0} MiB", server.peak_mib());
    drop(server);
    if let Some((mut c, name)) = cleanup {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
            .execute(&mut c)
            .await;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "machine: {} cores, {}; wrk {} s per scenario",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |s| s.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default(),
        o.seconds
    );
    for b in o.backends.clone() {
        if let Err(e) = run_backend(&o, &b).await {
            eprintln!("bench ({b}): {e}");
            std::process::exit(1);
        }
    }
}
