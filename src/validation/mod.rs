//! FHIR R4 Validating Resources (validation.html): JSON schema, cardinality and literal references, reported as OperationOutcome-ready problems.
//!
//! Layout:
//! - [`elements`]: the element table built from the StructureDefinition snapshots
//!   (`profiles/elements.json.gz`), also used for `_summary` and `_elements`.
//! - `schema`: the official `fhir.schema.json`, a fast validator plus a rewritten one that
//!   explains failures with exact paths.
//! - `required`: a typed walk that checks `min >= 1` elements and `Reference.reference`.
//! - `reference`: the grammar of literal references.
//!
//! Architecture invariant: this module does no I/O and never panics on any JSON value. The
//! caller loads and decompresses the two data files; `meta` (owned by the server) and the
//! match between `resourceType` and the URL (owned by the HTTP layer) are deliberately not
//! checked here.

mod elements;
mod reference;
mod required;
mod schema;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Value;

pub use elements::ElementTable;

/// At most this many problems are reported for one resource, so that a bundle full of errors
/// costs the client and the server a bounded amount of work.
const MAX_PROBLEMS: usize = 100;

/// The OperationOutcome `issue.code` (value set `issue-type`) a problem maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IssueType {
    /// Wrong JSON shape: unknown element, wrong JSON type, missing or unknown `resourceType`.
    Structure,
    /// A required element (`min >= 1`) is missing.
    Required,
    /// A value breaks its datatype's pattern, its code binding or the reference grammar.
    Value,
    /// Anything else the schema rejects.
    Invalid,
    /// Input beyond what the validator is willing to process.
    NotSupported,
}

impl IssueType {
    /// The FHIR `issue-type` code.
    pub fn as_code(&self) -> &'static str {
        match self {
            IssueType::Structure => "structure",
            IssueType::Required => "required",
            IssueType::Value => "value",
            IssueType::Invalid => "invalid",
            IssueType::NotSupported => "not-supported",
        }
    }
}

/// One reason a resource is invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub code: IssueType,
    /// FHIRPath-style location (`Bundle.entry[2].resource.name[0].given`), for
    /// `OperationOutcome.issue.expression`; empty when the whole input is at fault.
    pub expression: String,
    /// A short human-readable reason; never the whole instance.
    pub message: String,
}

/// Validates resources against the official R4 definitions. Compile once and share (it is
/// `Send + Sync`); each call is independent.
pub struct Validator {
    schema: schema::Schema,
    elements: Arc<ElementTable>,
}

impl Validator {
    /// Compiles the official `fhir.schema.json` (unmodified) and keeps the element table.
    pub fn new(schema: &Value, elements: Arc<ElementTable>) -> Result<Validator, String> {
        Ok(Validator {
            schema: schema::Schema::new(schema)?,
            elements,
        })
    }

    /// All problems with `resource`, at most 100; empty means valid.
    pub fn validate(&self, resource: &Value) -> Vec<Problem> {
        let root = match self.resource_type(resource) {
            Ok(root) => root,
            Err(problem) => return vec![problem],
        };
        let mut problems = Vec::new();
        if !self.schema.is_valid(resource) {
            problems = self.schema.explain(resource, root, MAX_PROBLEMS + 1);
            if problems.is_empty() {
                // The rewritten schema should always explain a failure of the original; if
                // it ever does not, still refuse the resource rather than accept it.
                problems.push(Problem {
                    code: IssueType::Structure,
                    expression: root.to_string(),
                    message: "does not conform to the FHIR R4 JSON schema".to_string(),
                });
            }
        }
        let room = (MAX_PROBLEMS + 1).saturating_sub(problems.len());
        if room > 0 {
            problems.extend(required::check(&self.elements, resource, root, room));
        }
        // The schema and the element walk both report missing complex elements.
        let mut seen = HashSet::new();
        problems.retain(|p| seen.insert((p.code, p.expression.clone())));
        if problems.len() > MAX_PROBLEMS {
            problems.truncate(MAX_PROBLEMS - 1);
            problems.push(Problem {
                code: IssueType::Invalid,
                expression: String::new(),
                message: format!(
                    "more than {MAX_PROBLEMS} problems; only the first {} are reported",
                    MAX_PROBLEMS - 1
                ),
            });
        }
        problems
    }

    /// The `resourceType` of a top-level resource, or the one problem that stops validation:
    /// without a known type there is no definition to validate against.
    fn resource_type<'v>(&self, resource: &'v Value) -> Result<&'v str, Problem> {
        let structure = |expression: &str, message: String| Problem {
            code: IssueType::Structure,
            expression: expression.to_string(),
            message,
        };
        let Some(obj) = resource.as_object() else {
            return Err(structure(
                "",
                "a resource must be a JSON object".to_string(),
            ));
        };
        match obj.get("resourceType") {
            None => Err(structure("", "missing resourceType".to_string())),
            Some(Value::String(t)) if self.elements.is_resource(t) => Ok(t.as_str()),
            Some(raw @ Value::String(t)) => {
                // Echo the type as the expression only when it looks like a type name, so a
                // hostile value is never copied into the outcome at length.
                let plausible =
                    (1..=64).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric());
                let expression = if plausible { t.as_str() } else { "" };
                Err(structure(
                    expression,
                    format!("unknown resourceType {}", preview(raw)),
                ))
            }
            Some(_) => Err(structure("", "resourceType must be a string".to_string())),
        }
    }
}

/// One step of a JSON location.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PathPart<'a> {
    Key(&'a str),
    Index(usize),
}

/// Renders a JSON location as FHIRPath: `Patient` + `name`, `0`, `given` becomes
/// `Patient.name[0].given`. A `_key` twin that is passed through (`_status/extension/0`) is
/// written as its element (`status.extension[0]`), since FHIRPath sees the extension on the
/// primitive; as the last step it stays literal so an unknown `_foo` is named as written.
pub(crate) fn fhirpath(root: &str, parts: &[PathPart<'_>]) -> String {
    let mut out = String::from(root);
    let last = parts.len().saturating_sub(1);
    for (i, part) in parts.iter().enumerate() {
        match part {
            PathPart::Key(key) => {
                let key = if i < last {
                    key.strip_prefix('_').unwrap_or(key)
                } else {
                    key
                };
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            PathPart::Index(n) => {
                out.push('[');
                out.push_str(&n.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// A value as it may appear in a message: short strings quoted, long ones cut at 40
/// characters, containers only described, so no message ever carries the whole instance.
pub(crate) fn preview(v: &Value) -> String {
    match v {
        Value::String(s) => match s.char_indices().nth(40) {
            Some((cut, _)) => format!("'{}...' ({} characters)", &s[..cut], s.chars().count()),
            None => format!("'{s}'"),
        },
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::Object(_) => "an object".to_string(),
        other => other.to_string(),
    }
}
