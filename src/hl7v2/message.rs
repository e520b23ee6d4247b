//! HL7 v2.x message structure (HL7 v2.5.1 chapter 2, sections 2.5 "Message construction rules" and 2.15.9 "MSH").
//!
//! The model is owned and already decoded: escape sequences (`\F\`, `\X41\`, ...) have been
//! turned into text by [`crate::hl7v2::parse`], so mappers never see delimiter escapes. Two
//! things are deliberately kept as they arrived, because they carry meaning a mapper needs:
//! - the HL7 null `""` (two quote characters, [`HL7_NULL`]) means "delete the value" in an
//!   update, which is different from an absent value;
//! - escape sequences the parser does not know (formatting like `\H\`, charset switches like
//!   `\C2842\`, site-defined `\Zxx\`) stay verbatim, escape characters included, so no text is lost.
//!
//! Numbering follows the standard so that code reads like the spec: fields, components and
//! subcomponents are 1-based (`PID-5.1` is `text(5, 1)`), and for MSH `field(1)` is the field
//! separator itself and `field(2)` the encoding characters, so MSH-9 is `field(9)`.
//! Repetitions are 0-based because they are a list, not a numbered position in the standard.

/// The HL7 null value: a field or component sent as `""` asks the receiver to delete it.
pub const HL7_NULL: &str = "\"\"";

/// A parsed message: every segment of the input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub segments: Vec<Segment>,
    /// The delimiters declared in MSH-1 and MSH-2; kept so values can be re-encoded.
    pub delimiters: Delimiters,
}

/// The five delimiters of MSH-1/MSH-2 plus the v2.7 truncation character (fifth encoding character).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    pub field: char,
    pub component: char,
    pub repetition: char,
    pub escape: char,
    pub subcomponent: char,
    /// Present only when MSH-2 has a fifth character (HL7 v2.7 section 2.5.5.2); usually `#`.
    pub truncation: Option<char>,
}

/// One segment: a three-character id and its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub id: String,
    /// `fields[0]` is field 1. For MSH, `fields[0]` is MSH-1 (the field separator) and
    /// `fields[1]` MSH-2 (the encoding characters, not split).
    pub fields: Vec<Field>,
}

/// One field; a field that does not repeat has exactly one repetition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub repetitions: Vec<Repetition>,
}

/// One occurrence of a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repetition {
    pub components: Vec<Component>,
}

/// One component; a component without subcomponent separators has exactly one subcomponent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub subcomponents: Vec<String>,
}

impl Default for Delimiters {
    /// The delimiters every sender in practice uses: `|^~\&`, no truncation character.
    fn default() -> Self {
        Delimiters {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// The MSH-2 value for these delimiters (`^~\&` or `^~\&#`).
    pub fn encoding_characters(&self) -> String {
        let mut s = String::with_capacity(5);
        s.push(self.component);
        s.push(self.repetition);
        s.push(self.escape);
        s.push(self.subcomponent);
        if let Some(t) = self.truncation {
            s.push(t);
        }
        s
    }

    /// Escapes `text` so it can be written as one subcomponent (HL7 v2.5.1 section 2.7).
    ///
    /// The HL7 null `""` is written as is, so it keeps its meaning; CR and LF are written as
    /// hex escapes because a raw CR would end the segment.
    pub fn escape(&self, text: &str) -> String {
        if text == HL7_NULL {
            return text.to_string();
        }
        let e = self.escape;
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            let code = if c == self.field {
                Some("F")
            } else if c == self.component {
                Some("S")
            } else if c == self.subcomponent {
                Some("T")
            } else if c == self.repetition {
                Some("R")
            } else if c == e {
                Some("E")
            } else if Some(c) == self.truncation {
                Some("P")
            } else if c == '\r' {
                Some("X0D")
            } else if c == '\n' {
                Some("X0A")
            } else {
                None
            };
            match code {
                Some(code) => {
                    out.push(e);
                    out.push_str(code);
                    out.push(e);
                }
                None => out.push(c),
            }
        }
        out
    }
}

/// Treats the empty string as absent, as HL7 does.
fn non_empty(s: &str) -> Option<&str> {
    if s.is_empty() { None } else { Some(s) }
}

impl Message {
    /// All segments with this id, in message order.
    pub fn segments_named(&self, id: &str) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| s.id == id)
    }

    /// The first segment with this id.
    pub fn first(&self, id: &str) -> Option<&Segment> {
        self.segments.iter().find(|s| s.id == id)
    }

    /// The MSH segment (always the first segment of a parsed message).
    pub fn msh(&self) -> Option<&Segment> {
        self.segments.first().filter(|s| s.id == "MSH")
    }

    fn msh_text(&self, field: usize, component: usize) -> Option<&str> {
        self.msh().and_then(|s| s.text(field, component))
    }

    /// MSH-10 message control id, echoed in MSA-2 of the acknowledgement.
    pub fn control_id(&self) -> Option<&str> {
        self.msh_text(10, 1)
    }

    /// MSH-9 message type: (message code, trigger event, message structure), e.g. `ORU`, `R01`, `ORU_R01`.
    pub fn message_type(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        (
            self.msh_text(9, 1),
            self.msh_text(9, 2),
            self.msh_text(9, 3),
        )
    }

    /// MSH-12.1 version id, e.g. `2.6`.
    pub fn version(&self) -> Option<&str> {
        self.msh_text(12, 1)
    }

    /// MSH-11.1 processing id (`P` production, `D` debugging, `T` training).
    pub fn processing_id(&self) -> Option<&str> {
        self.msh_text(11, 1)
    }

    /// MSH-3 sending application (HD: namespace id ^ universal id ^ universal id type).
    ///
    /// Returned whole because devices put their EUI-64 in HD.2/HD.3.
    pub fn sending_application(&self) -> Option<&Repetition> {
        self.msh().and_then(|s| s.field(3)).and_then(Field::first)
    }

    /// MSH-4 sending facility (HD).
    pub fn sending_facility(&self) -> Option<&Repetition> {
        self.msh().and_then(|s| s.field(4)).and_then(Field::first)
    }

    /// MSH-5 receiving application (HD).
    pub fn receiving_application(&self) -> Option<&Repetition> {
        self.msh().and_then(|s| s.field(5)).and_then(Field::first)
    }

    /// MSH-6 receiving facility (HD).
    pub fn receiving_facility(&self) -> Option<&Repetition> {
        self.msh().and_then(|s| s.field(6)).and_then(Field::first)
    }

    /// MSH-7 date/time of message, as sent (convert with [`crate::hl7v2::parse::parse_ts`]).
    pub fn date_time(&self) -> Option<&str> {
        self.msh_text(7, 1)
    }

    /// MSH-15 accept acknowledgment type (table 0155: `AL`, `NE`, `ER`, `SU`).
    pub fn accept_ack_type(&self) -> Option<&str> {
        self.msh_text(15, 1)
    }

    /// MSH-16 application acknowledgment type (table 0155).
    pub fn application_ack_type(&self) -> Option<&str> {
        self.msh_text(16, 1)
    }

    /// MSH-18 character set (first repetition: the default charset of the message).
    pub fn charset(&self) -> Option<&str> {
        self.msh_text(18, 1)
    }

    /// Re-encodes the message with its own delimiters, segments separated by CR.
    ///
    /// `parse_str(&m.encode())` gives back an equal message (checked by the fuzz test).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('\r');
            }
            out.push_str(&seg.encode(&self.delimiters));
        }
        out
    }
}

impl Segment {
    /// Field `n`, 1-based as in the standard (for MSH, `field(1)` is MSH-1).
    pub fn field(&self, n: usize) -> Option<&Field> {
        n.checked_sub(1).and_then(|i| self.fields.get(i))
    }

    /// One subcomponent: field and component/subcomponent 1-based, repetition 0-based.
    /// `None` when absent or empty; the HL7 null comes back as `Some("\"\"")`.
    pub fn get(
        &self,
        field: usize,
        repetition: usize,
        component: usize,
        subcomponent: usize,
    ) -> Option<&str> {
        self.field(field)?
            .repetitions
            .get(repetition)?
            .subcomponent(component, subcomponent)
    }

    /// Component `component` (1-based) of the first repetition, first subcomponent.
    pub fn text(&self, field: usize, component: usize) -> Option<&str> {
        self.get(field, 0, component, 1)
    }

    /// True when the field was sent as the HL7 null `""` (delete the value).
    pub fn is_null(&self, field: usize) -> bool {
        self.field(field).is_some_and(Field::is_null)
    }

    /// Re-encodes the segment (MSH-1 and MSH-2 are written as delimiters, not escaped).
    pub fn encode(&self, d: &Delimiters) -> String {
        let mut out = self.id.clone();
        let skip = if self.id == "MSH" {
            out.push(d.field);
            out.push_str(&d.encoding_characters());
            2
        } else {
            0
        };
        for f in self.fields.iter().skip(skip) {
            out.push(d.field);
            out.push_str(&f.encode(d));
        }
        out
    }
}

impl Field {
    /// All repetitions (at least one for a field that was present in the segment).
    pub fn repetitions(&self) -> &[Repetition] {
        &self.repetitions
    }

    /// The first repetition.
    pub fn first(&self) -> Option<&Repetition> {
        self.repetitions.first()
    }

    /// True when every repetition is empty.
    pub fn is_empty(&self) -> bool {
        self.repetitions.iter().all(Repetition::is_empty)
    }

    /// True when the field is exactly the HL7 null `""`.
    pub fn is_null(&self) -> bool {
        self.repetitions.len() == 1
            && self
                .repetitions
                .first()
                .is_some_and(|r| r.components.len() == 1 && r.subcomponent(1, 1) == Some(HL7_NULL))
    }

    /// Re-encodes the field with these delimiters.
    pub fn encode(&self, d: &Delimiters) -> String {
        let mut out = String::new();
        for (i, r) in self.repetitions.iter().enumerate() {
            if i > 0 {
                out.push(d.repetition);
            }
            out.push_str(&r.encode(d));
        }
        out
    }
}

impl Repetition {
    /// Component `n` (1-based), first subcomponent; `None` when absent or empty.
    pub fn component(&self, n: usize) -> Option<&str> {
        self.subcomponent(n, 1)
    }

    /// Subcomponent `sub` of component `component`, both 1-based; `None` when absent or empty.
    pub fn subcomponent(&self, component: usize, sub: usize) -> Option<&str> {
        self.components
            .get(component.checked_sub(1)?)?
            .subcomponent(sub)
    }

    /// The whole component, for composite types whose subcomponents matter.
    pub fn component_at(&self, n: usize) -> Option<&Component> {
        self.components.get(n.checked_sub(1)?)
    }

    /// True when every component is empty.
    pub fn is_empty(&self) -> bool {
        self.components.iter().all(Component::is_empty)
    }

    /// Re-encodes the repetition with these delimiters.
    pub fn encode(&self, d: &Delimiters) -> String {
        let mut out = String::new();
        for (i, c) in self.components.iter().enumerate() {
            if i > 0 {
                out.push(d.component);
            }
            out.push_str(&c.encode(d));
        }
        out
    }
}

impl Component {
    /// Subcomponent `n` (1-based); `None` when absent or empty.
    pub fn subcomponent(&self, n: usize) -> Option<&str> {
        self.subcomponents
            .get(n.checked_sub(1)?)
            .and_then(|s| non_empty(s))
    }

    /// True when every subcomponent is empty.
    pub fn is_empty(&self) -> bool {
        self.subcomponents.iter().all(String::is_empty)
    }

    /// Re-encodes the component with these delimiters, escaping each subcomponent.
    pub fn encode(&self, d: &Delimiters) -> String {
        let mut out = String::new();
        for (i, s) in self.subcomponents.iter().enumerate() {
            if i > 0 {
                out.push(d.subcomponent);
            }
            out.push_str(&d.escape(s));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(s: &[&str]) -> Component {
        Component {
            subcomponents: s.iter().map(|x| x.to_string()).collect(),
        }
    }

    fn seg() -> Segment {
        // PID|1||""|A^B&C~D
        Segment {
            id: "PID".into(),
            fields: vec![
                Field {
                    repetitions: vec![Repetition {
                        components: vec![comp(&["1"])],
                    }],
                },
                Field {
                    repetitions: vec![Repetition {
                        components: vec![comp(&[""])],
                    }],
                },
                Field {
                    repetitions: vec![Repetition {
                        components: vec![comp(&[HL7_NULL])],
                    }],
                },
                Field {
                    repetitions: vec![
                        Repetition {
                            components: vec![comp(&["A"]), comp(&["B", "C"])],
                        },
                        Repetition {
                            components: vec![comp(&["D"])],
                        },
                    ],
                },
            ],
        }
    }

    #[test]
    fn accessors_are_one_based_and_treat_empty_as_absent() {
        let s = seg();
        assert_eq!(s.text(1, 1), Some("1"));
        assert_eq!(s.text(2, 1), None);
        assert_eq!(s.text(0, 1), None);
        assert_eq!(s.text(1, 0), None);
        assert_eq!(s.get(4, 0, 2, 2), Some("C"));
        assert_eq!(s.get(4, 1, 1, 1), Some("D"));
        assert_eq!(s.get(4, 2, 1, 1), None);
        assert_eq!(s.get(4, 0, 2, 0), None);
        assert_eq!(s.text(99, 1), None);
        assert!(s.is_null(3));
        assert!(!s.is_null(1));
        assert_eq!(s.text(3, 1), Some("\"\""));
        assert_eq!(s.field(4).map(|f| f.repetitions().len()), Some(2));
        assert_eq!(
            s.field(4)
                .and_then(Field::first)
                .and_then(|r| r.component(2)),
            Some("B")
        );
    }

    #[test]
    fn encode_escapes_delimiters_but_not_null() {
        let d = Delimiters {
            truncation: Some('#'),
            ..Delimiters::default()
        };
        assert_eq!(
            d.escape("a|b^c&d~e\\f#g\rh\ni"),
            r"a\F\b\S\c\T\d\R\e\E\f\P\g\X0D\h\X0A\i"
        );
        assert_eq!(d.escape(HL7_NULL), HL7_NULL);
        assert_eq!(seg().encode(&d), "PID|1||\"\"|A^B&C~D");
    }
}
