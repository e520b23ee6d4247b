//! Builds response Bundles (FHIR R4 bundle.html) as JSON text, embedding stored resources
//! without parsing them again: paging through large results costs a string copy per
//! resource, not a parse and a serialisation.

use serde_json::Value;

/// A Bundle under construction.
pub struct BundleText {
    out: String,
    entries: usize,
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; a String never fails to serialise.
    out.push_str(&Value::String(s.to_string()).to_string());
}

impl BundleText {
    pub fn new(bundle_type: &str, total: Option<i64>, links: &[(&str, String)]) -> Self {
        let mut out = String::with_capacity(4096);
        out.push_str("{\"resourceType\":\"Bundle\",\"id\":");
        push_json_str(&mut out, &uuid::Uuid::new_v4().to_string());
        out.push_str(",\"meta\":{\"lastUpdated\":");
        push_json_str(
            &mut out,
            &crate::time::format_instant(crate::time::now_micros()),
        );
        out.push_str("},\"type\":");
        push_json_str(&mut out, bundle_type);
        if let Some(t) = total {
            out.push_str(",\"total\":");
            out.push_str(&t.to_string());
        }
        if !links.is_empty() {
            out.push_str(",\"link\":[");
            for (i, (rel, url)) in links.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"relation\":");
                push_json_str(&mut out, rel);
                out.push_str(",\"url\":");
                push_json_str(&mut out, url);
                out.push('}');
            }
            out.push(']');
        }
        out.push_str(",\"entry\":[");
        BundleText { out, entries: 0 }
    }

    /// Adds an entry. `resource` is stored JSON text (trusted: written by this server) and
    /// `rest` holds the other entry fields (`search`, `request`, `response`).
    pub fn entry(
        &mut self,
        full_url: Option<&str>,
        resource: Option<&str>,
        rest: &[(&str, Value)],
    ) {
        if self.entries > 0 {
            self.out.push(',');
        }
        self.entries += 1;
        self.out.push('{');
        let mut first = true;
        let mut sep = |out: &mut String| {
            if !first {
                out.push(',');
            }
            first = false;
        };
        if let Some(u) = full_url {
            sep(&mut self.out);
            self.out.push_str("\"fullUrl\":");
            push_json_str(&mut self.out, u);
        }
        if let Some(r) = resource {
            sep(&mut self.out);
            self.out.push_str("\"resource\":");
            self.out.push_str(r);
        }
        for (k, v) in rest {
            sep(&mut self.out);
            push_json_str(&mut self.out, k);
            self.out.push(':');
            self.out.push_str(&v.to_string());
        }
        self.out.push('}');
    }

    pub fn finish(mut self) -> String {
        if self.entries == 0 {
            // An empty `entry` array is not valid FHIR: drop it.
            if let Some(pos) = self.out.rfind(",\"entry\":[") {
                self.out.truncate(pos);
            }
            self.out.push('}');
        } else {
            self.out.push_str("]}");
        }
        self.out
    }
}

/// Builds `[base]/[path]?[query]` from decoded parameters.
pub fn url_with_query(base: &str, path: &str, params: &[(String, String)]) -> String {
    let mut url = format!("{base}/{path}");
    if !params.is_empty() {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in params {
            s.append_pair(k, v);
        }
        url.push('?');
        url.push_str(&s.finish());
    }
    url.trim_end_matches('/').to_string()
}
