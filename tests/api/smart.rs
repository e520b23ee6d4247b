//! SMART on FHIR over real HTTPS (`--auth smart --tls-cert ...`): discovery, SMART Backend
//! Services (client_credentials with RS384 and ES384 client assertions) and every negative
//! case of the assertion, introspection, revocation, and the scope matrix: for each token,
//! exactly which ids each interaction returns.

use std::sync::atomic::{AtomicU64, Ordering};

use iomt_fhir::auth::clients::{Client, Kind};
use iomt_fhir::auth::jwt::sign::Key;
use iomt_fhir::auth::oauth::IssuedToken;
use iomt_fhir::auth::scope;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, fixture, json as body_json, spawn_with, trusting_test_ca};

async fn spawn(backend: Backend) -> Option<TestApp> {
    spawn_with(backend, |a| {
        a.auth = Some(iomt_fhir::auth::Mode::Smart);
        a.tls_cert = Some(fixture("tls/server.pem"));
        a.tls_key = Some(fixture("tls/server.key"));
    })
    .await
}

fn rsa_key() -> Key {
    let pem = std::fs::read_to_string(fixture("jwt/rs384-client.pk8.pem")).unwrap();
    Key::rs384_from_pem(&pem).unwrap()
}

async fn register(app: &TestApp, id: &str, key: &Key, scopes: &str) {
    let client = Client {
        id: id.into(),
        kind: Kind::ConfidentialAsymmetric,
        secret_hash: None,
        jwks: Some(json!({"keys": [key.jwk("key-1")]})),
        jwks_url: None,
        scopes: scope::parse_list(scopes).unwrap(),
        redirect_uris: vec![],
        origins: vec![],
    };
    iomt_fhir::auth::clients::add(&app.ctx.store, client)
        .await
        .unwrap();
}

static JTI: AtomicU64 = AtomicU64::new(0);

fn now() -> i64 {
    iomt_fhir::time::now_micros() / 1_000_000
}

fn token_url(app: &TestApp) -> String {
    format!("{}/auth/token", app.base.trim_end_matches("/fhir"))
}

fn assertion(app: &TestApp, client: &str, key: &Key) -> String {
    let claims = json!({
        "iss": client, "sub": client, "aud": token_url(app),
        "exp": now() + 240,
        "jti": format!("jti-{}", JTI.fetch_add(1, Ordering::Relaxed)),
    });
    key.sign("key-1", &claims, &json!({}))
}

async fn token_request(
    app: &TestApp,
    form: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = app
        .client
        .post(token_url(app))
        .form(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, body_json(r).await, headers)
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A client_credentials token request with `assertion`, for `scope`.
async fn credentials(
    app: &TestApp,
    assertion: &str,
    scope: &str,
) -> (u16, Value, reqwest::header::HeaderMap) {
    token_request(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", scope),
        ],
    )
    .await
}

async fn backend_token(app: &TestApp, client: &str, key: &Key, scope: &str) -> String {
    let a = assertion(app, client, key);
    let (status, body, _) = credentials(app, &a, scope).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

async fn get(app: &TestApp, token: Option<&str>, path: &str) -> (u16, Value) {
    let mut r = app.client.get(app.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn send(
    app: &TestApp,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let r = app
        .client
        .request(method, app.url(path))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn ids(bundle: &Value) -> Vec<String> {
    let mut out: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let r = &e["resource"];
            Some(format!(
                "{}/{}",
                r["resourceType"].as_str()?,
                r["id"].as_str()?
            ))
        })
        .filter(|i| !i.starts_with("OperationOutcome"))
        .collect();
    out.sort();
    out
}

async fn discovery_and_backend_services(app: &TestApp) {
    // Discovery and the CapabilityStatement are open; the API is not.
    let (status, conf) = get(app, None, ".well-known/smart-configuration").await;
    assert_eq!(status, 200);
    assert_eq!(conf["token_endpoint"], token_url(app));
    assert!(
        conf["token_endpoint"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    assert_eq!(conf["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(conf["issuer"], app.base);
    assert!(conf["jwks_uri"].as_str().unwrap().ends_with("/auth/jwks"));
    for cap in [
        "launch-ehr",
        "launch-standalone",
        "client-public",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "permission-v2",
        "context-ehr-patient",
    ] {
        assert!(
            conf["capabilities"]
                .as_array()
                .unwrap()
                .contains(&json!(cap)),
            "{cap}"
        );
    }
    assert!(
        !conf["code_challenge_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("plain"))
    );
    assert!(
        conf["token_endpoint_auth_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("ES384"))
    );
    let (status, cs) = get(app, None, "metadata").await;
    assert_eq!(status, 200);
    let security = &cs["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &security["extension"][0];
    assert_eq!(
        uris["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    let uri = |name: &str| {
        uris["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["url"] == name)
            .map(|x| x["valueUri"].clone())
    };
    assert_eq!(uri("token"), Some(conf["token_endpoint"].clone()));
    assert_eq!(
        uri("authorize"),
        Some(conf["authorization_endpoint"].clone())
    );
    assert_eq!(uri("revoke"), Some(conf["revocation_endpoint"].clone()));
    let r = app.client.get(app.url("Patient")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(get(app, Some("not-a-token"), "Patient").await.0, 401);

    // Both algorithms SMART requires.
    let es = Key::generate_es384().unwrap();
    let rs = rsa_key();
    register(app, "es-client", &es, "system/*.cruds").await;
    register(
        app,
        "rs-client",
        &rs,
        "system/Patient.rs system/Observation.rs",
    )
    .await;
    for (client, key, scope) in [
        ("es-client", &es, "system/*.cruds"),
        ("rs-client", &rs, "system/Patient.rs"),
    ] {
        let a = assertion(app, client, key);
        let (status, body, headers) = credentials(app, &a, scope).await;
        assert_eq!(status, 200, "{client}: {body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], scope);
        assert!(body["expires_in"].as_i64().unwrap() <= 300);
        assert!(body.get("refresh_token").is_none());
        assert_eq!(headers["cache-control"], "no-store");
        assert_eq!(headers["pragma"], "no-cache");
        let t = body["access_token"].as_str().unwrap();
        assert_eq!(get(app, Some(t), "Patient").await.0, 200);
    }
    // Scopes are narrowed to the registration, never widened; nothing left is an error.
    let t = backend_token(
        app,
        "rs-client",
        &rs,
        "system/Patient.rs system/Condition.rs",
    )
    .await;
    let (_, intro) = introspect(app, &t, &t).await;
    assert_eq!(intro["scope"], "system/Patient.rs");
    let a = assertion(app, "rs-client", &rs);
    let (status, body, _) = credentials(app, &a, "system/Condition.rs").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope"))
    );

    // Every way an assertion can be wrong is invalid_client (401).
    let other = Key::generate_es384().unwrap();
    let claims = |f: &dyn Fn(&mut Value)| {
        let mut c = json!({
            "iss": "es-client", "sub": "es-client", "aud": token_url(app),
            "exp": now() + 240,
            "jti": format!("jti-{}", JTI.fetch_add(1, Ordering::Relaxed)),
        });
        f(&mut c);
        c
    };
    let reused = assertion(app, "es-client", &es);
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong signature",
            other.sign("key-1", &claims(&|_| {}), &json!({})),
        ),
        (
            "unknown kid",
            es.sign("key-9", &claims(&|_| {}), &json!({})),
        ),
        (
            "wrong aud",
            es.sign(
                "key-1",
                &claims(&|c| c["aud"] = json!("https://elsewhere/token")),
                &json!({}),
            ),
        ),
        (
            "expired",
            es.sign(
                "key-1",
                &claims(&|c| c["exp"] = json!(now() - 120)),
                &json!({}),
            ),
        ),
        (
            "exp too far",
            es.sign(
                "key-1",
                &claims(&|c| c["exp"] = json!(now() + 3600)),
                &json!({}),
            ),
        ),
        (
            "no exp",
            es.sign(
                "key-1",
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
                &json!({}),
            ),
        ),
        (
            "no jti",
            es.sign(
                "key-1",
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("jti");
                }),
                &json!({}),
            ),
        ),
        (
            "sub differs",
            es.sign(
                "key-1",
                &claims(&|c| c["sub"] = json!("rs-client")),
                &json!({}),
            ),
        ),
        (
            "unregistered",
            es.sign(
                "key-1",
                &claims(&|c| {
                    c["iss"] = json!("nobody");
                    c["sub"] = json!("nobody");
                }),
                &json!({}),
            ),
        ),
        (
            "jku",
            es.sign(
                "key-1",
                &claims(&|_| {}),
                &json!({"jku": "https://attacker/jwks"}),
            ),
        ),
        (
            "alg none",
            es.sign("key-1", &claims(&|_| {}), &json!({"alg": "none"})),
        ),
        (
            "HS256",
            es.sign("key-1", &claims(&|_| {}), &json!({"alg": "HS256"})),
        ),
        ("garbage", "x.y.z".to_string()),
        ("reused jti (first use)", reused.clone()),
    ];
    for (what, a) in &cases {
        let (status, body, _) = credentials(app, a, "system/*.rs").await;
        if *what == "reused jti (first use)" {
            assert_eq!(status, 200, "{what}: {body}");
        } else {
            assert_eq!(
                (status, body["error"].as_str()),
                (401, Some("invalid_client")),
                "{what}: {body}"
            );
        }
    }
    let (status, body, _) = credentials(app, &reused, "system/*.rs").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client")),
        "reused jti: {body}"
    );
    let a = assertion(app, "es-client", &es);
    let (status, body, _) = token_request(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", "urn:other"),
            ("client_assertion", &a),
            ("scope", "system/*.rs"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let (status, body, _) = token_request(app, &[("grant_type", "password")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );

    // The admin API for clients needs system/*.cruds.
    let admin = backend_token(app, "es-client", &es, "system/*.cruds").await;
    let reader = backend_token(app, "rs-client", &rs, "system/Patient.rs").await;
    let clients_url = format!("{}/auth/clients", app.base.trim_end_matches("/fhir"));
    let r = app
        .client
        .get(&clients_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed = body_json(r).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["client_id"] == "es-client")
    );
    let r = app
        .client
        .get(&clients_url)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        app.client.get(&clients_url).send().await.unwrap().status(),
        401
    );
    let new_client = json!({"client_id": "via-api", "kind": "public", "scope": "patient/*.rs launch/patient", "redirect_uris": ["https://x.example/cb"]});
    for expected in [201, 409] {
        let r = app
            .client
            .post(&clients_url)
            .bearer_auth(&admin)
            .json(&new_client)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expected);
    }
    let bad =
        json!({"client_id": "bad", "kind": "confidential-asymmetric", "scope": "system/*.rs"});
    let r = app
        .client
        .post(&clients_url)
        .bearer_auth(&admin)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "an asymmetric client without keys");
    for expected in [204, 404] {
        let r = app
            .client
            .delete(format!("{clients_url}/via-api"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expected);
    }

    // Introspection and revocation.
    let t = backend_token(app, "es-client", &es, "system/*.rs").await;
    let (status, intro) = introspect(app, &t, &t).await;
    assert_eq!(status, 200);
    assert_eq!(intro["active"], true);
    assert_eq!(intro["client_id"], "es-client");
    assert_eq!(intro["scope"], "system/*.rs");
    assert_eq!(
        introspect(app, &t, "bogus").await.1,
        json!({"active": false})
    );
    assert_eq!(introspect(app, "bogus", &t).await.0, 401);
    let r = app
        .client
        .post(format!(
            "{}/auth/revoke",
            app.base.trim_end_matches("/fhir")
        ))
        .bearer_auth(&t)
        .form(&[("token", t.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(app, Some(&t), "Patient").await.0, 401);
    let admin = backend_token(app, "es-client", &es, "system/*.rs").await;
    assert_eq!(
        introspect(app, &admin, &t).await.1,
        json!({"active": false})
    );
}

async fn introspect(app: &TestApp, caller: &str, token: &str) -> (u16, Value) {
    let r = app
        .client
        .post(format!(
            "{}/auth/introspect",
            app.base.trim_end_matches("/fhir")
        ))
        .bearer_auth(caller)
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, body_json(r).await)
}

/// A token with a launch context, stored as the authorization server stores one. (The
/// authorization code flow that issues such tokens to apps is not built yet; the
/// enforcement they meet is the same.)
async fn context_token(app: &TestApp, scope: &str, patient: Option<&str>) -> String {
    let token = iomt_fhir::auth::new_token().unwrap();
    let mut row = IssuedToken::new("access", &token, "app", scope, 3600);
    row.patient = patient.map(str::to_string);
    app.ctx
        .store
        .write(move |db| Box::pin(async move { row.insert(db).await }))
        .await
        .unwrap();
    token
}

fn observation(id: &str, patient: &str, category: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": 70, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
    })
}

async fn scope_matrix(app: &TestApp) {
    let es = Key::generate_es384().unwrap();
    register(app, "loader", &es, "system/*.cruds").await;
    let admin = backend_token(app, "loader", &es, "system/*.cruds").await;
    for p in ["a", "b"] {
        let (s, _) = send(
            app,
            &admin,
            reqwest::Method::PUT,
            &format!("Patient/{p}"),
            &json!({"resourceType": "Patient", "id": p}),
        )
        .await;
        assert_eq!(s, 201);
    }
    for (id, p, cat) in [
        ("a-vital", "a", "vital-signs"),
        ("a-lab", "a", "laboratory"),
        ("b-vital", "b", "vital-signs"),
    ] {
        let (s, _) = send(
            app,
            &admin,
            reqwest::Method::PUT,
            &format!("Observation/{id}"),
            &observation(id, p, cat),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (s, _) = send(
        app,
        &admin,
        reqwest::Method::PUT,
        "Medication/m1",
        &json!({"resourceType": "Medication", "id": "m1"}),
    )
    .await;
    assert_eq!(s, 201);

    let patient_a = context_token(app, "patient/*.rs", Some("a")).await;
    let patient_b = context_token(app, "patient/Observation.rs patient/Patient.r", Some("b")).await;
    let user = context_token(app, "user/Observation.rs user/Patient.rs", None).await;
    let vitals = context_token(app, "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs", Some("a")).await;
    let system_vitals =
        context_token(app, "system/Observation.rs?category=vital-signs", None).await;
    let writer_a = context_token(app, "patient/Observation.cruds", Some("a")).await;

    // The text of a read of something that does not exist, which out-of-reach reads repeat.
    let (_, absent) = get(app, Some(&admin), "Observation/nope").await;
    assert_eq!(
        absent["issue"][0]["diagnostics"],
        "Observation/nope is not known"
    );
    // (token, path, expected status, expected ids for a 200 Bundle / the id of a read)
    let cases: Vec<(&str, &str, &str, u16, Vec<&str>)> = vec![
        (
            "patient A",
            &patient_a,
            "Observation",
            200,
            vec!["Observation/a-lab", "Observation/a-vital"],
        ),
        ("patient A", &patient_a, "Patient", 200, vec!["Patient/a"]),
        (
            "patient A",
            &patient_a,
            "Observation?_include=Observation:subject",
            200,
            vec!["Observation/a-lab", "Observation/a-vital", "Patient/a"],
        ),
        (
            "patient A",
            &patient_a,
            "Patient?_revinclude=Observation:subject",
            200,
            vec!["Observation/a-lab", "Observation/a-vital", "Patient/a"],
        ),
        (
            "patient A",
            &patient_a,
            "Observation/a-vital",
            200,
            vec!["Observation/a-vital"],
        ),
        ("patient A", &patient_a, "Observation/b-vital", 404, vec![]),
        (
            "patient A",
            &patient_a,
            "Observation/b-vital/_history",
            404,
            vec![],
        ),
        (
            "patient A",
            &patient_a,
            "Observation/b-vital/_history/1",
            404,
            vec![],
        ),
        ("patient A", &patient_a, "Patient/b", 404, vec![]),
        (
            "patient A",
            &patient_a,
            "Patient/b/$everything",
            404,
            vec![],
        ),
        (
            "patient A",
            &patient_a,
            "Patient/a/$everything",
            200,
            vec!["Observation/a-lab", "Observation/a-vital", "Patient/a"],
        ),
        (
            "patient A",
            &patient_a,
            "Patient/b/Observation",
            200,
            vec![],
        ),
        (
            "patient A",
            &patient_a,
            "Medication",
            200,
            vec!["Medication/m1"],
        ),
        (
            "patient A",
            &patient_a,
            "Observation?subject=Patient/b",
            200,
            vec![],
        ),
        (
            "patient A",
            &patient_a,
            "Observation/_history",
            200,
            vec!["Observation/a-lab", "Observation/a-vital"],
        ),
        ("patient A", &patient_a, "_history", 403, vec![]),
        (
            "patient B",
            &patient_b,
            "Observation",
            200,
            vec!["Observation/b-vital"],
        ),
        ("patient B", &patient_b, "Patient/b", 200, vec!["Patient/b"]),
        ("patient B", &patient_b, "Patient", 403, vec![]),
        ("patient B", &patient_b, "Medication", 403, vec![]),
        (
            "patient B",
            &patient_b,
            "Observation?_include=Observation:subject",
            200,
            vec!["Observation/b-vital", "Patient/b"],
        ),
        (
            "user",
            &user,
            "Observation",
            200,
            vec![
                "Observation/a-lab",
                "Observation/a-vital",
                "Observation/b-vital",
            ],
        ),
        ("user", &user, "Medication/m1", 403, vec![]),
        (
            "vitals A",
            &vitals,
            "Observation",
            200,
            vec!["Observation/a-vital"],
        ),
        ("vitals A", &vitals, "Observation/a-lab", 404, vec![]),
        (
            "vitals A",
            &vitals,
            "Observation?_include=Observation:subject",
            200,
            vec!["Observation/a-vital"],
        ),
        ("vitals A", &vitals, "Patient/a", 403, vec![]),
        (
            "vitals A",
            &vitals,
            "Patient?_has:Observation:subject:category=laboratory",
            403,
            vec![],
        ),
        (
            "system vitals",
            &system_vitals,
            "Observation",
            200,
            vec!["Observation/a-vital", "Observation/b-vital"],
        ),
        (
            "system vitals",
            &system_vitals,
            "Observation?category=laboratory",
            200,
            vec![],
        ),
        (
            "system vitals",
            &system_vitals,
            "Observation?subject.name=x",
            403,
            vec![],
        ),
        (
            "system vitals",
            &system_vitals,
            "$hl7v2-messages",
            403,
            vec![],
        ),
        (
            "writer A",
            &writer_a,
            "Observation",
            200,
            vec!["Observation/a-lab", "Observation/a-vital"],
        ),
    ];
    for (who, token, path, status, expected) in cases {
        let (s, body) = get(app, Some(token), path).await;
        assert_eq!(s, status, "{who} GET {path}: {body}");
        if status == 404 {
            // Out of reach reads exactly like absent.
            let d = body["issue"][0]["diagnostics"].as_str().unwrap_or("");
            assert!(
                d.ends_with("is not known") || d.contains("has no version"),
                "{who} {path}: {d}"
            );
        }
        if s == 200 {
            let got = if body["resourceType"] == "Bundle" {
                ids(&body)
            } else {
                vec![format!(
                    "{}/{}",
                    body["resourceType"].as_str().unwrap(),
                    body["id"].as_str().unwrap()
                )]
            };
            assert_eq!(got, expected, "{who} GET {path}");
            if body["resourceType"] == "Bundle"
                && body["type"] == "searchset"
                && let Some(total) = body.get("total")
            {
                let matches = body["entry"].as_array().map_or(0, |e| {
                    e.iter().filter(|e| e["search"]["mode"] == "match").count()
                });
                assert_eq!(
                    total.as_u64().unwrap() as usize,
                    matches,
                    "{who} GET {path}: total"
                );
            }
        }
    }
    // Counting cannot see past the scopes either.
    let (_, b) = get(app, Some(&system_vitals), "Observation?_summary=count").await;
    assert!(b.get("total").is_none() || b["total"] == 2, "{b}");
    let (_, b) = get(app, Some(&vitals), "Observation?_summary=count").await;
    assert!(b.get("total").is_none() || b["total"] == 1, "{b}");

    // Writes: inside the compartment only; out of reach looks absent.
    let (s, _) = send(
        app,
        &writer_a,
        reqwest::Method::POST,
        "Observation",
        &observation("x", "a", "vital-signs"),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = send(
        app,
        &writer_a,
        reqwest::Method::POST,
        "Observation",
        &observation("x", "b", "vital-signs"),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = send(
        app,
        &writer_a,
        reqwest::Method::PUT,
        "Observation/b-vital",
        &observation("b-vital", "b", "laboratory"),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = send(
        app,
        &writer_a,
        reqwest::Method::PUT,
        "Observation/a-vital",
        &observation("a-vital", "b", "vital-signs"),
    )
    .await;
    assert_eq!(s, 403, "moving a resource out of the compartment");
    let (s, _) = send(
        app,
        &writer_a,
        reqwest::Method::DELETE,
        "Observation/b-vital",
        &Value::Null,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = send(
        app,
        &patient_a,
        reqwest::Method::POST,
        "Observation",
        &observation("x", "a", "vital-signs"),
    )
    .await;
    assert_eq!(s, 403, "read-only token");
    let (s, _) = send(
        app,
        &writer_a,
        reqwest::Method::PUT,
        "Observation?subject=Patient/b",
        &observation("x", "a", "vital-signs"),
    )
    .await;
    assert_eq!(s, 403, "conditional write under a restricted scope");

    // A conditional read cannot probe what is out of reach.
    for (id, status) in [("b-vital", 404), ("a-vital", 200)] {
        let r = app
            .client
            .get(app.url(&format!("Observation/{id}")))
            .bearer_auth(&patient_a)
            .header("if-none-match", "W/\"1\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "If-None-Match on {id}");
    }
    // JSON Patch under a restricted scope: refused (its result is known only once applied).
    let r = app
        .client
        .patch(app.url("Observation/a-vital"))
        .bearer_auth(&writer_a)
        .header("content-type", "application/json-patch+json")
        .body(
            json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/b"}])
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Batch entries are checked one by one; a transaction needs unrestricted scopes.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation"}},
        {"request": {"method": "GET", "url": "Observation/b-vital"}},
        {"request": {"method": "GET", "url": "Patient/a"}},
    ]});
    let (s, b) = send(app, &vitals, reqwest::Method::POST, "", &batch).await;
    assert_eq!(s, 200, "{b}");
    // a-vital and the vital sign writer A created above; never a-lab or b-vital.
    let got = ids(&b["entry"][0]["resource"]);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains(&"Observation/a-vital".to_string()), "{got:?}");
    assert!(
        b["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("404")
    );
    assert!(
        b["entry"][2]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("403")
    );
    let mut tx = batch.clone();
    tx["type"] = json!("transaction");
    let (s, _) = send(app, &vitals, reqwest::Method::POST, "", &tx).await;
    assert_eq!(s, 403);
    let (s, _) = send(app, &admin, reqwest::Method::POST, "", &tx).await;
    assert_eq!(s, 200);

    // A restricted token's verdict on a resource is remembered per version: a new version
    // is judged again, and each old version keeps its own verdict.
    let put = |cat: &'static str| {
        let admin = admin.clone();
        async move {
            let (s, _) = send(
                app,
                &admin,
                reqwest::Method::PUT,
                "Observation/a-moved",
                &observation("a-moved", "a", cat),
            )
            .await;
            assert!(s == 200 || s == 201, "{s}");
        }
    };
    let vitals = vitals.as_str();
    let status = |path: &'static str| async move { get(app, Some(vitals), path).await.0 };
    put("vital-signs").await;
    for _ in 0..2 {
        assert_eq!(status("Observation/a-moved").await, 200);
    }
    put("laboratory").await;
    for _ in 0..2 {
        assert_eq!(status("Observation/a-moved").await, 404);
        assert_eq!(status("Observation/a-moved/_history/2").await, 404);
        assert_eq!(status("Observation/a-moved/_history/1").await, 200);
    }
    put("vital-signs").await;
    assert_eq!(status("Observation/a-moved").await, 200);
}

macro_rules! smart_tests {
    ($($name:ident),*) => {
        pub mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = super::spawn(super::Backend::Sqlite).await.expect("sqlite");
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
        pub mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(app) = super::spawn(super::Backend::Postgres).await else { return };
                    super::$name(&app).await;
                    app.stop().await;
                }
            )*
        }
    };
}

async fn audit_trail(app: &TestApp) {
    let es = Key::generate_es384().unwrap();
    register(app, "auditor", &es, "system/*.cruds").await;
    let admin = backend_token(app, "auditor", &es, "system/*.cruds").await;
    let narrow = backend_token(app, "auditor", &es, "system/Observation.rs").await;
    send(
        app,
        &admin,
        reqwest::Method::PUT,
        "Patient/p1",
        &json!({"resourceType": "Patient", "id": "p1"}),
    )
    .await;
    assert_eq!(get(app, Some(&admin), "Patient/p1").await.0, 200);
    assert_eq!(get(app, Some(&narrow), "Patient/p1").await.0, 403);
    assert_eq!(get(app, None, "Patient/p1").await.0, 401);
    // The trail is the server's.
    let (s, _) = send(
        app,
        &admin,
        reqwest::Method::POST,
        "AuditEvent",
        &json!({"resourceType": "AuditEvent"}),
    )
    .await;
    assert_eq!(s, 405);
    // Events are written in the background; wait for them.
    let mut events = Vec::new();
    for _ in 0..400 {
        let (s, b) = get(app, Some(&admin), "AuditEvent?entity=Patient/p1&_count=100").await;
        assert_eq!(s, 200, "{b}");
        events = b["entry"].as_array().cloned().unwrap_or_default();
        if events.len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let outcomes: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let r = &e["resource"];
            (
                r["subtype"][0]["code"].as_str().unwrap_or("").to_string(),
                r["outcome"].as_str().unwrap_or("").to_string(),
                r["agent"][0]["who"]["identifier"]["value"]
                    .as_str()
                    .unwrap_or("-")
                    .to_string(),
            )
        })
        .collect();
    for want in [
        ("update", "0", "auditor"),
        ("read", "0", "auditor"),
        ("read", "4", "auditor"),
        ("read", "4", "-"),
    ] {
        assert!(
            outcomes
                .iter()
                .any(|o| (o.0.as_str(), o.1.as_str(), o.2.as_str()) == want),
            "{want:?} not in {outcomes:?}"
        );
    }
    let denied = events
        .iter()
        .find(|e| e["resource"]["agent"][0]["who"]["display"] == "unauthenticated caller")
        .unwrap();
    assert_eq!(
        denied["resource"]["agent"][0]["network"]["address"],
        "127.0.0.1"
    );
    // Searching needs AuditEvent scopes like any type.
    assert_eq!(get(app, Some(&narrow), "AuditEvent").await.0, 403);

    // Many reads at once: coalesced into a few events, and every resource read is in one.
    for i in 0..120 {
        let (s, _) = send(
            app,
            &admin,
            reqwest::Method::PUT,
            &format!("Patient/many-{i}"),
            &json!({"resourceType": "Patient", "id": format!("many-{i}")}),
        )
        .await;
        assert_eq!(s, 201);
    }
    let reads = (0..120).map(|i| {
        let (app, admin) = (&app, &admin);
        async move { get(app, Some(admin), &format!("Patient/many-{i}")).await.0 }
    });
    for s in futures_util::future::join_all(reads).await {
        assert_eq!(s, 200);
    }
    let mut seen = std::collections::HashSet::new();
    let mut read_events = 0;
    for _ in 0..400 {
        let (_, b) = get(
            app,
            Some(&admin),
            "AuditEvent?subtype=read&outcome=0&_count=1000",
        )
        .await;
        seen.clear();
        read_events = 0;
        for e in b["entry"].as_array().into_iter().flatten() {
            let entities = e["resource"]["entity"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mut mine = false;
            for x in entities {
                if let Some(r) = x["what"]["reference"]
                    .as_str()
                    .filter(|r| r.starts_with("Patient/many-"))
                {
                    seen.insert(r.to_string());
                    mine = true;
                }
            }
            read_events += usize::from(mine);
        }
        if seen.len() == 120 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen.len(), 120, "every read is audited");
    assert!(
        read_events < 120,
        "reads waiting together share events ({read_events} events)"
    );

    // The same resources read again and again: each listed once per event.
    for i in 0..3 {
        send(
            app,
            &admin,
            reqwest::Method::PUT,
            &format!("Patient/again-{i}"),
            &json!({"resourceType": "Patient", "id": format!("again-{i}")}),
        )
        .await;
    }
    let reads = (0..150).map(|i| {
        let (app, admin) = (&app, &admin);
        async move {
            get(app, Some(admin), &format!("Patient/again-{}", i % 3))
                .await
                .0
        }
    });
    for s in futures_util::future::join_all(reads).await {
        assert_eq!(s, 200);
    }
    // Each listed once per event, and every one of the 150 requests counted once (in
    // `outcomeDesc`) across the events.
    let (mut mentions, mut requests) = (0, 0);
    for _ in 0..400 {
        let (_, b) = get(
            app,
            Some(&admin),
            "AuditEvent?entity=Patient/again-0,Patient/again-1,Patient/again-2&subtype=read&_count=1000",
        )
        .await;
        let mut found = std::collections::HashSet::new();
        (mentions, requests) = (0, 0);
        for e in b["entry"].as_array().into_iter().flatten() {
            let refs: Vec<&str> = e["resource"]["entity"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["what"]["reference"].as_str())
                .filter(|r| r.starts_with("Patient/again-"))
                .collect();
            let unique: std::collections::HashSet<_> = refs.iter().collect();
            assert_eq!(unique.len(), refs.len(), "listed once per event: {e}");
            mentions += refs.len();
            found.extend(unique.into_iter().map(|r| r.to_string()));
            let desc = e["resource"]["outcomeDesc"].as_str().unwrap_or("");
            requests += match desc.split_once(" read requests") {
                Some((n, _)) => n.parse::<usize>().unwrap(),
                None => 1,
            };
        }
        if found.len() == 3 && requests >= 150 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        (3..150).contains(&mentions),
        "150 reads of 3 resources are listed {mentions} times"
    );
    assert_eq!(requests, 150, "coalesced events count each request once");
}

/// CORS: discovery open to any origin; the API and token endpoint only to registered ones.
async fn cors(app: &TestApp) {
    let es = Key::generate_es384().unwrap();
    let client = Client {
        id: "browser-app".into(),
        kind: Kind::ConfidentialAsymmetric,
        secret_hash: None,
        jwks: Some(json!({"keys": [es.jwk("key-1")]})),
        jwks_url: None,
        scopes: scope::parse_list("system/*.rs").unwrap(),
        redirect_uris: vec![],
        origins: vec!["https://app.example".into()],
    };
    iomt_fhir::auth::clients::add(&app.ctx.store, client)
        .await
        .unwrap();
    let token = backend_token(app, "browser-app", &es, "system/*.rs").await;
    let r = app
        .client
        .get(app.url(".well-known/smart-configuration"))
        .header("origin", "https://anyone.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let r = app
            .client
            .request(reqwest::Method::OPTIONS, app.url("Patient"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
            .await
            .unwrap();
        if allowed {
            assert_eq!(r.status(), 204);
            assert_eq!(r.headers()["access-control-allow-origin"], origin);
            assert!(
                r.headers()["access-control-allow-headers"]
                    .to_str()
                    .unwrap()
                    .contains("Authorization")
            );
        } else {
            assert_eq!(r.status(), 403);
            assert!(r.headers().get("access-control-allow-origin").is_none());
        }
        let r = app
            .client
            .get(app.url("Patient"))
            .bearer_auth(&token)
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string()),
            allowed.then(|| origin.to_string()),
            "{origin}"
        );
    }
}

/// A backend client whose keys live at a JWKS URL (served here on loopback); `jku` only
/// when it names that URL.
async fn jwks_url_client(app: &TestApp) {
    let key = Key::generate_es384().unwrap();
    let set = json!({"keys": [key.jwk("key-1")]});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let router = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let set = set.clone();
            async move { axum::Json(set) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = Client {
        id: "remote-keys".into(),
        kind: Kind::ConfidentialAsymmetric,
        secret_hash: None,
        jwks: None,
        jwks_url: Some(url.clone()),
        scopes: scope::parse_list("system/*.rs").unwrap(),
        redirect_uris: vec![],
        origins: vec![],
    };
    iomt_fhir::auth::clients::add(&app.ctx.store, client)
        .await
        .unwrap();
    let t = backend_token(app, "remote-keys", &key, "system/*.rs").await;
    assert_eq!(get(app, Some(&t), "Patient").await.0, 200);
    for (jku, ok) in [
        (url.as_str(), true),
        ("http://127.0.0.1:1/other.json", false),
    ] {
        let claims = json!({
            "iss": "remote-keys", "sub": "remote-keys", "aud": token_url(app),
            "exp": now() + 60, "jti": format!("jku-{}", JTI.fetch_add(1, Ordering::Relaxed)),
        });
        let a = key.sign("key-1", &claims, &json!({"jku": jku}));
        let (status, body, _) = credentials(app, &a, "system/*.rs").await;
        assert_eq!(status == 200, ok, "jku {jku}: {body}");
    }
    // A key the published set does not have.
    let stranger = Key::generate_es384().unwrap();
    let claims = json!({
        "iss": "remote-keys", "sub": "remote-keys", "aud": token_url(app),
        "exp": now() + 60, "jti": "stranger",
    });
    let (status, body, _) = credentials(
        app,
        &stranger.sign("key-2", &claims, &json!({})),
        "system/*.rs",
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    // Registrations: https, or http on loopback only.
    let bad = Client {
        id: "plain-http".into(),
        kind: Kind::ConfidentialAsymmetric,
        secret_hash: None,
        jwks: None,
        jwks_url: Some("http://keys.example/jwks.json".into()),
        scopes: scope::parse_list("system/*.rs").unwrap(),
        redirect_uris: vec![],
        origins: vec![],
    };
    assert!(
        iomt_fhir::auth::clients::add(&app.ctx.store, bad)
            .await
            .is_err()
    );
}

smart_tests!(
    discovery_and_backend_services,
    scope_matrix,
    audit_trail,
    cors,
    jwks_url_client
);

/// The real binary: `iomt-fhir clients add` registers a backend client, `serve --auth smart`
/// over HTTPS issues it a token, and the token reads data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binary_clients_and_token() {
    use std::process::{Command, Stdio};
    const BIN: &str = env!("CARGO_BIN_EXE_iomt-fhir");
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/smart.db", dir.path().display());
    let key = Key::generate_es384().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [key.jwk("key-1")]}).to_string()).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--database", &db])
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&[
        "clients",
        "add",
        "--client-id",
        "platform",
        "--kind",
        "confidential-asymmetric",
        "--jwks",
        jwks.to_str().unwrap(),
        "--scope",
        "system/*.rs",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = run(&[
        "clients",
        "add",
        "--client-id",
        "platform",
        "--kind",
        "confidential-asymmetric",
        "--jwks",
        jwks.to_str().unwrap(),
        "--scope",
        "system/*.rs",
    ]);
    assert_eq!(code, Some(2), "registering twice: {err}");
    let (code, _, err) = run(&[
        "clients",
        "add",
        "--client-id",
        "bad",
        "--kind",
        "public",
        "--scope",
        "system/Banana",
    ]);
    assert_eq!(code, Some(2), "bad scope: {err}");
    for _ in 0..3 {
        let (code, out, err) = run(&["keys", "rotate"]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.starts_with("new signing key "), "{out}");
    }
    let (_, out, _) = run(&["clients", "list"]);
    let listed: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(listed["client_id"], "platform");
    assert_eq!(listed["scope"], "system/*.rs");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--database",
            &db,
            "--auth",
            "smart",
        ])
        .arg("--tls-cert")
        .arg(fixture("tls/server.pem"))
        .arg("--tls-key")
        .arg(fixture("tls/server.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = trusting_test_ca(reqwest::Client::builder())
        .build()
        .unwrap();
    let origin = format!("https://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if client
            .get(format!("{origin}/fhir/metadata"))
            .send()
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "server did not start");
    let claims = json!({
        "iss": "platform", "sub": "platform", "aud": format!("{origin}/auth/token"),
        "exp": now() + 60, "jti": "only-once",
    });
    let r = client
        .post(format!("{origin}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", &key.sign("key-1", &claims, &json!({}))),
            ("scope", "system/Patient.rs"),
        ])
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = body_json(r).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let r = client
        .get(format!("{origin}/fhir/Patient"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{origin}/fhir/Observation"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Three rotations: the newest two keys are published.
    let jwks: Value = client
        .get(format!("{origin}/auth/jwks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(2), "{jwks}");
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/fhir/metadata")).await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------------------
// Authorization code flow (SMART App Launch), driven like a browser plus an app.

const REDIRECT: &str = "https://app.example/callback";

fn browser() -> reqwest::Client {
    trusting_test_ca(reqwest::Client::builder())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn origin(app: &TestApp) -> String {
    app.base.trim_end_matches("/fhir").to_string()
}

fn hidden_request(html: &str) -> String {
    let at = html
        .find("name=\"request\" value=\"")
        .expect("a sealed request in the form")
        + "name=\"request\" value=\"".len();
    html[at..].split('"').next().unwrap().to_string()
}

/// A PKCE pair: (verifier, S256 challenge).
fn pkce(seed: &str) -> (String, String) {
    let verifier = format!("{seed:-<50}");
    let challenge = s256(&verifier);
    (verifier, challenge)
}

fn query_of(location: &str) -> Vec<(String, String)> {
    let q = location.split_once('?').map_or("", |(_, q)| q);
    iomt_fhir::interaction::parse_query(q)
}

fn q<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
}

/// What the browser ends with: the redirect to the app, or a page.
enum Ended {
    Redirect(Vec<(String, String)>),
    Page(u16, String),
}

/// Authorize → sign in → consent. `params` override the defaults.
async fn browse(
    app: &TestApp,
    overrides: &[(&str, &str)],
    user: (&str, &str),
    patient: Option<&str>,
    decision: &str,
) -> Ended {
    let (_, challenge) = pkce("v");
    let base = app.base.clone();
    let mut params: Vec<(String, String)> = [
        ("response_type", "code"),
        ("client_id", "web-app"),
        ("redirect_uri", REDIRECT),
        ("scope", "launch/patient patient/*.rs offline_access"),
        ("state", "s-123"),
        ("aud", base.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in overrides {
        params.retain(|(x, _)| x != k);
        if !v.is_empty() || *k == "code_challenge" {
            params.push((k.to_string(), v.to_string()));
        }
    }
    let b = browser();
    let r = b
        .get(format!("{}/auth/authorize", origin(app)))
        .query(&params)
        .send()
        .await
        .unwrap();
    if r.status() == 302 {
        return Ended::Redirect(query_of(r.headers()["location"].to_str().unwrap()));
    }
    let status = r.status().as_u16();
    let html = r.text().await.unwrap();
    if status != 200 {
        return Ended::Page(status, html);
    }
    let r = b
        .post(format!("{}/auth/login", origin(app)))
        .form(&[
            ("request", hidden_request(&html).as_str()),
            ("username", user.0),
            ("password", user.1),
        ])
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cookie = r
        .headers()
        .get("set-cookie")
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_string());
    let html = r.text().await.unwrap();
    let Some(cookie) = cookie else {
        return Ended::Page(status, html);
    };
    assert!(html.contains("Allow access?"), "{html}");
    let mut form = vec![
        ("request", hidden_request(&html)),
        ("decision", decision.to_string()),
    ];
    if let Some(p) = patient {
        form.push(("patient", p.to_string()));
    }
    let r = b
        .post(format!("{}/auth/consent", origin(app)))
        .header("cookie", cookie)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302, "consent");
    Ended::Redirect(query_of(r.headers()["location"].to_str().unwrap()))
}

async fn redeem(app: &TestApp, code: &str, verifier: &str) -> (u16, Value) {
    let (status, body, headers) = token_request(
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", "web-app"),
        ],
    )
    .await;
    if status == 200 {
        assert_eq!(headers["cache-control"], "no-store");
    }
    (status, body)
}

async fn code_of(ended: Ended) -> String {
    match ended {
        Ended::Redirect(q) => {
            assert_eq!(self::q(&q, "state"), Some("s-123"), "{q:?}");
            self::q(&q, "code")
                .unwrap_or_else(|| panic!("no code: {q:?}"))
                .to_string()
        }
        Ended::Page(s, html) => panic!("{s}: {html}"),
    }
}

async fn authorization_code_flow(app: &TestApp) {
    let client = Client {
        id: "web-app".into(),
        kind: Kind::Public,
        secret_hash: None,
        jwks: None,
        jwks_url: None,
        scopes: scope::parse_list(
            "openid fhirUser launch launch/patient patient/*.rs user/*.rs offline_access online_access",
        )
        .unwrap(),
        redirect_uris: vec![REDIRECT.into()],
        origins: vec![],
    };
    iomt_fhir::auth::clients::add(&app.ctx.store, client)
        .await
        .unwrap();
    iomt_fhir::auth::users::add(
        &app.ctx.store,
        "dr.house",
        "correct-horse",
        "Practitioner/house",
    )
    .await
    .unwrap();
    iomt_fhir::auth::users::add(&app.ctx.store, "bob", "bob-password", "Patient/b")
        .await
        .unwrap();
    let es = Key::generate_es384().unwrap();
    register(app, "loader2", &es, "system/*.cruds").await;
    let admin = backend_token(app, "loader2", &es, "system/*.cruds").await;
    for p in ["a", "b"] {
        send(
            app,
            &admin,
            reqwest::Method::PUT,
            &format!("Patient/{p}"),
            &json!({"resourceType": "Patient", "id": p, "name": [{"family": p}]}),
        )
        .await;
        send(
            app,
            &admin,
            reqwest::Method::PUT,
            &format!("Observation/{p}-1"),
            &observation(&format!("{p}-1"), p, "vital-signs"),
        )
        .await;
    }
    let (verifier, _) = pkce("v");

    // Standalone launch: the practitioner picks patient a.
    let code =
        code_of(browse(app, &[], ("dr.house", "correct-horse"), Some("a"), "allow").await).await;
    let (status, t) = redeem(app, &code, &verifier).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["patient"], "a");
    assert_eq!(t["need_patient_banner"], true);
    assert_eq!(t["scope"], "launch/patient patient/*.rs offline_access");
    assert!(t["expires_in"].as_i64().unwrap() <= 3600);
    assert!(
        t["smart_style_url"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    let access = t["access_token"].as_str().unwrap().to_string();
    let refresh = t["refresh_token"].as_str().unwrap().to_string();
    let (s, b) = get(app, Some(&access), "Observation").await;
    assert_eq!((s, ids(&b)), (200, vec!["Observation/a-1".to_string()]));
    assert_eq!(get(app, Some(&access), "Observation/b-1").await.0, 404);
    // A code works once.
    assert_eq!(
        redeem(app, &code, &verifier).await.1["error"],
        "invalid_grant"
    );
    let r = browser()
        .get(format!("{}/auth/smart-style.json", origin(app)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Refresh: same scopes, fewer, never more; the refresh token rotates.
    let refresh_with = |token: String, scope: Option<&'static str>| async move {
        let mut form = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", token),
            ("client_id", "web-app".to_string()),
        ];
        if let Some(s) = scope {
            form.push(("scope", s.to_string()));
        }
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (s, b, _) = token_request(app, &form).await;
        (s, b)
    };
    let (s, r1) = refresh_with(refresh.clone(), None).await;
    assert_eq!(s, 200, "{r1}");
    assert_eq!(r1["patient"], "a");
    assert_eq!(r1["scope"], "launch/patient patient/*.rs offline_access");
    let refresh2 = r1["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(refresh2, refresh);
    assert_eq!(
        refresh_with(refresh.clone(), None).await.1["error"],
        "invalid_grant",
        "rotation"
    );
    let (s, r2) = refresh_with(refresh2.clone(), Some("patient/*.rs offline_access")).await;
    assert_eq!(
        (s, r2["scope"].as_str()),
        (200, Some("patient/*.rs offline_access")),
        "{r2}"
    );
    let refresh3 = r2["refresh_token"].as_str().unwrap().to_string();
    let (s, r3) = refresh_with(refresh3, Some("patient/*.rs user/*.rs offline_access")).await;
    assert_eq!(
        (s, r3["error"].as_str()),
        (400, Some("invalid_scope")),
        "never widened"
    );
    assert_eq!(
        refresh_with("bogus".into(), None).await.1["error"],
        "invalid_grant"
    );

    // EHR launch: the handle carries the patient; no banner needed.
    // The EHR mints the handle through the admin API (the CLI does the same).
    let r = app
        .client
        .post(format!("{}/auth/launch", origin(app)))
        .bearer_auth(&admin)
        .json(&json!({"patient": "b", "encounter": "e1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let handle = body_json(r).await["launch"].as_str().unwrap().to_string();
    let code = code_of(
        browse(
            app,
            &[("launch", &handle), ("scope", "launch patient/*.rs")],
            ("dr.house", "correct-horse"),
            None,
            "allow",
        )
        .await,
    )
    .await;
    let (s, t) = redeem(app, &code, &verifier).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        (t["patient"].as_str(), t["need_patient_banner"].as_bool()),
        (Some("b"), Some(false))
    );
    assert_eq!(t["encounter"], "e1");
    assert!(
        t.get("refresh_token").is_none(),
        "no offline_access, no refresh token"
    );
    match browse(
        app,
        &[
            ("launch", "forged-handle"),
            ("scope", "launch patient/*.rs"),
        ],
        ("dr.house", "correct-horse"),
        None,
        "allow",
    )
    .await
    {
        Ended::Redirect(q) => assert_eq!(self::q(&q, "error"), Some("invalid_request")),
        Ended::Page(s, h) => panic!("{s}: {h}"),
    }

    // OpenID Connect: an id_token for the user, signed RS256 with a key from the JWK Set.
    let code = code_of(
        browse(
            app,
            &[
                ("scope", "openid fhirUser launch/patient patient/*.rs"),
                ("nonce", "n-42"),
            ],
            ("dr.house", "correct-horse"),
            Some("a"),
            "allow",
        )
        .await,
    )
    .await;
    let (s, t) = redeem(app, &code, &verifier).await;
    assert_eq!(s, 200, "{t}");
    let id_token = t["id_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no id_token: {t}"));
    let (_, oidc) = get(app, None, ".well-known/openid-configuration").await;
    assert_eq!(oidc["issuer"], app.base);
    let jwks: Value = browser()
        .get(oidc["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let claims = verify_rs256(id_token, &jwks);
    assert_eq!(claims["iss"], app.base);
    assert_eq!(claims["aud"], "web-app");
    assert_eq!(claims["sub"], "Practitioner/house");
    assert_eq!(
        claims["fhirUser"],
        format!("{}/Practitioner/house", app.base)
    );
    assert_eq!(claims["nonce"], "n-42");
    assert!(claims["exp"].as_i64().unwrap() > now());
    let mut forged: Vec<&str> = id_token.split('.').collect();
    use base64::Engine;
    let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"sub": "Practitioner/admin"}).to_string());
    forged[1] = &other;
    assert!(try_verify_rs256(&forged.join("."), &jwks).is_none());

    // A patient user is their own context.
    let code = code_of(browse(app, &[], ("bob", "bob-password"), None, "allow").await).await;
    assert_eq!(redeem(app, &code, &verifier).await.1["patient"], "b");

    // Denied, wrong password.
    match browse(app, &[], ("dr.house", "correct-horse"), Some("a"), "deny").await {
        Ended::Redirect(q) => {
            assert_eq!(
                (self::q(&q, "error"), self::q(&q, "state")),
                (Some("access_denied"), Some("s-123"))
            );
            assert!(self::q(&q, "code").is_none());
        }
        Ended::Page(s, h) => panic!("{s}: {h}"),
    }
    match browse(app, &[], ("dr.house", "wrong-password"), Some("a"), "allow").await {
        Ended::Page(s, html) => assert_eq!(s, 401, "{html}"),
        Ended::Redirect(q) => panic!("{q:?}"),
    }

    // Bad requests: no code ever. Unknown client or redirect_uri: a page, no redirect.
    let (_, plain) = pkce("plain");
    for (what, overrides, error) in [
        (
            "no challenge",
            vec![("code_challenge", "")],
            "invalid_request",
        ),
        (
            "blank challenge",
            vec![("code_challenge", "   ")],
            "invalid_request",
        ),
        (
            "plain method",
            vec![("code_challenge_method", "plain")],
            "invalid_request",
        ),
        (
            "no method",
            vec![("code_challenge_method", "")],
            "invalid_request",
        ),
        (
            "wrong aud",
            vec![("aud", "https://elsewhere/fhir")],
            "invalid_request",
        ),
        ("no aud", vec![("aud", "")], "invalid_request"),
        ("no state", vec![("state", "")], "invalid_request"),
        (
            "token response type",
            vec![("response_type", "token")],
            "unsupported_response_type",
        ),
        (
            "scope not allowed",
            vec![("scope", "system/*.rs")],
            "invalid_scope",
        ),
    ] {
        match browse(
            app,
            &overrides,
            ("dr.house", "correct-horse"),
            Some("a"),
            "allow",
        )
        .await
        {
            Ended::Redirect(q) => {
                assert_eq!(self::q(&q, "error"), Some(error), "{what}: {q:?}");
                assert!(self::q(&q, "code").is_none(), "{what}");
            }
            Ended::Page(s, h) => panic!("{what}: {s} {h}"),
        }
    }
    let _ = plain;
    for (what, overrides) in [
        ("unknown client", vec![("client_id", "nobody")]),
        (
            "redirect_uri not registered",
            vec![("redirect_uri", "https://attacker.example/cb")],
        ),
        (
            "redirect_uri prefix",
            vec![("redirect_uri", "https://app.example/callback/more")],
        ),
    ] {
        match browse(
            app,
            &overrides,
            ("dr.house", "correct-horse"),
            Some("a"),
            "allow",
        )
        .await
        {
            Ended::Page(s, _) => assert_eq!(s, 400, "{what}"),
            Ended::Redirect(q) => panic!("{what} redirected: {q:?}"),
        }
    }
    // PKCE at the token endpoint: a wrong verifier, the challenge itself as verifier.
    let code =
        code_of(browse(app, &[], ("dr.house", "correct-horse"), Some("a"), "allow").await).await;
    assert_eq!(
        redeem(app, &code, &pkce("other").0).await.1["error"],
        "invalid_grant"
    );
    assert_eq!(
        redeem(app, &code, &verifier).await.1["error"],
        "invalid_grant",
        "spent by the failed attempt"
    );
    let (_, challenge) = pkce("v");
    let same = challenge.clone();
    let code = code_of(
        browse(
            app,
            &[("code_challenge", &same)],
            ("dr.house", "correct-horse"),
            Some("a"),
            "allow",
        )
        .await,
    )
    .await;
    assert_eq!(
        redeem(app, &code, &challenge).await.1["error"],
        "invalid_grant",
        "verifier = challenge"
    );
    let code =
        code_of(browse(app, &[], ("dr.house", "correct-horse"), Some("a"), "allow").await).await;
    let (s, b, _) = token_request(
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "https://app.example/other"),
            ("code_verifier", &verifier),
            ("client_id", "web-app"),
        ],
    )
    .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_grant")),
        "redirect_uri differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_flow_sqlite() {
    let app = spawn(Backend::Sqlite).await.unwrap();
    authorization_code_flow(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_flow_postgres() {
    let Some(app) = spawn(Backend::Postgres).await else {
        return;
    };
    authorization_code_flow(&app).await;
    app.stop().await;
}

fn try_verify_rs256(token: &str, jwks: &Value) -> Option<Value> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, sig) = token.rsplit_once('.')?;
    let (h, c) = signed.split_once('.')?;
    let header: Value = serde_json::from_slice(&b64.decode(h).ok()?).ok()?;
    if header["alg"] != "RS256" {
        return None;
    }
    let key = jwks["keys"]
        .as_array()?
        .iter()
        .find(|k| k["kid"] == header["kid"])?;
    let n = b64.decode(key["n"].as_str()?).ok()?;
    let e = b64.decode(key["e"].as_str()?).ok()?;
    ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &b64.decode(sig).ok()?,
        )
        .ok()?;
    serde_json::from_slice(&b64.decode(c).ok()?).ok()
}

fn verify_rs256(token: &str, jwks: &Value) -> Value {
    try_verify_rs256(token, jwks).unwrap_or_else(|| panic!("id_token does not verify: {token}"))
}

/// `--audit-reads false`: successful reads leave no AuditEvent; denials still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reads_off_keeps_denials() {
    let app = spawn_with(Backend::Sqlite, |a| {
        a.auth = Some(iomt_fhir::auth::Mode::Smart);
        a.tls_cert = Some(fixture("tls/server.pem"));
        a.tls_key = Some(fixture("tls/server.key"));
        a.audit_reads = Some(false);
    })
    .await
    .unwrap();
    let es = Key::generate_es384().unwrap();
    register(&app, "quiet", &es, "system/*.cruds").await;
    let admin = backend_token(&app, "quiet", &es, "system/*.cruds").await;
    let narrow = backend_token(&app, "quiet", &es, "system/Observation.rs").await;
    send(
        &app,
        &admin,
        reqwest::Method::PUT,
        "Patient/q",
        &json!({"resourceType": "Patient", "id": "q"}),
    )
    .await;
    assert_eq!(get(&app, Some(&admin), "Patient/q").await.0, 200);
    assert_eq!(get(&app, Some(&narrow), "Patient/q").await.0, 403);
    let events = audit_events(&app, &admin, "AuditEvent?entity=Patient/q", |e| {
        e.len() >= 2
    })
    .await;
    let mut outcomes: Vec<String> = events
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["subtype"][0]["code"].as_str().unwrap_or(""),
                r["outcome"].as_str().unwrap_or("")
            )
        })
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, vec!["read/4", "update/0"]);

    // Requests without a valid token (anyone can send them, as fast as they like) are
    // coalesced: five in a row make one event (two if a write falls between them) that
    // counts them all.
    for _ in 0..5 {
        assert_eq!(get(&app, Some("not-a-token"), "Patient/q").await.0, 401);
    }
    let unauthenticated = |r: &&Value| r["agent"][0]["who"]["display"] == "unauthenticated caller";
    let counted = |events: &[Value]| -> usize {
        events.iter().filter(unauthenticated).map(requests_of).sum()
    };
    let events = audit_events(&app, &admin, "AuditEvent?entity=Patient/q&outcome=4", |e| {
        counted(e) >= 5
    })
    .await;
    let refused: Vec<&Value> = events.iter().filter(unauthenticated).collect();
    let counted = counted(&events);
    assert_eq!(counted, 5, "{refused:?}");
    assert!(refused.len() <= 2, "not coalesced: {refused:?}");
    app.stop().await;
}

/// Token requests at the same time, each with a fresh assertion, all get a token. They
/// share group commits on SQLite; the jti check once counted the rows of another request's
/// statement and refused most of them as replays ("the assertion's jti was already used").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_backend_tokens_all_granted() {
    let app = spawn_with(Backend::Sqlite, |a| {
        a.auth = Some(iomt_fhir::auth::Mode::Smart);
        a.tls_cert = Some(fixture("tls/server.pem"));
        a.tls_key = Some(fixture("tls/server.key"));
    })
    .await
    .unwrap();
    let es = Key::generate_es384().unwrap();
    register(&app, "busy", &es, "system/*.rs").await;
    for _ in 0..5 {
        let requests = (0..16).map(|_| backend_token(&app, "busy", &es, "system/*.rs"));
        let tokens = futures_util::future::join_all(requests).await;
        assert_eq!(tokens.len(), 16);
    }
    app.stop().await;
}

/// Successful reads are counted for a whole `--audit-read-window`: two reads of one
/// resource 1.5 s apart in one window are one event counting two requests (with a window of
/// one second they were two events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_read_window_coalesces_reads() {
    let app = spawn_with(Backend::Sqlite, |a| {
        a.auth = Some(iomt_fhir::auth::Mode::Smart);
        a.tls_cert = Some(fixture("tls/server.pem"));
        a.tls_key = Some(fixture("tls/server.key"));
        a.audit_read_window = Some(4);
    })
    .await
    .unwrap();
    let es = Key::generate_es384().unwrap();
    register(&app, "window", &es, "system/*.cruds").await;
    let admin = backend_token(&app, "window", &es, "system/*.cruds").await;
    send(
        &app,
        &admin,
        reqwest::Method::PUT,
        "Patient/w",
        &json!({"resourceType": "Patient", "id": "w"}),
    )
    .await;
    let query = "AuditEvent?entity=Patient/w&subtype=read";
    let requests = |e: &[Value]| e.iter().map(requests_of).sum::<usize>();
    // The first read after a quiet window is written at the next tick.
    assert_eq!(get(&app, Some(&admin), "Patient/w").await.0, 200);
    let first = audit_events(&app, &admin, query, |e| requests(e) >= 1).await;
    assert_eq!(requests(&first), 1, "{first:?}");
    // The next two fall into the window that began with that write.
    assert_eq!(get(&app, Some(&admin), "Patient/w").await.0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(get(&app, Some(&admin), "Patient/w").await.0, 200);
    let events = audit_events(&app, &admin, query, |e| requests(e) >= 3).await;
    let mut counts: Vec<usize> = events.iter().map(requests_of).collect();
    counts.sort();
    assert_eq!(counts, vec![1, 2], "{events:?}");
    app.stop().await;
}

/// The AuditEvents `query` finds with `token`, searched again (they are written in the
/// background) until `enough` of them are there or twenty seconds have passed.
async fn audit_events(
    app: &TestApp,
    token: &str,
    query: &str,
    enough: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let mut found = Vec::new();
    for _ in 0..200 {
        let (_, b) = get(app, Some(token), query).await;
        found = b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["resource"].clone())
            .collect();
        if enough(&found) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    found
}

/// How many requests an AuditEvent stands for: coalesced ones say so first in
/// `outcomeDesc` ("5 read requests, ..."), a single request's describes it.
fn requests_of(event: &Value) -> usize {
    let desc = event["outcomeDesc"].as_str().unwrap_or_default();
    desc.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// A hospital identity provider on 127.0.0.1 for single sign-on tests: discovery, a JWK
/// Set, an authorization endpoint that signs the user in at once (recording the nonce and
/// PKCE challenge), and a token endpoint that checks the client secret and PKCE verifier and
/// answers an RS256 id_token. `tamper` makes it misbehave in one way.
#[derive(Clone, Default)]
struct Idp {
    issuer: String,
    /// code → (nonce, challenge)
    codes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (String, String)>>>,
    employee: std::sync::Arc<std::sync::Mutex<String>>,
    tamper: std::sync::Arc<std::sync::Mutex<&'static str>>,
}

const IDP_CLIENT: &str = "fhir-server";
const IDP_SECRET: &str = "idp-secret-1";

fn idp_key(kid: &str) -> iomt_fhir::auth::keys::SigningKey {
    use base64::Engine;
    let pem = std::fs::read_to_string(fixture("jwt/rs384-client.pk8.pem")).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    iomt_fhir::auth::keys::SigningKey::from_pkcs8(kid, &der).unwrap()
}

async fn start_idp() -> Idp {
    use axum::extract::{Query, State};
    use axum::routing::{get, post};
    use std::collections::HashMap;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp = Idp {
        issuer: format!("http://{}/realms/staff", listener.local_addr().unwrap()),
        ..Default::default()
    };
    *idp.employee.lock().unwrap() = "E-77".into();
    async fn discovery(State(idp): State<Idp>) -> axum::Json<Value> {
        let i = &idp.issuer;
        axum::Json(json!({
            "issuer": i,
            "authorization_endpoint": format!("{i}/authorize"),
            "token_endpoint": format!("{i}/token"),
            "jwks_uri": format!("{i}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }))
    }
    async fn authorize(
        State(idp): State<Idp>,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        assert_eq!(q["client_id"], IDP_CLIENT);
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["code_challenge_method"], "S256");
        assert!(q["scope"].split(' ').any(|s| s == "openid"), "{q:?}");
        let code = format!("code-{}", JTI.fetch_add(1, Ordering::Relaxed));
        idp.codes.lock().unwrap().insert(
            code.clone(),
            (q["nonce"].clone(), q["code_challenge"].clone()),
        );
        let mut to = form_urlencoded::Serializer::new(format!("{}?", q["redirect_uri"]));
        to.append_pair("code", &code)
            .append_pair("state", &q["state"]);
        axum::response::Response::builder()
            .status(302)
            .header("location", to.finish())
            .body(axum::body::Body::empty())
            .unwrap()
    }
    async fn token(
        State(idp): State<Idp>,
        headers: axum::http::HeaderMap,
        axum::extract::Form(f): axum::extract::Form<HashMap<String, String>>,
    ) -> axum::response::Response {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let basic = format!("Basic {}", b64.encode(format!("{IDP_CLIENT}:{IDP_SECRET}")));
        let deny = |e: &str| {
            (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": e})),
            )
                .into_response()
        };
        if headers.get("authorization").and_then(|h| h.to_str().ok()) != Some(basic.as_str()) {
            return deny("invalid_client");
        }
        let Some((nonce, challenge)) = idp.codes.lock().unwrap().remove(&f["code"]) else {
            return deny("invalid_grant");
        };
        if s256(&f["code_verifier"]) != challenge {
            return deny("invalid_grant");
        }
        let tamper = *idp.tamper.lock().unwrap();
        let claims = json!({
            "iss": if tamper == "issuer" { "https://elsewhere.example" } else { idp.issuer.as_str() },
            "sub": "staff-1029",
            "aud": IDP_CLIENT,
            "iat": now(), "exp": now() + 300,
            "nonce": if tamper == "nonce" { "another-nonce" } else { nonce.as_str() },
            "preferred_username": "g.house",
            "employee_id": *idp.employee.lock().unwrap(),
        });
        let kid = if tamper == "kid" {
            "unpublished"
        } else {
            "idp-1"
        };
        let mut id_token = idp_key(kid).sign(&claims).unwrap();
        if tamper == "signature" {
            // A character in the middle: the last one may carry only padding bits.
            let at = id_token.len() - 20;
            let flip = if &id_token[at..=at] == "A" { "B" } else { "A" };
            id_token.replace_range(at..=at, flip);
        }
        axum::Json(json!({
            "access_token": "idp-access", "token_type": "Bearer", "expires_in": 300,
            "id_token": id_token,
        }))
        .into_response()
    }
    use axum::response::IntoResponse;
    let jwks = json!({"keys": [idp_key("idp-1").jwk]});
    let router = axum::Router::new()
        .route(
            "/realms/staff/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/realms/staff/authorize", get(authorize))
        .route("/realms/staff/token", post(token))
        .route(
            "/realms/staff/jwks",
            get(move || {
                let jwks = jwks.clone();
                async move { axum::Json(jwks) }
            }),
        )
        .with_state(idp.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    idp
}

/// The PKCE S256 challenge of `verifier`.
fn s256(verifier: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The first `Set-Cookie` named `name`: `name=value`.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|c| c.to_str().ok())
        .map(|c| c.split(';').next().unwrap_or("").to_string())
        .find(|c| c.starts_with(&format!("{name}=")) && c.len() > name.len() + 1)
}

/// Authorize → "Sign in with Staff SSO" → the provider → back; the page the server shows
/// then (consent on success), with the session cookie if one was set. `state` replaces the
/// provider's answer's state; `cookie` false drops the pending sign-in cookie.
async fn sso(app: &TestApp, state: Option<&str>, cookie: bool) -> (u16, String, Option<String>) {
    let (_, challenge) = pkce("sso");
    let b = browser();
    let html = b
        .get(format!("{}/auth/authorize", origin(app)))
        .query(&[
            ("response_type", "code"),
            ("client_id", "web-app"),
            ("redirect_uri", REDIRECT),
            ("scope", "openid fhirUser user/*.rs"),
            ("state", "s-123"),
            ("aud", app.base.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = html
        .find("href=\"oidc/start?")
        .unwrap_or_else(|| panic!("no single sign-on link: {html}"))
        + "href=\"".len();
    let link = html[at..].split('"').next().unwrap().replace("&amp;", "&");
    assert!(html.contains("Sign in with Staff SSO"), "{html}");
    let r = b
        .get(format!("{}/auth/{link}", origin(app)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302, "start");
    let pending = set_cookie(&r, "iomt_oidc").expect("the pending sign-in cookie");
    let to_idp = r.headers()["location"].to_str().unwrap().to_string();
    let r = b.get(&to_idp).send().await.unwrap();
    assert_eq!(r.status(), 302, "provider");
    let mut back = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        back.starts_with(&format!("{}/auth/oidc/callback?", origin(app))),
        "{back}"
    );
    if let Some(s) = state {
        let mut pairs = query_of(&back);
        pairs.retain(|(k, _)| k != "state");
        pairs.push(("state".into(), s.into()));
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.extend_pairs(pairs);
        back = format!("{}/auth/oidc/callback?{}", origin(app), q.finish());
    }
    let mut req = b.get(&back);
    if cookie {
        req = req.header("cookie", pending);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let session = set_cookie(&r, "iomt_session");
    (status, r.text().await.unwrap(), session)
}

/// Single sign-on at the hospital's OpenID Connect provider (`--oidc-issuer`): the id_token
/// is checked, its `employee_id` claim finds the Practitioner by identifier, and the app's
/// id_token names that Practitioner; every tampered answer is refused.
async fn single_sign_on(backend: Backend) {
    let idp = start_idp().await;
    let issuer = idp.issuer.clone();
    let Some(app) = spawn_with(backend, |a| {
        a.auth = Some(iomt_fhir::auth::Mode::Smart);
        a.tls_cert = Some(fixture("tls/server.pem"));
        a.tls_key = Some(fixture("tls/server.key"));
        a.oidc_issuer = Some(issuer);
        a.oidc_client_id = Some(IDP_CLIENT.into());
        a.oidc_client_secret = Some(IDP_SECRET.into());
        a.oidc_fhir_user = Some("Practitioner?identifier=urn:oid:1.2.3|{employee_id}".into());
        a.oidc_label = Some("Staff SSO".into());
    })
    .await
    else {
        return;
    };
    let client = Client {
        id: "web-app".into(),
        kind: Kind::Public,
        secret_hash: None,
        jwks: None,
        jwks_url: None,
        scopes: scope::parse_list("openid fhirUser user/*.rs").unwrap(),
        redirect_uris: vec![REDIRECT.into()],
        origins: vec![],
    };
    iomt_fhir::auth::clients::add(&app.ctx.store, client)
        .await
        .unwrap();
    let admin = context_token(&app, "system/*.cruds", None).await;
    for (id, employee) in [
        ("house", "E-77"),
        ("wilson", "E-78"),
        ("twin-1", "E-99"),
        ("twin-2", "E-99"),
    ] {
        let (s, _) = send(
            &app,
            &admin,
            reqwest::Method::PUT,
            &format!("Practitioner/{id}"),
            &json!({"resourceType": "Practitioner", "id": id,
                    "identifier": [{"system": "urn:oid:1.2.3", "value": employee}]}),
        )
        .await;
        assert_eq!(s, 201);
    }

    let (status, html, session) = sso(&app, None, true).await;
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("Signed in as g.house (Practitioner/house)"),
        "{html}"
    );
    let session = session.expect("a session cookie");
    let r = browser()
        .post(format!("{}/auth/consent", origin(&app)))
        .header("cookie", session)
        .form(&[
            ("request", hidden_request(&html).as_str()),
            ("decision", "allow"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let code = code_of(Ended::Redirect(query_of(
        r.headers()["location"].to_str().unwrap(),
    )))
    .await;
    let (verifier, _) = pkce("sso");
    let (s, tokens) = redeem(&app, &code, &verifier).await;
    assert_eq!(s, 200, "{tokens}");
    let jwks: Value = browser()
        .get(format!("{}/auth/jwks", origin(&app)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let claims = verify_rs256(tokens["id_token"].as_str().unwrap(), &jwks);
    assert_eq!(
        claims["fhirUser"],
        format!("{}/Practitioner/house", app.base)
    );

    // Refused: another sign-in's state, no pending cookie, and each tampered id_token.
    let (s, html, _) = sso(&app, Some("forged"), true).await;
    assert_eq!(s, 401, "{html}");
    assert!(html.contains("belongs to another sign-in"), "{html}");
    let (s, html, _) = sso(&app, None, false).await;
    assert_eq!(s, 401, "{html}");
    for tamper in ["nonce", "issuer", "kid", "signature"] {
        *idp.tamper.lock().unwrap() = tamper;
        let (s, html, session) = sso(&app, None, true).await;
        assert_eq!((s, session.is_none()), (401, true), "{tamper}: {html}");
        assert!(html.contains("failed its checks"), "{tamper}: {html}");
    }
    *idp.tamper.lock().unwrap() = "";
    // Claims that find no Practitioner, or two.
    for (employee, why) in [
        ("E-00", "no Practitioner"),
        ("E-99", "several Practitioner"),
    ] {
        *idp.employee.lock().unwrap() = employee.into();
        let (s, html, _) = sso(&app, None, true).await;
        assert_eq!(s, 401, "{html}");
        assert!(html.contains(why), "{employee}: {html}");
    }
    // And back to normal: the provider's keys were fetched again after the failures.
    *idp.employee.lock().unwrap() = "E-78".into();
    let (s, html, _) = sso(&app, None, true).await;
    assert_eq!(s, 200, "{html}");
    assert!(html.contains("(Practitioner/wilson)"), "{html}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sign_on_sqlite() {
    single_sign_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sign_on_postgres() {
    single_sign_on(Backend::Postgres).await;
}
