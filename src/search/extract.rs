//! Search index extraction (FHIR R4 search.html, "Search Parameter Types": number, date, string, token, reference, quantity, uri): what each parameter type indexes from each data type.
//!
//! For every parameter of a resource's type, the parameter's FHIRPath expression selects
//! elements and the parameter type decides how each element becomes index values. Plain JSON
//! does not carry FHIR types, so the data type is inferred from the element's shape (an object
//! with `coding` is a CodeableConcept, one with `family`/`given` a HumanName, ...), which the
//! combination "parameter type + shape" makes unambiguous for every R4 parameter.
//!
//! Not indexed here: `_id` and `_lastUpdated` (the store keeps them as columns), composite
//! and special parameters, Range and SampledData values, and Timing's `repeat` schedule.

use crate::search::fhirpath::{self, Node};
use crate::search::registry::{ParamType, Registry, SearchParam};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// One index row: the parameter code and one value to match against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IndexEntry {
    pub code: String,
    pub value: IndexValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// `system|code`. A text-only entry (`system` and `code` both `None`) carries
    /// CodeableConcept.text or Coding.display, unnormalised, for the `:text` modifier.
    Token {
        system: Option<String>,
        code: Option<String>,
        text: Option<String>,
    },
    /// `normalized` is [`fold`]ed for the default (starts-with, case- and accent-insensitive)
    /// match; `exact` is the original for `:exact`.
    String {
        normalized: String,
        exact: String,
    },
    /// `url` is the reference text as written; type and id are filled when it has the form
    /// `[base/]Type/id[/_history/v]` (or the target is an inline resource).
    Reference {
        target_type: Option<String>,
        target_id: Option<String>,
        url: String,
    },
    /// Inclusive range in microseconds since the Unix epoch; see [`parse_fhir_date_range`].
    Date {
        start: i64,
        end: i64,
    },
    Number {
        value: f64,
    },
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    Uri(String),
}

// Values come from JSON numbers, which are never NaN, and `number` below turns -0.0 into 0.0,
// so bitwise hashing of f64 agrees with `==`. That lets entries be deduplicated in a HashSet.
impl Eq for IndexValue {}

impl Hash for IndexValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            IndexValue::Token { system, code, text } => (system, code, text).hash(state),
            IndexValue::String { normalized, exact } => (normalized, exact).hash(state),
            IndexValue::Reference {
                target_type,
                target_id,
                url,
            } => (target_type, target_id, url).hash(state),
            IndexValue::Date { start, end } => (start, end).hash(state),
            IndexValue::Number { value } => value.to_bits().hash(state),
            IndexValue::Quantity {
                value,
                system,
                code,
                unit,
            } => (value.to_bits(), system, code, unit).hash(state),
            IndexValue::Uri(u) => u.hash(state),
        }
    }
}

/// Index entries for every evaluable parameter of the resource's type, without duplicates.
/// Aliases (`Registry::alias`) and composites searched by their parts
/// (`Registry::by_parts`) get none: their values are the rows of other parameters. A
/// resource without `resourceType` yields nothing.
pub fn extract(registry: &Registry, resource: &Value) -> Vec<IndexEntry> {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    let mut values = Vec::new();
    let mut extra = Vec::new();
    let aliases = registry.aliases_of(resource_type);
    let by_parts = registry.by_parts_of(resource_type);
    let restricted = registry.restricted_of(resource_type);
    for param in registry.for_type(resource_type) {
        if matches!(param.code.as_str(), "_id" | "_lastUpdated")
            || aliases.is_some_and(|a| a.contains_key(&param.code))
            || by_parts.is_some_and(|a| a.contains_key(&param.code))
        {
            continue;
        }
        let Some(expression) = &param.expression else {
            continue;
        };
        if param.kind == ParamType::Special {
            if param.code == "near" {
                near(expression, resource, resource_type, &mut entries);
            }
            continue;
        }
        if param.kind == ParamType::Composite {
            composite(param, expression, resource, resource_type, &mut entries);
            continue;
        }
        values.clear();
        extra.clear();
        // A restricted reference parameter's rows are its base's (`Registry::restricted`):
        // only its `:identifier` rows are its own.
        let own_rows = !restricted.is_some_and(|r| r.contains_key(&param.code));
        let focus = Node {
            value: resource,
            fhir_type: None,
        };
        for node in expression.evaluate_in(focus, resource, Some(resource_type)) {
            let value = node.value;
            if own_rows {
                index_node(param.kind, node, &mut values);
            }
            match param.kind {
                ParamType::Token => of_type(value, &mut extra),
                ParamType::Reference => {
                    if let Some(identifier) = value.get("identifier") {
                        let node = Node {
                            value: identifier,
                            fhir_type: Some("Identifier"),
                        };
                        token(node, &mut extra);
                    }
                }
                _ => {}
            }
        }
        dedupe(&mut values);
        entries.extend(values.drain(..).map(|value| IndexEntry {
            code: param.code.clone(),
            value,
        }));
        if !extra.is_empty() {
            // search.html#modifiers: `:of-type` on identifiers, `:identifier` on references.
            let suffix = if param.kind == ParamType::Token {
                "of-type"
            } else {
                "identifier"
            };
            dedupe(&mut extra);
            let code = format!("{}:{suffix}", param.code);
            entries.extend(extra.drain(..).map(|value| IndexEntry {
                code: code.clone(),
                value,
            }));
        }
    }
    entries
}

/// The values one (non-composite) parameter takes on `resource`: what access checks
/// evaluate against a resource in memory (a scope's `?param=value`, compartment membership).
pub fn extract_param(param: &SearchParam, resource: &Value) -> Vec<IndexValue> {
    let mut values = Vec::new();
    let (Some(expression), Some(resource_type)) = (
        &param.expression,
        resource.get("resourceType").and_then(Value::as_str),
    ) else {
        return values;
    };
    let focus = Node {
        value: resource,
        fhir_type: None,
    };
    for node in expression.evaluate_in(focus, resource, Some(resource_type)) {
        index_node(param.kind, node, &mut values);
    }
    values
}

/// `Location.near` (location.html#positional): the position's latitude and longitude as
/// numbers under `near:lat` and `near:long`.
fn near(
    expression: &fhirpath::Expr,
    resource: &Value,
    resource_type: &str,
    entries: &mut Vec<IndexEntry>,
) {
    let focus = Node {
        value: resource,
        fhir_type: None,
    };
    for node in expression.evaluate_in(focus, resource, Some(resource_type)) {
        let (Some(lat), Some(long)) = (
            node.value.get("latitude").and_then(Value::as_f64),
            node.value.get("longitude").and_then(Value::as_f64),
        ) else {
            continue;
        };
        entries.push(IndexEntry {
            code: "near:lat".into(),
            value: IndexValue::Number { value: number(lat) },
        });
        entries.push(IndexEntry {
            code: "near:long".into(),
            value: IndexValue::Number {
                value: number(long),
            },
        });
    }
}

/// A composite parameter (search.html#composite) of the supported shape (two components,
/// the first a token or reference) is indexed in the second component's table under
/// combined codes `param$code|system` and `param$code` (see [`composite_token_key`]), or `param$Type/id`,
/// `param$*/id`, `param$url` for a reference, so that one row holds both halves of the
/// same item and `param=a$b` matches only when both come from one item.
fn composite(
    param: &crate::search::registry::SearchParam,
    expression: &fhirpath::Expr,
    resource: &Value,
    resource_type: &str,
    entries: &mut Vec<IndexEntry>,
) {
    let [first, second] = param.components.as_slice() else {
        return;
    };
    let (Some(e0), Some(e1), Some(k0), Some(k1)) = (
        &first.expression,
        &second.expression,
        first.kind,
        second.kind,
    ) else {
        return;
    };
    let focus = Node {
        value: resource,
        fhir_type: None,
    };
    let mut heads = Vec::new();
    let mut tails = Vec::new();
    let mut found: Vec<IndexEntry> = Vec::new();
    for item in expression.evaluate_in(focus, resource, Some(resource_type)) {
        heads.clear();
        tails.clear();
        for node in e0.evaluate_in(item, resource, Some(resource_type)) {
            index_node(k0, node, &mut heads);
        }
        for node in e1.evaluate_in(item, resource, Some(resource_type)) {
            index_node(k1, node, &mut tails);
        }
        dedupe(&mut tails);
        let mut keys = Vec::new();
        for head in &heads {
            composite_keys(&param.code, head, &mut keys);
        }
        for key in keys {
            for tail in &tails {
                found.push(IndexEntry {
                    code: key.clone(),
                    value: tail.clone(),
                });
            }
        }
    }
    let mut seen = HashSet::with_capacity(found.len());
    found.retain(|e| seen.insert(e.clone()));
    entries.extend(found);
}

/// The combined code of a token first component: `param$code|system`, the code's own `\`
/// and `|` escaped; `Some("")` is the code without a system. With `system: None` it is
/// `param$code`, the code in any system: every token head is indexed under both, since
/// index rows are found by a hash of their code (`store::resource::param_key`), which
/// has no prefix ranges.
pub fn composite_token_key(param: &str, code: &str, system: Option<&str>) -> String {
    let code = code.replace('\\', "\\\\").replace('|', "\\|");
    match system {
        Some(system) => format!("{param}${code}|{system}"),
        None => format!("{param}${code}"),
    }
}

/// The combined codes one first-component value is found under (see [`composite`]).
pub fn composite_keys(code: &str, head: &IndexValue, out: &mut Vec<String>) {
    match head {
        IndexValue::Token {
            system,
            code: Some(c),
            ..
        } => {
            out.push(composite_token_key(
                code,
                c,
                Some(system.as_deref().unwrap_or("")),
            ));
            out.push(composite_token_key(code, c, None));
        }
        IndexValue::Reference {
            target_type,
            target_id,
            url,
        } => {
            out.push(format!("{code}${url}"));
            if let (Some(t), Some(id)) = (target_type, target_id) {
                out.push(format!("{code}${t}/{id}"));
                out.push(format!("{code}$*/{id}"));
            }
        }
        _ => {}
    }
}

/// Appends the index values of one selected element; returns whether it produced any.
fn index_node(kind: ParamType, node: Node<'_>, out: &mut Vec<IndexValue>) -> bool {
    let before = out.len();
    match kind {
        ParamType::Token => token(node, out),
        ParamType::String => string(node.value, out),
        ParamType::Date => date(node.value, out),
        ParamType::Reference => reference(node.value, out),
        ParamType::Quantity => quantity(node.value, out),
        ParamType::Number => {
            if let Some(value) = node.value.as_f64() {
                out.push(IndexValue::Number {
                    value: number(value),
                });
            }
        }
        ParamType::Uri => {
            if let Some(s) = node.value.as_str() {
                out.push(IndexValue::Uri(s.to_string()));
            }
        }
        ParamType::Composite | ParamType::Special => {}
    }
    out.len() > before
}

/// Adding 0.0 maps -0.0 to 0.0 so that equal numbers hash equally.
fn number(value: f64) -> f64 {
    value + 0.0
}

fn dedupe(values: &mut Vec<IndexValue>) {
    // Most parameters yield a handful of values, where a quadratic scan beats hashing; a
    // CodeSystem's `code` can yield thousands.
    if values.len() <= 16 {
        let mut kept: Vec<IndexValue> = Vec::with_capacity(values.len());
        for value in values.drain(..) {
            if !kept.contains(&value) {
                kept.push(value);
            }
        }
        *values = kept;
    } else {
        let mut seen: HashSet<IndexValue> = HashSet::with_capacity(values.len());
        values.retain(|v| seen.insert(v.clone()));
    }
}

fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    fhirpath::field(map, key).and_then(Value::as_str)
}

fn owned(s: Option<&str>) -> Option<String> {
    s.map(str::to_string)
}

fn text_token(text: &str, out: &mut Vec<IndexValue>) {
    out.push(IndexValue::Token {
        system: None,
        code: None,
        text: Some(text.to_string()),
    });
}

/// ContactPoint.system codes (http://hl7.org/fhir/R4/valueset-contact-point-system.html).
/// An Identifier and a ContactPoint share the `{system, value}` shape, but an Identifier's
/// system is a URI, never one of these bare codes.
const CONTACT_POINT_SYSTEMS: [&str; 7] = ["phone", "fax", "email", "pager", "url", "sms", "other"];

/// search.html#token: Coding and CodeableConcept give system|code, Identifier gives
/// system|value, ContactPoint its value, primitives (code, string, id, boolean) the code.
fn token(node: Node<'_>, out: &mut Vec<IndexValue>) {
    let map = match node.value {
        Value::String(s) => {
            out.push(IndexValue::Token {
                system: None,
                code: Some(s.clone()),
                text: None,
            });
            return;
        }
        Value::Bool(b) => {
            out.push(IndexValue::Token {
                system: None,
                code: Some(b.to_string()),
                text: None,
            });
            return;
        }
        Value::Number(n) => {
            out.push(IndexValue::Token {
                system: None,
                code: Some(n.to_string()),
                text: None,
            });
            return;
        }
        Value::Object(map) => map,
        Value::Null | Value::Array(_) => return,
    };
    if map.contains_key("coding") || node.fhir_type == Some("CodeableConcept") {
        let text = str_field(map, "text");
        let before = out.len();
        for coding in map
            .get("coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_object)
        {
            coding_token(coding, text, out);
        }
        if out.len() == before
            && let Some(text) = text
        {
            text_token(text, out);
        }
        return;
    }
    if let Some(value) = str_field(map, "value") {
        let system = str_field(map, "system");
        let contact_point = node.fhir_type == Some("ContactPoint")
            || map.contains_key("rank")
            || system.is_some_and(|s| CONTACT_POINT_SYSTEMS.contains(&s));
        out.push(IndexValue::Token {
            // search.html: a ContactPoint token matches on its value only.
            system: if contact_point { None } else { owned(system) },
            code: Some(value.to_string()),
            text: None,
        });
        return;
    }
    if map.contains_key("code") || map.contains_key("system") {
        // Coding, or an Identifier with a system but no value (still matches `system|`).
        coding_token(map, None, out);
        return;
    }
    if let Some(text) = str_field(map, "text") {
        text_token(text, out);
    }
}

/// An Identifier with a `type` gives, for `:of-type`, a token whose system is
/// `type-system|type-code` and whose code is the identifier's value.
fn of_type(value: &Value, out: &mut Vec<IndexValue>) {
    let Some(id_value) = value.get("value").and_then(Value::as_str) else {
        return;
    };
    for coding in value
        .pointer("/type/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(code) = coding.get("code").and_then(Value::as_str) {
            let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
            out.push(IndexValue::Token {
                system: Some(format!("{system}|{code}")),
                code: Some(id_value.to_string()),
                text: None,
            });
        }
    }
}

/// One row per Coding: its system and code, and for `:text` the texts that describe it
/// (the CodeableConcept's `text`, then the Coding's `display`) in the same row, joined by
/// [`TEXT_SEPARATOR`], rather than rows of their own.
fn coding_token(
    coding: &Map<String, Value>,
    concept_text: Option<&str>,
    out: &mut Vec<IndexValue>,
) {
    let system = str_field(coding, "system");
    let code = str_field(coding, "code");
    let display = str_field(coding, "display");
    let text = match (concept_text, display) {
        (Some(t), Some(d)) if t != d => Some(format!("{t}{TEXT_SEPARATOR}{d}")),
        (Some(t), _) => Some(t.to_string()),
        (None, d) => owned(d),
    };
    if system.is_some() || code.is_some() || text.is_some() {
        out.push(IndexValue::Token {
            system: owned(system),
            code: owned(code),
            text,
        });
    }
}

/// Separates the texts of one token row; `:text` searches never contain it.
pub const TEXT_SEPARATOR: char = '\u{1f}';

/// HumanName and Address parts that search.html says a string parameter matches; the two
/// types share only `text`, so one list covers both.
const STRING_PARTS: [&str; 11] = [
    "family",
    "given",
    "prefix",
    "suffix",
    "text",
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
];

fn string(value: &Value, out: &mut Vec<IndexValue>) {
    match value {
        Value::String(s) => out.push(string_value(s)),
        Value::Object(map) => {
            for part in STRING_PARTS {
                match map.get(part) {
                    Some(Value::String(s)) => out.push(string_value(s)),
                    Some(Value::Array(items)) => {
                        out.extend(items.iter().filter_map(Value::as_str).map(string_value));
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn string_value(s: &str) -> IndexValue {
    IndexValue::String {
        normalized: fold(s),
        exact: s.to_string(),
    }
}

/// date, dateTime and instant give their implied range; Period gives start..end with open
/// ends unbounded; Timing gives each `event`.
fn date(value: &Value, out: &mut Vec<IndexValue>) {
    match value {
        Value::String(s) => {
            if let Some((start, end)) = parse_fhir_date_range(s) {
                out.push(IndexValue::Date { start, end });
            }
        }
        Value::Object(map) if map.contains_key("start") || map.contains_key("end") => {
            let bound = |key: &str| str_field(map, key).map(parse_fhir_date_range);
            let start = match bound("start") {
                None => i64::MIN,
                Some(Some((start, _))) => start,
                Some(None) => return,
            };
            let end = match bound("end") {
                None => i64::MAX,
                Some(Some((_, end))) => end,
                Some(None) => return,
            };
            out.push(IndexValue::Date { start, end });
        }
        Value::Object(map) => {
            for event in map
                .get("event")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                date(event, out);
            }
        }
        _ => {}
    }
}

/// Quantity and its profiles (SimpleQuantity, Age, Duration, ...) give value, system, code
/// and unit; Money gives its currency as the code in the ISO 4217 system, as search.html
/// prescribes for searching Money with a quantity parameter.
fn quantity(value: &Value, out: &mut Vec<IndexValue>) {
    let Value::Object(map) = value else {
        return;
    };
    let Some(amount) = map.get("value").and_then(Value::as_f64) else {
        return;
    };
    let entry = if let Some(currency) = str_field(map, "currency") {
        IndexValue::Quantity {
            value: number(amount),
            system: Some("urn:iso:std:iso:4217".to_string()),
            code: Some(currency.to_string()),
            unit: None,
        }
    } else {
        IndexValue::Quantity {
            value: number(amount),
            system: owned(str_field(map, "system")),
            code: owned(str_field(map, "code")),
            unit: owned(str_field(map, "unit")),
        }
    };
    out.push(entry);
}

/// Reference gives its target from `reference`; a canonical or uri gives itself; an inline
/// resource (`Bundle.entry[0].resource`) gives `Type/id`. Contained (`#id`) references and
/// identifier-only references are not indexed.
///
/// The target type is the one FHIRPath `resolve() is T` sees (`fhirpath`): from the text,
/// else from `Reference.type` (a `urn:uuid:` with `type: Patient` is a Patient reference
/// without an id). Restricted parameters (`Registry::restricted`) rely on it.
fn reference(value: &Value, out: &mut Vec<IndexValue>) {
    match value {
        Value::String(canonical) => {
            // A canonical's `|version` is not part of the target's id.
            let target = canonical.split('|').next().unwrap_or(canonical);
            push_reference(target, canonical, None, out);
        }
        Value::Object(map) => {
            if let Some(text) = str_field(map, "reference") {
                // `Reference.type` is a URI; a full StructureDefinition URL is legal too.
                let declared = str_field(map, "type").and_then(|t| t.rsplit('/').next());
                push_reference(text, text, declared, out);
            } else if let Some(resource_type) = str_field(map, "resourceType")
                && let Some(id) = str_field(map, "id")
            {
                out.push(IndexValue::Reference {
                    target_type: Some(resource_type.to_string()),
                    target_id: Some(id.to_string()),
                    url: format!("{resource_type}/{id}"),
                });
            }
        }
        _ => {}
    }
}

fn push_reference(target: &str, url: &str, declared: Option<&str>, out: &mut Vec<IndexValue>) {
    if target.is_empty() || target.starts_with('#') {
        return;
    }
    let (target_type, target_id) = match fhirpath::split_type_and_id(target) {
        Some((t, id)) if !target.starts_with("urn:") => (Some(t.to_string()), Some(id.to_string())),
        Some((t, _)) => (Some(t.to_string()), None),
        None => (declared.map(str::to_string), None),
    };
    out.push(IndexValue::Reference {
        target_type,
        target_id,
        url: url.to_string(),
    });
}

// ---------------------------------------------------------------------------------------
// Dates (datatypes.html#date, #dateTime, #instant; search.html#date)

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// The range a FHIR date, dateTime or instant covers, as inclusive microseconds since the
/// Unix epoch: `2019` is all of 2019, `2019-03` all of March, `2019-03-04T10:00` that minute,
/// `...:05.1` that tenth of a second. Also accepts the search forms without seconds.
///
/// A time without a zone is treated as UTC. FHIR requires a zone on dateTime values with a
/// time, so this only matters for search arguments, where the spec leaves the server's zone
/// open; UTC keeps the index independent of the machine's local time.
///
/// Returns `None` for anything else, including time-only values and impossible dates.
pub fn parse_fhir_date_range(s: &str) -> Option<(i64, i64)> {
    let b = s.as_bytes();
    let year = digits(b, 0, 4)?;
    if year == 0 {
        return None;
    }
    if b.len() == 4 {
        let start = days_from_civil(year, 1, 1) * MICROS_PER_DAY;
        return Some((start, days_from_civil(year + 1, 1, 1) * MICROS_PER_DAY - 1));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = digits(b, 5, 2).filter(|m| (1..=12).contains(m))?;
    if b.len() == 7 {
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        let start = days_from_civil(year, month, 1) * MICROS_PER_DAY;
        let end = days_from_civil(next_year, next_month, 1) * MICROS_PER_DAY - 1;
        return Some((start, end));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = digits(b, 8, 2).filter(|d| (1..=days_in_month(year, month)).contains(d))?;
    let midnight = days_from_civil(year, month, day) * MICROS_PER_DAY;
    if b.len() == 10 {
        return Some((midnight, midnight + MICROS_PER_DAY - 1));
    }
    if b.get(10) != Some(&b'T') || b.get(13) != Some(&b':') {
        return None;
    }
    let hour = digits(b, 11, 2).filter(|h| *h <= 23)?;
    let minute = digits(b, 14, 2).filter(|m| *m <= 59)?;
    let mut pos = 16;
    let mut second = 0;
    let mut fraction = 0;
    let mut span = 60 * MICROS_PER_SECOND;
    if b.get(pos) == Some(&b':') {
        second = digits(b, pos + 1, 2).filter(|s| *s <= 59)?;
        pos += 3;
        span = MICROS_PER_SECOND;
        if b.get(pos) == Some(&b'.') {
            pos += 1;
            let first = pos;
            while b.get(pos).is_some_and(u8::is_ascii_digit) {
                // Digits beyond microseconds are below the index's resolution.
                if pos - first < 6 {
                    fraction = fraction * 10 + i64::from(b[pos] - b'0');
                    span /= 10;
                }
                pos += 1;
            }
            if pos == first {
                return None;
            }
            let kept = (pos - first).min(6);
            fraction *= 10_i64.pow(6 - kept as u32);
        }
    }
    let offset_seconds = match &b[pos..] {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hours = digits(b, pos + 1, 2).filter(|h| *h <= 14)?;
            let minutes = digits(b, pos + 4, 2).filter(|m| *m <= 59)?;
            let seconds = (hours * 60 + minutes) * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    let start = midnight
        + ((hour * 60 + minute) * 60 + second - offset_seconds) * MICROS_PER_SECOND
        + fraction;
    Some((start, start + span - 1))
}

fn digits(b: &[u8], at: usize, count: usize) -> Option<i64> {
    let slice = b.get(at..at + count)?;
    slice.iter().try_fold(0_i64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------
// String normalisation (search.html#string: "case-insensitive and accent-insensitive")

/// Lower-cases and removes diacritics, so `Adán` and `adan` match and `Müller` is `muller`.
/// Covers Latin-1 Supplement and Latin Extended-A with a table (letters without a
/// decomposition, like `ß`, `æ`, `ø`, `ł`, get their usual ASCII spelling) and drops
/// combining marks from already-decomposed input; other scripts are only lower-cased.
pub fn fold(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_lowercase();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let cp = c as u32;
        if let Some(folded) = cp
            .checked_sub(0xC0)
            .and_then(|i| LATIN_FOLD.get(i as usize))
            .filter(|f| !f.is_empty())
        {
            out.push_str(folded);
        } else if !(0x300..=0x36F).contains(&cp) {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// U+00C0..=U+017F folded to lower-case ASCII, generated from Unicode NFD with the
/// non-decomposable letters filled in by hand; "" keeps the character (× and ÷).
const LATIN_FOLD: [&str; 192] = [
    "a", "a", "a", "a", "a", "a", "ae", "c", // U+00C0 ÀÁÂÃÄÅÆÇ
    "e", "e", "e", "e", "i", "i", "i", "i", // U+00C8 ÈÉÊËÌÍÎÏ
    "d", "n", "o", "o", "o", "o", "o", "", // U+00D0 ÐÑÒÓÔÕÖ×
    "o", "u", "u", "u", "u", "y", "th", "ss", // U+00D8 ØÙÚÛÜÝÞß
    "a", "a", "a", "a", "a", "a", "ae", "c", // U+00E0 àáâãäåæç
    "e", "e", "e", "e", "i", "i", "i", "i", // U+00E8 èéêëìíîï
    "d", "n", "o", "o", "o", "o", "o", "", // U+00F0 ðñòóôõö÷
    "o", "u", "u", "u", "u", "y", "th", "y", // U+00F8 øùúûüýþÿ
    "a", "a", "a", "a", "a", "a", "c", "c", // U+0100 ĀāĂăĄąĆć
    "c", "c", "c", "c", "c", "c", "d", "d", // U+0108 ĈĉĊċČčĎď
    "d", "d", "e", "e", "e", "e", "e", "e", // U+0110 ĐđĒēĔĕĖė
    "e", "e", "e", "e", "g", "g", "g", "g", // U+0118 ĘęĚěĜĝĞğ
    "g", "g", "g", "g", "h", "h", "h", "h", // U+0120 ĠġĢģĤĥĦħ
    "i", "i", "i", "i", "i", "i", "i", "i", // U+0128 ĨĩĪīĬĭĮį
    "i", "i", "ij", "ij", "j", "j", "k", "k", // U+0130 İıĲĳĴĵĶķ
    "k", "l", "l", "l", "l", "l", "l", "l", // U+0138 ĸĹĺĻļĽľĿ
    "l", "l", "l", "n", "n", "n", "n", "n", // U+0140 ŀŁłŃńŅņŇ
    "n", "n", "n", "n", "o", "o", "o", "o", // U+0148 ňŉŊŋŌōŎŏ
    "o", "o", "oe", "oe", "r", "r", "r", "r", // U+0150 ŐőŒœŔŕŖŗ
    "r", "r", "s", "s", "s", "s", "s", "s", // U+0158 ŘřŚśŜŝŞş
    "s", "s", "t", "t", "t", "t", "t", "t", // U+0160 ŠšŢţŤťŦŧ
    "u", "u", "u", "u", "u", "u", "u", "u", // U+0168 ŨũŪūŬŭŮů
    "u", "u", "u", "u", "w", "w", "y", "y", // U+0170 ŰűŲųŴŵŶŷ
    "y", "z", "z", "z", "z", "z", "z", "s", // U+0178 ŸŹźŻżŽžſ
];

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use crate::search::registry::LoadReport;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared");

    fn read_json(path: &str) -> Value {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn registry() -> &'static Registry {
        static REGISTRY: OnceLock<(Registry, LoadReport)> = OnceLock::new();
        &REGISTRY
            .get_or_init(|| {
                Registry::from_bundle(&read_json(&format!(
                    "{SHARED}/fhir-r4/definitions/search-parameters.json"
                )))
            })
            .0
    }

    fn values(resource: &Value, code: &str) -> Vec<IndexValue> {
        extract(registry(), resource)
            .into_iter()
            .filter(|e| e.code == code)
            .map(|e| e.value)
            .collect()
    }

    /// A restricted reference parameter (`Registry::restricted`) writes no reference rows;
    /// its base's rows carry the target type `resolve() is T` sees, and its `:identifier`
    /// rows stay its own.
    #[test]
    fn restricted_references_read_their_base() {
        let observation = |subject: Value| {
            json!({"resourceType": "Observation", "status": "final",
                "code": {"text": "x"}, "subject": subject})
        };
        let plain = observation(json!({"reference": "Patient/1"}));
        assert_eq!(
            values(&plain, "subject"),
            [reference(Some("Patient"), Some("1"), "Patient/1")]
        );
        assert!(values(&plain, "patient").is_empty());
        // A `urn:uuid:` says its type only in `Reference.type`, as `resolve()` reads it.
        let typed = observation(json!({"reference": "urn:uuid:0b9c", "type": "Patient"}));
        assert_eq!(
            values(&typed, "subject"),
            [reference(Some("Patient"), None, "urn:uuid:0b9c")]
        );
        let url = observation(json!({"reference": "urn:uuid:0b9c",
            "type": "http://hl7.org/fhir/StructureDefinition/Group"}));
        assert_eq!(
            values(&url, "subject"),
            [reference(Some("Group"), None, "urn:uuid:0b9c")]
        );
        let identified = observation(json!({"type": "Patient",
            "identifier": {"system": "urn:mrn", "value": "42"}}));
        assert_eq!(
            values(&identified, "patient:identifier"),
            [token(Some("urn:mrn"), Some("42"), None)]
        );
        assert_eq!(
            values(&identified, "subject:identifier"),
            [token(Some("urn:mrn"), Some("42"), None)]
        );
        let group = observation(json!({"type": "Group",
            "identifier": {"system": "urn:mrn", "value": "42"}}));
        assert!(values(&group, "patient:identifier").is_empty());
    }

    /// Observation `code-value-*` composites are searched by their parts
    /// (`Registry::by_parts`): no rows of their own; `component-*` ones keep theirs. A
    /// SampledData value gives no `value-quantity` row, which is what lets `value-quantity`
    /// stand for the component `value.as(Quantity)`.
    #[test]
    fn root_composites_have_no_rows_of_their_own() {
        let loinc = |c: &str| json!({"coding": [{"system": "http://loinc.org", "code": c}]});
        let mmhg =
            |v: f64| json!({"value": v, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"});
        let bp = json!({"resourceType": "Observation", "status": "final", "code": loinc("8480-6"),
            "valueQuantity": mmhg(150.0),
            "component": [{"code": loinc("8462-4"), "valueQuantity": mmhg(95.0)}]});
        let codes: Vec<String> = extract(registry(), &bp)
            .into_iter()
            .map(|e| e.code)
            .collect();
        assert!(
            codes.iter().all(|c| !c.starts_with("code-value-")),
            "{codes:?}"
        );
        assert!(
            codes
                .iter()
                .any(|c| c == "component-code-value-quantity$8462-4|http://loinc.org"),
            "{codes:?}"
        );
        assert_eq!(values(&bp, "value-quantity").len(), 1);
        assert_eq!(values(&bp, "code").len(), 1);
        let sampled = json!({"resourceType": "Observation", "status": "final", "code": loinc("8867-4"),
            "valueSampledData": {"origin": {"value": 0}, "period": 1000, "dimensions": 1,
                "data": "60 61 62"}});
        assert!(values(&sampled, "value-quantity").is_empty());
    }

    fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> IndexValue {
        IndexValue::Token {
            system: system.map(str::to_string),
            code: code.map(str::to_string),
            text: text.map(str::to_string),
        }
    }

    fn string(exact: &str) -> IndexValue {
        string_value(exact)
    }

    fn reference(t: Option<&str>, id: Option<&str>, url: &str) -> IndexValue {
        IndexValue::Reference {
            target_type: t.map(str::to_string),
            target_id: id.map(str::to_string),
            url: url.to_string(),
        }
    }

    fn range(s: &str) -> IndexValue {
        let (start, end) = parse_fhir_date_range(s).unwrap_or_else(|| panic!("{s}"));
        IndexValue::Date { start, end }
    }

    /// Extracts `code` from `resource` and compares with `expected`, in order.
    fn check(code: &str, resource: Value, expected: &[IndexValue]) {
        assert_eq!(values(&resource, code), expected, "{code} of {resource}");
    }

    #[test]
    fn folds_case_and_accents() {
        for (input, expected) in [
            ("Adán", "adan"),
            ("Müller", "muller"),
            ("ÆSØP Straße", "aesop strasse"),
            ("Łódź Œuvre", "lodz oeuvre"),
            ("Ŀlŉ×÷", "lln×÷"),
            ("Cafe\u{301}", "cafe"),
            ("ΣΊΣΥΦΟΣ", "σίσυφοσ"),
            ("PLAIN ascii", "plain ascii"),
        ] {
            assert_eq!(fold(input), expected, "{input}");
        }
    }

    #[test]
    fn date_ranges() {
        const US: i64 = 1_000_000;
        const DAY: i64 = 86_400 * US;
        let day_2019 = 17_897 * DAY; // 2019-01-01
        for (input, expected) in [
            ("1970", Some((0, 365 * DAY - 1))),
            ("2019", Some((day_2019, day_2019 + 365 * DAY - 1))),
            ("2020-02", Some((18_293 * DAY, 18_322 * DAY - 1))),
            (
                "2019-12",
                Some((day_2019 + 334 * DAY, day_2019 + 365 * DAY - 1)),
            ),
            ("2019-01-02", Some((day_2019 + DAY, day_2019 + 2 * DAY - 1))),
            (
                "2019-01-01T10:00",
                Some((day_2019 + 36_000 * US, day_2019 + 36_060 * US - 1)),
            ),
            (
                "2019-01-01T10:00:05Z",
                Some((day_2019 + 36_005 * US, day_2019 + 36_006 * US - 1)),
            ),
            (
                "2019-01-01T10:00:05+02:00",
                Some((day_2019 + 28_805 * US, day_2019 + 28_806 * US - 1)),
            ),
            (
                "2019-01-01T10:00:05-00:30",
                Some((day_2019 + 37_805 * US, day_2019 + 37_806 * US - 1)),
            ),
            (
                "2019-01-01T00:00:00.5Z",
                Some((day_2019 + 500_000, day_2019 + 599_999)),
            ),
            (
                "2019-01-01T00:00:00.123456789Z",
                Some((day_2019 + 123_456, day_2019 + 123_456)),
            ),
            ("1969-12-31T23:59:59Z", Some((-US, -1))),
            ("2019-02-29", None),
            ("2020-02-29", Some((18_321 * DAY, 18_322 * DAY - 1))),
            ("2019-13", None),
            ("2019-1", None),
            ("0000", None),
            ("2019-01-01T24:00:00Z", None),
            ("2019-01-01T10:00:00.Z", None),
            ("2019-01-01T10:00:00+15:00", None),
            ("2019-01-01T10:00:00 ", None),
            ("10:00:00", None),
            ("2019-01-01T", None),
            ("", None),
            ("2019-01-01T10:00:00+01", None),
        ] {
            assert_eq!(parse_fhir_date_range(input), expected, "{input}");
        }
        let (start, end) = parse_fhir_date_range("9999").unwrap_or_default();
        assert!(start < end);
    }

    #[test]
    fn data_types() {
        let patient = json!({
            "resourceType": "Patient", "id": "p",
            "meta": {"tag": [{"system": "urn:t", "code": "a"}], "profile": ["http://x/p|1.0"], "source": "urn:src"},
            "identifier": [{"system": "urn:mrn", "value": "12"}, {"system": "urn:mrn"}, {"type": {"text": "no value"}}],
            "active": true,
            "name": [{"family": "Núñez", "given": ["Adán", "Jo"], "prefix": ["Dr"]}],
            "telecom": [{"system": "phone", "value": "555"}, {"system": "email", "value": "a@b"}],
            "gender": "male",
            "birthDate": "1980-05",
            "address": [{"line": ["1 Main St"], "city": "Köln", "postalCode": "50667", "country": "DE"}],
            "deceasedBoolean": false,
            "generalPractitioner": [{"reference": "#gp"}, {"reference": "Practitioner/1"}, {"identifier": {"value": "x"}}],
            "managingOrganization": {"reference": "https://fhir.example.org/r4/Organization/o1/_history/3"},
            "link": [{"other": {"reference": "urn:uuid:9f2c"}}]
        });
        check(
            "_tag",
            patient.clone(),
            &[token(Some("urn:t"), Some("a"), None)],
        );
        check(
            "_profile",
            patient.clone(),
            &[IndexValue::Uri("http://x/p|1.0".into())],
        );
        check(
            "_source",
            patient.clone(),
            &[IndexValue::Uri("urn:src".into())],
        );
        check("_id", patient.clone(), &[]);
        check(
            "identifier",
            patient.clone(),
            &[
                token(Some("urn:mrn"), Some("12"), None),
                token(Some("urn:mrn"), None, None),
            ],
        );
        check(
            "active",
            patient.clone(),
            &[token(None, Some("true"), None)],
        );
        check(
            "gender",
            patient.clone(),
            &[token(None, Some("male"), None)],
        );
        check(
            "deceased",
            patient.clone(),
            &[token(None, Some("false"), None)],
        );
        check("phone", patient.clone(), &[token(None, Some("555"), None)]);
        check(
            "telecom",
            patient.clone(),
            &[
                token(None, Some("555"), None),
                token(None, Some("a@b"), None),
            ],
        );
        check("family", patient.clone(), &[string("Núñez")]);
        assert_eq!(
            string("Núñez"),
            IndexValue::String {
                normalized: "nunez".into(),
                exact: "Núñez".into()
            }
        );
        check("given", patient.clone(), &[string("Adán"), string("Jo")]);
        check(
            "name",
            patient.clone(),
            &[string("Núñez"), string("Adán"), string("Jo"), string("Dr")],
        );
        check(
            "address",
            patient.clone(),
            &[
                string("1 Main St"),
                string("Köln"),
                string("50667"),
                string("DE"),
            ],
        );
        check("address-city", patient.clone(), &[string("Köln")]);
        check("birthdate", patient.clone(), &[range("1980-05")]);
        check(
            "general-practitioner",
            patient.clone(),
            &[reference(Some("Practitioner"), Some("1"), "Practitioner/1")],
        );
        check(
            "organization",
            patient.clone(),
            &[reference(
                Some("Organization"),
                Some("o1"),
                "https://fhir.example.org/r4/Organization/o1/_history/3",
            )],
        );
        check("link", patient, &[reference(None, None, "urn:uuid:9f2c")]);

        let observation = json!({
            "resourceType": "Observation",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "HR"},
            "effectivePeriod": {"start": "2021-01-01T00:00:00Z"},
            "valueQuantity": {"value": -0.0, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
            "component": [
                {"code": {"text": "a"}, "valueQuantity": {"value": 1, "code": "mm[Hg]"}},
                {"code": {"text": "b"}, "valueString": "Süß"}
            ]
        });
        check(
            "code",
            observation.clone(),
            &[token(
                Some("http://loinc.org"),
                Some("8867-4"),
                Some("HR\u{1f}Heart rate"),
            )],
        );
        let (start, _) = parse_fhir_date_range("2021-01-01T00:00:00Z").unwrap_or_default();
        check(
            "date",
            observation.clone(),
            &[IndexValue::Date {
                start,
                end: i64::MAX,
            }],
        );
        let quantity = |value: f64, system: Option<&str>, code: &str, unit: Option<&str>| {
            IndexValue::Quantity {
                value,
                system: system.map(str::to_string),
                code: Some(code.to_string()),
                unit: unit.map(str::to_string),
            }
        };
        let heart_rate = quantity(0.0, Some("http://unitsofmeasure.org"), "/min", Some("/min"));
        check(
            "value-quantity",
            observation.clone(),
            std::slice::from_ref(&heart_rate),
        );
        check(
            "component-value-quantity",
            observation.clone(),
            &[quantity(1.0, None, "mm[Hg]", None)],
        );
        // An alias (`value-quantity` | `component-value-quantity`) has no rows of its own.
        check("combo-value-quantity", observation.clone(), &[]);
        let param = registry()
            .get("Observation", "combo-value-quantity")
            .expect("combo-value-quantity");
        assert_eq!(
            extract_param(param, &observation),
            [heart_rate, quantity(1.0, None, "mm[Hg]", None)]
        );
        check("value-string", observation.clone(), &[]);
        check(
            "component-code",
            observation,
            &[token(None, None, Some("a")), token(None, None, Some("b"))],
        );

        let claim = json!({"resourceType": "ChargeItem", "priceOverride": {"value": 10.5, "currency": "EUR"}, "factorOverride": 0.8});
        check(
            "price-override",
            claim.clone(),
            &[quantity(10.5, Some("urn:iso:std:iso:4217"), "EUR", None)],
        );
        check(
            "factor-override",
            claim,
            &[IndexValue::Number { value: 0.8 }],
        );

        let medication = json!({"resourceType": "MedicationRequest", "dosageInstruction": [{"timing": {"event": ["2020-01-01", "2020-01-01", "2020-02-01"]}}]});
        check(
            "date",
            medication.clone(),
            &[range("2020-01-01"), range("2020-02-01")],
        );
        let canonical = json!({"resourceType": "PlanDefinition", "library": ["http://example.org/Library/lib|2.0", "http://example.org/lib"]});
        check(
            "depends-on",
            canonical,
            &[
                reference(
                    Some("Library"),
                    Some("lib"),
                    "http://example.org/Library/lib|2.0",
                ),
                reference(None, None, "http://example.org/lib"),
            ],
        );
        let bundle = json!({"resourceType": "Bundle", "type": "document", "entry": [{"resource": {"resourceType": "Composition", "id": "c1"}}]});
        check(
            "composition",
            bundle,
            &[reference(Some("Composition"), Some("c1"), "Composition/c1")],
        );

        // Not a resource, or a type nothing is registered for: nothing, no panic.
        assert!(extract(registry(), &json!({"id": "x"})).is_empty());
        assert!(extract(registry(), &json!([1, 2])).is_empty());
        let unknown = extract(
            registry(),
            &json!({"resourceType": "Unknown", "meta": {"tag": [{"code": "t"}]}}),
        );
        assert_eq!(unknown.len(), 1);
    }

    #[test]
    fn dedupes_large_outputs() {
        let concepts: Vec<Value> = (0..100)
            .map(|i| json!({"code": format!("c{}", i % 40)}))
            .collect();
        let code_system = json!({"resourceType": "CodeSystem", "concept": concepts});
        assert_eq!(values(&code_system, "code").len(), 40);
    }

    /// Runs extraction over every official example and every Synthea entry: no panics, and
    /// spot checks against known values.
    #[test]
    fn extracts_examples_and_synthea() {
        let mut resources: Vec<(String, Value)> = Vec::new();
        let examples =
            std::fs::read_dir(format!("{SHARED}/fhir-r4/examples-json")).expect("examples");
        for path in examples.filter_map(Result::ok).map(|e| e.path()) {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            resources.push((name, read_json(&path.to_string_lossy())));
        }
        let bundles = std::fs::read_dir(format!("{SHARED}/synthea")).expect("synthea");
        for path in bundles.filter_map(Result::ok).map(|e| e.path()) {
            let bundle = read_json(&path.to_string_lossy());
            for entry in bundle["entry"].as_array().into_iter().flatten() {
                resources.push(("synthea".into(), entry["resource"].clone()));
            }
        }
        assert!(resources.len() >= 715 + 5665, "{}", resources.len());

        // Elements selected by an expression that yielded no index value, by parameter type
        // and shape: the coverage gaps, printed for review.
        let mut gaps: BTreeMap<String, usize> = BTreeMap::new();
        let mut entries = 0;
        for (_, resource) in &resources {
            entries += extract(registry(), resource).len();
            let resource_type = resource["resourceType"].as_str().unwrap_or_default();
            for param in registry().for_type(resource_type) {
                let Some(expr) = &param.expression else {
                    continue;
                };
                if matches!(param.kind, ParamType::Composite | ParamType::Special) {
                    continue;
                }
                for node in expr.evaluate(resource) {
                    if !index_node(param.kind, node, &mut Vec::new()) {
                        let shape = match node.value {
                            Value::Object(m) => {
                                m.keys().map(String::as_str).collect::<Vec<_>>().join(",")
                            }
                            other => format!("{other}"),
                        };
                        let key = format!(
                            "{:?} {resource_type}.{} [{}]",
                            param.kind, param.code, shape
                        );
                        *gaps.entry(key).or_default() += 1;
                    }
                }
            }
        }
        println!("{} resources, {entries} index entries", resources.len());
        for (gap, count) in &gaps {
            println!("not indexed x{count}: {gap}");
        }

        let find = |name: &str| {
            resources
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, r)| r)
                .unwrap_or_else(|| panic!("{name}"))
        };
        let patient = find("Patient-example.json");
        let family = values(patient, "family");
        assert!(family.contains(&string("Chalmers")), "{family:?}");
        assert!(family.iter().any(
            |v| matches!(v, IndexValue::String { normalized, .. } if normalized == "chalmers")
        ));
        assert!(values(patient, "birthdate").contains(&range("1974-12-25")));

        let observation = find("Observation-example.json");
        let quantities = values(observation, "value-quantity");
        assert!(
            matches!(quantities.as_slice(), [IndexValue::Quantity { value, code: Some(c), .. }] if *value == 185.0 && c == "[lb_av]"),
            "{quantities:?}"
        );
        let codes = values(observation, "code");
        assert!(
            codes.iter().any(|c| matches!(c, IndexValue::Token { system: Some(s), code: Some(c), .. } if s == "http://loinc.org" && c == "29463-7")),
            "{codes:?}"
        );
        assert!(values(observation, "subject").contains(&reference(
            Some("Patient"),
            Some("example"),
            "Patient/example"
        )));
        // `patient` is `subject` restricted to Patients: it reads `subject`'s rows.
        assert!(values(observation, "patient").is_empty());

        // A partial date covers its whole year.
        let person = find("Person-f002.json");
        assert_eq!(values(person, "birthdate"), [range("1963")]);

        let synthea_observation = resources
            .iter()
            .filter(|(name, _)| name == "synthea")
            .map(|(_, r)| r)
            .find(|r| r["resourceType"] == "Observation" && r.get("valueQuantity").is_some())
            .expect("a Synthea observation");
        let subject = values(synthea_observation, "subject");
        assert!(
            matches!(subject.as_slice(), [IndexValue::Reference { target_type: None, url, .. }] if url.starts_with("urn:uuid:")),
            "{subject:?}"
        );
        assert!(values(synthea_observation, "_tag").contains(&token(
            Some("https://smarthealthit.org/tags"),
            Some("synthea-5-2019"),
            None
        )));
    }

    /// Wrong JSON shapes (a stored resource is validated, but extraction must not depend on
    /// it): every string, then every object, replaced, over all examples.
    #[test]
    fn hostile_shapes_never_panic() {
        fn mutate(v: &Value, mode: u8) -> Value {
            match v {
                Value::String(s) if mode == 0 => json!(s.len()),
                Value::String(s) if mode == 1 => json!(format!("{s}/_history/#|")),
                Value::Object(m) => {
                    let inner: Map<String, Value> = m
                        .iter()
                        .map(|(k, v)| {
                            let keep = k == "resourceType";
                            (k.clone(), if keep { v.clone() } else { mutate(v, mode) })
                        })
                        .collect();
                    if mode == 2 {
                        json!([Value::Object(inner), null])
                    } else {
                        Value::Object(inner)
                    }
                }
                Value::Array(items) => {
                    Value::Array(items.iter().map(|i| mutate(i, mode)).collect())
                }
                other => other.clone(),
            }
        }
        let examples =
            std::fs::read_dir(format!("{SHARED}/fhir-r4/examples-json")).expect("examples");
        let mut entries = 0;
        for path in examples.filter_map(Result::ok).map(|e| e.path()) {
            let resource = read_json(&path.to_string_lossy());
            for mode in 0..3 {
                let mut hostile = mutate(&resource, mode);
                if let Value::Array(wrapped) = &hostile {
                    hostile = wrapped.first().cloned().unwrap_or_default();
                }
                entries += extract(registry(), &hostile).len();
            }
        }
        let odd = json!({
            "resourceType": "Observation", "code": "x", "subject": 5, "valueQuantity": "str",
            "effectiveDateTime": {"a": 1}, "component": [null, 1, "x", {"valueQuantity": {"value": "1"}}],
            "meta": {"tag": "not-an-array", "profile": [null]}, "identifier": [[{"value": "nested"}]]
        });
        entries += extract(registry(), &odd).len();
        println!("hostile shapes: {entries} entries");
    }

    /// Prints the time to extract every parameter of an Observation (not asserted: timing
    /// depends on the machine and the build profile).
    #[test]
    fn extraction_time() {
        let observations: Vec<Value> = std::fs::read_dir(format!("{SHARED}/synthea"))
            .expect("synthea")
            .filter_map(Result::ok)
            .take(3)
            .flat_map(|e| {
                let bundle = read_json(&e.path().to_string_lossy());
                bundle["entry"].as_array().cloned().unwrap_or_default()
            })
            .map(|entry| entry["resource"].clone())
            .filter(|r| r["resourceType"] == "Observation")
            .collect();
        let example = read_json(&format!(
            "{SHARED}/fhir-r4/examples-json/Observation-blood-pressure.json"
        ));
        let registry = registry();
        for (label, set) in [
            ("Synthea Observation", observations.as_slice()),
            ("Observation-blood-pressure", std::slice::from_ref(&example)),
        ] {
            assert!(!set.is_empty());
            let rounds = (20_000 / set.len()).max(1);
            let mut entries = 0;
            let started = std::time::Instant::now();
            for _ in 0..rounds {
                for resource in set {
                    entries += extract(registry, resource).len();
                }
            }
            let per = started.elapsed() / (rounds * set.len()) as u32;
            println!(
                "extract {label}: {per:?} per resource ({} resources, {} entries each)",
                set.len(),
                entries / (rounds * set.len())
            );
        }
    }
}
