//! FHIR R4 Validating Resources (validation.html): tests against the official examples, Synthea bundles and data-driven negative cases.

// Tests may unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ElementTable, IssueType, Problem, Validator};

const PROFILES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles");
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");

fn read_gz(name: &str) -> Value {
    let path = Path::new(PROFILES).join(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| read_gz("fhir.schema.json.gz"))
}

fn table() -> Arc<ElementTable> {
    static TABLE: OnceLock<Arc<ElementTable>> = OnceLock::new();
    TABLE
        .get_or_init(|| Arc::new(ElementTable::from_json(&read_gz("elements.json.gz")).unwrap()))
        .clone()
}

/// Compiled once for all tests: compiling is the expensive part.
fn validator() -> &'static Validator {
    static VALIDATOR: OnceLock<Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let started = Instant::now();
        let v = Validator::new(schema(), table()).unwrap();
        println!("Validator::new took {:?}", started.elapsed());
        v
    })
}

fn json_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(SHARED).join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[test]
fn validator_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Validator>();
    assert_send_sync::<ElementTable>();
}

#[test]
fn issue_codes() {
    let codes: Vec<&str> = [
        IssueType::Structure,
        IssueType::Required,
        IssueType::Value,
        IssueType::Invalid,
        IssueType::NotSupported,
    ]
    .iter()
    .map(IssueType::as_code)
    .collect();
    assert_eq!(
        codes,
        ["structure", "required", "value", "invalid", "not-supported"]
    );
}

#[test]
fn official_examples_all_valid_but_gingival_mass() {
    let v = validator();
    let files = json_files("fhir-r4/examples-json");
    assert_eq!(files.len(), 715);
    let mut times = Vec::new();
    let mut invalid = Vec::new();
    for path in &files {
        let resource = read_json(path);
        let started = Instant::now();
        let problems = v.validate(&resource);
        times.push(started.elapsed());
        if !problems.is_empty() {
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            println!("{name}: {problems:?}");
            invalid.push(name);
        }
    }
    let slowest = times.iter().max().copied().unwrap_or_default();
    println!(
        "examples: {} validated, median {:?}, slowest {:?}",
        files.len(),
        median(times),
        slowest
    );
    assert_eq!(invalid, ["DiagnosticReport-gingival-mass"]);
}

#[test]
fn gingival_mass_fails_on_its_display_pattern() {
    let path = Path::new(SHARED).join("fhir-r4/examples-json/DiagnosticReport-gingival-mass.json");
    let problems = validator().validate(&read_json(&path));
    assert!(!problems.is_empty());
    for p in &problems {
        assert_eq!(p.code, IssueType::Value, "{p:?}");
        assert!(p.expression.starts_with("DiagnosticReport."), "{p:?}");
        assert!(p.expression.ends_with(".display"), "{p:?}");
        assert!(p.message.len() < 200, "{p:?}");
    }
}

#[test]
fn synthea_bundles_and_entries_valid() {
    let v = validator();
    let mut entries = 0;
    let mut bundle_times = Vec::new();
    for path in json_files("synthea") {
        let bundle = read_json(&path);
        let started = Instant::now();
        let problems = v.validate(&bundle);
        bundle_times.push(started.elapsed());
        assert!(problems.is_empty(), "{}: {problems:?}", path.display());
        for entry in bundle["entry"].as_array().unwrap() {
            let problems = v.validate(&entry["resource"]);
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            entries += 1;
        }
    }
    println!(
        "synthea: {} bundles, {entries} entries valid; median bundle {:?}",
        bundle_times.len(),
        median(bundle_times)
    );
    assert!(entries > 1000);
}

/// Expected (code, expression) pairs, compared as sets with the problems found.
fn check(resource: Value, expected: &[(IssueType, &str)]) {
    let problems = validator().validate(&resource);
    for p in &problems {
        println!("  {} {} : {}", p.code.as_code(), p.expression, p.message);
    }
    let mut got: Vec<(IssueType, &str)> = problems
        .iter()
        .map(|p| (p.code, p.expression.as_str()))
        .collect();
    let mut want = expected.to_vec();
    got.sort_by_key(|(c, e)| (c.as_code(), e.to_string()));
    want.sort_by_key(|(c, e)| (c.as_code(), e.to_string()));
    assert_eq!(got, want, "resource {resource}\nproblems {problems:#?}");
    for p in &problems {
        assert!(p.message.len() <= 300, "message too long: {p:?}");
    }
}

/// (name, resource, expected (code, expression) pairs).
type Case = (&'static str, Value, Vec<(IssueType, &'static str)>);

#[test]
fn negative_cases() {
    use IssueType::{Required as R, Structure as S, Value as V};
    let cases: Vec<Case> = vec![
        (
            "bad gender code",
            json!({"resourceType": "Patient", "gender": "banana"}),
            vec![(V, "Patient.gender")],
        ),
        (
            "observation without status",
            json!({"resourceType": "Observation", "code": {"text": "x"}}),
            vec![(R, "Observation.status")],
        ),
        (
            "observation with status only as primitive extension",
            json!({"resourceType": "Observation", "code": {"text": "x"},
                   "_status": {"extension": [{"url": "http://example.org/why", "valueString": "unknown"}]}}),
            vec![],
        ),
        (
            "observation without status and code",
            json!({"resourceType": "Observation"}),
            vec![(R, "Observation.status"), (R, "Observation.code")],
        ),
        (
            "unknown top-level property",
            json!({"resourceType": "Patient", "colour": "blue"}),
            vec![(S, "Patient.colour")],
        ),
        (
            "unknown nested property",
            json!({"resourceType": "Patient", "name": [{"family": "X", "nick": "Y"}]}),
            vec![(S, "Patient.name[0].nick")],
        ),
        (
            "reference with empty id",
            json!({"resourceType": "Patient", "managingOrganization": {"reference": "Patient/"}}),
            vec![(V, "Patient.managingOrganization.reference")],
        ),
        (
            "string where array expected",
            json!({"resourceType": "Patient", "name": "Smith"}),
            vec![(S, "Patient.name")],
        ),
        (
            "string where nested array expected",
            json!({"resourceType": "Patient", "name": [{"given": "Jo"}]}),
            vec![(S, "Patient.name[0].given")],
        ),
        (
            "boolean as string reports the type once",
            json!({"resourceType": "Patient", "active": "yes"}),
            vec![(S, "Patient.active")],
        ),
        ("not an object", json!(["Patient"]), vec![(S, "")]),
        ("missing resourceType", json!({"id": "x"}), vec![(S, "")]),
        (
            "unknown resourceType",
            json!({"resourceType": "Spaceship"}),
            vec![(S, "Spaceship")],
        ),
        (
            "abstract resourceType",
            json!({"resourceType": "DomainResource"}),
            vec![(S, "DomainResource")],
        ),
        (
            "extension without url",
            json!({"resourceType": "Patient", "extension": [{"valueString": "x"}]}),
            vec![(R, "Patient.extension[0].url")],
        ),
        (
            "extension on a primitive without url",
            json!({"resourceType": "Patient", "gender": "male",
                   "_gender": {"extension": [{"valueString": "x"}]}}),
            vec![(R, "Patient.gender.extension[0].url")],
        ),
        (
            "narrative without div",
            json!({"resourceType": "Patient", "text": {"status": "generated"}}),
            vec![(R, "Patient.text.div")],
        ),
        (
            "bundle without type",
            json!({"resourceType": "Bundle"}),
            vec![(R, "Bundle.type")],
        ),
        (
            "request without method, entry without request",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": {"resourceType": "Patient"}},
                {"resource": {"resourceType": "Patient"}, "request": {"url": "Patient"}}
            ]}),
            vec![(R, "Bundle.entry[1].request.method")],
        ),
        (
            "contained resource checked by its own type",
            json!({"resourceType": "Patient", "contained": [
                {"resourceType": "Observation", "id": "o1", "code": {"text": "x"}}
            ]}),
            vec![(R, "Patient.contained[0].status")],
        ),
        (
            "choice element required",
            json!({"resourceType": "Library", "status": "draft", "type": {"text": "x"},
                   "useContext": [{"code": {"code": "age"}}]}),
            vec![(R, "Library.useContext[0].value")],
        ),
        (
            "contentReference recursion",
            json!({"resourceType": "Questionnaire", "status": "draft",
                   "item": [{"linkId": "1", "type": "group", "item": [{"type": "string"}]}]}),
            vec![(R, "Questionnaire.item[0].item[0].linkId")],
        ),
        (
            "reference inside an extension value",
            json!({"resourceType": "Patient", "extension": [
                {"url": "http://example.org/x", "valueReference": {"reference": "not a reference"}}
            ]}),
            vec![(V, "Patient.extension[0].valueReference.reference")],
        ),
        (
            "good references of every form",
            json!({"resourceType": "Patient",
            "contained": [{"resourceType": "Organization", "id": "org1"}],
            "generalPractitioner": [
                {"reference": "Practitioner/123"},
                {"reference": "Practitioner/a.b-c/_history/2"},
                {"reference": "http://example.org/fhir/Practitioner/1"},
                {"reference": "https://example.org/fhir/Organization/1/_history/3"},
                {"reference": "urn:uuid:7e0d5c8a-5d4e-4b1a-9c1e-2f0e3d4c5b6a"},
                {"reference": "urn:oid:1.2.840.113619.6.197"},
                {"reference": "#org1"},
                {"display": "no reference at all"}
            ]}),
            vec![],
        ),
        (
            "bad references of several forms",
            json!({"resourceType": "Patient", "generalPractitioner": [
                {"reference": "Spaceship/1"},
                {"reference": "Practitioner/1 2"},
                {"reference": "urn:uuid:zz"},
                {"reference": "Practitioner/1/_history/"},
                {"reference": "ftp://example.org/x"},
                {"reference": "urn:oid:1.02"},
                {"reference": "#a b"},
                {"reference": "Spaceship?identifier=x"},
                {"reference": "Practitioner/1/extra"}
            ]}),
            (0..9)
                .map(|_| (V, "Patient.generalPractitioner[?].reference"))
                .collect(),
        ),
        (
            "uri elements named reference are not literal references",
            json!({"resourceType": "DetectedIssue", "status": "final",
                   "reference": "some-local-doc"}),
            vec![],
        ),
        (
            "problems inside a bundle entry",
            json!({"resourceType": "Bundle", "type": "collection", "entry": [
                {"resource": {"resourceType": "Patient"}},
                {"resource": {"resourceType": "Patient", "gender": "banana"}},
                {"resource": {"resourceType": "Spaceship"}}
            ]}),
            vec![
                (V, "Bundle.entry[1].resource.gender"),
                (S, "Bundle.entry[2].resource.resourceType"),
            ],
        ),
    ];
    for (name, resource, expected) in cases {
        println!("case: {name}");
        if expected.iter().any(|(_, e)| e.contains("[?]")) {
            // Several array items: compare with the index blanked out.
            let problems = validator().validate(&resource);
            assert_eq!(problems.len(), expected.len(), "{name}: {problems:#?}");
            for (p, (code, expr)) in problems.iter().zip(&expected) {
                assert_eq!(p.code, *code, "{name}: {p:?}");
                let blanked: String = p
                    .expression
                    .split('[')
                    .map(|s| match s.split_once(']') {
                        Some((_, rest)) => format!("[?]{rest}"),
                        None => s.to_string(),
                    })
                    .collect();
                assert_eq!(blanked, *expr, "{name}: {p:?}");
            }
        } else {
            check(resource, &expected);
        }
    }
}

#[test]
fn messages_stay_short_for_hostile_values() {
    let long = "x".repeat(100_000);
    let resource = json!({"resourceType": "Patient", "gender": long, "birthDate": long,
        "managingOrganization": {"reference": long}, "active": [long]});
    let problems = validator().validate(&resource);
    assert!(problems.len() >= 3, "{problems:#?}");
    for p in &problems {
        assert!(p.message.len() < 200, "{p:?}");
        assert!(p.expression.len() < 100, "{p:?}");
    }
    let resource = json!({"resourceType": long});
    let problems = validator().validate(&resource);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].expression, "");
    assert!(problems[0].message.len() < 200);
}

/// Loads a Synthea bundle and breaks two entries: a Patient's gender and an Observation's
/// status. Both problems must come back, quickly (the root `oneOf` path took about a second).
#[test]
fn transaction_bundle_with_two_bad_entries_is_fast() {
    let v = validator();
    let path = json_files("synthea").remove(0);
    let mut bundle = read_json(&path);
    let entries = bundle["entry"].as_array_mut().unwrap();
    let patient = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == "Patient")
        .unwrap();
    let observation = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == "Observation")
        .unwrap();
    entries[patient]["resource"]["gender"] = json!("banana");
    entries[observation]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("status");
    let count = entries.len();
    v.validate(&bundle); // warm up lazily built regexes
    let started = Instant::now();
    let problems = v.validate(&bundle);
    let elapsed = started.elapsed();
    println!(
        "transaction bundle ({count} entries) with two bad entries: {elapsed:?}: {problems:#?}"
    );
    let want = [
        Problem {
            code: IssueType::Value,
            expression: format!("Bundle.entry[{patient}].resource.gender"),
            message: String::new(),
        },
        Problem {
            code: IssueType::Required,
            expression: format!("Bundle.entry[{observation}].resource.status"),
            message: String::new(),
        },
    ];
    assert_eq!(problems.len(), 2, "{problems:#?}");
    for w in &want {
        assert!(
            problems
                .iter()
                .any(|p| p.code == w.code && p.expression == w.expression),
            "missing {w:?}"
        );
    }
    assert!(elapsed < Duration::from_millis(200), "{elapsed:?}");
}

/// Thousands of bad entries: the report is capped and the time stays bounded.
#[test]
fn problems_are_capped_on_huge_inputs() {
    let entries: Vec<Value> = (0..5000)
        .map(|i| {
            json!({"fullUrl": format!("urn:uuid:00000000-0000-0000-0000-{i:012}"),
                   "resource": {"resourceType": "Observation", "gender": "x", "subject": {"reference": "bad ref"}},
                   "request": {"method": "POST", "url": "Observation"}})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let started = Instant::now();
    let problems = validator().validate(&bundle);
    let elapsed = started.elapsed();
    println!(
        "bundle with 5000 bad entries: {} problems in {elapsed:?}",
        problems.len()
    );
    assert_eq!(problems.len(), 100);
    assert!(problems[99].message.contains("more than 100"));
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

/// The top-level keys of the element table agree with the schema's properties (besides
/// `resourceType`), so the `_key` twin rules match the official JSON format. The one known
/// difference: the R4 schema generator leaves out the `_key` twin of most `canonical`
/// elements (39 of 41), which the JSON format (R4 json.html#primitive) does allow; the table keeps them.
#[test]
fn element_table_agrees_with_schema_properties() {
    let t = table();
    let types = t.resource_types();
    assert_eq!(types.len(), 146);
    assert!(types.windows(2).all(|w| w[0] < w[1]));
    assert!(!types.contains(&"DomainResource"));
    let mut canonical_twins = 0;
    for rt in types {
        let props = schema()["definitions"][rt]["properties"]
            .as_object()
            .unwrap();
        let ours = t.top_level_keys(rt).unwrap();
        for key in props.keys() {
            assert!(
                key == "resourceType" || ours.contains(key),
                "{rt}.{key} missing"
            );
        }
        for key in ours.iter().filter(|k| !props.contains_key(*k)) {
            let base = key
                .strip_prefix('_')
                .unwrap_or_else(|| panic!("{rt}.{key} extra"));
            let prop = &props[base];
            let target = prop["$ref"].as_str().or(prop["items"]["$ref"].as_str());
            assert_eq!(target, Some("#/definitions/canonical"), "{rt}.{key}");
            canonical_twins += 1;
        }
    }
    assert_eq!(canonical_twins, 39);
}

#[test]
fn element_table_top_level_keys() {
    let t = table();
    let summary = t.top_level_summary_keys("Patient").unwrap();
    for key in [
        "id",
        "meta",
        "identifier",
        "gender",
        "_gender",
        "deceasedBoolean",
        "_deceasedBoolean",
        "deceasedDateTime",
        "link",
    ] {
        assert!(summary.contains(&key.to_string()), "{key} in {summary:?}");
    }
    for key in ["_id", "photo", "contact", "text", "resourceType"] {
        assert!(!summary.contains(&key.to_string()), "{key} in {summary:?}");
    }
    assert_eq!(
        t.mandatory_top_level_keys("Observation").unwrap(),
        ["status", "_status", "code"]
    );
    assert_eq!(
        t.mandatory_top_level_keys("Bundle").unwrap(),
        ["type", "_type"]
    );
    assert!(t.top_level_keys("HumanName").is_none());
    assert!(t.top_level_keys("DomainResource").is_none());
    assert!(t.top_level_summary_keys("Spaceship").is_none());
    assert!(ElementTable::from_json(&json!({"types": 3})).is_err());
    assert!(ElementTable::from_json(&json!({"types": {}})).is_err());
}

/// No panic on arbitrary shapes: every top-level value of some examples replaced by each JSON
/// kind, and deeply nested input.
#[test]
fn never_panics_on_odd_shapes() {
    let v = validator();
    let replacements = [
        json!(null),
        json!(1),
        json!("x"),
        json!([]),
        json!({}),
        json!([null, 1, {}]),
        json!({"reference": 5, "resourceType": {}}),
    ];
    for name in [
        "Patient-example",
        "Bundle-bundle-example",
        "Questionnaire-f201",
    ] {
        let path = Path::new(SHARED).join(format!("fhir-r4/examples-json/{name}.json"));
        let original = read_json(&path);
        for key in original.as_object().unwrap().keys() {
            for r in &replacements {
                let mut changed = original.clone();
                changed[key] = r.clone();
                let _ = v.validate(&changed);
            }
        }
    }
    // serde_json refuses documents nested deeper than 128, so about 120 levels is the most
    // the HTTP layer can hand over.
    let mut item = json!({"linkId": "1", "type": "group"});
    for _ in 0..60 {
        item = json!({"linkId": "1", "type": "group", "item": [item]});
    }
    let deep = json!({"resourceType": "Questionnaire", "status": "draft", "item": [item]});
    assert!(v.validate(&deep).is_empty());
    for odd in [
        json!(null),
        json!(1),
        json!("Patient"),
        json!({"resourceType": 1}),
    ] {
        assert_eq!(v.validate(&odd).len(), 1);
    }
}
