//! transaction (atomic, ordered, references rewritten) and batch (independent entries).

use serde_json::{Value, json};

use crate::helpers::{TestApp, json};

async fn count(app: &TestApp, ty: &str) -> i64 {
    json(app.get(&format!("{ty}?_summary=count")).await).await["total"]
        .as_i64()
        .unwrap()
}

async fn transaction_rewrites_references_and_reports_each_entry(app: &TestApp) {
    assert_eq!(
        app.put(
            "Patient/gone",
            &json!({"resourceType": "Patient", "id": "gone"})
        )
        .await
        .status(),
        201
    );
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                "resource": {"resourceType": "Observation", "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": {"reference": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059"}},
                "request": {"method": "POST", "url": "Observation"}
            },
            {
                "fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
                "resource": {"resourceType": "Patient",
                    "identifier": [{"system": "urn:mrn", "value": "tx-1"}]},
                "request": {"method": "POST", "url": "Patient"}
            },
            {
                "resource": {"resourceType": "Device", "id": "monitor-1", "status": "active",
                    "patient": {"reference": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059"}},
                "request": {"method": "PUT", "url": "Device/monitor-1"}
            },
            {"request": {"method": "DELETE", "url": "Patient/gone"}},
            {"request": {"method": "GET", "url": "Device/monitor-1"}}
        ]
    });
    let r = app.post("", &bundle).await;
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(b["type"], "transaction-response");
    let e = b["entry"].as_array().unwrap();
    assert_eq!(e.len(), 5, "one response per entry, in request order");
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert_eq!(e[1]["response"]["status"], "201 Created");
    assert_eq!(e[2]["response"]["status"], "201 Created");
    assert_eq!(e[3]["response"]["status"], "204 No Content");
    assert_eq!(e[4]["response"]["status"], "200 OK");
    assert_eq!(e[0]["response"]["etag"], "W/\"1\"");
    assert!(e[0]["response"]["lastModified"].is_string());
    let obs_loc = e[0]["response"]["location"].as_str().unwrap();
    let pat_loc = e[1]["response"]["location"].as_str().unwrap();
    let patient_ref = pat_loc.split("/_history").next().unwrap();
    // references to the urn:uuid now name the assigned id
    let obs = json(app.get(obs_loc.split("/_history").next().unwrap()).await).await;
    assert_eq!(obs["subject"]["reference"], patient_ref);
    let dev = json(app.get("Device/monitor-1").await).await;
    assert_eq!(dev["patient"]["reference"], patient_ref);
    assert_eq!(app.get("Patient/gone").await.status(), 410);
    // GET entries see the transaction's own writes
    assert_eq!(e[4]["response"]["etag"], "W/\"1\"");
    assert!(e[0].get("resource").is_none(), "minimal by default");
    // Prefer: return=representation puts the stored resources in the response
    let one = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Basic", "code": {"text": "r"}}, "request": {"method": "POST", "url": "Basic"}}]});
    let r = app
        .client
        .post(app.url(""))
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=representation")
        .body(one.to_string())
        .send()
        .await
        .unwrap();
    let b = json(r).await;
    assert_eq!(b["entry"][0]["resource"]["meta"]["versionId"], "1");
    assert_eq!(
        b["entry"][0]["fullUrl"].as_str().unwrap(),
        format!(
            "{}/Basic/{}",
            app.base,
            b["entry"][0]["resource"]["id"].as_str().unwrap()
        )
    );
}

async fn transaction_is_all_or_nothing(app: &TestApp) {
    let before = count(app, "Patient").await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": "x", "gender": "banana"},
             "request": {"method": "PUT", "url": "Patient/x"}}
        ]
    });
    let r = app.post("", &bundle).await;
    assert_eq!(r.status(), 422);
    let oo = json(r).await;
    assert_eq!(oo["issue"][0]["expression"][0], "Patient.gender");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("Bundle.entry[1]")
    );
    // a failure found inside the database transaction rolls back earlier entries too
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": "y"},
             "request": {"method": "PUT", "url": "Patient/y", "ifMatch": "W/\"7\""}}
        ]
    });
    let r = app.post("", &bundle).await;
    assert_eq!(r.status(), 412);
    assert_eq!(
        count(app, "Patient").await,
        before,
        "nothing from a failed transaction is kept"
    );
    // two entries for one resource are refused
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "z"}, "request": {"method": "PUT", "url": "Patient/z"}},
            {"request": {"method": "DELETE", "url": "Patient/z"}}
        ]
    });
    assert_eq!(app.post("", &bundle).await.status(), 400);
    // an unresolvable urn:uuid reference
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"}},
            "request": {"method": "POST", "url": "Observation"}}]
    });
    assert_eq!(app.post("", &bundle).await.status(), 400);
}

async fn transaction_conditional_references_and_creates(app: &TestApp) {
    let p =
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "c-1"}]});
    assert_eq!(app.post("Patient", &p).await.status(), 201);
    let bundle = |value: &str| {
        json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [
                {"fullUrl": "urn:uuid:3f0f3b3c-62f4-4c05-9d39-4d5a2a2d9a01",
                 "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": value}]},
                 "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier=urn:mrn|{value}")}},
                {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                    "subject": {"reference": "urn:uuid:3f0f3b3c-62f4-4c05-9d39-4d5a2a2d9a01"},
                    "performer": [{"reference": "Patient?identifier=urn:mrn|c-1"}]},
                 "request": {"method": "POST", "url": "Observation"}},
                {"resource": {"resourceType": "Encounter", "status": "finished",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "identifier": [{"system": "urn:enc", "value": value}]},
                 "request": {"method": "PUT", "url": format!("Encounter?identifier=urn:enc|{value}")}}
            ]
        })
    };
    let b = json(app.post("", &bundle("c-1")).await).await;
    assert_eq!(
        b["entry"][0]["response"]["status"], "200 OK",
        "ifNoneExist matched: {b}"
    );
    assert_eq!(b["entry"][2]["response"]["status"], "201 Created");
    let existing = b["entry"][0]["response"]["location"]
        .as_str()
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_string();
    let obs_loc = b["entry"][1]["response"]["location"]
        .as_str()
        .unwrap()
        .to_string();
    let obs = json(app.get(&obs_loc).await).await;
    assert_eq!(obs["subject"]["reference"], existing.as_str());
    assert_eq!(obs["performer"][0]["reference"], existing.as_str());
    // run again: idempotent for the conditional parts
    let b = json(app.post("", &bundle("c-1")).await).await;
    assert_eq!(b["entry"][2]["response"]["status"], "200 OK");
    assert_eq!(count(app, "Patient").await, 1);
    assert_eq!(count(app, "Encounter").await, 1);
    // a conditional reference that matches nothing fails the transaction
    let mut bad = bundle("c-2");
    bad["entry"][1]["resource"]["performer"][0]["reference"] =
        json!("Patient?identifier=urn:mrn|nobody");
    assert_eq!(app.post("", &bad).await.status(), 412);
    assert_eq!(count(app, "Patient").await, 1);
}

async fn batch_entries_are_independent(app: &TestApp) {
    let bundle = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "gender": "banana"}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"request": {"method": "GET", "url": "Nonsense/1"}},
            {"request": {"method": "POST"}}
        ]
    });
    let r = app.post("", &bundle).await;
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(b["type"], "batch-response");
    let statuses: Vec<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "201 Created",
            "422 Unprocessable Entity",
            "404 Not Found",
            "404 Not Found",
            "400 Bad Request"
        ]
    );
    assert_eq!(
        b["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(count(app, "Patient").await, 1);
}

async fn bundle_limits(app: &TestApp) {
    let entry = json!({"resource": {"resourceType": "Basic", "code": {"text": "x"}}, "request": {"method": "POST", "url": "Basic"}});
    let entries: Vec<Value> = std::iter::repeat_n(entry, 11).collect();
    let r = app
        .post(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        )
        .await;
    assert_eq!(r.status(), 413);
    let r = app
        .post("", &json!({"resourceType": "Bundle", "type": "collection"}))
        .await;
    assert_eq!(r.status(), 400);
    let r = app.post("", &json!({"resourceType": "Patient"})).await;
    assert_eq!(r.status(), 400);
}

/// Speculation (ids resolved and resources prepared outside the writer, as HL7 v2 ingest
/// does) that another write overtakes before the writer runs: the writer must notice and
/// redo the work, never write what it speculated.
async fn stale_speculation_is_redone(app: &TestApp) {
    use iomt_fhir::interaction::transaction::{plan_bundle, speculate};
    let bundle = |obs: &str, dev: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:5b8d1d3e-0b6f-4c1e-9a51-3c0b7f1e2a10",
             "resource": {"resourceType": "Device", "status": "active",
                "identifier": [{"system": "urn:spec", "value": dev}]},
             "request": {"method": "PUT", "url": format!("Device?identifier=urn:spec|{dev}")}},
            {"fullUrl": "urn:uuid:7c2e4f90-1d3a-4b5c-8e6f-9a0b1c2d3e4f",
             "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                "identifier": [{"system": "urn:spec", "value": obs}],
                "device": {"reference": "urn:uuid:5b8d1d3e-0b6f-4c1e-9a51-3c0b7f1e2a10"}},
             "request": {"method": "PUT", "url": format!("Observation?identifier=urn:spec|{obs}")}}
        ]})
    };
    let found = |q: &'static str| async move { json(app.get(q).await).await };
    assert_eq!(app.post("", &bundle("o1", "d1")).await.status(), 200);
    let d1 = found("Device?identifier=urn:spec|d1").await["entry"][0]["resource"].clone();
    let id = d1["id"].as_str().unwrap().to_string();
    assert_eq!(d1["meta"]["versionId"], "1");

    // 1. Speculated unchanged, then changed by someone else: the writer writes it again.
    let mut planned = plan_bundle(&app.ctx, bundle("o2", "d1")).unwrap();
    speculate(&app.ctx, &mut planned).await;
    let mut changed = d1.clone();
    changed["status"] = json!("inactive");
    assert_eq!(
        app.put(&format!("Device/{id}"), &changed).await.status(),
        200
    );
    commit(app, planned).await;
    let d = json(app.get(&format!("Device/{id}")).await).await;
    assert_eq!(
        (d["status"].as_str(), d["meta"]["versionId"].as_str()),
        (Some("active"), Some("3"))
    );
    let b = found("Device?status=active&identifier=urn:spec|d1").await;
    assert_eq!(b["total"], 1, "indexed as written: {b}");
    assert_eq!(found("Device?status=inactive").await["total"], 0);

    // 2. Speculated new, then created by someone else: the writer uses the existing one.
    let mut planned = plan_bundle(&app.ctx, bundle("o3", "d2")).unwrap();
    speculate(&app.ctx, &mut planned).await;
    let r = app
        .post(
            "Device",
            &json!({"resourceType": "Device", "status": "active",
                "identifier": [{"system": "urn:spec", "value": "d2"}]}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let d2 = json(r).await["id"].as_str().unwrap().to_string();
    commit(app, planned).await;
    assert_eq!(found("Device?identifier=urn:spec|d2").await["total"], 1);
    let o3 = found("Observation?identifier=urn:spec|o3").await;
    assert_eq!(
        o3["entry"][0]["resource"]["device"]["reference"],
        format!("Device/{d2}")
    );
}

async fn commit(app: &TestApp, planned: iomt_fhir::interaction::transaction::Planned) {
    let ctx = app.ctx.clone();
    app.ctx
        .store
        .write(move |db| {
            Box::pin(async move {
                iomt_fhir::interaction::transaction::run_planned(db, &ctx, planned).await
            })
        })
        .await
        .unwrap();
}

/// Three transactions of a DELETE and 6,000 PUTs at once, beside single updates of the
/// same resources.
/// On PostgreSQL each entry's key used to take an advisory lock: 18,000 at once overran
/// the shared lock table (64 x 100 slots by default, with some slack: "out of shared
/// memory", a 500).
async fn large_transactions_beside_small_writes(app: &TestApp) {
    const N: usize = 6000;
    let bundle = |tag: &str| {
        let entry: Vec<Value> = (0..N)
            .map(|i| {
                json!({"resource": {"resourceType": "Patient", "id": format!("big-{tag}-{i}"), "gender": "other"},
                       "request": {"method": "PUT", "url": format!("Patient/big-{tag}-{i}")}})
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entry})
    };
    let (mut a, mut b, mut c) = (bundle("a"), bundle("b"), bundle("c"));
    // A delete first: its lock comes before the 6,000 keys are known together.
    for (bundle, gone) in [
        (&mut a, "big-gone-a"),
        (&mut b, "big-gone-b"),
        (&mut c, "big-gone-c"),
    ] {
        let r = app
            .put(
                &format!("Patient/{gone}"),
                &json!({"resourceType": "Patient", "id": gone}),
            )
            .await;
        assert!(r.status().is_success());
        bundle["entry"].as_array_mut().unwrap().insert(
            0,
            json!({"request": {"method": "DELETE", "url": format!("Patient/{gone}")}}),
        );
    }
    let small = async {
        for i in 0..20 {
            let r = app
                .put(
                    &format!("Patient/big-a-{i}"),
                    &json!({"resourceType": "Patient", "id": format!("big-a-{i}"), "gender": "male"}),
                )
                .await;
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    let (ra, rb, rc, ()) =
        tokio::join!(app.post("", &a), app.post("", &b), app.post("", &c), small);
    for r in [ra, rb, rc] {
        assert_eq!(r.status(), 200);
        let body = json(r).await;
        assert_eq!(body["entry"].as_array().unwrap().len(), N + 1);
    }
    assert_eq!(app.get("Patient/big-gone-a").await.status(), 410);
    assert_eq!(app.get("Patient/big-gone-b").await.status(), 410);
    assert_eq!(app.get("Patient/big-gone-c").await.status(), 410);
    assert_eq!(
        json(app.get("Patient?gender=other,male&_summary=count").await).await["total"],
        3 * N
    );
    // Each single update found its resource created (version 2) or created it first
    // (then the transaction made version 2): never two creates of one id.
    for i in 0..20 {
        let p = json(app.get(&format!("Patient/big-a-{i}")).await).await;
        assert_eq!(p["meta"]["versionId"], "2", "{p}");
    }
}

crate::both_backends!(
    large_transactions_beside_small_writes,
    stale_speculation_is_redone,
    transaction_rewrites_references_and_reports_each_entry,
    transaction_is_all_or_nothing,
    transaction_conditional_references_and_creates,
    batch_entries_are_independent,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bundle_limits() {
    let app = crate::helpers::spawn_with(crate::helpers::Backend::Sqlite, |a| {
        a.max_bundle_entries = Some(10)
    })
    .await
    .unwrap();
    bundle_limits(&app).await;
    app.stop().await;
}
