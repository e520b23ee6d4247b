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
//! `target/release/bench --search [--observations 1000000] [--patients N] [--seconds 10]`:
//! generates Synthea-like Patients and Observations as NDJSON, loads them with
//! `iomt-fhir import` (with and without search indexing), then measures searches with `wrk`
//! and paging through `next` links with reqwest. `--search --generate DIR` only writes the
//! data set; `--search-database sqlite://PATH` (or a PostgreSQL URL) runs the searches and
//! paging against a database loaded before, without importing.
//! `target/release/bench --smart [--backend ...]`: reads and searches at 32 clients with
//! `--auth off` and with `--auth smart` (a wide and a restricted token), and the token
//! endpoint (client_credentials with pre-signed ES384 and RS384 assertions, 16 clients).
//! The three modes run as three servers at once (each on its own copy of a SQLite
//! database), so `--rounds N` alternates them every `--seconds`: per round and kind (read,
//! search), `--auth off`, the smart modes in an order that rotates, then `--auth off` again;
//! each smart run is compared with the two `--auth off` runs around it, and the medians and
//! quartiles of those ratios are reported, for requests/s and for the server's CPU time
//! per request. This VM drifts by more than the margins judged; runs seconds apart and
//! bracketed take the drift out.
//! `target/release/bench --devices-grouped N [--devices-clients 8] [--devices-batch 100]`:
//! N streamed heart-rate readings (100 patches, one reading a second each) over HTTP into
//! the grouped `heart-rate-stream` template, then checks every reading has its slot.
//! `target/release/bench --index-floor N [--backend ...]`: the rows of N generated
//! Observations stored by the database engine alone (set-based SQL, no server), with and
//! without their index rows: the best import rate and indexing ratio the engine allows.

use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// Run only the search scenarios.
    search_only: bool,
    /// Observations generated for the search scenarios.
    observations: usize,
    /// Patients they are spread over; `None`: one per 100 Observations.
    patients: Option<usize>,
    /// Write the generated search data set to this directory and stop.
    generate_to: Option<PathBuf>,
    /// Run the search scenarios against this database (loaded before, for instance from
    /// `--generate`'s files with `iomt-fhir import`) instead of generating and importing.
    search_database: Option<String>,
    /// Run only the device-feed scenarios (HTTP and MQTT), with this many readings each.
    devices: Option<usize>,
    /// Mosquitto's max_inflight_messages for the device bench's private broker.
    mqtt_inflight: usize,
    /// Device bench: only the MQTT burst.
    devices_mqtt_only: bool,
    /// Device bench over HTTP: concurrent clients, readings per POST.
    devices_clients: usize,
    devices_batch: usize,
    /// Device bench over MQTT: publish at this many readings/s (paced) and measure each
    /// reading's publish-to-searchable latency, instead of one burst.
    devices_rate: Option<usize>,
    /// Rounds of the SMART throughput scenarios.
    rounds: usize,
    /// Readings for the grouped-template scenario.
    devices_grouped: Option<usize>,
    /// Run only the SMART scenarios (authorization overhead, token endpoint).
    smart_only: bool,
    /// Run only the index floor, with this many Observations.
    index_floor: Option<usize>,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        backends: vec!["sqlite".into(), "postgres".into()],
        seconds: 10,
        postgres_url: "postgres://postgres@127.0.0.1:5432/test".into(),
        ingest_rounds: 5,
        hl7_only: false,
        hl7_messages: 4000,
        search_only: false,
        observations: 1_000_000,
        patients: None,
        generate_to: None,
        search_database: None,
        devices: None,
        mqtt_inflight: 1000,
        devices_mqtt_only: false,
        devices_clients: 8,
        devices_batch: 100,
        devices_rate: None,
        devices_grouped: None,
        rounds: 1,
        smart_only: false,
        index_floor: None,
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
            "--seconds" => o.seconds = parsed(&a, value())?,
            "--postgres-url" => o.postgres_url = value()?,
            "--hl7" => o.hl7_only = true,
            "--hl7-messages" => o.hl7_messages = parsed(&a, value())?,
            "--search" => o.search_only = true,
            "--smart" => o.smart_only = true,
            "--rounds" => o.rounds = parsed(&a, value())?,
            "--generate" => o.generate_to = Some(PathBuf::from(value()?)),
            "--search-database" => {
                o.search_database = Some(value()?);
                o.search_only = true;
            }
            "--devices" => o.devices = Some(parsed(&a, value())?),
            "--devices-mqtt-only" => o.devices_mqtt_only = true,
            "--devices-grouped" => o.devices_grouped = Some(parsed(&a, value())?),
            "--devices-clients" => o.devices_clients = parsed(&a, value())?,
            "--devices-rate" => o.devices_rate = Some(parsed(&a, value())?),
            "--devices-batch" => o.devices_batch = parsed(&a, value())?,
            "--mqtt-inflight" => o.mqtt_inflight = parsed(&a, value())?,
            "--observations" => o.observations = parsed(&a, value())?,
            "--patients" => o.patients = Some(parsed(&a, value())?),
            "--ingest-rounds" => o.ingest_rounds = parsed(&a, value())?,
            "--index-floor" => o.index_floor = Some(parsed(&a, value())?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// The value of option `name` as a number (or other `FromStr`), or why not.
fn parsed<T: std::str::FromStr>(name: &str, value: Result<String, String>) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value?.parse().map_err(|e| format!("{name}: {e}"))
}

/// `iomt-fhir` beside this binary (both are built into `target/release`).
fn server_bin() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Ok(exe.with_file_name("iomt-fhir"))
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
        let server_bin = server_bin()?;
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
            .env(
                "RUST_LOG",
                std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
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

    /// User plus system CPU time the server process has used, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                // Fields after the command name (which may hold spaces): utime and stime are
                // the 12th and 13th.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    }

    /// Peak resident memory (VmHWM) of the server process, in MiB.
    fn peak_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    /// A memory line of `/proc/PID/status` (`VmHWM:`, `RssAnon:`), in MiB.
    fn status_mib(&self, key: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
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
    let (database, cleanup) = fresh_database(o, backend, dir.path(), "bench").await?;
    if o.hl7_only {
        run_hl7(o, backend, &database).await?;
        drop_database(cleanup).await;
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
    drop_database(cleanup).await;
    Ok(())
}

/// Paced readings carry their number in their time: reading `i` is taken at
/// `PACED_EPOCH_MS + i` milliseconds, so the newest searchable Observation tells how far
/// the server has come. Their devices (`P-...`) differ from the other readings', so no paced
/// reading is the same Observation as an earlier one.
const PACED_EPOCH_MS: i64 = 1_700_000_000_000;

fn paced_reading(i: usize) -> String {
    format!(
        "{{\"type\":\"thermometer\",\"deviceId\":\"P-{:03}\",\"time\":{},\"temperature\":{}}}",
        i % 100,
        PACED_EPOCH_MS + i as i64,
        36.0 + (i % 30) as f64 / 10.0
    )
}

/// One device reading (a thermometer: one Observation per message), distinct per `i`.
fn device_reading(i: usize) -> String {
    let (secs, device) = (1_700_000_000 + i / 100, i % 100);
    format!(
        "{{\"type\":\"thermometer\",\"deviceId\":\"T-{device:03}\",\"time\":{secs},\"temperature\":{}}}",
        36.0 + (i % 30) as f64 / 10.0
    )
}

/// POSTs readings `0..n` to `$device-data` as NDJSON batches of `batch` from `clients`
/// concurrent clients (client c sends batches c, c + clients, ...); returns each batch's
/// latency until its 202, sorted, in ms.
async fn post_readings(
    client: &reqwest::Client,
    base: &str,
    n: usize,
    clients: usize,
    batch: usize,
    reading: fn(usize) -> String,
) -> Result<Vec<f64>, String> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, base) = (client.clone(), base.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c * batch;
            while i < n {
                let body: Vec<String> = (i..(i + batch).min(n)).map(reading).collect();
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/$device-data"))
                    .header("content-type", "application/x-ndjson")
                    .body(body.join("\n"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status().as_u16() != 202 {
                    return Err(format!("status {}", r.status()));
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += clients * batch;
            }
            Ok::<Vec<f64>, String>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

/// Streamed heart rate: reading `i` is patch `i % 100` at second `i / 100`.
fn grouped_reading(i: usize) -> String {
    let (secs, patch) = (1_700_000_000 + i / 100, i % 100);
    format!(
        "{{\"kind\":\"heartrate-stream\",\"device\":{{\"id\":\"HR-{patch:03}\"}},\"at\":{secs},\"bpm\":{}}}",
        60 + i % 40
    )
}

/// HTTP `$device-data` into the grouped `heart-rate-stream` template (one Observation per
/// patch and hour, a slot a second): every batch merges its readings into the stored
/// Observations. Afterwards every reading must be found in its slot.
async fn run_grouped(o: &Options, backend: &str, n: usize) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (database, cleanup) = fresh_database(o, backend, dir.path(), "bench_grouped").await?;
    let server = Server::start(&database)?;
    let client = reqwest::Client::new();
    let (batch, clients) = (o.devices_batch.max(1), o.devices_clients.max(1));
    let started = Instant::now();
    let lat = post_readings(&client, &server.base, n, clients, batch, grouped_reading).await?;
    let secs = started.elapsed().as_secs_f64();
    // Every reading in its slot: count the filled slots of all the grouped Observations.
    let mut url = format!(
        "{}/Observation?code=http://loinc.org|8867-4&_count=1000",
        server.base
    );
    let (mut observations, mut filled) = (0usize, 0usize);
    loop {
        let page: Value = client
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        for e in page["entry"].as_array().into_iter().flatten() {
            observations += 1;
            let data = e["resource"]["valueSampledData"]["data"]
                .as_str()
                .unwrap_or("");
            filled += data.split(' ').filter(|x| *x != "E").count();
        }
        let next = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str());
        match next {
            Some(u) => url = u.to_string(),
            None => break,
        }
    }
    let mut cleanup = cleanup;
    let size = mib(database_bytes(&database, &mut cleanup).await);
    let peak = server.peak_mib();
    drop(server);
    drop_database(cleanup).await;
    if filled != n {
        return Err(format!("{filled} of {n} readings found in their slots"));
    }
    println!("\n### Grouped device readings, {backend} (durable commits)\n");
    println!("| scenario | readings/s | p50 | p99 | notes |");
    println!("|---|---|---|---|---|");
    println!(
        "| HTTP `$device-data`, heart-rate-stream (hourly, 1 s slots), {clients} clients, NDJSON batches of {batch} | {:.0} | {:.1} ms | {:.1} ms | {n} readings of 100 patches in {secs:.1} s into {observations} Observations, every reading found in its slot; database {size}; server peak {peak:.0} MiB |",
        n as f64 / secs,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    Ok(())
}

/// Polls `Observation?_summary=count` until it reaches `want`; returns when it did.
async fn wait_count(
    client: &reqwest::Client,
    base: &str,
    want: usize,
    limit: Duration,
) -> Result<Instant, String> {
    let deadline = Instant::now() + limit;
    loop {
        let v: Value = client
            .get(format!("{base}/Observation?_summary=count&_total=accurate"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let n = v["total"].as_u64().unwrap_or(0) as usize;
        if n >= want {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!("only {n} of {want} Observations after {limit:?}"));
        }
        // Counting a million rows is not free: poll large runs less often.
        tokio::time::sleep(Duration::from_millis(if want < 100_000 { 20 } else { 500 })).await;
    }
}

/// Device feeds: `n` readings over HTTP (8 clients, NDJSON batches of 100, each answered
/// after commit), then `n` readings over MQTT (one reading per PUBLISH, QoS 1) from one
/// publisher, timed from the first publish until all are searchable.
async fn run_devices(o: &Options, backend: &str, n: usize) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (database, cleanup) = fresh_database(o, backend, dir.path(), "bench_devices").await?;
    let run = std::process::id();
    // A private Mosquitto sized for bursts: by default a broker hands a subscriber 20
    // unacknowledged messages at a time and drops what queues beyond 1,000.
    let broker_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages {}\nmax_queued_messages 0\n",
            o.mqtt_inflight
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start mosquitto: {e}"))?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", broker_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mqtt_url = format!("mqtt://127.0.0.1:{broker_port}");
    let topic_filter = format!("bench-{run}/+/telemetry");
    let server = Server::start_with(
        &database,
        &[
            "--mqtt-url",
            &mqtt_url,
            "--mqtt-topic",
            &topic_filter,
            "--mqtt-client-id",
            &format!("iomt-fhir-bench-{run}"),
        ],
    )?;
    let client = reqwest::Client::new();
    println!("\n### Device feeds, {backend} (durable commits)\n");
    println!("| scenario | readings/s | p50 | p99 | notes |");
    println!("|---|---|---|---|---|");
    // HTTP: 8 clients, batches of 100 unless told (skipped with --devices-mqtt-only).
    let n_http = if o.devices_mqtt_only { 0 } else { n };
    let batch = o.devices_batch.max(1);
    let clients = o.devices_clients.max(1);
    let started = Instant::now();
    let lat = post_readings(
        &client,
        &server.base,
        n_http,
        clients,
        batch,
        device_reading,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    if n_http > 0 {
        println!(
            "| HTTP `$device-data`, {clients} clients, NDJSON batches of {batch} | {:.0} | {:.1} ms | {:.1} ms | {n} readings in {secs:.1} s; latency = one batch until its 202 (after commit) |",
            n as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    wait_count(&client, &server.base, n_http, Duration::from_secs(5)).await?;
    // MQTT: one publisher, QoS 1, one reading per message; first the subscription must be up.
    let url = mqtt_url.trim_start_matches("mqtt://").to_string();
    let (host, port) = url.rsplit_once(':').ok_or("--mqtt-url needs host:port")?;
    let port: u16 = port.parse().map_err(|_| "bad MQTT port")?;
    let mut opts = MqttOptions::new(format!("bench-pub-{run}"), host, port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000);
    let (publisher, mut events) = AsyncClient::new(opts, 10_000);
    let acks = tokio::spawn(async move {
        let mut acked = 0usize;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => acked += 1,
                Ok(Event::Incoming(Incoming::Disconnect)) | Err(_) => return acked,
                Ok(_) => {}
            }
        }
    });
    let probe = |k: usize| format!("bench-{run}/T-{:03}/telemetry", k % 100);
    // Warm-up: publish reading n until it is searchable (the subscriber is up).
    let mut up = false;
    for _ in 0..100 {
        publisher
            .publish(
                probe(n),
                QoS::AtLeastOnce,
                false,
                device_reading(n).into_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
        if wait_count(
            &client,
            &server.base,
            n_http + 1,
            Duration::from_millis(300),
        )
        .await
        .is_ok()
        {
            up = true;
            break;
        }
    }
    if !up {
        return Err("the server never received MQTT data".into());
    }
    let total = 2 * n + 1;
    let total_count = n_http + n + 1;
    // Paced: a poller reads the newest Observation every 10 ms (one index seek, unlike a
    // count) and records which reading it is, so each reading's publish-to-searchable
    // latency is known to the poll interval (the subscriber commits in publish order, up to
    // its few batches in flight).
    let stop_polls = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polls = o.devices_rate.map(|_| {
        let (client, base) = (client.clone(), server.base.clone());
        let stop = stop_polls.clone();
        tokio::spawn(async move {
            let mut seen: Vec<(Instant, usize)> = Vec::new();
            let mut newest_so_far = None;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let v: Value = match client
                    .get(format!(
                        "{base}/Observation?_sort=-_lastUpdated&_count=1&_total=none"
                    ))
                    .send()
                    .await
                {
                    Ok(r) => r.json().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                let newest = v["entry"][0]["resource"]["effectiveDateTime"]
                    .as_str()
                    .and_then(iomt_fhir::search::extract::parse_fhir_date_range)
                    .map(|(start, _)| start / 1000 - PACED_EPOCH_MS)
                    .and_then(|k| usize::try_from(k).ok())
                    // The warm-up reading is newer than every paced one: not one of them.
                    .filter(|k| *k < n);
                // Batches in flight may commit out of order: keep the highest seen.
                newest_so_far = newest_so_far.max(newest);
                if let Some(k) = newest_so_far {
                    seen.push((Instant::now(), k));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    });
    let started = Instant::now();
    let mut sent_at = Vec::with_capacity(n);
    for (k, i) in ((n + 1)..total).enumerate() {
        if let Some(rate) = o.devices_rate {
            let due = started + Duration::from_secs_f64(k as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        sent_at.push(Instant::now());
        let body = match o.devices_rate {
            Some(_) => paced_reading(k),
            None => device_reading(i),
        };
        publisher
            .publish(probe(i), QoS::AtLeastOnce, false, body.into_bytes())
            .await
            .map_err(|e| e.to_string())?;
    }
    let published = started.elapsed().as_secs_f64();
    let sampler = {
        let pid = server.child.id();
        tokio::spawn(async move {
            let mut peak = 0.0f64;
            loop {
                let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("RssAnon:"))
                            .and_then(|l| l.split_whitespace().nth(1))
                            .and_then(|kb| kb.parse::<f64>().ok())
                    })
                    .map_or(0.0, |kb| kb / 1024.0);
                peak = peak.max(rss);
                eprintln!("bench: server RssAnon peak so far {peak:.0} MiB");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let done = wait_count(
        &client,
        &server.base,
        total_count,
        Duration::from_secs(3600),
    )
    .await?;
    sampler.abort();
    let secs = done.duration_since(started).as_secs_f64();
    let rss = server.status_mib("RssAnon:");
    if let (Some(rate), Some(polls)) = (o.devices_rate, polls) {
        stop_polls.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = polls.await.map_err(|e| e.to_string())?;
        // Reading k is searchable once the newest searchable reading is k or later.
        let mut lat = Vec::with_capacity(n);
        let mut at = 0;
        for (k, sent) in sent_at.iter().enumerate() {
            while seen.get(at).is_some_and(|(_, newest)| *newest < k) {
                at += 1;
            }
            // Not yet seen by a poll when the count said all were searchable: then.
            let t = seen.get(at).map_or(done, |(t, _)| *t);
            lat.push(t.duration_since(*sent).as_secs_f64() * 1000.0);
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| MQTT, 1 publisher paced at {rate}/s, QoS 1, 1 reading per message | {:.0} | {:.0} ms | {:.0} ms | {n} readings published in {published:.1} s, all searchable after {secs:.1} s; latency = publish until the newest Observation found by a search (polled every 10 ms) is this one or later, max {:.0} ms; server RssAnon {rss:.0} MiB |",
            n as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(0.0)
        );
    } else {
        println!(
            "| MQTT, 1 publisher, QoS 1, 1 reading per message | {:.0} | | | {n} readings published in {published:.1} s, all searchable after {secs:.1} s; server RssAnon {rss:.0} MiB |",
            n as f64 / secs
        );
    }
    let _ = publisher.disconnect().await;
    let _ = acks.await;
    println!(
        "\nserver peak memory (VmHWM): {:.0} MiB; broker max_inflight_messages {}",
        server.peak_mib(),
        o.mqtt_inflight
    );
    drop(server);
    let _ = broker.kill();
    let _ = broker.wait();
    drop_database(cleanup).await;
    Ok(())
}

/// The admin connection and name of a PostgreSQL database made for one run.
type PgCleanup = Option<(sqlx::PgConnection, String)>;

/// A fresh database: `<dir>/<name>.db` for SQLite, a new database `<name>_<pid>` beside
/// `--postgres-url` for PostgreSQL (`drop_database` removes it).
async fn fresh_database(
    o: &Options,
    backend: &str,
    dir: &Path,
    name: &str,
) -> Result<(String, PgCleanup), String> {
    if backend == "sqlite" {
        return Ok((format!("sqlite://{}/{name}.db", dir.display()), None));
    }
    use sqlx::Connection;
    let name = format!("{name}_{}", std::process::id());
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
    Ok((format!("{base}/{name}"), Some((c, name))))
}

async fn drop_database(cleanup: PgCleanup) {
    if let Some((mut c, name)) = cleanup {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
            .execute(&mut c)
            .await;
    }
}

// ---------------------------------------------------------------------------------------
// Search: Synthea-like data loaded with `iomt-fhir import`, then searches and paging.

/// SplitMix64: a small deterministic generator, so every run loads the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const FAMILY: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
];
const GIVEN_MALE: &[&str] = &[
    "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Charles",
    "Daniel", "Matthew", "Anthony", "Mark", "Steven", "Paul", "Andrew", "Joshua", "Kevin", "Brian",
    "George",
];
const GIVEN_FEMALE: &[&str] = &[
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Nancy",
    "Lisa",
    "Betty",
    "Margaret",
    "Sandra",
    "Ashley",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
];
const CITY: &[&str] = &[
    "Boston",
    "Worcester",
    "Springfield",
    "Cambridge",
    "Lowell",
    "Brockton",
    "Quincy",
    "Lynn",
    "Newton",
    "Somerville",
];

/// One LOINC code of the generated Observations: UCUM unit, value range, decimals, and
/// its share of the Observations in percent.
struct Loinc {
    code: &'static str,
    display: &'static str,
    category: &'static str,
    unit: &'static str,
    low: f64,
    high: f64,
    decimals: i32,
    percent: u64,
}

const fn loinc(
    code: &'static str,
    display: &'static str,
    category: &'static str,
    unit: &'static str,
    (low, high): (f64, f64),
    decimals: i32,
    percent: u64,
) -> Loinc {
    Loinc {
        code,
        display,
        category,
        unit,
        low,
        high,
        decimals,
        percent,
    }
}

/// Shares add up to 100; heart rate (the searched and paged code) is 15%, so 1,000,000
/// Observations hold 150,000 heart rates, enough for the 100,000-resource paging run.
#[rustfmt::skip]
const LOINC: &[Loinc] = &[
    loinc("8867-4", "Heart rate", "vital-signs", "/min", (50.0, 120.0), 0, 15),
    loinc("8480-6", "Systolic blood pressure", "vital-signs", "mm[Hg]", (95.0, 170.0), 0, 10),
    loinc("8462-4", "Diastolic blood pressure", "vital-signs", "mm[Hg]", (55.0, 105.0), 0, 10),
    loinc("29463-7", "Body Weight", "vital-signs", "kg", (3.0, 140.0), 1, 8),
    loinc("8302-2", "Body Height", "vital-signs", "cm", (50.0, 200.0), 1, 8),
    loinc("39156-5", "Body mass index (BMI) [Ratio]", "vital-signs", "kg/m2", (15.0, 40.0), 1, 6),
    loinc("9279-1", "Respiratory rate", "vital-signs", "/min", (10.0, 25.0), 0, 6),
    loinc("8310-5", "Body temperature", "vital-signs", "Cel", (35.5, 39.5), 1, 4),
    loinc("2708-6", "Oxygen saturation in Arterial blood", "vital-signs", "%", (88.0, 100.0), 0, 4),
    loinc("72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported", "vital-signs", "{score}", (0.0, 10.0), 0, 4),
    loinc("2339-0", "Glucose [Mass/volume] in Blood", "laboratory", "mg/dL", (60.0, 200.0), 1, 3),
    loinc("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "laboratory", "mg/dL", (120.0, 300.0), 1, 3),
    loinc("2571-8", "Triglycerides", "laboratory", "mg/dL", (50.0, 400.0), 1, 3),
    loinc("18262-6", "Low Density Lipoprotein Cholesterol", "laboratory", "mg/dL", (50.0, 200.0), 1, 3),
    loinc("2085-9", "High Density Lipoprotein Cholesterol", "laboratory", "mg/dL", (25.0, 90.0), 1, 3),
    loinc("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "laboratory", "%", (4.0, 12.0), 1, 2),
    loinc("6299-2", "Urea nitrogen [Mass/volume] in Blood", "laboratory", "mg/dL", (6.0, 30.0), 1, 2),
    loinc("38483-4", "Creatinine [Mass/volume] in Blood", "laboratory", "mg/dL", (0.5, 1.5), 2, 2),
    loinc("2947-0", "Sodium [Moles/volume] in Blood", "laboratory", "mmol/L", (135.0, 145.0), 1, 2),
    loinc("6298-4", "Potassium [Moles/volume] in Blood", "laboratory", "mmol/L", (3.5, 5.2), 1, 2),
];

/// Local time offsets of the generated `effectiveDateTime`s.
const OFFSETS: &[&str] = &["-05:00", "-04:00", "Z", "+01:00", "+02:00", "-08:00"];

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day numbers (since 1970-01-01) of the generated ranges.
const DAY_1930_01_01: i64 = -14_610;
const DAY_2015_01_01: i64 = 16_436;
const DAY_2020_01_01: i64 = 18_262;
const DAY_2025_01_01: i64 = 20_089;

fn patient_id(i: usize) -> String {
    format!("pat-{i:06}")
}

fn patient(rng: &mut Rng, i: usize) -> Value {
    let male = rng.below(2) == 0;
    let given = rng.pick(if male { GIVEN_MALE } else { GIVEN_FEMALE });
    let (y, m, d) = civil_from_days(
        DAY_1930_01_01 + rng.below((DAY_2020_01_01 - DAY_1930_01_01) as u64) as i64,
    );
    let uuid = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        rng.next() >> 32,
        rng.next() >> 48,
        rng.next() >> 52,
        0x8000 | (rng.next() >> 50),
        rng.next() >> 16
    );
    json!({
        "resourceType": "Patient",
        "id": patient_id(i),
        "identifier": [
            {"system": "https://github.com/synthetichealth/synthea", "value": uuid},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR", "display": "Medical Record Number"}]},
             "system": "http://hospital.smarthealthit.org", "value": format!("MRN-{i:06}")}
        ],
        "name": [{"use": "official", "family": rng.pick(FAMILY), "given": [given],
                  "prefix": [if male { "Mr." } else { "Ms." }]}],
        "gender": if male { "male" } else { "female" },
        "birthDate": format!("{y:04}-{m:02}-{d:02}"),
        "address": [{"city": rng.pick(CITY), "state": "MA", "country": "US"}]
    })
}

fn observation(rng: &mut Rng, i: usize, patients: usize) -> Value {
    let mut share = rng.below(100);
    let code = LOINC
        .iter()
        .find(|c| {
            if share < c.percent {
                true
            } else {
                share -= c.percent;
                false
            }
        })
        .unwrap_or(&LOINC[0]);
    let seconds = rng.below(((DAY_2025_01_01 - DAY_2015_01_01) * 86_400) as u64) as i64;
    let (y, m, d) = civil_from_days(DAY_2015_01_01 + seconds / 86_400);
    let s = seconds % 86_400;
    let effective = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        rng.pick(OFFSETS)
    );
    let scale = 10f64.powi(code.decimals);
    let raw = code.low + rng.unit() * (code.high - code.low);
    let value = if code.decimals == 0 {
        json!(raw.round() as i64)
    } else {
        json!((raw * scale).round() / scale)
    };
    json!({
        "resourceType": "Observation",
        "id": format!("obs-{i:07}"),
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": code.category,
                                  "display": if code.category == "laboratory" { "Laboratory" } else { "Vital signs" }}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code.code, "display": code.display}],
                 "text": code.display},
        "subject": {"reference": format!("Patient/{}", patient_id(rng.below(patients as u64) as usize))},
        "effectiveDateTime": effective,
        "valueQuantity": {"value": value, "unit": code.unit, "system": "http://unitsofmeasure.org", "code": code.unit}
    })
}

/// The generated NDJSON files.
struct SearchData {
    /// Keeps the files until the benchmark ends.
    _dir: tempfile::TempDir,
    files: Vec<PathBuf>,
    patients: usize,
    observations: usize,
    bytes: u64,
}

/// Observations per NDJSON file.
const OBSERVATIONS_PER_FILE: usize = 100_000;

fn generate(observations: usize, patients: usize) -> Result<SearchData, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut rng = Rng(0x1f4b_2026);
    let mut files = Vec::new();
    let mut bytes = 0u64;
    let mut write_file = |name: String,
                          lines: &mut dyn Iterator<Item = Value>|
     -> Result<(), String> {
        let path = dir.path().join(name);
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        for v in lines {
            serde_json::to_writer(&mut w, &v).map_err(|e| e.to_string())?;
            w.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        w.flush().map_err(|e| e.to_string())?;
        bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        files.push(path);
        Ok(())
    };
    write_file(
        "Patient.ndjson".into(),
        &mut (0..patients).map(|i| patient(&mut rng, i)),
    )?;
    for (n, start) in (0..observations).step_by(OBSERVATIONS_PER_FILE).enumerate() {
        let end = (start + OBSERVATIONS_PER_FILE).min(observations);
        write_file(
            format!("Observation-{n:03}.ndjson"),
            &mut (start..end).map(|i| observation(&mut rng, i, patients)),
        )?;
    }
    Ok(SearchData {
        _dir: dir,
        files,
        patients,
        observations,
        bytes,
    })
}

/// Outcome of one `iomt-fhir import` run.
struct Imported {
    resources: u64,
    secs: f64,
    failures: Vec<String>,
}

/// Runs the real `iomt-fhir import` CLI (it must own the database: no server runs on it).
/// `indexing: false` sets `IOMT_FHIR_SEARCH_INDEXING=false`.
fn import(database: &str, files: &[PathBuf], indexing: bool) -> Result<Imported, String> {
    let mut cmd = Command::new(server_bin()?);
    cmd.args(["import", "--database", database])
        .args(files)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    if indexing {
        cmd.env_remove("IOMT_FHIR_SEARCH_INDEXING");
    } else {
        cmd.env("IOMT_FHIR_SEARCH_INDEXING", "false");
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run iomt-fhir import: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(summary) = stdout.lines().find(|l| l.starts_with("imported ")) else {
        return Err(format!(
            "iomt-fhir import failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    };
    Ok(Imported {
        resources: summary
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        secs,
        failures: stdout
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("failed: "))
            .map(str::to_string)
            .collect(),
    })
}

/// Whether this `iomt-fhir` build knows the search-indexing setting at all (if not, the
/// "indexing off" import indexes anyway and the ratio means nothing).
fn knows_indexing_setting() -> bool {
    server_bin()
        .ok()
        .and_then(|bin| Command::new(bin).args(["import", "--help"]).output().ok())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).contains("SEARCH_INDEXING"))
}

/// Size on disk: the SQLite file and its WAL, or `pg_database_size`.
async fn database_bytes(database: &str, cleanup: &mut PgCleanup) -> Option<u64> {
    if let Some(path) = database.strip_prefix("sqlite://") {
        let size = |p: String| std::fs::metadata(p).map_or(0, |m| m.len());
        return Some(size(path.to_string()) + size(format!("{path}-wal")));
    }
    let (c, name) = cleanup.as_mut()?;
    sqlx::query_scalar::<_, i64>("SELECT pg_database_size($1)")
        .bind(name.as_str())
        .fetch_one(c)
        .await
        .ok()
        .map(|b| b.max(0) as u64)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("size unknown".into(), |b| {
        format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
    })
}

/// The search of scenarios (a) and (c) after `patient=`: heart rates since 2019.
const OBSERVATION_QUERY_TAIL: &str = "&code=http://loinc.org%7C8867-4&date=ge2019-01-01&_count=50";

/// Per-thread seeds, so wrk's two threads do not send the same sequence.
const LUA_SEED: &str = r#"
local counter = 0
function setup(thread)
  thread:set("seed", counter)
  counter = counter + 1
end
function init(args)
  math.randomseed(os.time() + 7919 * (seed or 0))
end
"#;

fn observation_script(patients: usize) -> String {
    format!(
        r#"{LUA_SEED}
request = function()
  local id = string.format("pat-%06d", math.random(0, {last}))
  return wrk.format("GET", "/fhir/Observation?patient=Patient/" .. id .. "{OBSERVATION_QUERY_TAIL}")
end
"#,
        last = patients.saturating_sub(1)
    )
}

/// Distinct three-letter prefixes of the family names.
fn name_prefixes() -> Vec<&'static str> {
    let mut p: Vec<&str> = FAMILY.iter().filter_map(|f| f.get(..3)).collect();
    p.sort_unstable();
    p.dedup();
    p
}

fn patient_name_script() -> String {
    let list = name_prefixes()
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"{LUA_SEED}
local prefixes = {{{list}}}
request = function()
  return wrk.format("GET", "/fhir/Patient?name=" .. prefixes[math.random(1, #prefixes)])
end
"#
    )
}

/// One request before the load: its status and match count (or the server's complaint) go
/// into the notes, so a 400 from an unsupported parameter is visible, not just counted.
async fn probe(client: &reqwest::Client, url: &str) -> String {
    let r = match client.get(url).send().await {
        Ok(r) => r,
        Err(e) => return format!("probe failed: {e}"),
    };
    let status = r.status();
    let v: Value = r
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    if status.is_success() {
        let entries = v["entry"].as_array().map_or(0, Vec::len);
        format!("sample: total {}, {entries} on page 1", v["total"])
    } else {
        format!(
            "**{status}**: {}",
            v.pointer("/issue/0/diagnostics")
                .and_then(Value::as_str)
                .unwrap_or("no diagnostics")
        )
    }
}

/// Follows `next` links from `first` until `limit` resources or the last page; returns
/// resources, pages, seconds and the page latencies in ms (sorted).
async fn page_through(
    client: &reqwest::Client,
    first: String,
    limit: usize,
) -> Result<(usize, usize, f64, Vec<f64>), String> {
    let mut next = Some(first);
    let (mut resources, mut latencies) = (0, Vec::new());
    let started = Instant::now();
    while let Some(url) = next.take() {
        let t = Instant::now();
        let r = client.get(&url).send().await.map_err(|e| e.to_string())?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status} for {url}: {text}"));
        }
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        resources += v["entry"].as_array().map_or(0, |es| {
            es.iter().filter(|e| e.get("resource").is_some()).count()
        });
        if resources >= limit {
            break;
        }
        next = v["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .map(str::to_string)
        });
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok((resources, latencies.len(), secs, latencies))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

fn search_row(backend: &str, scenario: &str, result: &str, p50: &str, p99: &str, notes: &str) {
    println!("| {backend} | {scenario} | {result} | {p50} | {p99} | {notes} |");
}

fn wrk_row(backend: &str, scenario: &str, r: &WrkResult, notes: &str) {
    let errors = if r.errors > 0 {
        format!("; **{} non-2xx**", r.errors)
    } else {
        String::new()
    };
    search_row(
        backend,
        scenario,
        &format!("{:.0} req/s", r.rps),
        &format!("{:.2} ms", r.p50_ms),
        &format!("{:.2} ms", r.p99_ms),
        &format!("{notes}{errors}"),
    );
}

async fn run_search(o: &Options) -> Result<(), String> {
    let patients = o.patients.unwrap_or(o.observations / 100).max(1);
    if let Some(database) = &o.search_database {
        let backend = if database.starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        };
        println!("\n### Search ({database}, {patients} patients)\n");
        println!("| backend | scenario | req/s | p50 | p99 | notes |");
        println!("|---|---|---|---|---|---|");
        return search_scenarios(o, backend, database, patients).await;
    }
    let started = Instant::now();
    let data = generate(o.observations, patients)?;
    if let Some(to) = &o.generate_to {
        std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
        for f in &data.files {
            if let Some(name) = f.file_name() {
                std::fs::copy(f, to.join(name)).map_err(|e| format!("{}: {e}", f.display()))?;
            }
        }
        println!("wrote {} files to {}", data.files.len(), to.display());
        return Ok(());
    }
    println!(
        "generated {} Patients and {} Observations ({:.0} MiB NDJSON, {} files) in {:.1} s",
        data.patients,
        data.observations,
        data.bytes as f64 / (1024.0 * 1024.0),
        data.files.len(),
        started.elapsed().as_secs_f64()
    );
    if !knows_indexing_setting() {
        println!(
            "note: `iomt-fhir import --help` does not mention IOMT_FHIR_SEARCH_INDEXING; \
             the indexing-off import probably indexes anyway"
        );
    }
    println!(
        "\n### Search ({} Observations, durable commits)\n",
        data.observations
    );
    println!("| backend | scenario | req/s | p50 | p99 | notes |");
    println!("|---|---|---|---|---|---|");
    for b in &o.backends {
        search_backend(o, b, &data)
            .await
            .map_err(|e| format!("{b}: {e}"))?;
    }
    Ok(())
}

async fn search_backend(o: &Options, backend: &str, data: &SearchData) -> Result<(), String> {
    let total = data.patients + data.observations;
    // Indexing on: the database the searches run on.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (database, mut cleanup) = fresh_database(o, backend, dir.path(), "bench_search").await?;
    eprintln!("bench: {backend}: importing {total} resources (search indexing on)");
    let on = import(&database, &data.files, true)?;
    let on_bytes = database_bytes(&database, &mut cleanup).await;
    // Indexing off: a second fresh database, removed right after.
    let off_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (off_database, mut off_cleanup) =
        fresh_database(o, backend, off_dir.path(), "bench_search_noidx").await?;
    eprintln!("bench: {backend}: importing {total} resources (search indexing off)");
    let off = import(&off_database, &data.files, false);
    let off_bytes = database_bytes(&off_database, &mut off_cleanup).await;
    drop_database(off_cleanup).await;
    drop(off_dir);
    let off = off?;
    let rate = |i: &Imported| i.resources as f64 / i.secs.max(1e-9);
    let failures = |i: &Imported| match i.failures.first() {
        None => String::new(),
        Some(f) => format!("; **{} failures**, first: {f}", i.failures.len()),
    };
    for (label, i, bytes) in [("on", &on, on_bytes), ("off", &off, off_bytes)] {
        let ratio = if label == "off" {
            format!("; on/off = {:.2}", rate(&on) / rate(&off).max(1e-9))
        } else {
            String::new()
        };
        search_row(
            backend,
            &format!("`iomt-fhir import` NDJSON, search indexing {label}"),
            &format!("{:.0} resources/s", rate(i)),
            "",
            "",
            &format!(
                "{} resources in {:.1} s; database {}{ratio}{}",
                i.resources,
                i.secs,
                mib(bytes),
                failures(i)
            ),
        );
    }

    search_scenarios(o, backend, &database, data.patients).await?;
    drop_database(cleanup).await;
    Ok(())
}

/// The searches, paging and memory rows on a loaded database of `patients` Patients.
async fn search_scenarios(
    o: &Options,
    backend: &str,
    database: &str,
    patients: usize,
) -> Result<(), String> {
    let server = Server::start(database)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?;
    let obs_url = format!("{}/Observation", server.base);
    let sample_patient = patient_id(patients / 2);
    let obs_probe = probe(
        &client,
        &format!("{obs_url}?patient=Patient/{sample_patient}{OBSERVATION_QUERY_TAIL}"),
    )
    .await;
    let obs_script = observation_script(patients);
    wrk_row(
        backend,
        "Observation?patient=…&code=8867-4&date=ge2019-01-01&_count=50, 16 connections",
        &wrk(&obs_script, &obs_url, 16, o.seconds)?,
        &obs_probe,
    );
    let pat_url = format!("{}/Patient", server.base);
    let pat_probe = probe(
        &client,
        &format!(
            "{pat_url}?name={}",
            name_prefixes().first().unwrap_or(&"Smi")
        ),
    )
    .await;
    wrk_row(
        backend,
        "Patient?name=[3-letter prefix], first page, 16 connections",
        &wrk(&patient_name_script(), &pat_url, 16, o.seconds)?,
        &pat_probe,
    );
    wrk_row(
        backend,
        "Observation?patient=…&code=8867-4&date=ge2019-01-01&_count=50, 1 connection",
        &wrk(&obs_script, &obs_url, 1, o.seconds)?,
        &obs_probe,
    );
    let first = format!("{obs_url}?code=http://loinc.org%7C8867-4&_count=1000");
    match page_through(&client, first, 100_000).await {
        Ok((resources, pages, secs, latencies)) => search_row(
            backend,
            "paging Observation?code=8867-4&_count=1000 via `next`, 1 client",
            &format!("{:.0} resources/s", resources as f64 / secs.max(1e-9)),
            &format!("{:.1} ms/page", percentile(&latencies, 0.5)),
            &format!("{:.1} ms/page", percentile(&latencies, 0.99)),
            &format!(
                "{resources} resources, {pages} pages in {secs:.1} s; slowest page {:.1} ms",
                latencies.last().copied().unwrap_or(f64::NAN)
            ),
        ),
        Err(e) => search_row(
            backend,
            "paging Observation?code=8867-4&_count=1000 via `next`, 1 client",
            "failed",
            "",
            "",
            &e.chars().take(300).collect::<String>(),
        ),
    }
    search_row(
        backend,
        "server memory: peak VmHWM / RssAnon at the end",
        &format!(
            "{:.0} / {:.0} MiB",
            server.peak_mib(),
            server.status_mib("RssAnon:")
        ),
        "",
        "",
        "VmHWM counts the mmap'd SQLite file once per reader connection; RssAnon is heap",
    );
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
    if let Some(n) = o.index_floor {
        or_exit("index floor", run_index_floor(&o, n).await);
    } else if let Some(n) = o.devices_grouped {
        for b in o.backends.clone() {
            or_exit(
                &format!("grouped devices, {b}"),
                run_grouped(&o, &b, n).await,
            );
        }
    } else if let Some(n) = o.devices {
        for b in o.backends.clone() {
            or_exit(&format!("devices, {b}"), run_devices(&o, &b, n).await);
        }
    } else if o.smart_only {
        for b in o.backends.clone() {
            or_exit(&format!("smart, {b}"), run_smart(&o, &b).await);
        }
    } else if o.search_only {
        or_exit("search", run_search(&o).await);
    } else {
        for b in o.backends.clone() {
            or_exit(&b, run_backend(&o, &b).await);
        }
    }
}

/// Ends the bench with status 1 if a scenario failed, saying which.
fn or_exit(what: &str, result: Result<(), String>) {
    if let Err(e) = result {
        eprintln!("bench ({what}): {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// SMART: what authorization costs, and the token endpoint.

const SEARCH_SCRIPT: &str = r#"
math.randomseed(os.time())
request = function()
  return wrk.format("GET", "/fhir/Observation?code=http://loinc.org|8867-4&_count=10&_offset=" .. math.random(0, 90))
end
"#;

fn with_token(script: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("wrk.headers[\"Authorization\"] = \"Bearer {t}\"\n{script}"),
        None => script.to_string(),
    }
}

/// A backend-services token for `scope`.
/// A client assertion for `id`, unique by `jti`, valid for 280 s.
fn assertion(
    key: &iomt_fhir::auth::jwt::sign::Key,
    id: &str,
    token_url: &str,
    jti: &mut u64,
) -> String {
    *jti += 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    key.sign(
        "k1",
        &json!({"iss": id, "sub": id, "aud": token_url, "exp": now + 280, "jti": format!("{id}-{jti}")}),
        &json!({}),
    )
}

/// The client_credentials form of one token request.
fn credentials_form<'a>(assertion: &'a str, scope: &'a str) -> [(&'static str, &'a str); 4] {
    [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
        ("scope", scope),
    ]
}

async fn smart_token(
    client: &reqwest::Client,
    origin: &str,
    key: &iomt_fhir::auth::jwt::sign::Key,
    id: &str,
    scope: &str,
    jti: &mut u64,
) -> Result<String, String> {
    let token_url = format!("{origin}/auth/token");
    let a = assertion(key, id, &token_url, jti);
    let r: Value = client
        .post(&token_url)
        .form(&credentials_form(&a, scope))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    r["access_token"]
        .as_str()
        .map(str::to_string)
        .ok_or(format!("no token: {r}"))
}

/// Waits until the AuditEvent count stops growing (beyond the polls' own events).
/// Waits until the server's AuditEvents stop growing: no new ones for longer than the
/// server's read window (`--audit-read-window`, 5 s by default), so the last window's
/// events are written before this returns and are paid for by the run that caused them.
async fn drain_audit(client: &reqwest::Client, base: &str, token: &str) -> Result<(), String> {
    const QUIET: Duration = Duration::from_millis(6_500);
    let mut last = -1i64;
    let mut since = std::time::Instant::now();
    for _ in 0..1200 {
        let v: Value = client
            .get(format!("{base}/AuditEvent?_summary=count"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let n = v["total"].as_i64().unwrap_or(0);
        // The count requests themselves are audited reads, at most one event a window.
        if last >= 0 && n - last <= 2 {
            if since.elapsed() >= QUIET {
                return Ok(());
            }
        } else {
            since = std::time::Instant::now();
        }
        last = n;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("the audit backlog did not drain".into())
}

/// The `q` quantile of sorted values (linear between neighbours).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The median of sorted values.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

async fn run_smart(o: &Options, backend: &str) -> Result<(), String> {
    use iomt_fhir::auth::jwt::sign::Key;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (database, cleanup) = fresh_database(o, backend, dir.path(), "smart").await?;
    let client = reqwest::Client::new();
    {
        let server = Server::start(&database)?;
        seed_reads(&client, &server.base).await?;
    }
    let es = Key::generate_es384()?;
    let rsa_pem = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt/rs384-client.pk8.pem"),
    )
    .map_err(|e| e.to_string())?;
    let rs = Key::rs384_from_pem(&rsa_pem)?;
    for (id, key) in [("bench-es", &es), ("bench-rs", &rs)] {
        let jwks = dir.path().join(format!("{id}.json"));
        std::fs::write(&jwks, json!({"keys": [key.jwk("k1")]}).to_string())
            .map_err(|e| e.to_string())?;
        let out = Command::new(server_bin()?)
            .args([
                "clients",
                "add",
                "--client-id",
                id,
                "--kind",
                "confidential-asymmetric",
            ])
            .args([
                "--scope",
                "system/*.rs system/Observation.rs?code=http://loinc.org|8867-4",
            ])
            .arg("--jwks")
            .arg(&jwks)
            .args(["--database", &database])
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "clients add: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let rounds = o.rounds.max(1);
    let mut jti = 0u64;
    // Three servers at once, each on its own copy of the database (one process per SQLite
    // file; on PostgreSQL they share the database, as scaled-out servers do), so the
    // scenarios can alternate every few seconds instead of minutes apart.
    let copies = if backend == "sqlite" {
        let path = database.trim_start_matches("sqlite://");
        let mut copies = Vec::new();
        for name in ["off", "smart", "audited"] {
            let copy = format!("{path}.{name}.db");
            for suffix in ["", "-wal", "-shm"] {
                let from = format!("{path}{suffix}");
                if Path::new(&from).exists() {
                    std::fs::copy(&from, format!("{copy}{suffix}")).map_err(|e| e.to_string())?;
                }
            }
            copies.push(format!("sqlite://{copy}"));
        }
        copies
    } else {
        vec![database.clone(); 3]
    };
    let off = Server::start_with(&copies[0], &["--auth", "off"])?;
    let smart = Server::start_with(&copies[1], &["--auth", "smart", "--audit-reads", "false"])?;
    let audited = Server::start_with(&copies[2], &["--auth", "smart"])?;
    let origin_of = |s: &Server| s.base.trim_end_matches("/fhir").to_string();
    const SCOPES: [&str; 2] = [
        "system/*.rs",
        "system/Observation.rs?code=http://loinc.org|8867-4",
    ];
    let (so, ao) = (origin_of(&smart), origin_of(&audited));
    // The modes, by index: 0 is `--auth off`, AUDITED the one whose runs wait for their
    // audit backlog; each smart mode's (origin, scope) for its tokens.
    const AUDITED: usize = 3;
    // (label, server, the origin and scope of its tokens)
    type Mode<'a> = (String, &'a Server, Option<(&'a str, &'a str)>);
    let modes: [Mode; 4] = [
        ("--auth off".into(), &off, None),
        (
            format!("--auth smart --audit-reads false, {}", SCOPES[0]),
            &smart,
            Some((&so, SCOPES[0])),
        ),
        (
            format!("--auth smart --audit-reads false, {}", SCOPES[1]),
            &smart,
            Some((&so, SCOPES[1])),
        ),
        (
            format!("--auth smart (reads audited), {}", SCOPES[0]),
            &audited,
            Some((&ao, SCOPES[0])),
        ),
    ];
    // Backend-services tokens live at most 5 minutes, fewer than a long bench: each round
    // (and the warm-up) gets new ones.
    let mut tokens: [Option<String>; 4] = Default::default();
    let mut new_tokens = async |tokens: &mut [Option<String>; 4]| -> Result<(), String> {
        for (m, (_, _, how)) in modes.iter().enumerate() {
            if let Some((origin, scope)) = how {
                tokens[m] =
                    Some(smart_token(&client, origin, &es, "bench-es", scope, &mut jti).await?);
            }
        }
        Ok(())
    };
    let tick = clock_ticks_per_second();
    println!(
        "\n### {backend}: authorization overhead (HTTP on loopback, 32 clients, {rounds} round(s), {} s per run)\n",
        o.seconds
    );
    println!(
        "Per round and kind: `--auth off`, the three smart modes (order rotating by round), \
         `--auth off` again; each smart run is compared with the mean of the two `--auth off` \
         runs around it. Server CPU is the process's user and system time from the start of a \
         run until its audit backlog is written, so audited rows pay for their own AuditEvents.\n"
    );
    println!("| round | scenario | requests/s | p50 | p99 | non-2xx | server CPU per request |");
    println!("|---|---|---|---|---|---|---|");
    // Per scenario and round: requests/s, the bracketing --auth off requests/s, CPU µs per
    // request, the bracketing --auth off CPU µs per request.
    let mut results: Vec<(String, Vec<[f64; 4]>)> = Vec::new();
    // Warm-up: caches filled, verdicts made, connections' first costs paid.
    new_tokens(&mut tokens).await?;
    for (m, (_, server, _)) in modes.iter().enumerate() {
        for script in [READ_SCRIPT, SEARCH_SCRIPT] {
            let url = format!("{}/Observation", server.base);
            wrk(&with_token(script, tokens[m].as_deref()), &url, 32, 1)?;
        }
    }
    drain_audit(
        &client,
        &audited.base,
        tokens[AUDITED].as_deref().unwrap_or_default(),
    )
    .await?;
    for round in 1..=rounds {
        new_tokens(&mut tokens).await?;
        for (kind, script) in [("read by id", READ_SCRIPT), ("search", SEARCH_SCRIPT)] {
            let mut order = vec![1, 2, 3];
            order.rotate_left((round - 1) % 3);
            let mut runs = Vec::new();
            for m in std::iter::once(0).chain(order).chain(std::iter::once(0)) {
                let (mode, server, _) = &modes[m];
                let token = tokens[m].as_deref();
                let url = format!("{}/Observation", server.base);
                let before = server.cpu_ticks();
                let r = wrk(&with_token(script, token), &url, 32, o.seconds)?;
                if r.errors > 0 {
                    return Err(format!(
                        "round {round}, {kind}, {mode}: {} non-2xx responses; not comparable",
                        r.errors
                    ));
                }
                if m == AUDITED {
                    drain_audit(&client, &server.base, token.unwrap_or_default()).await?;
                }
                let ticks = server.cpu_ticks().saturating_sub(before);
                let cpu_us = ticks as f64 * 1e6 / tick / (r.rps * o.seconds as f64);
                println!(
                    "| {round} | {kind}, {mode} | {:.0} | {:.2} ms | {:.2} ms | {} | {cpu_us:.1} µs |",
                    r.rps, r.p50_ms, r.p99_ms, r.errors
                );
                runs.push((m, r.rps, cpu_us));
            }
            let (first, last) = (runs[0], runs[runs.len() - 1]);
            let (off_rps, off_cpu) = ((first.1 + last.1) / 2.0, (first.2 + last.2) / 2.0);
            for &(m, rps, cpu) in &runs {
                let label = format!("{kind}, {}", modes[m].0);
                let v = [rps, off_rps, cpu, off_cpu];
                match results.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, all)) => all.push(v),
                    None => results.push((label, vec![v])),
                }
            }
        }
    }
    println!("\n### {backend}: medians over {rounds} round(s)\n");
    println!(
        "| scenario | median requests/s | range | requests/s vs --auth off: median (quartiles) | server CPU per request | CPU per request vs --auth off: median (quartiles) |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, v) in &results {
        let sorted = |f: &dyn Fn(&[f64; 4]) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(|a, b| a.total_cmp(b));
            x
        };
        let spread = |x: &[f64]| {
            format!(
                "{:+.1} % ({:+.1} to {:+.1})",
                median(x),
                quantile(x, 0.25),
                quantile(x, 0.75)
            )
        };
        let (rps, cpu) = (sorted(&|x| x[0]), sorted(&|x| x[2]));
        let (d_rps, d_cpu) = if label.ends_with("--auth off") {
            (String::new(), String::new())
        } else {
            (
                spread(&sorted(&|x| (x[0] / x[1] - 1.0) * 100.0)),
                spread(&sorted(&|x| (x[2] / x[3] - 1.0) * 100.0)),
            )
        };
        println!(
            "| {label} | {:.0} | {:.0}–{:.0} | {d_rps} | {:.1} µs | {d_cpu} |",
            median(&rps),
            rps[0],
            rps[rps.len() - 1],
            median(&cpu),
        );
    }
    drop(off);
    drop(smart);
    let origin = ao;
    let server = audited;
    let token_url = format!("{origin}/auth/token");
    println!("\n### {backend}: token endpoint (client_credentials, 16 clients)\n");
    println!("| assertion | tokens | seconds | tokens/s | failures |");
    println!("|---|---|---|---|---|");
    for (label, key, id, n) in [
        ("ES384", &es, "bench-es", 5000usize),
        ("RS384", &rs, "bench-rs", 5000),
    ] {
        let assertions: Vec<String> = (0..n)
            .map(|_| assertion(key, id, &token_url, &mut jti))
            .collect();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(assertions));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (queue, client, token_url) = (queue.clone(), client.clone(), token_url.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = 0usize;
                loop {
                    let Some(a) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                        return failures;
                    };
                    let r = client
                        .post(&token_url)
                        .form(&credentials_form(&a, "system/*.rs"))
                        .send()
                        .await;
                    let ok = r.as_ref().is_ok_and(|r| r.status().is_success());
                    if !ok {
                        if failures == 0 {
                            match r {
                                Ok(r) => eprintln!(
                                    "token request failed: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                ),
                                Err(e) => eprintln!("token request failed: {e}"),
                            }
                        }
                        failures += 1;
                    }
                }
            }));
        }
        let mut failures = 0;
        for t in tasks {
            failures += t.await.unwrap_or(0);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "| {label} | {n} | {secs:.2} | {:.0} | {failures} |",
            n as f64 / secs
        );
    }
    println!("\nserver peak memory (VmHWM): {:.0} MiB", server.peak_mib());
    drop(server);
    drop_database(cleanup).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Index floor: what the database engine alone needs to store the rows of an import.

/// How the floor stores a generated Observation's index rows.
#[derive(Clone, Copy, PartialEq)]
enum FloorVariant {
    /// No index rows: the resource and its version only (`IOMT_FHIR_SEARCH_INDEXING=false`).
    Off,
    /// The server's six index rows per Observation, into the server's tables and indexes.
    On,
    /// The same rows appended to unindexed staging tables and merged into the real ones,
    /// sorted by lookup key, every `merge_every` transactions: the most an LSM-like layout
    /// could save inside the same engine.
    Staged,
}

impl FloorVariant {
    fn label(self) -> &'static str {
        match self {
            FloorVariant::Off => "no index rows",
            FloorVariant::On => "6 index rows, the server's tables",
            FloorVariant::Staged => "6 index rows, staged and merged in key order",
        }
    }
}

/// Index tables written by the floor, with the order of their lookup index.
const FLOOR_TABLES: [(&str, &str); 4] = [
    ("idx_token", "param, value, system, rid"),
    ("idx_reference", "param, target_id, target_type, rid"),
    ("idx_date", "param, lo, hi, rid"),
    ("idx_quantity", "param, value"),
];

/// One transaction's statements for Observations `s..=e`: set-based `INSERT ... SELECT`s
/// over a generated series, so the engine does the storing and nothing else (no JSON, no
/// extraction, no statement per row). The rows have the shapes the server writes for the
/// generated Observations of `--search`: three tokens (code among 200, category, status),
/// the subject (one of 10,000 patients), the effective date and the value, the last three
/// at random places of their lookup indexes.
fn floor_batch(pg: bool, variant: FloorVariant, s: usize, e: usize) -> String {
    let series = if pg {
        format!("generate_series({s}, {e}) AS g(value)")
    } else {
        format!(
            "(WITH RECURSIVE q(value) AS (SELECT {s} UNION ALL SELECT value + 1 FROM q \
             WHERE value < {e}) SELECT value FROM q) AS g"
        )
    };
    let rnd = |k: u64| {
        if pg {
            format!("floor(random() * {k})::bigint")
        } else {
            format!("(abs(random()) % {k})")
        }
    };
    let body = "x".repeat(480);
    // PostgreSQL generates `seq` and `rid` itself unless told.
    let given = if pg { "OVERRIDING SYSTEM VALUE" } else { "" };
    let mut sql = format!(
        "INSERT INTO resource_version (seq, res_type, res_id, version, last_updated, method, body) \
         {given} SELECT 10000000 + value, 'Observation', 'obs-' || (10000000 + value), 1, \
         1700000000000000 + value, 'POST', '{body}' || value FROM {series};\n\
         INSERT INTO resource (rid, res_type, res_id, version, last_updated, deleted, seq, idx_mask) \
         {given} SELECT 10000000 + value, 'Observation', 'obs-' || (10000000 + value), 1, \
         1700000000000000 + value, 0, 10000000 + value, 63 FROM {series};\n"
    );
    if variant == FloorVariant::Off {
        return sql;
    }
    let to = |t: &str| {
        if variant == FloorVariant::Staged {
            format!("s_{t}")
        } else {
            t.to_string()
        }
    };
    let (code, patient, date, value) =
        (rnd(200), rnd(10_000), rnd(300_000_000_000_000), rnd(20_000));
    sql += &format!(
        "INSERT INTO {} (rid, param, system, value) SELECT 10000000 + value, 1, \
         'http://loinc.org', '8' || {code} || '-4' FROM {series};\n\
         INSERT INTO {} (rid, param, system, value) SELECT 10000000 + value, 2, \
         'http://terminology.hl7.org/CodeSystem/observation-category', 'vital-signs' FROM {series};\n\
         INSERT INTO {} (rid, param, system, value) SELECT 10000000 + value, 3, NULL, 'final' \
         FROM {series};\n\
         INSERT INTO {} (rid, param, target_type, target_id, url) SELECT 10000000 + value, 4, \
         'Patient', 'pat-' || {patient}, 'Patient/pat' FROM {series};\n\
         INSERT INTO {} (rid, param, lo, hi) SELECT rid, 5, x, x + 999999 FROM \
         (SELECT 10000000 + value AS rid, 1400000000000000 + {date} AS x FROM {series}) AS d;\n\
         INSERT INTO {} (rid, param, value, system, unit_code, unit) SELECT 10000000 + value, 6, \
         {value} / 100.0, 'http://unitsofmeasure.org', 'mm[Hg]', 'mm[Hg]' FROM {series};\n",
        to("idx_token"),
        to("idx_token"),
        to("idx_token"),
        to("idx_reference"),
        to("idx_date"),
        to("idx_quantity"),
    );
    sql
}

/// The staged rows moved into the real tables in lookup-key order.
fn floor_merge() -> String {
    FLOOR_TABLES
        .iter()
        .map(|(t, order)| {
            format!("INSERT INTO {t} SELECT * FROM s_{t} ORDER BY {order};\nDELETE FROM s_{t};\n")
        })
        .collect()
}

/// `--index-floor N`: N Observations stored by the database engine alone, per variant,
/// into a fresh database migrated by the server (`iomt-fhir import` of one Patient), in
/// transactions of 2,000 (what `iomt-fhir import` sends) with the server's connection
/// settings. What the server could at best reach, and the ratio of indexing on to off that
/// the engine itself allows.
async fn run_index_floor(o: &Options, n: usize) -> Result<(), String> {
    const BATCH: usize = 2000;
    const MERGE_EVERY: usize = 50;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let seed = dir.path().join("seed.ndjson");
    std::fs::write(
        &seed,
        "{\"resourceType\":\"Patient\",\"id\":\"seed\",\"active\":true}\n",
    )
    .map_err(|e| e.to_string())?;
    println!("\n### Index floor ({n} Observations, transactions of {BATCH})\n");
    println!("| backend | variant | seconds | Observations/s | vs. no index rows |");
    println!("|---|---|---|---|---|");
    for backend in &o.backends {
        let pg = backend == "postgres";
        let mut off_rate = None;
        for variant in [FloorVariant::Off, FloorVariant::On, FloorVariant::Staged] {
            let (database, cleanup) =
                fresh_database(o, backend, dir.path(), &format!("floor{}", variant as u8)).await?;
            import(&database, std::slice::from_ref(&seed), true)?;
            let secs = floor_load(&database, pg, variant, n, BATCH, MERGE_EVERY).await;
            drop_database(cleanup).await;
            let rate = n as f64 / secs?;
            let off = *off_rate.get_or_insert(rate);
            println!(
                "| {backend} | {} | {:.1} | {rate:.0} | {:.2} |",
                variant.label(),
                n as f64 / rate,
                rate / off
            );
        }
    }
    Ok(())
}

/// Seconds to store `n` Observations the way `variant` says.
async fn floor_load(
    database: &str,
    pg: bool,
    variant: FloorVariant,
    n: usize,
    batch: usize,
    merge_every: usize,
) -> Result<f64, String> {
    use sqlx::Connection;
    use std::str::FromStr;
    /// Either engine's connection, with the server's settings.
    enum Conn {
        Sqlite(sqlx::SqliteConnection),
        Pg(sqlx::PgConnection),
    }
    impl Conn {
        async fn run(&mut self, sql: String) -> Result<(), String> {
            let q = sqlx::raw_sql(sqlx::AssertSqlSafe(sql));
            match self {
                Conn::Sqlite(c) => q.execute(c).await.map(drop),
                Conn::Pg(c) => q.execute(c).await.map(drop),
            }
            .map_err(|e| e.to_string())
        }
    }
    let mut conn = if pg {
        let opts = sqlx::postgres::PgConnectOptions::from_str(database)
            .map_err(|e| e.to_string())?
            .options([("jit", "off")]);
        Conn::Pg(
            sqlx::PgConnection::connect_with(&opts)
                .await
                .map_err(|e| e.to_string())?,
        )
    } else {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
        let opts = SqliteConnectOptions::from_str(database)
            .map_err(|e| e.to_string())?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .pragma("cache_size", "-65536")
            .pragma("mmap_size", "274877906944")
            .pragma("wal_autocheckpoint", "262144");
        Conn::Sqlite(
            sqlx::SqliteConnection::connect_with(&opts)
                .await
                .map_err(|e| e.to_string())?,
        )
    };
    if variant == FloorVariant::Staged {
        for (t, _) in FLOOR_TABLES {
            conn.run(format!("CREATE TABLE s_{t} AS SELECT * FROM {t} LIMIT 0"))
                .await?;
        }
    }
    let started = Instant::now();
    let mut s = 0;
    let mut batches = 0;
    while s < n {
        let e = (s + batch).min(n) - 1;
        conn.run(format!("BEGIN;\n{}COMMIT;", floor_batch(pg, variant, s, e)))
            .await?;
        batches += 1;
        s = e + 1;
        if variant == FloorVariant::Staged && (batches % merge_every == 0 || s >= n) {
            conn.run(format!("BEGIN;\n{}COMMIT;", floor_merge()))
                .await?;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}
