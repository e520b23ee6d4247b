//! FHIR R4 cardinality (conformance-rules.html#cardinality, ElementDefinition `min`) and literal references (references.html): a typed walk over a resource instance.
//!
//! The JSON schema cannot require primitive elements, because R4 JSON may carry a primitive
//! only as its `_key` extension twin (R4 json.html#primitive), so `min >= 1` is checked here from the
//! StructureDefinitions. The same walk knows the type of every object it visits, so it also
//! checks `reference` strings exactly where they are `Reference.reference`: other elements
//! named `reference` (`Expression.reference`, `DetectedIssue.reference`, ...) are `uri`s with
//! other rules, which a plain "any key named reference" scan would wrongly hold to this grammar.

use serde_json::{Map, Value};

use super::elements::{Child, ElementTable, Next};
use super::{IssueType, PathPart, Problem, fhirpath, preview, reference};

/// Deeper nesting than this is not walked: no FHIR resource is this deep, `serde_json` refuses
/// to parse deeper documents, and stopping keeps the recursion far from the stack limit.
const MAX_DEPTH: usize = 120;

/// Objects visited per resource before giving up: far beyond any resource the server accepts
/// (the 2.7 MB core ImplementationGuide example has about 40,000), but it bounds the work.
const MAX_OBJECTS: usize = 2_000_000;

/// Official R4 examples that break a `min >= 1` rule, as (resourceType, id, element path).
/// They are exempted by name so that the published examples load, without weakening the
/// rule for anything else:
/// - `ImplementationGuide/fhir` (the core specification's own package manifest) has no
///   `name` and no `status`;
/// - `Questionnaire/qs1` (generated from the resource list) has `display` items without
///   `linkId` at every nesting level (`Questionnaire.item.item` repeats `Questionnaire.item`).
const KNOWN_EXAMPLE_GAPS: &[(&str, &str, &str)] = &[
    ("ImplementationGuide", "fhir", "ImplementationGuide.name"),
    ("ImplementationGuide", "fhir", "ImplementationGuide.status"),
    ("Questionnaire", "qs1", "Questionnaire.item.linkId"),
];

/// Walks `resource` (whose `resourceType` is `root`) and returns at most `limit` problems.
pub(crate) fn check(
    table: &ElementTable,
    resource: &Value,
    root: &str,
    limit: usize,
) -> Vec<Problem> {
    let mut walker = Walker {
        table,
        root,
        path: Vec::new(),
        current: ("", ""),
        out: Vec::new(),
        limit,
        budget: MAX_OBJECTS,
    };
    walker.resource(resource, 0);
    walker.out
}

struct Walker<'a> {
    table: &'a ElementTable,
    root: &'a str,
    /// The JSON location of the value being visited, rendered only when a problem is found.
    path: Vec<PathPart<'a>>,
    /// `(resourceType, id)` of the innermost resource being walked, for the exemptions.
    current: (&'a str, &'a str),
    out: Vec<Problem>,
    limit: usize,
    budget: usize,
}

impl<'a> Walker<'a> {
    fn full(&self) -> bool {
        self.out.len() >= self.limit || self.budget == 0
    }

    fn push(&mut self, code: IssueType, last: Option<&str>, message: String) {
        if self.out.len() >= self.limit {
            return;
        }
        let mut parts = self.path.clone();
        if let Some(last) = last {
            parts.push(PathPart::Key(last));
        }
        self.out.push(Problem {
            code,
            expression: fhirpath(self.root, &parts),
            message,
        });
    }

    fn exempt(&self, element_path: &str, child: &Child) -> bool {
        let (rt, id) = self.current;
        KNOWN_EXAMPLE_GAPS.iter().any(|&(t, i, path)| {
            t == rt
                && i == id
                && path
                    .strip_prefix(element_path)
                    .and_then(|rest| rest.strip_prefix('.'))
                    == Some(child.name.as_str())
        })
    }

    fn resource(&mut self, value: &'a Value, depth: usize) {
        let Some(obj) = value.as_object() else {
            return;
        };
        // A missing or unknown nested resourceType is reported by the JSON schema; without a
        // type there is no definition to walk with.
        let Some(rt) = obj.get("resourceType").and_then(Value::as_str) else {
            return;
        };
        if self.table.is_resource(rt) {
            let id = obj.get("id").and_then(Value::as_str).unwrap_or("");
            let outer = std::mem::replace(&mut self.current, (rt, id));
            self.object(obj, rt, depth);
            self.current = outer;
        }
    }

    fn object(&mut self, obj: &'a Map<String, Value>, element_path: &str, depth: usize) {
        if self.full() || depth > MAX_DEPTH {
            return;
        }
        self.budget -= 1;
        if self.budget == 0 {
            self.push(
                IssueType::NotSupported,
                None,
                "resource too large to validate".to_string(),
            );
            return;
        }
        let table = self.table;
        let Some(node) = table.node(element_path) else {
            return;
        };
        for child in &node.children {
            if child.min >= 1 && !present(obj, child) && !self.exempt(element_path, child) {
                let message = format!("missing required element '{}'", display_name(child));
                self.push(IssueType::Required, Some(&child.name), message);
            }
        }
        if element_path == "Reference"
            && let Some(raw @ Value::String(s)) = obj.get("reference")
            && let Err(why) = reference::check(s, table)
        {
            let message = format!("invalid reference {}: {why}", preview(raw));
            self.push(IssueType::Value, Some("reference"), message);
        }
        for (key, value) in obj {
            let Some(next) = node.key(key) else {
                continue;
            };
            if matches!(next, Next::Leaf | Next::Skip) {
                continue;
            }
            self.path.push(PathPart::Key(key));
            match value {
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.path.push(PathPart::Index(i));
                        self.dispatch(item, next, depth + 1);
                        self.path.pop();
                    }
                }
                other => self.dispatch(other, next, depth + 1),
            }
            self.path.pop();
            if self.full() {
                return;
            }
        }
    }

    fn dispatch(&mut self, value: &'a Value, next: &'a Next, depth: usize) {
        match next {
            Next::Object(path) => {
                if let Some(obj) = value.as_object() {
                    self.object(obj, path, depth);
                }
            }
            Next::Resource => self.resource(value, depth),
            Next::PrimitiveExtension => {
                // `_status` is an Element: only its extensions can hold required elements.
                let Some(Value::Array(extensions)) = value.get("extension") else {
                    return;
                };
                self.path.push(PathPart::Key("extension"));
                for (i, ext) in extensions.iter().enumerate() {
                    if let Some(obj) = ext.as_object() {
                        self.path.push(PathPart::Index(i));
                        self.object(obj, "Extension", depth + 1);
                        self.path.pop();
                    }
                }
                self.path.pop();
            }
            Next::Leaf | Next::Skip => {}
        }
    }
}

/// An element is present if any of its keys (including the `_key` twin, which may stand alone
/// for a primitive) has a value; `null` and `[]` carry nothing.
fn present(obj: &Map<String, Value>, child: &Child) -> bool {
    child.keys.iter().any(|k| match obj.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(_) => true,
    })
}

/// `value[x]` for choice elements, so the message names the element as the specification does.
fn display_name(child: &Child) -> String {
    if child.choice {
        format!("{}[x]", child.name)
    } else {
        child.name.clone()
    }
}
