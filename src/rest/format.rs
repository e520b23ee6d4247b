//! Content negotiation and result shaping (FHIR R4 http.html#mime-type, #general-parameters;
//! search.html#summary, #elements). JSON only: XML is answered with 406/415.

use axum::http::HeaderMap;
use serde_json::Value;

use crate::error::{ErrorKind, FhirError};
use crate::interaction::SharedCtx;

pub use crate::interaction::subset::Summary;

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
        crate::interaction::subset::subset(
            &ctx.defs.elements,
            v,
            self.summary,
            self.elements.as_deref(),
        )
    }
}
