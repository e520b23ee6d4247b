//! Device data over a real MQTT broker (Mosquitto in CI: IOMT_FHIR_TEST_MQTT_URL, which
//! `.ci/run` sets and checks): published readings become searchable Observations, a
//! duplicate publish is stored once, and readings published while the server is down
//! arrive after it restarts (persistent session, acknowledged only after commit).

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::json;

use crate::helpers::{Backend, TestApp, incompressible, json, spawn_with};

const MQTT_ENV: &str = "IOMT_FHIR_TEST_MQTT_URL";

/// host and port of the test broker, or `None` (test skipped) when the variable is unset.
fn broker() -> Option<(String, u16)> {
    let url = match std::env::var(MQTT_ENV) {
        Ok(u) => u,
        Err(_) => {
            eprintln!("skipped: {MQTT_ENV} is not set");
            return None;
        }
    };
    let rest = url.trim_start_matches("mqtt://").trim_end_matches('/');
    let (h, p) = rest.rsplit_once(':').unwrap_or((rest, "1883"));
    Some((h.to_string(), p.parse().unwrap()))
}

/// A publisher's options for the plain test broker.
fn plain(host: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(format!("pub-{}", uuid::Uuid::new_v4()), host, port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Publishes each payload with QoS 1 and waits for every PUBACK.
async fn publish(host: &str, port: u16, topic: &str, payloads: &[String]) {
    publish_with(plain(host, port), topic, payloads).await;
}

/// The server subscribes after it starts; until then a publish reaches nobody, so a first
/// pulse-oximeter reading is published until its SpO2 Observation is found (repeats are
/// harmless). Answers whether it was.
async fn publish_until_found(
    app: &TestApp,
    options: impl Fn() -> MqttOptions,
    topic: &str,
    reading: String,
) -> bool {
    for _ in 0..50 {
        publish_with(options(), topic, std::slice::from_ref(&reading)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = json(app.get("Observation?code=http://loinc.org|2708-6").await).await;
        if b["total"] == 1 {
            return true;
        }
    }
    false
}

async fn publish_with(o: MqttOptions, topic: &str, payloads: &[String]) {
    let (client, mut events) = AsyncClient::new(o, 64);
    for p in payloads {
        client
            .publish(topic, QoS::AtLeastOnce, false, p.clone().into_bytes())
            .await
            .unwrap();
    }
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while acked < payloads.len() {
        let ev = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("PUBACKs in time")
            .expect("broker reachable");
        if let Event::Incoming(Incoming::PubAck(_)) = ev {
            acked += 1;
        }
    }
    let _ = client.disconnect().await;
}

/// Polls a search until its total is `want` (readings arrive asynchronously).
async fn wait_total(app: &TestApp, query: &str, want: i64) {
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        last = json(app.get(query).await).await;
        if last["total"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{query}: expected total {want}, last answer {last}");
}

async fn start(database: &str, host: &str, port: u16, prefix: &str, client_id: &str) -> TestApp {
    let (database, url) = (database.to_string(), format!("mqtt://{host}:{port}"));
    let (topic, client_id) = (format!("{prefix}/+/telemetry"), client_id.to_string());
    spawn_with(Backend::Sqlite, move |a| {
        a.database = Some(database);
        a.mqtt_url = Some(url);
        a.mqtt_topic = vec![topic];
        a.mqtt_client_id = Some(client_id);
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_readings_exactly_once_across_a_restart() {
    let Some((host, port)) = broker() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("iomt-test/{run}");
    let client_id = format!("iomt-fhir-test-{run}");
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}/mqtt.db", dir.path().display());
    let reading = |device: &str, minute: u32, spo2: u32| {
        json!({"type": "pulse-oximeter", "deviceId": device, "time": format!("2024-03-06T10:{minute:02}:00Z"), "spo2": spo2}).to_string()
    };
    let topic = format!("{prefix}/PO-7/telemetry");

    let app = start(&database, &host, port, &prefix, &client_id).await;
    let first = reading("PO-7", 0, 95);
    let arrived = publish_until_found(&app, || plain(&host, port), &topic, first).await;
    assert!(arrived, "no reading arrived over MQTT");
    // The same reading twice more (a redelivery): still one Observation, one version.
    publish(
        &host,
        port,
        &topic,
        &[reading("PO-7", 0, 95), reading("PO-7", 0, 95)],
    )
    .await;
    publish(&host, port, &topic, &[reading("PO-7", 1, 96)]).await;
    wait_total(&app, "Observation?code=http://loinc.org|2708-6", 2).await;
    let first = json(
        app.get("Observation?code=http://loinc.org|2708-6&date=2024-03-06T10:00:00Z")
            .await,
    )
    .await;
    assert_eq!(
        first["entry"][0]["resource"]["meta"]["versionId"], "1",
        "{first}"
    );
    // NDJSON in one PUBLISH, and one unmappable message: a dead letter naming the topic.
    let batch = [
        reading("PO-8", 2, 97),
        "{\"type\": \"mystery\"}".to_string(),
    ]
    .join("\n");
    publish(&host, port, &format!("{prefix}/PO-8/telemetry"), &[batch]).await;
    wait_total(&app, "Observation?code=http://loinc.org|2708-6", 3).await;
    let errors = json(app.get("$device-data/errors").await).await;
    assert_eq!(
        errors["messages"][0]["source"],
        format!("mqtt:{prefix}/PO-8/telemetry")
    );

    // Down: readings published now wait in the broker's session for this client id.
    let _ = app.stop().await;
    publish(
        &host,
        port,
        &topic,
        &[reading("PO-7", 3, 94), reading("PO-7", 4, 93)],
    )
    .await;
    let app = start(&database, &host, port, &prefix, &client_id).await;
    wait_total(&app, "Observation?code=http://loinc.org|2708-6", 5).await;
    // Nothing twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_total(&app, "Observation", 5).await;
    let _ = app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_settings_are_checked_at_start() {
    use iomt_fhir::config::{ServerArgs, Settings};
    let args = |url: &str, topics: Vec<String>| ServerArgs {
        mqtt_url: Some(url.into()),
        mqtt_topic: topics,
        ..ServerArgs::default()
    };
    let e = Settings::resolve(&args("tcp://x:1", vec!["a".into()]), None).unwrap_err();
    assert!(e.contains("mqtt://"), "{e}");
    let e = Settings::resolve(&args("mqtt://127.0.0.1:1883", vec![]), None).unwrap_err();
    assert!(e.contains("--mqtt-topic"), "{e}");
    let e = Settings::resolve(&args("mqtts://127.0.0.1:8883", vec!["a".into()]), None).unwrap_err();
    assert!(e.contains("--mqtt-tls-ca"), "{e}");
    let no_url = ServerArgs {
        mqtt_topic: vec!["a".into()],
        ..ServerArgs::default()
    };
    assert!(
        Settings::resolve(&no_url, None)
            .unwrap_err()
            .contains("--mqtt-url")
    );
}

/// The real binary, SIGKILLed while readings stream in, then restarted: every reading is
/// there exactly once (what was committed but not yet acknowledged comes back from the
/// broker and writes nothing new; what was not committed is redelivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_kill_mid_stream_loses_and_duplicates_nothing() {
    let Some((host, port)) = broker() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}/kill.db", dir.path().display());
    let url = format!("mqtt://{host}:{port}");
    let filter = format!("iomt-kill/{run}/+/telemetry");
    let client_id = format!("iomt-fhir-kill-{run}");
    let start = || {
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_iomt-fhir"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{http}"),
                "--database",
                &database,
            ])
            .args([
                "--mqtt-url",
                &url,
                "--mqtt-topic",
                &filter,
                "--mqtt-client-id",
                &client_id,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (child, format!("http://127.0.0.1:{http}/fhir"))
    };
    let http = reqwest::Client::new();
    let count = |base: String| {
        let http = http.clone();
        async move {
            let v: serde_json::Value = http
                .get(format!("{base}/Observation?_summary=count&_total=accurate"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["total"].as_i64().unwrap()
        }
    };
    let reading = |i: usize| {
        json!({"type": "thermometer", "deviceId": format!("K-{}", i % 10), "time": 1_700_000_000 + i, "temperature": 37.0}).to_string()
    };
    let topic = format!("iomt-kill/{run}/K/telemetry");

    let (mut child, base) = start();
    // The subscription is up once a first reading comes through (repeats are harmless).
    let mut up = false;
    for _ in 0..50 {
        publish(&host, port, &topic, &[reading(0)]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if count(base.clone()).await == 1 {
            up = true;
            break;
        }
    }
    assert!(up, "no reading arrived over MQTT");
    // 600 more readings (Mosquitto's default queue holds 1,000 per client), killed midway.
    let total = 601;
    let (h, t) = (host.clone(), topic.clone());
    let publisher = tokio::spawn(async move {
        for chunk in (1..total).collect::<Vec<_>>().chunks(50) {
            let payloads: Vec<String> = chunk.iter().map(|&i| reading(i)).collect();
            publish(&h, port, &t, &payloads).await;
        }
    });
    let mut seen = 0;
    for _ in 0..500 {
        seen = count(base.clone()).await;
        if seen >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    publisher.await.unwrap();
    assert!(seen >= 100, "readings did not arrive before the kill");
    eprintln!("killed with {seen} of {total} readings seen committed");

    let (mut child, base) = start();
    let mut last = 0;
    for _ in 0..300 {
        last = count(base.clone()).await;
        if last == total as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last, total as i64,
        "readings lost (killed after {seen} had arrived)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(base.clone()).await, total as i64);
    // Redeliveries wrote no new versions: one version per Observation.
    let v: serde_json::Value = http
        .get(format!("{base}/Observation/_history?_count=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], total, "{v}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The subscriber's TLS and login options against a Mosquitto of its own (TLS listener with
/// the test CA's certificate, anonymous access off, one user in a password file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_login() {
    // Runs where the broker tests run (CI sets the variable); needs the mosquitto binaries.
    if broker().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");
    let passwords = dir.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["gateway", "s3cret-pass"])
        .status()
        .expect("mosquitto_passwd (package mosquitto) is needed for the TLS broker test");
    assert!(made.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\ncertfile {tls}/server.pem\nkeyfile {tls}/server.key\n\
             allow_anonymous false\npassword_file {}\npersistence false\n",
            passwords.display()
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto is needed for the TLS broker test");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let url = format!("mqtts://127.0.0.1:{port}");
    let ca = std::path::PathBuf::from(format!("{tls}/ca.pem"));
    let login = |client_id: String, password: &str| iomt_fhir::mqtt::MqttConfig {
        url: url.clone(),
        topics: vec![format!("tls-{run}/+/telemetry")],
        client_id,
        username: Some("gateway".into()),
        password: Some(password.into()),
        tls_ca: Some(ca.clone()),
        batch: 500,
    };
    let server_login = login(format!("iomt-fhir-tls-{run}"), "s3cret-pass");
    let database = format!("sqlite://{}/tls.db", dir.path().display());
    let app = spawn_with(Backend::Sqlite, move |a| {
        a.database = Some(database);
        a.mqtt_url = Some(server_login.url.clone());
        a.mqtt_topic = server_login.topics.clone();
        a.mqtt_client_id = Some(server_login.client_id.clone());
        a.mqtt_username = server_login.username.clone();
        a.mqtt_password = server_login.password.clone();
        a.mqtt_tls_ca = server_login.tls_ca.clone();
    })
    .await
    .unwrap();
    let publisher = || {
        iomt_fhir::mqtt::options(&login(
            format!("pub-{}", uuid::Uuid::new_v4()),
            "s3cret-pass",
        ))
        .unwrap()
    };
    let topic = format!("tls-{run}/PO-9/telemetry");
    let reading = json!({"type": "pulse-oximeter", "deviceId": "PO-9", "time": "2024-03-06T11:00:00Z", "spo2": 98}).to_string();
    let arrived = publish_until_found(&app, publisher, &topic, reading).await;
    let _ = app.stop().await;
    let _ = broker.kill();
    let _ = broker.wait();
    assert!(arrived, "no reading arrived over MQTT with TLS and a login");
}

/// A message that maps but can never be committed must not stall the feed: after a few
/// failed attempts the batch is written message by message, and the one that still fails is
/// kept as a dead letter with the reason. The poison here is real: PostgreSQL cannot index a
/// value over ~2.7 KB (B-tree row size), and this device id is 10,000 incompressible bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_poisoned_message_becomes_a_dead_letter() {
    let Some((host, port)) = broker() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("iomt-poison/{run}");
    let (topic_filter, client_id) = (format!("{prefix}/+/telemetry"), format!("poison-{run}"));
    let url = format!("mqtt://{host}:{port}");
    let Some(app) = spawn_with(Backend::Postgres, move |a| {
        a.mqtt_url = Some(url);
        a.mqtt_topic = vec![topic_filter];
        a.mqtt_client_id = Some(client_id);
    })
    .await
    else {
        return;
    };
    let reading = |device: &str, minute: u32| {
        json!({"type": "pulse-oximeter", "deviceId": device, "time": format!("2024-03-06T12:{minute:02}:00Z"), "spo2": 97}).to_string()
    };
    let poison_id = incompressible(10_000);
    let topic = format!("{prefix}/G-1/telemetry");
    let arrived = publish_until_found(&app, || plain(&host, port), &topic, reading("G-0", 0)).await;
    assert!(arrived, "no reading arrived over MQTT");
    let batch = [reading("G-1", 1), reading(&poison_id, 2), reading("G-2", 3)].join("\n");
    publish(&host, port, &topic, &[batch]).await;
    // The good readings of the poisoned batch arrive; later readings are not held up.
    publish(&host, port, &topic, &[reading("G-3", 4)]).await;
    let mut errors = serde_json::Value::Null;
    for _ in 0..150 {
        errors = json(app.get("$device-data/errors").await).await;
        if errors["messages"].as_array().is_some_and(|m| !m.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_total(&app, "Observation?code=http://loinc.org|2708-6", 4).await;
    let messages = errors["messages"].as_array().expect("dead letters");
    assert_eq!(messages.len(), 1, "{errors}");
    let reason = messages[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("could not be committed"), "{reason}");
    assert_eq!(
        messages[0]["payload"]["deviceId"], poison_id,
        "the message is kept"
    );
    let _ = app.stop().await;
}
