//! IHE PCD-01 device observations (IHE PCD TF-2 §3.1 and appendix A: OBX-4 containment,
//! OBX-18 equipment identifier, OBX-14/OBR-7 times) → Device, DeviceMetric, Observation,
//! modelled after the HL7 Point-of-Care Device IG (MDS/VMD/Channel Devices linked by
//! `Device.parent`; DeviceMetric `source` = MDS, `parent` = channel) and the FHIR R4
//! vital-signs profiles (LOINC codes from `terminology/mdc-to-loinc.json`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::hl7v2::map::bundle::{Entry, Method, token_query};
use crate::hl7v2::map::datatypes::{
    EUI64, LOINC, MDC, RepExt, SegmentExt, cwe, eui64, identifier, urn_part,
};
use crate::hl7v2::map::oru::{
    Group, insert_subject, interpretation, observation_identifier, observation_status, obx_value,
    reference_range, unit,
};
use crate::hl7v2::map::{Builder, Seg};

/// The identifier system of the per-component key every Device and DeviceMetric is
/// addressed by: `<MDS equipment system>|<MDS equipment id>|<containment path>`.
const COMPONENT: &str = "urn:hl7v2:device-component";
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

/// Non-invasive blood pressure: the compound (150020) and its systolic, diastolic and mean
/// members (150021-150023). These are grouping rules, not translations: their LOINC codes
/// still come from the ConceptMap.
const NIBP: &str = "150020";
const NIBP_MEMBERS: [&str; 3] = ["150021", "150022", "150023"];

/// A containment node `MDS.VMD.CHANNEL.METRIC`, zeros where a level is absent.
type Node = [u32; 4];

enum Kind {
    /// An MDS (level 0), VMD (1) or channel (2) description row.
    Device(usize),
    Metric,
    /// A row below a metric (`1.1.1.1.1`): a facet or compound member.
    Facet(Node),
    /// No usable OBX-4: a measurement that cannot be placed in the device tree.
    Loose,
}

struct Row<'m> {
    obx: Seg<'m>,
    node: Node,
    kind: Kind,
    code: Option<String>,
}

struct DeviceNode {
    full_url: String,
    equipment: Option<(String, String)>,
    time: Option<String>,
}

fn parse_path(s: &str) -> Option<Vec<u32>> {
    let parts: Option<Vec<u32>> = s.split('.').map(|p| p.trim().parse::<u32>().ok()).collect();
    parts.filter(|p| !p.is_empty() && p.first() != Some(&0))
}

fn node_of(path: &[u32]) -> Node {
    let mut n = [0; 4];
    for (slot, v) in n.iter_mut().zip(path) {
        *slot = *v;
    }
    n
}

fn level(n: &Node) -> usize {
    n.iter().rposition(|v| *v != 0).unwrap_or(0)
}

fn path_text(n: &Node) -> String {
    format!("{}.{}.{}.{}", n[0], n[1], n[2], n[3])
}

/// The ancestors of `n`, nearest first.
fn ancestors(n: &Node) -> impl Iterator<Item = Node> + '_ {
    (0..level(n)).rev().map(move |l| {
        let mut a = *n;
        for v in a.iter_mut().skip(l + 1) {
            *v = 0;
        }
        a
    })
}

/// OBX-18 (first repetition) → (system, value): an EUI-64 under `urn:ieee:eui64`, anything
/// else scoped by its assigning authority (EI-2, else EI-3), else by the sender.
fn equipment(b: &Builder, obx: Seg) -> Option<(String, String)> {
    let rep = obx.reps(18).iter().find(|r| r.c(1).is_some())?;
    let id = rep.c(1)?;
    if let Some(e) = eui64(id) {
        return Some((EUI64.to_string(), e));
    }
    let system = match rep.c(2).or(rep.c(3)) {
        Some(authority) => format!("urn:hl7v2:device:{}", urn_part(authority)),
        None => b.sender_urn("device"),
    };
    Some((system, id.to_string()))
}

fn has_value(obx: Seg) -> bool {
    obx.reps(5).iter().any(|r| !r.is_empty())
}

/// Status of a device row. PCD senders mark device-description rows `X` ("no result"); the
/// Philips example in TF-2 E.1.1 marks its measured values `X` too, so a row that has a
/// value is taken as final, with a warning, rather than as a cancelled measurement.
fn device_status(b: &mut Builder, obx: Seg) -> &'static str {
    match obx.v(11) {
        Some("R" | "F") => "final",
        Some("X") => {
            b.warn("OBX-11 'X' on device rows that carry a value: taken as final (as in IHE PCD TF-2 E.1.1)");
            "final"
        }
        _ => observation_status(b, obx),
    }
}

/// The code of an OBX-3 as a CodeableConcept, with the LOINC codes the ConceptMap gives an
/// MDC code appended; and whether there was one (the vital-signs category follows it).
fn observation_code(b: &Builder, obx: Seg, code: Option<&str>) -> Option<(Value, bool)> {
    let mut cc = obx.rep(3).and_then(|r| cwe(r, None))?;
    let mdc = obx.vc(3, 3) == Some("MDC");
    let loinc: Vec<Value> = match (mdc, code) {
        (true, Some(c)) => b
            .terminology
            .translate(MDC, c, LOINC)
            .iter()
            .map(|t| loinc_coding(&t.code, t.display.as_deref()))
            .collect(),
        _ => Vec::new(),
    };
    let vital = !loinc.is_empty();
    if let Some(codings) = cc.get_mut("coding").and_then(Value::as_array_mut) {
        codings.extend(loinc);
    }
    Some((cc, vital))
}

fn loinc_coding(code: &str, display: Option<&str>) -> Value {
    match display {
        Some(d) => json!({"system": LOINC, "code": code, "display": d}),
        None => json!({"system": LOINC, "code": code}),
    }
}

fn vital_signs_category() -> Value {
    json!([{"coding": [{"system": OBSERVATION_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}])
}

/// ST values that are MDC reference ids (`MDC_ECG_SINUS_RHY`) are coded results, kept as a
/// CodeableConcept text: the message gives no numeric code to put in a Coding.
fn device_value(b: &mut Builder, obx: Seg) -> Option<(&'static str, Value)> {
    if obx.v(2) == Some("ST")
        && let Some(v) = obx.v(5).filter(|v| {
            v.starts_with("MDC_") && v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        })
    {
        return Some(("valueCodeableConcept", json!({"text": v})));
    }
    let u = unit(b, obx);
    obx_value(b, obx, u.as_ref())
}

pub(crate) fn map_group(b: &mut Builder, g: &Group) {
    let mut rows = Vec::new();
    for r in &g.rows {
        let obx = r.obx;
        let path = obx.v(4).and_then(parse_path);
        let code = obx.vc(3, 1).map(str::to_string);
        if code.is_none() {
            b.missing(obx, 3, "observation identifier");
            continue;
        }
        let (node, kind) = match &path {
            None => {
                b.warn(format!("OBX {}: OBX-4 is not a containment path (MDS.VMD.CHANNEL.METRIC); the row is not linked to a device", obx.seq));
                ([0; 4], Kind::Loose)
            }
            Some(p) if p.len() > 4 && p.iter().skip(4).any(|v| *v != 0) => {
                (node_of(p), Kind::Facet(node_of(p)))
            }
            Some(p) => {
                let n = node_of(p);
                if level(&n) < 3 && !has_value(obx) {
                    (n, Kind::Device(level(&n)))
                } else {
                    (n, Kind::Metric)
                }
            }
        };
        rows.push(Row {
            obx,
            node,
            kind,
            code,
        });
    }
    let keys = Keys::new(b, g, &rows);
    let devices = device_tree(b, g, &rows, &keys);
    metrics(b, g, &rows, &devices, &keys);
}

/// Per MDS (the first OBX-4 number): its equipment id and the root of its component keys,
/// found in one pass so that large messages stay linear.
struct Keys {
    equipment: BTreeMap<u32, (String, String)>,
    roots: BTreeMap<u32, String>,
}

impl Keys {
    /// An MDS's equipment is its own OBX-18, else the first OBX-18 sent anywhere below it
    /// (gateways often put it on the metric rows only). Without any, component keys hang
    /// off the sender and patient — the same monitor position for the same patient via the
    /// same sender, which is the best a message without device ids allows.
    fn new(b: &Builder, g: &Group, rows: &[Row]) -> Keys {
        let mut own: BTreeMap<u32, (String, String)> = BTreeMap::new();
        let mut below: BTreeMap<u32, (String, String)> = BTreeMap::new();
        for r in rows {
            let mds = r.node[0];
            if own.contains_key(&mds) {
                continue;
            }
            let Some(e) = equipment(b, r.obx) else {
                continue;
            };
            if matches!(r.kind, Kind::Device(0)) {
                own.insert(mds, e);
            } else {
                below.entry(mds).or_insert(e);
            }
        }
        for (mds, e) in below {
            own.entry(mds).or_insert(e);
        }
        let patient = g
            .patient
            .as_ref()
            .map_or("unassociated", |p| p.key.as_str());
        let fallback = format!("{}|{patient}", b.sender_urn("device"));
        let roots = rows
            .iter()
            .map(|r| r.node[0])
            .map(|mds| {
                let root = own
                    .get(&mds)
                    .map_or_else(|| fallback.clone(), |(s, v)| format!("{s}|{v}"));
                (mds, root)
            })
            .collect();
        Keys {
            equipment: own,
            roots,
        }
    }

    /// `<root>|<path>`: the identifier value of the Device or DeviceMetric at `node`.
    fn key(&self, node: &Node) -> String {
        let root = self.roots.get(&node[0]).map_or("", String::as_str);
        format!("{root}|{}", path_text(node))
    }
}

fn device_tree(
    b: &mut Builder,
    g: &Group,
    rows: &[Row],
    keys: &Keys,
) -> BTreeMap<Node, DeviceNode> {
    let mut devices: BTreeMap<Node, DeviceNode> = BTreeMap::new();
    for row in rows {
        let Kind::Device(lvl) = row.kind else {
            continue;
        };
        let parent = ancestors(&row.node).find_map(|a| devices.get(&a).map(|d| (a, d)));
        let own = equipment(b, row.obx);
        let inherited = match (&own, parent, lvl) {
            (Some(e), _, _) => Some(e.clone()),
            (None, Some((_, p)), _) => p.equipment.clone(),
            (None, None, 0) => keys.equipment.get(&row.node[0]).cloned(),
            (None, None, _) => None,
        };
        let time = row
            .obx
            .v(14)
            .map(str::to_string)
            .or_else(|| parent.and_then(|(_, p)| p.time.clone()));
        let parent_url = parent.map(|(_, p)| p.full_url.clone());
        let key = keys.key(&row.node);
        let mut d = Map::new();
        d.insert("resourceType".into(), json!("Device"));
        let mut ids = Vec::new();
        if let Some((s, v)) = &inherited {
            ids.push(identifier(s, v));
        }
        ids.push(identifier(COMPONENT, &key));
        d.insert("identifier".into(), Value::Array(ids));
        d.insert("status".into(), json!("active"));
        if let Some(t) = row.obx.rep(3).and_then(|r| cwe(r, None)) {
            d.insert("type".into(), t);
        }
        if lvl == 0
            && let Some(p) = &g.patient
        {
            d.insert("patient".into(), json!({"reference": p.full_url}));
        }
        if let Some(p) = &parent_url {
            d.insert("parent".into(), json!({"reference": p}));
        }
        let url = b.add(Entry::new(
            "Device",
            token_query("identifier", COMPONENT, &key),
            Method::Update,
            Value::Object(d),
        ));
        devices.insert(
            row.node,
            DeviceNode {
                full_url: url,
                equipment: inherited,
                time,
            },
        );
    }
    devices
}

/// A blood-pressure group: the rows of one channel that are NIBP members, and the 150020
/// compound row if one was sent.
#[derive(Default)]
struct Bp {
    header: Option<usize>,
    members: Vec<usize>,
}

fn channel_of(n: &Node) -> Node {
    [n[0], n[1], n[2], 0]
}

fn metrics(
    b: &mut Builder,
    g: &Group,
    rows: &[Row],
    devices: &BTreeMap<Node, DeviceNode>,
    keys: &Keys,
) {
    // Group NIBP rows by channel first, so that their one Observation can be written when
    // the group's last row has been seen.
    let headers: BTreeSet<Node> = rows
        .iter()
        .filter(|r| matches!(r.kind, Kind::Metric) && r.code.as_deref() == Some(NIBP))
        .map(|r| r.node)
        .collect();
    let mut bp: BTreeMap<Node, Bp> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let code = row.code.as_deref().unwrap_or_default();
        match row.kind {
            Kind::Metric if code == NIBP => {
                bp.entry(channel_of(&row.node)).or_default().header = Some(i)
            }
            Kind::Metric if NIBP_MEMBERS.contains(&code) => {
                bp.entry(channel_of(&row.node)).or_default().members.push(i)
            }
            Kind::Facet(n) if NIBP_MEMBERS.contains(&code) && headers.contains(&n) => {
                bp.entry(channel_of(&n)).or_default().members.push(i);
            }
            _ => {}
        }
    }
    // Row index → its group's channel, and the row after which each group is complete.
    let mut grouped: BTreeMap<usize, Node> = BTreeMap::new();
    let mut last: BTreeMap<usize, Node> = BTreeMap::new();
    for (channel, x) in &bp {
        for i in x.header.iter().chain(&x.members) {
            grouped.insert(*i, *channel);
        }
        if let Some(i) = x.header.iter().chain(&x.members).max() {
            last.insert(*i, *channel);
        }
    }
    let mut metric_urls: BTreeMap<usize, String> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        match row.kind {
            Kind::Device(_) => continue,
            Kind::Facet(_) => {
                if !grouped.contains_key(&i) {
                    b.warn(format!(
                        "OBX {}: a facet row below a metric ({}) is not mapped",
                        row.obx.seq,
                        row.obx.v(4).unwrap_or_default()
                    ));
                }
            }
            Kind::Metric => {
                let url = device_metric(b, row, devices, keys);
                metric_urls.insert(i, url.clone());
                if !grouped.contains_key(&i) {
                    observation(b, g, row, devices, Some(&url));
                }
            }
            Kind::Loose => observation(b, g, row, devices, None),
        }
        if let Some(group) = last.get(&i).and_then(|c| bp.get(c).map(|x| (*c, x))) {
            blood_pressure(b, g, rows, group.0, group.1, devices, &metric_urls);
        }
    }
}

/// The effective time of a row as (raw HL7, FHIR): OBX-14, else the nearest device
/// ancestor's OBX-14, else OBR-7.
fn effective(
    b: &mut Builder,
    g: &Group,
    row: &Row,
    devices: &BTreeMap<Node, DeviceNode>,
) -> Option<(String, String)> {
    let metric = match row.kind {
        Kind::Facet(n) => n,
        _ => row.node,
    };
    let inherited = ancestors(&metric).find_map(|a| devices.get(&a).and_then(|d| d.time.clone()));
    let raw = row
        .obx
        .v(14)
        .map(str::to_string)
        .or(inherited)
        .or_else(|| g.obr.v(7).map(str::to_string));
    let Some(raw) = raw else {
        b.warn(format!(
            "OBX {}: no OBX-14, device or OBR-7 time; effective[x] omitted",
            row.obx.seq
        ));
        return None;
    };
    match crate::hl7v2::map::datatypes::hl7_ts_to_fhir(&raw, b.offset.as_deref()) {
        Some(t) => Some((raw, t)),
        None => {
            b.bad(
                row.obx,
                14,
                "date/time of the observation (own or inherited)",
                &raw,
            );
            None
        }
    }
}

fn device_metric(
    b: &mut Builder,
    row: &Row,
    devices: &BTreeMap<Node, DeviceNode>,
    keys: &Keys,
) -> String {
    let key = keys.key(&row.node);
    let mut m = Map::new();
    m.insert("resourceType".into(), json!("DeviceMetric"));
    m.insert("identifier".into(), json!([identifier(COMPONENT, &key)]));
    if let Some(t) = row.obx.rep(3).and_then(|r| cwe(r, None)) {
        m.insert("type".into(), t);
    }
    if let Some(u) = row.obx.rep(6).and_then(|r| cwe(r, None)) {
        m.insert("unit".into(), u);
    }
    let mds = devices.get(&[row.node[0], 0, 0, 0]);
    if let Some(mds) = mds {
        m.insert("source".into(), json!({"reference": mds.full_url}));
    }
    if let Some(parent) = ancestors(&row.node).find_map(|a| devices.get(&a)) {
        m.insert("parent".into(), json!({"reference": parent.full_url}));
    }
    m.insert("category".into(), json!("measurement"));
    b.add(Entry::new(
        "DeviceMetric",
        token_query("identifier", COMPONENT, &key),
        Method::Update,
        Value::Object(m),
    ))
}

fn observation(
    b: &mut Builder,
    g: &Group,
    row: &Row,
    devices: &BTreeMap<Node, DeviceNode>,
    metric: Option<&str>,
) {
    let obx = row.obx;
    let Some((code, vital)) = observation_code(b, obx, row.code.as_deref()) else {
        return;
    };
    let when = effective(b, g, row, devices);
    let sub_id = obx.v(4).or(obx.v(1)).unwrap_or_default().to_string();
    let raw_time = when.as_ref().map(|(r, _)| r.as_str()).unwrap_or_default();
    let (system, value) = observation_identifier(
        b,
        g,
        &sub_id,
        row.code.as_deref().unwrap_or_default(),
        raw_time,
    );
    let mut o = Map::new();
    o.insert("resourceType".into(), json!("Observation"));
    o.insert("identifier".into(), json!([identifier(&system, &value)]));
    o.insert("status".into(), json!(device_status(b, obx)));
    if vital {
        o.insert("category".into(), vital_signs_category());
    }
    o.insert("code".into(), code);
    insert_subject(&mut o, "subject", g);
    if let Some((_, t)) = when {
        o.insert("effectiveDateTime".into(), json!(t));
    }
    if let Some((k, v)) = device_value(b, obx) {
        o.insert(k.into(), v);
    }
    if let Some(i) = interpretation(obx) {
        o.insert("interpretation".into(), i);
    }
    if let Some(m) = metric {
        o.insert("device".into(), json!({"reference": m}));
    }
    let u = unit(b, obx);
    if let Some(r) = reference_range(obx, u.as_ref()) {
        o.insert("referenceRange".into(), json!([r]));
    }
    b.add(Entry::new(
        "Observation",
        token_query("identifier", &system, &value),
        Method::Update,
        Value::Object(o),
    ));
}

/// One Observation for a channel's blood pressure (LOINC panel from the ConceptMap entry for
/// MDC 150020), with systolic, diastolic and mean as components, as the R4 `bp` vital-signs
/// profile and the PHD IG's compound observations do.
fn blood_pressure(
    b: &mut Builder,
    g: &Group,
    rows: &[Row],
    channel: Node,
    bp: &Bp,
    devices: &BTreeMap<Node, DeviceNode>,
    metric_urls: &BTreeMap<usize, String>,
) {
    let header = bp.header.and_then(|i| rows.get(i));
    let members: Vec<&Row> = bp.members.iter().filter_map(|i| rows.get(*i)).collect();
    let Some(lead) = header.or(members.first().copied()) else {
        return;
    };
    let mut codings = vec![];
    let display = header
        .and_then(|h| h.obx.vc(3, 2).map(str::to_string))
        .or_else(|| b.terminology.source_display(MDC, NIBP).map(str::to_string));
    codings.push(match display {
        Some(d) => json!({"system": MDC, "code": NIBP, "display": d}),
        None => json!({"system": MDC, "code": NIBP}),
    });
    let loinc: Vec<Value> = b
        .terminology
        .translate(MDC, NIBP, LOINC)
        .iter()
        .map(|t| loinc_coding(&t.code, t.display.as_deref()))
        .collect();
    let vital = !loinc.is_empty();
    codings.extend(loinc);
    let when = effective(b, g, lead, devices);
    let times: Vec<&str> = members.iter().filter_map(|m| m.obx.v(14)).collect();
    if times.windows(2).any(|w| w[0] != w[1]) {
        b.warn(format!(
            "OBX {}: blood pressure members have different OBX-14 times; the first is used",
            lead.obx.seq
        ));
    }
    let sub_id = match header {
        Some(h) => h.obx.v(4).unwrap_or_default().to_string(),
        None => path_text(&channel),
    };
    let raw_time = when.as_ref().map(|(r, _)| r.as_str()).unwrap_or_default();
    let (system, value) = observation_identifier(b, g, &sub_id, NIBP, raw_time);
    let mut components = Vec::new();
    for m in &members {
        let Some((code, _)) = observation_code(b, m.obx, m.code.as_deref()) else {
            continue;
        };
        let mut c = Map::new();
        c.insert("code".into(), code);
        if let Some((k, v)) = device_value(b, m.obx) {
            c.insert(k.into(), v);
        }
        if let Some(i) = interpretation(m.obx) {
            c.insert("interpretation".into(), i);
        }
        let u = unit(b, m.obx);
        if let Some(r) = reference_range(m.obx, u.as_ref()) {
            c.insert("referenceRange".into(), json!([r]));
        }
        components.push(Value::Object(c));
    }
    let device = match bp.header.and_then(|i| metric_urls.get(&i)) {
        Some(url) => Some(url.clone()),
        None => ancestors(&[channel[0], channel[1], channel[2], 1])
            .find_map(|a| devices.get(&a).map(|d| d.full_url.clone()))
            .or_else(|| bp.members.first().and_then(|i| metric_urls.get(i)).cloned()),
    };
    let mut o = Map::new();
    o.insert("resourceType".into(), json!("Observation"));
    o.insert("identifier".into(), json!([identifier(&system, &value)]));
    o.insert("status".into(), json!(device_status(b, lead.obx)));
    if vital {
        o.insert("category".into(), vital_signs_category());
    }
    o.insert("code".into(), json!({"coding": codings}));
    insert_subject(&mut o, "subject", g);
    if let Some((_, t)) = when {
        o.insert("effectiveDateTime".into(), json!(t));
    }
    if let Some(d) = device {
        o.insert("device".into(), json!({"reference": d}));
    }
    if !components.is_empty() {
        o.insert("component".into(), Value::Array(components));
    }
    b.add(Entry::new(
        "Observation",
        token_query("identifier", &system, &value),
        Method::Update,
        Value::Object(o),
    ));
}
