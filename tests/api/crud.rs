//! create, read, vread, update (If-Match), patch, delete, history, conditional interactions.

use serde_json::{Value, json};

use crate::helpers::{TestApp, json};

fn patient(mrn: &str, family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": mrn}],
        "name": [{"family": family, "given": ["Ann"]}],
        "gender": "female"
    })
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn create_read_update_delete_history(app: &TestApp) {
    // create
    let r = app.post("Patient", &patient("100", "Chalmers")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "etag"), "W/\"1\"");
    assert!(header(&r, "content-type").starts_with("application/fhir+json"));
    let location = header(&r, "location");
    assert!(
        location.starts_with(&format!("{}/Patient/", app.base)),
        "{location}"
    );
    assert!(location.ends_with("/_history/1"), "{location}");
    assert!(!header(&r, "last-modified").is_empty());
    let created = json(r).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["meta"]["versionId"], "1");
    assert_eq!(created["name"][0]["family"], "Chalmers");
    // the body's order starts resourceType, id, meta
    let keys: Vec<&String> = created.as_object().unwrap().keys().collect();
    assert_eq!(keys[..3], ["resourceType", "id", "meta"]);

    // read
    let r = app.get(&format!("Patient/{id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag"), "W/\"1\"");
    let read = json(r).await;
    assert_eq!(read, created);

    // update with the right If-Match
    let mut changed = read.clone();
    changed["gender"] = json!("other");
    let r = app
        .client
        .put(app.url(&format!("Patient/{id}")))
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag"), "W/\"2\"");
    assert_eq!(json(r).await["gender"], "other");

    // update with a stale If-Match: 412, nothing written
    let r = app
        .client
        .put(app.url(&format!("Patient/{id}")))
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(json(r).await["resourceType"], "OperationOutcome");

    // vread the first version
    let r = app.get(&format!("Patient/{id}/_history/1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["gender"], "female");
    assert_eq!(
        app.get(&format!("Patient/{id}/_history/9")).await.status(),
        404
    );

    // delete: a versioned tombstone
    let r = app.delete(&format!("Patient/{id}")).await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "etag"), "W/\"3\"");
    assert_eq!(app.get(&format!("Patient/{id}")).await.status(), 410);
    assert_eq!(
        app.get(&format!("Patient/{id}/_history/3")).await.status(),
        410
    );
    // deleting again is idempotent
    assert_eq!(app.delete(&format!("Patient/{id}")).await.status(), 204);

    // history: newest first, three versions
    let h = json(app.get(&format!("Patient/{id}/_history")).await).await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 3);
    let methods: Vec<&str> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);
    assert!(h["entry"][0].get("resource").is_none());
    assert_eq!(h["entry"][1]["response"]["etag"], "W/\"2\"");

    // re-create after delete through PUT
    let r = app
        .put(
            &format!("Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "etag"), "W/\"4\"");
}

async fn update_as_create_and_client_ids(app: &TestApp) {
    let body = json!({"resourceType": "Device", "id": "pump-7", "status": "active"});
    let r = app.put("Device/pump-7", &body).await;
    assert_eq!(r.status(), 201);
    // the same content again is a no-op: no new version
    let r = app.put("Device/pump-7", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag"), "W/\"1\"");
    let changed = json!({"resourceType": "Device", "id": "pump-7", "status": "inactive"});
    let r = app.put("Device/pump-7", &changed).await;
    assert_eq!(header(&r, "etag"), "W/\"2\"");
    let h = json(app.get("Device/pump-7/_history").await).await;
    assert_eq!(h["total"], 2);
    // reads see every committed version at once (the SQLite read cache never serves stale data)
    for i in 0..20 {
        let body = json!({"resourceType": "Device", "id": "pump-7", "status": "active", "lotNumber": i.to_string()});
        assert!(app.put("Device/pump-7", &body).await.status().is_success());
        let read = json(app.get("Device/pump-7").await).await;
        assert_eq!(read["lotNumber"], i.to_string());
    }
    assert_eq!(app.delete("Device/pump-7").await.status(), 204);
    assert_eq!(app.get("Device/pump-7").await.status(), 410);
    // create ignores a client id and assigns its own
    let r = app.post("Device", &body).await;
    assert_eq!(r.status(), 201);
    assert_ne!(json(r).await["id"], "pump-7");
}

async fn history_type_system_since_and_paging(app: &TestApp) {
    // the server itself stores the terminology ConceptMaps at start-up
    let before = json(app.get("_history").await).await["total"]
        .as_i64()
        .unwrap();
    for i in 0..5 {
        assert_eq!(
            app.post("Observation", &observation(&format!("{i}")))
                .await
                .status(),
            201
        );
    }
    let since = json(app.get("Observation/_history?_count=1").await).await["entry"][0]["response"]
        ["lastModified"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        app.post("Device", &json!({"resourceType": "Device"}))
            .await
            .status(),
        201
    );
    // paging: 2 per page, follow `next` until the end; pages never overlap
    let mut url = app.url("Observation/_history?_count=2");
    let mut seen = Vec::new();
    loop {
        let page = json(app.client.get(&url).send().await.unwrap()).await;
        assert_eq!(page["total"], 5);
        for e in page["entry"].as_array().into_iter().flatten() {
            seen.push(e["fullUrl"].as_str().unwrap().to_string());
        }
        let next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next");
        match next {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    seen.dedup();
    assert_eq!(seen.len(), 5);
    // system history sees both types; _since cuts the older ones
    let all = json(app.get("_history").await).await;
    assert_eq!(all["total"], before + 6);
    let recent = json(app.get(&format!("_history?_since={since}")).await).await;
    assert_eq!(recent["total"], 2);
    assert_eq!(app.get("_history?_since=yesterday").await.status(), 400);
    assert_eq!(app.get("Patient/nope/_history").await.status(), 404);
}

pub fn observation(value: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
        "identifier": [{"system": "urn:test", "value": value}]
    })
}

async fn conditional_create_update_delete(app: &TestApp) {
    let cond = "identifier=urn:oid:1.2.3.4|200";
    let create = |body: Value| {
        app.client
            .post(app.url("Patient"))
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", cond)
            .body(body.to_string())
            .send()
    };
    let r = create(patient("200", "First")).await.unwrap();
    assert_eq!(r.status(), 201);
    let id = json(r).await["id"].as_str().unwrap().to_string();
    // the same condition again: 200 with the existing resource, nothing new
    let r = create(patient("200", "Second")).await.unwrap();
    assert_eq!(r.status(), 200);
    let existing = json(r).await;
    assert_eq!(existing["id"], id.as_str());
    assert_eq!(existing["name"][0]["family"], "First");

    // conditional update of the match
    let r = app
        .put(&format!("Patient?{cond}"), &patient("200", "Updated"))
        .await;
    assert_eq!(r.status(), 200);
    let u = json(r).await;
    assert_eq!(u["id"], id.as_str());
    assert_eq!(u["meta"]["versionId"], "2");
    // conditional update with no match creates
    let r = app
        .put(
            "Patient?identifier=urn:oid:1.2.3.4|201",
            &patient("201", "New"),
        )
        .await;
    assert_eq!(r.status(), 201);
    // string and token equality conditions
    let r = app
        .put(
            "Patient?family=updated&gender=female",
            &patient("200", "Updated2"),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // two matches: 412 for create, update and delete
    assert_eq!(
        app.post("Patient", &patient("300", "Twin")).await.status(),
        201
    );
    assert_eq!(
        app.post("Patient", &patient("300", "Twin")).await.status(),
        201
    );
    let twin = "identifier=urn:oid:1.2.3.4|300";
    let r = app
        .client
        .post(app.url("Patient"))
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", twin)
        .body(patient("300", "Third").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    assert_eq!(
        app.put(&format!("Patient?{twin}"), &patient("300", "X"))
            .await
            .status(),
        412
    );
    assert_eq!(app.delete(&format!("Patient?{twin}")).await.status(), 412);

    // conditional delete of one match; then nothing left to delete
    assert_eq!(app.delete(&format!("Patient?{cond}")).await.status(), 204);
    assert_eq!(app.get(&format!("Patient/{id}")).await.status(), 410);
    assert_eq!(app.delete(&format!("Patient?{cond}")).await.status(), 204);
    // _id as a condition
    assert_eq!(
        app.put(&format!("Patient?_id={id}"), &patient("200", "Back"))
            .await
            .status(),
        201
    );
    // unknown parameters in a condition are refused, not ignored
    let r = app.put("Patient?colour=blue", &patient("1", "X")).await;
    assert_eq!(r.status(), 400);
}

async fn patch_with_json_patch(app: &TestApp) {
    let r = app.post("Patient", &patient("400", "Patchy")).await;
    let id = json(r).await["id"].as_str().unwrap().to_string();
    let send = |body: &'static str, ct: &'static str| {
        app.client
            .patch(app.url(&format!("Patient/{id}")))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = send(
        r#"[{"op":"replace","path":"/gender","value":"male"}]"#,
        "application/json-patch+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let p = json(r).await;
    assert_eq!(p["gender"], "male");
    assert_eq!(p["meta"]["versionId"], "2");
    // a patch producing an invalid resource is refused
    let r = send(
        r#"[{"op":"replace","path":"/gender","value":"banana"}]"#,
        "application/json-patch+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    // a failing test op
    let r = send(
        r#"[{"op":"test","path":"/gender","value":"female"}]"#,
        "application/json-patch+json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    // FHIRPath patch is not supported: 415
    let r = send(r#"{"resourceType":"Parameters"}"#, "application/fhir+json")
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // history records the PATCH
    let h = json(app.get(&format!("Patient/{id}/_history")).await).await;
    assert_eq!(h["entry"][0]["request"]["method"], "PATCH");
}

async fn conditional_read_and_prefer(app: &TestApp) {
    let r = app.post("Patient", &patient("500", "Cache")).await;
    let id = json(r).await["id"].as_str().unwrap().to_string();
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("if-none-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("if-none-match", "W/\"0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let future = "Fri, 01 Jan 2100 00:00:00 GMT";
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("if-modified-since", future)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let past = "Sat, 01 Jan 2000 00:00:00 GMT";
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("if-modified-since", past)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let with_prefer = |p: &'static str| {
        app.client
            .post(app.url("Patient"))
            .header("content-type", "application/fhir+json")
            .header("prefer", p)
            .body(patient("501", "Prefer").to_string())
            .send()
    };
    let r = with_prefer("return=minimal").await.unwrap();
    assert_eq!(r.status(), 201);
    assert!(!header(&r, "location").is_empty());
    assert_eq!(r.text().await.unwrap(), "");
    let r = with_prefer("return=OperationOutcome").await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(json(r).await["resourceType"], "OperationOutcome");
}

async fn summary_elements_pretty_and_formats(app: &TestApp) {
    let mut p = patient("600", "Summary");
    p["text"] = json!({"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Ann</div>"});
    p["photo"] = json!([{"contentType": "image/png", "data": "AAAA"}]);
    let id = json(app.post("Patient", &p).await).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let s = json(app.get(&format!("Patient/{id}?_summary=true")).await).await;
    assert!(s.get("photo").is_none(), "photo is not a summary element");
    assert!(s.get("text").is_none());
    assert_eq!(s["name"][0]["family"], "Summary");
    assert_eq!(s["meta"]["tag"][0]["code"], "SUBSETTED");
    let d = json(app.get(&format!("Patient/{id}?_summary=data")).await).await;
    assert!(d.get("text").is_none() && d.get("photo").is_some());
    let t = json(app.get(&format!("Patient/{id}?_summary=text")).await).await;
    assert!(t.get("text").is_some() && t.get("name").is_none());
    let e = json(app.get(&format!("Patient/{id}?_elements=gender")).await).await;
    assert_eq!(e["gender"], "female");
    assert!(e.get("name").is_none());
    let r = app.get(&format!("Patient/{id}?_pretty=true")).await;
    assert!(r.text().await.unwrap().contains("\n  \"resourceType\""));
    // negotiation
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("application/json"));
    let r = app.get(&format!("Patient/{id}?_format=json")).await;
    assert!(header(&r, "content-type").starts_with("application/fhir+json"));
    let r = app.get(&format!("Patient/{id}?_format=xml")).await;
    assert_eq!(r.status(), 406);
    assert_eq!(json(r).await["resourceType"], "OperationOutcome");
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 406);
    let r = app
        .client
        .get(app.url(&format!("Patient/{id}")))
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // HEAD
    let r = app
        .client
        .head(app.url(&format!("Patient/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "etag"), "W/\"1\"");
}

async fn search_basics(app: &TestApp) {
    for (mrn, fam) in [("700", "Müller"), ("701", "Muller"), ("702", "Smith")] {
        assert_eq!(app.post("Patient", &patient(mrn, fam)).await.status(), 201);
    }
    let b = json(app.get("Patient?family=muller").await).await;
    assert_eq!(b["type"], "searchset");
    assert_eq!(b["total"], 2, "accents and case are folded: {b}");
    let b = json(app.get("Patient?family:exact=Müller").await).await;
    assert_eq!(b["total"], 1);
    let b = json(app.get("Patient?identifier=urn:oid:1.2.3.4|702").await).await;
    assert_eq!(b["total"], 1);
    assert_eq!(b["entry"][0]["search"]["mode"], "match");
    let b = json(app.get("Patient?identifier=700,701&_count=1").await).await;
    assert_eq!(b["total"], 2);
    assert_eq!(b["entry"].as_array().unwrap().len(), 1);
    assert!(
        b["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next")
    );
    let b = json(app.get("Patient?_summary=count").await).await;
    assert_eq!(b["total"], 3);
    assert!(b.get("entry").is_none());
    // unknown parameter: 400 by default, reported in the bundle when lenient
    assert_eq!(app.get("Patient?colour=blue").await.status(), 400);
    let r = app.get_lenient("Patient?colour=blue").await;
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    let outcome = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    assert_eq!(outcome["resource"]["resourceType"], "OperationOutcome");
    // POST _search with a form body
    let r = app
        .client
        .post(app.url("Patient/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("family=smith")
        .send()
        .await
        .unwrap();
    assert_eq!(json(r).await["total"], 1);
}

/// Concurrent read-modify-write with If-Match: every successful update is kept.
async fn no_lost_updates_under_concurrency(app: &TestApp) {
    let body = json!({"resourceType": "Basic", "id": "counter", "code": {"text": "0"}});
    assert_eq!(app.put("Basic/counter", &body).await.status(), 201);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = app.client.clone();
        let url = app.url("Basic/counter");
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 5 {
                let r = client.get(&url).send().await.unwrap();
                let etag = r.headers()["etag"].to_str().unwrap().to_string();
                let mut v: Value = r.json().await.unwrap();
                let n: i64 = v["code"]["text"].as_str().unwrap().parse().unwrap();
                v["code"]["text"] = json!((n + 1).to_string());
                let r = client
                    .put(&url)
                    .header("content-type", "application/fhir+json")
                    .header("if-match", etag)
                    .body(v.to_string())
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => done += 1,
                    412 => {}
                    s => panic!("unexpected status {s}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = json(app.get("Basic/counter").await).await;
    assert_eq!(v["code"]["text"], "40", "every increment survives");
    assert_eq!(v["meta"]["versionId"], "41");
}

crate::both_backends!(
    create_read_update_delete_history,
    update_as_create_and_client_ids,
    history_type_system_since_and_paging,
    conditional_create_update_delete,
    patch_with_json_patch,
    conditional_read_and_prefer,
    summary_elements_pretty_and_formats,
    search_basics,
    no_lost_updates_under_concurrency,
    history_at_validate_and_delete_outcome,
);

async fn history_at_validate_and_delete_outcome(app: &TestApp) {
    let r = app
        .put(
            "Basic/at",
            &json!({"resourceType": "Basic", "id": "at", "code": {"text": "one"}}),
        )
        .await;
    let first_time = json(r).await["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    app.put(
        "Basic/at",
        &json!({"resourceType": "Basic", "id": "at", "code": {"text": "two"}}),
    )
    .await;
    // _at: the version current at that instant
    let h = json(
        app.get(&format!("Basic/at/_history?_at={first_time}"))
            .await,
    )
    .await;
    assert_eq!(h["total"], 1, "{h}");
    assert_eq!(h["entry"][0]["resource"]["code"]["text"], "one");

    // $validate: instance level checks the id; Parameters-wrapped resources work too
    let ok = json!({"resourceType": "Basic", "id": "at", "code": {"text": "x"}});
    let r = app.post("Basic/at/$validate", &ok).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["issue"][0]["severity"], "information");
    let wrong_id = json!({"resourceType": "Basic", "id": "other", "code": {"text": "x"}});
    let oo = json(app.post("Basic/at/$validate", &wrong_id).await).await;
    assert_eq!(oo["issue"][0]["severity"], "error");
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": {"resourceType": "Basic"}}]});
    let oo = json(app.post("Basic/$validate", &params).await).await;
    assert_eq!(oo["issue"][0]["expression"][0], "Basic.code", "{oo}");
    // nothing was stored by $validate
    assert_eq!(json(app.get("Basic/_history").await).await["total"], 2);

    // Prefer: return=OperationOutcome on delete
    let r = app
        .client
        .delete(app.url("Basic/at"))
        .header("prefer", "return=OperationOutcome")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["resourceType"], "OperationOutcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_delete_multiple_mode() {
    use iomt_fhir::interaction::delete::ConditionalDeleteMode;
    let app = crate::helpers::spawn_with(crate::helpers::Backend::Sqlite, |a| {
        a.conditional_delete = Some(ConditionalDeleteMode::Multiple)
    })
    .await
    .unwrap();
    for _ in 0..3 {
        assert_eq!(
            app.post("Patient", &patient("900", "Many")).await.status(),
            201
        );
    }
    assert_eq!(
        app.delete("Patient?identifier=urn:oid:1.2.3.4|900")
            .await
            .status(),
        204
    );
    assert_eq!(
        json(app.get("Patient?_summary=count").await).await["total"],
        0
    );
    let cs = json(app.get("metadata").await).await;
    assert_eq!(
        cs["rest"][0]["resource"][0]["conditionalDelete"],
        "multiple"
    );
    app.stop().await;
}
