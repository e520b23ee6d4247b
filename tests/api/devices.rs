//! Device telemetry over HTTP (`$device-data`): committed before the 202, searchable,
//! exactly once on redelivery, dead letters kept and replayable, RTLS zones.

use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, json, spawn_with};

async fn post_data(app: &TestApp, body: String, content_type: &str) -> reqwest::Response {
    app.client
        .post(app.url("$device-data"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn total(app: &TestApp, query: &str) -> i64 {
    let b = json(app.get(query).await).await;
    b["total"]
        .as_i64()
        .unwrap_or_else(|| panic!("{query}: {b}"))
}

/// The id of the first resource a search finds.
async fn first_id(app: &TestApp, query: &str) -> String {
    let found = json(app.get(query).await).await;
    found["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{query}: {found}"))
        .to_string()
}

fn ndjson(lines: &[Value]) -> String {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

async fn readings_are_committed_searchable_and_exactly_once(app: &TestApp) {
    // A patient the oximeter names by id, registered beforehand.
    let r = app
        .post(
            "Patient",
            &json!({"resourceType": "Patient", "identifier": [{"system": "urn:iomt-fhir:patient-id", "value": "MRN-1"}]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let patient_id = json(r).await["id"].as_str().unwrap().to_string();

    let batch = ndjson(&[
        json!({"type": "pulse-oximeter", "deviceId": "PO-1", "patientId": "MRN-1", "time": "2024-03-06T10:15:00Z", "spo2": 97, "pulse": 72}),
        json!({"type": "blood-pressure", "deviceId": "BP-1", "time": "2024-03-06T10:16:00Z", "systolic": 121, "diastolic": 79}),
        json!({"type": "no-such-device-type", "deviceId": "X"}),
    ]);
    let r = post_data(app, batch.clone(), "application/x-ndjson").await;
    assert_eq!(r.status(), 202);
    let counts = json(r).await;
    assert_eq!(counts["accepted"], 3, "{counts}");
    assert_eq!(counts["mapped"], 2, "{counts}");
    assert_eq!(counts["rejected"], 1, "{counts}");
    assert_eq!(counts["observations"], 3, "{counts}");
    assert_eq!(counts["withoutPatient"], 1, "{counts}");
    assert_eq!(counts["devicesCreated"], 2, "{counts}");
    assert!(
        counts["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no device mapping template")
    );

    // Searchable right after the 202: LOINC from the MDC ConceptMap, subject from patientId.
    let spo2 = json(app.get("Observation?code=http://loinc.org|2708-6").await).await;
    assert_eq!(spo2["total"], 1, "{spo2}");
    let o = &spo2["entry"][0]["resource"];
    assert_eq!(o["subject"]["reference"], format!("Patient/{patient_id}"));
    assert_eq!(o["valueQuantity"]["value"], 97.0);
    assert_eq!(
        total(app, &format!("Observation?patient={patient_id}")).await,
        2
    );
    assert_eq!(total(app, "Observation?code=http://loinc.org|85354-9&component-code-value-quantity=http://loinc.org|8480-6$121").await, 1);
    assert_eq!(
        total(app, "Device?identifier=urn:iomt-fhir:device-id|PO-1").await,
        1
    );

    // The same batch again (a retried POST, a redelivered MQTT message): nothing new.
    let again = json(post_data(app, batch, "application/x-ndjson").await).await;
    assert_eq!(again["devicesCreated"], 0, "{again}");
    assert_eq!(total(app, "Observation").await, 3);
    let id = o["id"].as_str().unwrap();
    assert_eq!(total(app, &format!("Observation/{id}/_history")).await, 1);

    // A JSON array and a single object work too; a Device that gets a patient passes it on.
    let dev = json(
        app.get("Device?identifier=urn:iomt-fhir:device-id|BP-1")
            .await,
    )
    .await;
    let mut device = dev["entry"][0]["resource"].clone();
    device["patient"] = json!({"reference": format!("Patient/{patient_id}")});
    let device_id = device["id"].as_str().unwrap().to_string();
    assert_eq!(
        app.put(&format!("Device/{device_id}"), &device)
            .await
            .status(),
        200
    );
    let one = json!({"type": "blood-pressure", "deviceId": "BP-1", "time": "2024-03-06T11:16:00Z", "systolic": 118, "diastolic": 77});
    let r = json(post_data(app, one.to_string(), "application/json").await).await;
    assert_eq!(r["withoutPatient"], 0, "{r}");
    let r = json(post_data(app, json!([one]).to_string(), "application/json").await).await;
    assert_eq!(r["mapped"], 1, "{r}");
    assert_eq!(
        total(app, &format!("Observation?patient={patient_id}")).await,
        3
    );

    // The dead letter is listed with its payload and reason.
    let errors = json(app.get("$device-data/errors").await).await;
    let list = errors["messages"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{errors}");
    assert_eq!(list[0]["payload"]["type"], "no-such-device-type");
    assert_eq!(list[0]["source"], "http");
    // Templates are listed, read-only.
    let t = json(app.get("$device-data/templates").await).await;
    assert_eq!(t["templates"].as_array().unwrap().len(), 11);
    assert_eq!(app.get("$device-data").await.status(), 405);
    // Garbage gets a 400, not a 500.
    assert_eq!(
        post_data(app, "".into(), "application/json").await.status(),
        400
    );
    assert_eq!(
        post_data(app, "{\"a\":".into(), "application/json")
            .await
            .status(),
        202
    );
}

async fn rtls_tags_move_devices_between_zone_locations(app: &TestApp) {
    let seen = |zone: &str, at: &str| {
        json!({"type": "rtls", "tagId": "PUMP-7", "zone": zone, "zoneName": format!("Zone {zone}"), "seenAt": at}).to_string()
    };
    assert_eq!(
        post_data(
            app,
            seen("ICU-3", "2024-03-06T10:00:00Z"),
            "application/json"
        )
        .await
        .status(),
        202
    );
    let icu_id = first_id(app, "Location?identifier=urn:iomt-fhir:zone|ICU-3").await;
    assert_eq!(
        total(app, &format!("Device?location=Location/{icu_id}")).await,
        1
    );
    // Seen elsewhere: the pump moves; the zone Location stays one per zone.
    post_data(
        app,
        seen("OR-1", "2024-03-06T10:05:00Z"),
        "application/json",
    )
    .await;
    post_data(
        app,
        seen("OR-1", "2024-03-06T10:06:00Z"),
        "application/json",
    )
    .await;
    assert_eq!(
        total(app, &format!("Device?location=Location/{icu_id}")).await,
        0
    );
    assert_eq!(
        total(app, "Location?identifier=urn:iomt-fhir:zone|OR-1").await,
        1
    );
    let pump = json(
        app.get("Device?identifier=urn:iomt-fhir:device-id|PUMP-7")
            .await,
    )
    .await;
    assert_eq!(
        pump["entry"][0]["resource"]["meta"]["versionId"], "3",
        "{pump}"
    );
}

/// Eight clients at once, each sending readings of the same five devices the server has
/// never seen: every request is committed, and each device is created once.
async fn concurrent_first_sight_creates_each_device_once(app: &TestApp) {
    // Eight requests in flight at once.
    let requests = (0..8u32).map(|client| {
        let lines: Vec<Value> = (0..5)
            .map(|d| {
                json!({"type": "thermometer", "deviceId": format!("NEW-{d}"),
                    "time": format!("2024-03-06T13:{client:02}:0{d}Z"), "temperature": 36.5})
            })
            .collect();
        post_data(app, ndjson(&lines), "application/x-ndjson")
    });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.status(), 202);
    }
    assert_eq!(
        total(app, "Device?identifier=urn:iomt-fhir:device-id|NEW-0,urn:iomt-fhir:device-id|NEW-1,urn:iomt-fhir:device-id|NEW-2,urn:iomt-fhir:device-id|NEW-3,urn:iomt-fhir:device-id|NEW-4").await,
        5
    );
    assert_eq!(
        total(app, "Observation?code=http://loinc.org|8310-5").await,
        40
    );
}

/// A grouped template (`heart-rate-stream`: one Observation per device and hour, a slot per
/// second) merges readings into the stored Observation: out of order, across requests,
/// from concurrent requests, and a redelivery writes no new version.
async fn grouped_readings_build_one_observation_per_hour(app: &TestApp) {
    let hr = |at: &str, bpm: i64| json!({"kind": "heartrate-stream", "device": {"id": "PATCH-1"}, "at": at, "bpm": bpm});
    let batch = ndjson(&[
        hr("2024-03-06T10:00:02Z", 71),
        hr("2024-03-06T10:00:00Z", 70),
        hr("2024-03-06T11:00:00Z", 91),
        hr("2024-03-06T10:00:02Z", 71),
    ]);
    let r = json(post_data(app, batch, "application/x-ndjson").await).await;
    assert_eq!(r["mapped"], 4, "{r}");
    let code = "Observation?code=http://loinc.org|8867-4";
    assert_eq!(total(app, code).await, 2);
    // The 10:00 hour's Observation: its period overlaps 10:30-11:00, the 11:00 one's does not.
    async fn hour(app: &TestApp) -> Value {
        let b = json(
            app.get("Observation?code=http://loinc.org|8867-4&date=ge2024-03-06T10:30:00Z&date=lt2024-03-06T11:00:00Z")
                .await,
        )
        .await;
        assert_eq!(b["total"], 1, "{b}");
        b["entry"][0]["resource"].clone()
    }
    let o = hour(app).await;
    assert_eq!(o["valueSampledData"]["data"], "70 E 71", "{o}");
    assert_eq!(o["effectivePeriod"]["end"], "2024-03-06T11:00:00Z");
    let id = o["id"].as_str().unwrap().to_string();
    assert_eq!(o["meta"]["versionId"], "1");

    // Four concurrent requests fill slots 3..=6: none of them is lost.
    let requests = (3..=6).map(|k| {
        let body = hr(&format!("2024-03-06T10:00:0{k}Z"), 70 + k).to_string();
        post_data(app, body, "application/json")
    });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.status(), 202);
    }
    let o = hour(app).await;
    assert_eq!(o["valueSampledData"]["data"], "70 E 71 73 74 75 76", "{o}");
    assert_eq!(o["id"], id.as_str());
    let version = o["meta"]["versionId"].clone();
    // Redelivering readings already merged writes nothing.
    let again = ndjson(&[
        hr("2024-03-06T10:00:00Z", 70),
        hr("2024-03-06T10:00:05Z", 75),
    ]);
    let r = json(post_data(app, again, "application/x-ndjson").await).await;
    assert_eq!(r["mapped"], 2, "{r}");
    assert_eq!(hour(app).await["meta"]["versionId"], version);
    assert_eq!(total(app, code).await, 2);
}

/// A Device deleted by a client comes back as its next version when its device reports
/// again (it used to be created anew over its own row: a unique violation, a failed batch).
async fn a_deleted_device_comes_back_when_it_reports(app: &TestApp) {
    let reading = |minute: u32| {
        ndjson(&[json!({"type": "thermometer", "deviceId": "GONE-1",
            "time": format!("2024-03-06T14:{minute:02}:00Z"), "temperature": 36.6})])
    };
    let r = post_data(app, reading(0), "application/x-ndjson").await;
    assert_eq!(r.status(), 202);
    let id = first_id(app, "Device?identifier=urn:iomt-fhir:device-id|GONE-1").await;
    assert_eq!(app.delete(&format!("Device/{id}")).await.status(), 204);
    let r = post_data(app, reading(1), "application/x-ndjson").await;
    assert_eq!(r.status(), 202);
    assert_eq!(json(r).await["devicesCreated"], 1);
    let device = json(app.get(&format!("Device/{id}")).await).await;
    assert_eq!(device["meta"]["versionId"], "3", "{device}");
    assert_eq!(
        total(app, &format!("Observation?device=Device/{id}")).await,
        2
    );
}

crate::both_backends!(
    a_deleted_device_comes_back_when_it_reports,
    grouped_readings_build_one_observation_per_hour,
    readings_are_committed_searchable_and_exactly_once,
    rtls_tags_move_devices_between_zone_locations,
    concurrent_first_sight_creates_each_device_once
);

/// Without auto-creation, an unknown device's reading is a dead letter until its Device is
/// registered; the replay then maps it, and it leaves the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_devices_wait_in_dead_letters_until_replayed() {
    let app = spawn_with(Backend::Sqlite, |a| {
        a.devices_auto_create = Some(false);
        a.device_queue = Some(4);
    })
    .await
    .unwrap();
    let msg = json!({"type": "thermometer", "deviceId": "T-9", "time": "2024-03-06T10:15:00Z", "temperature": 38.4});
    let r = json(post_data(&app, msg.to_string(), "application/json").await).await;
    assert_eq!(r["rejected"], 1, "{r}");
    assert!(
        r["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown device")
    );
    assert_eq!(total(&app, "Observation").await, 0);
    let replay = json(
        app.client
            .post(app.url("$device-data/replay"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(replay["replayed"], 1);
    assert_eq!(replay["rejected"], 1);
    // Register the device, replay: mapped, and the dead letter is closed.
    let device = json!({"resourceType": "Device", "identifier": [{"system": "urn:iomt-fhir:device-id", "value": "T-9"}]});
    assert_eq!(app.post("Device", &device).await.status(), 201);
    let replay = json(
        app.client
            .post(app.url("$device-data/replay"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(replay["mapped"], 1, "{replay}");
    assert_eq!(
        total(&app, "Observation?code=http://loinc.org|8310-5").await,
        1
    );
    let open = json(app.get("$device-data/errors").await).await;
    assert_eq!(open["messages"].as_array().unwrap().len(), 0);
    let all = json(app.get("$device-data/errors?replayed=true").await).await;
    assert!(all["messages"][0]["replayedAt"].is_string(), "{all}");
    // More messages in one request than the queue holds: 400.
    let five = ndjson(&vec![msg.clone(); 5]);
    assert_eq!(
        post_data(&app, five, "application/x-ndjson").await.status(),
        400
    );
    app.stop().await;
}

/// A bad template stops the start, naming the file and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_template_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.json"),
        r#"{"name": "b", "match": [{"path": "$.t"}], "deviceId": "$.d", "timestamp": "$.ts",
            "values": [{"name": "v", "path": "$.v"}],
            "observations": [{"code": [{"system": "http://loinc.org", "code": "1-1"}], "value": "w", "unit": {"code": "kg"}}]}"#,
    )
    .unwrap();
    let db = tempfile::tempdir().unwrap();
    let args = iomt_fhir::config::ServerArgs {
        listen: Some("127.0.0.1:0".into()),
        database: Some(format!("sqlite://{}/t.db", db.path().display())),
        device_mappings: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let settings = iomt_fhir::config::Settings::resolve(&args, None).unwrap();
    let e = match iomt_fhir::app::Application::build(settings).await {
        Ok(_) => panic!("started with a broken template"),
        Err(e) => e,
    };
    assert!(
        e.contains("broken.json") && e.contains("observations[0].value"),
        "{e}"
    );
}
