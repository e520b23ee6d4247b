//! What a token may do: the interaction-level check (403 before anything is read), the
//! request rewrite that keeps restricted searches exact (a patient scope becomes a compartment
//! search, a v2 `?param=value` restriction becomes a search parameter), and the per-resource
//! test every response passes through (`permits`), so that nothing outside the scopes leaves
//! the server even where a rewrite does not reach (`_include`, `_revinclude`, history).
//! Pure code over a [`Grant`]; the caller does the I/O.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use crate::auth::scope::{Context, Perms, ResourceScope};
use crate::error::{ErrorKind, FhirError, Result};
use crate::interaction::{Ctx, Interaction};
use crate::search::extract::{IndexValue, extract_param, fold};
use crate::search::registry::ParamType;
use crate::time::Micros;

/// What an access token grants, as the server stored it when issuing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub client_id: String,
    /// The resource scopes granted (the others, like `openid`, are in `scope_text` only).
    pub scopes: Vec<ResourceScope>,
    pub scope_text: String,
    /// Launch context.
    pub patient: Option<String>,
    pub encounter: Option<String>,
    /// `Practitioner/1`, `Patient/2`, ... of the signed-in user.
    pub fhir_user: Option<String>,
    pub issued_at: Micros,
    pub expires_at: Micros,
    /// Verdicts on stored versions already checked under this grant.
    pub verdicts: Verdicts,
    /// Which issued grant this is (see [`Origin`]).
    pub origin: Origin,
}

/// The identity of a grant as read from its token row: its copies (each request thread
/// keeps its own, see `Auth::authenticate`) share it, and the audit trail groups a token's
/// reads by it. Not part of what a grant says: two grants with equal content are equal.
#[derive(Debug, Clone, Copy)]
pub struct Origin(pub u64);

impl Origin {
    /// A new identity, unique in this process.
    pub fn new() -> Origin {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Origin(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Default for Origin {
    fn default() -> Self {
        Origin::new()
    }
}

impl PartialEq for Origin {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// What [`Grant::permits_stored`] decided per (resource, version, permissions). A stored
/// version never changes, and neither do the grant or (until a `$reindex` installs new
/// ones) the search parameters a restriction is evaluated with, so the verdict can be
/// reused: a restricted token reading the same resources again pays a map lookup instead of
/// a parse. Bounded: emptied when full or when the search parameters change.
#[derive(Default)]
pub struct Verdicts(Mutex<VerdictMap>);

#[derive(Default)]
struct VerdictMap {
    /// The generation of the search parameters the verdicts were made with
    /// (`Ctx::registry_generation`).
    generation: Option<u64>,
    /// By resource id, then type, version and permissions: a lookup borrows the id
    /// (nothing is formatted or allocated for a verdict already made).
    map: HashMap<String, Vec<Verdict>, foldhash::fast::RandomState>,
    /// Verdicts in `map`.
    len: usize,
}

struct Verdict {
    ty: String,
    version: i64,
    perms: Perms,
    ok: bool,
}

impl VerdictMap {
    /// Whether the verdicts were made with this generation of the search parameters.
    fn made_with(&self, generation: u64) -> bool {
        self.generation == Some(generation)
    }

    fn get(&self, ty: &str, id: &str, version: i64, perms: Perms) -> Option<bool> {
        self.map
            .get(id)?
            .iter()
            .find(|v| v.version == version && v.perms == perms && v.ty == ty)
            .map(|v| v.ok)
    }
}

/// Verdicts one grant keeps at most.
const VERDICTS: usize = 16_384;

impl Clone for Verdicts {
    /// A copy of a grant starts without verdicts.
    fn clone(&self) -> Self {
        Verdicts::default()
    }
}

impl PartialEq for Verdicts {
    /// Remembered verdicts do not make two grants differ.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Verdicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len);
        write!(f, "Verdicts({n})")
    }
}

/// The audit trail is for administrators: `patient/*` and `user/*` wildcards do not reach
/// it; a scope must name AuditEvent, or be a `system/*` scope.
const AUDIT: &str = "AuditEvent";

fn forbidden(what: impl Into<String>) -> FhirError {
    FhirError::new(ErrorKind::Forbidden, what)
}

impl Grant {
    /// The patient whose compartment a scope is limited to: the launch patient for
    /// `patient/` scopes, the user's own record for `user/` scopes of a patient user.
    fn compartment_of(&self, s: &ResourceScope) -> Option<&str> {
        match s.context {
            Context::Patient => self.patient.as_deref(),
            Context::User => self
                .fhir_user
                .as_deref()
                .and_then(|u| u.strip_prefix("Patient/")),
            Context::System => None,
        }
    }

    /// Scopes giving `perms` on `ty` (any one of them suffices). A `patient/` scope without a
    /// patient in context gives nothing.
    fn scopes_for<'a>(
        &'a self,
        ty: &'a str,
        perms: Perms,
    ) -> impl Iterator<Item = &'a ResourceScope> + 'a {
        self.scopes.iter().filter(move |s| {
            s.covers_type(ty)
                && (ty != AUDIT || s.resource_type.is_some() || s.context == Context::System)
                && s.perms.intersects(perms)
                && (s.context != Context::Patient || self.patient.is_some())
        })
    }

    /// Some scope gives one of `perms` on `ty`.
    pub fn may(&self, ty: &str, perms: Perms) -> bool {
        self.scopes_for(ty, perms).next().is_some()
    }

    /// Some scope gives one of `perms` on `ty` for every resource of that type.
    pub fn unrestricted(&self, ty: &str, perms: Perms) -> bool {
        self.scopes_for(ty, perms)
            .any(|s| s.params.is_empty() && self.compartment_of(s).is_none())
    }

    /// Reads of every type are unrestricted (a `system/*` read scope): responses need no
    /// per-resource check.
    pub fn reads_everything(&self) -> bool {
        self.scopes.iter().any(|s| {
            s.resource_type.is_none()
                && s.context == Context::System
                && s.perms.contains(Perms::R.union(Perms::S))
                && s.params.is_empty()
                && self.compartment_of(s).is_none()
        })
    }

    /// [`Grant::permits`] for a stored resource of type `ty` (its JSON text), parsing only
    /// the top-level elements the check reads where that can be told.
    pub fn permits_text(&self, ctx: &Ctx, ty: &str, perms: Perms, text: &str) -> bool {
        let registry = ctx.registry();
        let mut fields = vec![("resourceType", false), ("id", false)];
        let parsed = match self.fields_needed(ctx, &registry, ty, perms, &mut fields) {
            Some(()) => parse_fields(text, &fields),
            None => serde_json::from_str::<Value>(text).ok(),
        };
        parsed.is_some_and(|v| self.permits(ctx, perms, &v))
    }

    /// [`Grant::permits_text`] for version `version` of the stored resource `ty/id`,
    /// remembered (see [`Verdicts`]).
    pub fn permits_stored(
        &self,
        ctx: &Ctx,
        ty: &str,
        id: &str,
        version: i64,
        perms: Perms,
        text: &str,
    ) -> bool {
        if self.unrestricted(ty, perms) {
            return true;
        }
        // Read before the verdict is made: a `$reindex` meanwhile makes it look stale.
        let generation = ctx.registry_generation();
        if let Ok(v) = self.verdicts.0.lock()
            && v.made_with(generation)
            && let Some(ok) = v.get(ty, id, version, perms)
        {
            return ok;
        }
        let ok = self.permits_text(ctx, ty, perms, text);
        if let Ok(mut v) = self.verdicts.0.lock() {
            if !v.made_with(generation) || v.len >= VERDICTS {
                v.map.clear();
                v.len = 0;
                v.generation = Some(generation);
            }
            v.map.entry(id.to_string()).or_default().push(Verdict {
                ty: ty.to_string(),
                version,
                perms,
                ok,
            });
            v.len += 1;
        }
        ok
    }

    /// Adds to `out` the top-level elements [`Grant::permits`] reads of a `ty` resource;
    /// `None`: cannot be told (parse it whole).
    fn fields_needed<'r>(
        &self,
        ctx: &Ctx,
        registry: &'r crate::search::registry::Registry,
        ty: &str,
        perms: Perms,
        out: &mut Vec<(&'r str, bool)>,
    ) -> Option<()> {
        let mut add = |code: &str| -> Option<()> {
            // `_id` reads `id`, always kept; an unknown parameter matches nothing.
            let Some(p) = registry.get(ty, code) else {
                return Some(());
            };
            if !p.components.is_empty() {
                return None;
            }
            p.expression.as_ref()?.root_fields(ty, out)
        };
        for s in self.scopes_for(ty, perms) {
            if self.compartment_of(s).is_some() && ty != "Patient" {
                for code in ctx.defs.compartments.params("Patient", ty).unwrap_or(&[]) {
                    add(code)?;
                }
            }
            for (code, _) in &s.params {
                add(code)?;
            }
        }
        Some(())
    }

    /// Whether `resource` may be handled with one of `perms` under some scope.
    pub fn permits(&self, ctx: &Ctx, perms: Perms, resource: &Value) -> bool {
        let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
            return false;
        };
        self.scopes_for(ty, perms).any(|s| {
            self.compartment_of(s)
                .is_none_or(|p| in_patient_compartment(ctx, ty, resource, p))
                && s.params
                    .iter()
                    .all(|(k, v)| matches_param(ctx, ty, resource, k, v))
        })
    }

    /// The token is for an ingest or administration endpoint: it needs `perms` on every
    /// resource type, from a `system/` scope without restrictions.
    pub fn require_system_wide(&self, perms: Perms, what: &str) -> Result<()> {
        let ok = self.scopes.iter().any(|s| {
            s.context == Context::System
                && s.resource_type.is_none()
                && s.params.is_empty()
                && s.perms.contains(perms)
        });
        if ok {
            Ok(())
        } else {
            Err(forbidden(format!(
                "{what} needs the scope system/*.{perms} (this token has: {})",
                self.scope_text
            )))
        }
    }

    fn require(&self, ty: &str, perms: Perms, what: &str) -> Result<()> {
        if self.may(ty, perms) {
            Ok(())
        } else {
            Err(forbidden(format!(
                "{what} on {ty} needs a scope with {perms} on {ty} (this token has: {})",
                self.scope_text
            )))
        }
    }
}

/// The resource is in the compartment of `Patient/patient` (compartmentdefinition-patient).
/// Types outside the Patient compartment (Medication, Organization, Practitioner, ...) hold
/// no one patient's data and pass; the Patient itself passes only as `patient`.
pub fn in_patient_compartment(ctx: &Ctx, ty: &str, resource: &Value, patient: &str) -> bool {
    if ty == "Patient" {
        return resource.get("id").and_then(Value::as_str) == Some(patient);
    }
    let Some(params) = ctx.defs.compartments.params("Patient", ty) else {
        return true;
    };
    let registry = ctx.registry();
    params.iter().any(|code| {
        registry.get(ty, code).is_some_and(|p| {
            extract_param(p, resource).iter().any(|v| {
                matches!(v, IndexValue::Reference { target_type: Some(t), target_id: Some(id), .. }
                    if t == "Patient" && id == patient)
            })
        })
    })
}

/// `resource` matches the search restriction `code=value` of a v2 scope. Token, string,
/// reference and uri parameters without modifiers are understood (values OR-ed with `,`);
/// anything else matches nothing, so an unusual restriction denies rather than leaks.
pub fn matches_param(ctx: &Ctx, ty: &str, resource: &Value, code: &str, value: &str) -> bool {
    if code == "_id" {
        let id = resource.get("id").and_then(Value::as_str);
        return value.split(',').any(|v| Some(v) == id);
    }
    let registry = ctx.registry();
    let Some(param) = registry.get(ty, code) else {
        return false;
    };
    let values = extract_param(param, resource);
    value.split(',').any(|want| {
        values.iter().any(|have| match (param.kind, have) {
            (ParamType::Token, IndexValue::Token { system, code, .. }) => {
                let (ws, wc) = match want.split_once('|') {
                    Some((s, c)) => (Some(s), c),
                    None => (None, want),
                };
                code.as_deref() == Some(wc)
                    && match ws {
                        None => true,
                        Some("") => system.is_none(),
                        Some(s) => system.as_deref() == Some(s),
                    }
            }
            (ParamType::String, IndexValue::String { normalized, .. }) => {
                normalized.starts_with(&fold(want))
            }
            (
                ParamType::Reference,
                IndexValue::Reference {
                    target_type,
                    target_id,
                    url,
                },
            ) => {
                url == want
                    || match want.split_once('/') {
                        Some((t, id)) => {
                            target_type.as_deref() == Some(t) && target_id.as_deref() == Some(id)
                        }
                        None => target_id.as_deref() == Some(want),
                    }
            }
            (ParamType::Uri, IndexValue::Uri(u)) => u == want,
            _ => false,
        })
    })
}

/// The permissions an interaction needs on its type. Operations that write many types
/// (HL7 v2, device data) or administer the server need wide `system/` scopes.
pub fn check(grant: &Grant, interaction: &Interaction, params: &[(String, String)]) -> Result<()> {
    use Interaction as I;
    let rs = Perms::R.union(Perms::S);
    let cu = Perms::C.union(Perms::U);
    match interaction {
        I::Capabilities => Ok(()),
        I::Bundle => Ok(()), // each entry is checked as its own interaction
        I::DeviceData | I::Hl7v2 => grant.require_system_wide(cu, "ingesting data"),
        I::DeviceDataReplay | I::Hl7v2Replay => grant.require_system_wide(cu, "a replay"),
        I::DeviceDataErrors | I::DeviceDataTemplates | I::Hl7v2Messages => {
            grant.require_system_wide(rs, "reading stored feed messages")
        }
        I::Reindex => grant.require_system_wide(Perms::ALL, "$reindex"),
        I::HistorySystem => grant.require_system_wide(rs, "system history"),
        I::SearchSystem => {
            let types = types_of(params);
            if types.is_empty() {
                return grant.require_system_wide(Perms::S, "a system-level search without _type");
            }
            for t in types {
                grant.require(t, Perms::S, "search")?;
            }
            check_search_params(grant, params)
        }
        I::SearchType(t) => {
            grant.require(t, Perms::S, "search")?;
            check_search_params(grant, params)
        }
        I::SearchCompartment(_, _, t) => {
            if t != "*" {
                grant.require(t, Perms::S, "search")?;
            }
            check_search_params(grant, params)
        }
        I::HistoryType(t) => grant.require(t, Perms::S, "history"),
        I::Everything(_) => grant.require("Patient", Perms::R, "$everything"),
        I::Read(t, _) | I::Vread(t, _, _) | I::HistoryInstance(t, _) => {
            grant.require(t, Perms::R, "read")
        }
        I::ValidateType(t) => grant.require(t, Perms::ALL, "$validate"),
        I::ValidateInstance(t, _) => grant.require(t, Perms::R, "$validate"),
        I::Create(t) => grant.require(t, Perms::C, "create"),
        I::Update(t, _) => grant.require(t, Perms::U, "update"),
        I::Patch(t, _) => grant.require(t, Perms::U, "patch"),
        I::Delete(t, _) => grant.require(t, Perms::D, "delete"),
        I::ConditionalUpdate(t) | I::ConditionalPatch(t) | I::ConditionalDelete(t) => {
            let perms = match interaction {
                I::ConditionalDelete(_) => Perms::D,
                _ => Perms::U,
            };
            // The condition is a search: it must not reach outside the scopes either.
            if !grant.unrestricted(t, perms) || !grant.unrestricted(t, Perms::S) {
                return Err(forbidden(format!(
                    "conditional writes on {t} need unrestricted scopes for {perms} and s on {t}"
                )));
            }
            Ok(())
        }
    }
}

fn types_of(params: &[(String, String)]) -> Vec<&str> {
    params
        .iter()
        .filter(|(k, _)| k == "_type")
        .flat_map(|(_, v)| v.split(','))
        .filter(|t| !t.is_empty())
        .collect()
}

/// `_has:T:...` reaches into resources of type `T`, and a chain `a:T.b` into `T`: both need
/// search permission there, or a search could test for data it may not see.
fn check_search_params(grant: &Grant, params: &[(String, String)]) -> Result<()> {
    for (k, _) in params {
        let mut rest = k.as_str();
        while let Some(r) = rest.strip_prefix("_has:") {
            let Some((ty, r)) = r.split_once(':') else {
                break;
            };
            grant.require(ty, Perms::S, "_has")?;
            rest = r.split_once(':').map_or("", |(_, r)| r);
        }
        for link in k.split('.').rev().skip(1) {
            // `subject:Patient` before a dot names the chained type.
            if let Some((_, ty)) = link.rsplit_once(':')
                && ty.starts_with(|c: char| c.is_ascii_uppercase())
            {
                grant.require(ty, Perms::S, "a chained search")?;
            } else if k.contains('.') && !grant.reads_everything() {
                return Err(forbidden(format!(
                    "chained parameter {k}: name the target type (param:Type.name) so its scope can be checked"
                )));
            }
        }
    }
    Ok(())
}

/// How a search for `ty` must be narrowed for this grant to stay exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Narrowing {
    /// Some scope sees every resource of the type.
    None,
    /// One restricted scope applies: its patient compartment and its parameters.
    Exact {
        patient: Option<String>,
        params: Vec<(String, String)>,
    },
    /// Several restricted scopes apply: results are filtered one by one, and totals dropped.
    Filter,
}

pub fn narrowing(grant: &Grant, ty: &str) -> Narrowing {
    if grant.unrestricted(ty, Perms::S) {
        return Narrowing::None;
    }
    let mut scopes = grant.scopes_for(ty, Perms::S);
    match (scopes.next(), scopes.next()) {
        (Some(s), None) => Narrowing::Exact {
            patient: grant.compartment_of(s).map(str::to_string),
            params: s.params.clone(),
        },
        _ => Narrowing::Filter,
    }
}

/// Parses a stored resource keeping only the top-level elements in `fields` (the others are
/// scanned, not built): what a restricted read needs to check a resource it will send as is.
pub fn parse_fields(text: &str, fields: &[(&str, bool)]) -> Option<Value> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::borrow::Cow;

    struct Key<'de>(Cow<'de, str>);
    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v.to_string())))
                }
            }
            d.deserialize_str(V)
        }
    }

    struct Pruned<'f>(&'f [(&'f str, bool)]);
    impl<'de> DeserializeSeed<'de> for Pruned<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Pruned<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a resource")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(Key(k)) = m.next_key()? {
                let wanted = self
                    .0
                    .iter()
                    .any(|(name, choice)| k == *name || (*choice && k.starts_with(name)));
                if wanted {
                    out.insert(k.into_owned(), m.next_value()?);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(Value::Object(out))
        }
    }
    let mut d = serde_json::Deserializer::from_str(text);
    let v = Pruned(fields).deserialize(&mut d).ok()?;
    d.end().ok()?;
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fields_keeps_only_what_is_asked() {
        let f = |name: &'static str, choice: bool| (name, choice);
        let text = r#"{"resourceType":"Observation","id":"o1","meta":{"versionId":"2"},
            "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
            "valueQuantity":{"value":72},"sub\"ject":{"reference":"Patient/x"},
            "subject":{"reference":"Patient/p"}}"#;
        let v = parse_fields(
            text,
            &[f("resourceType", false), f("code", false), f("value", true)],
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"resourceType": "Observation",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "valueQuantity": {"value": 72}})
        );
        let v = parse_fields(text, &[f("subject", false)]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"subject": {"reference": "Patient/p"}})
        );
        // Not JSON, or trailing text: no answer (the caller denies).
        assert!(parse_fields("{\"a\":", &[]).is_none());
        assert!(parse_fields("{} x", &[]).is_none());
        assert!(parse_fields("[1]", &[]).is_none());
    }
}
