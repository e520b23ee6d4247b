//! FHIR R4 JSON Schema (json.html#schema, `fhir.schema.json`): structural validation with precise, cheap error reports.
//!
//! Two validators are compiled from the one official schema:
//! - `fast`, the unmodified schema (draft 6). The `jsonschema` crate dispatches its root
//!   `oneOf` on `resourceType`, so `is_valid` costs a few microseconds per resource.
//! - `explain`, used only once `fast` has said no. Reporting errors through the root `oneOf`
//!   (and through `ResourceList`, which `contained` and `Bundle.entry.resource` use) yields one
//!   error with the failures of all 146 branches inside and costs up to a second for a
//!   bundle: a denial-of-service vector. Here both are rewritten as
//!   `allOf: [{if: {resourceType = T}, then: {$ref: T}}, ...]`, so only the matching
//!   definition reports, with exact instance paths, in milliseconds.

use std::collections::HashSet;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::LocationSegment;
use serde_json::{Value, json};

use super::{IssueType, PathPart, Problem, fhirpath, preview};

pub(crate) struct Schema {
    fast: jsonschema::Validator,
    explain: jsonschema::Validator,
}

impl Schema {
    pub(crate) fn new(schema: &Value) -> Result<Schema, String> {
        let fast = jsonschema::draft6::new(schema).map_err(|e| format!("fhir.schema.json: {e}"))?;
        let rewritten = dispatch_on_resource_type(schema)?;
        let explain = jsonschema::draft7::new(&rewritten)
            .map_err(|e| format!("fhir.schema.json (rewritten): {e}"))?;
        Ok(Schema { fast, explain })
    }

    pub(crate) fn is_valid(&self, resource: &Value) -> bool {
        self.fast.is_valid(resource)
    }

    /// The schema's complaints about `resource` (root type `root`), at most `limit`.
    pub(crate) fn explain(&self, resource: &Value, root: &str, limit: usize) -> Vec<Problem> {
        // A wrong JSON type at a path makes the same value fail its string pattern too
        // (booleans have both `type` and `pattern`); the type error says it better.
        let mut type_errors: HashSet<String> = HashSet::new();
        let mut out: Vec<Problem> = Vec::new();
        for error in self.explain.iter_errors(resource) {
            if out.len() >= limit {
                break;
            }
            let segments: Vec<LocationSegment<'_>> = error.instance_path().segments().collect();
            let parts: Vec<PathPart<'_>> = segments
                .iter()
                .map(|s| match s {
                    LocationSegment::Property(p) => PathPart::Key(p.as_ref()),
                    LocationSegment::Index(i) => PathPart::Index(*i),
                })
                .collect();
            let expression = fhirpath(root, &parts);
            let at_resource_type = matches!(
                segments.last(),
                Some(LocationSegment::Property(p)) if p.as_ref() == "resourceType"
            );
            let instance: &Value = error.instance();
            match error.kind() {
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for key in unexpected {
                        if out.len() >= limit {
                            break;
                        }
                        let mut with_key = parts.clone();
                        with_key.push(PathPart::Key(key));
                        out.push(Problem {
                            code: IssueType::Structure,
                            expression: fhirpath(root, &with_key),
                            message: format!("unknown element {}", preview(&json!(key))),
                        });
                    }
                }
                ValidationErrorKind::Type { kind } => {
                    let message = format!(
                        "expected {}, found {}",
                        expected_types(kind),
                        json_type(instance)
                    );
                    if type_errors.contains(&expression) {
                        continue;
                    }
                    // Replace an earlier pattern error at the same path, if any.
                    out.retain(|p| !(p.expression == expression && p.code == IssueType::Value));
                    type_errors.insert(expression.clone());
                    out.push(Problem {
                        code: IssueType::Structure,
                        expression,
                        message,
                    });
                }
                _ if type_errors.contains(&expression) => {}
                ValidationErrorKind::Required { property } => {
                    let name = property.as_str().unwrap_or("?");
                    if name == "resourceType" {
                        // Only nested resources get here; the top level is checked first.
                        out.push(Problem {
                            code: IssueType::Structure,
                            expression,
                            message: "missing resourceType".to_string(),
                        });
                    } else {
                        // The schema requires complex elements with min >= 1; the element walk
                        // finds the same ones, and the caller drops the duplicate.
                        let mut with_key = parts.clone();
                        with_key.push(PathPart::Key(name));
                        out.push(Problem {
                            code: IssueType::Required,
                            expression: fhirpath(root, &with_key),
                            message: format!("missing required element '{}'", short(name)),
                        });
                    }
                }
                ValidationErrorKind::Enum { .. } if at_resource_type => {
                    out.push(Problem {
                        code: IssueType::Structure,
                        expression,
                        message: format!("unknown resourceType {}", preview(instance)),
                    });
                }
                ValidationErrorKind::Enum { options } => out.push(Problem {
                    code: IssueType::Value,
                    expression,
                    message: format!(
                        "{} is not one of {}",
                        preview(instance),
                        list_options(options)
                    ),
                }),
                ValidationErrorKind::Constant { expected_value } => out.push(Problem {
                    code: IssueType::Structure,
                    expression,
                    message: format!("expected {}", preview(expected_value)),
                }),
                ValidationErrorKind::Pattern { pattern } => out.push(Problem {
                    code: IssueType::Value,
                    expression,
                    message: format!(
                        "{} does not match the pattern {}",
                        preview(instance),
                        short(pattern)
                    ),
                }),
                ValidationErrorKind::MinLength { .. }
                | ValidationErrorKind::MaxLength { .. }
                | ValidationErrorKind::Minimum { .. }
                | ValidationErrorKind::Maximum { .. }
                | ValidationErrorKind::ExclusiveMinimum { .. }
                | ValidationErrorKind::ExclusiveMaximum { .. }
                | ValidationErrorKind::MultipleOf { .. }
                | ValidationErrorKind::Format { .. } => out.push(Problem {
                    code: IssueType::Value,
                    expression,
                    message: format!(
                        "{} violates '{}'",
                        preview(instance),
                        error.kind().keyword()
                    ),
                }),
                ValidationErrorKind::MinItems { .. }
                | ValidationErrorKind::MaxItems { .. }
                | ValidationErrorKind::AdditionalItems { .. }
                | ValidationErrorKind::FalseSchema => out.push(Problem {
                    code: IssueType::Structure,
                    expression,
                    message: format!("violates '{}'", error.kind().keyword()),
                }),
                other => out.push(Problem {
                    code: IssueType::Invalid,
                    expression,
                    message: format!("violates '{}'", other.keyword()),
                }),
            }
        }
        out
    }
}

/// Rewrites the root `oneOf` and `definitions/ResourceList` into an `allOf` of `if/then`
/// dispatches on `resourceType` (see the module comment for why).
fn dispatch_on_resource_type(schema: &Value) -> Result<Value, String> {
    let branches = schema
        .get("oneOf")
        .and_then(Value::as_array)
        .ok_or("fhir.schema.json: no root oneOf")?;
    let mut names = Vec::with_capacity(branches.len());
    for branch in branches {
        let name = branch
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/definitions/"))
            .ok_or("fhir.schema.json: root oneOf branch is not a $ref to a definition")?;
        names.push(name.to_string());
    }
    let all_of: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({
                "if": {"properties": {"resourceType": {"const": name}}, "required": ["resourceType"]},
                "then": {"$ref": format!("#/definitions/{name}")}
            })
        })
        .collect();
    let dispatcher = json!({
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"enum": names}},
        "allOf": all_of
    });
    let mut out = schema.clone();
    let root = out
        .as_object_mut()
        .ok_or("fhir.schema.json: root is not an object")?;
    root.remove("oneOf");
    root.remove("discriminator");
    root.insert(
        "$schema".to_string(),
        json!("http://json-schema.org/draft-07/schema#"),
    );
    if let Value::Object(d) = &dispatcher {
        for (k, v) in d {
            root.insert(k.clone(), v.clone());
        }
    }
    let definitions = root
        .get_mut("definitions")
        .and_then(Value::as_object_mut)
        .ok_or("fhir.schema.json: no definitions")?;
    definitions.insert("ResourceList".to_string(), dispatcher);
    Ok(out)
}

fn expected_types(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(set) => set
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// At most eight allowed codes: some bindings list dozens, and the message must stay short.
fn list_options(options: &Value) -> String {
    let Some(items) = options.as_array() else {
        return "the allowed values".to_string();
    };
    let mut shown: Vec<String> = items
        .iter()
        .take(8)
        .map(|v| v.as_str().map_or_else(|| v.to_string(), short))
        .collect();
    if items.len() > 8 {
        shown.push(format!("... ({} in all)", items.len()));
    }
    shown.join(", ")
}

/// Patterns and names are ours or the schema's, but keep messages bounded all the same.
fn short(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}
