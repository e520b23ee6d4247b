//! SearchParameter registry (FHIR R4 searchparameter.html and search.html#standard): which parameters apply to which resource type.
//!
//! Built once from the official `search-parameters.json` Bundle; custom SearchParameters are
//! added later with [`Registry::add`]. Every expression is parsed here, once, so that index
//! extraction on each write only evaluates.

use crate::search::fhirpath::{self, Expr};
use serde_json::Value;
use std::collections::HashMap;

/// `SearchParameter.type` (http://hl7.org/fhir/R4/valueset-search-param-type.html).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl ParamType {
    pub fn parse(code: &str) -> Option<ParamType> {
        Some(match code {
            "number" => ParamType::Number,
            "date" => ParamType::Date,
            "string" => ParamType::String,
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "composite" => ParamType::Composite,
            "quantity" => ParamType::Quantity,
            "uri" => ParamType::Uri,
            "special" => ParamType::Special,
            _ => return None,
        })
    }
}

/// One part of a composite parameter (`SearchParameter.component`).
#[derive(Debug, Clone)]
pub struct Component {
    /// Canonical URL of the SearchParameter giving this part's type and matching rules.
    pub definition: String,
    /// Evaluated relative to each item of the composite's own expression.
    pub expression: Option<Expr>,
    pub expression_text: String,
    /// The type of the parameter `definition` names, once resolved.
    pub kind: Option<ParamType>,
}

#[derive(Debug, Clone)]
pub struct SearchParam {
    pub code: String,
    pub url: String,
    pub kind: ParamType,
    pub base: Vec<String>,
    /// Allowed target resource types of a reference parameter.
    pub targets: Vec<String>,
    /// `None` when the definition has no expression (`_text`, `_content`, `_query`) or uses
    /// FHIRPath outside the supported subset; the code is still known so a search using it
    /// can be answered with "not supported" instead of "unknown parameter".
    pub expression: Option<Expr>,
    pub expression_text: Option<String>,
    pub components: Vec<Component>,
}

/// What loading the official Bundle produced.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Parameters whose expression (and, for composites, every component's) parsed.
    pub evaluable: usize,
    /// SearchParameter resources seen.
    pub total: usize,
    /// (url, reason) for each parameter that cannot be evaluated.
    pub unsupported: Vec<(String, String)>,
}

#[derive(Debug, Default, Clone)]
struct TypeParams {
    by_code: HashMap<String, usize>,
    /// Registration order, so `for_type` is deterministic.
    order: Vec<usize>,
}

#[derive(Debug, Default, Clone)]
pub struct Registry {
    params: Vec<SearchParam>,
    /// Keyed by base type, including the abstract bases `Resource` and `DomainResource`,
    /// whose parameters apply to every (domain) resource and are merged in at lookup.
    by_type: HashMap<String, TypeParams>,
    /// `for_type` answers, merged once after every change because index extraction asks
    /// for them on every write: per type with parameters of its own, plus the lists for
    /// types that only inherit (from `Resource`, or from `Resource` and `DomainResource`).
    merged: HashMap<String, Vec<usize>>,
    inherited_by_resources: Vec<usize>,
    inherited_by_domain_resources: Vec<usize>,
    /// Per type, the parameters that are unions of others there (see [`Registry::alias`]).
    aliases: HashMap<String, HashMap<String, Vec<String>>>,
    /// Per type, the composites searched by their parts (see [`Registry::by_parts`]).
    by_parts: HashMap<String, HashMap<String, [String; 2]>>,
    /// Per type, the reference parameters that are another's restricted to one target type
    /// (see [`Registry::restricted`]).
    restricted: HashMap<String, HashMap<String, Restriction>>,
}

/// A reference parameter searched through another's rows: `patient` on Observation
/// (`Observation.subject.where(resolve() is Patient)`) is `subject` with target type
/// `Patient`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// The parameter whose rows hold the values.
    pub base: String,
    /// The target type the rows must have.
    pub target_type: String,
}

impl Registry {
    /// Loads every SearchParameter in a Bundle. Parameters that cannot be evaluated are still
    /// registered (with `expression: None`) and listed in the report.
    pub fn from_bundle(bundle: &Value) -> (Registry, LoadReport) {
        let mut registry = Registry::default();
        let mut report = LoadReport::default();
        let resources = bundle
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.get("resource"))
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("SearchParameter"));
        for resource in resources {
            report.total += 1;
            match build(resource) {
                Ok((param, problem)) => {
                    match problem {
                        None => report.evaluable += 1,
                        Some(reason) => report.unsupported.push((param.url.clone(), reason)),
                    }
                    registry.insert(param);
                }
                Err(reason) => {
                    let url = resource.get("url").and_then(Value::as_str).unwrap_or("");
                    report.unsupported.push((url.to_string(), reason));
                }
            }
        }
        let kinds = registry.kinds_by_url();
        for param in registry.params.iter_mut() {
            if let Some(reason) = resolve_composite(param, &kinds) {
                report.evaluable = report.evaluable.saturating_sub(1);
                report.unsupported.push((param.url.clone(), reason));
            }
        }
        registry.merge();
        (registry, report)
    }

    /// Adds (or replaces, per base and code) a posted SearchParameter. Unlike the official
    /// Bundle, a custom parameter the server cannot evaluate is refused, because accepting it
    /// would make searches on it silently match nothing.
    pub fn add(&mut self, search_parameter: &Value) -> Result<(), String> {
        if search_parameter.get("resourceType").and_then(Value::as_str) != Some("SearchParameter") {
            return Err("resource is not a SearchParameter".into());
        }
        let (mut param, problem) = build(search_parameter)?;
        if param.kind == ParamType::Special {
            return Err("search parameters of type 'special' cannot be defined by clients".into());
        }
        if let Some(reason) = problem {
            return Err(reason);
        }
        let mut kinds = self.kinds_by_url();
        kinds.insert(param.url.clone(), param.kind);
        if let Some(reason) = resolve_composite(&mut param, &kinds) {
            return Err(reason);
        }
        self.insert(param);
        self.merge();
        Ok(())
    }

    /// The parameter `code` as it applies to `resource_type`: its own, else a `Resource` one,
    /// else a `DomainResource` one (not for Bundle, Binary, Parameters).
    pub fn get(&self, resource_type: &str, code: &str) -> Option<&SearchParam> {
        self.type_chain(resource_type)
            .find_map(|t| t.by_code.get(code))
            .and_then(|&i| self.params.get(i))
    }

    /// Every parameter applicable to `resource_type`, its own first; a type's own parameter
    /// shadows an inherited one with the same code.
    pub fn for_type(&self, resource_type: &str) -> Vec<&SearchParam> {
        let indices = match self.merged.get(resource_type) {
            Some(indices) => indices,
            None if fhirpath::resource_type_matches(resource_type, "DomainResource") => {
                &self.inherited_by_domain_resources
            }
            None => &self.inherited_by_resources,
        };
        indices.iter().filter_map(|&i| self.params.get(i)).collect()
    }

    /// When `code` on `resource_type` is an alias, the codes whose index rows together hold
    /// exactly its values: parameters such as Observation `combo-code`
    /// (`Observation.code | Observation.component.code`) whose expression on that type is
    /// the union of other parameters' of the same type and shape (`code`, `component-code`).
    /// An alias has no index rows of its own; searches, sorts and `:missing` read the rows
    /// of these codes instead. Reference parameters are never aliases (chains, `_has` and
    /// `_include` join on a single code).
    pub fn alias(&self, resource_type: &str, code: &str) -> Option<&[String]> {
        self.aliases
            .get(resource_type)?
            .get(code)
            .map(Vec::as_slice)
    }

    /// When the composite `code` on `resource_type` is searched by its parts: the codes of
    /// the two parameters whose rows hold its components' values. Such a composite (R4:
    /// Observation `code-value-quantity`, `code-value-concept`, `code-value-date`) combines
    /// two elements of the resource itself, not of a repeating item, so `code-value-quantity
    /// =a$b` means exactly `code=a&value-quantity=b`: it has no index rows of its own.
    pub fn by_parts(&self, resource_type: &str, code: &str) -> Option<&[String; 2]> {
        self.by_parts.get(resource_type)?.get(code)
    }

    /// The composites of one type searched by their parts, for index extraction to skip.
    pub fn by_parts_of(&self, resource_type: &str) -> Option<&HashMap<String, [String; 2]>> {
        self.by_parts.get(resource_type)
    }

    /// When the reference parameter `code` on `resource_type` is another's restricted to one
    /// target type: its expression there is `X.where(resolve() is T)` and another reference
    /// parameter of the type, with rows of its own, has the expression `X` (R4: 47, among
    /// them `patient` on 40 types, mostly as `subject` with `Patient`, and `practitioner` as
    /// `participant` on Encounter). Its reference rows are the other's whose `target_type` is `T`
    /// (`extract` gives a reference's type as `resolve()` reads it), so it has none of its
    /// own; searches, chains, `_has`, includes, sorts and compartments read the other's.
    /// Its `:identifier` rows stay its own: they carry no target type.
    pub fn restricted(&self, resource_type: &str, code: &str) -> Option<&Restriction> {
        self.restricted.get(resource_type)?.get(code)
    }

    /// The restricted reference parameters of one type (see [`Registry::restricted`]).
    pub fn restricted_of(&self, resource_type: &str) -> Option<&HashMap<String, Restriction>> {
        self.restricted.get(resource_type)
    }

    /// The aliases of one type (see [`Registry::alias`]), for index extraction to skip.
    pub fn aliases_of(&self, resource_type: &str) -> Option<&HashMap<String, Vec<String>>> {
        self.aliases.get(resource_type)
    }

    fn merge(&mut self) {
        self.merged = self
            .by_type
            .keys()
            .filter(|t| !matches!(t.as_str(), "Resource" | "DomainResource"))
            .map(|t| (t.clone(), self.merge_for(self.type_chain(t))))
            .collect();
        self.inherited_by_resources = self.merge_for(self.chain(None, false));
        self.inherited_by_domain_resources = self.merge_for(self.chain(None, true));
        self.aliases = self.per_type(Self::aliases_for);
        self.by_parts = self.per_type(Self::by_parts_for);
        self.restricted = self.per_type(Self::restricted_for);
    }

    /// What `find` finds among each type's merged parameters, for the types where it finds
    /// anything.
    fn per_type<V>(
        &self,
        find: impl Fn(&Self, &str, &[usize]) -> HashMap<String, V>,
    ) -> HashMap<String, HashMap<String, V>> {
        self.merged
            .iter()
            .map(|(t, indices)| (t.clone(), find(self, t, indices)))
            .filter(|(_, found)| !found.is_empty())
            .collect()
    }

    /// Finds one type's restricted reference parameters (see [`Registry::restricted`]),
    /// comparing expressions as normalised text.
    fn restricted_for(&self, ty: &str, indices: &[usize]) -> HashMap<String, Restriction> {
        // Each reference parameter with a single branch on the type, normalised once.
        let params: Vec<(&SearchParam, String)> = indices
            .iter()
            .filter_map(|&i| self.params.get(i))
            .filter(|p| p.kind == ParamType::Reference && p.expression.is_some())
            .filter_map(
                |p| match branches_on(p.expression_text.as_deref()?, ty).as_slice() {
                    [one] => Some((p, one.clone())),
                    _ => None,
                },
            )
            .collect();
        let mut found = HashMap::new();
        for (p, branch) in &params {
            let Some((path, target)) = restriction(branch) else {
                continue;
            };
            // The type as the definition spells it (the branch is case-folded).
            let Some(target_type) = p
                .targets
                .iter()
                .find(|t| t.eq_ignore_ascii_case(target))
                .filter(|t| !matches!(t.as_str(), "Resource" | "DomainResource"))
            else {
                continue;
            };
            // The base has rows of its own: it is no restriction itself.
            let base = params
                .iter()
                .find(|(b, own)| b.code != p.code && own == path && restriction(own).is_none());
            if let Some((base, _)) = base {
                found.insert(
                    p.code.clone(),
                    Restriction {
                        base: base.code.clone(),
                        target_type: target_type.clone(),
                    },
                );
            }
        }
        found
    }

    /// Finds one type's composites that are searched by their parts (see
    /// [`Registry::by_parts`]): two components, the first a token; the composite's
    /// expression on this type is the resource itself; each component's definition is a
    /// parameter of this type with index rows of its own, whose expression on this type is
    /// the component's (rooted at the type, compared as normalised text). The one difference
    /// allowed: the part's expression may also cast to `SampledData` where it is a quantity
    /// (R4 `value-quantity`), because a SampledData has no `value` and so yields no quantity
    /// row (`extract::quantity`).
    fn by_parts_for(&self, ty: &str, indices: &[usize]) -> HashMap<String, [String; 2]> {
        let mut found = HashMap::new();
        for param in indices.iter().filter_map(|&i| self.params.get(i)) {
            if param.kind != ParamType::Composite || param.expression.is_none() {
                continue;
            }
            let Some(text) = &param.expression_text else {
                continue;
            };
            let own: Vec<String> = branches_on(text, ty);
            if own.len() != 1 || own[0] != ty.to_ascii_lowercase() {
                continue;
            }
            let [first, second] = param.components.as_slice() else {
                continue;
            };
            if first.kind != Some(ParamType::Token) {
                continue;
            }
            let part = |c: &Component| -> Option<String> {
                let kind = c.kind?;
                let p = self
                    .params
                    .iter()
                    .find(|p| p.url == c.definition && p.expression.is_some())?;
                // The part as this type sees it, with rows of its own.
                let seen = self.get(ty, &p.code)?;
                if seen.url != p.url
                    || seen.kind != kind
                    || matches!(kind, ParamType::Composite | ParamType::Special)
                    || self.alias(ty, &p.code).is_some()
                {
                    return None;
                }
                let wanted: Vec<String> = split_branches(&c.expression_text)
                    .iter()
                    .map(|b| normalise(&format!("{ty}.{b}")))
                    .collect();
                let has = branches_on(seen.expression_text.as_deref()?, ty);
                let covered = wanted.iter().all(|w| has.contains(w));
                let extra_ok = has
                    .iter()
                    .filter(|h| !wanted.contains(h))
                    .all(|h| kind == ParamType::Quantity && h.ends_with(" as sampleddata"));
                (covered && extra_ok).then(|| p.code.clone())
            };
            if let (Some(head), Some(tail)) = (part(first), part(second)) {
                found.insert(param.code.clone(), [head, tail]);
            }
        }
        found
    }

    /// Finds the aliases among one type's parameters: a parameter whose expression's branches
    /// for this type are exactly those of two or more other parameters of the same type
    /// (for composites: with the same components), no branch counted twice.
    fn aliases_for(&self, ty: &str, indices: &[usize]) -> HashMap<String, Vec<String>> {
        struct Candidate<'r> {
            param: &'r SearchParam,
            branches: Vec<Expr>,
        }
        let mut candidates: Vec<Candidate> = indices
            .iter()
            .filter_map(|&i| self.params.get(i))
            .filter(|p| !matches!(p.kind, ParamType::Reference | ParamType::Special))
            .filter_map(|param| {
                let branches: Vec<Expr> = param
                    .expression
                    .as_ref()?
                    .rooted_branches()?
                    .into_iter()
                    .filter(|(root, _)| fhirpath::resource_type_matches(ty, root))
                    .map(|(_, e)| e)
                    .collect();
                (!branches.is_empty()).then_some(Candidate { param, branches })
            })
            .collect();
        // Parts before the wholes made of them; the largest parts are tried first.
        candidates.sort_by_key(|c| c.branches.len());
        let mut found: HashMap<String, Vec<String>> = HashMap::new();
        for (i, whole) in candidates.iter().enumerate() {
            if whole.branches.len() < 2 {
                continue;
            }
            let mut covered = vec![false; whole.branches.len()];
            let mut parts: Vec<String> = Vec::new();
            for part in candidates[..i].iter().rev() {
                if part.param.kind != whole.param.kind || !same_components(part.param, whole.param)
                {
                    continue;
                }
                let Some(at) = part
                    .branches
                    .iter()
                    .map(|b| whole.branches.iter().position(|w| w == b))
                    .collect::<Option<Vec<usize>>>()
                else {
                    continue;
                };
                if at.iter().any(|&k| covered[k]) {
                    continue;
                }
                for k in at {
                    covered[k] = true;
                }
                match found.get(&part.param.code) {
                    Some(codes) => parts.extend(codes.iter().cloned()),
                    None => parts.push(part.param.code.clone()),
                }
            }
            if parts.len() >= 2 && covered.iter().all(|c| *c) {
                found.insert(whole.param.code.clone(), parts);
            }
        }
        found
    }

    /// The type's own parameters in registration order, then inherited ones whose code it
    /// does not define itself.
    fn merge_for<'s>(&'s self, chain: impl Iterator<Item = &'s TypeParams>) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for level in chain {
            for &i in &level.order {
                let code = self.params.get(i).map(|p| p.code.as_str());
                if !out
                    .iter()
                    .any(|&j| self.params.get(j).map(|p| p.code.as_str()) == code)
                {
                    out.push(i);
                }
            }
        }
        out
    }

    fn type_chain<'s>(&'s self, resource_type: &'s str) -> impl Iterator<Item = &'s TypeParams> {
        let domain = fhirpath::resource_type_matches(resource_type, "DomainResource");
        self.chain(Some(resource_type), domain)
    }

    /// The parameter tables consulted for a type, most specific first.
    fn chain<'s>(
        &'s self,
        own: Option<&'s str>,
        domain: bool,
    ) -> impl Iterator<Item = &'s TypeParams> {
        [own, Some("Resource"), domain.then_some("DomainResource")]
            .into_iter()
            .flatten()
            .filter_map(|t| self.by_type.get(t))
    }

    fn kinds_by_url(&self) -> HashMap<String, ParamType> {
        self.params
            .iter()
            .map(|p| (p.url.clone(), p.kind))
            .collect()
    }

    fn insert(&mut self, param: SearchParam) {
        let index = self.params.len();
        for base in &param.base {
            let entry = self.by_type.entry(base.clone()).or_default();
            match entry.by_code.insert(param.code.clone(), index) {
                Some(previous) => {
                    for slot in entry.order.iter_mut().filter(|slot| **slot == previous) {
                        *slot = index;
                    }
                }
                None => entry.order.push(index),
            }
        }
        self.params.push(param);
    }
}

/// A normalised branch `x.where(resolve() is t)` as (`x`, `t`).
fn restriction(branch: &str) -> Option<(&str, &str)> {
    branch
        .strip_suffix(')')?
        .rsplit_once(".where(resolve() is ")
}

/// The top-level `|` branches of a FHIRPath expression's text.
fn split_branches(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '|' if depth == 0 => {
                out.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(text[start..].trim());
    out
}

/// One branch's text, normalised for comparison: outer parentheses dropped, `x.as(T)`
/// written `x as T`, whitespace collapsed, lower case (FHIRPath `as(DateTime)` and
/// `as dateTime` name the same choice).
fn normalise(branch: &str) -> String {
    let mut t = branch.trim();
    while wrapped(t) {
        t = t[1..t.len() - 1].trim();
    }
    let mut s = t.to_string();
    while let Some(at) = s.find(".as(") {
        let Some(close) = s[at..].find(')') else {
            break;
        };
        let ty = s[at + 4..at + close].trim().to_string();
        s.replace_range(at..at + close + 1, &format!(" as {ty}"));
    }
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

/// Whether the text is one parenthesised expression: `(a)`, not `(a) as (b)`.
fn wrapped(t: &str) -> bool {
    if !(t.starts_with('(') && t.ends_with(')')) {
        return false;
    }
    let mut depth = 0;
    for (i, c) in t.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 && i + 1 < t.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// The normalised branches of an expression rooted at `ty` (`Observation.x`, `(Observation.x
/// as T)`, or `Observation` itself).
fn branches_on(text: &str, ty: &str) -> Vec<String> {
    let root = ty.to_ascii_lowercase();
    split_branches(text)
        .into_iter()
        .map(normalise)
        .filter(|b| {
            // `(Observation.value as CodeableConcept).text` is rooted there too.
            let b = b.trim_start_matches('(');
            b == root
                || b.strip_prefix(root.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', ' ', ')']))
        })
        .collect()
}

/// Whether two parameters' components (none for simple parameters) index alike: the same
/// types and the same expressions, in order.
fn same_components(a: &SearchParam, b: &SearchParam) -> bool {
    a.components.len() == b.components.len()
        && a.components
            .iter()
            .zip(&b.components)
            .all(|(x, y)| x.kind == y.kind && x.expression == y.expression)
}

/// Resolves a composite's component types; returns why it cannot be evaluated (and clears
/// its expression) when it is not the supported shape: two components, the first a token
/// or reference, the second any non-composite type.
fn resolve_composite(
    param: &mut SearchParam,
    kinds: &HashMap<String, ParamType>,
) -> Option<String> {
    if param.kind != ParamType::Composite || param.expression.is_none() {
        return None;
    }
    for c in &mut param.components {
        c.kind = kinds.get(&c.definition).copied();
    }
    let reason = match param.components.as_slice() {
        [a, b] => {
            let first_ok = matches!(a.kind, Some(ParamType::Token | ParamType::Reference));
            let second_ok = b
                .kind
                .is_some_and(|k| !matches!(k, ParamType::Composite | ParamType::Special));
            if first_ok && second_ok && a.expression.is_some() && b.expression.is_some() {
                return None;
            }
            "composite components must be token or reference, then a simple type".to_string()
        }
        _ => "composite parameters with other than two components are not supported".to_string(),
    };
    param.expression = None;
    Some(reason)
}

/// Reads a SearchParameter. `Err` when it is unusable even as a name (no code, type or base);
/// otherwise the parameter plus, if it cannot be evaluated, the reason.
fn build(sp: &Value) -> Result<(SearchParam, Option<String>), String> {
    let text = |key: &str| sp.get(key).and_then(Value::as_str);
    let strings = |key: &str| -> Vec<String> {
        sp.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    };
    let code = text("code").ok_or("SearchParameter.code is missing")?;
    if code.is_empty() || code.contains(|c: char| c.is_whitespace() || "?&=,:$|".contains(c)) {
        return Err(format!(
            "SearchParameter.code '{code}' is not a valid parameter name"
        ));
    }
    let type_code = text("type").ok_or("SearchParameter.type is missing")?;
    let kind = ParamType::parse(type_code)
        .ok_or_else(|| format!("SearchParameter.type '{type_code}' is unknown"))?;
    let base = strings("base");
    if base.is_empty() {
        return Err("SearchParameter.base is missing".into());
    }
    let url = text("url").unwrap_or("").to_string();
    let expression_text = text("expression").map(str::to_string);
    let mut problem = None;
    let expression = match expression_text.as_deref() {
        None => {
            problem = Some("no FHIRPath expression".to_string());
            None
        }
        Some(src) => match fhirpath::parse(src) {
            Ok(expr) => Some(expr),
            Err(e) => {
                problem = Some(format!("expression not supported: {e}"));
                None
            }
        },
    };
    let mut components = Vec::new();
    for component in sp
        .get("component")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let definition = component
            .get("definition")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let src = component
            .get("expression")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let expression = match fhirpath::parse(&src) {
            Ok(expr) => Some(expr),
            Err(e) => {
                problem.get_or_insert(format!("component '{definition}' not supported: {e}"));
                None
            }
        };
        components.push(Component {
            definition,
            expression,
            expression_text: src,
            kind: None,
        });
    }
    if kind == ParamType::Composite && components.is_empty() {
        problem.get_or_insert("composite parameter without components".to_string());
    }
    let param = SearchParam {
        code: code.to_string(),
        url,
        kind,
        base,
        targets: strings("target"),
        expression,
        expression_text,
        components,
    };
    Ok((param, problem))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use serde_json::json;

    fn official() -> (Registry, LoadReport) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fhir-r4/definitions/search-parameters.json"
        );
        let text = std::fs::read_to_string(path).expect("search-parameters.json");
        let bundle: Value = serde_json::from_str(&text).expect("bundle JSON");
        Registry::from_bundle(&bundle)
    }

    #[test]
    fn loads_official_parameters() {
        let (registry, report) = official();
        println!(
            "evaluable {} of {}; unsupported: {:?}",
            report.evaluable, report.total, report.unsupported
        );
        assert_eq!(report.total, 1375);
        assert!(report.evaluable >= 1360, "{report:?}");
        let unsupported: Vec<&str> = report
            .unsupported
            .iter()
            .map(|(url, _)| url.rsplit('/').next().unwrap_or(url))
            .collect();
        // No expression, and the four three-part MolecularSequence coordinate composites.
        assert_eq!(
            unsupported,
            [
                "DomainResource-text",
                "Resource-content",
                "Resource-query",
                "MolecularSequence-chromosome-variant-coordinate",
                "MolecularSequence-chromosome-window-coordinate",
                "MolecularSequence-referenceseqid-variant-coordinate",
                "MolecularSequence-referenceseqid-window-coordinate",
            ]
        );
        let bp = registry
            .get("Observation", "component-code-value-quantity")
            .expect("composite");
        assert_eq!(
            bp.components.iter().map(|c| c.kind).collect::<Vec<_>>(),
            [Some(ParamType::Token), Some(ParamType::Quantity)]
        );

        let family = registry.get("Patient", "family").expect("Patient family");
        assert_eq!(family.kind, ParamType::String);
        let code = registry
            .get("Observation", "code")
            .expect("Observation code");
        assert_eq!(code.kind, ParamType::Token);
        assert!(code.base.len() > 10, "shared clinical-code parameter");
        assert!(registry.get("Observation", "_id").is_some());
        assert!(registry.get("Observation", "_text").is_some());
        assert!(
            registry.get("Bundle", "_text").is_none(),
            "Bundle is no DomainResource"
        );
        assert!(registry.get("Bundle", "_tag").is_some());
        assert!(registry.get("Patient", "no-such").is_none());
        let subject = registry.get("Observation", "subject").expect("subject");
        assert!(subject.targets.iter().any(|t| t == "Patient"));
        let composite = registry
            .get("Observation", "code-value-quantity")
            .expect("composite");
        assert_eq!(composite.components.len(), 2);
        assert!(composite.components.iter().all(|c| c.expression.is_some()));

        let observation = registry.for_type("Observation");
        let codes: Vec<&str> = observation.iter().map(|p| p.code.as_str()).collect();
        assert!(codes.contains(&"value-quantity") && codes.contains(&"_lastUpdated"));
        let mut unique = codes.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "no duplicate codes");
        assert!(
            registry
                .for_type("Binary")
                .iter()
                .all(|p| p.code != "_text")
        );
    }

    #[test]
    fn observation_root_composites_are_searched_by_parts() {
        let (registry, _) = official();
        let parts = |code: &str| registry.by_parts("Observation", code).cloned();
        let pair = |a: &str, b: &str| Some([a.to_string(), b.to_string()]);
        assert_eq!(parts("code-value-quantity"), pair("code", "value-quantity"));
        assert_eq!(parts("code-value-concept"), pair("code", "value-concept"));
        assert_eq!(parts("code-value-date"), pair("code", "value-date"));
        // value-string also reads `(Observation.value as CodeableConcept).text`, which the
        // component does not: kept as rows.
        assert_eq!(parts("code-value-string"), None);
        // Components of repeating items pair values within one item: rows.
        assert_eq!(parts("component-code-value-quantity"), None);
        assert_eq!(parts("combo-code-value-quantity"), None);
        let total: usize = registry.by_parts.values().map(HashMap::len).sum();
        assert_eq!(total, 3, "{:?}", registry.by_parts);
    }

    #[test]
    fn expression_texts_normalise() {
        assert_eq!(
            normalise("(Observation.value as Quantity)"),
            "observation.value as quantity"
        );
        assert_eq!(
            normalise("Observation.value.as(Quantity)"),
            "observation.value as quantity"
        );
        assert_eq!(normalise("(a) as (b)"), "(a) as (b)");
        assert_eq!(
            split_branches("(A.x as T) | A.y.where(z | w)"),
            ["(A.x as T)", "A.y.where(z | w)"]
        );
        assert_eq!(
            branches_on("Observation | Observation.component", "Observation").len(),
            2
        );
        assert!(branches_on("ObservationDefinition.code", "Observation").is_empty());
        assert_eq!(
            branches_on("(Observation.value as CodeableConcept).text", "Observation"),
            ["(observation.value as codeableconcept).text"]
        );
    }

    #[test]
    fn observation_combinations_are_aliases() {
        let (registry, _) = official();
        let alias = |code: &str| {
            registry
                .alias("Observation", code)
                .map(|codes| codes.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let sorted = |code: &str| {
            let mut codes = alias(code).unwrap_or_default();
            codes.sort_unstable();
            codes
        };
        assert_eq!(sorted("combo-code"), ["code", "component-code"]);
        assert_eq!(
            sorted("combo-value-quantity"),
            ["component-value-quantity", "value-quantity"]
        );
        assert_eq!(
            sorted("combo-value-concept"),
            ["component-value-concept", "value-concept"]
        );
        assert_eq!(
            sorted("combo-data-absent-reason"),
            ["component-data-absent-reason", "data-absent-reason"]
        );
        assert_eq!(
            sorted("combo-code-value-quantity"),
            ["code-value-quantity", "component-code-value-quantity"]
        );
        assert_eq!(
            sorted("combo-code-value-concept"),
            ["code-value-concept", "component-code-value-concept"]
        );
        // Parts are no aliases, and no other R4 parameter is one.
        assert_eq!(alias("code"), None);
        assert_eq!(alias("value-quantity"), None);
        let total: usize = registry.aliases.values().map(HashMap::len).sum();
        assert_eq!(total, 6, "{:?}", registry.aliases);
    }

    #[test]
    fn restricted_references_are_found_from_the_definitions() {
        let (registry, _) = official();
        let restricted = |ty: &str, code: &str| {
            registry
                .restricted(ty, code)
                .map(|r| (r.base.as_str(), r.target_type.as_str()))
        };
        assert_eq!(
            restricted("Observation", "patient"),
            Some(("subject", "Patient"))
        );
        assert_eq!(
            restricted("Encounter", "practitioner"),
            Some(("participant", "Practitioner"))
        );
        // `AllergyIntolerance.patient` is an element of its own; `subject` is not restricted.
        assert_eq!(restricted("AllergyIntolerance", "patient"), None);
        assert_eq!(restricted("Observation", "subject"), None);
        // A restriction's base is never itself restricted or an alias.
        for (ty, found) in &registry.restricted {
            for r in found.values() {
                assert!(registry.restricted(ty, &r.base).is_none(), "{ty} {r:?}");
                let base = registry.get(ty, &r.base);
                assert!(
                    base.is_some_and(|b| b.kind == ParamType::Reference),
                    "{ty} {r:?}"
                );
            }
        }
        let total: usize = registry.restricted.values().map(HashMap::len).sum();
        // AuditEvent `patient` restricts two elements (agent.who, entity.what): not one base.
        assert_eq!(restricted("AuditEvent", "patient"), None);
        assert_eq!(total, 47, "{:?}", registry.restricted);
    }

    #[test]
    fn custom_parameters() {
        let (mut registry, _) = official();
        let custom = json!({
            "resourceType": "SearchParameter", "url": "http://example.org/sp/mother",
            "code": "mothers-maiden-name", "type": "string", "base": ["Patient"],
            "expression": "Patient.extension.where(url = 'http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName').value"
        });
        assert_eq!(registry.add(&custom), Ok(()));
        assert!(registry.get("Patient", "mothers-maiden-name").is_some());

        let replaced = json!({
            "resourceType": "SearchParameter", "url": "http://example.org/sp/family",
            "code": "family", "type": "string", "base": ["Patient"], "expression": "Patient.name.family"
        });
        assert_eq!(registry.add(&replaced), Ok(()));
        let family = registry.get("Patient", "family").map(|p| p.url.as_str());
        assert_eq!(family, Some("http://example.org/sp/family"));
        let count = registry
            .for_type("Patient")
            .iter()
            .filter(|p| p.code == "family")
            .count();
        assert_eq!(count, 1);
        // Practitioner keeps the official shared `family`.
        let other = registry
            .get("Practitioner", "family")
            .map(|p| p.url.as_str());
        assert_eq!(
            other,
            Some("http://hl7.org/fhir/SearchParameter/individual-family")
        );

        let refused = [
            json!({"resourceType": "SearchParameter", "code": "x", "type": "string", "base": ["Patient"], "expression": "Patient.name.first()"}),
            json!({"resourceType": "SearchParameter", "code": "x", "type": "string", "base": ["Patient"]}),
            json!({"resourceType": "SearchParameter", "code": "x", "type": "bogus", "base": ["Patient"], "expression": "Patient.name"}),
            json!({"resourceType": "SearchParameter", "code": "x", "type": "string", "expression": "Patient.name"}),
            json!({"resourceType": "Patient", "code": "x"}),
        ];
        for sp in refused {
            let result = registry.add(&sp);
            assert!(result.is_err(), "{sp}");
            println!("refused: {}", result.err().unwrap_or_default());
        }
    }
}
