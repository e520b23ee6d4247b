//! Golden tests for the HL7 v2 → FHIR R4 mapping (v2-to-FHIR IG, IHE PCD-01 TF-2 appendix E):
//! message in, transaction Bundle out, plus the properties every Bundle must have.
//!
//! Goldens live in `tests/golden/hl7v2/<name>.{hl7,json}`; `UPDATE_GOLDEN=1 cargo test`
//! rewrites the JSON after a deliberate mapping change (review the diff).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::{MapContext, MapError, Mapped, Terminology, map};
use crate::hl7v2::message::{Component, Delimiters, Field, Message, Repetition, Segment};

// ---------------------------------------------------------------------------------------
// A test-only splitter: CR/LF segments, `|^~&` delimiters, no escape handling.

fn split_field(s: &str) -> Field {
    Field {
        repetitions: s
            .split('~')
            .map(|r| Repetition {
                components: r
                    .split('^')
                    .map(|c| Component {
                        subcomponents: c.split('&').map(str::to_string).collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn literal(s: &str) -> Field {
    Field {
        repetitions: vec![Repetition {
            components: vec![Component {
                subcomponents: vec![s.to_string()],
            }],
        }],
    }
}

fn split_segment(line: &str) -> Segment {
    let mut parts = line.split('|');
    let id = parts.next().unwrap_or_default().to_string();
    let mut fields = Vec::new();
    if id == "MSH" {
        // MSH-1 is the field separator itself and MSH-2 the encoding characters.
        fields.push(literal("|"));
        let rest: Vec<&str> = parts.collect();
        fields.push(literal(rest.first().copied().unwrap_or_default()));
        fields.extend(rest.iter().skip(1).map(|f| split_field(f)));
    } else {
        fields.extend(parts.map(split_field));
    }
    Segment { id, fields }
}

pub(crate) fn parse(text: &str) -> Message {
    Message {
        segments: text
            .split(['\r', '\n'])
            .filter(|l| !l.trim().is_empty())
            .map(split_segment)
            .collect(),
        delimiters: Delimiters {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
            truncation: None,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/hl7v2");
const NAMES: [&str; 9] = [
    "adt_a01",
    "adt_a08",
    "adt_a03",
    "oru_lab",
    "rde_o11",
    "ras_o17",
    "pcd01_philips",
    "pcd01_acme",
    "pcd01_eui64",
];

fn terminology() -> Terminology {
    let maps: Vec<Value> = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/terminology/mdc-to-loinc.json"),
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/terminology/mdc-units-to-ucum.json"
        ),
    ]
    .iter()
    .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
    .collect();
    Terminology::from_concept_maps(&maps).unwrap()
}

fn message(name: &str) -> String {
    std::fs::read_to_string(PathBuf::from(GOLDEN).join(format!("{name}.hl7"))).unwrap()
}

fn map_text(text: &str, t: &Terminology) -> Result<Mapped, Vec<MapError>> {
    map(
        &parse(text),
        &MapContext {
            terminology: t,
            message_ref: "Binary/raw-message-1".into(),
        },
    )
}

/// Maps `<name>.hl7` and compares the Bundle with `<name>.json`.
fn golden(name: &str) -> Mapped {
    let t = terminology();
    let mapped = map_text(&message(name), &t).unwrap_or_else(|e| panic!("{name}: {e:#?}"));
    let path = PathBuf::from(GOLDEN).join(format!("{name}.json"));
    let pretty = serde_json::to_string_pretty(&mapped.bundle).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &pretty).unwrap();
    }
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    if expected != mapped.bundle {
        let actual = std::env::temp_dir().join(format!("{name}.actual.json"));
        std::fs::write(&actual, &pretty).unwrap();
        panic!(
            "{name}: Bundle differs from {} (actual written to {})",
            path.display(),
            actual.display()
        );
    }
    check_bundle(name, &mapped.bundle);
    mapped
}

/// What every Bundle must satisfy: unique fullUrls, every `urn:uuid:` reference resolves
/// inside the Bundle, conditional requests on identifiers the resource carries, and a
/// Provenance that targets everything else.
fn check_bundle(name: &str, bundle: &Value) {
    assert_eq!(bundle["type"], "transaction");
    let entries = bundle["entry"].as_array().unwrap();
    let urls: BTreeSet<&str> = entries
        .iter()
        .map(|e| e["fullUrl"].as_str().unwrap())
        .collect();
    assert_eq!(urls.len(), entries.len(), "{name}: duplicate fullUrls");
    let mut refs = Vec::new();
    collect_refs(bundle, &mut refs);
    for r in refs.iter().filter(|r| r.starts_with("urn:uuid:")) {
        assert!(urls.contains(r.as_str()), "{name}: dangling reference {r}");
    }
    for e in entries {
        let ty = e["resource"]["resourceType"].as_str().unwrap();
        let req = &e["request"];
        match req["method"].as_str().unwrap() {
            "PUT" => assert!(req["url"].as_str().unwrap().starts_with(&format!("{ty}?"))),
            "POST" => {
                assert_eq!(req["url"], ty);
                assert!(
                    req["ifNoneExist"].is_string(),
                    "{name}: POST without ifNoneExist"
                );
            }
            m => panic!("{name}: method {m}"),
        }
        assert!(e["resource"].get("id").is_none());
    }
    let provenance = entries.last().unwrap();
    assert_eq!(provenance["resource"]["resourceType"], "Provenance");
    let targets: BTreeSet<&str> = provenance["resource"]["target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets.len(),
        entries.len() - 1,
        "{name}: Provenance must target every other entry"
    );
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("reference", Value::String(s)) => out.push(s.clone()),
                    _ => collect_refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

fn resources<'a>(bundle: &'a Value, ty: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == ty)
        .map(|e| &e["resource"])
        .collect()
}

fn entry_of<'a>(bundle: &'a Value, full_url: &str) -> &'a Value {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["fullUrl"] == full_url)
        .unwrap()
}

fn url_of(bundle: &Value, resource: &Value) -> String {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| &e["resource"] == resource)
        .unwrap()["fullUrl"]
        .as_str()
        .unwrap()
        .to_string()
}

fn has_coding(cc: &Value, system: &str, code: &str) -> bool {
    cc["coding"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["system"] == system && c["code"] == code))
}

const MDC: &str = "urn:iso:std:iso:11073:10101";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

// ---------------------------------------------------------------------------------------
// ADT

#[test]
fn adt_a01_admit() {
    let m = golden("adt_a01");
    let b = &m.bundle;
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(
        entries[0]["request"],
        json!({"method": "PUT", "url": "Patient?identifier=urn:hl7v2:authority:GHH|555-44-4444"})
    );
    let p = resources(b, "Patient")[0];
    assert_eq!(
        p["identifier"][1]["system"],
        "urn:oid:2.16.840.1.113883.4.1"
    );
    assert_eq!(p["identifier"][0]["type"]["coding"][0]["code"], "MR");
    assert_eq!(p["name"][0]["use"], "official");
    assert_eq!(p["name"][0]["given"], json!(["EVE", "E"]));
    assert_eq!(p["name"][1]["use"], "maiden");
    assert_eq!(
        (p["gender"].as_str(), p["birthDate"].as_str()),
        (Some("female"), Some("1962-03-20"))
    );
    assert_eq!(
        p["telecom"][1],
        json!({"system": "email", "value": "eve@example.org", "use": "home"})
    );
    assert_eq!(p["telecom"][2]["use"], "work");

    let e = resources(b, "Encounter")[0];
    assert_eq!(
        (e["status"].as_str(), e["class"]["code"].as_str()),
        (Some("in-progress"), Some("IMP"))
    );
    assert_eq!(e["identifier"][0]["value"], "V1234");
    assert_eq!(
        e["period"]["start"], "2024-03-05T14:00:00-05:00",
        "no PV1-44 offset: MSH-7's"
    );
    let roles: Vec<&str> = e["participant"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["type"][0]["coding"][0]["code"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["ATND", "REF", "ADM"]);
    assert_eq!(
        e["participant"][0]["individual"]["identifier"]["system"],
        "urn:oid:1.2.3.4"
    );

    // Location chain: bed → room → ward → level → building → site.
    let locations = resources(b, "Location");
    let kinds: Vec<&str> = locations
        .iter()
        .map(|l| l["physicalType"]["coding"][0]["code"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["si", "bu", "lvl", "wa", "ro", "bd"]);
    let bed = entry_of(
        b,
        e["location"][0]["location"]["reference"].as_str().unwrap(),
    );
    assert_eq!(
        bed["resource"]["identifier"][0]["value"],
        "si:GHH|bu:B1|lvl:2|wa:2000|ro:2012|bd:01"
    );
    let room = entry_of(b, bed["resource"]["partOf"]["reference"].as_str().unwrap());
    assert_eq!(room["resource"]["name"], "2012");
    assert!(locations[0].get("partOf").is_none());

    let rp = resources(b, "RelatedPerson")[0];
    assert!(has_coding(
        &rp["relationship"][0],
        "http://terminology.hl7.org/CodeSystem/v2-0063",
        "SPO"
    ));
    assert!(has_coding(
        &rp["relationship"][1],
        "http://terminology.hl7.org/CodeSystem/v2-0131",
        "EC"
    ));
    let allergies = resources(b, "AllergyIntolerance");
    assert_eq!(allergies.len(), 2);
    assert_eq!(
        (
            allergies[0]["category"][0].as_str(),
            allergies[0]["criticality"].as_str()
        ),
        (Some("medication"), Some("high"))
    );
    assert_eq!(
        allergies[0]["reaction"][0]["manifestation"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(allergies[1]["code"], json!({"text": "Peanuts"}));
    let c = resources(b, "Condition")[0];
    assert!(has_coding(
        &c["code"],
        "http://hl7.org/fhir/sid/icd-10",
        "K35.80"
    ));
    assert_eq!(c["verificationStatus"]["coding"][0]["code"], "provisional");
    assert_eq!(c["encounter"]["reference"], url_of(b, e));

    let prov = resources(b, "Provenance")[0];
    assert_eq!(prov["recorded"], "2024-03-05T14:30:00-05:00");
    assert_eq!(prov["activity"]["coding"][0]["code"], "A01");
    assert_eq!(
        prov["entity"][0]["what"]["reference"],
        "Binary/raw-message-1"
    );
    assert_eq!(prov["entity"][0]["what"]["identifier"]["value"], "MSG00001");
    assert_eq!(
        prov["agent"][1]["who"]["identifier"]["value"],
        "urn:oid:1.2.840.114350.1.13.99.2.7.1"
    );
    assert_eq!(
        entries.last().unwrap()["request"]["ifNoneExist"],
        "_tag=urn:hl7v2:message:GOOD%2520HEALTH%2520HOSPITAL|MSG00001"
    );
    assert!(
        m.warnings.iter().any(|w| w.contains("Z-segment ZPI")),
        "{:?}",
        m.warnings
    );
}

#[test]
fn adt_a40_merge_links_survivor_and_retired_prior() {
    let m = golden("adt_a40");
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    let patients = resources(&m.bundle, "Patient");
    assert_eq!(patients.len(), 2);
    let (survivor, prior) = (patients[0], patients[1]);
    assert_eq!(survivor["identifier"][0]["value"], "555-44-4444");
    assert_eq!(survivor["link"][0]["type"], "replaces");
    assert_eq!(prior["identifier"][0]["value"], "555-44-9999");
    assert_eq!(prior["active"], false);
    assert_eq!(prior["link"][0]["type"], "replaced-by");
    let entries = m.bundle["entry"].as_array().unwrap();
    let url_of = |value: &str| {
        entries
            .iter()
            .find(|e| e["resource"]["identifier"][0]["value"] == value)
            .map(|e| e["fullUrl"].clone())
            .unwrap()
    };
    assert_eq!(
        survivor["link"][0]["other"]["reference"],
        url_of("555-44-9999")
    );
    assert_eq!(
        prior["link"][0]["other"]["reference"],
        url_of("555-44-4444")
    );

    // Without MRG, or merging a patient into itself: AE, nothing written.
    let t = terminology();
    let text = message("adt_a40");
    let no_mrg: String = text
        .split('\r')
        .filter(|s| !s.starts_with("MRG"))
        .collect::<Vec<_>>()
        .join("\r");
    assert!(map_text(&no_mrg, &t).is_err());
    let same = text.replace("MRG|555-44-9999", "MRG|555-44-4444");
    assert!(map_text(&same, &t).is_err());
}

#[test]
fn adt_a08_update_and_a03_discharge() {
    let m = golden("adt_a08");
    let e = resources(&m.bundle, "Encounter")[0];
    assert_eq!(e["status"], "in-progress");
    assert!(
        m.warnings.iter().any(|w| w.contains("PID-8")),
        "{:?}",
        m.warnings
    );
    assert!(
        m.warnings.iter().any(|w| w.contains("segment PD1")),
        "{:?}",
        m.warnings
    );
    assert_eq!(resources(&m.bundle, "Patient")[0]["deceasedBoolean"], false);

    let d = golden("adt_a03");
    let e3 = resources(&d.bundle, "Encounter")[0];
    assert_eq!(e3["status"], "finished");
    assert_eq!(e3["period"]["end"], "2024-03-08T11:00:00-05:00");
    assert_eq!(e3["location"][0]["status"], "completed");
    assert_eq!(
        e3["hospitalization"]["dischargeDisposition"]["coding"][0]["code"],
        "01"
    );
    // Same visit number, same Encounter across A01, A08, A03.
    let a01 = golden("adt_a01");
    let url = |b: &Value| {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["resource"]["resourceType"] == "Encounter")
            .unwrap()["request"]["url"]
            .clone()
    };
    assert_eq!(url(&a01.bundle), url(&d.bundle));
    assert_eq!(url(&a01.bundle), url(&m.bundle));
    assert_eq!(
        resources(&d.bundle, "Condition")[0]["verificationStatus"]["coding"][0]["code"],
        "confirmed"
    );
    assert_eq!(
        resources(&d.bundle, "Provenance")[0]["occurredDateTime"],
        "2024-03-08T11:00:00-05:00"
    );
}

// ---------------------------------------------------------------------------------------
// ORU lab

#[test]
fn oru_lab_value_types() {
    let m = golden("oru_lab");
    let b = &m.bundle;
    let obs = resources(b, "Observation");
    assert_eq!(obs.len(), 11);
    let glucose = obs[0];
    assert_eq!(
        glucose["valueQuantity"],
        json!({"value": 182, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"})
    );
    assert_eq!(glucose["referenceRange"][0]["low"]["value"], 70);
    assert_eq!(glucose["interpretation"][0]["coding"][0]["code"], "H");
    assert_eq!(glucose["note"][0]["text"], "Patient was not fasting");
    assert_eq!(glucose["effectiveDateTime"], "2024-03-06T08:30:00+01:00");
    assert_eq!(obs[1]["valueString"], "Straw yellow");
    assert_eq!(
        obs[1]["effectiveDateTime"], "2024-03-06T08:30:00+01:00",
        "OBR-7 inherited"
    );
    assert!(has_coding(
        &obs[2]["valueCodeableConcept"],
        "http://snomed.info/sct",
        "112283007"
    ));
    assert_eq!(obs[2]["status"], "preliminary");
    assert_eq!(
        obs[3]["valueQuantity"],
        json!({"value": 0.5, "comparator": "<", "unit": "mg/L", "system": UCUM, "code": "mg/L"})
    );
    assert_eq!(
        obs[3]["referenceRange"][0],
        json!({"high": {"value": 5, "unit": "mg/L", "system": UCUM, "code": "mg/L"}, "text": "<5"})
    );
    assert_eq!(obs[4]["valueRange"]["high"]["value"], 400);
    assert_eq!(obs[4]["status"], "corrected");
    assert_eq!(
        obs[5]["valueRatio"],
        json!({"numerator": {"value": 1}, "denominator": {"value": 128}})
    );
    assert_eq!(obs[5]["referenceRange"][0], json!({"text": "<1:40"}));
    assert_eq!(obs[6]["valueDateTime"], "2024-02-15");
    assert_eq!(obs[7]["valueTime"], "08:30:00");
    assert_eq!(obs[8]["valueString"], "Line one\nLine two");
    assert_eq!(
        obs[9]["valueQuantity"],
        json!({"value": 1.1, "unit": "mg/dL"}),
        "ISO+ is not UCUM: no code"
    );
    assert_eq!(obs[9]["status"], "cancelled");
    assert_eq!(
        obs[10]["dataAbsentReason"]["coding"][0]["code"],
        "unsupported"
    );
    assert!(m.warnings.iter().any(|w| w.contains("value type ED")));

    let dr = resources(b, "DiagnosticReport")[0];
    assert_eq!(dr["result"].as_array().unwrap().len(), 11);
    assert_eq!(
        (dr["status"].as_str(), dr["issued"].as_str()),
        (Some("final"), Some("2024-03-06T10:10:00+01:00"))
    );
    let sr = resources(b, "ServiceRequest")[0];
    assert_eq!(dr["basedOn"][0]["reference"], url_of(b, sr));
    assert_eq!(sr["identifier"][0]["type"]["coding"][0]["code"], "PLAC");
    // Result feeds never overwrite ADT's Patient or Encounter: create-if-absent.
    for ty in ["Patient", "Encounter", "ServiceRequest"] {
        let e = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["resource"]["resourceType"] == ty)
            .unwrap();
        assert_eq!(e["request"]["method"], "POST", "{ty}");
    }
    let id = glucose["identifier"][0]["value"].as_str().unwrap();
    assert_eq!(id, "GHH LAB|LABF888|1|2345-7|20240306083000");
}

// ---------------------------------------------------------------------------------------
// Pharmacy

#[test]
fn rde_o11_order() {
    let m = golden("rde_o11");
    let b = &m.bundle;
    let med = resources(b, "Medication")[0];
    assert!(has_coding(
        &med["code"],
        "http://www.nlm.nih.gov/research/umls/rxnorm",
        "197361"
    ));
    let r = resources(b, "MedicationRequest")[0];
    assert_eq!(
        (r["status"].as_str(), r["intent"].as_str()),
        (Some("active"), Some("order"))
    );
    assert_eq!(r["medicationReference"]["reference"], url_of(b, med));
    assert_eq!(r["authoredOn"], "2024-03-07T08:55:00-05:00");
    assert_eq!(r["requester"]["display"], "DR DANA DOC");
    let dose = &r["dosageInstruction"][0];
    assert_eq!(
        dose["doseAndRate"][0]["doseQuantity"],
        json!({"value": 5, "unit": "milligram", "system": UCUM, "code": "mg"})
    );
    assert!(has_coding(
        &dose["route"],
        "http://terminology.hl7.org/CodeSystem/v2-0162",
        "PO"
    ));
    assert_eq!(r["dispenseRequest"]["numberOfRepeatsAllowed"], 2);
    let req = &b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "Medication")
        .unwrap()["request"];
    assert_eq!(
        req["url"],
        "Medication?code=http://www.nlm.nih.gov/research/umls/rxnorm|197361"
    );
}

#[test]
fn ras_o17_administrations() {
    let m = golden("ras_o17");
    let b = &m.bundle;
    let admins = resources(b, "MedicationAdministration");
    assert_eq!(admins.len(), 2);
    assert_eq!(
        (
            admins[0]["status"].as_str(),
            admins[0]["effectiveDateTime"].as_str()
        ),
        (Some("completed"), Some("2024-03-07T12:00:00-05:00"))
    );
    assert_eq!(admins[0]["dosage"]["dose"]["value"], 5);
    assert_eq!(
        admins[0]["performer"][0]["actor"]["display"],
        "RN NANCY NURSE"
    );
    assert_eq!(admins[1]["status"], "not-done");
    assert_eq!(admins[1]["statusReason"][0]["coding"][0]["code"], "PATREF");
    let req = resources(b, "MedicationRequest")[0];
    assert_eq!(admins[0]["request"]["reference"], url_of(b, req));
    // The request found by RAS is the one RDE wrote: same identity, same fullUrl.
    let rde = golden("rde_o11");
    let url = |b: &Value| {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["resource"]["resourceType"] == "MedicationRequest")
            .unwrap()["fullUrl"]
            .clone()
    };
    assert_eq!(url(b), url(&rde.bundle));
    assert_eq!(
        resources(b, "Medication"),
        resources(&rde.bundle, "Medication")
    );
}

// ---------------------------------------------------------------------------------------
// IHE PCD-01

#[test]
fn pcd01_philips_device_tree_and_vitals() {
    let m = golden("pcd01_philips");
    let b = &m.bundle;
    let devices = resources(b, "Device");
    let types: Vec<&str> = devices
        .iter()
        .map(|d| d["type"]["coding"][0]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["69965", "70686", "70675", "4262", "4263", "69642", "70771"]
    );
    let mds = devices[0];
    assert_eq!(
        mds["patient"]["reference"],
        url_of(b, resources(b, "Patient")[0])
    );
    assert_eq!(
        mds["identifier"][0],
        json!({"system": "urn:hl7v2:device:Philips", "value": "e86c094f-f751-4acf-92b2-38f11c1f6f57-Device"})
    );
    assert!(mds.get("parent").is_none());
    // VMD → MDS, channel → VMD; the channel inherits the VMD's OBX-18.
    assert_eq!(devices[1]["parent"]["reference"], url_of(b, mds));
    assert_eq!(devices[2]["parent"]["reference"], url_of(b, devices[1]));
    assert_eq!(devices[2]["identifier"][0]["value"], "0600dc750001");
    assert!(devices[2].get("patient").is_none());

    let obs = resources(b, "Observation");
    // 17 rows: 7 describe devices, 3 NIBP members become one Observation, 7 others.
    assert_eq!(obs.len(), 8);
    let bp = obs
        .iter()
        .find(|o| has_coding(&o["code"], LOINC, "85354-9"))
        .unwrap();
    assert!(has_coding(&bp["code"], MDC, "150020"));
    let components = bp["component"].as_array().unwrap();
    let loincs: Vec<&str> = components
        .iter()
        .map(|c| c["code"]["coding"][1]["code"].as_str().unwrap())
        .collect();
    assert_eq!(loincs, ["8480-6", "8462-4", "8478-0"]);
    assert!(has_coding(&components[0]["code"], MDC, "150021"));
    assert_eq!(
        components[0]["valueQuantity"],
        json!({"value": 117, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"})
    );
    assert_eq!(components[0]["referenceRange"][0]["low"]["value"], 90);
    assert_eq!(
        bp["effectiveDateTime"], "2015-01-22T11:50:00+00:00",
        "OBX-14 (MSH-7 offset)"
    );
    assert_eq!(
        bp["device"]["reference"],
        url_of(b, devices[2]),
        "the NIBP channel"
    );
    assert_eq!(bp["category"][0]["coding"][0]["code"], "vital-signs");

    let hr = obs
        .iter()
        .find(|o| has_coding(&o["code"], MDC, "147842"))
        .unwrap();
    assert!(has_coding(&hr["code"], LOINC, "8867-4"));
    assert_eq!(hr["code"]["coding"][0]["display"], "MDC_ECG_CARD_BEAT_RATE");
    assert_eq!(hr["valueQuantity"]["code"], "/min");
    assert_eq!(
        hr["effectiveDateTime"], "2015-01-22T18:26:56+00:00",
        "no OBX-14 anywhere: OBR-7"
    );
    assert_eq!(hr["status"], "final");
    let metric = entry_of(b, hr["device"]["reference"].as_str().unwrap());
    assert_eq!(metric["resource"]["resourceType"], "DeviceMetric");
    assert_eq!(metric["resource"]["source"]["reference"], url_of(b, mds));
    assert_eq!(
        metric["resource"]["parent"]["reference"],
        url_of(b, devices[4])
    );
    let spo2 = obs
        .iter()
        .find(|o| has_coding(&o["code"], MDC, "150456"))
        .unwrap();
    assert!(
        has_coding(&spo2["code"], LOINC, "2708-6") && has_coding(&spo2["code"], LOINC, "59408-5")
    );
    let rhythm = obs
        .iter()
        .find(|o| has_coding(&o["code"], MDC, "184327"))
        .unwrap();
    assert_eq!(
        rhythm["valueCodeableConcept"],
        json!({"text": "MDC_ECG_SINUS_RHY"})
    );
    assert!(rhythm.get("category").is_none(), "no LOINC vital sign");
    let qt = obs
        .iter()
        .find(|o| has_coding(&o["code"], MDC, "147232"))
        .unwrap();
    assert_eq!(qt["valueQuantity"]["code"], "ms");
    // Device description rows are never Observations.
    for code in ["69965", "70686", "70675", "4262", "4263", "69642", "70771"] {
        assert!(
            !obs.iter().any(|o| has_coding(&o["code"], MDC, code)),
            "{code}"
        );
    }
    assert_eq!(resources(b, "DeviceMetric").len(), 10);
    assert!(resources(b, "DiagnosticReport").is_empty() && resources(b, "Encounter").is_empty());
}

#[test]
fn pcd01_acme_gateway() {
    let m = golden("pcd01_acme");
    let b = &m.bundle;
    let devices = resources(b, "Device");
    assert_eq!(devices.len(), 3);
    // No OBX-18 on device rows: the MDS takes the equipment id sent on its metrics.
    assert_eq!(
        devices[0]["identifier"][0],
        json!({"system": "urn:hl7v2:device:GATEWAY_ACME", "value": "080019FFFE3ED02D172.16.172.135"})
    );
    let obs = resources(b, "Observation");
    assert_eq!(obs.len(), 2);
    let bp = obs
        .iter()
        .find(|o| has_coding(&o["code"], LOINC, "85354-9"))
        .unwrap();
    assert_eq!(bp["component"].as_array().unwrap().len(), 3);
    assert_eq!(
        bp["component"][0]["valueQuantity"],
        json!({"value": 111, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"})
    );
    assert_eq!(bp["effectiveDateTime"], "2011-06-02T04:58:42+00:00");
    let pulse = obs
        .iter()
        .find(|o| has_coding(&o["code"], MDC, "149546"))
        .unwrap();
    assert!(has_coding(&pulse["code"], LOINC, "8867-4"));
    assert_eq!(pulse["valueQuantity"]["code"], "{beat}/min");
    assert_eq!(pulse["status"], "final");
    let p = resources(b, "Patient")[0];
    assert_eq!(p["identifier"][0]["system"], "urn:hl7v2:authority:A");
    let agent = &resources(b, "Provenance")[0]["agent"][0]["who"]["identifier"];
    assert_eq!(
        agent,
        &json!({"system": "urn:ieee:eui64", "value": "080019FFFE3ED02D"})
    );
}

#[test]
fn pcd01_eui64_compound_and_inherited_time() {
    let m = golden("pcd01_eui64");
    let b = &m.bundle;
    let devices = resources(b, "Device");
    assert_eq!(
        devices[0]["identifier"][0],
        json!({"system": "urn:ieee:eui64", "value": "080019FFFE0B4020"})
    );
    assert!(
        devices
            .iter()
            .all(|d| d["identifier"][0]["value"] == "080019FFFE0B4020"),
        "inherited by children"
    );
    let bp = resources(b, "Observation")
        .into_iter()
        .find(|o| has_coding(&o["code"], LOINC, "85354-9"))
        .unwrap();
    assert_eq!(bp["component"].as_array().unwrap().len(), 3);
    assert_eq!(
        bp["effectiveDateTime"], "2024-03-08T10:13:00-05:00",
        "the channel's OBX-14"
    );
    assert_eq!(
        entry_of(b, bp["device"]["reference"].as_str().unwrap())["resource"]["type"]["coding"][0]["code"],
        "150020"
    );
    let temp = resources(b, "Observation")
        .into_iter()
        .find(|o| has_coding(&o["code"], MDC, "150364"))
        .unwrap();
    assert!(has_coding(&temp["code"], LOINC, "8310-5"));
    assert_eq!(
        temp["valueQuantity"],
        json!({"value": 37.2, "unit": "°C", "system": UCUM, "code": "Cel"})
    );
    assert_eq!(temp["effectiveDateTime"], "2024-03-08T10:14:10-05:00");
    let pr = resources(b, "Observation")
        .into_iter()
        .find(|o| has_coding(&o["code"], MDC, "149530"))
        .unwrap();
    assert_eq!(
        pr["effectiveDateTime"], "2024-03-08T10:14:00-05:00",
        "OBR-7"
    );
    assert_eq!(
        resources(b, "Patient")[0]["identifier"][0]["system"],
        "urn:oid:2.16.840.1.113883.19.5"
    );
}

// ---------------------------------------------------------------------------------------
// Properties

#[test]
fn same_message_same_bundle() {
    let t = terminology();
    for name in NAMES {
        let text = message(name);
        let a = map_text(&text, &t).unwrap();
        let b = map_text(&text, &t).unwrap();
        assert_eq!(a, b, "{name}");
        // LF or CR segment endings make no difference.
        let c = map_text(&text.replace('\n', "\r"), &t).unwrap();
        assert_eq!(a, c, "{name}");
    }
}

#[test]
fn required_fields_are_reported_together() {
    let t = terminology();
    let oru = "MSH|^~\\&|LAB|GHH|||20240306101500||ORU^R01|X1|P|2.5.1\nPID|||1^^^GHH^MR\nOBR|1||F1|24323-8^Panel^LN|||20240306\nOBX|1|NM|||12\nOBX|2|NM|2345-7^Glucose^LN||abc\nOBX|3|NM|||1";
    let errors = map_text(oru, &t).unwrap_err();
    let found: Vec<(&str, usize, Option<usize>, u16)> = errors
        .iter()
        .map(|e| (e.segment.as_str(), e.sequence, e.field, e.code))
        .collect();
    assert_eq!(
        found,
        [
            ("OBX", 1, Some(3), 101),
            ("OBX", 2, Some(5), 102),
            ("OBX", 3, Some(3), 101)
        ]
    );
    assert!(
        errors[0].to_string().starts_with("OBX[1]-3: "),
        "{}",
        errors[0]
    );

    let adt = "MSH|^~\\&|ADT|GHH|||20240306101500||ADT^A01|X2|P|2.5.1\nPID|1||\nPV1|1|I";
    let e = map_text(adt, &t).unwrap_err();
    assert_eq!(
        (e[0].segment.as_str(), e[0].field, e[0].code),
        ("PID", Some(3), 101)
    );

    let no_pv1 = "MSH|^~\\&|ADT|GHH|||20240306101500||ADT^A03|X3|P|2.5.1\nPID|1||7^^^GHH^MR";
    assert_eq!(map_text(no_pv1, &t).unwrap_err()[0].segment, "PV1");

    let ack = "MSH|^~\\&|ADT|GHH|||20240306101500||ACK^A01|X4|P|2.5.1\nMSA|AA|X1";
    assert_eq!(map_text(ack, &t).unwrap_err()[0].code, 200);
    let no_type = "MSH|^~\\&|ADT|GHH|||20240306101500|||X5|P|2.5.1";
    assert_eq!(map_text(no_type, &t).unwrap_err()[0].field, Some(9));
    let bad_time = "MSH|^~\\&|ADT|GHH|||2024-03-06||ADT^A28||P|2.5.1\nPID|1||7^^^GHH^MR";
    let e = map_text(bad_time, &t).unwrap_err();
    assert_eq!(
        e.iter().map(|e| (e.field, e.code)).collect::<Vec<_>>(),
        [(Some(10), 101), (Some(7), 102)]
    );
    assert!(map_text("", &t).is_err());
}

#[test]
fn person_only_events_write_no_encounter() {
    let t = terminology();
    let a28 = "MSH|^~\\&|ADT|GHH|||20240306101500||ADT^A28|X6|P|2.5.1\nPID|1||7^^^GHH^MR||DOE^JANE\nPV1|1|N";
    let m = map_text(a28, &t).unwrap();
    assert!(resources(&m.bundle, "Encounter").is_empty());
    assert_eq!(resources(&m.bundle, "Patient").len(), 1);
}

/// Every prefix of every field of every golden message, and some noise: the mapper returns
/// a Bundle or errors, and never panics.
#[test]
fn malformed_input_never_panics() {
    let t = terminology();
    for name in NAMES {
        let text = message(name).replace('\r', "\n");
        for (i, _) in text.match_indices(['|', '^', '~', '&', '\n']) {
            let cut = format!("{}{}", &text[..i], &text[i + 1..]);
            let _ = map_text(&text[..i], &t);
            let _ = map_text(&cut, &t);
        }
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let alphabet = b"MSHPIDOBXRAV|^~&\n0123456789.-+<>:\"ZT";
    for _ in 0..2000 {
        let mut s = String::from("MSH|^~\\&|A|B|||20240101||ORU^R01|1|P|2.6\n");
        for _ in 0..120 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push(char::from(alphabet[(x % alphabet.len() as u64) as usize]));
        }
        let _ = map_text(&s, &t);
        let _ = map_text(&s.replacen("ORU^R01", "ADT^A01", 1), &t);
        let _ = map_text(&s.replacen("ORU^R01", "RAS^O17", 1), &t);
    }
}

/// A device message with thousands of rows maps in linear-ish time (every lookup on the
/// containment tree and the entry list is indexed).
#[test]
fn large_device_message() {
    let t = terminology();
    let mut text = String::from(
        "MSH|^~\\&|GW|ICU|||20240101120000+0000||ORU^R01|BIG1|P|2.6\nPID|||1^^^ICU^MR\nOBR|1||F1|69965^MDS^MDC|||20240101120000\nOBX|1||69965^MDS^MDC|1.0.0.0|||||||X|||||||080019FFFE0B4020\n",
    );
    let mut n = 1;
    for vmd in 1..=20 {
        text.push_str(&format!("OBX|{n}||70686^VMD^MDC|1.{vmd}.0.0|||||||X\n"));
        for chan in 1..=10 {
            text.push_str(&format!(
                "OBX|{n}||70687^CHAN^MDC|1.{vmd}.{chan}.0|||||||X\n"
            ));
            for metric in 1..=10 {
                n += 1;
                let code = ["150021", "150022", "150023", "147842", "150456"][metric % 5];
                text.push_str(&format!("OBX|{n}|NM|{code}^X^MDC|1.{vmd}.{chan}.{metric}|{metric}|266016^MDC_DIM_MMHG^MDC|||||R\n"));
            }
        }
    }
    let start = std::time::Instant::now();
    let m = map_text(&text, &t).unwrap();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // 200 channels: one BP Observation and 4 others each.
    assert_eq!(resources(&m.bundle, "Observation").len(), 200 * 5);
    assert_eq!(resources(&m.bundle, "DeviceMetric").len(), 2000);
    check_bundle("large", &m.bundle);
}
