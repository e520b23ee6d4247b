//! Transaction Bundle entries (FHIR R4 bundle.html#transaction, http.html#cond-update,
//! http.html#ccreate) with deterministic `urn:uuid:` fullUrls.
//!
//! Every entry is addressed by a search on a business identifier, so delivering the same
//! message twice resolves to the same resources; the fullUrl is derived from that same
//! search, so the same message always yields the same Bundle, byte for byte.

use serde_json::{Value, json};

/// How an entry is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// `PUT Type?query`: this message is authoritative for the resource.
    Update,
    /// `POST Type` with `ifNoneExist: query`: create once, never overwrite what an
    /// authoritative feed (e.g. ADT for Patient) wrote.
    CreateIfNoneExist,
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub full_url: String,
    pub resource_type: &'static str,
    pub query: String,
    pub method: Method,
    pub resource: Value,
}

impl Entry {
    pub fn new(
        resource_type: &'static str,
        query: String,
        method: Method,
        resource: Value,
    ) -> Entry {
        Entry {
            full_url: uuid_urn(&format!("{resource_type}?{query}")),
            resource_type,
            query,
            method,
            resource,
        }
    }

    /// The Bundle entry. Built from owned values: `json!` with a `Value` inside serialises
    /// it into a fresh copy (a third of the mapping's time, measured).
    pub fn into_json(self) -> Value {
        let request = match self.method {
            Method::Update => json!({
                "method": "PUT",
                "url": format!("{}?{}", self.resource_type, self.query),
            }),
            Method::CreateIfNoneExist => json!({
                "method": "POST",
                "url": self.resource_type,
                "ifNoneExist": self.query,
            }),
        };
        let mut entry = serde_json::Map::new();
        entry.insert("fullUrl".into(), Value::String(self.full_url));
        entry.insert("resource".into(), self.resource);
        entry.insert("request".into(), request);
        Value::Object(entry)
    }
}

/// `param=system|value` as a URL query: the token's own `\ | , $` are escaped as the search
/// spec requires (search.html#escaping), then everything outside the unreserved set (and
/// `:` `/`) is percent-encoded so that form decoding gives back exactly the token.
pub(crate) fn token_query(param: &str, system: &str, value: &str) -> String {
    format!(
        "{param}={}|{}",
        encode(&crate::search::query::escape(system)),
        encode(&crate::search::query::escape(value))
    )
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// FNV-1a over `bytes`, starting from `basis`.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The splitmix64 finalizer: FNV alone mixes its last bytes poorly, and keys differ mostly at
/// the end (`...|1.1.1.5` vs `...|1.1.1.6`).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A UUID-shaped name for `key`: 128 bits from two FNV-1a lanes, marked as a version 8
/// (custom) RFC 9562 UUID. Not random and not secret: only stable and unlikely to collide.
pub(crate) fn uuid_urn(key: &str) -> String {
    let a = mix(fnv1a(key.as_bytes(), 0xcbf2_9ce4_8422_2325));
    let b = mix(fnv1a(key.as_bytes(), 0x8422_2325_cbf2_9ce4 ^ a));
    format!("urn:uuid:{}", uuid_text(a, b))
}

/// Like [`uuid_urn`] (stable for `key`, version 8), but the first 48 bits are `millis`
/// (Unix time in milliseconds) as in a version 7 UUID, so names made for nearby times sort
/// together: the ids of readings that arrive in time order land at the end of the B-tree
/// indexes on id instead of on a random page each. Plain text, no `urn:uuid:`.
pub(crate) fn uuid_time_ordered(key: &str, millis: u64) -> String {
    let a = mix(fnv1a(key.as_bytes(), 0xcbf2_9ce4_8422_2325));
    let b = mix(fnv1a(key.as_bytes(), 0x8422_2325_cbf2_9ce4 ^ a));
    uuid_text((millis << 16) | (a & 0xffff), b)
}

/// The text of a 128-bit UUID from two halves, marked as RFC 9562 version 8.
fn uuid_text(a: u64, b: u64) -> String {
    let a = (a & !0xf000) | 0x8000; // version 8 in bits 48..52
    let b = (b & !(0xc << 60)) | (0x8 << 60); // RFC 9562 variant 10xx
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_and_well_formed() {
        let u = uuid_urn("Patient?identifier=a|b");
        assert_eq!(u, uuid_urn("Patient?identifier=a|b"));
        assert_ne!(u, uuid_urn("Patient?identifier=a|c"));
        let hex = u.trim_start_matches("urn:uuid:");
        assert_eq!(hex.len(), 36);
        assert_eq!(hex.as_bytes()[14], b'8');
        assert!(matches!(hex.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
    }

    #[test]
    fn time_ordered_uuids_sort_by_time() {
        let at = |key: &str, ms: u64| uuid_time_ordered(key, ms);
        assert_eq!(at("a", 1_700_000_000_000), at("a", 1_700_000_000_000));
        assert_ne!(at("a", 1_700_000_000_000), at("b", 1_700_000_000_000));
        assert_ne!(at("a", 1_700_000_000_000), at("a", 1_700_000_000_001));
        // Later times sort after, whatever the keys.
        assert!(at("zzz", 1_700_000_000_000) < at("a", 1_700_000_000_001));
        let u = at("a", 1_700_000_000_000);
        assert_eq!(u.len(), 36);
        assert!(u.starts_with("018bcfe5-6800-8"), "{u}");
        assert!(matches!(u.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
    }

    #[test]
    fn token_queries_escape() {
        assert_eq!(
            token_query("identifier", "urn:hl7v2:obx", "Philips|20 1,$\\+"),
            "identifier=urn:hl7v2:obx|Philips%5C%7C20%201%5C%2C%5C%24%5C%5C%2B"
        );
    }
}
