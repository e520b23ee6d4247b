//! `_summary` and `_elements` (FHIR R4 search.html#summary, #elements): subsets of one
//! resource, marked SUBSETTED, used for reads and for the entries of search results.

use serde_json::{Map, Value, json};

use crate::validation::ElementTable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    True,
    Text,
    Data,
    False,
}

impl Summary {
    /// `_summary` values that subset a resource (`count` is handled by search itself).
    pub fn parse(v: &str) -> Option<Summary> {
        match v {
            "true" => Some(Summary::True),
            "text" => Some(Summary::Text),
            "data" => Some(Summary::Data),
            "false" => Some(Summary::False),
            _ => None,
        }
    }
}

/// Applies `_summary` / `_elements` to one resource and marks it SUBSETTED when anything
/// was left out.
pub fn subset(
    elements: &ElementTable,
    v: Value,
    summary: Option<Summary>,
    wanted: Option<&[String]>,
) -> Value {
    let Value::Object(obj) = v else { return v };
    let ty = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let keep: Option<Vec<String>> = match (summary, wanted) {
        (Some(Summary::True), _) => elements.top_level_summary_keys(&ty),
        (Some(Summary::Text), _) => {
            let mut k = elements.mandatory_top_level_keys(&ty).unwrap_or_default();
            k.push("text".into());
            Some(k)
        }
        (Some(Summary::Data), _) => Some(
            obj.keys()
                .filter(|k| k.as_str() != "text")
                .cloned()
                .collect(),
        ),
        (_, Some(list)) => {
            let mut k = elements.mandatory_top_level_keys(&ty).unwrap_or_default();
            for e in list {
                k.push(e.clone());
                k.push(format!("_{e}"));
            }
            Some(k)
        }
        _ => None,
    };
    let Some(keep) = keep else {
        return Value::Object(obj);
    };
    let mut out = Map::new();
    let mut dropped = false;
    for (k, val) in obj {
        if matches!(k.as_str(), "resourceType" | "id" | "meta") || keep.contains(&k) {
            out.insert(k, val);
        } else {
            dropped = true;
        }
    }
    if dropped {
        let meta = out.entry("meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Some(t) = tags.as_array_mut() {
                t.push(json!({
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "SUBSETTED",
                    "display": "subsetted"
                }));
            }
        }
    }
    Value::Object(out)
}
