//! Content negotiation and result shaping (FHIR R4 http.html#mime-type, #general-parameters;
//! search.html#summary, #elements). JSON only: XML is answered with 406/415.

use axum::http::HeaderMap;
use serde_json::{Map, Value, json};

use crate::error::{ErrorKind, FhirError};
use crate::interaction::SharedCtx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    True,
    Text,
    Data,
    False,
}

/// How to write the response body.
#[derive(Debug, Clone)]
pub struct Negotiation {
    pub content_type: &'static str,
    pub pretty: bool,
    pub summary: Option<Summary>,
    pub elements: Option<Vec<String>>,
}

impl Default for Negotiation {
    fn default() -> Self {
        Negotiation {
            content_type: FHIR_JSON,
            pretty: false,
            summary: None,
            elements: None,
        }
    }
}

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
const PLAIN_JSON: &str = "application/json; charset=utf-8";

fn not_acceptable(what: &str) -> FhirError {
    FhirError::new(
        ErrorKind::NotAcceptable,
        format!("{what} cannot be produced; this server speaks application/fhir+json"),
    )
}

impl Negotiation {
    pub fn from_request(
        headers: &HeaderMap,
        query: &[(String, String)],
    ) -> Result<Negotiation, FhirError> {
        let mut n = Negotiation::default();
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(f) = param("_format") {
            n.content_type = match f.split(';').next().unwrap_or("").trim() {
                "json" | "application/fhir+json" | "application/json+fhir" => FHIR_JSON,
                "application/json" => PLAIN_JSON,
                other => return Err(not_acceptable(&format!("_format={other}"))),
            };
        } else if let Some(accept) = headers.get("accept").and_then(|v| v.to_str().ok()) {
            let ranges: Vec<&str> = accept
                .split(',')
                .map(|r| r.split(';').next().unwrap_or("").trim())
                .filter(|r| !r.is_empty())
                .collect();
            if !ranges.is_empty() {
                let fhir = ranges.iter().any(|r| {
                    matches!(
                        *r,
                        "application/fhir+json" | "application/json+fhir" | "*/*" | "application/*"
                    )
                });
                let plain = ranges.contains(&"application/json");
                n.content_type = match (fhir, plain) {
                    (true, _) => FHIR_JSON,
                    (false, true) => PLAIN_JSON,
                    _ => return Err(not_acceptable(&format!("Accept: {accept}"))),
                };
            }
        }
        n.pretty = param("_pretty") == Some("true");
        n.summary = match param("_summary") {
            None | Some("count") => None,
            Some("true") => Some(Summary::True),
            Some("text") => Some(Summary::Text),
            Some("data") => Some(Summary::Data),
            Some("false") => Some(Summary::False),
            Some(other) => {
                return Err(FhirError::invalid(format!(
                    "_summary={other} is not one of true, text, data, count, false"
                )));
            }
        };
        n.elements = param("_elements").map(|e| {
            e.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        });
        Ok(n)
    }

    /// Whether the body must be parsed and rewritten rather than passed through.
    pub fn transforms(&self) -> bool {
        self.pretty
            || matches!(
                self.summary,
                Some(Summary::True | Summary::Text | Summary::Data)
            )
            || self.elements.is_some()
    }

    pub fn serialise(&self, ctx: &SharedCtx, mut v: Value, is_resource: bool) -> String {
        if is_resource {
            v = self.subset(ctx, v);
        }
        if self.pretty {
            serde_json::to_string_pretty(&v)
        } else {
            serde_json::to_string(&v)
        }
        .unwrap_or_default()
    }

    /// Applies `_summary` / `_elements` to one resource and marks it SUBSETTED.
    fn subset(&self, ctx: &SharedCtx, v: Value) -> Value {
        let Value::Object(obj) = v else { return v };
        let ty = obj
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let elements = &ctx.defs.elements;
        let keep: Option<Vec<String>> = match (&self.summary, &self.elements) {
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
}
