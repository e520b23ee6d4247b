//! HL7 v2 acknowledgements (HL7 v2.5.1 chapter 2: 2.9 message processing rules, 2.14.1 ACK, 2.15.8 ERR, 2.15.8 MSA, table 0008 and table 0357).
//!
//! # Original and enhanced mode
//! When MSH-15 and MSH-16 are both empty the sender uses original acknowledgement mode and
//! gets one ACK: `AA` after we committed the message, `AE` when it could not be processed
//! (e.g. not mappable), `AR` when it was rejected (unsupported type, version or processing id).
//!
//! When either is valued (enhanced mode, HL7 v2.5.1 section 2.9.3), MSH-15 asks for an
//! accept acknowledgement (`CA`/`CE`/`CR`, "received and safely stored") and MSH-16 for an
//! application acknowledgement (`AA`/`AE`/`AR`), each under its condition from table 0155:
//! `AL` always, `NE` never, `ER` only on error, `SU` only on success. Our processing is
//! synchronous (parse, map and commit in one step), so by the time we answer we know both
//! outcomes; [`acks_for`] returns the list of ACKs to send, in order, and the connection
//! layer sends them on the same connection. An empty or unknown condition in enhanced mode
//! is treated as `NE` when empty (the sender asked for nothing) and as `AL` when unknown
//! (better an extra ACK than a sender waiting forever).
//!
//! ACKs use the standard delimiters `|^~\&`, CR after each segment, echo MSH-11, MSH-12 and
//! MSH-18 of the original, and swap sender and receiver. For versions before 2.5, where ERR
//! had a single ELD field, the error goes into ERR-1 and MSA-3 instead of ERR-2/3/4/8.

use crate::hl7v2::message::{Delimiters, Field, Message};
use crate::hl7v2::parse::{Charset, ParseError, charset_of, is_segment_id};
use std::sync::atomic::{AtomicU64, Ordering};

/// MSA-1 acknowledgement code (HL7 table 0008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// Application accept: processed and committed.
    AA,
    /// Application error: could not be processed (e.g. not mappable).
    AE,
    /// Application reject: unsupported message type, event, version or processing id.
    AR,
    /// Commit accept (enhanced mode accept acknowledgement): safely stored.
    CA,
    /// Commit error: could not be stored.
    CE,
    /// Commit reject: refused at the door (unsupported type, version...).
    CR,
}

impl AckCode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    /// True for the codes that report a failure.
    pub fn is_error(self) -> bool {
        !matches!(self, AckCode::AA | AckCode::CA)
    }
}

/// An error to report in the ERR segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// Segment id of the error location (ERL.1), e.g. `OBX`.
    pub segment: Option<String>,
    /// Occurrence of that segment in the message, 1-based (ERL.2); 1 when unknown.
    pub sequence: Option<usize>,
    /// Field position (ERL.3).
    pub field: Option<usize>,
    /// HL7 table 0357 error code, e.g. 207.
    pub code: u16,
    /// Text for the user (ERR-8); escaped when written.
    pub text: String,
}

impl AckError {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        AckError {
            segment: None,
            sequence: None,
            field: None,
            code,
            text: text.into(),
        }
    }

    /// Sets the error location (segment id, 1-based occurrence, field position).
    pub fn at(mut self, segment: &str, sequence: usize, field: Option<usize>) -> Self {
        self.segment = Some(segment.to_string());
        self.sequence = Some(sequence);
        self.field = field;
        self
    }
}

impl From<&ParseError> for AckError {
    fn from(e: &ParseError) -> Self {
        // A line whose id is not a segment id cannot be an ERL location; the text still says where.
        let segment = e.segment_id.clone().filter(|id| is_segment_id(id));
        let located = segment.is_some();
        AckError {
            segment,
            sequence: e.sequence.filter(|_| located),
            field: e.field.filter(|_| located),
            code: e.kind.hl7_error_code(),
            text: e.to_string(),
        }
    }
}

/// HL7 table 0357 code 207.
pub const APPLICATION_INTERNAL_ERROR: u16 = 207;
/// HL7 table 0357 code 200.
pub const UNSUPPORTED_MESSAGE_TYPE: u16 = 200;
/// HL7 table 0357 code 201.
pub const UNSUPPORTED_EVENT_CODE: u16 = 201;
/// HL7 table 0357 code 202.
pub const UNSUPPORTED_PROCESSING_ID: u16 = 202;
/// HL7 table 0357 code 203.
pub const UNSUPPORTED_VERSION_ID: u16 = 203;
/// HL7 table 0357 code 101.
pub const REQUIRED_FIELD_MISSING: u16 = 101;
/// HL7 table 0357 code 102.
pub const DATA_TYPE_ERROR: u16 = 102;

/// Display text of an HL7 table 0357 code (ERR-3.2).
pub fn error_code_text(code: u16) -> &'static str {
    match code {
        0 => "Message accepted",
        100 => "Segment sequence error",
        101 => "Required field missing",
        102 => "Data type error",
        103 => "Table value not found",
        104 => "Value too long",
        200 => "Unsupported message type",
        201 => "Unsupported event code",
        202 => "Unsupported processing id",
        203 => "Unsupported version id",
        204 => "Unknown key identifier",
        205 => "Duplicate key identifier",
        206 => "Application record locked",
        207 => "Application internal error",
        _ => "",
    }
}

/// What happened to a message, for choosing acknowledgement codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Mapped and committed.
    Committed,
    /// Accepted for processing but could not be processed (AE / CE).
    Error,
    /// Rejected: unsupported type, version, processing id, or unparseable (AR / CR).
    Rejected,
}

/// The ACK codes to send for `outcome`, in order (accept ACK first); see the module docs.
/// Without an original (unparseable input) the sender's mode is unknown, so one
/// original-mode code is returned.
pub fn acks_for(original: Option<&Message>, outcome: Outcome) -> Vec<AckCode> {
    let cond = |v: Option<&str>| {
        v.filter(|s| !s.trim().is_empty() && *s != crate::hl7v2::message::HL7_NULL)
            .map(|s| s.trim().to_ascii_uppercase())
    };
    let accept = cond(original.and_then(Message::accept_ack_type));
    let app = cond(original.and_then(Message::application_ack_type));
    let (a, c) = match outcome {
        Outcome::Committed => (AckCode::AA, AckCode::CA),
        Outcome::Error => (AckCode::AE, AckCode::CE),
        Outcome::Rejected => (AckCode::AR, AckCode::CR),
    };
    if accept.is_none() && app.is_none() {
        return vec![a];
    }
    let success = outcome == Outcome::Committed;
    let wanted = |v: &Option<String>| match v.as_deref() {
        None | Some("NE") => false,
        Some("ER") => !success,
        Some("SU") => success,
        Some(_) => true,
    };
    let mut out = Vec::new();
    if wanted(&accept) {
        out.push(c);
    }
    if wanted(&app) {
        out.push(a);
    }
    out
}

/// Checks the MSH fields that decide whether we accept a message at all. `supported` lists
/// (message code, trigger event) pairs, `versions` the MSH-12.1 values we accept. An `Err` is
/// answered with `AR` (or `CR` in enhanced mode).
pub fn check_header(
    msg: &Message,
    supported: &[(&str, &str)],
    versions: &[&str],
) -> Result<(), AckError> {
    let missing = |field: usize, what: &str| {
        AckError::new(
            REQUIRED_FIELD_MISSING,
            format!("MSH-{field} {what} is missing"),
        )
        .at("MSH", 1, Some(field))
    };
    let (code, trigger, _) = msg.message_type();
    let code = code.ok_or_else(|| missing(9, "message type"))?;
    if msg.control_id().is_none() {
        return Err(missing(10, "message control id"));
    }
    let version = msg.version().ok_or_else(|| missing(12, "version id"))?;
    if !supported.iter().any(|(c, _)| *c == code) {
        return Err(AckError::new(
            UNSUPPORTED_MESSAGE_TYPE,
            format!("message type {code} is not supported"),
        )
        .at("MSH", 1, Some(9)));
    }
    let trigger = trigger.unwrap_or_default();
    if !supported.iter().any(|(c, t)| *c == code && *t == trigger) {
        return Err(AckError::new(
            UNSUPPORTED_EVENT_CODE,
            format!("event {code}^{trigger} is not supported"),
        )
        .at("MSH", 1, Some(9)));
    }
    if !versions.contains(&version) {
        return Err(AckError::new(
            UNSUPPORTED_VERSION_ID,
            format!("HL7 version {version} is not supported"),
        )
        .at("MSH", 1, Some(12)));
    }
    if let Some(p) = msg.processing_id()
        && !matches!(p, "P" | "D" | "T")
    {
        return Err(AckError::new(
            UNSUPPORTED_PROCESSING_ID,
            format!("processing id {p} is not supported"),
        )
        .at("MSH", 1, Some(11)));
    }
    Ok(())
}

/// Builds an acknowledgement with a fresh control id and the current UTC time.
pub fn ack(original: Option<&Message>, code: AckCode, error: Option<&AckError>) -> String {
    ack_at(original, code, error, &new_control_id(), &now_hl7())
}

/// [`ack`] with the control id and MSH-7 timestamp given (deterministic, for tests and replays).
pub fn ack_at(
    original: Option<&Message>,
    code: AckCode,
    error: Option<&AckError>,
    control_id: &str,
    timestamp: &str,
) -> String {
    let d = Delimiters::default();
    let msh = original.and_then(Message::msh);
    // Fields copied from the original are re-encoded with our delimiters, escapes included.
    let copy = |n: usize| {
        msh.and_then(|s| s.field(n))
            .map(|f| f.encode(&d))
            .unwrap_or_default()
    };
    let trigger = original
        .and_then(|m| m.message_type().1)
        .map(|t| d.escape(t))
        .unwrap_or_default();
    let version_field = original
        .and_then(|m| m.msh())
        .and_then(|s| s.field(12))
        .filter(|f| !f.is_empty());
    let version = version_field.map_or_else(|| "2.5".to_string(), |f: &Field| f.encode(&d));
    let processing = msh
        .and_then(|s| s.field(11))
        .filter(|f| !f.is_empty())
        .map_or_else(|| "P".to_string(), |f| f.encode(&d));
    let legacy_err = !version_at_least_2_5(original.and_then(Message::version));

    let mut msh_fields = vec![
        copy(5),                      // MSH-3 sending application = original receiving application
        copy(6),                      // MSH-4
        copy(3),                      // MSH-5 receiving application = original sending application
        copy(4),                      // MSH-6
        d.escape(timestamp),          // MSH-7
        String::new(),                // MSH-8 security
        format!("ACK^{trigger}^ACK"), // MSH-9
        d.escape(control_id),         // MSH-10
        processing,                   // MSH-11
        version,                      // MSH-12
    ];
    // Echo MSH-18 only when we can encode in it (see `to_wire`); otherwise the ACK is UTF-8
    // without MSH-18, and a NAK for an unsupported charset does not repeat the problem.
    let charset = original
        .and_then(Message::charset)
        .filter(|c| charset_of(c).is_ok())
        .map(|c| d.escape(c))
        .unwrap_or_default();
    if !charset.is_empty() {
        msh_fields.extend(std::iter::repeat_n(String::new(), 5)); // MSH-13..17
        msh_fields.push(charset); // MSH-18
    }
    let mut out = format!("MSH|^~\\&|{}\r", msh_fields.join("|"));

    let original_id = original
        .and_then(Message::control_id)
        .map(|c| d.escape(c))
        .unwrap_or_default();
    out.push_str(&format!("MSA|{}|{original_id}", code.as_str()));
    if let (true, Some(e)) = (legacy_err, error) {
        out.push_str(&format!("|{}", d.escape(&user_text(&e.text))));
    }
    out.push('\r');

    if let Some(e) = error {
        let seg = e
            .segment
            .as_deref()
            .map(|s| d.escape(s))
            .unwrap_or_default();
        let seq = e
            .segment
            .as_ref()
            .map(|_| e.sequence.unwrap_or(1).to_string())
            .unwrap_or_default();
        let field = e.field.map(|f| f.to_string()).unwrap_or_default();
        let location = trim_components(&format!("{seg}^{seq}^{field}"));
        let name = error_code_text(e.code);
        if legacy_err {
            // v2.3/2.4 ERR-1 (ELD): segment ^ sequence ^ field ^ code&text&HL70357.
            let eld = format!("{seg}^{seq}^{field}^{}&{name}&HL70357", e.code);
            out.push_str(&format!("ERR|{eld}\r"));
        } else {
            let severity = if code.is_error() { "E" } else { "W" };
            out.push_str(&format!(
                "ERR||{location}|{}^{name}^HL70357|{severity}||||{}\r",
                e.code,
                d.escape(&user_text(&e.text))
            ));
        }
    }
    out
}

/// Encodes an ACK for the wire in the original message's MSH-18 charset (the ACK echoes it).
/// Characters the charset cannot represent become `?`.
pub fn to_wire(ack: &str, original: Option<&Message>) -> Vec<u8> {
    let charset = original
        .and_then(Message::charset)
        .and_then(|c| charset_of(c).ok())
        .unwrap_or(Charset::Utf8);
    match charset {
        Charset::Utf8 => ack.as_bytes().to_vec(),
        Charset::Latin1 => ack
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect(),
        Charset::Ascii => ack
            .chars()
            .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
            .collect(),
    }
}

/// ERR-8 is meant for a person: one line, bounded length (untrusted input can be in it).
fn user_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(250)
        .collect()
}

/// Drops trailing empty components (`OBX^1^` → `OBX^1`, `^^` → ``).
fn trim_components(s: &str) -> String {
    s.trim_end_matches('^').to_string()
}

/// True for 2.5 and later, and when the version is unknown (we then write the current form).
fn version_at_least_2_5(v: Option<&str>) -> bool {
    let Some(v) = v else { return true };
    let mut parts = v.trim().split('.');
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or(0);
    match major {
        Some(2) => minor >= 5,
        Some(m) => m > 2,
        None => true,
    }
}

static ACK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A control id unique within this process and across restarts (time-based), at most 16
/// characters so it fits MSH-10 of every version (20 in v2.5).
fn new_control_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let n = ACK_COUNTER.fetch_add(1, Ordering::Relaxed) & 0xFFFF;
    format!("A{:X}{n:04X}", millis & 0xFFF_FFFF_FFFF)
}

/// Current UTC time as an HL7 DTM with offset, e.g. `20240101120000+0000`.
fn now_hl7() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant's algorithm): days since 1970-01-01 to y-m-d.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}+0000",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::hl7v2::parse::{parse, parse_header, parse_ts};

    const ORU: &str = "MSH|^~\\&|DEV^0800^EUI-64|WARD|FHIR|HOSP|20240101120000+0100||ORU^R01^ORU_R01|C42|P|2.6|||AL|NE||UNICODE UTF-8\rPID|1\r";

    #[test]
    fn aa_round_trips_through_parse() {
        let orig = parse(ORU.as_bytes()).unwrap();
        let text = ack_at(
            Some(&orig),
            AckCode::AA,
            None,
            "ACK1",
            "20240101120001+0000",
        );
        assert_eq!(
            text,
            "MSH|^~\\&|FHIR|HOSP|DEV^0800^EUI-64|WARD|20240101120001+0000||ACK^R01^ACK|ACK1|P|2.6||||||UNICODE UTF-8\rMSA|AA|C42\r"
        );
        let a = parse(text.as_bytes()).unwrap();
        assert_eq!(a.message_type(), (Some("ACK"), Some("R01"), Some("ACK")));
        assert_eq!(a.first("MSA").unwrap().text(2, 1), Some("C42"));
        assert_eq!(
            a.receiving_application().unwrap().component(3),
            Some("EUI-64")
        );
        assert!(a.first("ERR").is_none());
    }

    #[test]
    fn ae_has_err_with_location_code_and_escaped_text() {
        let orig = parse(ORU.as_bytes()).unwrap();
        let err = AckError::new(
            APPLICATION_INTERNAL_ERROR,
            "OBX-5 \"1|2\" is not a number^really & truly\\",
        )
        .at("OBX", 3, Some(5));
        let text = ack_at(
            Some(&orig),
            AckCode::AE,
            Some(&err),
            "ACK2",
            "20240101120001+0000",
        );
        assert!(text.contains("\rERR||OBX^3^5|207^Application internal error^HL70357|E||||OBX-5 \"1\\F\\2\" is not a number\\S\\really \\T\\ truly\\E\\\r"), "{text}");
        let a = parse(text.as_bytes()).unwrap();
        let e = a.first("ERR").unwrap();
        assert_eq!(e.text(2, 1), Some("OBX"));
        assert_eq!(e.text(2, 2), Some("3"));
        assert_eq!(e.text(2, 3), Some("5"));
        assert_eq!(e.text(3, 1), Some("207"));
        assert_eq!(e.text(4, 1), Some("E"));
        assert_eq!(
            e.text(8, 1),
            Some("OBX-5 \"1|2\" is not a number^really & truly\\")
        );
        assert_eq!(a.first("MSA").unwrap().text(1, 1), Some("AE"));
    }

    #[test]
    fn nak_for_unparseable_input() {
        let bytes = b"garbage";
        let e = parse(bytes).unwrap_err();
        let text = ack_at(
            parse_header(bytes).as_ref(),
            AckCode::AR,
            Some(&AckError::from(&e)),
            "N1",
            "20240101",
        );
        let a = parse(text.as_bytes()).unwrap();
        assert_eq!(a.first("MSA").unwrap().text(1, 1), Some("AR"));
        assert_eq!(a.first("MSA").unwrap().text(2, 1), None);
        assert_eq!(a.first("ERR").unwrap().text(3, 1), Some("100"));
        assert_eq!(a.version(), Some("2.5"));
        // A message broken after a valid MSH still gets its control id echoed.
        let broken = b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X9|P|2.6\rOBX|1\rbad segment\r";
        let e = parse(broken).unwrap_err();
        let text = ack(
            parse_header(broken).as_ref(),
            AckCode::AE,
            Some(&AckError::from(&e)),
        );
        let a = parse(text.as_bytes()).unwrap();
        assert_eq!(a.first("MSA").unwrap().text(2, 1), Some("X9"));
        // "bad" is not a segment id, so ERR-2 stays empty; ERR-8 names the line.
        let err = a.first("ERR").unwrap();
        assert_eq!(err.text(2, 1), None);
        assert!(err.text(8, 1).unwrap().starts_with("segment 3 (bad)"));
        assert!(a.control_id().is_some_and(|c| c.len() <= 20));
        assert!(parse_ts(a.date_time().unwrap()).is_some());
    }

    #[test]
    fn legacy_versions_get_err_1() {
        let orig = parse(b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X1|P|2.3\r").unwrap();
        let err = AckError::new(DATA_TYPE_ERROR, "bad").at("OBX", 1, Some(5));
        let text = ack_at(Some(&orig), AckCode::AE, Some(&err), "N2", "20240101");
        assert!(
            text.ends_with("MSA|AE|X1|bad\rERR|OBX^1^5^102&Data type error&HL70357\r"),
            "{text}"
        );
    }

    #[test]
    fn ack_modes() {
        let with = |accept: &str, app: &str| {
            parse(
                format!("MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X1|P|2.6|||{accept}|{app}\r")
                    .as_bytes(),
            )
            .unwrap()
        };
        use AckCode::*;
        use Outcome::*;
        assert_eq!(acks_for(Some(&with("", "")), Committed), vec![AA]);
        assert_eq!(acks_for(Some(&with("", "")), Error), vec![AE]);
        assert_eq!(acks_for(Some(&with("", "")), Rejected), vec![AR]);
        assert_eq!(acks_for(Some(&with("AL", "NE")), Committed), vec![CA]);
        assert_eq!(acks_for(Some(&with("AL", "NE")), Error), vec![CE]);
        assert_eq!(acks_for(Some(&with("AL", "AL")), Rejected), vec![CR, AR]);
        assert_eq!(acks_for(Some(&with("ER", "SU")), Committed), vec![AA]);
        assert_eq!(acks_for(Some(&with("ER", "SU")), Error), vec![CE]);
        assert_eq!(acks_for(Some(&with("NE", "NE")), Committed), vec![]);
        assert_eq!(acks_for(None, Rejected), vec![AR]);
    }

    #[test]
    fn header_checks() {
        let m = parse(ORU.as_bytes()).unwrap();
        assert_eq!(check_header(&m, &[("ORU", "R01")], &["2.6"]), Ok(()));
        let code = |r: Result<(), AckError>| r.unwrap_err().code;
        assert_eq!(code(check_header(&m, &[("ADT", "A01")], &["2.6"])), 200);
        assert_eq!(code(check_header(&m, &[("ORU", "R30")], &["2.6"])), 201);
        assert_eq!(code(check_header(&m, &[("ORU", "R01")], &["2.5"])), 203);
        let no_id = parse(b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01||P|2.6\r").unwrap();
        let e = check_header(&no_id, &[("ORU", "R01")], &["2.6"]).unwrap_err();
        assert_eq!((e.code, e.field), (101, Some(10)));
    }

    #[test]
    fn wire_encoding_follows_msh18() {
        let orig = parse(b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X1|P|2.6||||||8859/1\r").unwrap();
        let err = AckError::new(207, "café 日");
        let text = ack_at(Some(&orig), AckCode::AE, Some(&err), "N", "20240101");
        let bytes = to_wire(&text, Some(&orig));
        assert!(bytes.windows(6).any(|w| w == b"caf\xE9 ?"));
        assert_eq!(
            parse(&bytes).unwrap().first("ERR").unwrap().text(8, 1),
            Some("café ?")
        );
    }

    #[test]
    fn now_is_a_valid_timestamp() {
        assert!(parse_ts(&now_hl7()).is_some_and(|t| t.ends_with("+00:00")));
        assert_ne!(new_control_id(), new_control_id());
    }
}
