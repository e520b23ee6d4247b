//! Device mapping templates (two stages, as in the MedTech service): a *device* part picks
//! the device id, patient id, time and named values out of a JSON message with JSONPath;
//! a *FHIR* part turns those values into Observations (codes, category, UCUM unit,
//! `valueQuantity`, components, or `valueSampledData`) or, for location feeds, into a
//! Location per zone. Templates are JSON files, checked when loaded: a bad one names the
//! file, the field and the reason.

use serde::Deserialize;
use serde_json::Value;

use crate::devices::jsonpath::JsonPath;

pub const UCUM: &str = "http://unitsofmeasure.org";
/// Default identifier system of `Device.identifier` values sent as device ids.
pub const DEVICE_ID_SYSTEM: &str = "urn:iomt-fhir:device-id";
/// http://hl7.org/fhir/R4/valueset-observation-category.html
const CATEGORIES: &[&str] = &[
    "social-history",
    "vital-signs",
    "imaging",
    "laboratory",
    "procedure",
    "survey",
    "exam",
    "therapy",
    "activity",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Every condition must hold for the template to apply to a message.
    #[serde(rename = "match")]
    matches: Vec<MatchFile>,
    device_id: String,
    #[serde(default)]
    device_identifier_system: Option<String>,
    #[serde(default)]
    patient_id: Option<String>,
    #[serde(default)]
    patient_identifier_system: Option<String>,
    timestamp: String,
    /// Identifies one set of values (e.g. a batch or measurement id) when a device can send
    /// two different readings of one type for the same instant.
    #[serde(default)]
    set_id: Option<String>,
    #[serde(default)]
    values: Vec<ValueFile>,
    #[serde(default)]
    observations: Vec<ObservationFile>,
    #[serde(default)]
    location: Option<LocationFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchFile {
    path: String,
    /// Without `equals`, the path only has to select something.
    #[serde(default)]
    equals: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueFile {
    name: String,
    path: String,
    #[serde(default)]
    required: bool,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Coding {
    pub system: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    pub code: String,
    #[serde(default)]
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ObservationFile {
    code: Vec<Coding>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    unit: Option<Unit>,
    #[serde(default)]
    components: Vec<ComponentFile>,
    #[serde(default)]
    sampled_data: Option<SampledFile>,
    #[serde(default)]
    grouping: Option<GroupingFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GroupingFile {
    period_minutes: u32,
    #[serde(default)]
    sample_ms: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentFile {
    code: Vec<Coding>,
    value: String,
    unit: Unit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SampledFile {
    value: String,
    period_ms: f64,
    unit: Unit,
    #[serde(default)]
    origin: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocationFile {
    zone: String,
    #[serde(default)]
    name: Option<String>,
}

/// A checked template.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub description: Option<String>,
    pub source: String,
    pub matches: Vec<(JsonPath, Option<Value>)>,
    pub device_id: JsonPath,
    pub device_system: String,
    pub patient_id: Option<JsonPath>,
    pub patient_system: Option<String>,
    pub timestamp: JsonPath,
    pub set_id: Option<JsonPath>,
    pub values: Vec<(String, JsonPath, bool)>,
    pub observations: Vec<ObservationDef>,
    pub location: Option<(JsonPath, Option<JsonPath>)>,
    /// The file as loaded, served read-only.
    pub json: Value,
}

#[derive(Debug, Clone)]
pub struct ObservationDef {
    pub code: Vec<Coding>,
    pub text: Option<String>,
    pub category: Option<String>,
    pub kind: ObservationKind,
    pub grouping: Option<Grouping>,
}

/// Readings of one device and type within one period (aligned to UTC midnight) go into
/// one Observation: `effectivePeriod` is the period, `valueSampledData` holds a slot per
/// `sample_ms` ("E" where no reading arrived).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grouping {
    pub period_minutes: u32,
    pub sample_ms: f64,
}

/// Most slots one grouped Observation may have (a day at one sample a second).
pub const MAX_SLOTS: usize = 86_400;

impl Grouping {
    pub fn period_micros(&self) -> i64 {
        i64::from(self.period_minutes) * 60_000_000
    }

    /// Number of slots in one period.
    pub fn slots(&self) -> usize {
        (f64::from(self.period_minutes) * 60_000.0 / self.sample_ms).ceil() as usize
    }
}

#[derive(Debug, Clone)]
pub enum ObservationKind {
    Quantity {
        value: String,
        unit: Unit,
    },
    Components(Vec<(Vec<Coding>, String, Unit)>),
    Sampled {
        value: String,
        period_ms: f64,
        unit: Unit,
        origin: f64,
    },
}

impl ObservationDef {
    /// The value names this Observation needs.
    pub fn value_names(&self) -> Vec<&str> {
        match &self.kind {
            ObservationKind::Quantity { value, .. } | ObservationKind::Sampled { value, .. } => {
                vec![value.as_str()]
            }
            ObservationKind::Components(c) => c.iter().map(|(_, v, _)| v.as_str()).collect(),
        }
    }
}

fn path(field: &str, text: &str) -> Result<JsonPath, String> {
    JsonPath::compile(text).map_err(|e| format!("{field}: {e}"))
}

fn codings(field: &str, c: &[Coding]) -> Result<(), String> {
    if c.is_empty() {
        return Err(format!("{field}: needs at least one coding"));
    }
    for (i, x) in c.iter().enumerate() {
        if x.system.trim().is_empty() || x.code.trim().is_empty() {
            return Err(format!("{field}[{i}]: system and code must not be empty"));
        }
    }
    Ok(())
}

fn unit(field: &str, u: &Unit) -> Result<(), String> {
    if u.code.trim().is_empty() {
        return Err(format!("{field}.code: a UCUM code is required"));
    }
    Ok(())
}

/// Checks a `grouping`: the period divides a day, and the slots fit in [`MAX_SLOTS`].
fn grouping(at: &str, g: &GroupingFile, kind: &ObservationKind) -> Result<Grouping, String> {
    let at = format!("{at}.grouping");
    if g.period_minutes == 0 || 1440 % g.period_minutes != 0 {
        return Err(format!(
            "{at}.periodMinutes: must divide a day (1440 minutes), e.g. 60 or 1440"
        ));
    }
    let sample_ms = match (kind, g.sample_ms) {
        (ObservationKind::Quantity { .. }, Some(ms)) => ms,
        (ObservationKind::Quantity { .. }, None) => {
            return Err(format!(
                "{at}.sampleMs: a grouped value needs the time between its slots"
            ));
        }
        (ObservationKind::Sampled { period_ms, .. }, None) => *period_ms,
        (ObservationKind::Sampled { .. }, Some(_)) => {
            return Err(format!(
                "{at}.sampleMs: sampledData.periodMs already gives the time between samples"
            ));
        }
        (ObservationKind::Components(_), _) => {
            return Err(format!(
                "{at}: only value or sampledData observations can be grouped"
            ));
        }
    };
    if !(sample_ms.is_finite() && sample_ms > 0.0) {
        return Err(format!("{at}.sampleMs: must be positive"));
    }
    let g = Grouping {
        period_minutes: g.period_minutes,
        sample_ms,
    };
    if g.slots() > MAX_SLOTS {
        return Err(format!(
            "{at}: {} slots of {sample_ms} ms in {} minutes; at most {MAX_SLOTS} are allowed",
            g.slots(),
            g.period_minutes
        ));
    }
    Ok(g)
}

impl Template {
    /// Parses and checks one template file; errors say which field is wrong and why.
    pub fn parse(source: &str, text: &str) -> Result<Template, String> {
        let json: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let f: File = serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
        if f.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        if f.matches.is_empty() {
            return Err("match: needs at least one condition".into());
        }
        let matches = f
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok((
                    path(&format!("match[{i}].path"), &m.path)?,
                    m.equals.clone(),
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut values = Vec::new();
        for (i, v) in f.values.iter().enumerate() {
            if values
                .iter()
                .any(|(n, _, _): &(String, JsonPath, bool)| *n == v.name)
            {
                return Err(format!("values[{i}].name: {:?} is declared twice", v.name));
            }
            values.push((
                v.name.clone(),
                path(&format!("values[{i}].path"), &v.path)?,
                v.required,
            ));
        }
        let known = |field: &str, name: &str| {
            if values.iter().any(|(n, _, _)| n == name) {
                Ok(())
            } else {
                Err(format!(
                    "{field}: {name:?} is not one of the declared values"
                ))
            }
        };
        let mut observations = Vec::new();
        for (i, o) in f.observations.iter().enumerate() {
            let at = format!("observations[{i}]");
            codings(&format!("{at}.code"), &o.code)?;
            if let Some(c) = &o.category
                && !CATEGORIES.contains(&c.as_str())
            {
                return Err(format!(
                    "{at}.category: {c:?} is not an observation-category code ({})",
                    CATEGORIES.join(", ")
                ));
            }
            let kind = match (&o.value, o.components.is_empty(), &o.sampled_data) {
                (Some(v), true, None) => {
                    known(&format!("{at}.value"), v)?;
                    let u = o
                        .unit
                        .clone()
                        .ok_or_else(|| format!("{at}.unit: a value needs its UCUM unit"))?;
                    unit(&format!("{at}.unit"), &u)?;
                    ObservationKind::Quantity {
                        value: v.clone(),
                        unit: u,
                    }
                }
                (None, false, None) => {
                    let mut parts = Vec::new();
                    for (k, c) in o.components.iter().enumerate() {
                        let cat = format!("{at}.components[{k}]");
                        codings(&format!("{cat}.code"), &c.code)?;
                        known(&format!("{cat}.value"), &c.value)?;
                        unit(&format!("{cat}.unit"), &c.unit)?;
                        parts.push((c.code.clone(), c.value.clone(), c.unit.clone()));
                    }
                    ObservationKind::Components(parts)
                }
                (None, true, Some(s)) => {
                    known(&format!("{at}.sampledData.value"), &s.value)?;
                    unit(&format!("{at}.sampledData.unit"), &s.unit)?;
                    if !(s.period_ms.is_finite() && s.period_ms > 0.0) {
                        return Err(format!("{at}.sampledData.periodMs: must be positive"));
                    }
                    ObservationKind::Sampled {
                        value: s.value.clone(),
                        period_ms: s.period_ms,
                        unit: s.unit.clone(),
                        origin: s.origin,
                    }
                }
                _ => {
                    return Err(format!(
                        "{at}: give exactly one of value (with unit), components or sampledData"
                    ));
                }
            };
            let grouping = match &o.grouping {
                None => None,
                Some(g) => Some(grouping(&at, g, &kind)?),
            };
            observations.push(ObservationDef {
                code: o.code.clone(),
                text: o.text.clone(),
                category: o.category.clone(),
                kind,
                grouping,
            });
        }
        let location = match &f.location {
            Some(l) => Some((
                path("location.zone", &l.zone)?,
                l.name
                    .as_deref()
                    .map(|n| path("location.name", n))
                    .transpose()?,
            )),
            None => None,
        };
        if observations.is_empty() && location.is_none() {
            return Err("a template needs observations or a location".into());
        }
        Ok(Template {
            name: f.name.clone(),
            description: f.description.clone(),
            source: source.to_string(),
            matches,
            device_id: path("deviceId", &f.device_id)?,
            device_system: f
                .device_identifier_system
                .clone()
                .unwrap_or_else(|| DEVICE_ID_SYSTEM.to_string()),
            patient_id: f
                .patient_id
                .as_deref()
                .map(|p| path("patientId", p))
                .transpose()?,
            patient_system: f.patient_identifier_system.clone(),
            timestamp: path("timestamp", &f.timestamp)?,
            set_id: f.set_id.as_deref().map(|p| path("setId", p)).transpose()?,
            values,
            observations,
            location,
            json,
        })
    }

    /// Whether every `match` condition holds for `msg`.
    pub fn applies(&self, msg: &Value) -> bool {
        self.matches.iter().all(|(p, equals)| match equals {
            Some(want) => p.select(msg).into_iter().any(|v| v == want),
            None => p.first(msg).is_some(),
        })
    }
}

/// The templates in force, in load order.
#[derive(Debug, Clone, Default)]
pub struct Templates {
    pub all: Vec<Template>,
}

/// The templates shipped in `conformance/device-mappings/`, compiled in.
const SHIPPED: &[(&str, &str)] = &[
    (
        "pulse-oximeter.json",
        include_str!("../../conformance/device-mappings/pulse-oximeter.json"),
    ),
    (
        "blood-pressure.json",
        include_str!("../../conformance/device-mappings/blood-pressure.json"),
    ),
    (
        "thermometer.json",
        include_str!("../../conformance/device-mappings/thermometer.json"),
    ),
    (
        "wearable-heart-rate.json",
        include_str!("../../conformance/device-mappings/wearable-heart-rate.json"),
    ),
    (
        "wearable-steps.json",
        include_str!("../../conformance/device-mappings/wearable-steps.json"),
    ),
    (
        "glucose-meter.json",
        include_str!("../../conformance/device-mappings/glucose-meter.json"),
    ),
    (
        "weight-scale.json",
        include_str!("../../conformance/device-mappings/weight-scale.json"),
    ),
    (
        "respiratory-rate.json",
        include_str!("../../conformance/device-mappings/respiratory-rate.json"),
    ),
    (
        "heart-rate-stream.json",
        include_str!("../../conformance/device-mappings/heart-rate-stream.json"),
    ),
    (
        "ecg-waveform.json",
        include_str!("../../conformance/device-mappings/ecg-waveform.json"),
    ),
    (
        "rtls-tag.json",
        include_str!("../../conformance/device-mappings/rtls-tag.json"),
    ),
];

impl Templates {
    /// The shipped set.
    pub fn shipped() -> Result<Templates, String> {
        Templates::from_files(SHIPPED.iter().map(|(n, t)| (n.to_string(), t.to_string())))
    }

    /// Every `*.json` file of `dir`, in name order.
    pub fn from_dir(dir: &std::path::Path) -> Result<Templates, String> {
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
            .collect();
        files.sort();
        let mut loaded = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            loaded.push((f.display().to_string(), text));
        }
        Templates::from_files(loaded)
    }

    fn from_files(files: impl IntoIterator<Item = (String, String)>) -> Result<Templates, String> {
        let mut all: Vec<Template> = Vec::new();
        for (source, text) in files {
            let t = Template::parse(&source, &text).map_err(|e| format!("{source}: {e}"))?;
            if let Some(other) = all.iter().find(|o| o.name == t.name) {
                return Err(format!(
                    "{source}: template name {:?} is already used by {}",
                    t.name, other.source
                ));
            }
            all.push(t);
        }
        if all.is_empty() {
            return Err("no device mapping templates".into());
        }
        Ok(Templates { all })
    }
}
