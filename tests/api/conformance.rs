//! The CapabilityStatement (snapshot, schema-valid) and the official R4 examples
//! (stored and read back equal to what was sent).

use std::path::Path;

use serde_json::Value;

use crate::helpers::{TestApp, json};

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fhir-r4/examples-json"
);
const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/snapshots/capability-statement.json"
);
/// The one official example that fails the official schema itself.
const KNOWN_INVALID: &str = "DiagnosticReport-gingival-mass.json";

fn strip_server_meta(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.shift_remove("versionId");
        meta.shift_remove("lastUpdated");
        if meta.is_empty() {
            v.as_object_mut().unwrap().shift_remove("meta");
        }
    }
    v
}

async fn official_examples_round_trip(app: &TestApp) {
    let mut files: Vec<_> = std::fs::read_dir(EXAMPLES)
        .expect("../shared/fhir-r4/examples-json is beside the project")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 715);
    let mut stored = 0;
    for path in &files {
        let sent: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ty = sent["resourceType"].as_str().unwrap().to_string();
        let id = sent["id"].as_str().unwrap().to_string();
        let r = app.put(&format!("{ty}/{id}"), &sent).await;
        let name = path.file_name().unwrap().to_str().unwrap();
        if name == KNOWN_INVALID {
            assert_eq!(r.status(), 422, "{name} fails the official schema");
            continue;
        }
        let status = r.status();
        assert!(
            status == 201 || status == 200,
            "{name}: {status} {}",
            r.text().await.unwrap()
        );
        let back = json(app.get(&format!("{ty}/{id}")).await).await;
        assert_eq!(
            strip_server_meta(back),
            strip_server_meta(sent),
            "{name} reads back as sent"
        );
        stored += 1;
    }
    assert_eq!(stored, 714);
}

async fn capability_statement(app: &TestApp) {
    let r = app.get("metadata").await;
    assert_eq!(r.status(), 200);
    let mut cs = json(r).await;
    // schema-valid, through the server's own validator
    let r = app
        .client
        .post(app.url("CapabilityStatement/$validate"))
        .header("content-type", "application/fhir+json")
        .body(cs.to_string())
        .send()
        .await
        .unwrap();
    let oo = json(r).await;
    assert_eq!(oo["issue"][0]["severity"], "information", "{oo}");
    let rest = &cs["rest"][0];
    assert_eq!(rest["resource"].as_array().unwrap().len(), 146);
    // the snapshot masks what differs per run
    cs["implementation"]["url"] = Value::String("BASE".into());
    let text = serde_json::to_string_pretty(&cs).unwrap() + "\n";
    if std::env::var("UPDATE_SNAPSHOTS").is_ok() {
        std::fs::create_dir_all(Path::new(SNAPSHOT).parent().unwrap()).unwrap();
        std::fs::write(SNAPSHOT, &text).unwrap();
    }
    let expected = std::fs::read_to_string(SNAPSHOT).unwrap();
    assert!(
        expected == text,
        "CapabilityStatement changed; rerun with UPDATE_SNAPSHOTS=1 and review the diff of {SNAPSHOT}"
    );
}

crate::both_backends!(official_examples_round_trip);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_statement_snapshot() {
    let app = crate::helpers::spawn_app(crate::helpers::Backend::Sqlite)
        .await
        .unwrap();
    capability_statement(&app).await;
    app.stop().await;
}
