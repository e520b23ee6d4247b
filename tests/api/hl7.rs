//! HL7 v2 ingestion end to end: `POST $hl7v2` and MLLP over a real TCP socket; the ACK comes
//! after commit, the resources are searchable, a resend writes nothing.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, TestApp, json, spawn_with};

const PHILIPS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/samples/hl7v2/ihe_pcd_tf2_E.1.1_philips_pcd01.hl7"
);
const ACME: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/samples/hl7v2/ihe_pcd_tf2_E.1.2_acme_pcd01.hl7"
);

async fn post_hl7(app: &TestApp, body: Vec<u8>, accept: &str) -> reqwest::Response {
    app.client
        .post(app.url("$hl7v2"))
        .header("content-type", "x-application/hl7-v2+er7")
        .header("accept", accept)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn count(app: &TestApp, query: &str) -> i64 {
    json(
        app.get(&format!(
            "{query}{}_summary=count",
            if query.contains('?') { "&" } else { "?" }
        ))
        .await,
    )
    .await["total"]
        .as_i64()
        .unwrap()
}

async fn pcd01_over_http_is_acknowledged_after_commit_and_idempotent(app: &TestApp) {
    let msg = std::fs::read(PHILIPS).unwrap();
    let r = post_hl7(app, msg.clone(), "x-application/hl7-v2+er7").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("x-application/hl7-v2+er7")
    );
    let ack = r.text().await.unwrap();
    // MSH-15 AL / MSH-16 NE: an enhanced-mode commit acknowledgement
    assert!(
        ack.contains("MSA|CA|HP0122182658686QQ000CND119C0WS61"),
        "{ack}"
    );
    // committed and searchable: heart rate with its LOINC code, BP with components, devices
    assert_eq!(
        count(app, "Observation?code=http://loinc.org|8867-4").await,
        1
    );
    let bp = json(app.get("Observation?code=http://loinc.org|85354-9").await).await;
    assert_eq!(bp["total"], 1);
    assert_eq!(
        bp["entry"][0]["resource"]["component"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let devices = count(app, "Device").await;
    assert!(devices >= 3, "MDS, VMD and channel devices: {devices}");
    let observations = count(app, "Observation").await;
    let patients = count(app, "Patient").await;
    assert_eq!(patients, 1);
    // a resend gets the stored ACK and writes nothing
    let again = post_hl7(app, msg, "x-application/hl7-v2+er7")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(again, ack);
    assert_eq!(count(app, "Observation").await, observations);
    assert_eq!(count(app, "Device").await, devices);
    assert_eq!(
        json(app.get("Observation/_history").await).await["total"],
        observations
    );
    // FHIR clients get an OperationOutcome
    let acme = std::fs::read(ACME).unwrap();
    let r = post_hl7(app, acme, "application/fhir+json").await;
    assert_eq!(r.status(), 200);
    let oo = json(r).await;
    assert_eq!(oo["issue"][0]["severity"], "information", "{oo}");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("Observation/")
    );
    // garbage and unsupported types are rejected with AR, and stored
    let r = post_hl7(app, b"this is not HL7".to_vec(), "x-application/hl7-v2+er7").await;
    assert!(r.text().await.unwrap().contains("MSA|AR"));
    let unsupported = b"MSH|^~\\&|A|B|C|D|20250101000000||QRY^A19|Q1|P|2.5\rQRD|x\r".to_vec();
    let r = post_hl7(app, unsupported, "x-application/hl7-v2+er7").await;
    let text = r.text().await.unwrap();
    assert!(text.contains("MSA|AR|Q1"), "{text}");
    assert!(text.contains("ERR|"), "{text}");
    // a message that maps with an error: AE naming the segment and field
    let no_pid =
        b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20250101000000||ADT^A01|M1|P|2.5\rPV1||I|W^1^2\r".to_vec();
    let text = post_hl7(app, no_pid, "x-application/hl7-v2+er7")
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("MSA|AE|M1"), "{text}");

    // every message is stored with its outcome, and can be listed and replayed
    let all = json(app.get("$hl7v2-messages").await).await;
    let messages = all["messages"].as_array().unwrap();
    // (the resend was answered from the stored row, not stored again)
    assert_eq!(messages.len(), 5, "{all}");
    let outcomes: Vec<&str> = messages
        .iter()
        .map(|m| m["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["AA", "AA", "AR", "AR", "AE"]);
    assert!(messages[0]["resources"].as_array().unwrap().len() > 10);
    let failed = json(app.get("$hl7v2-messages?outcome=AE").await).await;
    assert_eq!(failed["messages"][0]["controlId"], "M1");
    assert!(
        failed["messages"][0]["error"]
            .as_str()
            .unwrap()
            .contains("PID"),
        "{failed}"
    );
    let first_id = messages[0]["id"].as_i64().unwrap();
    let r = app
        .client
        .post(app.url(&format!("$hl7v2-replay?id={first_id}")))
        .send()
        .await
        .unwrap();
    let replayed = json(r).await;
    assert_eq!(replayed["replayed"][0]["duplicate"], true, "{replayed}");
    let r = app
        .client
        .post(app.url("$hl7v2-replay?outcome=AE"))
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["replayed"][0]["ack"], "AE");
    assert_eq!(app.get("$hl7v2-messages?outcome=XX").await.status(), 400);
    assert_eq!(
        app.client
            .post(app.url("$hl7v2-replay"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    // the ConceptMaps the mapping uses are served, read-only
    let map = json(app.get("ConceptMap/mdc-to-loinc").await).await;
    assert_eq!(map["resourceType"], "ConceptMap");
    assert_eq!(map["meta"]["versionId"], "1");
    assert_eq!(app.delete("ConceptMap/mdc-to-loinc").await.status(), 405);
    assert_eq!(
        app.put("ConceptMap/mdc-units-to-ucum", &map).await.status(),
        405
    );
}

/// ADT^A40: the survivor gets a `replaces` link, the prior record becomes inactive with a
/// `replaced-by` link; both are found by identifier, nothing is duplicated on resend.
async fn adt_a40_merges_patients(app: &TestApp) {
    let a01 = |mrn: &str, family: &str, control: &str| {
        format!(
            "MSH|^~\\&|ADT1|GHH|EHR|GHH|20240306080000||ADT^A04|{control}|P|2.5.1\rEVN|A04|20240306080000\rPID|1||{mrn}^^^GHH^MR||{family}^ANN||19700101|F\rPV1|1|O\r"
        )
    };
    for (mrn, family, control) in [("M-1", "SURVIVOR", "C1"), ("M-2", "PRIOR", "C2")] {
        let r = post_hl7(
            app,
            a01(mrn, family, control).into_bytes(),
            "x-application/hl7-v2+er7",
        )
        .await;
        let ack = r.text().await.unwrap();
        assert!(ack.contains("MSA|AA|"), "{ack}");
    }
    let merge = "MSH|^~\\&|ADT1|GHH|EHR|GHH|20240307080000||ADT^A40^ADT_A39|C3|P|2.5.1\rEVN|A40|20240307080000\rPID|1||M-1^^^GHH^MR||SURVIVOR^ANN||19700101|F\rMRG|M-2^^^GHH^MR\r";
    for _ in 0..2 {
        let r = post_hl7(app, merge.as_bytes().to_vec(), "x-application/hl7-v2+er7").await;
        let ack = r.text().await.unwrap();
        assert!(ack.contains("MSA|AA|C3"), "{ack}");
    }
    let find = |mrn: &'static str| async move {
        let b = json(
            app.get(&format!("Patient?identifier=urn:hl7v2:authority:GHH|{mrn}"))
                .await,
        )
        .await;
        assert_eq!(b["total"], 1, "{b}");
        b["entry"][0]["resource"].clone()
    };
    let survivor = find("M-1").await;
    let prior = find("M-2").await;
    let (sid, pid) = (
        survivor["id"].as_str().unwrap(),
        prior["id"].as_str().unwrap(),
    );
    assert_eq!(survivor["link"][0]["type"], "replaces");
    assert_eq!(
        survivor["link"][0]["other"]["reference"],
        format!("Patient/{pid}")
    );
    assert_eq!(prior["active"], false);
    assert_eq!(prior["link"][0]["type"], "replaced-by");
    assert_eq!(
        prior["link"][0]["other"]["reference"],
        format!("Patient/{sid}")
    );
    // The prior record's demographics stay in its history.
    let history = json(app.get(&format!("Patient/{pid}/_history")).await).await;
    assert_eq!(history["total"], 2, "{history}");
    assert_eq!(count(app, &format!("Patient?link=Patient/{pid}")).await, 1);
}

crate::both_backends!(
    pcd01_over_http_is_acknowledged_after_commit_and_idempotent,
    adt_a40_merges_patients
);

/// Reads one framed ACK at a time, keeping bytes that arrived with an earlier one (two
/// ACKs can come in one read).
struct AckReader {
    stream: tokio::net::TcpStream,
    pending: Vec<u8>,
}

impl AckReader {
    fn new(stream: tokio::net::TcpStream) -> Self {
        AckReader {
            stream,
            pending: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn next(&mut self) -> String {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == [0x1c, 0x0d]) {
                let frame: Vec<u8> = self.pending.drain(..end + 2).collect();
                let start = frame.iter().position(|b| *b == 0x0b).map_or(0, |p| p + 1);
                return String::from_utf8_lossy(&frame[start..frame.len() - 2]).to_string();
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed before the ACK");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut v = vec![0x0b];
    v.extend_from_slice(msg);
    v.extend_from_slice(&[0x1c, 0x0d]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mllp_socket_many_messages_bad_frames_and_dropped_connections() {
    let app = spawn_with(Backend::Sqlite, |a| {
        a.mllp_listen = Some("127.0.0.1:0".into())
    })
    .await
    .unwrap();
    let port = app.mllp_port.unwrap();
    let philips = std::fs::read(PHILIPS).unwrap();
    let acme = std::fs::read(ACME).unwrap();

    // two messages in one write on one connection: two ACKs, in order
    let mut s = AckReader::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap(),
    );
    let mut both = framed(&philips);
    both.extend(framed(&acme));
    s.write(&both).await;
    let first = s.next().await;
    let second = s.next().await;
    assert!(
        first.contains("MSA|CA|HP0122182658686QQ000CND119C0WS61"),
        "{first}"
    );
    assert!(second.contains("MSA|CA|"), "{second}");
    // garbage outside a frame gets a NAK, and the connection still works
    s.write(b"garbage").await;
    s.write(&framed(&philips)).await;
    let nak = s.next().await;
    assert!(nak.contains("MSA|AR"), "{nak}");
    let dup = s.next().await;
    assert_eq!(dup, first, "a resend gets the stored ACK");
    drop(s);

    // a connection dropped mid-frame leaves the server healthy
    let mut cut = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    cut.write_all(&framed(&acme)[..40]).await.unwrap();
    drop(cut);

    // concurrent senders
    let mut tasks = Vec::new();
    for i in 0..4 {
        let text = String::from_utf8_lossy(&acme).to_string();
        // a distinct control id per sender
        let control = text.split('|').nth(9).unwrap().to_string();
        let text = text.replacen(&control, &format!("{control}-{i}"), 1);
        tasks.push(tokio::spawn(async move {
            let mut s = AckReader::new(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
            s.write(&framed(text.as_bytes())).await;
            s.next().await
        }));
    }
    for t in tasks {
        let ack = t.await.unwrap();
        assert!(ack.contains("MSA|CA|"), "{ack}");
    }
    let h = json(app.get("Patient?_summary=count").await).await;
    assert!(h["total"].as_i64().unwrap() >= 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hl7_cli_lists_and_replays_stored_messages() {
    let app = spawn_with(Backend::Sqlite, |_| {}).await.unwrap();
    let bad =
        b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20250101000000||ADT^A01|M9|P|2.5\rPV1||I|W^1^2\r".to_vec();
    assert!(
        post_hl7(&app, bad, "x-application/hl7-v2+er7")
            .await
            .text()
            .await
            .unwrap()
            .contains("MSA|AE|M9")
    );
    let database = app.database.clone();
    let _dir = app.stop().await;
    let bin = env!("CARGO_BIN_EXE_iomt-fhir");
    let out = std::process::Command::new(bin)
        .args(["hl7", "list", "--database", &database, "--outcome", "AE"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("\"controlId\":\"M9\""), "{listed}");
    let out = std::process::Command::new(bin)
        .args(["hl7", "replay", "--database", &database, "--outcome", "AE"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("replayed 1 messages"), "{text}");
    assert!(text.contains(": AE"), "{text}");
}

const TLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

/// A TLS client trusting the test CA, presenting the test client certificate if `with_cert`.
fn tls_connector(with_cert: bool) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(format!("{TLS}/ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_cert {
        let certs = CertificateDer::pem_file_iter(format!("{TLS}/client.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(format!("{TLS}/client.key")).unwrap();
        builder.with_client_auth_cert(certs, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// MLLP over TLS with client certificates: a client with a certificate from the configured
/// CA gets its ACK after commit; one without a certificate gets no session at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mllp_over_tls_requires_a_client_certificate() {
    let app = spawn_with(Backend::Sqlite, |a| {
        a.mllp_listen = Some("127.0.0.1:0".into());
        a.mllp_tls_cert = Some(format!("{TLS}/server.pem").into());
        a.mllp_tls_key = Some(format!("{TLS}/server.key").into());
        a.mllp_tls_client_ca = Some(format!("{TLS}/ca.pem").into());
    })
    .await
    .unwrap();
    let port = app.mllp_port.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();

    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut s = tls_connector(true)
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    let msg = std::fs::read(ACME).unwrap();
    let mut framed = vec![0x0b];
    framed.extend_from_slice(&msg);
    framed.extend_from_slice(&[0x1c, 0x0d]);
    s.write_all(&framed).await.unwrap();
    s.flush().await.unwrap();
    let mut ack = Vec::new();
    let mut buf = [0u8; 4096];
    while !ack.ends_with(&[0x1c, 0x0d]) {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before the ACK");
        ack.extend_from_slice(&buf[..n]);
    }
    let ack = String::from_utf8_lossy(&ack);
    assert!(ack.contains("MSA|AA|") || ack.contains("MSA|CA|"), "{ack}");
    assert!(count(&app, "Observation").await > 0);

    // Without a client certificate the handshake (or the first read) fails.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let refused = match tls_connector(false).connect(name, tcp).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(&framed).await;
            let _ = s.flush().await;
            !matches!(
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await,
                Ok(Ok(n)) if n > 0
            )
        }
    };
    assert!(refused, "a client without a certificate was served");
    // Plain MLLP on a TLS port gets no acknowledgement either.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    plain.write_all(&framed).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf)).await;
    assert!(
        !matches!(got, Ok(Ok(n)) if n > 0 && buf[..n].windows(3).any(|w| w == b"MSA")),
        "plain MLLP was answered on the TLS port"
    );
    app.stop().await;
}

/// TLS settings are checked at start-up: a certificate without its key, or a file that
/// holds no certificate, stops the start with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mllp_tls_misconfiguration_stops_the_start() {
    use iomt_fhir::config::{ServerArgs, Settings};
    let dir = tempfile::tempdir().unwrap();
    let base = ServerArgs {
        listen: Some("127.0.0.1:0".into()),
        database: Some(format!("sqlite://{}/t.db", dir.path().display())),
        mllp_listen: Some("127.0.0.1:0".into()),
        ..ServerArgs::default()
    };
    let no_key = ServerArgs {
        mllp_tls_cert: Some(format!("{TLS}/server.pem").into()),
        ..base.clone()
    };
    let e = Settings::resolve(&no_key, None).unwrap_err();
    assert!(e.contains("--mllp-tls-key"), "{e}");

    let wrong = ServerArgs {
        mllp_tls_cert: Some(format!("{TLS}/server.key").into()),
        mllp_tls_key: Some(format!("{TLS}/server.key").into()),
        ..base
    };
    let settings = Settings::resolve(&wrong, None).unwrap();
    let e = match iomt_fhir::app::Application::build(settings).await {
        Ok(_) => panic!("started with a key file as certificate"),
        Err(e) => e,
    };
    assert!(e.contains("server.key") && e.contains("certificate"), "{e}");
}
