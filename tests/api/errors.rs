//! Every error is an OperationOutcome with the right status; no client input gives a 500.

use serde_json::json;

use crate::helpers::{Backend, TestApp, incompressible, json, spawn_with};

async fn expect(r: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(r.status(), status);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json"),
        "errors are FHIR JSON"
    );
    let oo = json(r).await;
    assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    oo
}

async fn status_codes_and_outcomes(app: &TestApp) {
    expect(app.get("Nonsense/1").await, 404).await;
    expect(app.get("Patient/unknown-id").await, 404).await;
    expect(app.get("Patient/bad$id").await, 400).await;
    expect(
        app.client.post(app.url("Patient/1")).send().await.unwrap(),
        405,
    )
    .await;
    expect(
        app.client.put(app.url("metadata")).send().await.unwrap(),
        405,
    )
    .await;
    expect(app.get("Patient/1/_history/x/y").await, 404).await;
    expect(app.get("not-fhir-at-all").await, 404).await;
    // malformed JSON: 400 naming the position
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\": \"Patient\",")
        .send()
        .await
        .unwrap();
    let oo = expect(r, 400).await;
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("line 1")
    );
    // validation: 422 with one issue per problem and its location
    let bad = json!({"resourceType": "Observation", "code": {"text": "x"}, "valueQuantity": {"value": "high"}});
    let oo = expect(app.post("Observation", &bad).await, 422).await;
    let exprs: Vec<&str> = oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["expression"][0].as_str())
        .collect();
    assert!(exprs.contains(&"Observation.status"), "{oo}");
    assert!(exprs.contains(&"Observation.valueQuantity.value"), "{oo}");
    // the URL decides the type and the id
    expect(
        app.post("Patient", &json!({"resourceType": "Observation"}))
            .await,
        400,
    )
    .await;
    expect(app.post("Patient", &json!({"name": "x"})).await, 400).await;
    expect(app.post("Patient", &json!([1, 2])).await, 400).await;
    expect(
        app.put("Patient/a", &json!({"resourceType": "Patient", "id": "b"}))
            .await,
        400,
    )
    .await;
    expect(
        app.put("Patient/a", &json!({"resourceType": "Patient"}))
            .await,
        400,
    )
    .await;
    // bad references
    let oo = expect(
        app.post("Patient", &json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/"}})).await,
        422,
    )
    .await;
    assert_eq!(
        oo["issue"][0]["expression"][0],
        "Patient.managingOrganization.reference"
    );
    // media types
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", "application/fhir+xml")
        .body("<Patient/>")
        .send()
        .await
        .unwrap();
    expect(r, 415).await;
    let r = app
        .client
        .post(app.url("Patient"))
        .body("{\"resourceType\":\"Patient\"}")
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    expect(r, 415).await;
    // a missing Content-Type is read as JSON
    let r = app
        .client
        .post(app.url("Patient"))
        .body("{\"resourceType\":\"Patient\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // headers
    let r = app
        .client
        .get(app.url("Patient/x"))
        .header("if-modified-since", "last tuesday")
        .send()
        .await
        .unwrap();
    expect(r, 400).await;
    let r = app
        .client
        .put(app.url("Patient/x"))
        .header("if-match", "banana")
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\":\"Patient\",\"id\":\"x\"}")
        .send()
        .await
        .unwrap();
    expect(r, 400).await;
    // meta is server-owned: a client's versionId is replaced
    let r = app.put("Patient/m", &json!({"resourceType": "Patient", "id": "m", "meta": {"versionId": "99", "lastUpdated": "2000-01-01T00:00:00Z", "tag": [{"code": "keep"}]}})).await;
    let v = json(r).await;
    assert_eq!(v["meta"]["versionId"], "1");
    assert_ne!(v["meta"]["lastUpdated"], "2000-01-01T00:00:00Z");
    assert_eq!(v["meta"]["tag"][0]["code"], "keep");
    // hostile input never produces a 500
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", "application/fhir+json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    for body in [
        "null",
        "\"x\"",
        "{}",
        "{\"resourceType\":7}",
        "{\"resourceType\":\"Patient\",\"id\":[]}",
    ] {
        let r = app
            .client
            .post(app.url("Patient"))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
    }
}

/// A search-index value PostgreSQL cannot hold in a B-tree (over ~2.7 KB, incompressible):
/// a 422 that says why, never a 500. SQLite has no such limit and stores it.
async fn over_long_index_values(app: &TestApp) {
    let value = incompressible(10_000);
    let body =
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": value}]});
    let r = app.post("Patient", &body).await;
    if app.database.starts_with("postgres") {
        let oo = expect(r, 422).await;
        let why = oo["issue"][0]["diagnostics"].as_str().unwrap_or_default();
        assert!(why.contains("too long to be indexed"), "{why}");
    } else {
        assert_eq!(r.status(), 201);
        let found = json(app.get(&format!("Patient?identifier=urn:x|{value}")).await).await;
        assert_eq!(found["total"], 1);
    }
}

crate::both_backends!(status_codes_and_outcomes, over_long_index_values);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_is_413() {
    let app = spawn_with(Backend::Sqlite, |a| a.max_body_bytes = Some(1000))
        .await
        .unwrap();
    let big = json!({"resourceType": "Patient", "name": [{"text": "x".repeat(2000)}]});
    expect(app.post("Patient", &big).await, 413).await;
    app.stop().await;
}
