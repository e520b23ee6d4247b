//! Search (FHIR R4 search.html), data-driven: a fixed set of resources goes in, and each
//! query must return exactly the expected ids, on SQLite and PostgreSQL alike.

use serde_json::{Value, json};

use crate::helpers::{TestApp, json};

fn fixtures() -> Vec<Value> {
    let loinc = |code: &str| json!({"coding": [{"system": "http://loinc.org", "code": code}]});
    let qty = |v: f64, unit: &str| json!({"value": v, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit});
    let vital = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]);
    vec![
        json!({"resourceType": "Organization", "id": "o1", "name": "Acme Health"}),
        json!({"resourceType": "Organization", "id": "o2", "name": "Beta Clinic"}),
        json!({"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Oz"}],
            "meta": {"tag": [{"system": "http://example.org/tags", "code": "vip"}],
                "profile": ["http://example.org/StructureDefinition/special-practitioner"],
                "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
                "source": "http://example.org/ehr#1"}}),
        json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "male",
            "birthDate": "1974-12-25",
            "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
            "identifier": [{"system": "urn:mrn", "value": "m1", "type": {"coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
            "address": [{"city": "Springfield"}],
            "managingOrganization": {"reference": "Organization/o1"}}),
        json!({"resourceType": "Patient", "id": "p2", "gender": "female", "birthDate": "1980-05",
            "name": [{"family": "Chalmers", "given": ["Anne"]}],
            "identifier": [{"system": "urn:mrn", "value": "m2"}, {"system": "urn:mrn", "value": "a,b"}],
            "managingOrganization": {"reference": "Organization/o2"}}),
        json!({"resourceType": "Patient", "id": "p3", "gender": "female", "birthDate": "2001-01-01",
            "name": [{"family": "Smith", "given": ["Zoë"]}]}),
        json!({"resourceType": "Observation", "id": "ob1", "status": "final", "category": vital,
            "code": loinc("8867-4"), "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/pr1"}],
            "effectiveDateTime": "2019-03-01T10:00:00Z", "valueQuantity": qty(72.0, "/min")}),
        json!({"resourceType": "Observation", "id": "ob2", "status": "final", "code": loinc("8867-4"),
            "subject": {"reference": "Patient/p1", "identifier": {"system": "urn:mrn", "value": "m1"}},
            "effectiveDateTime": "2018-06-01T10:00:00Z", "valueQuantity": qty(110.0, "/min")}),
        json!({"resourceType": "Observation", "id": "ob3", "status": "final", "code": loinc("8480-6"),
            "subject": {"reference": "Patient/p2"},
            "effectiveDateTime": "2020-01-01", "valueQuantity": qty(150.0, "mm[Hg]"),
            "component": [
                {"code": loinc("8480-6"), "valueQuantity": qty(150.0, "mm[Hg]")},
                {"code": loinc("8462-4"), "valueQuantity": qty(95.0, "mm[Hg]")}]}),
        json!({"resourceType": "Observation", "id": "ob4", "status": "amended", "code": loinc("8867-4"),
            "subject": {"reference": "Patient/p2"},
            "effectiveDateTime": "2021-01-01T00:00:00Z", "valueQuantity": qty(60.0, "/min")}),
        json!({"resourceType": "Observation", "id": "ob5", "status": "final", "code": loinc("29463-7"),
            "subject": {"reference": "Patient/p3"},
            "effectiveDateTime": "2019-12-31T23:00:00+01:00", "valueQuantity": qty(70.5, "kg")}),
        json!({"resourceType": "Observation", "id": "ob6", "status": "final", "code": loinc("8302-2"),
            "subject": {"reference": "Patient/p3"}, "effectiveDateTime": "2022-02-02"}),
        json!({"resourceType": "RiskAssessment", "id": "ra1", "status": "final",
            "subject": {"reference": "Patient/p1"}, "prediction": [{"probabilityDecimal": 0.8}]}),
        json!({"resourceType": "RiskAssessment", "id": "ra2", "status": "final",
            "subject": {"reference": "Patient/p2"}, "prediction": [{"probabilityDecimal": 0.3}]}),
        json!({"resourceType": "Provenance", "id": "pv1", "recorded": "2019-03-01T10:00:00Z",
            "target": [{"reference": "Observation/ob1"}],
            "agent": [{"who": {"reference": "Practitioner/pr1"}}]}),
        json!({"resourceType": "List", "id": "l1", "status": "current", "mode": "working",
            "entry": [{"item": {"reference": "Observation/ob1"}}, {"item": {"reference": "Observation/ob3"}}]}),
        json!({"resourceType": "ValueSet", "id": "vs1", "status": "active",
            "url": "http://example.org/vs/hr",
            "compose": {"include": [{"system": "http://loinc.org", "concept": [{"code": "8867-4"}]}]}}),
        json!({"resourceType": "Medication", "id": "med1", "code": {"text": "aspirin"}}),
        json!({"resourceType": "CodeSystem", "id": "cs1", "url": "http://example.org/cs/devices",
            "status": "active", "content": "complete", "hierarchyMeaning": "is-a",
            "concept": [{"code": "monitor", "concept": [
                {"code": "bedside-monitor"},
                {"code": "wearable", "concept": [{"code": "patch"}]}]}]}),
        json!({"resourceType": "Device", "id": "dv1", "type": {"coding": [
            {"system": "http://example.org/cs/devices", "code": "wearable"}]}}),
        json!({"resourceType": "Device", "id": "dv2", "type": {"coding": [
            {"system": "http://example.org/cs/devices", "code": "patch"}]}}),
        json!({"resourceType": "Device", "id": "dv3", "type": {"coding": [
            {"system": "http://example.org/cs/devices", "code": "bedside-monitor"}]}}),
        json!({"resourceType": "Location", "id": "loc1", "name": "Ward 3",
            "position": {"latitude": 42.256500, "longitude": -83.694810}}),
        json!({"resourceType": "Location", "id": "loc2", "name": "Berlin",
            "position": {"latitude": 52.52, "longitude": 13.405}}),
        json!({"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
            "medicationReference": {"reference": "Medication/med1"},
            "subject": {"reference": "Patient/p1"}}),
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/p1"}}),
    ]
}

async fn load(app: &TestApp) {
    let entries: Vec<Value> = fixtures()
        .into_iter()
        .map(|r| {
            let url = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            json!({"resource": r, "request": {"method": "PUT", "url": url}})
        })
        .collect();
    let r = app
        .post(
            "",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// `(type/id)` of the entries with the given search mode, in Bundle order.
fn ids(bundle: &Value, mode: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["search"]["mode"] == mode)
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap_or("?"),
                        e["resource"]["id"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn search(app: &TestApp, query: &str) -> Value {
    let r = app.get(query).await;
    let status = r.status();
    let body = json(r).await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Every query, with the ids it must match (in any order).
const CASES: &[(&str, &[&str])] = &[
    // string: prefix, case and accent folded; :contains; :exact
    ("Patient?family=chal", &["Patient/p1", "Patient/p2"]),
    ("Patient?name:contains=ete", &["Patient/p1"]),
    ("Patient?name:exact=Peter", &["Patient/p1"]),
    ("Patient?name:exact=peter", &[]),
    ("Patient?given=zoe", &["Patient/p3"]),
    ("Patient?address-city=springfield", &["Patient/p1"]),
    // token: code, system|code, :not, :of-type, :text, escaping
    ("Patient?gender=female", &["Patient/p2", "Patient/p3"]),
    ("Patient?gender:not=female", &["Patient/p1"]),
    ("Patient?identifier=urn:mrn|m1", &["Patient/p1"]),
    ("Patient?identifier=urn:mrn|a\\,b", &["Patient/p2"]),
    (
        "Patient?identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|m1",
        &["Patient/p1"],
    ),
    ("Patient?active=true", &["Patient/p1"]),
    ("Medication?code:text=aspi", &["Medication/med1"]),
    (
        "Observation?code=http://loinc.org|8867-4,8480-6",
        &[
            "Observation/ob1",
            "Observation/ob2",
            "Observation/ob3",
            "Observation/ob4",
        ],
    ),
    (
        "Observation?code=http://loinc.org|8867-4&status=amended",
        &["Observation/ob4"],
    ),
    // Probes of every kind beside a driver (they run inside the driver's subquery).
    (
        "Observation?code=http://loinc.org|8867-4&status:not=amended",
        &["Observation/ob1", "Observation/ob2"],
    ),
    (
        "Patient?gender=female&organization:missing=false",
        &["Patient/p2"],
    ),
    (
        "Observation?code=http://loinc.org|8867-4&patient.name=anne",
        &["Observation/ob4"],
    ),
    (
        "Observation?subject=Patient/p2&combo-code-value-quantity=http://loinc.org|8462-4$lt100",
        &["Observation/ob3"],
    ),
    // :in / :not-in against a ValueSet the server holds
    (
        "Observation?code:in=http://example.org/vs/hr",
        &["Observation/ob1", "Observation/ob2", "Observation/ob4"],
    ),
    (
        "Observation?code:not-in=http://example.org/vs/hr",
        &["Observation/ob3", "Observation/ob5", "Observation/ob6"],
    ),
    // :below / :above in a CodeSystem hierarchy the server holds
    (
        "Device?type:below=http://example.org/cs/devices|wearable",
        &["Device/dv1", "Device/dv2"],
    ),
    (
        "Device?type:below=http://example.org/cs/devices|monitor",
        &["Device/dv1", "Device/dv2", "Device/dv3"],
    ),
    (
        "Device?type:above=http://example.org/cs/devices|patch",
        &["Device/dv1", "Device/dv2"],
    ),
    // date: partial dates are ranges, prefixes
    ("Patient?birthdate=1980", &["Patient/p2"]),
    ("Patient?birthdate=lt1980", &["Patient/p1"]),
    (
        "Patient?birthdate=ge1980-05-01",
        &["Patient/p2", "Patient/p3"],
    ),
    ("Patient?birthdate=sa2000", &["Patient/p3"]),
    (
        "Observation?date=2019",
        &["Observation/ob1", "Observation/ob5"],
    ),
    (
        "Observation?date=ge2020-01-01&date=lt2022",
        &["Observation/ob3", "Observation/ob4"],
    ),
    // number and quantity, with prefixes and units
    ("RiskAssessment?probability=gt0.5", &["RiskAssessment/ra1"]),
    ("RiskAssessment?probability=0.3", &["RiskAssessment/ra2"]),
    (
        "RiskAssessment?probability=le0.8",
        &["RiskAssessment/ra1", "RiskAssessment/ra2"],
    ),
    (
        "Observation?value-quantity=gt100||/min",
        &["Observation/ob2"],
    ),
    (
        "Observation?value-quantity=gt100",
        &["Observation/ob2", "Observation/ob3"],
    ),
    (
        "Observation?value-quantity=150|http://unitsofmeasure.org|mm[Hg]",
        &["Observation/ob3"],
    ),
    ("Observation?value-quantity=70.5", &["Observation/ob5"]),
    ("Observation?value-quantity=70", &[]),
    (
        "Observation?value-quantity=ap70",
        &["Observation/ob1", "Observation/ob5"],
    ),
    (
        "Observation?value-quantity=ne72",
        &[
            "Observation/ob2",
            "Observation/ob3",
            "Observation/ob4",
            "Observation/ob5",
        ],
    ),
    // composite: both halves from the same item
    (
        "Observation?code-value-quantity=http://loinc.org|8480-6$gt100",
        &["Observation/ob3"],
    ),
    (
        "Observation?code-value-quantity=8867-4$lt100,8480-6$gt140",
        &["Observation/ob1", "Observation/ob3", "Observation/ob4"],
    ),
    ("Observation?code-value-quantity=8867-4$gt1000", &[]),
    (
        "Observation?component-code-value-quantity=8462-4$gt90",
        &["Observation/ob3"],
    ),
    (
        "Observation?component-code-value-quantity=8462-4$gt100",
        &[],
    ),
    (
        "Observation?combo-code-value-quantity=8867-4$60",
        &["Observation/ob4"],
    ),
    // Aliases (`combo-*` = the parameter | its `component-*`), read from their parts' rows.
    ("Observation?combo-code=8462-4", &["Observation/ob3"]),
    (
        "Observation?combo-code=http://loinc.org|8867-4",
        &["Observation/ob1", "Observation/ob2", "Observation/ob4"],
    ),
    (
        "Observation?combo-code:not=8867-4",
        &["Observation/ob3", "Observation/ob5", "Observation/ob6"],
    ),
    (
        "Observation?combo-value-quantity=95||mm[Hg]",
        &["Observation/ob3"],
    ),
    (
        "Observation?combo-value-quantity=gt100",
        &["Observation/ob2", "Observation/ob3"],
    ),
    (
        "Observation?combo-value-quantity:missing=true",
        &["Observation/ob6"],
    ),
    (
        "Observation?combo-code=8462-4&combo-value-quantity=lt100",
        &["Observation/ob3"],
    ),
    (
        "Observation?combo-code-value-quantity=8462-4$95||mm[Hg]",
        &["Observation/ob3"],
    ),
    // :missing
    (
        "Observation?value-quantity:missing=true",
        &["Observation/ob6"],
    ),
    ("Patient?organization:missing=true", &["Patient/p3"]),
    (
        "Patient?organization:missing=false",
        &["Patient/p1", "Patient/p2"],
    ),
    // reference: id, Type/id, :Type, :identifier
    (
        "Observation?subject=Patient/p1",
        &["Observation/ob1", "Observation/ob2"],
    ),
    (
        "Observation?patient=p1&code=http://loinc.org|8867-4&date=ge2019-01-01",
        &["Observation/ob1"],
    ),
    (
        "Observation?subject:Patient=p2",
        &["Observation/ob3", "Observation/ob4"],
    ),
    (
        "Observation?subject:identifier=urn:mrn|m1",
        &["Observation/ob2"],
    ),
    // uri with :below / :above
    ("ValueSet?url=http://example.org/vs/hr", &["ValueSet/vs1"]),
    (
        "ValueSet?url:below=http://example.org/vs",
        &["ValueSet/vs1"],
    ),
    (
        "ValueSet?url:above=http://example.org/vs/hr/v2",
        &["ValueSet/vs1"],
    ),
    // chaining, several levels and with a type
    ("Patient?organization.name=acme", &["Patient/p1"]),
    (
        "Patient?organization:Organization.name=beta",
        &["Patient/p2"],
    ),
    (
        "Observation?patient.name=zoe",
        &["Observation/ob5", "Observation/ob6"],
    ),
    (
        "Observation?subject:Patient.organization.name=acme",
        &["Observation/ob1", "Observation/ob2"],
    ),
    ("Encounter?patient.name=chalmers", &["Encounter/e1"]),
    // reverse chaining, nested
    (
        "Patient?_has:Observation:patient:code=8480-6",
        &["Patient/p2"],
    ),
    (
        "Patient?_has:Observation:patient:_has:Provenance:target:_id=pv1",
        &["Patient/p1"],
    ),
    (
        "Patient?_has:Observation:subject:value-quantity=gt100&gender=male",
        &["Patient/p1"],
    ),
    // _id, _lastUpdated, _list
    (
        "Observation?_id=ob1,ob3",
        &["Observation/ob1", "Observation/ob3"],
    ),
    (
        "Observation?_list=l1",
        &["Observation/ob1", "Observation/ob3"],
    ),
    (
        "Patient?_lastUpdated=gt2000-01-01",
        &["Patient/p1", "Patient/p2", "Patient/p3"],
    ),
    // meta: _tag, _profile, _security, _source, also across all types
    (
        "Practitioner?_tag=http://example.org/tags|vip",
        &["Practitioner/pr1"],
    ),
    (
        "Practitioner?_profile=http://example.org/StructureDefinition/special-practitioner",
        &["Practitioner/pr1"],
    ),
    ("Practitioner?_security=R", &["Practitioner/pr1"]),
    (
        "Practitioner?_source=http://example.org/ehr%231",
        &["Practitioner/pr1"],
    ),
    ("?_tag=vip", &["Practitioner/pr1"]),
    // near (special): within the distance (km unless a unit is given)
    ("Location?near=42.2565|-83.6948|5|km", &["Location/loc1"]),
    ("Location?near=42.30|-83.6948|2000|m", &[]),
    ("Location?near=52.5|13.4|10", &["Location/loc2"]),
    ("Location?near=0|0|1", &[]),
    // system level and compartments
    (
        "?_type=Patient,Organization&_id=p1,o1",
        &["Patient/p1", "Organization/o1"],
    ),
    ("?_id=pr1", &["Practitioner/pr1"]),
    (
        "Patient/p1/Observation",
        &["Observation/ob1", "Observation/ob2"],
    ),
    (
        "Patient/p1/Observation?code=8867-4&date=ge2019",
        &["Observation/ob1"],
    ),
    ("Patient/p2/RiskAssessment", &["RiskAssessment/ra2"]),
];

async fn parameter_types_and_modifiers(app: &TestApp) {
    load(app).await;
    expect_matches(app, CASES).await;
}

/// Runs each query and compares its matches (in any order) with the expected ids; every
/// mismatch is reported at once.
async fn expect_matches(app: &TestApp, cases: &[(&str, &[&str])]) {
    expect_entries(app, "match", cases).await;
}

/// [`expect_matches`] for the entries of another search mode (`include`).
async fn expect_entries(app: &TestApp, mode: &str, cases: &[(&str, &[&str])]) {
    let mut failures = Vec::new();
    for (query, expected) in cases {
        let b = search(app, query).await;
        let got = sorted(ids(&b, mode));
        let want = sorted(expected.iter().map(|s| s.to_string()).collect());
        if got != want {
            failures.push(format!("{query}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

async fn sort_include_and_revinclude(app: &TestApp) {
    load(app).await;
    let b = search(app, "Observation?code=8867-4&_sort=-date").await;
    assert_eq!(
        ids(&b, "match"),
        ["Observation/ob4", "Observation/ob1", "Observation/ob2"]
    );
    let b = search(app, "Observation?code=8867-4&_sort=value-quantity").await;
    assert_eq!(
        ids(&b, "match"),
        ["Observation/ob4", "Observation/ob1", "Observation/ob2"]
    );
    // By an alias: each resource's lowest value under either part (ob3: 150 and 95).
    let b = search(
        app,
        "Observation?code=8480-6,8867-4&_sort=combo-value-quantity",
    )
    .await;
    assert_eq!(
        ids(&b, "match"),
        [
            "Observation/ob4",
            "Observation/ob1",
            "Observation/ob3",
            "Observation/ob2"
        ]
    );
    let b = search(app, "Patient?_sort=family,-birthdate").await;
    assert_eq!(ids(&b, "match"), ["Patient/p2", "Patient/p1", "Patient/p3"]);
    let b = search(app, "Patient?_sort=-_id").await;
    assert_eq!(ids(&b, "match"), ["Patient/p3", "Patient/p2", "Patient/p1"]);
    // Resources without a value sort last, in both directions.
    let b = search(app, "Observation?_sort=-value-quantity").await;
    assert_eq!(
        ids(&b, "match").last().map(String::as_str),
        Some("Observation/ob6")
    );
    // A sorted result pages by offset.
    let b = search(app, "Patient?_sort=family&_count=2").await;
    let next = link(&b, "next").expect("next link");
    let b2 = json(app.client.get(&next).send().await.unwrap()).await;
    assert_eq!(ids(&b2, "match"), ["Patient/p3"]);

    // _elements and _summary shape each entry, marked SUBSETTED.
    let b = search(app, "Patient?_id=p1&_elements=gender").await;
    let p = &b["entry"][0]["resource"];
    assert_eq!(p["gender"], "male");
    assert!(p.get("name").is_none(), "{p}");
    assert!(p["meta"]["tag"].to_string().contains("SUBSETTED"), "{p}");
    let b = search(app, "Observation?_id=ob1&_summary=text").await;
    let o = &b["entry"][0]["resource"];
    assert!(
        o.get("valueQuantity").is_none() && o["status"] == "final",
        "{o}"
    );
    let b = search(app, "Observation?_id=ob1&_include=Observation:patient").await;
    assert_eq!(ids(&b, "match"), ["Observation/ob1"]);
    assert_eq!(ids(&b, "include"), ["Patient/p1"]);
    let b = search(
        app,
        "Observation?_id=ob1&_include=Observation:performer:Practitioner",
    )
    .await;
    assert_eq!(ids(&b, "include"), ["Practitioner/pr1"]);
    let b = search(app, "Observation?_id=ob1&_include=*").await;
    assert_eq!(
        sorted(ids(&b, "include")),
        ["Patient/p1", "Practitioner/pr1"]
    );
    let b = search(
        app,
        "MedicationRequest?_include=MedicationRequest:medication",
    )
    .await;
    assert_eq!(ids(&b, "include"), ["Medication/med1"]);
    let b = search(app, "Observation?_id=ob1&_revinclude=Provenance:target").await;
    assert_eq!(ids(&b, "include"), ["Provenance/pv1"]);
    // :iterate follows references of included resources too.
    let b = search(
        app,
        "Patient?_id=p1&_revinclude=Observation:subject&_include:iterate=Observation:performer",
    )
    .await;
    assert_eq!(
        sorted(ids(&b, "include")),
        ["Observation/ob1", "Observation/ob2", "Practitioner/pr1"]
    );
    let b = search(
        app,
        "Patient?_id=p1&_revinclude=Observation:subject&_include=Observation:performer",
    )
    .await;
    assert_eq!(
        sorted(ids(&b, "include")),
        ["Observation/ob1", "Observation/ob2"]
    );

    // $everything: the patient, its compartment, and what those refer to.
    let b = search(app, "Patient/p1/$everything").await;
    let all = sorted([ids(&b, "match"), ids(&b, "include")].concat());
    for want in [
        "Patient/p1",
        "Observation/ob1",
        "Observation/ob2",
        "MedicationRequest/mr1",
        "Encounter/e1",
        "RiskAssessment/ra1",
        "Organization/o1",
        "Practitioner/pr1",
        "Medication/med1",
    ] {
        assert!(
            all.contains(&want.to_string()),
            "{want} missing from $everything: {all:?}"
        );
    }
    assert!(
        !all.iter()
            .any(|i| i == "Observation/ob3" || i == "Patient/p2"),
        "{all:?}"
    );
    let b = search(app, "Patient/p1/$everything?_type=Observation").await;
    assert_eq!(
        sorted(ids(&b, "match")),
        ["Observation/ob1", "Observation/ob2"]
    );
    let b = search(app, "Patient/p1/$everything?_count=3").await;
    assert_eq!(ids(&b, "match").len(), 3);
    assert!(link(&b, "next").is_some());
    assert_eq!(app.get("Patient/nobody/$everything").await.status(), 404);
}

fn link(b: &Value, rel: &str) -> Option<String> {
    b["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == rel)
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

async fn paging_totals_and_errors(app: &TestApp) {
    load(app).await;
    // Keyset paging: a write between pages neither repeats nor skips anything.
    let mut seen = Vec::new();
    let first = search(app, "Observation?_count=2").await;
    assert_eq!(first["total"], 6, "cheap totals are filled: {first}");
    seen.extend(ids(&first, "match"));
    let mut next = link(&first, "next");
    let created = app
        .post(
            "Observation",
            &json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "late"}}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let late_id = json(created).await["id"].as_str().unwrap().to_string();
    let mut second_page = None;
    while let Some(url) = next {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        if second_page.is_none() {
            second_page = Some(b.clone());
        }
        seen.extend(ids(&b, "match"));
        next = link(&b, "next");
    }
    let mut want: Vec<String> = (1..=6).map(|i| format!("Observation/ob{i}")).collect();
    want.push(format!("Observation/{late_id}"));
    assert_eq!(seen, want);
    // previous goes back to the first page
    let second = second_page.unwrap();
    let prev = link(&second, "previous").expect("previous link");
    let b = json(app.client.get(&prev).send().await.unwrap()).await;
    assert_eq!(ids(&b, "match"), ids(&first, "match"));

    // _total and _summary=count
    let b = search(app, "Observation?_total=none").await;
    assert!(b.get("total").is_none());
    let b = search(app, "Observation?_count=1&_total=accurate").await;
    assert_eq!(b["total"], 7);
    let b = search(app, "Observation?code=8867-4&_count=0&_summary=count").await;
    assert_eq!(b["total"], 3);
    assert!(b.get("entry").is_none());
    // A lone filter's total counts resources, not index rows: ob3 holds 8480-6 both as its
    // code and as a component's, two rows of `combo-code`.
    for count in ["1", "5"] {
        let b = search(
            app,
            &format!("Observation?combo-code=8480-6&_count={count}"),
        )
        .await;
        assert_eq!(b["total"], 1, "{b}");
        assert_eq!(ids(&b, "match"), ["Observation/ob3"]);
    }
    let b = search(app, "Patient?name=chalmers&_count=1").await;
    assert_eq!(b["total"], 2, "{b}");
    assert!(link(&b, "next").is_some());
    // POST _search with a form body
    let r = app
        .client
        .post(app.url("Observation/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("code=8480-6")
        .send()
        .await
        .unwrap();
    assert_eq!(ids(&json(r).await, "match"), ["Observation/ob3"]);
    // Conditional create accepts any search, chains included.
    let r = app
        .client
        .post(app.url("Observation"))
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", "patient.name=zoe&code=8302-2")
        .json(&json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the condition matches ob6, nothing is created"
    );

    // Bad input: 400 (or 501-free "not supported" 400) with an OperationOutcome naming it.
    for (query, needle) in [
        ("Observation?value-quantity=abc", "value-quantity"),
        ("Observation?date=2019-13", "date"),
        ("Observation?code:above=8867-4", "system|code"),
        ("Device?type:below=http://unknown.org/cs|x", "not held"),
        (
            "Device?type:below=http://example.org/cs/devices|nothing",
            "not in code system",
        ),
        ("Observation?code-value-quantity=8867-4", "$"),
        ("Patient?colour=blue", "colour"),
        ("Patient?organization.colour=x", "colour"),
        ("Patient?gender.name=x", "gender"),
        ("Patient?_has:Observation:patient", "_has"),
        ("Patient?_has:Observation:code:code=1", "reference"),
        ("Patient?_sort=colour", "colour"),
        ("Patient?organization:missing=maybe", "true or false"),
        ("Observation?code:in=http://example.org/unknown", "not held"),
        ("Patient?_cursor=zz", "_cursor"),
        ("Patient/p1/Organization", "compartment"),
        ("?_type=Nonsense", "Nonsense"),
        ("?gender=male", "gender"),
        ("Patient?_text=x", "_text"),
        ("Location?near=abc", "near"),
        ("Location?near=91|0", "range"),
    ] {
        let r = app.get(query).await;
        let status = r.status();
        let b = json(r).await;
        assert_eq!(status, 400, "{query}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
        let text = b.to_string();
        assert!(text.contains(needle), "{query}: {needle:?} not in {text}");
    }
    // Lenient handling ignores unknown parameters and says so in the Bundle.
    let r = app
        .get_lenient("Patient?colour=blue&_sort=colour&gender=male")
        .await;
    assert_eq!(r.status(), 200);
    let b = json(r).await;
    assert_eq!(ids(&b, "match"), ["Patient/p1"]);
    let outcome = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome");
    let text = outcome.expect("outcome entry").to_string();
    assert!(text.contains("colour"), "{text}");
    // ... but a malformed value of a known parameter is still an error.
    let r = app.get_lenient("Observation?value-quantity=abc").await;
    assert_eq!(r.status(), 400);
}

/// More matches than the server lets a filter drive a search with (2,000): the scan plan
/// must page exactly like the index plan.
async fn large_results_page_exactly(app: &TestApp) {
    let entries: Vec<Value> = (0..2100)
        .map(|i| {
            let status = if i % 700 == 5 { "amended" } else { "final" };
            json!({"resource": {"resourceType": "Observation", "id": format!("big{i:04}"),
                "status": status, "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "effectiveDateTime": format!("2020-01-01T00:00:{:02}Z", i % 60)},
                "request": {"method": "PUT", "url": format!("Observation/big{i:04}")}})
        })
        .collect();
    let r = app
        .post(
            "",
            &json!({"resourceType": "Bundle", "type": "batch", "entry": entries}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let b = search(app, "Observation?code=http://loinc.org|8867-4&_count=10").await;
    assert_eq!(ids(&b, "match").len(), 10);
    assert!(
        b.get("total").is_none(),
        "a total over thousands is not cheap: {}",
        b["total"]
    );
    let b = search(app, "Observation?code=8867-4&_count=0&_summary=count").await;
    assert_eq!(b["total"], 2100);
    // A selective second filter still finds everything on the first page.
    let b = search(app, "Observation?code=8867-4&status=amended").await;
    assert_eq!(
        ids(&b, "match"),
        [
            "Observation/big0005",
            "Observation/big0705",
            "Observation/big1405"
        ]
    );
    assert_eq!(b["total"], 3);
    // Paging through all of them: each once, in order.
    let seen = all_pages(
        app,
        search(app, "Observation?code=8867-4&date=ge2020-01-01&_count=500").await,
    )
    .await;
    let want: Vec<String> = (0..2100)
        .map(|i| format!("Observation/big{i:04}"))
        .collect();
    assert_eq!(seen, want);
    // One exact code: pages read straight from its index, in order, both ways.
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut next = Some(app.url("Observation?code=http://loinc.org|8867-4&_count=700"));
    while let Some(url) = next {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        seen.extend(ids(&b, "match"));
        next = link(&b, "next");
        pages.push(b);
    }
    assert_eq!(seen, want);
    assert_eq!(pages.len(), 3);
    let prev = link(&pages[2], "previous").expect("previous");
    let b = json(app.client.get(&prev).send().await.unwrap()).await;
    assert_eq!(ids(&b, "match"), ids(&pages[1], "match"));
}

/// One resource with 341 index rows in one table (256 + 64 + 16 + 4 + 1: every size of
/// SQLite's bound index inserts once) is found by each of them; after an update to fewer
/// values, by the new ones only.
async fn many_index_rows_of_one_resource(app: &TestApp) {
    let patient = |n: usize, prefix: &str| {
        let identifier: Vec<Value> = (0..n)
            .map(|i| json!({"system": "urn:many", "value": format!("{prefix}{i}")}))
            .collect();
        json!({"resourceType": "Patient", "id": "many", "identifier": identifier})
    };
    let r = app.put("Patient/many", &patient(341, "v")).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for i in [0, 1, 255, 256, 319, 320, 335, 336, 339, 340] {
        let b = search(app, &format!("Patient?identifier=urn:many|v{i}")).await;
        assert_eq!(ids(&b, "match"), ["Patient/many"], "identifier v{i}");
    }
    let b = search(app, "Patient?identifier=urn:many|v341").await;
    assert_eq!(ids(&b, "match"), Vec::<String>::new());
    let r = app.put("Patient/many", &patient(7, "w")).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for (query, want) in [("w6", 1), ("w0", 1), ("v0", 0), ("v340", 0), ("w7", 0)] {
        let b = search(app, &format!("Patient?identifier=urn:many|{query}")).await;
        assert_eq!(ids(&b, "match").len(), want, "identifier {query}");
    }
}

/// A posted SearchParameter is searchable after `$reindex`, for old and new resources.
async fn custom_parameters_after_reindex(app: &TestApp) {
    let eye = |id: &str, colour: &str| {
        json!({"resourceType": "Patient", "id": id, "extension": [
            {"url": "http://example.org/eye-colour", "valueCode": colour}]})
    };
    for (id, colour) in [("blue1", "blue"), ("green1", "green")] {
        assert_eq!(
            app.put(&format!("Patient/{id}"), &eye(id, colour))
                .await
                .status(),
            201
        );
    }
    let sp = json!({"resourceType": "SearchParameter", "id": "eye",
        "url": "http://example.org/SearchParameter/eye-colour", "name": "EyeColour",
        "status": "active", "description": "Eye colour", "code": "eye-colour",
        "base": ["Patient"], "type": "token",
        "expression": "Patient.extension('http://example.org/eye-colour').value"});
    assert_eq!(app.put("SearchParameter/eye", &sp).await.status(), 201);
    let bad = json!({"resourceType": "SearchParameter", "id": "bad",
        "url": "http://example.org/SearchParameter/bad", "name": "Bad", "status": "active",
        "description": "Unsupported FHIRPath", "code": "first-name", "base": ["Patient"],
        "type": "string", "expression": "Patient.name.first()"});
    assert_eq!(app.put("SearchParameter/bad", &bad).await.status(), 201);
    // Not in force before $reindex.
    assert_eq!(app.get("Patient?eye-colour=blue").await.status(), 400);
    let r = app
        .post("$reindex", &json!({"resourceType": "Parameters"}))
        .await;
    assert_eq!(r.status(), 200);
    let report = json(r).await;
    let text = report.to_string();
    assert!(text.contains("SearchParameter/eye (eye-colour)"), "{text}");
    assert!(
        text.contains("SearchParameter/bad: "),
        "refused with a reason: {text}"
    );
    let b = search(app, "Patient?eye-colour=blue").await;
    assert_eq!(ids(&b, "match"), ["Patient/blue1"]);
    // New writes are indexed with it too.
    assert_eq!(
        app.put("Patient/blue2", &eye("blue2", "blue"))
            .await
            .status(),
        201
    );
    let b = search(app, "Patient?eye-colour=blue").await;
    assert_eq!(sorted(ids(&b, "match")), ["Patient/blue1", "Patient/blue2"]);
    // The CapabilityStatement lists it.
    let cs = json(app.get("metadata").await).await.to_string();
    assert!(cs.contains("eye-colour"));
    assert!(!cs.contains("first-name"));
}

/// Observation `code-value-*` composites combine two elements of the resource itself, so
/// they are searched by their parts (`code` and the value's parameter), with no rows of their
/// own; `component-*` composites pair values inside one component and keep rows. Both must
/// keep the composite's meaning.
/// Creates each resource with `PUT Type/id`.
async fn put_all(app: &TestApp, resources: &[Value]) {
    for r in resources {
        let url = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        let put = app.put(&url, r).await;
        assert_eq!(put.status(), 201, "{url}: {}", put.text().await.unwrap());
    }
}

async fn composites_by_parts(app: &TestApp) {
    let coding = |system: &str, code: &str| json!({"system": system, "code": code});
    let loinc = "http://loinc.org";
    let per_min = |v: f64| json!({"value": v, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"});
    let resources = [
        json!({"resourceType": "Patient", "id": "cp1"}),
        json!({"resourceType": "Observation", "id": "c1", "status": "final",
            "subject": {"reference": "Patient/cp1"},
            "code": {"coding": [coding(loinc, "8867-4"), coding("urn:iso:std:iso:11073:10101", "147842")]},
            "valueQuantity": per_min(72.0)}),
        json!({"resourceType": "Observation", "id": "c2", "status": "final",
            "code": {"coding": [coding(loinc, "72166-2")]},
            "valueCodeableConcept": {"coding": [coding("http://snomed.info/sct", "8517006")]}}),
        json!({"resourceType": "Observation", "id": "c3", "status": "final",
            "code": {"coding": [coding(loinc, "21112-8")]}, "valueDateTime": "1990-01-01"}),
        json!({"resourceType": "Observation", "id": "c4", "status": "final",
            "code": {"coding": [coding(loinc, "8867-4")]},
            "valuePeriod": {"start": "2020-01-01", "end": "2020-01-02"}}),
        json!({"resourceType": "Observation", "id": "c5", "status": "final",
            "code": {"coding": [coding(loinc, "8867-4")]},
            "component": [{"code": {"coding": [coding(loinc, "8867-4")]}, "valueQuantity": per_min(50.0)}]}),
        json!({"resourceType": "Observation", "id": "c6", "status": "final",
            "code": {"coding": [coding(loinc, "8867-4")]},
            "valueSampledData": {"origin": {"value": 0}, "period": 1000, "dimensions": 1, "data": "50 72"}}),
        json!({"resourceType": "Observation", "id": "c7", "status": "final",
            "code": {"coding": [coding(loinc, "9279-1")]}, "valueQuantity": per_min(72.0)}),
    ];
    put_all(app, &resources).await;
    let cases: &[(&str, &[&str])] = &[
        (
            "Observation?code-value-quantity=http://loinc.org|8867-4$72",
            &["Observation/c1"],
        ),
        (
            "Observation?code-value-quantity=urn:iso:std:iso:11073:10101|147842$gt70",
            &["Observation/c1"],
        ),
        (
            "Observation?code-value-quantity=http://snomed.info/sct|8867-4$72",
            &[],
        ),
        ("Observation?code-value-quantity=8867-4$50", &[]),
        (
            "Observation?code-value-quantity=9279-1$72||/min",
            &["Observation/c7"],
        ),
        (
            "Observation?combo-code-value-quantity=8867-4$50",
            &["Observation/c5"],
        ),
        (
            "Observation?combo-code-value-quantity=8867-4$50,8867-4$72",
            &["Observation/c1", "Observation/c5"],
        ),
        (
            "Observation?code-value-quantity=8867-4$72,9279-1$lt60,8867-4$50",
            &["Observation/c1"],
        ),
        (
            "Observation?code-value-concept=72166-2$http://snomed.info/sct|8517006",
            &["Observation/c2"],
        ),
        ("Observation?code-value-concept=8867-4$8517006", &[]),
        (
            "Observation?code-value-date=21112-8$1990-01-01",
            &["Observation/c3"],
        ),
        (
            "Observation?code-value-date=8867-4$ge2020-01-01",
            &["Observation/c4"],
        ),
        (
            "Observation?code-value-quantity=8867-4$72&status=final&_id=c1,c7",
            &["Observation/c1"],
        ),
        (
            "Patient?_has:Observation:subject:code-value-quantity=8867-4$72",
            &["Patient/cp1"],
        ),
        (
            "Patient/cp1/Observation?code-value-quantity=147842$72",
            &["Observation/c1"],
        ),
    ];
    expect_matches(app, cases).await;
    assert_eq!(
        app.get("Observation?code-value-quantity:missing=true")
            .await
            .status(),
        400
    );
}

/// Parameters that restrict another to one target type (Observation `patient` is `subject`
/// whose target is a Patient) have no rows of their own: every way of searching them reads
/// the base's rows and must still tell a Patient from a Group.
async fn restricted_references(app: &TestApp) {
    let code = json!({"coding": [{"system": "urn:test", "code": "rx"}]});
    let obs = |id: &str, subject: Option<Value>| {
        let mut o =
            json!({"resourceType": "Observation", "id": id, "status": "final", "code": code});
        if let Some(s) = subject {
            o["subject"] = s;
        }
        o
    };
    let resources = [
        json!({"resourceType": "Patient", "id": "rp1", "name": [{"family": "Restricta"}]}),
        json!({"resourceType": "Group", "id": "rg1", "type": "person", "actual": true,
            "name": "Restricta"}),
        json!({"resourceType": "Practitioner", "id": "rpr1"}),
        json!({"resourceType": "Patient", "id": "rp0"}),
        json!({"resourceType": "Patient", "id": "rp2"}),
        json!({"resourceType": "AllergyIntolerance", "id": "rai0",
            "patient": {"reference": "Patient/rp0"}}),
        json!({"resourceType": "AllergyIntolerance", "id": "rai2",
            "patient": {"reference": "Patient/rp2"}}),
        obs("ro1", Some(json!({"reference": "Patient/rp1"}))),
        obs("ro2", Some(json!({"reference": "Group/rg1"}))),
        obs(
            "ro3",
            Some(json!({"type": "Patient",
            "identifier": {"system": "urn:mrn", "value": "7"}})),
        ),
        obs("ro4", None),
        {
            let mut o = obs("ro5", Some(json!({"reference": "Patient/rp1"})));
            o["performer"] = json!([{"reference": "Practitioner/rpr1"}]);
            o
        },
        json!({"resourceType": "Encounter", "id": "re1", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Patient/rp1"},
            "participant": [{"individual": {"reference": "Practitioner/rpr1"}}]}),
        json!({"resourceType": "Encounter", "id": "re2", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": "Group/rg1"}}),
    ];
    put_all(app, &resources).await;
    let both = &["Observation/ro1", "Observation/ro5"][..];
    let cases: &[(&str, &[&str])] = &[
        ("Observation?patient=rp1", both),
        ("Observation?patient=Patient/rp1", both),
        ("Observation?patient:Patient=rp1", both),
        ("Observation?patient=rg1", &[]),
        ("Observation?subject=rg1", &["Observation/ro2"]),
        ("Observation?subject:Group=rg1", &["Observation/ro2"]),
        (
            "Observation?code=rx&patient:missing=true",
            &["Observation/ro2", "Observation/ro3", "Observation/ro4"],
        ),
        ("Observation?code=rx&patient:missing=false", both),
        (
            "Observation?patient:identifier=urn:mrn|7",
            &["Observation/ro3"],
        ),
        (
            "Observation?subject:identifier=urn:mrn|7",
            &["Observation/ro3"],
        ),
        ("Observation?patient.name=Restricta", both),
        ("Observation?patient:Patient.name=Restricta", both),
        (
            "Observation?subject:Group.actual=true",
            &["Observation/ro2"],
        ),
        (
            "Observation?code=rx&patient=rp1&_id=ro5,ro2",
            &["Observation/ro5"],
        ),
        ("Patient?_has:Observation:patient:code=rx", &["Patient/rp1"]),
        ("Group?_has:Observation:subject:code=rx", &["Group/rg1"]),
        ("Patient?_has:Observation:patient:_id=ro2", &[]),
        ("Encounter?patient=rp1", &["Encounter/re1"]),
        ("Encounter?patient.name=Restricta", &["Encounter/re1"]),
        ("Encounter?practitioner=rpr1", &["Encounter/re1"]),
        ("Encounter?participant=rpr1", &["Encounter/re1"]),
        ("Patient/rp1/Observation", both),
        ("Patient/rp1/Encounter", &["Encounter/re1"]),
        ("Practitioner/rpr1/Encounter", &["Encounter/re1"]),
        ("Practitioner/rpr1/Observation", &["Observation/ro5"]),
    ];
    expect_matches(app, cases).await;

    let included: &[(&str, &[&str])] = &[
        (
            "Observation?_id=ro1,ro2&_include=Observation:patient",
            &["Patient/rp1"],
        ),
        (
            "Observation?_id=ro1,ro2&_include=Observation:subject",
            &["Patient/rp1", "Group/rg1"],
        ),
        ("Observation?_id=ro2&_include=Observation:patient", &[]),
        (
            "Observation?_id=ro1,ro2&_include=Observation:patient:Group",
            &[],
        ),
        (
            "Patient?_id=rp1&_revinclude=Observation:patient",
            &["Observation/ro1", "Observation/ro5"],
        ),
        ("Group?_id=rg1&_revinclude=Observation:patient", &[]),
        (
            "Group?_id=rg1&_revinclude=Observation:subject",
            &["Observation/ro2"],
        ),
        // No parameter named: every reference parameter of the source.
        ("Group?_id=rg1&_revinclude=Encounter", &["Encounter/re2"]),
        (
            "Practitioner?_id=rpr1&_revinclude=Observation:*",
            &["Observation/ro5"],
        ),
        (
            "Encounter?_id=re1&_include=Encounter:practitioner",
            &["Practitioner/rpr1"],
        ),
        // Several pages' resources at once.
        (
            "Patient?_id=rp0,rp1,rp2&_revinclude=AllergyIntolerance",
            &["AllergyIntolerance/rai0", "AllergyIntolerance/rai2"],
        ),
        (
            "Patient?_id=rp0,rp1,rp2&_revinclude=Observation:patient",
            &["Observation/ro1", "Observation/ro5"],
        ),
    ];
    expect_entries(app, "include", included).await;

    // One sort key over two types: a restricted `patient` (Observation) and an element of
    // its own (AllergyIntolerance), each read from its own rows.
    for query in [
        "?_type=Observation,AllergyIntolerance&_id=ro1,rai0,rai2&_sort=patient",
        "?_type=AllergyIntolerance,Observation&_id=ro1,rai0,rai2&_sort=patient",
    ] {
        let b = search(app, query).await;
        assert_eq!(
            ids(&b, "match"),
            [
                "AllergyIntolerance/rai0",
                "Observation/ro1",
                "AllergyIntolerance/rai2"
            ],
            "{query}"
        );
    }

    let b = search(app, "Observation?code=rx&_sort=patient").await;
    let sorted_ids = ids(&b, "match");
    assert_eq!(sorted_ids.len(), 5, "{sorted_ids:?}");
    assert_eq!(sorted(sorted_ids[..2].to_vec()), both, "{sorted_ids:?}");
}

crate::both_backends!(
    synthea_clinical_queries,
    restricted_references,
    composites_by_parts,
    custom_parameters_after_reindex,
    large_results_page_exactly,
    many_index_rows_of_one_resource,
    parameter_types_and_modifiers,
    sort_include_and_revinclude,
    paging_totals_and_errors,
);

const SYNTHEA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/synthea");
const SYNTHEA_FILES: [&str; 3] = [
    "Ali_Harris_eed1d00b-7665-4da3-88b7-c37cfb2ed245.json",
    "Antonio_Castellanos_6d2eba67-5b4a-403f-a29f-e6da3f1ea963.json",
    "Alejandro_Riojas_a9fcc685-c7a2-4474-bf25-26c8fe4b48f9.json",
];

/// Loads Synthea bundles as transactions and returns their resources with the ids the
/// server gave them (references rewritten the same way), to compute expected results.
async fn load_synthea(app: &TestApp) -> Vec<Value> {
    let mut all = Vec::new();
    for file in SYNTHEA_FILES {
        let text = std::fs::read_to_string(format!("{SYNTHEA}/{file}")).unwrap();
        let bundle: Value = serde_json::from_str(&text).unwrap();
        let r = app.post("", &bundle).await;
        assert_eq!(r.status(), 200, "{file}");
        let response = json(r).await;
        let mut ids = std::collections::HashMap::new();
        let entries = bundle["entry"].as_array().unwrap();
        for (e, resp) in entries.iter().zip(response["entry"].as_array().unwrap()) {
            let location = resp["response"]["location"].as_str().unwrap();
            let typed: Vec<&str> = location.split('/').take(2).collect();
            ids.insert(e["fullUrl"].as_str().unwrap().to_string(), typed.join("/"));
        }
        for e in entries {
            let mut text = e["resource"].to_string();
            for (from, to) in &ids {
                text = text.replace(&format!("\"{from}\""), &format!("\"{to}\""));
            }
            let mut resource: Value = serde_json::from_str(&text).unwrap();
            let id = ids[e["fullUrl"].as_str().unwrap()]
                .split('/')
                .nth(1)
                .unwrap()
                .to_string();
            resource["id"] = Value::String(id);
            all.push(resource);
        }
    }
    all
}

fn key(r: &Value) -> String {
    format!(
        "{}/{}",
        r["resourceType"].as_str().unwrap(),
        r["id"].as_str().unwrap()
    )
}

fn has_code(r: &Value, code: &str) -> bool {
    r["code"]["coding"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["code"] == code))
}

fn instant(s: &str) -> i64 {
    iomt_fhir::search::extract::parse_fhir_date_range(s)
        .unwrap()
        .0
}

/// The matches of every page, following `next` links.
async fn all_pages(app: &TestApp, first: Value) -> Vec<String> {
    let mut out = ids(&first, "match");
    let mut next = link(&first, "next");
    while let Some(url) = next {
        let b = json(app.client.get(&url).send().await.unwrap()).await;
        out.extend(ids(&b, "match"));
        next = link(&b, "next");
    }
    out
}

/// Common clinical queries over real Synthea data, each checked against the answer
/// computed from the loaded bundles.
async fn synthea_clinical_queries(app: &TestApp) {
    let data = load_synthea(app).await;
    let of_type = |t: &'static str| data.iter().filter(move |r| r["resourceType"] == t);
    let patient = of_type("Patient").next().unwrap().clone();
    let pid = patient["id"].as_str().unwrap();
    let subject = format!("Patient/{pid}");

    // Observation?patient=X&code=loinc|8302-2&date=ge2015-01-01&_sort=-date
    let since = instant("2015-01-01");
    let want: Vec<String> = of_type("Observation")
        .filter(|o| o["subject"]["reference"] == subject.as_str() && has_code(o, "8302-2"))
        .filter(|o| instant(o["effectiveDateTime"].as_str().unwrap()) >= since)
        .map(key)
        .collect();
    assert!(!want.is_empty());
    let b = search(
        app,
        &format!("Observation?patient={pid}&code=http://loinc.org|8302-2&date=ge2015-01-01&_sort=-date&_count=5"),
    )
    .await;
    let got = all_pages(app, b).await;
    assert_eq!(
        sorted(got.clone()),
        sorted(want),
        "patient's heights since 2015"
    );
    let dates: Vec<i64> = got
        .iter()
        .map(|k| {
            let o = data.iter().find(|r| key(r) == *k).unwrap();
            instant(o["effectiveDateTime"].as_str().unwrap())
        })
        .collect();
    assert!(
        dates.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {dates:?}"
    );

    // Observation?value-quantity=gt80||kg
    let want: Vec<String> = of_type("Observation")
        .filter(|o| {
            o["valueQuantity"]["code"] == "kg"
                && o["valueQuantity"]["value"].as_f64().unwrap() > 80.0
        })
        .map(key)
        .collect();
    let got = all_pages(
        app,
        search(app, "Observation?value-quantity=gt80||kg&_count=100").await,
    )
    .await;
    assert!(!want.is_empty(), "weights over 80 kg");
    assert_eq!(sorted(got), sorted(want), "weights over 80 kg");

    // Systolic over 130 mm[Hg]: a composite over the same component.
    let want: Vec<String> = of_type("Observation")
        .filter(|o| {
            o["component"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    has_code(c, "8480-6") && c["valueQuantity"]["value"].as_f64().unwrap() > 130.0
                })
            })
        })
        .map(key)
        .collect();
    let got = all_pages(
        app,
        search(
            app,
            "Observation?component-code-value-quantity=http://loinc.org|8480-6$gt130&_count=100",
        )
        .await,
    )
    .await;
    assert!(!want.is_empty(), "systolic over 130");
    assert_eq!(sorted(got), sorted(want), "systolic over 130");

    // Encounter?patient.name=<family>
    let family = patient["name"][0]["family"].as_str().unwrap();
    let want: Vec<String> = of_type("Encounter")
        .filter(|e| e["subject"]["reference"] == subject.as_str())
        .map(key)
        .collect();
    let got = all_pages(
        app,
        search(app, &format!("Encounter?patient.name={family}&_count=100")).await,
    )
    .await;
    assert!(!want.is_empty(), "encounters of {family}");
    assert_eq!(sorted(got), sorted(want), "encounters of {family}");

    // Patient?_has:Observation:patient:code=2339-0 (glucose measured)
    let want: Vec<String> = of_type("Patient")
        .filter(|p| {
            let s = format!("Patient/{}", p["id"].as_str().unwrap());
            of_type("Observation")
                .any(|o| o["subject"]["reference"] == s.as_str() && has_code(o, "2339-0"))
        })
        .map(key)
        .collect();
    assert!(!want.is_empty(), "patients with a glucose result");
    let b = search(app, "Patient?_has:Observation:patient:code=2339-0").await;
    assert_eq!(
        sorted(ids(&b, "match")),
        sorted(want),
        "patients with a glucose result"
    );

    // MedicationRequest?_include=MedicationRequest:patient (Synthea codes medications
    // inline, so :medication includes nothing here)
    let b = search(app, &format!("MedicationRequest?subject={subject}&_include=MedicationRequest:patient&_include=MedicationRequest:medication")).await;
    let want: Vec<String> = of_type("MedicationRequest")
        .filter(|m| m["subject"]["reference"] == subject.as_str())
        .map(key)
        .collect();
    assert!(!want.is_empty(), "medication requests of {subject}");
    assert_eq!(sorted(ids(&b, "match")), sorted(want.clone()));
    assert_eq!(ids(&b, "include"), std::slice::from_ref(&subject));

    // Encounter?_id=E&_revinclude=Observation:encounter
    let enc = of_type("Encounter")
        .find(|e| {
            of_type("Observation").any(|o| {
                o["encounter"]["reference"]
                    == format!("Encounter/{}", e["id"].as_str().unwrap()).as_str()
            })
        })
        .unwrap();
    let eref = key(enc);
    let want: Vec<String> = of_type("Observation")
        .filter(|o| o["encounter"]["reference"] == eref.as_str())
        .map(key)
        .collect();
    assert!(!want.is_empty(), "observations of {eref}");
    let b = search(
        app,
        &format!(
            "Encounter?_id={}&_revinclude=Observation:encounter",
            enc["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(
        sorted(ids(&b, "include")),
        sorted(want),
        "observations of {eref}"
    );
}
