//! Template tests: for every shipped template, a message in and the FHIR it gives out.

use serde_json::{Value, json};

use super::*;
use crate::devices::Templates;

fn loinc(mdc: &str) -> Option<(String, String)> {
    crate::interaction::hl7v2::terminology()
        .ok()?
        .loinc_for_mdc(mdc)
}

/// Normalises `msg` with the shipped templates and maps every reading.
fn map_one(msg: Value) -> (Vec<Reading>, Vec<Value>) {
    let templates = Templates::shipped().unwrap();
    let readings = normalise(&templates, &msg).unwrap();
    let mut out = Vec::new();
    for r in &readings {
        let t = templates.all.iter().find(|t| t.name == r.template).unwrap();
        out.extend(observations(t, r, "Device/d1", Some("Patient/p1"), &loinc).unwrap());
    }
    (readings, out)
}

fn codes(o: &Value) -> Vec<String> {
    o["code"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}|{}",
                c["system"].as_str().unwrap(),
                c["code"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn every_shipped_template_loads() {
    let t = Templates::shipped().unwrap();
    assert_eq!(t.all.len(), 11);
}

#[test]
fn pulse_oximeter() {
    let (_, obs) = map_one(
        json!({"type": "pulse-oximeter", "deviceId": "PO-1", "patientId": "MRN-1", "time": "2024-03-06T10:15:00Z", "spo2": 97, "pulse": 72}),
    );
    assert_eq!(obs.len(), 2);
    assert_eq!(
        codes(&obs[0]),
        [
            "http://loinc.org|2708-6",
            "urn:iso:std:iso:11073:10101|150456"
        ]
    );
    assert_eq!(
        obs[0]["valueQuantity"],
        json!({"value": 97.0, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"})
    );
    assert_eq!(obs[0]["category"][0]["coding"][0]["code"], "vital-signs");
    assert_eq!(obs[0]["effectiveDateTime"], "2024-03-06T10:15:00Z");
    assert_eq!(obs[0]["device"]["reference"], "Device/d1");
    assert_eq!(obs[0]["subject"]["reference"], "Patient/p1");
    assert_eq!(codes(&obs[1])[0], "http://loinc.org|8867-4");
    assert_eq!(obs[1]["valueQuantity"]["code"], "/min");
    // Only SpO2 sent: only its Observation.
    let (_, obs) = map_one(
        json!({"type": "pulse-oximeter", "deviceId": "PO-1", "time": "2024-03-06T10:15:00Z", "spo2": 97}),
    );
    assert_eq!(obs.len(), 1);
}

#[test]
fn blood_pressure_is_one_observation_with_components() {
    let (_, obs) = map_one(
        json!({"type": "blood-pressure", "deviceId": "BP-1", "time": "2024-03-06T10:15:00+01:00", "systolic": 120, "diastolic": 80}),
    );
    assert_eq!(obs.len(), 1);
    assert_eq!(codes(&obs[0])[0], "http://loinc.org|85354-9");
    let c = obs[0]["component"].as_array().unwrap();
    assert_eq!(c[0]["code"]["coding"][0]["code"], "8480-6");
    assert_eq!(c[0]["valueQuantity"]["value"], 120.0);
    assert_eq!(c[1]["code"]["coding"][0]["code"], "8462-4");
    assert_eq!(c[1]["valueQuantity"]["code"], "mm[Hg]");
    assert!(obs[0].get("valueQuantity").is_none());
}

#[test]
fn thermometer_weight_respiratory_rate() {
    for (msg, loinc, unit) in [
        (
            json!({"type": "thermometer", "deviceId": "T", "time": 1709720100, "temperature": "37.2"}),
            "8310-5",
            "Cel",
        ),
        (
            json!({"type": "weight", "deviceId": "W", "time": 1709720100000_i64, "weight": 71.5}),
            "29463-7",
            "kg",
        ),
        (
            json!({"type": "respiratory-rate", "deviceId": "R", "time": "2024-03-06T10:15:00Z", "respiratoryRate": 16}),
            "9279-1",
            "/min",
        ),
    ] {
        let (_, obs) = map_one(msg);
        assert_eq!(obs.len(), 1);
        assert_eq!(codes(&obs[0])[0], format!("http://loinc.org|{loinc}"));
        assert_eq!(obs[0]["valueQuantity"]["code"], unit);
        assert_eq!(obs[0]["effectiveDateTime"], "2024-03-06T10:15:00Z");
    }
}

#[test]
fn wearable_heart_rate_and_steps_nested_shape() {
    let (r, obs) = map_one(
        json!({"kind": "heartrate", "device": {"id": "WB-9"}, "user": "u-1", "measurement": {"heartRate": 64, "at": "2024-03-06T10:15:00Z"}}),
    );
    assert_eq!(r[0].device_id, "WB-9");
    assert_eq!(r[0].patient, Some((None, "u-1".into())));
    assert_eq!(codes(&obs[0])[0], "http://loinc.org|8867-4");
    let (_, obs) = map_one(
        json!({"kind": "steps", "device": {"id": "WB-9"}, "user": "u-1", "measurement": {"steps": 4200, "at": "2024-03-06T23:59:59Z"}}),
    );
    assert_eq!(codes(&obs[0]), ["http://loinc.org|55423-8"]);
    assert_eq!(obs[0]["category"][0]["coding"][0]["code"], "activity");
    assert_eq!(obs[0]["valueQuantity"]["code"], "{steps}");
}

#[test]
fn glucose_set_id_separates_two_readings_of_one_instant() {
    let msg = |seq: u32| json!({"type": "glucose", "deviceId": "G", "time": "2024-03-06T10:15:00Z", "glucose": 98, "sequence": seq});
    let (_, a) = map_one(msg(1));
    let (_, b) = map_one(msg(2));
    let (_, a2) = map_one(msg(1));
    assert_eq!(a[0]["category"][0]["coding"][0]["code"], "laboratory");
    assert_ne!(a[0]["id"], b[0]["id"]);
    assert_eq!(a[0]["id"], a2[0]["id"]);
    assert_eq!(a[0]["identifier"][0]["value"], a[0]["id"]);
}

#[test]
fn observation_ids_sort_by_reading_time() {
    let at = |device: &str, time: &str| {
        let (_, o) = map_one(
            json!({"type": "thermometer", "deviceId": device, "time": time, "temperature": 36.6}),
        );
        o[0]["id"].as_str().unwrap().to_string()
    };
    // 2024-03-06T10:15:00Z is 0x018e13425ca0 ms since 1970.
    let first = at("Z-9", "2024-03-06T10:15:00Z");
    assert!(first.starts_with("018e1342-5ca0-8"), "{first}");
    assert!(first < at("A-1", "2024-03-06T10:15:00.001Z"));
    assert!(first > at("A-1", "2024-03-06T10:14:59.999Z"));
}

#[test]
fn ecg_waveform_as_sampled_data() {
    let (_, obs) = map_one(
        json!({"type": "ecg", "deviceId": "E", "start": "2024-03-06T10:15:00.000Z", "leadI": [0.1, 0.25, -0.05]}),
    );
    let s = &obs[0]["valueSampledData"];
    assert_eq!(s["period"], 4.0);
    assert_eq!(s["dimensions"], 1);
    assert_eq!(s["data"], "0.1 0.25 -0.05");
    assert_eq!(s["origin"]["code"], "mV");
}

#[test]
fn rtls_tag_gives_a_zone_location() {
    let templates = Templates::shipped().unwrap();
    let msg = json!({"type": "rtls", "tagId": "PUMP-7", "zone": "ICU-3", "zoneName": "ICU room 3", "seenAt": "2024-03-06T10:15:00Z"});
    let r = normalise(&templates, &msg).unwrap();
    let t = templates
        .all
        .iter()
        .find(|t| t.name == r[0].template)
        .unwrap();
    assert!(
        observations(t, &r[0], "Device/d", None, &loinc)
            .unwrap()
            .is_empty()
    );
    let (id, loc) = zone_location(t, &msg).unwrap().unwrap();
    assert_eq!(loc["name"], "ICU room 3");
    assert_eq!(loc["identifier"][0]["value"], "ICU-3");
    assert_eq!(zone_location(t, &msg).unwrap().unwrap().0, id);
}

#[test]
fn bad_messages_say_why() {
    let templates = Templates::shipped().unwrap();
    let why = |m: Value| normalise(&templates, &m).unwrap_err();
    assert!(why(json!({"type": "unknown"})).contains("no device mapping template"));
    assert!(
        why(json!({"type": "thermometer", "time": "2024-03-06T10:15:00Z", "temperature": 37}))
            .contains("no device id")
    );
    assert!(why(json!({"type": "thermometer", "deviceId": "T", "time": "2024-03-06T10:15:00", "temperature": 37})).contains("time zone"));
    assert!(
        why(json!({"type": "thermometer", "deviceId": "T", "time": "2024-03-06T10:15:00Z"}))
            .contains("required value")
    );
    // A value of the wrong shape fails at mapping.
    let r = normalise(&templates, &json!({"type": "thermometer", "deviceId": "T", "time": "2024-03-06T10:15:00Z", "temperature": "hot"})).unwrap();
    let t = templates
        .all
        .iter()
        .find(|t| t.name == "thermometer")
        .unwrap();
    assert!(
        observations(t, &r[0], "Device/d", None, &loinc)
            .unwrap_err()
            .contains("not a number")
    );
}

#[test]
fn bad_templates_name_the_field() {
    let base = json!({"name": "x", "match": [{"path": "$.t"}], "deviceId": "$.d", "timestamp": "$.ts",
        "values": [{"name": "v", "path": "$.v"}],
        "observations": [{"code": [{"system": "http://loinc.org", "code": "1-1"}], "value": "v", "unit": {"code": "kg"}}]});
    assert!(crate::devices::Template::parse("ok.json", &base.to_string()).is_ok());
    let broken = |f: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        f(&mut v);
        crate::devices::Template::parse("t.json", &v.to_string()).unwrap_err()
    };
    assert!(broken(&|v| v["deviceId"] = json!("d")).contains("deviceId"));
    assert!(
        broken(&|v| v["observations"][0]["value"] = json!("w")).contains("observations[0].value")
    );
    assert!(
        broken(&|v| v["observations"][0]["category"] = json!("vitals"))
            .contains("observations[0].category")
    );
    assert!(
        broken(&|v| {
            v["observations"][0].as_object_mut().unwrap().remove("unit");
        })
        .contains("unit")
    );
    assert!(broken(&|v| v["extra"] = json!(1)).contains("unknown field"));
    // Grouping: the period divides a day, a value needs its slot width, slots are bounded.
    assert!(
        broken(
            &|v| v["observations"][0]["grouping"] = json!({"periodMinutes": 7, "sampleMs": 1000})
        )
        .contains("grouping.periodMinutes")
    );
    assert!(
        broken(&|v| v["observations"][0]["grouping"] = json!({"periodMinutes": 60}))
            .contains("grouping.sampleMs")
    );
    assert!(
        broken(
            &|v| v["observations"][0]["grouping"] = json!({"periodMinutes": 1440, "sampleMs": 100})
        )
        .contains("at most")
    );
    assert!(
        broken(&|v| v["observations"][0]["grouping"] = json!({"periodMinutes": 60, "sampleMs": 0}))
            .contains("positive")
    );
    assert!(broken(&|v| v["match"] = json!([])).contains("match"));
}

/// The grouped points of `msg` under the shipped templates.
fn group_one(msg: Value) -> Vec<GroupPoints> {
    let templates = Templates::shipped().unwrap();
    let mut out = Vec::new();
    for r in normalise(&templates, &msg).unwrap() {
        let t = templates.all.iter().find(|t| t.name == r.template).unwrap();
        assert!(
            observations(t, &r, "Device/d1", None, &loinc)
                .unwrap()
                .is_empty()
        );
        out.extend(grouped(t, &r, "Device/d1", Some("Patient/p1"), &loinc).unwrap());
    }
    out
}

fn hr(at: &str, bpm: f64) -> Value {
    json!({"kind": "heartrate-stream", "device": {"id": "PATCH-1"}, "user": "MRN-1", "at": at, "bpm": bpm})
}

#[test]
fn grouped_readings_fill_the_slots_of_one_observation_per_period() {
    let a = group_one(hr("2024-03-06T10:00:02Z", 71.0));
    let b = group_one(hr("2024-03-06T10:00:00.400Z", 70.0));
    let c = group_one(hr("2024-03-06T10:59:59.999Z", 90.0));
    let next = group_one(hr("2024-03-06T11:00:00Z", 91.0));
    assert_eq!((a.len(), b.len(), c.len(), next.len()), (1, 1, 1, 1));
    // One id per device, type and hour; the next hour is another Observation.
    assert_eq!(a[0].id, b[0].id);
    assert_eq!(a[0].id, c[0].id);
    assert_ne!(a[0].id, next[0].id);
    assert_eq!(a[0].points, [(2, "71".to_string())]);
    assert_eq!(b[0].points, [(0, "70".to_string())]);
    assert_eq!(c[0].points, [(3599, "90".to_string())]);
    let o = merge_group(None, &a[0]);
    assert_eq!(
        o["effectivePeriod"],
        json!({"start": "2024-03-06T10:00:00Z", "end": "2024-03-06T11:00:00Z"})
    );
    assert_eq!(codes(&o)[0], "http://loinc.org|8867-4");
    assert_eq!(o["subject"]["reference"], "Patient/p1");
    assert_eq!(o["device"]["reference"], "Device/d1");
    let s = &o["valueSampledData"];
    assert_eq!(s["period"], 1000.0);
    assert_eq!(s["origin"]["code"], "/min");
    assert_eq!(s["data"], "E E 71");
    // Merged into the stored version, out of order; merging the same points again changes
    // nothing (a redelivery).
    let o = merge_group(Some(&o), &b[0]);
    assert_eq!(o["valueSampledData"]["data"], "70 E 71");
    assert_eq!(merge_group(Some(&o), &b[0]), o);
    assert_eq!(merge_group(Some(&o), &a[0]), o);
    // A corrected value replaces the slot's.
    let mut fixed = a[0].clone();
    fixed.points = vec![(2, "72".into())];
    assert_eq!(
        merge_group(Some(&o), &fixed)["valueSampledData"]["data"],
        "70 E 72"
    );
    let full = merge_group(Some(&o), &c[0]);
    let data = full["valueSampledData"]["data"].as_str().unwrap();
    assert_eq!(data.split(' ').count(), 3600);
    assert!(data.ends_with(" E 90"));
}

#[test]
fn a_grouped_waveform_crossing_a_period_end_continues_in_the_next() {
    let t = crate::devices::Template::parse(
        "w.json",
        &json!({"name": "w", "match": [{"path": "$.w"}], "deviceId": "$.d", "timestamp": "$.t",
            "values": [{"name": "s", "path": "$.w"}],
            "observations": [{"code": [{"system": "urn:iso:std:iso:11073:10101", "code": "131329"}],
                "sampledData": {"value": "s", "periodMs": 250, "unit": {"code": "mV"}},
                "grouping": {"periodMinutes": 1}}]})
        .to_string(),
    )
    .unwrap();
    let templates = Templates { all: vec![t] };
    let msg = json!({"d": "E1", "t": "2024-03-06T10:00:59.500Z", "w": [1, 2, 3, 4]});
    let r = &normalise(&templates, &msg).unwrap()[0];
    let g = grouped(&templates.all[0], r, "Device/e", None, &loinc).unwrap();
    assert_eq!(g.len(), 2);
    assert_eq!(g[0].points, [(238, "1".into()), (239, "2".into())]);
    assert_eq!(g[1].points, [(0, "3".into()), (1, "4".into())]);
    assert_eq!(
        merge_group(None, &g[1])["effectivePeriod"]["start"],
        "2024-03-06T10:01:00Z"
    );
}
