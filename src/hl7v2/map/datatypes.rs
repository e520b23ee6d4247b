//! HL7 v2 data types (v2.9 chapter 2A) to FHIR R4 data types, following the v2-to-FHIR IG
//! data type maps (hl7.org/fhir/uv/v2mappings: CX, XPN, XAD, XTN, XCN, CWE, EI, HD, NM, SN,
//! DTM/TS, TM).
//!
//! Everything here is a pure function of the parsed fields; callers decide what is fatal.

use serde_json::{Map, Value, json};

use crate::hl7v2::message::{Repetition, Segment};

/// FHIR system of the ISO/IEEE 11073-10101 nomenclature (MDC), decimal codes.
pub(crate) const MDC: &str = "urn:iso:std:iso:11073:10101";
pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";
/// Identifier system for EUI-64 device identifiers (as agreed for this server).
pub(crate) const EUI64: &str = "urn:ieee:eui64";
/// Identifier system for an identifier whose value is itself a URI (`urn:oid:`, `urn:uuid:`).
pub(crate) const RFC3986: &str = "urn:ietf:rfc:3986";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

/// Drops what carries no value: empty strings and the HL7 null `""`. For a mapping that
/// replaces whole resources (conditional update), "absent" and "delete" end up the same.
pub(crate) fn clean(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty() && *s != "\"\"")
}

/// Field access on top of the parser's `Segment`, with `clean` applied.
pub(crate) trait SegmentExt {
    /// Component 1, subcomponent 1 of the first repetition of `field`.
    fn v(&self, field: usize) -> Option<&str>;
    /// Component `comp` of the first repetition of `field`.
    fn vc(&self, field: usize, comp: usize) -> Option<&str>;
    /// All repetitions of `field` (empty when the field is absent).
    fn reps(&self, field: usize) -> &[Repetition];
    /// The first repetition of `field`, when it has any content.
    fn rep(&self, field: usize) -> Option<&Repetition>;
}

impl SegmentExt for Segment {
    fn v(&self, field: usize) -> Option<&str> {
        clean(self.get(field, 0, 1, 1))
    }
    fn vc(&self, field: usize, comp: usize) -> Option<&str> {
        clean(self.get(field, 0, comp, 1))
    }
    fn reps(&self, field: usize) -> &[Repetition] {
        self.field(field).map_or(&[], |f| f.repetitions.as_slice())
    }
    fn rep(&self, field: usize) -> Option<&Repetition> {
        self.reps(field).first().filter(|r| !r.is_blank())
    }
}

/// Component access on a repetition, with `clean` applied.
pub(crate) trait RepExt {
    /// Component `n` (1-based), subcomponent 1.
    fn c(&self, n: usize) -> Option<&str>;
    /// Component `n`, subcomponent `s` (both 1-based).
    fn sc(&self, n: usize, s: usize) -> Option<&str>;
    /// True when every subcomponent is empty or the HL7 null `""`.
    fn is_blank(&self) -> bool;
}

impl RepExt for Repetition {
    fn c(&self, n: usize) -> Option<&str> {
        self.sc(n, 1)
    }
    fn sc(&self, n: usize, s: usize) -> Option<&str> {
        let comp = self.components.get(n.checked_sub(1)?)?;
        clean(
            comp.subcomponents
                .get(s.checked_sub(1)?)
                .map(String::as_str),
        )
    }
    fn is_blank(&self) -> bool {
        self.components
            .iter()
            .flat_map(|c| c.subcomponents.iter())
            .all(|s| clean(Some(s)).is_none())
    }
}

// ---------------------------------------------------------------------------------------
// URIs and identifiers

/// Percent-encodes everything but RFC 3986 unreserved characters, so that a v2 namespace
/// ("HO Surgery", "ACME Healthcare") can sit inside a URN and survive a search URL.
pub(crate) fn urn_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn is_oid(s: &str) -> bool {
    let mut parts = s.split('.');
    let first_ok = matches!(parts.next(), Some("0" | "1" | "2"));
    let mut n = 0;
    let rest_ok = parts.all(|p| {
        n += 1;
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (p == "0" || !p.starts_with('0'))
    });
    first_ok && rest_ok && n > 0
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// An EUI-64 written as 16 hex digits, optionally grouped by `-` or `:`; normalized to 16
/// upper-case digits so that every sender's spelling finds the same Device.
pub(crate) fn eui64(s: &str) -> Option<String> {
    let digits: String = s.chars().filter(|c| !matches!(c, '-' | ':')).collect();
    let grouped_ok = digits.len() == s.len() || s.len() == 23;
    (digits.len() == 16 && grouped_ok && digits.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| digits.to_ascii_uppercase())
}

/// The FHIR identifier system for an HD assigning authority (namespace id, universal id,
/// universal id type). ISO OIDs become `urn:oid:`, UUIDs `urn:uuid:`, URIs stay as they
/// are; otherwise the namespace (or the universal id) is wrapped in the stable, documented
/// `urn:hl7v2:authority:` scheme, because a bare v2 namespace is not a URI.
pub(crate) fn hd_system(
    ns: Option<&str>,
    uid: Option<&str>,
    uid_type: Option<&str>,
) -> Option<String> {
    if let Some(uid) = uid {
        let ty = uid_type.map(str::to_ascii_uppercase);
        match ty.as_deref() {
            Some("ISO") | None if is_oid(uid) => return Some(format!("urn:oid:{uid}")),
            Some("UUID") if is_uuid(uid) => {
                return Some(format!("urn:uuid:{}", uid.to_ascii_lowercase()));
            }
            Some("URI" | "URL") if uid.contains(':') => return Some(uid.to_string()),
            _ => {}
        }
    }
    ns.or(uid)
        .map(|n| format!("urn:hl7v2:authority:{}", urn_part(n)))
}

/// An identifier for the entity an HD names (a sending application or facility): the OID or
/// UUID itself when there is one, else the namespace under `fallback_system`.
pub(crate) fn hd_identifier(
    ns: Option<&str>,
    uid: Option<&str>,
    uid_type: Option<&str>,
    fallback_system: &str,
) -> Option<Value> {
    let ty = uid_type.map(str::to_ascii_uppercase);
    if let Some(uid) = uid {
        match ty.as_deref() {
            Some("ISO") | None if is_oid(uid) => {
                return Some(json!({"system": RFC3986, "value": format!("urn:oid:{uid}")}));
            }
            Some("UUID") if is_uuid(uid) => {
                let v = format!("urn:uuid:{}", uid.to_ascii_lowercase());
                return Some(json!({"system": RFC3986, "value": v}));
            }
            Some("EUI-64") => {
                if let Some(e) = eui64(uid) {
                    return Some(json!({"system": EUI64, "value": e}));
                }
            }
            _ => {}
        }
    }
    ns.or(uid)
        .map(|v| json!({"system": fallback_system, "value": v}))
}

/// CX → Identifier. `default_system` covers a CX without assigning authority (CX-4), which a
/// conditional `identifier=system|value` search cannot use safely without a system.
pub(crate) fn cx_identifier(rep: &Repetition, default_system: &str) -> Option<Value> {
    let value = rep.c(1)?;
    let system = hd_system(rep.sc(4, 1), rep.sc(4, 2), rep.sc(4, 3))
        .unwrap_or_else(|| default_system.to_string());
    let mut id = Map::new();
    if let Some(ty) = rep.c(5) {
        id.insert("type".into(), coded(V2_0203, ty));
    }
    id.insert("system".into(), Value::String(system));
    id.insert("value".into(), Value::String(value.to_string()));
    Some(Value::Object(id))
}

/// An identifier type from v2 table 0203 (`MR`, `VN`, `PLAC`, `FILL`).
pub(crate) fn id_type(code: &str) -> Value {
    coded(V2_0203, code)
}

/// EI → (value, system). EI-2/3/4 are the assigning authority as components.
pub(crate) fn ei(rep: &Repetition, default_system: &str) -> Option<(String, String)> {
    let value = rep.c(1)?;
    let system = hd_system(rep.c(2), rep.c(3), rep.c(4)).unwrap_or_else(|| default_system.into());
    Some((system, value.to_string()))
}

pub(crate) fn identifier(system: &str, value: &str) -> Value {
    json!({"system": system, "value": value})
}

/// A CodeableConcept with one coding and no display.
pub(crate) fn coded(system: &str, code: &str) -> Value {
    json!({"coding": [{"system": system, "code": code}]})
}

// ---------------------------------------------------------------------------------------
// Coded values

/// HL7 table 0396 coding-system names → FHIR system URIs (the names senders actually use;
/// the IG's CodeSystem map). Unknown and local names (`L`, `99zzz`) get a stable
/// `urn:hl7v2:codesystem:` URI so the code keeps a system and stays searchable.
pub(crate) fn system_uri(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    let known = match upper.as_str() {
        "LN" | "LOINC" => Some(LOINC),
        "SCT" | "SNOMEDCT" | "SNOMED-CT" => Some("http://snomed.info/sct"),
        "UCUM" => Some(UCUM),
        "MDC" => Some(MDC),
        "I10" | "ICD10" => Some("http://hl7.org/fhir/sid/icd-10"),
        "I10C" | "ICD10CM" => Some("http://hl7.org/fhir/sid/icd-10-cm"),
        "I9C" | "ICD9CM" => Some("http://hl7.org/fhir/sid/icd-9-cm"),
        "RXNORM" => Some("http://www.nlm.nih.gov/research/umls/rxnorm"),
        "NDC" => Some("http://hl7.org/fhir/sid/ndc"),
        "CVX" => Some("http://hl7.org/fhir/sid/cvx"),
        "ATC" => Some("http://www.whocc.no/atc"),
        _ => None,
    };
    if let Some(k) = known {
        return k.to_string();
    }
    let table = upper
        .strip_prefix("HL7")
        .filter(|t| t.len() == 4 && t.bytes().all(|b| b.is_ascii_digit()));
    match table {
        Some(t) => format!("http://terminology.hl7.org/CodeSystem/v2-{t}"),
        None => format!("urn:hl7v2:codesystem:{}", urn_part(name)),
    }
}

fn coding(
    code: Option<&str>,
    display: Option<&str>,
    system: Option<&str>,
    default: Option<&str>,
) -> Option<Value> {
    let code = code?;
    let mut c = Map::new();
    if let Some(s) = system.or(default) {
        c.insert("system".into(), Value::String(system_uri(s)));
    }
    c.insert("code".into(), Value::String(code.to_string()));
    if let Some(d) = display {
        c.insert("display".into(), Value::String(d.to_string()));
    }
    Some(Value::Object(c))
}

/// CWE/CE/CNE → CodeableConcept: the primary triplet, the alternate triplet, and the
/// original text (CWE-9) or, for a text-only value, CWE-2. `default_table` names the
/// coding system to assume when CWE-3 is empty (e.g. `HL70162` for routes).
pub(crate) fn cwe(rep: &Repetition, default_table: Option<&str>) -> Option<Value> {
    let mut codings = Vec::new();
    codings.extend(coding(rep.c(1), rep.c(2), rep.c(3), default_table));
    codings.extend(coding(rep.c(4), rep.c(5), rep.c(6), None));
    let text = rep
        .c(9)
        .or_else(|| rep.c(1).is_none().then(|| rep.c(2)).flatten());
    if codings.is_empty() && text.is_none() {
        return None;
    }
    let mut cc = Map::new();
    if !codings.is_empty() {
        cc.insert("coding".into(), Value::Array(codings));
    }
    if let Some(t) = text {
        cc.insert("text".into(), Value::String(t.to_string()));
    }
    Some(Value::Object(cc))
}

/// The (system URI, code) a CWE's primary or alternate triplet names, for identities.
pub(crate) fn cwe_key(rep: &Repetition) -> Option<(Option<String>, String)> {
    if let Some(code) = rep.c(1) {
        return Some((rep.c(3).map(system_uri), code.to_string()));
    }
    rep.c(4)
        .map(|code| (rep.c(6).map(system_uri), code.to_string()))
}

// ---------------------------------------------------------------------------------------
// Names, addresses, telecom, people

/// v2 table 0200 name type → FHIR name-use, per the IG's NameType map.
fn name_use(code: &str) -> Option<&'static str> {
    Some(match code {
        "L" | "R" => "official",
        "D" | "A" => "usual",
        "M" => "maiden",
        "N" => "nickname",
        "S" => "anonymous",
        "TEMP" => "temp",
        "NOUSE" | "BAD" => "old",
        _ => return None,
    })
}

/// XPN → HumanName (XPN-1.1 surname, XPN-2/3 given names, XPN-4/6 suffixes, XPN-5 prefix,
/// XPN-7 name type).
pub(crate) fn xpn(rep: &Repetition) -> Option<Value> {
    let mut n = Map::new();
    if let Some(u) = rep.c(7).and_then(name_use) {
        n.insert("use".into(), json!(u));
    }
    if let Some(f) = rep.sc(1, 1) {
        n.insert("family".into(), json!(f));
    }
    let given: Vec<&str> = [rep.c(2), rep.c(3)].into_iter().flatten().collect();
    if !given.is_empty() {
        n.insert("given".into(), json!(given));
    }
    if let Some(p) = rep.c(5) {
        n.insert("prefix".into(), json!([p]));
    }
    let suffix: Vec<&str> = [rep.c(4), rep.c(6)].into_iter().flatten().collect();
    if !suffix.is_empty() {
        n.insert("suffix".into(), json!(suffix));
    }
    (n.contains_key("family") || n.contains_key("given")).then_some(Value::Object(n))
}

/// XAD → Address (XAD-1.1 street, XAD-2 other designation, XAD-3 city, XAD-4 state, XAD-5
/// zip, XAD-6 country, XAD-7 type, XAD-9 county).
pub(crate) fn xad(rep: &Repetition) -> Option<Value> {
    let mut a = Map::new();
    match rep.c(7) {
        Some("H" | "P") => {
            a.insert("use".into(), json!("home"));
        }
        Some("B" | "O") => {
            a.insert("use".into(), json!("work"));
        }
        Some("C") => {
            a.insert("use".into(), json!("temp"));
        }
        Some("BA") => {
            a.insert("use".into(), json!("old"));
        }
        Some("M") => {
            a.insert("type".into(), json!("postal"));
        }
        _ => {}
    }
    let lines: Vec<&str> = [rep.sc(1, 1), rep.c(2)].into_iter().flatten().collect();
    if !lines.is_empty() {
        a.insert("line".into(), json!(lines));
    }
    for (k, c) in [
        ("city", 3),
        ("district", 9),
        ("state", 4),
        ("postalCode", 5),
        ("country", 6),
    ] {
        if let Some(v) = rep.c(c) {
            a.insert(k.into(), json!(v));
        }
    }
    (a.len() > usize::from(a.contains_key("use") || a.contains_key("type")))
        .then_some(Value::Object(a))
}

/// XTN → ContactPoint. `default_use` is what the field implies (PID-13 home, PID-14 work).
pub(crate) fn xtn(rep: &Repetition, default_use: &str) -> Option<Value> {
    let equipment = rep.c(3);
    let email = rep
        .c(4)
        .filter(|_| matches!(equipment, Some("Internet" | "X.400")) || rep.c(2) == Some("NET"));
    let value = match email {
        Some(e) => e.to_string(),
        None => {
            if let Some(u) = rep.c(12) {
                u.to_string()
            } else if rep.c(7).is_some() {
                let mut s = String::new();
                if let Some(cc) = rep.c(5) {
                    s.push_str(&format!("+{cc} "));
                }
                if let Some(area) = rep.c(6) {
                    s.push_str(&format!("({area}) "));
                }
                s.push_str(rep.c(7).unwrap_or_default());
                if let Some(ext) = rep.c(8) {
                    s.push_str(&format!(" ext. {ext}"));
                }
                s
            } else {
                rep.c(1).or(rep.c(4))?.to_string()
            }
        }
    };
    let system = match (email, equipment) {
        (Some(_), _) | (None, Some("Internet" | "X.400")) => "email",
        (None, Some("FX")) => "fax",
        (None, Some("BP")) => "pager",
        _ => "phone",
    };
    let use_ = match (rep.c(2), equipment) {
        (_, Some("CP")) => "mobile",
        (Some("WPN"), _) => "work",
        (Some("PRN" | "ORN" | "VHN"), _) => "home",
        _ => default_use,
    };
    Some(json!({"system": system, "value": value, "use": use_}))
}

/// XCN → a logical Reference(Practitioner): identifier (XCN-1 with XCN-9 as authority) and
/// a display name. No Practitioner resource is written: a v2 message rarely carries enough
/// to maintain one, and the reference still finds it by identifier.
pub(crate) fn xcn_reference(rep: &Repetition, default_system: &str) -> Option<Value> {
    let display: Vec<&str> = [rep.c(6), rep.c(3), rep.c(4), rep.sc(2, 1), rep.c(5)]
        .into_iter()
        .flatten()
        .collect();
    let mut r = Map::new();
    r.insert("type".into(), json!("Practitioner"));
    if let Some(id) = rep.c(1) {
        let system = hd_system(rep.sc(9, 1), rep.sc(9, 2), rep.sc(9, 3))
            .unwrap_or_else(|| default_system.to_string());
        r.insert("identifier".into(), identifier(&system, id));
    }
    if !display.is_empty() {
        r.insert("display".into(), json!(display.join(" ")));
    }
    (r.len() > 1).then_some(Value::Object(r))
}

/// Table 0001 administrative sex → FHIR administrative-gender (IG map: A and N → other).
pub(crate) fn gender(code: &str) -> Option<&'static str> {
    Some(match code {
        "M" => "male",
        "F" => "female",
        "O" | "A" | "N" => "other",
        "U" => "unknown",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Numbers

/// NM → a JSON number. v2 NM is `[+|-]digits[.digits]`; anything else (exponents, commas,
/// text) is a data type error for the caller to report. Integers stay integers so that
/// `117` does not become `117.0`.
pub(crate) fn nm(s: &str) -> Option<Value> {
    let s = s.trim();
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits_ok =
        int.bytes().all(|b| b.is_ascii_digit()) && frac.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    let normalized = s.strip_prefix('+').unwrap_or(s);
    if !unsigned.contains('.')
        && let Ok(i) = normalized.parse::<i64>()
    {
        return Some(Value::from(i));
    }
    let f: f64 = normalized.parse().ok()?;
    serde_json::Number::from_f64(f).map(Value::Number)
}

// ---------------------------------------------------------------------------------------
// Date and time

/// A parsed DTM/TS: the digits as given, plus the offset if any.
struct Dtm<'a> {
    digits: &'a str,
    fraction: Option<&'a str>,
    offset: Option<(char, &'a str)>,
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        _ => 28,
    }
}

fn num(s: &str, range: std::ops::RangeInclusive<u32>) -> Option<u32> {
    s.parse::<u32>().ok().filter(|n| range.contains(n))
}

fn parse_dtm(s: &str) -> Option<Dtm<'_>> {
    let s = s.trim();
    if !s.is_ascii() {
        return None;
    }
    // The offset sign can only follow the date digits, so search from position 4 on.
    let (main, offset) = match s.get(4..).and_then(|t| t.find(['+', '-'])) {
        Some(i) => {
            let at = i + 4;
            let sign = if s.as_bytes().get(at) == Some(&b'+') {
                '+'
            } else {
                '-'
            };
            (s.get(..at)?, Some((sign, s.get(at + 1..)?)))
        }
        None => (s, None),
    };
    let (digits, fraction) = match main.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (main, None),
    };
    if !matches!(digits.len(), 4 | 6 | 8 | 10 | 12 | 14)
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    if let Some(f) = fraction
        && (digits.len() != 14 || f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    if let Some((_, o)) = offset
        && (o.len() != 4
            || num(o.get(..2)?, 0..=14).is_none()
            || num(o.get(2..)?, 0..=59).is_none())
    {
        return None;
    }
    let year = num(digits.get(..4)?, 1..=9999)?;
    if digits.len() >= 6 {
        let month = num(digits.get(4..6)?, 1..=12)?;
        if digits.len() >= 8 {
            num(digits.get(6..8)?, 1..=days_in_month(year, month))?;
        }
    }
    for (range, max) in [(8..10, 23), (10..12, 59), (12..14, 60)] {
        if let Some(part) = digits.get(range) {
            num(part, 0..=max)?;
        }
    }
    Some(Dtm {
        digits,
        fraction,
        offset,
    })
}

fn fhir_date(digits: &str) -> Option<String> {
    let d = digits.get(..digits.len().min(8))?;
    Some(match d.len() {
        4 => d.to_string(),
        6 => format!("{}-{}", d.get(..4)?, d.get(4..6)?),
        _ => format!("{}-{}-{}", d.get(..4)?, d.get(4..6)?, d.get(6..8)?),
    })
}

/// The offset in FHIR form (`+01:00`) of an HL7 timestamp, if it has one.
pub(crate) fn hl7_ts_offset(s: &str) -> Option<String> {
    let (sign, o) = parse_dtm(s)?.offset?;
    Some(format!("{sign}{}:{}", o.get(..2)?, o.get(2..)?))
}

/// DTM/TS → FHIR `date` or `dateTime`, keeping the precision that was sent.
///
/// `YYYY`, `YYYYMM`, `YYYYMMDD` become dates (an offset on a date is dropped: FHIR dates
/// have none). Anything with a time becomes a dateTime, which FHIR only allows with
/// seconds and a zone: missing minutes/seconds are padded with `:00` (hour precision cannot
/// be expressed), and a missing offset is taken from `fallback_offset` (the MSH-7 offset),
/// else UTC `+00:00` — the documented assumption for senders that send local time without
/// a zone and no zone on MSH-7 either.
pub(crate) fn hl7_ts_to_fhir(s: &str, fallback_offset: Option<&str>) -> Option<String> {
    let t = parse_dtm(s)?;
    let date = fhir_date(t.digits)?;
    if t.digits.len() <= 8 {
        return Some(date);
    }
    let hh = t.digits.get(8..10)?;
    let mm = t.digits.get(10..12).unwrap_or("00");
    let ss = t.digits.get(12..14).unwrap_or("00");
    let frac = t.fraction.map(|f| format!(".{f}")).unwrap_or_default();
    let zone = match t.offset {
        Some((sign, o)) => format!("{sign}{}:{}", o.get(..2)?, o.get(2..)?),
        None => fallback_offset.unwrap_or("+00:00").to_string(),
    };
    Some(format!("{date}T{hh}:{mm}:{ss}{frac}{zone}"))
}

/// DTM/TS → FHIR `instant` (Provenance.recorded, DiagnosticReport.issued), which needs full
/// precision: a date-only value is padded to midnight.
pub(crate) fn hl7_ts_to_instant(s: &str, fallback_offset: Option<&str>) -> Option<String> {
    let t = parse_dtm(s)?;
    if t.digits.len() < 8 {
        return None;
    }
    if t.digits.len() == 8 {
        let zone = fallback_offset.unwrap_or("+00:00");
        return Some(format!("{}T00:00:00{zone}", fhir_date(t.digits)?));
    }
    hl7_ts_to_fhir(s, fallback_offset)
}

/// DTM/TS → FHIR `date` (PID-7 birth date): the date part only.
pub(crate) fn hl7_ts_to_date(s: &str) -> Option<String> {
    fhir_date(parse_dtm(s)?.digits)
}

/// TM → FHIR `time` (`hh:mm:ss[.s]`). FHIR time has no zone, so an offset is dropped.
pub(crate) fn hl7_tm_to_fhir(s: &str) -> Option<String> {
    let s = s.trim();
    let main = s.split(['+', '-']).next()?;
    let (digits, frac) = match main.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (main, None),
    };
    if !matches!(digits.len(), 2 | 4 | 6) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hh = num(digits.get(..2)?, 0..=23)?;
    let mm = digits.get(2..4).map_or(Some(0), |m| num(m, 0..=59))?;
    let ss = digits.get(4..6).map_or(Some(0), |x| num(x, 0..=59))?;
    let frac = match frac {
        Some(f) if digits.len() == 6 && !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            format!(".{f}")
        }
        Some(_) => return None,
        None => String::new(),
    };
    Some(format!("{hh:02}:{mm:02}:{ss:02}{frac}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_precision_and_zone() {
        let cases = [
            ("2015", None, Some("2015")),
            ("201501", None, Some("2015-01")),
            ("20150122", Some("+01:00"), Some("2015-01-22")),
            ("20150122+0100", None, Some("2015-01-22")),
            ("201501221150", None, Some("2015-01-22T11:50:00+00:00")),
            ("2015012211", None, Some("2015-01-22T11:00:00+00:00")),
            (
                "20150122115000",
                Some("-05:00"),
                Some("2015-01-22T11:50:00-05:00"),
            ),
            (
                "20150122182658+0000",
                None,
                Some("2015-01-22T18:26:58+00:00"),
            ),
            (
                "20150122182658.1234-0330",
                None,
                Some("2015-01-22T18:26:58.1234-03:30"),
            ),
            ("20150230", None, None),
            ("2015012225", None, None),
            ("2015-01-22", None, None),
            ("20150122+01", None, None),
            ("201501221826.5", None, None),
            ("", None, None),
            ("2015é", None, None),
        ];
        for (input, fallback, want) in cases {
            assert_eq!(hl7_ts_to_fhir(input, fallback).as_deref(), want, "{input}");
        }
        assert_eq!(
            hl7_ts_to_instant("20240229", None).as_deref(),
            Some("2024-02-29T00:00:00+00:00")
        );
        assert_eq!(hl7_ts_to_instant("2024", None), None);
        assert_eq!(
            hl7_ts_offset("20110602050000+0000").as_deref(),
            Some("+00:00")
        );
        assert_eq!(
            hl7_ts_to_date("196101011230").as_deref(),
            Some("1961-01-01")
        );
    }

    #[test]
    fn times_and_numbers() {
        assert_eq!(hl7_tm_to_fhir("0830").as_deref(), Some("08:30:00"));
        assert_eq!(
            hl7_tm_to_fhir("083015.25+0100").as_deref(),
            Some("08:30:15.25")
        );
        assert_eq!(hl7_tm_to_fhir("2460"), None);
        assert_eq!(nm("117"), Some(json!(117)));
        assert_eq!(nm("+3.9"), Some(json!(3.9)));
        assert_eq!(nm("-.5"), Some(json!(-0.5)));
        for bad in ["", ".", "1e5", "1,5", "abc", "--1", "1.2.3"] {
            assert_eq!(nm(bad), None, "{bad}");
        }
    }

    #[test]
    fn authorities_and_device_ids() {
        assert_eq!(
            hd_system(Some("A"), Some("1.2.3"), Some("ISO")).as_deref(),
            Some("urn:oid:1.2.3")
        );
        assert_eq!(
            hd_system(None, Some("2.16.840.1"), None).as_deref(),
            Some("urn:oid:2.16.840.1")
        );
        assert_eq!(
            hd_system(Some("HO Surgery"), None, None).as_deref(),
            Some("urn:hl7v2:authority:HO%20Surgery")
        );
        assert_eq!(hd_system(None, None, None), None);
        assert!(!is_oid("1.02") && !is_oid("3.1") && !is_oid("1"));
        assert_eq!(
            eui64("080019fffe3ed02d").as_deref(),
            Some("080019FFFE3ED02D")
        );
        assert_eq!(
            eui64("08-00-19-FF-FE-3E-D0-2D").as_deref(),
            Some("080019FFFE3ED02D")
        );
        assert_eq!(eui64("0600dc750001"), None);
        assert_eq!(
            system_uri("HL70162"),
            "http://terminology.hl7.org/CodeSystem/v2-0162"
        );
        assert_eq!(system_uri("99LOCAL"), "urn:hl7v2:codesystem:99LOCAL");
    }
}
