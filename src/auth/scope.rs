//! SMART scopes (SMART App Launch 2.0 scopes-and-launch-context.html), v1 and v2 grammar:
//! `patient|user|system` `/` a resource type or `*` `.` permissions, where v2 permissions are
//! an ordered subset of `cruds` and v1's are `read` (= `rs`), `write` (= `cud`) or `*`; a v2
//! scope may end in `?param=value&...`, which restricts it to resources matching that search.
//! Pure code: parsing, printing and the "is this request covered by what the client may ask
//! for" test.

use std::fmt;

/// Whose data a resource scope is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    /// The patient in the launch context, and that patient's compartment.
    Patient,
    /// What the signed-in user may see.
    User,
    /// A backend client acting for itself.
    System,
}

impl Context {
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// A set of the five v2 permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Perms(u8);

impl Perms {
    pub const C: Perms = Perms(1);
    pub const R: Perms = Perms(2);
    pub const U: Perms = Perms(4);
    pub const D: Perms = Perms(8);
    pub const S: Perms = Perms(16);
    pub const ALL: Perms = Perms(31);
    const LETTERS: [(char, Perms); 5] = [
        ('c', Perms::C),
        ('r', Perms::R),
        ('u', Perms::U),
        ('d', Perms::D),
        ('s', Perms::S),
    ];

    pub fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Every permission of `other` is in `self`.
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// Some permission of `other` is in `self`.
    pub fn intersects(self, other: Perms) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// v2 letters (each at most once, in the order `cruds`) or v1 `read` / `write` / `*`.
    fn parse(s: &str) -> Option<Perms> {
        match s {
            "read" => return Some(Perms::R.union(Perms::S)),
            "write" => return Some(Perms::C.union(Perms::U).union(Perms::D)),
            "*" => return Some(Perms::ALL),
            "" => return None,
            _ => {}
        }
        let mut out = Perms::default();
        let mut next = 0;
        for ch in s.chars() {
            let at = Perms::LETTERS[next..].iter().position(|(c, _)| *c == ch)?;
            out = out.union(Perms::LETTERS[next + at].1);
            next += at + 1;
        }
        Some(out)
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (c, p) in Perms::LETTERS {
            if self.contains(p) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// A scope that grants access to resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    pub perms: Perms,
    /// v2 restriction (`?category=vital-signs`): search parameters a resource must match.
    pub params: Vec<(String, String)>,
    /// The scope as the client wrote it.
    pub text: String,
}

impl ResourceScope {
    pub fn covers_type(&self, ty: &str) -> bool {
        self.resource_type.as_deref().is_none_or(|t| t == ty)
    }

    /// Whether a client allowed `self` may be granted `asked` (same context, same or wider
    /// type, at least its permissions, and every restriction of `self` also in `asked`).
    pub fn allows(&self, asked: &ResourceScope) -> bool {
        self.context == asked.context
            && match (&self.resource_type, &asked.resource_type) {
                (None, _) => true,
                (Some(a), Some(b)) => a == b,
                (Some(_), None) => false,
            }
            && self.perms.contains(asked.perms)
            && self.params.iter().all(|p| asked.params.contains(p))
    }
}

/// One scope of a scope string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Resource(ResourceScope),
    /// `openid`, `fhirUser`, `launch`, `launch/patient`, `offline_access`, ...
    Other(String),
}

impl Scope {
    pub fn text(&self) -> &str {
        match self {
            Scope::Resource(r) => &r.text,
            Scope::Other(s) => s,
        }
    }
}

/// Scopes that are not about resources and that this server knows.
pub const KNOWN_OTHER: &[&str] = &[
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
];

/// Parses one scope. Unknown non-resource scopes are errors, so a typo is reported rather
/// than silently granting nothing.
pub fn parse(text: &str) -> Result<Scope, String> {
    if KNOWN_OTHER.contains(&text) {
        return Ok(Scope::Other(text.to_string()));
    }
    let Some((context, rest)) = text.split_once('/') else {
        return Err(format!("{text:?} is not a SMART scope"));
    };
    let context = match context {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => {
            return Err(format!(
                "{text:?}: the context must be patient, user or system"
            ));
        }
    };
    let (body, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let Some((ty, perms)) = body.split_once('.') else {
        return Err(format!("{text:?}: expected <resource type>.<permissions>"));
    };
    let perms = Perms::parse(perms).ok_or_else(|| {
        format!("{text:?}: permissions must be read, write, * or letters of cruds in that order")
    })?;
    let resource_type = match ty {
        "*" => None,
        t if !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphabetic()) => Some(t.to_string()),
        _ => return Err(format!("{text:?}: {ty:?} is not a resource type")),
    };
    let mut params = Vec::new();
    if let Some(q) = query {
        let is_v1 = matches!(perms_text(body), "read" | "write" | "*");
        if is_v1 {
            return Err(format!(
                "{text:?}: only v2 scopes (cruds) take ?param=value restrictions"
            ));
        }
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k.is_empty() || v.is_empty() {
                return Err(format!("{text:?}: restriction {k}={v} is empty"));
            }
            params.push((k.into_owned(), v.into_owned()));
        }
        if params.is_empty() {
            return Err(format!("{text:?}: empty restriction after ?"));
        }
    }
    Ok(Scope::Resource(ResourceScope {
        context,
        resource_type,
        perms,
        params,
        text: text.to_string(),
    }))
}

fn perms_text(body: &str) -> &str {
    body.split_once('.').map_or("", |(_, p)| p)
}

/// Parses a space-separated scope string (RFC 6749 section 3.3).
pub fn parse_list(text: &str) -> Result<Vec<Scope>, String> {
    let mut out: Vec<Scope> = Vec::new();
    for s in text.split(' ').filter(|s| !s.is_empty()) {
        let scope = parse(s)?;
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(out)
}

/// The scopes of `asked` that `allowed` covers, in the order asked; a non-resource scope
/// is granted when it is allowed by name.
pub fn narrow(allowed: &[Scope], asked: &[Scope]) -> Vec<Scope> {
    asked
        .iter()
        .filter(|a| match a {
            Scope::Other(name) => allowed.iter().any(|s| s.text() == name),
            Scope::Resource(r) => allowed.iter().any(|s| match s {
                Scope::Resource(al) => al.allows(r),
                Scope::Other(_) => false,
            }),
        })
        .cloned()
        .collect()
}

/// Space-separated text of scopes.
pub fn to_text(scopes: &[Scope]) -> String {
    scopes.iter().map(Scope::text).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(s: &str) -> ResourceScope {
        match parse(s) {
            Ok(Scope::Resource(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn v2_permissions_are_an_ordered_subset_of_cruds() {
        assert_eq!(
            res("patient/Observation.rs").perms,
            Perms::R.union(Perms::S)
        );
        assert_eq!(res("system/*.cruds").perms, Perms::ALL);
        assert_eq!(res("user/Patient.cud").perms.to_string(), "cud");
        for bad in [
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.x",
            "patient/Observation.",
            "patient/Observation",
            "nurse/Observation.rs",
            "patient/Obs-ervation.rs",
            "patient/.rs",
            "banana",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn v1_scopes_map_to_v2_permissions() {
        assert_eq!(res("patient/*.read").perms.to_string(), "rs");
        assert_eq!(res("user/Observation.write").perms.to_string(), "cud");
        assert_eq!(res("system/*.*").perms, Perms::ALL);
        assert!(parse("patient/Observation.read?category=x").is_err());
    }

    #[test]
    fn v2_restrictions_are_search_parameters() {
        let s = res(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
        );
        assert_eq!(
            s.params,
            vec![(
                "category".to_string(),
                "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"
                    .to_string()
            )]
        );
        assert!(parse("patient/Observation.rs?").is_err());
        assert!(parse("patient/Observation.rs?category=").is_err());
    }

    #[test]
    fn other_scopes_are_known_by_name() {
        assert_eq!(parse("openid"), Ok(Scope::Other("openid".into())));
        assert_eq!(
            parse("launch/patient"),
            Ok(Scope::Other("launch/patient".into()))
        );
        assert!(parse("launch/banana").is_err());
    }

    #[test]
    fn narrowing_never_widens() {
        let allowed = parse_list("system/Observation.rs system/Patient.r").unwrap_or_default();
        let asked =
            parse_list("system/Observation.rs?category=vital-signs system/Patient.rs system/*.rs")
                .unwrap_or_default();
        let granted = narrow(&allowed, &asked);
        assert_eq!(
            to_text(&granted),
            "system/Observation.rs?category=vital-signs"
        );
        let restricted =
            parse_list("system/Observation.rs?category=laboratory").unwrap_or_default();
        let asked =
            parse_list("system/Observation.rs system/Observation.rs?category=laboratory&code=x")
                .unwrap_or_default();
        assert_eq!(
            to_text(&narrow(&restricted, &asked)),
            "system/Observation.rs?category=laboratory&code=x"
        );
        let wildcard = parse_list("system/*.cruds").unwrap_or_default();
        let asked = parse_list("user/Observation.rs system/Device.r").unwrap_or_default();
        assert_eq!(to_text(&narrow(&wildcard, &asked)), "system/Device.r");
    }
}
