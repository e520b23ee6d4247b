//! HL7 v2.x message parsing (HL7 v2.5.1 chapter 2: 2.5 message construction, 2.7 escape sequences, 2.10.3 batch protocol, 2A.3.22 DTM/TS; v2.7 2.5.5.2 truncation character).
//!
//! # What we take from `hl7-parser` and what we do ourselves
//! The project chose `hl7-parser` 0.3.0. We use it for exactly one job, splitting one
//! segment line into fields, repetitions, components and subcomponents
//! (`hl7_parser::parser::parse_segment_with_separators`), and we check after every call
//! that it consumed the whole line. Everything around that is ours, for these reasons
//! (all found by reading its source and confirmed by tests here):
//! - Its message parser stops at the first segment it cannot read and still returns `Ok`
//!   (a `separated_list0` that ends quietly), so a truncated or corrupt message would be
//!   stored half. We split segments ourselves, one line each, so every line either becomes
//!   a segment or produces an error naming it.
//! - Its MSH parser takes exactly five ASCII characters as delimiters, so a v2.7 MSH-2 with
//!   the truncation character (`^~\&#`) shifts every MSH field by one. We read MSH-1/MSH-2
//!   ourselves and give the crate only `MSH` plus the fields after MSH-2.
//! - Its escape decoder slices the string with character counts as byte offsets (it panics
//!   on an escape after multi-byte UTF-8 text such as `Zoë\T\x`), drops the escape
//!   characters of sequences it does not know, and maps `\.br\` to CR. We decode escapes
//!   ourselves ([`decode_escapes`]).
//! - Its timestamp type loses the sign of offsets whose hours are zero (`-0030`), stores
//!   `-0330` as hours -3 and minutes +30 (which its optional chrono conversion adds up to
//!   -02:30), and silently cuts fractional seconds to four digits. We parse timestamps ourselves ([`parse_ts`]).
//! - It works on `&str` only and knows nothing of MSH-18, byte-order marks, batches or MLLP.
//!
//! No `catch_unwind` is needed: the inputs we hand the crate are pre-validated (ASCII segment
//! id, validated delimiters, one line without CR/LF), and the deterministic fuzz test below
//! runs 20,000 mutated messages through it without a panic.

use crate::hl7v2::message::{Component, Delimiters, Field, Message, Repetition, Segment};

/// What went wrong and where. `segment_index` is the 1-based position of the segment in
/// the message (MSH is 1); `sequence` is the occurrence of that segment id (HL7 ERL.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ParseError {
    pub kind: ParseErrorKind,
    pub segment_index: Option<usize>,
    pub segment_id: Option<String>,
    pub sequence: Option<usize>,
    pub field: Option<usize>,
    pub message: String,
}

/// The category of a [`ParseError`]; decides the HL7 error code of the NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// Nothing but whitespace.
    Empty,
    /// The message does not start with an MSH segment.
    NoHeader,
    /// MSH-1/MSH-2 do not declare usable delimiters.
    Delimiters,
    /// MSH-18 names a character set we do not support.
    Charset,
    /// The bytes are not valid in the declared character set.
    Encoding,
    /// A segment line is malformed (bad id, not fully parsed).
    Segment,
    /// Segments in an order that cannot be one message (a second MSH, a batch header inside).
    Structure,
    /// A batch envelope (FHS/BHS/BTS/FTS) is malformed, truncated or miscounted.
    Batch,
}

impl ParseErrorKind {
    /// HL7 table 0357 code for a NAK caused by this kind of error.
    pub fn hl7_error_code(self) -> u16 {
        match self {
            // 100: segment sequence error.
            ParseErrorKind::Empty
            | ParseErrorKind::NoHeader
            | ParseErrorKind::Structure
            | ParseErrorKind::Batch => 100,
            // 103: table value not found (MSH-18 is coded from table 0211).
            ParseErrorKind::Charset => 103,
            // 102: data type error.
            ParseErrorKind::Delimiters | ParseErrorKind::Encoding | ParseErrorKind::Segment => 102,
        }
    }
}

impl ParseError {
    fn new(kind: ParseErrorKind, message: impl Into<String>) -> Self {
        ParseError {
            kind,
            segment_index: None,
            segment_id: None,
            sequence: None,
            field: None,
            message: message.into(),
        }
    }

    fn at(mut self, index: usize, id: &str, sequence: Option<usize>) -> Self {
        self.segment_index = Some(index);
        // Ids come from untrusted input: keep the error short and printable.
        self.segment_id = Some(id.chars().take(3).filter(|c| !c.is_control()).collect());
        self.sequence = sequence;
        self
    }

    fn field(mut self, field: usize) -> Self {
        self.field = Some(field);
        self
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(i) = self.segment_index {
            out.push_str(&format!("segment {i}"));
            if let Some(id) = &self.segment_id {
                out.push_str(&format!(" ({id})"));
            }
            if let Some(f) = self.field {
                out.push_str(&format!(", field {f}"));
            }
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

/// The character sets of MSH-18 that we decode (HL7 table 0211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// `ASCII` (7-bit).
    Ascii,
    /// `UNICODE UTF-8`; also the default when MSH-18 is empty (see [`charset_of`]).
    Utf8,
    /// `8859/1` (ISO-8859-1, Latin-1).
    Latin1,
}

/// Maps an MSH-18 value to a [`Charset`]; `Err` carries the unsupported value.
/// The HL7 null `""` counts as empty.
///
/// HL7 says an empty MSH-18 means ASCII. We accept UTF-8 there instead: it is a superset
/// of ASCII, so every conforming message still decodes, and senders that leave MSH-18 empty
/// while sending UTF-8 (common) are not rejected.
pub fn charset_of(msh18: &str) -> Result<Charset, String> {
    let v = msh18.trim().to_ascii_uppercase();
    match v.as_str() {
        "" | "\"\"" => Ok(Charset::Utf8),
        "ASCII" | "US-ASCII" => Ok(Charset::Ascii),
        "UNICODE UTF-8" | "UTF-8" | "UTF8" => Ok(Charset::Utf8),
        "8859/1" | "ISO-8859-1" | "ISO_8859-1" | "ISO8859-1" | "LATIN1" => Ok(Charset::Latin1),
        _ => Err(msh18.trim().chars().take(40).collect()),
    }
}

const UTF8_BOM: &[u8] = &[0xEF, 0xBB, 0xBF];

/// Removes a UTF-8 byte-order mark and rejects UTF-16/32 ones (HL7 v2 over MLLP is byte-oriented;
/// a UTF-16 message would have NUL bytes between every delimiter).
fn strip_bom(bytes: &[u8]) -> Result<&[u8], ParseError> {
    if let Some(rest) = bytes.strip_prefix(UTF8_BOM) {
        return Ok(rest);
    }
    if bytes.starts_with(&[0xFE, 0xFF]) || bytes.starts_with(&[0xFF, 0xFE]) {
        return Err(ParseError::new(
            ParseErrorKind::Charset,
            "UTF-16/UTF-32 byte-order mark: only byte-oriented character sets are supported",
        ));
    }
    Ok(bytes)
}

fn is_newline(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// Non-blank lines of a byte buffer, split on CR, LF or CRLF; blank lines are skipped so that
/// CRLF, trailing newlines and LF-CR pairs all act as one separator.
fn byte_lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut offset = 0usize;
    bytes
        .split(|&b| is_newline(b))
        .map(move |line| {
            let start = offset;
            offset += line.len() + 1;
            (start, line)
        })
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
}

/// Same rule as [`byte_lines`] for decoded text.
fn text_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split(['\r', '\n'])
        .filter(|l| !l.chars().all(|c| c.is_ascii_whitespace()))
}

/// Reads MSH-18 straight from the raw MSH line, before the message can be decoded.
/// MSH-1 and MSH-2 are ASCII, and so is every table-0211 value, so byte splitting is safe.
fn raw_msh18(msh_line: &[u8]) -> String {
    let Some(&fs) = msh_line.get(3) else {
        return String::new();
    };
    let mut parts = msh_line.split(|&b| b == fs);
    let enc = parts.nth(1).unwrap_or_default();
    // parts has yielded "MSH" and MSH-2; MSH-n is the (n-3)th of what remains.
    let value = parts.nth(15).unwrap_or_default();
    let component = enc.first().copied();
    let repetition = enc.get(1).copied();
    let first = value
        .split(|&b| Some(b) == component || Some(b) == repetition)
        .next()
        .unwrap_or_default();
    String::from_utf8_lossy(first).into_owned()
}

/// 1-based index, id and occurrence of the segment that contains byte `offset`, for errors.
fn locate(bytes: &[u8], offset: usize) -> (usize, String, usize) {
    let mut index = 0;
    let mut id: &[u8] = b"";
    let mut ids: Vec<&[u8]> = Vec::new();
    for (start, line) in byte_lines(bytes) {
        if start > offset {
            break;
        }
        index += 1;
        id = line.get(..3).unwrap_or(line);
        ids.push(id);
    }
    let sequence = ids.iter().filter(|i| **i == id).count();
    (
        index.max(1),
        String::from_utf8_lossy(id).into_owned(),
        sequence.max(1),
    )
}

/// Decodes the message bytes into text according to `charset`.
fn decode_bytes(bytes: &[u8], charset: Charset) -> Result<String, ParseError> {
    let bad = |offset: usize, what: &str| {
        let (index, id, sequence) = locate(bytes, offset);
        let byte = bytes.get(offset).copied().unwrap_or_default();
        ParseError::new(
            ParseErrorKind::Encoding,
            format!("byte 0x{byte:02X} at offset {offset} is not valid {what} (MSH-18)"),
        )
        .at(index, &id, Some(sequence))
    };
    match charset {
        Charset::Latin1 => Ok(bytes.iter().map(|&b| char::from(b)).collect()),
        Charset::Ascii => match bytes.iter().position(|b| !b.is_ascii()) {
            Some(p) => Err(bad(p, "ASCII")),
            None => Ok(String::from_utf8_lossy(bytes).into_owned()),
        },
        Charset::Utf8 => match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(bad(e.valid_up_to(), "UTF-8")),
        },
    }
}

/// Parses one HL7 v2 message from bytes: strips a UTF-8 BOM, decodes by MSH-18, accepts
/// CR, LF or CRLF between segments, and decodes escape sequences.
///
/// Every non-blank line of the input becomes a segment of the result or an error; nothing is
/// skipped silently. A second MSH is an error: use [`split_batch`] for files with many messages.
pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
    let bytes = strip_bom(bytes)?;
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .ok_or_else(|| ParseError::new(ParseErrorKind::Empty, "empty message"))?;
    let bytes = bytes.get(start..).unwrap_or_default();
    let first_line = bytes.split(|&b| is_newline(b)).next().unwrap_or_default();
    if !first_line.starts_with(b"MSH") {
        return Err(no_header(first_line));
    }
    let msh18 = raw_msh18(first_line);
    let charset = charset_of(&msh18).map_err(|v| {
        ParseError::new(
            ParseErrorKind::Charset,
            format!("unsupported character set {v:?} (supported: ASCII, UNICODE UTF-8, 8859/1)"),
        )
        .at(1, "MSH", Some(1))
        .field(18)
    })?;
    let text = decode_bytes(bytes, charset)?;
    parse_text(&text, charset)
}

/// Parses a message that is already text (e.g. built in memory); MSH-18 then only decides
/// how `\X..\` hex escapes are read. Same rules as [`parse`] otherwise.
pub fn parse_str(text: &str) -> Result<Message, ParseError> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let text = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() {
        return Err(ParseError::new(ParseErrorKind::Empty, "empty message"));
    }
    let first_line = text.split(['\r', '\n']).next().unwrap_or_default();
    if !first_line.starts_with("MSH") {
        return Err(no_header(first_line.as_bytes()));
    }
    let charset = charset_of(&raw_msh18(first_line.as_bytes())).map_err(|v| {
        ParseError::new(
            ParseErrorKind::Charset,
            format!("unsupported character set {v:?}"),
        )
        .at(1, "MSH", Some(1))
        .field(18)
    })?;
    parse_text(text, charset)
}

/// Best-effort parse of the MSH segment alone, for acknowledging a message that failed to
/// parse: the NAK can then still echo MSH-10 and swap sender and receiver. Undecodable
/// bytes are replaced, and the charset is not enforced.
pub fn parse_header(bytes: &[u8]) -> Option<Message> {
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace())?;
    let line = bytes
        .get(start..)?
        .split(|&b| is_newline(b))
        .next()
        .unwrap_or_default();
    let charset = charset_of(&raw_msh18(line)).unwrap_or(Charset::Utf8);
    let text = match charset {
        Charset::Latin1 => line.iter().map(|&b| char::from(b)).collect(),
        _ => String::from_utf8_lossy(line).into_owned(),
    };
    parse_text(&text, charset).ok()
}

fn no_header(first_line: &[u8]) -> ParseError {
    let id = String::from_utf8_lossy(first_line.get(..3).unwrap_or(first_line)).into_owned();
    let hint = if matches!(id.as_str(), "FHS" | "BHS") {
        " (a batch file: split it with split_batch first)"
    } else {
        ""
    };
    ParseError::new(
        ParseErrorKind::NoHeader,
        format!("a message must start with an MSH segment{hint}"),
    )
    .at(1, &id, Some(1))
}

/// Reads MSH-1 and MSH-2. Returns the delimiters and the rest of the line after MSH-2
/// (empty, or starting with the field separator).
fn read_msh_delimiters(line: &str) -> Result<(Delimiters, &str), ParseError> {
    let err = |field: usize, msg: String| {
        ParseError::new(ParseErrorKind::Delimiters, msg)
            .at(1, "MSH", Some(1))
            .field(field)
    };
    // A delimiter must be a visible ASCII character and not a letter or digit: anything else
    // would make segment ids or values ambiguous.
    let usable = |c: char| c.is_ascii_graphic() && !c.is_ascii_alphanumeric();
    let after_id = line.get(3..).unwrap_or_default();
    let mut chars = after_id.chars();
    let field = chars
        .next()
        .ok_or_else(|| err(1, "MSH has no field separator".into()))?;
    if !usable(field) {
        return Err(err(1, format!("unusable field separator {field:?}")));
    }
    let rest = chars.as_str();
    let enc_len = rest.find(field).unwrap_or(rest.len());
    let enc = rest.get(..enc_len).unwrap_or_default();
    let enc_chars: Vec<char> = enc.chars().collect();
    if !(4..=5).contains(&enc_chars.len()) {
        return Err(err(
            2,
            format!(
                "MSH-2 must hold 4 encoding characters (5 with the v2.7 truncation character), found {}",
                enc_chars.len()
            ),
        ));
    }
    let mut seen = vec![field];
    for &c in &enc_chars {
        if !usable(c) || seen.contains(&c) {
            return Err(err(
                2,
                format!("unusable or repeated encoding character {c:?}"),
            ));
        }
        seen.push(c);
    }
    let d = Delimiters {
        field,
        component: enc_chars[0],
        repetition: enc_chars[1],
        escape: enc_chars[2],
        subcomponent: enc_chars[3],
        truncation: enc_chars.get(4).copied(),
    };
    Ok((d, rest.get(enc_len..).unwrap_or_default()))
}

/// An HL7 segment id: three characters, an upper-case letter then upper-case letters or digits.
pub fn is_segment_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 3
        && b[0].is_ascii_uppercase()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// Structural parse of decoded text; `charset` decides how hex escapes are read.
fn parse_text(text: &str, charset: Charset) -> Result<Message, ParseError> {
    let mut lines = text_lines(text);
    let msh_line = lines
        .next()
        .ok_or_else(|| ParseError::new(ParseErrorKind::Empty, "empty message"))?;
    if !msh_line.starts_with("MSH") {
        return Err(no_header(msh_line.as_bytes()));
    }
    let (delimiters, msh_rest) = read_msh_delimiters(msh_line)?;
    let seps = hl7_parser::message::Separators {
        field: delimiters.field,
        component: delimiters.component,
        repetition: delimiters.repetition,
        escape: delimiters.escape,
        subcomponent: delimiters.subcomponent,
        // We hand the crate single lines, so it never has to find a segment end.
        lenient_newlines: false,
    };

    let mut segments = Vec::new();
    let mut line_count = 1usize;
    // Occurrences per segment id, for ERL.2 in errors (a map, not a rescan: messages can be long).
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    seen.insert("MSH".into(), 1);
    // MSH-1 and MSH-2 are the delimiters themselves, stored unsplit and undecoded.
    let mut msh_fields = vec![
        single(delimiters.field.to_string()),
        single(delimiters.encoding_characters()),
    ];
    let msh_input = format!("MSH{msh_rest}");
    msh_fields.extend(split_segment(
        &msh_input,
        &seps,
        &delimiters,
        charset,
        1,
        1,
        2,
    )?);
    segments.push(Segment {
        id: "MSH".into(),
        fields: msh_fields,
    });

    for line in lines {
        line_count += 1;
        let index = line_count;
        let id = line.get(..3).unwrap_or(line);
        let sequence = seen.get(id).copied().unwrap_or(0) + 1;
        let rest = line.get(3..);
        let id_ok = is_segment_id(id)
            && rest.is_some_and(|r| r.is_empty() || r.starts_with(delimiters.field));
        if !id_ok {
            return Err(ParseError::new(
                ParseErrorKind::Segment,
                "segment id must be three upper-case letters or digits followed by the field separator",
            )
            .at(index, id, None));
        }
        if matches!(id, "MSH" | "FHS" | "BHS" | "BTS" | "FTS") {
            return Err(ParseError::new(
                ParseErrorKind::Structure,
                format!("{id} inside a message: several messages must be split with split_batch"),
            )
            .at(index, id, Some(sequence)));
        }
        let fields = if rest.is_some_and(str::is_empty) {
            // A segment sent as its bare id has no fields; the crate rejects that form.
            Vec::new()
        } else {
            split_segment(line, &seps, &delimiters, charset, index, sequence, 0)?
        };
        seen.insert(id.to_string(), sequence);
        segments.push(Segment {
            id: id.to_string(),
            fields,
        });
    }

    // Guard against the crate's defect class "stopped early but said Ok": every non-blank
    // input line must be one segment of the result.
    if segments.len() != line_count {
        return Err(ParseError::new(
            ParseErrorKind::Segment,
            format!("{} segments read from {line_count} lines", segments.len()),
        ));
    }
    Ok(Message {
        segments,
        delimiters,
    })
}

fn single(value: String) -> Field {
    Field {
        repetitions: vec![Repetition {
            components: vec![Component {
                subcomponents: vec![value],
            }],
        }],
    }
}

/// Splits one segment line (`XXX|...`) with `hl7-parser` and converts it to owned, decoded
/// fields. `field_offset` is added to field numbers in errors (2 for MSH, whose first two
/// fields are not in `line`).
fn split_segment(
    line: &str,
    seps: &hl7_parser::message::Separators,
    d: &Delimiters,
    charset: Charset,
    index: usize,
    sequence: usize,
    field_offset: usize,
) -> Result<Vec<Field>, ParseError> {
    let id = line.get(..3).unwrap_or(line);
    if line.len() == 3 {
        return Ok(Vec::new());
    }
    let parsed = hl7_parser::parser::parse_segment_with_separators(line, *seps).map_err(|e| {
        ParseError::new(
            ParseErrorKind::Segment,
            format!("segment could not be split: {e}"),
        )
        .at(index, id, Some(sequence))
    })?;
    // The crate returns Ok after reading a prefix when it meets something it cannot read;
    // insist that it consumed the whole line and name the field where it stopped.
    if parsed.range.end != line.len() {
        let stopped = line
            .get(..parsed.range.end)
            .map_or(0, |done| done.matches(d.field).count());
        return Err(ParseError::new(
            ParseErrorKind::Segment,
            format!(
                "only {} of {} bytes of the segment could be read",
                parsed.range.end,
                line.len()
            ),
        )
        .at(index, id, Some(sequence))
        .field(stopped + field_offset));
    }
    Ok(parsed
        .fields
        .iter()
        .map(|f| Field {
            repetitions: f
                .repeats
                .iter()
                .map(|r| Repetition {
                    components: r
                        .components
                        .iter()
                        .map(|c| Component {
                            subcomponents: c
                                .subcomponents
                                .iter()
                                .map(|s| decode_escapes(s.value, d, charset))
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect())
}

/// Decodes HL7 escape sequences in one subcomponent (HL7 v2.5.1 section 2.7).
///
/// Known: `\F\ \S\ \T\ \R\ \E\`, `\P\` (v2.7 truncation character, when declared),
/// `\Xhh..\` (bytes in the message charset), `\.br\` (line break, as `\n`).
/// Anything else (formatting such as `\H\`, `\.sp\`, charset switches, `\Zxx\`, invalid hex,
/// an unterminated escape) is kept verbatim, escape characters included, so no text is lost.
/// Works on `char` boundaries found by `str::find`, so multi-byte text cannot split a slice.
pub fn decode_escapes(raw: &str, d: &Delimiters, charset: Charset) -> String {
    let e = d.escape;
    if !raw.contains(e) {
        return raw.to_string();
    }
    let elen = e.len_utf8();
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(e) {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + elen..).unwrap_or_default();
        let Some(end) = after.find(e) else {
            // Unterminated: keep the escape character and the rest as text.
            out.push_str(rest.get(start..).unwrap_or_default());
            return out;
        };
        let seq = after.get(..end).unwrap_or_default();
        match decode_one(seq, d, charset) {
            Some(decoded) => out.push_str(&decoded),
            None => {
                out.push(e);
                out.push_str(seq);
                out.push(e);
            }
        }
        rest = after.get(end + elen..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

fn decode_one(seq: &str, d: &Delimiters, charset: Charset) -> Option<String> {
    let c = match seq {
        "F" => d.field,
        "S" => d.component,
        "T" => d.subcomponent,
        "R" => d.repetition,
        "E" => d.escape,
        "P" => d.truncation?,
        ".br" => '\n',
        _ => return decode_hex(seq.strip_prefix('X')?, charset),
    };
    Some(c.to_string())
}

/// `\Xhhhh\`: pairs of hex digits giving bytes in the message's character set.
fn decode_hex(hex: &str, charset: Charset) -> Option<String> {
    let b = hex.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(2) || !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let bytes: Vec<u8> = b
        .chunks(2)
        .filter_map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect();
    if bytes.len() * 2 != b.len() {
        return None;
    }
    match charset {
        Charset::Latin1 => Some(bytes.iter().map(|&x| char::from(x)).collect()),
        Charset::Ascii if !bytes.is_ascii() => None,
        Charset::Ascii | Charset::Utf8 => String::from_utf8(bytes).ok(),
    }
}

/// Splits an HL7 batch file (HL7 v2.5.1 section 2.10.3: `[FHS] {[BHS] {MSH...} [BTS]} [FTS]`)
/// into its messages, each returned as its own bytes with segments separated by CR.
///
/// Input without FHS/BHS (one message, or messages simply concatenated) is accepted too.
/// BTS-1 and FTS-1 counts are checked when present, and a missing BTS/FTS after a BHS/FHS is
/// an error: both catch a file that was cut short, which would otherwise lose messages silently.
/// Bytes are split on CR/LF only, which is safe for ASCII, UTF-8 and Latin-1 alike.
pub fn split_batch(bytes: &[u8]) -> Result<Vec<Vec<u8>>, ParseError> {
    let bytes = strip_bom(bytes)?;
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    let mut file_open = false;
    let mut file_closed = false;
    let mut batch_open = false;
    let mut batch_start = 0usize; // messages.len() when the open batch began
    let mut batches = 0usize;
    let mut any = false;

    let batch_err = |index: usize, id: &str, msg: String| {
        ParseError::new(ParseErrorKind::Batch, msg).at(index, id, None)
    };

    for (n, (_, line)) in byte_lines(bytes).enumerate() {
        let index = n + 1;
        let id_bytes = line.get(..3).unwrap_or(line);
        let id = String::from_utf8_lossy(id_bytes).into_owned();
        let is_id = |want: &str| {
            id_bytes == want.as_bytes() && line.get(3).is_none_or(|b| !b.is_ascii_alphanumeric())
        };
        if file_closed {
            return Err(batch_err(index, &id, "segment after FTS".into()));
        }
        let first = !any;
        any = true;
        if is_id("FHS") {
            if !first {
                return Err(batch_err(
                    index,
                    &id,
                    "FHS must be the first segment".into(),
                ));
            }
            file_open = true;
        } else if is_id("BHS") {
            if batch_open {
                return Err(batch_err(
                    index,
                    &id,
                    "BHS before the BTS of the previous batch".into(),
                ));
            }
            flush(&mut current, &mut messages);
            batch_open = true;
            batch_start = messages.len();
        } else if is_id("BTS") {
            flush(&mut current, &mut messages);
            if !batch_open {
                return Err(batch_err(index, &id, "BTS without BHS".into()));
            }
            let count = messages.len().saturating_sub(batch_start);
            check_count(line, count, "BTS-1 batch message count")
                .map_err(|m| batch_err(index, &id, m).field(1))?;
            batch_open = false;
            batches += 1;
        } else if is_id("FTS") {
            flush(&mut current, &mut messages);
            if !file_open {
                return Err(batch_err(index, &id, "FTS without FHS".into()));
            }
            if batch_open {
                return Err(batch_err(
                    index,
                    &id,
                    "FTS before the BTS of the open batch".into(),
                ));
            }
            check_count(line, batches, "FTS-1 file batch count")
                .map_err(|m| batch_err(index, &id, m).field(1))?;
            file_closed = true;
        } else if is_id("MSH") {
            flush(&mut current, &mut messages);
            current = Some(line.to_vec());
        } else {
            match current.as_mut() {
                Some(msg) => {
                    msg.push(b'\r');
                    msg.extend_from_slice(line);
                }
                None => {
                    return Err(batch_err(
                        index,
                        &id,
                        "segment outside a message (no MSH before it)".into(),
                    ));
                }
            }
        }
    }
    flush(&mut current, &mut messages);
    if !any {
        return Err(ParseError::new(ParseErrorKind::Empty, "empty batch file"));
    }
    if batch_open {
        return Err(ParseError::new(
            ParseErrorKind::Batch,
            "batch not closed: BTS missing (file truncated?)",
        ));
    }
    if file_open && !file_closed {
        return Err(ParseError::new(
            ParseErrorKind::Batch,
            "file not closed: FTS missing (file truncated?)",
        ));
    }
    Ok(messages)
}

fn flush(current: &mut Option<Vec<u8>>, messages: &mut Vec<Vec<u8>>) {
    if let Some(mut m) = current.take() {
        m.push(b'\r');
        messages.push(m);
    }
}

/// Checks the count in field 1 of a BTS/FTS line when it is valued.
fn check_count(line: &[u8], actual: usize, what: &str) -> Result<(), String> {
    let Some(&fs) = line.get(3) else {
        return Ok(());
    };
    let raw = line.split(|&b| b == fs).nth(1).unwrap_or_default();
    let value = String::from_utf8_lossy(raw);
    let value = value.trim();
    if value.is_empty() {
        return Ok(());
    }
    match value.parse::<usize>() {
        Ok(n) if n == actual => Ok(()),
        Ok(n) => Err(format!("{what} says {n}, found {actual}")),
        Err(_) => Err(format!(
            "{what} is not a number: {:?}",
            value.chars().take(20).collect::<String>()
        )),
    }
}

/// The parts of an HL7 DTM/TS value.
struct Ts<'a> {
    year: &'a str,
    month: Option<&'a str>,
    day: Option<&'a str>,
    hour: Option<&'a str>,
    minute: Option<&'a str>,
    second: Option<&'a str>,
    fraction: Option<&'a str>,
    /// `(sign, hh, mm)`.
    offset: Option<(char, &'a str, &'a str)>,
}

/// Converts an HL7 DTM/TS (`YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`) to a FHIR `date`/`dateTime`.
///
/// - Precision is kept where FHIR can express it: `2019` → `2019`, `201903` → `2019-03`,
///   `20190304` → `2019-03-04`; fractional seconds keep every digit sent.
/// - FHIR requires seconds once a time is given, so `YYYYMMDDHH[MM]` is completed with `:00`.
/// - The offset is kept as sent (`-0330` → `-03:30`, `+0545` → `+05:45`, `+0000` → `+00:00`).
///   A value without offset stays without one; note that FHIR `dateTime` requires a zone when
///   a time is present, so mappers should use [`parse_ts_with_default_offset`] with the
///   sender's offset (HL7 says a missing offset means the sender's local time).
/// - A date-only value drops its offset, which FHIR `date` cannot carry.
/// - Returns `None` for anything that is not a valid DTM (bad lengths, month 13, 30 February,
///   offsets outside -12:00..+14:00 as FHIR's pattern allows).
pub fn parse_ts(s: &str) -> Option<String> {
    let ts = split_ts(s)?;
    let mut out = ts.year.to_string();
    for part in [ts.month, ts.day].into_iter().flatten() {
        out.push('-');
        out.push_str(part);
    }
    if let Some(hour) = ts.hour {
        out.push('T');
        out.push_str(hour);
        out.push(':');
        out.push_str(ts.minute.unwrap_or("00"));
        out.push(':');
        out.push_str(ts.second.unwrap_or("00"));
        if let Some(f) = ts.fraction {
            out.push('.');
            out.push_str(f);
        }
        if let Some((sign, hh, mm)) = ts.offset {
            out.push(sign);
            out.push_str(hh);
            out.push(':');
            out.push_str(mm);
        }
    }
    Some(out)
}

/// Like [`parse_ts`], but a value with a time and no offset gets `default_offset`
/// (HL7 form `+HHMM`/`-HHMM`, e.g. from MSH-7 via [`ts_offset`]). `None` when either is invalid.
pub fn parse_ts_with_default_offset(s: &str, default_offset: &str) -> Option<String> {
    let (sign, hh, mm) = split_offset(default_offset)?;
    let ts = split_ts(s)?;
    let base = parse_ts(s)?;
    if ts.hour.is_some() && ts.offset.is_none() {
        Some(format!("{base}{sign}{hh}:{mm}"))
    } else {
        Some(base)
    }
}

/// The offset of a valid HL7 timestamp, in HL7 form (`-0330`), if it has one.
pub fn ts_offset(s: &str) -> Option<&str> {
    let t = s.trim();
    split_ts(t)?.offset?;
    let pos = t.find(['+', '-'])?;
    t.get(pos..)
}

fn split_offset(off: &str) -> Option<(char, &str, &str)> {
    let sign = off.chars().next().filter(|c| *c == '+' || *c == '-')?;
    let digits = off.get(1..)?;
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hh, mm) = (digits.get(..2)?, digits.get(2..)?);
    let (h, m) = (num(hh)?, num(mm)?);
    // FHIR's pattern: (0[0-9]|1[0-3]):[0-5][0-9] or 14:00.
    if !(h <= 13 && m <= 59 || h == 14 && m == 0) {
        return None;
    }
    Some((sign, hh, mm))
}

fn num(s: &str) -> Option<u32> {
    s.parse().ok()
}

fn split_ts(s: &str) -> Option<Ts<'_>> {
    let s = s.trim();
    let (main, offset) = match s.find(['+', '-']) {
        Some(p) => (s.get(..p)?, Some(split_offset(s.get(p..)?)?)),
        None => (s, None),
    };
    let (digits, fraction) = match main.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (main, None),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![4, 6, 8, 10, 12, 14].contains(&digits.len())
    {
        return None;
    }
    if let Some(f) = fraction {
        // Fractions belong to seconds only.
        if digits.len() != 14 || f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let part = |from: usize| digits.get(from..from + 2);
    let ts = Ts {
        year: digits.get(..4)?,
        month: part(4),
        day: part(6),
        hour: part(8),
        minute: part(10),
        second: part(12),
        fraction,
        offset,
    };
    let year = num(ts.year)?;
    if year == 0 {
        return None;
    }
    if let Some(m) = ts.month {
        let m = num(m)?;
        if !(1..=12).contains(&m) {
            return None;
        }
        if let Some(d) = ts.day
            && !(1..=days_in_month(year, m)).contains(&num(d)?)
        {
            return None;
        }
    }
    let in_range = |v: Option<&str>, max: u32| v.is_none_or(|v| num(v).is_some_and(|n| n <= max));
    if !(in_range(ts.hour, 23) && in_range(ts.minute, 59) && in_range(ts.second, 60)) {
        return None;
    }
    Some(ts)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 31,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    pub(crate) const PHILIPS: &[u8] =
        include_bytes!("testdata/ihe_pcd_tf2_E.1.1_philips_pcd01.hl7");
    pub(crate) const ACME: &[u8] = include_bytes!("testdata/ihe_pcd_tf2_E.1.2_acme_pcd01.hl7");

    fn obx(m: &Message) -> Vec<&Segment> {
        m.segments_named("OBX").collect()
    }

    #[test]
    fn philips_sample_parses_completely() {
        let m = parse(PHILIPS).unwrap();
        assert_eq!(m.segments.len(), 21);
        let ids: Vec<&str> = m.segments.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(&ids[..4], &["MSH", "PID", "PV1", "OBR"]);
        assert_eq!(obx(&m).len(), 17);
        assert_eq!(m.charset(), Some("8859/1"));
        assert_eq!(
            m.message_type(),
            (Some("ORU"), Some("R01"), Some("ORU_R01"))
        );
        assert_eq!(m.control_id(), Some("HP0122182658686QQ000CND119C0WS61"));
        assert_eq!(m.version(), Some("2.6"));
        assert_eq!(m.accept_ack_type(), Some("AL"));
        assert_eq!(m.application_ack_type(), Some("NE"));
        assert_eq!(
            m.sending_application().and_then(|r| r.component(1)),
            Some("PAT_DEVICE_PHILIPS_C")
        );
        assert_eq!(
            m.sending_facility().and_then(|r| r.component(1)),
            Some("Philips")
        );
        let msh = m.first("MSH").unwrap();
        assert_eq!(msh.text(1, 1), Some("|"));
        assert_eq!(msh.text(2, 1), Some("^~\\&"));
        assert_eq!(msh.text(21, 1), Some("IHE_PCD_001"));
        assert_eq!(msh.text(21, 3), Some("1.3.6.1.4.1.19376.1.6.1.1.1"));
        // PID-5.3 is the HL7 null.
        assert_eq!(m.first("PID").unwrap().text(5, 3), Some("\"\""));
        let o = obx(&m);
        assert_eq!(o[3].text(4, 1), Some("1.1.1.5"));
        assert_eq!(o[3].text(3, 1), Some("150021"));
        assert_eq!(o[3].text(5, 1), Some("117"));
        assert_eq!(o[3].text(14, 1), Some("20150122115000"));
        assert_eq!(
            o[0].text(18, 1),
            Some("e86c094f-f751-4acf-92b2-38f11c1f6f57-Device")
        );
        assert_eq!(o[1].text(18, 1), Some("0600dc750001"));
        assert_eq!(o[3].text(18, 1), None);
        assert_eq!(o[16].text(4, 1), Some("1.3.1.3"));
        assert_eq!(o[16].text(5, 1), Some("3.9"));
    }

    #[test]
    fn acme_sample_parses_completely() {
        let m = parse(ACME).unwrap();
        assert_eq!(m.segments.len(), 11);
        assert_eq!(obx(&m).len(), 7);
        assert_eq!(m.charset(), Some("UNICODE UTF-8"));
        let app = m.sending_application().unwrap();
        assert_eq!(app.component(2), Some("080019FFFE3ED02D"));
        assert_eq!(app.component(3), Some("EUI-64"));
        let o = obx(&m);
        assert_eq!(o[3].text(4, 1), Some("1.16.1.1"));
        assert_eq!(o[3].text(18, 1), Some("080019FFFE3ED02D172.16.172.135"));
        assert_eq!(o[3].text(18, 2), Some("GATEWAY_ACME"));
        assert_eq!(o[3].text(6, 1), Some("mm[Hg]"));
        assert_eq!(
            parse_ts(m.date_time().unwrap()).as_deref(),
            Some("2011-06-02T05:00:00+00:00")
        );
    }

    /// Evidence for the module docs: what `hl7-parser` 0.3.0 itself does with these inputs.
    /// If an upgrade fixes them, this test fails and the bypasses can be revisited.
    #[test]
    fn hl7_parser_defects_that_we_bypass() {
        // Stops at an unreadable segment and still returns Ok: OBX is lost.
        let m = hl7_parser::Message::parse("MSH|^~\\&|A\rPID|1\rbad segment\rOBX|1").unwrap();
        assert_eq!(m.segments.len(), 2);
        // The v2.7 fifth encoding character becomes MSH-3 and shifts every later field.
        let m = hl7_parser::Message::parse("MSH|^~\\&#|SND|FAC").unwrap();
        let msh = m.segment("MSH").unwrap();
        assert_eq!(msh.field(3).unwrap().raw_value(), "#");
        // Escape decoding uses char counts as byte offsets (garbles here, panics when the
        // offset lands inside a multi-byte character), drops unknown escapes, `.br` is CR.
        let s = hl7_parser::message::Separators::default();
        assert_eq!(s.decode("Zoë\\T\\x").to_string(), "Zoë\\x");
        assert_eq!(s.decode("a\\H\\b").to_string(), "aHb");
        assert_eq!(s.decode("a\\.br\\b").to_string(), "a\rb");
        // The offset -0030 loses its sign; -0330 is stored as hours -3, minutes +30.
        let ts: hl7_parser::datetime::TimeStamp = "20190304123059-0030".parse().unwrap();
        assert_eq!(ts.offset.unwrap().to_string(), "+0030");
        let ts: hl7_parser::datetime::TimeStamp = "20190304123059-0330".parse().unwrap();
        assert_eq!(
            (ts.offset.unwrap().hours, ts.offset.unwrap().minutes),
            (-3, 30)
        );
        // Fractions beyond four digits are silently cut (the rest is read as an offset hour).
        let ts: hl7_parser::datetime::TimeStamp = "20190304123059.123456".parse().unwrap();
        assert_eq!((ts.microsecond, ts.offset), (Some(123_400), None));
    }

    #[test]
    fn escapes_are_decoded_by_us() {
        let d = Delimiters::default();
        let t = Delimiters {
            truncation: Some('#'),
            ..d
        };
        let cases: &[(&Delimiters, Charset, &str, &str)] = &[
            (&d, Charset::Utf8, r"a\F\b\S\c\T\d\R\e\E\f", "a|b^c&d~e\\f"),
            (&d, Charset::Utf8, r"Zoë\T\x", "Zoë&x"),
            (&d, Charset::Utf8, r"日本\S\語\E\", "日本^語\\"),
            (&d, Charset::Utf8, r"\X41\", "A"),
            (&d, Charset::Utf8, r"\X4142\c", "ABc"),
            (&d, Charset::Utf8, r"\XC3A9\", "é"),
            (&d, Charset::Latin1, r"\XE9\", "é"),
            (&d, Charset::Utf8, r"\XE9\", r"\XE9\"),
            (&d, Charset::Ascii, r"\XE9\", r"\XE9\"),
            (&d, Charset::Utf8, r"\X4\", r"\X4\"),
            (&d, Charset::Utf8, r"\XZZ\", r"\XZZ\"),
            (&d, Charset::Utf8, r"line1\.br\line2", "line1\nline2"),
            (&d, Charset::Utf8, r"\X0D\\X0A\", "\r\n"),
            (&d, Charset::Utf8, r"\H\bold\N\", r"\H\bold\N\"),
            (&d, Charset::Utf8, r"\Zfoo\", r"\Zfoo\"),
            (&d, Charset::Utf8, r"C:\temp\x", r"C:\temp\x"),
            (&d, Charset::Utf8, r"trailing\", r"trailing\"),
            (&d, Charset::Utf8, r"é\", r"é\"),
            (&d, Charset::Utf8, r"\\", r"\\"),
            (&d, Charset::Utf8, r"\P\", r"\P\"),
            (&t, Charset::Utf8, r"\P\", "#"),
            (&d, Charset::Utf8, "\"\"", "\"\""),
        ];
        for (delims, cs, raw, want) in cases {
            assert_eq!(decode_escapes(raw, delims, *cs), *want, "input {raw:?}");
        }
    }

    #[test]
    fn escape_after_multibyte_text_in_a_message() {
        let m = parse(
            "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rPID|1||x||Zoë\\T\\x^Ann\\F\\\r".as_bytes(),
        )
        .unwrap();
        let pid = m.first("PID").unwrap();
        assert_eq!(pid.text(5, 1), Some("Zoë&x"));
        assert_eq!(pid.text(5, 2), Some("Ann|"));
    }

    #[test]
    fn truncation_character_does_not_shift_msh() {
        let m = parse(b"MSH|^~\\&#|SND|FAC|RCV|RFAC|20240101120000||ORU^R01^ORU_R01|42|P|2.7\rNTE|1||abc#|x\\P\\y\r").unwrap();
        assert_eq!(m.delimiters.truncation, Some('#'));
        let msh = m.first("MSH").unwrap();
        assert_eq!(msh.text(2, 1), Some("^~\\&#"));
        assert_eq!(msh.text(3, 1), Some("SND"));
        assert_eq!(m.control_id(), Some("42"));
        assert_eq!(m.version(), Some("2.7"));
        let nte = m.first("NTE").unwrap();
        assert_eq!(nte.text(3, 1), Some("abc#"));
        assert_eq!(nte.text(4, 1), Some("x#y"));
        assert!(m.encode().starts_with("MSH|^~\\&#|SND|"));
    }

    #[test]
    fn separators_bom_and_blank_lines() {
        let base = "MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5\rEVN|A01\rPID|1||7\r";
        let want = parse(base.as_bytes()).unwrap();
        assert_eq!(want.segments.len(), 3);
        for variant in [
            base.replace('\r', "\n"),
            base.replace('\r', "\r\n"),
            format!("\u{FEFF}{base}"),
            format!("\r\n{base}\r\n\r\n"),
            base.trim_end().to_string(),
        ] {
            assert_eq!(parse(variant.as_bytes()).as_ref(), Ok(&want), "{variant:?}");
        }
    }

    #[test]
    fn latin1_message_is_decoded() {
        let mut bytes =
            b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5||||||8859/1\rPID|1||7||Ren".to_vec();
        bytes.push(0xE9);
        bytes.extend_from_slice(b"^Andr\xE9\r");
        let m = parse(&bytes).unwrap();
        assert_eq!(m.first("PID").unwrap().text(5, 1), Some("René"));
        assert_eq!(m.first("PID").unwrap().text(5, 2), Some("André"));
        // The same bytes declared as UTF-8 or ASCII are an error naming the segment.
        for cs in ["UNICODE UTF-8", "ASCII"] {
            let b = String::from_utf8_lossy(&bytes).replace("8859/1", cs);
            let mut raw = b.into_bytes();
            // restore the raw Latin-1 byte replaced by from_utf8_lossy
            let pos = raw
                .windows(3)
                .position(|w| w == "\u{FFFD}".as_bytes())
                .unwrap();
            raw.splice(pos..pos + 3, [0xE9]);
            let err = parse(&raw).unwrap_err();
            assert_eq!(err.kind, ParseErrorKind::Encoding);
            assert_eq!(err.segment_index, Some(2));
            assert_eq!(err.segment_id.as_deref(), Some("PID"));
        }
    }

    #[test]
    fn unsupported_charset_and_bad_structure_are_named() {
        let err = parse(b"MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5||||||ISO IR87\r").unwrap_err();
        assert_eq!((err.kind, err.field), (ParseErrorKind::Charset, Some(18)));
        let err = parse(b"MSH|^~\\&|A\rPID|1\rpid|2\r").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Segment);
        assert_eq!(err.segment_index, Some(3));
        assert!(err.to_string().starts_with("segment 3 (pid)"), "{err}");
        let err = parse(b"MSH|^~\\&|A\rPID|1\rMSH|^~\\&|B\r").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::Structure);
        assert_eq!(parse(b"PID|1").unwrap_err().kind, ParseErrorKind::NoHeader);
        assert_eq!(parse(b" \r\n").unwrap_err().kind, ParseErrorKind::Empty);
        assert_eq!(
            parse(b"MSH|^~|").unwrap_err().kind,
            ParseErrorKind::Delimiters
        );
        assert_eq!(
            parse(b"MSH|^~\\^|").unwrap_err().kind,
            ParseErrorKind::Delimiters
        );
        assert_eq!(
            parse(b"MSH|^~\\&#!|").unwrap_err().kind,
            ParseErrorKind::Delimiters
        );
        assert_eq!(
            parse(&[0xFF, 0xFE, b'M', 0]).unwrap_err().kind,
            ParseErrorKind::Charset
        );
        // A bare segment id is a segment without fields.
        let m = parse(b"MSH|^~\\&\rZXX\r").unwrap();
        assert_eq!(m.segments[1].fields.len(), 0);
    }

    #[test]
    fn parse_header_salvages_msh_of_a_broken_message() {
        let h = parse_header(b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|CTRL9|P|2.5\rPID|1\r\xFF\xFE|")
            .unwrap();
        assert_eq!(h.control_id(), Some("CTRL9"));
        assert!(parse_header(b"garbage").is_none());
    }

    #[test]
    fn batch_files_are_split_and_checked() {
        let m1 = "MSH|^~\\&|A|B|||20240101||ORU^R01|1|P|2.5\rPID|1";
        let m2 = "MSH|^~\\&|A|B|||20240101||ORU^R01|2|P|2.5\rPID|2\rOBX|1";
        let file = format!("FHS|^~\\&\rBHS|^~\\&\r{m1}\r{m2}\rBTS|2\rFTS|1\r");
        let msgs = split_batch(file.as_bytes()).unwrap();
        assert_eq!(
            msgs,
            vec![
                format!("{m1}\r").into_bytes(),
                format!("{m2}\r").into_bytes()
            ]
        );
        assert_eq!(parse(&msgs[1]).unwrap().segments.len(), 3);
        // LF separated, no headers, two concatenated messages.
        let plain = format!("{m1}\n{m2}\n").replace('\r', "\n");
        assert_eq!(split_batch(plain.as_bytes()).unwrap().len(), 2);
        let bad = |s: String| split_batch(s.as_bytes()).unwrap_err().kind;
        assert_eq!(
            bad(format!("BHS|^~\\&\r{m1}\rBTS|2\r")),
            ParseErrorKind::Batch
        );
        assert_eq!(
            bad(format!("FHS|^~\\&\rBHS|^~\\&\r{m1}\rBTS|1\r")),
            ParseErrorKind::Batch
        );
        assert_eq!(bad(format!("BHS|^~\\&\r{m1}\r")), ParseErrorKind::Batch);
        assert_eq!(bad("PID|1\r".to_string()), ParseErrorKind::Batch);
        assert_eq!(bad(format!("{m1}\rFTS|0\r")), ParseErrorKind::Batch);
        assert_eq!(split_batch(b"BHS|^~\\&\rBTS|0\r").unwrap().len(), 0);
        assert_eq!(bad(String::new()), ParseErrorKind::Empty);
    }

    #[test]
    fn timestamps() {
        let cases: &[(&str, Option<&str>)] = &[
            ("20150122182658+0000", Some("2015-01-22T18:26:58+00:00")),
            ("20150122115000", Some("2015-01-22T11:50:00")),
            ("20190304", Some("2019-03-04")),
            ("201903", Some("2019-03")),
            ("2019", Some("2019")),
            ("20190304-0500", Some("2019-03-04")),
            ("2019030412", Some("2019-03-04T12:00:00")),
            ("201903041230-0330", Some("2019-03-04T12:30:00-03:30")),
            ("20190304123059+0545", Some("2019-03-04T12:30:59+05:45")),
            (
                "20190304123059.1234-0700",
                Some("2019-03-04T12:30:59.1234-07:00"),
            ),
            ("20190304123059.123456", Some("2019-03-04T12:30:59.123456")),
            ("20190304123059-0030", Some("2019-03-04T12:30:59-00:30")),
            ("20190304123059+1400", Some("2019-03-04T12:30:59+14:00")),
            ("20200229", Some("2020-02-29")),
            ("20190229", None),
            ("20191301", None),
            ("20190304243000", None),
            ("2019030412305", None),
            ("201903041230.5", None),
            ("20190304123059.", None),
            ("20190304123059+05", None),
            ("20190304123059+1430", None),
            ("20190304123059+0560", None),
            ("2019-03-04", None),
            ("00000101", None),
            ("", None),
            ("２０１９", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_ts(input).as_deref(), *want, "input {input:?}");
        }
        assert_eq!(
            parse_ts_with_default_offset("20150122115000", "-0330").as_deref(),
            Some("2015-01-22T11:50:00-03:30")
        );
        assert_eq!(
            parse_ts_with_default_offset("20150122115000+0100", "-0330").as_deref(),
            Some("2015-01-22T11:50:00+01:00")
        );
        assert_eq!(
            parse_ts_with_default_offset("20150122", "+0000").as_deref(),
            Some("2015-01-22")
        );
        assert_eq!(ts_offset("20150122182658+0000"), Some("+0000"));
        assert_eq!(ts_offset("20150122182658"), None);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod fuzz {
    //! Deterministic fuzzing: mutated samples through every entry point; none may panic, and
    //! every message that parses must survive `encode` → `parse_str` unchanged.
    use super::tests::{ACME, PHILIPS};
    use super::*;
    use crate::hl7v2::ack::{AckCode, AckError, ack};
    use crate::hl7v2::mllp::{MllpDecoder, frame};

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const INSERTS: &[&[u8]] = &[
        b"|",
        b"^",
        b"~",
        b"\\",
        b"&",
        b"#",
        b"\r",
        b"\n",
        b"\r\n",
        b"\\T\\",
        b"\\X41\\",
        b"\\X",
        b"\\.br\\",
        b"\\P\\",
        b"\"\"",
        "ë".as_bytes(),
        "日".as_bytes(),
        "😀".as_bytes(),
        b"\xC3",
        b"\xE9",
        b"\x0B",
        b"\x1C\x0D",
        b"\xEF\xBB\xBF",
        b"MSH|^~\\&#|",
        b"BHS|",
        b"BTS|1",
        b"FHS|",
        b"FTS|x",
        b"+0330",
        b"-",
        b".",
        b"8859/1",
        b"ASCII",
    ];

    fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=rng.below(6) {
            match rng.below(5) {
                0 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
                1 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v.truncate(i);
                }
                2 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    let n = rng.below(8).min(v.len() - i);
                    v.drain(i..i + n);
                }
                _ => {
                    let i = rng.below(v.len() + 1);
                    let ins = INSERTS[rng.below(INSERTS.len())];
                    v.splice(i..i, ins.iter().copied());
                }
            }
        }
        v
    }

    #[test]
    fn twenty_thousand_mutations_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let ts_seeds = ["20150122182658+0000", "20190304123059.1234-0330", "201903"];
        let batch = [
            b"FHS|^~\\&\rBHS|^~\\&\r".as_slice(),
            PHILIPS,
            ACME,
            b"BTS|2\rFTS|1\r",
        ]
        .concat();
        let seeds: [&[u8]; 3] = [PHILIPS, ACME, &batch];
        let mut parsed = 0;
        let mut decoder = MllpDecoder::new(4096);
        for i in 0..20_000 {
            let input = mutate(&mut rng, seeds[i % seeds.len()]);
            match parse(&input) {
                Ok(m) => {
                    parsed += 1;
                    let again = parse_str(&m.encode()).unwrap();
                    assert_eq!(again, m, "round trip of input {i}");
                    let _ = ack(Some(&m), AckCode::AA, None);
                }
                Err(e) => {
                    let _ = e.to_string();
                    let header = parse_header(&input);
                    let text = ack(header.as_ref(), AckCode::AE, Some(&AckError::from(&e)));
                    assert!(parse_str(&text).is_ok(), "NAK must parse: {text:?}");
                }
            }
            let _ = split_batch(&input);
            let ts = mutate(&mut rng, ts_seeds[i % ts_seeds.len()].as_bytes());
            let ts = String::from_utf8_lossy(&ts);
            let _ = parse_ts(&ts);
            let _ = parse_ts_with_default_offset(&ts, "-0330");
            let _ = ts_offset(&ts);
            // MLLP: the raw input, a framed copy, cut at a random point.
            let framed = [input.as_slice(), &frame(&input)].concat();
            let cut = rng.below(framed.len() + 1);
            let (a, b) = framed.split_at(cut);
            for f in decoder.push(a).into_iter().chain(decoder.push(b)) {
                if let crate::hl7v2::mllp::Frame::Message(m) = f {
                    assert!(m.len() <= 4096);
                }
            }
        }
        // The mutations must leave enough valid messages for the round trip to mean something.
        assert!(parsed > 2_000, "only {parsed} inputs parsed");
    }
}
