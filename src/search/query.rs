//! Search queries (FHIR R4 search.html) compiled to SQL over the `idx_*` tables.
//!
//! A query is a list of scopes (one resource type each, or every type for a system search
//! without `_type`), each an AND of filters, each filter an OR of values. Every parameter
//! type except composite and special is supported, with the modifiers `:missing`, `:exact`,
//! `:contains`, `:text`, `:not`, `:above`/`:below` (uri), `:in`/`:not-in` (value sets held
//! by the server), `:of-type`, `:identifier` and `:[type]`, the prefixes on date, number and
//! quantity, chaining, reverse chaining (`_has`), `_list` and compartments. Anything else is
//! refused with a 400 naming the parameter, never silently ignored.
//!
//! SQL shape: the filter most likely to be selective drives the query as
//! `r.rid IN (SELECT rid FROM idx_... )`; every other filter is a correlated `EXISTS` probe
//! on the candidate's `rid`, so the cost follows the driver's matches, not the table size.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{FhirError, Result};
use crate::search::extract::{fold, parse_fhir_date_range};
use crate::search::registry::{ParamType, Registry};
use crate::store::SqlBuilder;
use crate::store::resource::{param_key, param_range};

/// Result parameters a search accepts besides the filters.
const CONTROL: &[&str] = &[
    "_count",
    "_offset",
    "_cursor",
    "_format",
    "_pretty",
    "_summary",
    "_elements",
    "_total",
    "_sort",
    "_include",
    "_revinclude",
    "_type",
    "_since",
    "_contained",
    "_containedType",
];

/// Prefix of the key under which `:above` / `:below` wait for their CodeSystem (see
/// [`hierarchy_codes`]), next to the value set URLs of `:in`.
pub const HIERARCHY: &str = "hierarchy:";

/// Chains and `_has` nest at most this deep.
const MAX_DEPTH: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Token,
    String,
    Reference,
    Date,
    Number,
    Quantity,
    Uri,
}

impl Table {
    fn of(kind: ParamType) -> Option<Table> {
        Some(match kind {
            ParamType::Token => Table::Token,
            ParamType::String => Table::String,
            ParamType::Reference => Table::Reference,
            ParamType::Date => Table::Date,
            ParamType::Number => Table::Number,
            ParamType::Quantity => Table::Quantity,
            ParamType::Uri => Table::Uri,
            ParamType::Composite | ParamType::Special => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Table::Token => "idx_token",
            Table::String => "idx_string",
            Table::Reference => "idx_reference",
            Table::Date => "idx_date",
            Table::Number => "idx_number",
            Table::Quantity => "idx_quantity",
            Table::Uri => "idx_uri",
        }
    }

    /// The `param` column (qualified by `alias`) in a lookup of one resource's rows
    /// (`rid = ...`: probes, sort keys). The range tables' lookup indexes begin with `param`
    /// and cover their rows (`param`, value, `rid`): without statistics SQLite would rather
    /// scan a parameter's every row there than seek the resource's few rows through the
    /// `rid` index, so a unary `+` keeps `param` out of its index selection. PostgreSQL
    /// (`statistics`) gets the plain column: the `+` hides the column's statistics from it
    /// and made it walk every resource in `rid` order (600 ms instead of 3).
    fn probe_param(self, alias: &str, statistics: bool) -> String {
        match self {
            Table::String | Table::Date | Table::Number | Table::Quantity if !statistics => {
                format!("+{alias}.param")
            }
            _ => format!("{alias}.param"),
        }
    }

    /// Column ordering by this parameter (`_sort`), ascending and descending.
    fn sort_columns(self) -> (&'static str, &'static str) {
        match self {
            Table::Token => ("MIN(value)", "MAX(value)"),
            Table::String => ("MIN(norm)", "MAX(norm)"),
            Table::Reference => ("MIN(url)", "MAX(url)"),
            Table::Date => ("MIN(lo)", "MAX(hi)"),
            Table::Number | Table::Quantity => ("MIN(value)", "MAX(value)"),
            Table::Uri => ("MIN(value)", "MAX(value)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenValue {
    /// `None`: any system; `Some("")`: no system (`|code`).
    pub system: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum StringMode {
    StartsWith,
    Exact,
    Contains,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

#[derive(Debug, Clone, PartialEq)]
enum RefValue {
    /// `[Type/]id`.
    Local(Option<String>, String),
    /// An absolute URL or URN, matched as written.
    Url(String),
}

/// A number with its implicit precision range (search.html#number): `100` is [99.5, 100.5).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Number {
    prefix: Prefix,
    value: f64,
    lo: f64,
    hi: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct QuantityValue {
    number: Number,
    system: Option<String>,
    code: Option<String>,
}

/// The index codes holding one parameter's rows: its own code, or for an alias
/// (`Registry::alias`, e.g. Observation `combo-code`) the codes of the parameters it unites,
/// or for a restricted reference parameter (`Registry::restricted`, e.g. Observation
/// `patient`) its base's code with the target type the rows must have.
#[derive(Debug, Clone, PartialEq)]
struct Codes(Vec<String>, Option<Restricted>);

/// A restricted reference parameter's own code (for its `:identifier` rows) and the target
/// type its base's rows must have.
#[derive(Debug, Clone, PartialEq)]
struct Restricted {
    own: String,
    target_type: String,
}

impl Codes {
    fn of(registry: &Registry, ty: Option<&str>, code: &str) -> Codes {
        let Some(t) = ty else {
            return Codes::plain(code);
        };
        if let Some(codes) = registry.alias(t, code) {
            return Codes(codes.to_vec(), None);
        }
        match registry.restricted(t, code) {
            Some(r) => Codes(
                vec![r.base.clone()],
                Some(Restricted {
                    own: code.to_string(),
                    target_type: r.target_type.clone(),
                }),
            ),
            None => Codes::plain(code),
        }
    }

    /// One code with rows of its own.
    fn plain(code: &str) -> Codes {
        Codes(vec![code.to_string()], None)
    }

    /// The codes of derived rows (`:of-type`, `:identifier`), which follow their parameter's
    /// (a restricted parameter keeps its own: they carry no target type).
    fn suffixed(&self, suffix: &str) -> Codes {
        match &self.1 {
            Some(r) => Codes(vec![format!("{}{suffix}", r.own)], None),
            None => Codes(
                self.0.iter().map(|c| format!("{c}{suffix}")).collect(),
                None,
            ),
        }
    }

    /// The one code whose rows alone are this parameter's.
    fn single(&self) -> Option<&str> {
        match (self.0.as_slice(), &self.1) {
            ([one], None) => Some(one),
            _ => None,
        }
    }

    /// The index rows of these codes (see [`params_sql`]); `col` is the `param` column,
    /// qualified like the table's other columns (`x.param`, `+x.param`).
    fn sql(&self, b: &mut SqlBuilder, ty: Option<&str>, col: &str) {
        match &self.1 {
            None => params_sql(b, ty, col, &self.0),
            Some(r) => {
                let qualifier = col
                    .trim_start_matches('+')
                    .rsplit_once('.')
                    .map_or("", |(q, _)| q);
                let dot = if qualifier.is_empty() { "" } else { "." };
                b.push("(");
                params_sql(b, ty, col, &self.0);
                b.push(&format!(" AND {qualifier}{dot}target_type = "))
                    .text(r.target_type.clone())
                    .push(")");
            }
        }
    }
}

/// The `idx_reference` rows (under `alias`) of the reference parameter `code` of `source`,
/// through its base's rows when it is restricted (`Registry::restricted`).
pub fn reference_rows_sql(
    b: &mut SqlBuilder,
    registry: &Registry,
    source: &str,
    code: &str,
    alias: &str,
) {
    Codes::of(registry, Some(source), code).sql(b, Some(source), &format!("{alias}.param"));
}

/// The `idx_reference` rows (column `col`) of every reference parameter of `source` with
/// rows of its own (restricted ones read their base's).
pub fn all_reference_rows_sql(b: &mut SqlBuilder, registry: &Registry, source: &str, col: &str) {
    let codes: Vec<&str> = registry
        .for_type(source)
        .into_iter()
        .filter(|p| p.kind == ParamType::Reference && p.expression.is_some())
        .filter(|p| registry.restricted(source, &p.code).is_none())
        .map(|p| p.code.as_str())
        .collect();
    params_sql(b, Some(source), col, &codes);
}

/// The index rows (column `col`, `param`) of `codes`: `{col} = key` or `{col} IN (keys)`
/// for one resource type, or each code's range of keys over every type (`ty: None`; also
/// exact wherever the row's `rid` is already fixed, which fixes its type).
pub fn params_sql<S: AsRef<str>>(b: &mut SqlBuilder, ty: Option<&str>, col: &str, codes: &[S]) {
    match (ty, codes) {
        (_, []) => {
            b.push("1 = 0");
        }
        (Some(t), [one]) => {
            b.push(&format!("{col} = ")).int(param_key(t, one.as_ref()));
        }
        (Some(t), many) => {
            b.push(&format!("{col} IN "))
                .list(many.iter().map(|c| param_key(t, c.as_ref())));
        }
        (None, codes) => {
            b.push("(");
            or_list(b, codes, |b, c| {
                let (lo, hi) = param_range(c.as_ref());
                b.push(&format!("{col} BETWEEN "))
                    .int(lo)
                    .push(" AND ")
                    .int(hi);
            });
            b.push(")");
        }
    }
}

/// What one index filter matches: an OR of values of one type.
#[derive(Debug, Clone, PartialEq)]
enum Cond {
    Token(Vec<TokenValue>),
    TokenText(Vec<String>),
    String(StringMode, Vec<String>),
    Reference(Vec<RefValue>),
    Date(Vec<(Prefix, i64, i64)>),
    Number(Vec<Number>),
    Quantity(Vec<QuantityValue>),
    Uri(Vec<String>),
    UriBelow(Vec<String>),
}

/// One parsed filter; a scope matches when all of its filters do.
#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Id(Vec<String>),
    LastUpdated(Vec<(Prefix, i64, i64)>),
    Index {
        table: Table,
        code: Codes,
        cond: Cond,
        /// `:not` / `:not-in`: resources with no matching value (including none at all).
        negate: bool,
    },
    Missing {
        table: Table,
        code: Codes,
        missing: bool,
    },
    /// `code[:Type].rest=...`: a reference whose target matches `inner` (one list per type).
    Chain {
        code: Codes,
        targets: Vec<(String, Vec<Filter>)>,
    },
    /// `_has:Source:code:rest=...`: some `Source` referring to this resource through `code`
    /// matches `inner`.
    Has {
        source: String,
        code: Codes,
        inner: Vec<Filter>,
    },
    /// `_list=id`: the resource is an item of that List.
    List(String),
    /// In the compartment of `Type/id` (compartmentdefinition.html): referenced by a
    /// resource of type `t` through one of the codes listed for `t` in `pairs`, or the
    /// compartment's own resource when `itself`.
    Compartment {
        pairs: Vec<(String, Vec<String>)>,
        target_type: String,
        target_id: String,
        itself: bool,
    },
    /// A composite `a$b`: rows of the second component's table under one of the combined
    /// codes of `a` (see `extract::composite`), matching `b`; one alternative per OR value.
    Composite {
        table: Table,
        /// (combined codes of the first component, see `extract::composite_token_key`;
        /// condition on the second).
        alts: Vec<(Vec<String>, Cond)>,
    },
    /// Several filters that must all match; parsed from one parameter (a composite searched
    /// by its parts, see `Registry::by_parts`) and spread into its scope's list by
    /// [`Filter::into_list`], so it never reaches SQL.
    All(Vec<Filter>),
    /// Any of these lists of filters matching (all of one list): a composite with several
    /// values, or an alias over codes of both kinds, when some are searched by their parts.
    /// Only ever a probe.
    AnyOf(Vec<Vec<Filter>>),
    /// `near=lat|long|distance|unit`: a position inside the bounding box of that circle.
    Near {
        lat: (f64, f64),
        long: (f64, f64),
    },
    /// `:in` / `:not-in` before [`SearchQuery::bind_value_sets`] turns it into a token filter.
    ValueSet {
        code: Codes,
        url: String,
        negate: bool,
    },
}

impl Filter {
    /// The filters this one stands for in its scope's list ([`Filter::All`] spread out).
    fn into_list(self) -> Vec<Filter> {
        match self {
            Filter::All(filters) => filters,
            f => vec![f],
        }
    }

    /// Lower is likelier to be selective; the lowest drives the query.
    fn rank(&self) -> u8 {
        match self {
            Filter::Id(_) => 0,
            Filter::Compartment { .. } | Filter::List(_) => 1,
            Filter::Index {
                negate: false,
                cond: Cond::Reference(_),
                ..
            } => 1,
            Filter::Chain { .. } | Filter::Has { .. } | Filter::Composite { .. } => 2,
            Filter::Index {
                negate: false,
                cond: Cond::Token(_) | Cond::Uri(_),
                ..
            } => 2,
            Filter::Index {
                negate: false,
                cond: Cond::String(StringMode::Exact | StringMode::StartsWith, _),
                ..
            } => 3,
            Filter::Index { negate: false, .. } => 4,
            Filter::LastUpdated(_) | Filter::Near { .. } => 5,
            _ => 9,
        }
    }

    /// Whether this filter drives as `rid IN (SELECT rid FROM idx_* ...)` (see `index_sql`),
    /// a subquery over index rows that can hold probes.
    fn drives_through_index(&self) -> bool {
        matches!(
            self,
            Filter::Index { negate: false, .. } | Filter::Composite { .. } | Filter::Chain { .. }
        )
    }

    /// Whether this filter, as a probe, looks at nothing of the candidate but its `rid`.
    fn probes_rid_only(&self) -> bool {
        match self {
            Filter::AnyOf(lists) => lists.iter().flatten().all(Filter::probes_rid_only),
            f => matches!(
                f,
                Filter::Index { .. }
                    | Filter::Missing { .. }
                    | Filter::Composite { .. }
                    | Filter::Near { .. }
                    | Filter::Chain { .. }
            ),
        }
    }

    /// Whether this filter can drive (appear as `rid IN (...)`).
    fn can_drive(&self) -> bool {
        self.rank() < 9
    }

    /// Whether, driving a scope of one type, this filter's `rid IN (SELECT rid FROM idx_*
    /// WHERE param = key(T, code) ...)` (see `index_sql`) keeps to that type by itself: an
    /// index row's `param` holds its resource's type.
    fn drives_typed(&self) -> bool {
        matches!(
            self,
            Filter::Index { negate: false, .. } | Filter::Chain { .. }
        )
    }
}

/// One `_sort` key.
#[derive(Debug, Clone, PartialEq)]
enum SortKey {
    Id,
    LastUpdated,
    /// The parameter's rows per scope type (`None`: every type), which differ where it is
    /// an alias or restricted on some of the types.
    Param {
        table: Table,
        codes: Vec<(Option<String>, Codes)>,
    },
}

/// `_include` / `_revinclude` (search.html#include).
#[derive(Debug, Clone, PartialEq)]
pub struct Include {
    /// The type holding the reference.
    pub source: String,
    /// The reference parameter; `None` for `*`.
    pub code: Option<String>,
    /// Restricts the target type (`Source:param:Target`).
    pub target: Option<String>,
    pub iterate: bool,
}

/// `_total` (search.html#total).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalMode {
    /// Filled when cheap: from the page itself, or a count bounded by [`CHEAP_TOTAL`].
    Default,
    None,
    Accurate,
}

/// The most matches counted for a `Bundle.total` the client did not ask for.
pub const CHEAP_TOTAL: i64 = 1000;

/// Paging position: keyset on `rid` for the default order, offset for `_sort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    First,
    After(i64),
    Before(i64),
}

#[derive(Debug, Clone)]
struct Scope {
    /// `None`: every type (system search without `_type`).
    ty: Option<String>,
    filters: Vec<Filter>,
    driver: Driver,
}

/// Which filter drives a scope's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// The lowest [`Filter::rank`].
    Auto,
    /// The filter at this position (chosen from [`SearchQuery::estimate_sqls`]).
    Filter(usize),
    /// None: walk the type's resources in `rid` order and probe every filter, stopping at
    /// the page size. Chosen when every filter matches many resources, so that the first
    /// page costs the same whether thousands or millions match.
    Scan,
}

/// A parsed search.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    scopes: Vec<Scope>,
    sort: Vec<(SortKey, bool)>,
    pub count: usize,
    pub offset: usize,
    pub cursor: Cursor,
    /// Parameters that were ignored (lenient handling), reported back to the client.
    pub ignored: Vec<String>,
    /// `_summary=count`.
    pub count_only: bool,
    pub total: TotalMode,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    /// The SQL is for a database that plans from statistics (see [`SqlBuilder::statistics`]).
    pub statistics: bool,
}

/// `value` with the search grammar's own characters (`\ , | $`) escaped
/// (search.html#escaping), to be one value of a parameter.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | '|' | ',' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Splits `value` on `sep` where `sep` is not escaped by `\`. After a `\`, a character for
/// which `unescape` holds is kept alone; any other keeps its `\` for a later split. A
/// trailing lone `\` is dropped.
fn split_escaped(value: &str, sep: char, unescape: impl Fn(char) -> bool) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == sep {
            out.push(String::new());
            continue;
        }
        let Some(last) = out.last_mut() else { break };
        if c != '\\' {
            last.push(c);
        } else if let Some(n) = chars.next() {
            if !unescape(n) {
                last.push('\\');
            }
            last.push(n);
        }
    }
    out
}

/// Splits a parameter value on unescaped commas and unescapes `\,` `\$` `\\` (a `\|` stays
/// escaped for [`split_bar`]).
fn split_or(value: &str) -> Vec<String> {
    split_escaped(value, ',', |n| n != '|')
}

/// Splits on every unescaped `|`, unescaping `\|`.
fn split_bars(v: &str) -> Vec<String> {
    split_escaped(v, '|', |n| n == '|')
}

/// Splits `system|code` on the first unescaped `|`.
fn split_bar(v: &str) -> (Option<String>, String) {
    let mut parts = split_bars(v);
    if parts.len() == 1 {
        return (None, parts.pop().unwrap_or_default());
    }
    let system = parts.remove(0);
    (Some(system), parts.join("|"))
}

fn parse_prefix(v: &str) -> (Prefix, &str) {
    let p = match v.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("ne") => Prefix::Ne,
        Some("gt") => Prefix::Gt,
        Some("lt") => Prefix::Lt,
        Some("ge") => Prefix::Ge,
        Some("le") => Prefix::Le,
        Some("sa") => Prefix::Sa,
        Some("eb") => Prefix::Eb,
        Some("ap") => Prefix::Ap,
        _ => return (Prefix::Eq, v),
    };
    (p, &v[2..])
}

fn date_values(name: &str, raw: &str) -> Result<Vec<(Prefix, i64, i64)>> {
    split_or(raw)
        .iter()
        .map(|v| {
            let (p, d) = parse_prefix(v);
            let (lo, hi) = parse_fhir_date_range(d).ok_or_else(|| {
                FhirError::invalid(format!(
                    "{name}: {v:?} is not a FHIR date, dateTime or instant"
                ))
            })?;
            Ok((p, lo, hi))
        })
        .collect()
}

/// Parses `[prefix]number` with its implicit range (search.html#number).
fn parse_number(name: &str, v: &str) -> Result<Number> {
    let (prefix, text) = parse_prefix(v);
    let bad = || FhirError::invalid(format!("{name}: {v:?} is not a number"));
    let valid = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if !valid {
        return Err(bad());
    }
    let value: f64 = text.parse().map_err(|_| bad())?;
    if !value.is_finite() {
        return Err(bad());
    }
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().map_err(|_| bad())?),
        None => (text, 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
    let half = 0.5 * 10f64.powi(exponent - decimals);
    Ok(Number {
        prefix,
        value,
        lo: value - half,
        hi: value + half,
    })
}

/// Parses `[prefix]number|system|code` (or `number||code`, or a bare number).
fn parse_quantity(name: &str, v: &str) -> Result<QuantityValue> {
    let parts = split_bars(v);
    let number = parse_number(name, parts.first().map_or("", String::as_str))?;
    let non_empty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
    match parts.len() {
        1 => Ok(QuantityValue {
            number,
            system: None,
            code: None,
        }),
        3 => Ok(QuantityValue {
            number,
            system: non_empty(parts.get(1)),
            code: non_empty(parts.get(2)),
        }),
        _ => Err(FhirError::invalid(format!(
            "{name}: {v:?} is not [prefix]number|system|code"
        ))),
    }
}

fn reference_value(v: &str, forced_type: Option<&str>) -> RefValue {
    if v.contains("://") || v.starts_with("urn:") {
        return RefValue::Url(v.to_string());
    }
    let parts: Vec<&str> = v.split('/').collect();
    match parts.as_slice() {
        [t, id] => RefValue::Local(Some((*t).to_string()), (*id).to_string()),
        [t, id, "_history", _] => RefValue::Local(Some((*t).to_string()), (*id).to_string()),
        _ => RefValue::Local(forced_type.map(str::to_string), v.to_string()),
    }
}

/// A token search value that names exactly one `system|code`, both present, unescaped:
/// what `identifier=system|value` conditions look for.
pub fn single_system_code(value: &str) -> Option<(String, String)> {
    match token_values(value).as_slice() {
        [
            TokenValue {
                system: Some(system),
                code: Some(code),
            },
        ] if !system.is_empty() => Some((system.clone(), code.clone())),
        _ => None,
    }
}

fn token_values(value: &str) -> Vec<TokenValue> {
    split_or(value)
        .iter()
        .map(|v| {
            let (system, code) = split_bar(v);
            TokenValue {
                system,
                code: (!code.is_empty()).then_some(code),
            }
        })
        .collect()
}

fn unsupported_modifier(name: &str, modifier: &str) -> FhirError {
    FhirError::not_supported(format!("modifier :{modifier} on {name} is not supported"))
}

/// Parses one filter `key=value` for resource type `ty` (`None`: every type, where only
/// the parameters of `Resource` apply). `key` may chain (`subject:Patient.name`) and
/// reverse-chain (`_has:Observation:patient:code`).
fn parse_filter(
    registry: &Registry,
    ty: Option<&str>,
    key: &str,
    value: &str,
    depth: usize,
) -> Result<Filter> {
    if depth > MAX_DEPTH {
        return Err(FhirError::invalid(format!(
            "{key}: chains and _has nest at most {MAX_DEPTH} deep"
        )));
    }
    let lookup_ty = ty.unwrap_or("Resource");
    if let Some(rest) = key.strip_prefix("_has:") {
        let mut parts = rest.splitn(3, ':');
        let (Some(source), Some(code), Some(inner_key)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(FhirError::invalid(format!(
                "{key}: _has needs the form _has:Type:parameter:filter"
            )));
        };
        let param = registry.get(source, code).ok_or_else(|| {
            FhirError::invalid(format!("{key}: {source} has no search parameter {code:?}"))
        })?;
        if param.kind != ParamType::Reference {
            return Err(FhirError::invalid(format!(
                "{key}: {source}.{code} is not a reference parameter"
            )));
        }
        if let Some(t) = ty
            && !param.targets.is_empty()
            && !param.targets.iter().any(|x| x == t)
        {
            return Err(FhirError::invalid(format!(
                "{key}: {source}.{code} never refers to {t}"
            )));
        }
        let inner = parse_filter(registry, Some(source), inner_key, value, depth + 1)?;
        return Ok(Filter::Has {
            source: source.to_string(),
            code: Codes::of(registry, Some(source), &param.code),
            inner: inner.into_list(),
        });
    }
    if let Some((head, rest)) = key.split_once('.') {
        let (name, modifier) = match head.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (head, None),
        };
        let param = registry.get(lookup_ty, name).ok_or_else(|| {
            FhirError::invalid(format!("unknown search parameter {name:?} for {lookup_ty}"))
        })?;
        if param.kind != ParamType::Reference {
            return Err(FhirError::invalid(format!(
                "{key}: only reference parameters can be chained; {name} is not one"
            )));
        }
        let candidates: Vec<String> = match modifier {
            Some(t) if param.targets.is_empty() || param.targets.iter().any(|x| x == t) => {
                vec![t.to_string()]
            }
            Some(t) => {
                return Err(FhirError::invalid(format!(
                    "{key}: {name} never refers to {t}"
                )));
            }
            None => param.targets.clone(),
        };
        let inner_name = rest.split([':', '.']).next().unwrap_or(rest);
        let mut targets = Vec::new();
        for t in candidates {
            let known = matches!(inner_name, "_id" | "_lastUpdated" | "_has")
                || registry.get(&t, inner_name).is_some();
            if known {
                let inner = parse_filter(registry, Some(&t), rest, value, depth + 1)?;
                targets.push((t, inner.into_list()));
            }
        }
        if targets.is_empty() {
            return Err(FhirError::invalid(format!(
                "{key}: no target type of {name} has a search parameter {inner_name:?}"
            )));
        }
        return Ok(Filter::Chain {
            code: Codes::of(registry, ty, &param.code),
            targets,
        });
    }
    let (name, modifier) = match key.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (key, None),
    };
    match name {
        "_id" => {
            return match modifier {
                None => Ok(Filter::Id(split_or(value))),
                Some(m) => Err(unsupported_modifier(name, m)),
            };
        }
        "_lastUpdated" => {
            return match modifier {
                None => Ok(Filter::LastUpdated(date_values(name, value)?)),
                Some(m) => Err(unsupported_modifier(name, m)),
            };
        }
        "_list" => {
            return match modifier {
                None => Ok(Filter::List(value.to_string())),
                Some(m) => Err(unsupported_modifier(name, m)),
            };
        }
        _ => {}
    }
    let param = registry.get(lookup_ty, name).ok_or_else(|| {
        FhirError::invalid(format!("unknown search parameter {name:?} for {lookup_ty}"))
    })?;
    if param.kind == ParamType::Special && param.code == "near" && param.expression.is_some() {
        return match modifier {
            None => parse_near(value),
            Some(m) => Err(unsupported_modifier(name, m)),
        };
    }
    if param.kind == ParamType::Composite && param.expression.is_some() {
        return match modifier {
            None => composite_filter(registry, ty, param, value),
            Some(m) => Err(unsupported_modifier(name, m)),
        };
    }
    let Some(table) = Table::of(param.kind).filter(|_| param.expression.is_some()) else {
        return Err(FhirError::not_supported(format!(
            "search parameter {name} ({:?}) cannot be evaluated by this server",
            param.kind
        )));
    };
    let code = Codes::of(registry, ty, &param.code);
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => {
                return Err(FhirError::invalid(format!(
                    "{key}: the value must be true or false"
                )));
            }
        };
        return Ok(Filter::Missing {
            table,
            code,
            missing,
        });
    }
    let index = |cond: Cond, negate: bool| Filter::Index {
        table,
        code: code.clone(),
        cond,
        negate,
    };
    let bad_modifier = |m: &str| Err(unsupported_modifier(name, m));
    match (param.kind, modifier) {
        (ParamType::Token, None) => Ok(index(Cond::Token(token_values(value)), false)),
        (ParamType::Token, Some("not")) => Ok(index(Cond::Token(token_values(value)), true)),
        (ParamType::Token, Some("text")) => Ok(index(
            Cond::TokenText(split_or(value).iter().map(|v| fold(v)).collect()),
            false,
        )),
        (ParamType::Token, Some("of-type")) => {
            let values = split_or(value)
                .iter()
                .map(|v| {
                    let parts = split_bars(v);
                    match parts.as_slice() {
                        [system, code, value] if !code.is_empty() && !value.is_empty() => {
                            Ok(TokenValue {
                                system: Some(format!("{system}|{code}")),
                                code: Some(value.clone()),
                            })
                        }
                        _ => Err(FhirError::invalid(format!(
                            "{key}: {v:?} is not system|code|value"
                        ))),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Filter::Index {
                table: Table::Token,
                code: code.suffixed(":of-type"),
                cond: Cond::Token(values),
                negate: false,
            })
        }
        (ParamType::Token, Some(m @ ("in" | "not-in"))) => Ok(Filter::ValueSet {
            code,
            url: value.to_string(),
            negate: m == "not-in",
        }),
        (ParamType::Token, Some(m @ ("above" | "below"))) => {
            // Subsumption in a CodeSystem stored on the server, resolved like a value set.
            let (Some(system), code_value) = split_bar(value) else {
                return Err(FhirError::invalid(format!(
                    "{key}: {value:?} needs the form system|code"
                )));
            };
            if system.is_empty() || code_value.is_empty() {
                return Err(FhirError::invalid(format!(
                    "{key}: {value:?} needs the form system|code"
                )));
            }
            Ok(Filter::ValueSet {
                code,
                url: format!("{HIERARCHY}{m}|{system}|{code_value}"),
                negate: false,
            })
        }
        (ParamType::String, m) => {
            let mode = match m {
                None => StringMode::StartsWith,
                Some("exact") => StringMode::Exact,
                Some("contains") => StringMode::Contains,
                Some(m) => return bad_modifier(m),
            };
            Ok(index(Cond::String(mode, split_or(value)), false))
        }
        (ParamType::Reference, Some("identifier")) => Ok(Filter::Index {
            table: Table::Token,
            code: code.suffixed(":identifier"),
            cond: Cond::Token(token_values(value)),
            negate: false,
        }),
        (ParamType::Reference, m) => {
            let forced_type = match m {
                None => None,
                Some(t) if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
                    if !param.targets.is_empty() && !param.targets.iter().any(|x| x == t) {
                        return Err(FhirError::invalid(format!(
                            "{key}: {name} never refers to {t}"
                        )));
                    }
                    Some(t)
                }
                Some(m) => return bad_modifier(m),
            };
            let values = split_or(value)
                .iter()
                .map(|v| reference_value(v, forced_type))
                .collect();
            Ok(index(Cond::Reference(values), false))
        }
        (ParamType::Date, None) => Ok(index(Cond::Date(date_values(name, value)?), false)),
        (ParamType::Number, None) => Ok(index(
            Cond::Number(
                split_or(value)
                    .iter()
                    .map(|v| parse_number(name, v))
                    .collect::<Result<_>>()?,
            ),
            false,
        )),
        (ParamType::Quantity, None) => Ok(index(
            Cond::Quantity(
                split_or(value)
                    .iter()
                    .map(|v| parse_quantity(name, v))
                    .collect::<Result<_>>()?,
            ),
            false,
        )),
        (ParamType::Uri, None) => Ok(index(Cond::Uri(split_or(value)), false)),
        (ParamType::Uri, Some("below")) => Ok(index(Cond::UriBelow(split_or(value)), false)),
        (ParamType::Uri, Some("above")) => {
            // Every stored URI that is a prefix of the value, at `/` boundaries.
            let mut values = Vec::new();
            for v in split_or(value) {
                let mut end = v.len();
                loop {
                    values.push(v[..end].to_string());
                    match v[..end].rfind('/') {
                        Some(i) if i > 0 && !v[..i].ends_with('/') => end = i,
                        _ => break,
                    }
                }
            }
            Ok(index(Cond::Uri(values), false))
        }
        (_, Some(m)) => bad_modifier(m),
        (ParamType::Composite | ParamType::Special, None) => Err(FhirError::not_supported(
            format!("search parameter {name} cannot be evaluated by this server"),
        )),
    }
}

/// Splits on `sep` where it is not escaped by `\`, keeping every escape for later parsing.
fn split_unescaped(value: &str, sep: char) -> Vec<String> {
    split_escaped(value, sep, |_| false)
}

/// The condition a plain (unmodified) value of a parameter type gives.
fn plain_cond(kind: ParamType, name: &str, value: &str) -> Result<Cond> {
    Ok(match kind {
        ParamType::Token => Cond::Token(token_values(value)),
        ParamType::String => Cond::String(StringMode::StartsWith, split_or(value)),
        ParamType::Reference => Cond::Reference(
            split_or(value)
                .iter()
                .map(|v| reference_value(v, None))
                .collect(),
        ),
        ParamType::Date => Cond::Date(date_values(name, value)?),
        ParamType::Number => Cond::Number(
            split_or(value)
                .iter()
                .map(|v| parse_number(name, v))
                .collect::<Result<_>>()?,
        ),
        ParamType::Quantity => Cond::Quantity(
            split_or(value)
                .iter()
                .map(|v| parse_quantity(name, v))
                .collect::<Result<_>>()?,
        ),
        ParamType::Uri => Cond::Uri(split_or(value)),
        ParamType::Composite | ParamType::Special => {
            return Err(FhirError::not_supported(format!(
                "{name}: nested composite or special parameters are not supported"
            )));
        }
    })
}

/// `param=a$b[,a$b...]` for a composite of the supported shape (see `extract::composite`).
fn composite_filter(
    registry: &Registry,
    ty: Option<&str>,
    param: &crate::search::registry::SearchParam,
    value: &str,
) -> Result<Filter> {
    let name = param.code.as_str();
    let codes = Codes::of(registry, ty, name);
    let (Some(k0), Some(k1)) = (
        param.components.first().and_then(|c| c.kind),
        param.components.get(1).and_then(|c| c.kind),
    ) else {
        return Err(FhirError::not_supported(format!(
            "search parameter {name} cannot be evaluated by this server"
        )));
    };
    let table = Table::of(k1).ok_or_else(|| {
        FhirError::not_supported(format!("search parameter {name} cannot be evaluated"))
    })?;
    // Codes with rows of their own, and composites searched by their parts.
    let mut by_parts: Vec<&[String; 2]> = Vec::new();
    let mut row_codes: Vec<String> = Vec::new();
    for c in codes.0 {
        match ty.and_then(|t| registry.by_parts(t, &c)) {
            Some(parts) if k0 == ParamType::Token => by_parts.push(parts),
            _ => row_codes.push(c),
        }
    }
    let mut alts = Vec::new();
    let mut lists: Vec<Vec<Filter>> = Vec::new();
    for alt in split_unescaped(value, ',') {
        let parts = split_unescaped(&alt, '$');
        let [head, tail] = parts.as_slice() else {
            return Err(FhirError::invalid(format!(
                "{name}: {alt:?} is not two values joined by $"
            )));
        };
        let mut keys = Vec::new();
        match k0 {
            ParamType::Token => {
                for t in token_values(head) {
                    let Some(code) = t.code else {
                        return Err(FhirError::invalid(format!("{name}: {head:?} needs a code")));
                    };
                    for c in &row_codes {
                        keys.push(crate::search::extract::composite_token_key(
                            c,
                            &code,
                            t.system.as_deref(),
                        ));
                    }
                }
            }
            _ => {
                for r in split_or(head).iter().map(|v| reference_value(v, None)) {
                    let tail = match r {
                        RefValue::Url(u) => u,
                        RefValue::Local(Some(t), id) => format!("{t}/{id}"),
                        RefValue::Local(None, id) => format!("*/{id}"),
                    };
                    keys.extend(row_codes.iter().map(|c| format!("{c}${tail}")));
                }
            }
        }
        let cond = plain_cond(k1, name, tail)?;
        for [head_code, tail_code] in &by_parts {
            lists.push(vec![
                Filter::Index {
                    table: Table::Token,
                    code: Codes::of(registry, ty, head_code),
                    cond: Cond::Token(token_values(head)),
                    negate: false,
                },
                Filter::Index {
                    table,
                    code: Codes::of(registry, ty, tail_code),
                    cond: cond.clone(),
                    negate: false,
                },
            ]);
        }
        if !row_codes.is_empty() {
            alts.push((keys, cond));
        }
    }
    if lists.is_empty() {
        return Ok(Filter::Composite { table, alts });
    }
    if alts.is_empty() && lists.len() == 1 {
        return Ok(Filter::All(lists.remove(0)));
    }
    if !alts.is_empty() {
        lists.push(vec![Filter::Composite { table, alts }]);
    }
    Ok(Filter::AnyOf(lists))
}

/// `near=latitude|longitude|distance|unit` (location.html#positional): distance defaults to
/// 1 km; units km, m, [mi_i] (UCUM codes) are understood.
fn parse_near(value: &str) -> Result<Filter> {
    let bad = |why: &str| FhirError::invalid(format!("near: {value:?}: {why}"));
    let parts = split_bars(value);
    let num = |i: usize| -> Result<Option<f64>> {
        match parts.get(i).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(t) => t
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| bad("not a number")),
        }
    };
    let (Some(lat), Some(long)) = (num(0)?, num(1)?) else {
        return Err(bad("needs latitude|longitude"));
    };
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&long) {
        return Err(bad("latitude or longitude out of range"));
    }
    let distance = num(2)?.unwrap_or(1.0);
    let km = match parts.get(3).map(String::as_str) {
        None | Some("") | Some("km") => distance,
        Some("m") => distance / 1000.0,
        Some("[mi_i]" | "mi") => distance * 1.609_344,
        Some(u) => return Err(bad(&format!("unknown distance unit {u}"))),
    };
    if km < 0.0 {
        return Err(bad("negative distance"));
    }
    // Degrees of latitude are ~111.32 km; of longitude, that times cos(latitude).
    let d_lat = km / 111.32;
    let cos = lat.to_radians().cos().max(1e-6);
    let d_long = (km / (111.32 * cos)).min(180.0);
    Ok(Filter::Near {
        lat: (lat - d_lat, lat + d_lat),
        long: (long - d_long, long + d_long),
    })
}

fn parse_sort(
    registry: &Registry,
    types: &[Option<String>],
    value: &str,
) -> Result<Vec<(SortKey, bool)>> {
    let lookup_ty = types.first().cloned().flatten();
    let lookup_ty = lookup_ty.as_deref().unwrap_or("Resource");
    value
        .split(',')
        .filter(|k| !k.is_empty())
        .map(|k| {
            let (name, desc) = match k.strip_prefix('-') {
                Some(n) => (n, true),
                None => (k, false),
            };
            let key = match name {
                "_id" => SortKey::Id,
                "_lastUpdated" => SortKey::LastUpdated,
                _ => {
                    let param = registry.get(lookup_ty, name).ok_or_else(|| {
                        FhirError::invalid(format!(
                            "_sort: unknown search parameter {name:?} for {lookup_ty}"
                        ))
                    })?;
                    let table = Table::of(param.kind)
                        .filter(|_| param.expression.is_some())
                        .ok_or_else(|| {
                            FhirError::not_supported(format!("_sort: cannot sort by {name}"))
                        })?;
                    SortKey::Param {
                        table,
                        codes: types
                            .iter()
                            .map(|t| (t.clone(), Codes::of(registry, t.as_deref(), &param.code)))
                            .collect(),
                    }
                }
            };
            Ok((key, desc))
        })
        .collect()
}

fn parse_include(registry: &Registry, key: &str, value: &str, rev: bool) -> Result<Include> {
    let iterate = match key.split_once(':') {
        None => false,
        Some((_, "iterate" | "recurse")) => true,
        Some((_, m)) => return Err(unsupported_modifier(key, m)),
    };
    let mut parts = value.split(':');
    let source = parts.next().unwrap_or_default();
    let code = parts.next();
    let target = parts.next();
    if source == "*" && !rev {
        // `_include=*`: every reference of every matched resource.
        return Ok(Include {
            source: "*".into(),
            code: None,
            target: None,
            iterate,
        });
    }
    let code = match code {
        None | Some("*") => None,
        Some(c) => {
            let p = registry.get(source, c).ok_or_else(|| {
                FhirError::invalid(format!("{key}={value}: {source} has no parameter {c:?}"))
            })?;
            if p.kind != ParamType::Reference {
                return Err(FhirError::invalid(format!(
                    "{key}={value}: {source}.{c} is not a reference parameter"
                )));
            }
            Some(c.to_string())
        }
    };
    Ok(Include {
        source: source.to_string(),
        code,
        target: target.map(str::to_string),
        iterate,
    })
}

/// Whether `lenient` turns an error into a warning: unknown and unsupported parameters are
/// ignorable, malformed values of known parameters are not.
fn ignorable(e: &FhirError) -> bool {
    e.issues.first().is_some_and(|i| {
        i.code == "not-supported" || i.diagnostics.contains("unknown search parameter")
    })
}

impl SearchQuery {
    /// Parses query parameters for a search over `res_type`. With `lenient`, unknown or
    /// unsupported parameters are recorded in `ignored` instead of failing.
    pub fn parse(
        registry: &Registry,
        res_type: &str,
        params: &[(String, String)],
        lenient: bool,
        default_count: usize,
        max_count: usize,
    ) -> Result<SearchQuery> {
        Self::parse_scoped(
            registry,
            Some(vec![res_type.to_string()]),
            params,
            lenient,
            default_count,
            max_count,
        )
    }

    /// Parses a search over several types (`types`), or every type (`None`, where only the
    /// parameters common to all resources apply).
    pub fn parse_scoped(
        registry: &Registry,
        types: Option<Vec<String>>,
        params: &[(String, String)],
        lenient: bool,
        default_count: usize,
        max_count: usize,
    ) -> Result<SearchQuery> {
        let scopes: Vec<Scope> = match types {
            Some(ts) => ts
                .into_iter()
                .map(|t| Scope {
                    ty: Some(t),
                    filters: Vec::new(),
                    driver: Driver::Auto,
                })
                .collect(),
            None => vec![Scope {
                ty: None,
                filters: Vec::new(),
                driver: Driver::Auto,
            }],
        };
        let mut q = SearchQuery {
            scopes,
            sort: Vec::new(),
            count: default_count.min(max_count),
            offset: 0,
            cursor: Cursor::First,
            ignored: Vec::new(),
            count_only: false,
            total: TotalMode::Default,
            includes: Vec::new(),
            revincludes: Vec::new(),
            statistics: false,
        };
        for (key, value) in params {
            let name = key.split([':', '.']).next().unwrap_or(key);
            let result = match name {
                "_count" => value
                    .parse::<usize>()
                    .map(|n| q.count = n.min(max_count))
                    .map_err(|_| FhirError::invalid(format!("_count: {value:?} is not a number"))),
                "_offset" => value
                    .parse::<usize>()
                    .map(|n| q.offset = n)
                    .map_err(|_| FhirError::invalid(format!("_offset: {value:?} is not a number"))),
                "_cursor" => parse_cursor(value).map(|c| q.cursor = c),
                "_summary" => match value.as_str() {
                    "count" => {
                        q.count_only = true;
                        Ok(())
                    }
                    "true" | "false" | "text" | "data" => Ok(()),
                    _ => Err(FhirError::invalid(format!(
                        "_summary: {value:?} is not true, false, text, data or count"
                    ))),
                },
                "_total" => match value.as_str() {
                    "none" => {
                        q.total = TotalMode::None;
                        Ok(())
                    }
                    "estimate" | "accurate" => {
                        q.total = TotalMode::Accurate;
                        Ok(())
                    }
                    _ => Err(FhirError::invalid(format!(
                        "_total: {value:?} is not none, estimate or accurate"
                    ))),
                },
                "_sort" => {
                    let types: Vec<Option<String>> =
                        q.scopes.iter().map(|s| s.ty.clone()).collect();
                    parse_sort(registry, &types, value).map(|s| q.sort.extend(s))
                }
                "_include" => {
                    parse_include(registry, key, value, false).map(|i| q.includes.push(i))
                }
                "_revinclude" => {
                    parse_include(registry, key, value, true).map(|i| q.revincludes.push(i))
                }
                "_text" | "_content" | "_query" | "_filter" | "_contained" | "_containedType" => {
                    Err(FhirError::not_supported(format!("{name} is not supported")))
                }
                n if CONTROL.contains(&n) => Ok(()),
                _ => q.add_filter(registry, key, value),
            };
            match result {
                Ok(()) => {}
                Err(e) if lenient && ignorable(&e) => q.ignored.push(format!(
                    "{key}: {}",
                    e.issues.first().map_or("", |i| i.diagnostics.as_str())
                )),
                Err(e) => return Err(e),
            }
        }
        Ok(q)
    }

    /// Adds one filter to every scope (parsed for each scope's type).
    fn add_filter(&mut self, registry: &Registry, key: &str, value: &str) -> Result<()> {
        let mut parsed = Vec::with_capacity(self.scopes.len());
        for scope in &self.scopes {
            parsed.push(parse_filter(registry, scope.ty.as_deref(), key, value, 0)?);
        }
        for (scope, f) in self.scopes.iter_mut().zip(parsed) {
            scope.filters.extend(f.into_list());
        }
        Ok(())
    }

    /// Restricts the search to the compartment of `Type/id`. `params` gives, per resource
    /// type, the reference parameters that place a resource in it (`{def}` marks the
    /// compartment's own type). A scope for one type outside the compartment is dropped;
    /// an all-types scope gets every type of the compartment (or of `types` when given).
    /// A restricted parameter (`Registry::restricted`) counts as its base when it restricts
    /// to the compartment's type, and as nothing otherwise: the filter's rows must refer to
    /// `Type/id` anyway.
    pub fn restrict_to_compartment(
        &mut self,
        registry: &Registry,
        compartment_type: &str,
        id: &str,
        params: &HashMap<String, Vec<String>>,
        types: Option<&[String]>,
    ) {
        let pairs_for = |ty: &str| -> Option<(String, Vec<String>)> {
            let mut codes: Vec<String> = Vec::new();
            for c in params.get(ty)?.iter().filter(|c| *c != "{def}") {
                let code = match registry.restricted(ty, c) {
                    Some(r) if r.target_type == compartment_type => &r.base,
                    Some(_) => continue,
                    None => c,
                };
                if !codes.contains(code) {
                    codes.push(code.clone());
                }
            }
            (!codes.is_empty()).then(|| (ty.to_string(), codes))
        };
        self.scopes.retain_mut(|scope| {
            let (pairs, itself) = match &scope.ty {
                Some(ty) => (
                    pairs_for(ty).into_iter().collect::<Vec<_>>(),
                    ty == compartment_type,
                ),
                None => {
                    let mut all: Vec<&String> = params.keys().collect();
                    all.sort();
                    let wanted = |t: &str| types.is_none_or(|ts| ts.iter().any(|x| x == t));
                    (
                        all.into_iter()
                            .filter(|t| wanted(t))
                            .filter_map(|t| pairs_for(t))
                            .collect(),
                        wanted(compartment_type),
                    )
                }
            };
            if pairs.is_empty() && !itself {
                return false;
            }
            scope.filters.push(Filter::Compartment {
                pairs,
                target_type: compartment_type.to_string(),
                target_id: id.to_string(),
                itself,
            });
            true
        });
    }

    /// Whether no scope is left (a compartment search over a type outside the compartment).
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    pub fn has_filters(&self) -> bool {
        self.scopes.iter().any(|s| !s.filters.is_empty())
    }

    pub fn is_sorted(&self) -> bool {
        !self.sort.is_empty()
    }

    /// For a one-type search, SQL counting (up to `cap`) the candidates of each filter that
    /// could drive it, as (filter position, SQL); empty when the choice is obvious (an
    /// `_id`, compartment or `_list` filter) or the search is sorted.
    pub fn estimate_sqls(&self, cap: i64) -> Vec<(usize, SqlBuilder)> {
        let [scope] = self.scopes.as_slice() else {
            return Vec::new();
        };
        let Some(ty) = scope.ty.as_deref() else {
            return Vec::new();
        };
        if self.is_sorted()
            || scope
                .filters
                .iter()
                .any(|f| f.rank() < 1 || matches!(f, Filter::Compartment { .. } | Filter::List(_)))
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        // A lone filter's estimate counts resources, not rows: it is then the total.
        let head = if self.estimate_is_total() {
            "SELECT COUNT(*) FROM (SELECT DISTINCT rid FROM "
        } else {
            "SELECT COUNT(*) FROM (SELECT 1 FROM "
        };
        for (i, f) in scope.filters.iter().enumerate() {
            if !matches!(
                f,
                Filter::Index { negate: false, .. } | Filter::Composite { .. }
            ) {
                continue;
            }
            let mut b = SqlBuilder::new(head);
            match f {
                Filter::Index {
                    table, code, cond, ..
                } => {
                    b.push(table.name()).push(" WHERE ");
                    code.sql(&mut b, Some(ty), "param");
                    b.push(" AND (");
                    cond_sql(&mut b, cond);
                    b.push(")");
                }
                Filter::Composite { table, alts } => {
                    b.push(table.name()).push(" WHERE (");
                    composite_alts_sql(&mut b, Some(ty), "param", alts);
                    b.push(")");
                }
                _ => continue,
            }
            b.push(" LIMIT ").int(cap).push(") AS m");
            out.push((f.rank(), i, b));
        }
        // Likeliest to be selective first, so the caller can stop at a small one.
        out.sort_by_key(|(rank, i, _)| (*rank, *i));
        out.into_iter().map(|(_, i, b)| (i, b)).collect()
    }

    /// Whether the search is one type and one positive index filter: that filter's
    /// estimate (see [`SearchQuery::estimate_sqls`]), when below the cap, is then the exact
    /// number of matches. Index rows exist only for current, undeleted versions and their
    /// `param` holds the type, so the distinct `rid`s of the filter's rows are the matches.
    pub fn estimate_is_total(&self) -> bool {
        matches!(
            self.scopes.as_slice(),
            [Scope { ty: Some(_), filters, .. }]
                if matches!(filters.as_slice(), [Filter::Index { negate: false, .. }])
        )
    }

    /// Sets how the (only) scope is driven, after [`SearchQuery::estimate_sqls`]. With
    /// only large candidate sets and no chain or `_has` to drive, the scan plan is used.
    pub fn choose_driver(&mut self, estimates: &[(usize, i64)], cap: i64) {
        let Some(scope) = self.scopes.first_mut() else {
            return;
        };
        let best = estimates.iter().min_by_key(|(_, n)| *n);
        scope.driver = match best {
            Some((i, n)) if *n < cap => Driver::Filter(*i),
            Some(_) => {
                if scope
                    .filters
                    .iter()
                    .any(|f| matches!(f, Filter::Chain { .. } | Filter::Has { .. }))
                {
                    Driver::Auto
                } else {
                    Driver::Scan
                }
            }
            None => Driver::Auto,
        };
    }

    /// Whether the scan plan was chosen (its total is not cheap).
    pub fn scans(&self) -> bool {
        self.scopes.iter().any(|s| s.driver == Driver::Scan)
    }

    /// The value set URLs that `:in` / `:not-in` filters name.
    pub fn value_set_urls(&self) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(filters: &[Filter], out: &mut Vec<String>) {
            for f in filters {
                match f {
                    Filter::ValueSet { url, .. } if !out.contains(url) => out.push(url.clone()),
                    Filter::Chain { targets, .. } => {
                        for (_, inner) in targets {
                            walk(inner, out);
                        }
                    }
                    Filter::Has { inner, .. } => walk(inner, out),
                    _ => {}
                }
            }
        }
        for s in &self.scopes {
            walk(&s.filters, &mut out);
        }
        out
    }

    /// Replaces `:in` / `:not-in` filters with the codes of their (expanded) value sets.
    pub fn bind_value_sets(&mut self, sets: &HashMap<String, Vec<TokenValue>>) {
        fn walk(filters: &mut [Filter], sets: &HashMap<String, Vec<TokenValue>>) {
            for f in filters {
                match f {
                    Filter::ValueSet { code, url, negate } => {
                        let codes = sets.get(url.as_str()).cloned().unwrap_or_default();
                        *f = Filter::Index {
                            table: Table::Token,
                            code: code.clone(),
                            cond: Cond::Token(codes),
                            negate: *negate,
                        };
                    }
                    Filter::Chain { targets, .. } => {
                        for (_, inner) in targets {
                            walk(inner, sets);
                        }
                    }
                    Filter::Has { inner, .. } => walk(inner, sets),
                    _ => {}
                }
            }
        }
        for s in &mut self.scopes {
            walk(&mut s.filters, sets);
        }
    }

    /// Appends the conditions over alias `r` (table `resource`), without `WHERE`.
    fn conditions(&self, b: &mut SqlBuilder) {
        b.push("r.deleted = 0 AND ");
        if self.scopes.is_empty() {
            b.push("1 = 0");
            return;
        }
        let many = self.scopes.len() > 1;
        if many {
            b.push("(");
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            if i > 0 {
                b.push(" OR ");
            }
            b.push("(");
            scope_sql(b, scope.ty.as_deref(), &scope.filters, "r", 0, scope.driver);
            b.push(")");
        }
        if many {
            b.push(")");
        }
    }

    fn where_clause(&self, b: &mut SqlBuilder) {
        b.push(" WHERE ");
        self.conditions(b);
    }

    fn order_by(&self, b: &mut SqlBuilder, reverse: bool) {
        b.push(" ORDER BY ");
        for (key, desc) in &self.sort {
            let desc = *desc != reverse;
            let dir = if desc { "DESC" } else { "ASC" };
            match key {
                SortKey::Id => {
                    b.push(&format!("r.res_id {dir}, "));
                }
                SortKey::LastUpdated => {
                    b.push(&format!("r.last_updated {dir}, "));
                }
                SortKey::Param { table, codes } => {
                    let (asc_col, desc_col) = table.sort_columns();
                    let col = if desc { desc_col } else { asc_col };
                    b.push(&format!(
                        "(SELECT {col} FROM {} s WHERE s.rid = r.rid AND (",
                        table.name()
                    ));
                    // `s.rid = r.rid` fixes the type: each scope type's codes (an every-type
                    // scope: each code's range of keys) are exact.
                    let param = table.probe_param("s", b.statistics);
                    or_list(b, codes, |b, (t, code)| code.sql(b, t.as_deref(), &param));
                    b.push(&format!(")) {dir} NULLS LAST, "));
                }
            }
        }
        b.push(if reverse { "r.rid DESC" } else { "r.rid ASC" });
    }

    /// SQL selecting `(rid, res_type, res_id, body)` of one page of matches plus one more
    /// row (to tell whether another page follows). For [`Cursor::Before`] the rows come in
    /// reverse order.
    pub fn page_sql(&self) -> SqlBuilder {
        let mut b = self.builder(
            "SELECT r.rid, r.res_type, r.res_id, v.body FROM resource r \
             JOIN resource_version v ON v.seq = r.seq",
        );
        let reverse = match self.ordered_single() {
            Some((ty, table, code, cond)) => {
                // The filter's lookup index ends in `rid`: the page is a range of it read
                // in order, however many resources match (bulk paging). Its `param` keeps
                // to the type (see `Filter::drives_typed`); testing `r.res_type` as well
                // had SQLite read the rows through (res_type, rid) and sort the page,
                // bodies and all.
                b.push(&format!(
                    " WHERE r.deleted = 0 AND r.rid IN (SELECT rid FROM {} WHERE param = ",
                    table.name()
                ))
                .int(param_key(ty, code))
                .push(" AND (");
                cond_sql(&mut b, cond);
                b.push(")");
                let reverse = self.cursor_bound(&mut b, "rid");
                let dir = if reverse { "DESC" } else { "ASC" };
                b.push(&format!(" ORDER BY rid {dir} LIMIT "))
                    .int(self.count as i64 + 1)
                    .push(")");
                reverse
            }
            None => {
                self.where_clause(&mut b);
                self.cursor_bound(&mut b, "r.rid")
            }
        };
        self.order_by(&mut b, reverse);
        b.push(" LIMIT ").int(self.count as i64 + 1);
        if self.offset > 0 {
            b.push(" OFFSET ").int(self.offset as i64);
        }
        b
    }

    /// Appends the keyset condition of the cursor on `col`; returns whether the page is
    /// read backwards ([`Cursor::Before`]).
    fn cursor_bound(&self, b: &mut SqlBuilder, col: &str) -> bool {
        match self.cursor {
            Cursor::First => false,
            Cursor::After(rid) => {
                b.push(&format!(" AND {col} > ")).int(rid);
                false
            }
            Cursor::Before(rid) => {
                b.push(&format!(" AND {col} < ")).int(rid);
                true
            }
        }
    }

    /// A search with one filter, an exact token (`system|code`) or a typed reference, in
    /// the default order: `(type, table, code, condition)` to page straight from its index.
    fn ordered_single(&self) -> Option<(&str, Table, &str, &Cond)> {
        let [scope] = self.scopes.as_slice() else {
            return None;
        };
        let ty = scope.ty.as_deref()?;
        let [
            Filter::Index {
                table,
                code,
                cond,
                negate: false,
            },
        ] = scope.filters.as_slice()
        else {
            return None;
        };
        if self.is_sorted() || self.offset > 0 {
            return None;
        }
        let exact = match cond {
            Cond::Token(values) => {
                matches!(values.as_slice(), [TokenValue { system: Some(s), code: Some(_) }] if !s.is_empty())
            }
            Cond::Reference(values) => {
                matches!(values.as_slice(), [RefValue::Local(Some(_), _)])
            }
            _ => false,
        };
        // A restricted parameter's typed reference names its target type itself.
        let code = match (&code.1, cond) {
            (Some(r), Cond::Reference(values)) => match (code.0.as_slice(), values.as_slice()) {
                ([base], [RefValue::Local(Some(t), _)]) if *t == r.target_type => base.as_str(),
                _ => return None,
            },
            _ => code.single()?,
        };
        exact.then_some((ty, *table, code, cond))
    }

    /// A builder for this search's SQL, told whether the database plans from statistics.
    fn builder(&self, sql: &str) -> SqlBuilder {
        let mut b = SqlBuilder::new(sql);
        b.statistics = self.statistics;
        b
    }

    /// SQL selecting the ids of at most `limit` matches (conditional interactions).
    pub fn ids_sql(&self, limit: usize) -> SqlBuilder {
        let mut b = self.builder("SELECT r.res_id FROM resource r");
        self.where_clause(&mut b);
        b.push(" ORDER BY r.rid LIMIT ").int(limit as i64);
        b
    }

    /// SQL counting matches, at most `cap` of them when given.
    pub fn count_sql(&self, cap: Option<i64>) -> SqlBuilder {
        let mut b = self.builder("SELECT COUNT(*) FROM (SELECT 1 FROM resource r");
        self.where_clause(&mut b);
        if let Some(cap) = cap {
            b.push(" LIMIT ").int(cap);
        }
        b.push(") AS m");
        b
    }
}

fn parse_cursor(v: &str) -> Result<Cursor> {
    let bad = || FhirError::invalid(format!("_cursor: {v:?} is not a paging cursor"));
    let (kind, n) = v.split_at_checked(1).ok_or_else(bad)?;
    let n: i64 = n.parse().map_err(|_| bad())?;
    match kind {
        "a" => Ok(Cursor::After(n)),
        "b" => Ok(Cursor::Before(n)),
        _ => Err(bad()),
    }
}

/// The conditions of one scope over `alias`: its type, then the driving filter as
/// `rid IN (...)`, then the others as probes.
fn scope_sql(
    b: &mut SqlBuilder,
    ty: Option<&str>,
    filters: &[Filter],
    alias: &str,
    depth: usize,
    choice: Driver,
) {
    let driver = match choice {
        Driver::Auto => filters
            .iter()
            .enumerate()
            .filter(|(_, f)| f.can_drive())
            .min_by_key(|(_, f)| f.rank())
            .map(|(i, _)| i),
        Driver::Filter(i) => Some(i),
        Driver::Scan => None,
    };
    // Under a driver that keeps to the type, testing `{alias}.res_type` as well made SQLite
    // look each candidate up through the (res_type, rid) index instead of by rowid (a third
    // more work per candidate).
    let typed_driver = driver
        .and_then(|i| filters.get(i))
        .is_some_and(Filter::drives_typed);
    match ty {
        Some(t) if !typed_driver => {
            b.push(&format!("{alias}.res_type = ")).text(t);
        }
        _ => {
            b.push("1 = 1");
        }
    }
    // Under a driver read from an index table, the probes that look at nothing but `rid`
    // run inside its subquery, on the index rows: a candidate they reject costs SQLite no
    // visit to its `resource` row. PostgreSQL orders the joins itself.
    let driving = driver.and_then(|i| filters.get(i).map(|f| (i, f)));
    let fold = !b.statistics;
    let inside = |i: usize, f: &Filter| {
        fold && driving
            .is_some_and(|(d, df)| d != i && df.drives_through_index() && f.probes_rid_only())
    };
    let moved: Vec<&Filter> = filters
        .iter()
        .enumerate()
        .filter(|(i, f)| inside(*i, f))
        .map(|(_, f)| f)
        .collect();
    if let Some((_, f)) = driving {
        b.push(" AND ");
        filter_sql(b, ty, f, alias, depth, Role::Drive(&moved));
    }
    for (i, f) in filters.iter().enumerate() {
        if Some(i) != driver && !inside(i, f) {
            b.push(" AND ");
            filter_sql(b, ty, f, alias, depth, Role::Probe);
        }
    }
}

/// What a filter's SQL is for.
#[derive(Clone, Copy)]
enum Role<'f> {
    /// Driving its scope (`rid IN (...)`), with these filters probed inside its subquery
    /// (only for filters that [`Filter::drives_through_index`]).
    Drive(&'f [&'f Filter]),
    /// A correlated probe of one candidate.
    Probe,
}

/// `{alias}.rid IN (SELECT rid FROM table WHERE ...)` when driving, else a correlated
/// `[NOT] EXISTS` probe.
fn index_sql(
    b: &mut SqlBuilder,
    ty: Option<&str>,
    alias: &str,
    (table, code): (Table, Option<&Codes>),
    (negate, role, depth): (bool, Role, usize),
    cond: impl FnOnce(&mut SqlBuilder, &str),
) {
    let probes = match role {
        Role::Drive(probes) if !negate => Some(probes),
        _ => None,
    };
    // The driver's index rows, under their own alias for the probes inside.
    let rows = probes.map(|_| format!("{alias}_d"));
    let param = match probes {
        Some(_) => "param".to_string(),
        None => table.probe_param("x", b.statistics),
    };
    if let Some(rows) = &rows {
        b.push(&format!(
            "{alias}.rid IN (SELECT {rows}.rid FROM {} {rows} WHERE ",
            table.name()
        ));
    } else {
        if negate {
            b.push("NOT ");
        }
        b.push(&format!(
            "EXISTS (SELECT 1 FROM {} x WHERE x.rid = {alias}.rid AND ",
            table.name()
        ));
    }
    // A composite's condition carries its own codes. With the type, an equality probe is
    // one seek in the covering lookup index.
    if let Some(code) = code {
        code.sql(b, ty, &param);
        b.push(" AND ");
    }
    b.push("(");
    cond(b, &param);
    b.push(")");
    if let (Some(probes), Some(rows)) = (probes, &rows) {
        for probe in probes {
            b.push(" AND ");
            filter_sql(b, ty, probe, rows, depth, Role::Probe);
        }
    }
    b.push(")");
}

fn or_list<T>(b: &mut SqlBuilder, items: &[T], mut each: impl FnMut(&mut SqlBuilder, &T)) {
    if items.is_empty() {
        b.push("1 = 0");
        return;
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            b.push(" OR ");
        }
        each(b, item);
    }
}

fn filter_sql(
    b: &mut SqlBuilder,
    ty: Option<&str>,
    f: &Filter,
    alias: &str,
    depth: usize,
    role: Role,
) {
    let res_type = |b: &mut SqlBuilder| {
        match ty {
            Some(t) => b.text(t),
            None => b.push(&format!("{alias}.res_type")),
        };
    };
    match f {
        Filter::Id(ids) => {
            b.push(&format!("{alias}.res_id IN ")).list(ids);
        }
        Filter::LastUpdated(values) => {
            b.push("(");
            let col = format!("{alias}.last_updated");
            or_list(b, values, |b, (p, lo, hi)| {
                date_condition(b, &col, &col, *p, *lo, *hi);
            });
            b.push(")");
        }
        Filter::Index {
            table,
            code,
            cond,
            negate,
        } => index_sql(
            b,
            ty,
            alias,
            (*table, Some(code)),
            (*negate, role, depth),
            |b, _| cond_sql(b, cond),
        ),
        Filter::Missing {
            table,
            code,
            missing,
        } => {
            index_sql(
                b,
                ty,
                alias,
                (*table, Some(code)),
                (*missing, Role::Probe, depth),
                |b, _| {
                    b.push("1 = 1");
                },
            );
        }
        Filter::Chain { code, targets } => {
            let inner_alias = format!("c{depth}");
            index_sql(
                b,
                ty,
                alias,
                (Table::Reference, Some(code)),
                (false, role, depth),
                |b, _| {
                    or_list(b, targets, |b, (t, inner)| {
                        b.push("(target_type = ").text(t.clone()).push(&format!(
                        " AND target_id IN (SELECT {inner_alias}.res_id FROM resource {inner_alias} \
                         WHERE {inner_alias}.deleted = 0 AND "
                    ));
                        scope_sql(b, Some(t), inner, &inner_alias, depth + 1, Driver::Auto);
                        b.push("))");
                    });
                },
            );
        }
        Filter::Has {
            source,
            code,
            inner,
        } => {
            let inner_alias = format!("h{depth}");
            b.push(&format!(
                "{alias}.res_id IN (SELECT target_id FROM idx_reference WHERE "
            ));
            code.sql(b, Some(source), "param");
            b.push(" AND target_type = ");
            res_type(b);
            b.push(&format!(
                " AND rid IN (SELECT {inner_alias}.rid FROM resource {inner_alias} \
                 WHERE {inner_alias}.deleted = 0 AND "
            ));
            scope_sql(
                b,
                Some(source),
                inner,
                &inner_alias,
                depth + 1,
                Driver::Auto,
            );
            b.push("))");
        }
        Filter::List(id) => {
            b.push(&format!(
                "{alias}.res_id IN (SELECT x.target_id FROM idx_reference x \
                 JOIN resource l ON l.rid = x.rid WHERE l.res_type = 'List' AND l.res_id = "
            ))
            .text(id.clone())
            .push(" AND l.deleted = 0 AND x.param = ")
            .int(param_key("List", "item"))
            .push(" AND x.target_type = ");
            res_type(b);
            b.push(")");
        }
        Filter::Compartment {
            pairs,
            target_type,
            target_id,
            itself,
        } => {
            b.push("(");
            if *itself {
                b.push(&format!("({alias}.res_type = "))
                    .text(target_type.clone())
                    .push(&format!(" AND {alias}.res_id = "))
                    .text(target_id.clone())
                    .push(")");
                if !pairs.is_empty() {
                    b.push(" OR ");
                }
            }
            if !pairs.is_empty() {
                b.push(&format!(
                    "{alias}.rid IN (SELECT rid FROM idx_reference WHERE target_type = "
                ))
                .text(target_type.clone())
                .push(" AND target_id = ")
                .text(target_id.clone())
                .push(" AND param IN ")
                .list(
                    pairs
                        .iter()
                        .flat_map(|(t, codes)| codes.iter().map(|c| param_key(t, c))),
                )
                .push(")");
            }
            b.push(")");
        }
        Filter::Composite { table, alts } => {
            index_sql(
                b,
                ty,
                alias,
                (*table, None),
                (false, role, depth),
                |b, param| composite_alts_sql(b, ty, param, alts),
            );
        }
        Filter::All(filters) => and_sql(b, ty, filters, alias, depth),
        Filter::AnyOf(lists) => {
            b.push("(");
            or_list(b, lists, |b, list| and_sql(b, ty, list, alias, depth));
            b.push(")");
        }
        Filter::Near { lat, long } => {
            let range = |(lo, hi): (f64, f64)| {
                Cond::Number(vec![Number {
                    prefix: Prefix::Eq,
                    value: lo,
                    lo,
                    hi,
                }])
            };
            let lat_cond = range(*lat);
            index_sql(
                b,
                ty,
                alias,
                (Table::Number, Some(&Codes::plain("near:lat"))),
                (false, Role::Probe, depth),
                |b, _| cond_sql(b, &lat_cond),
            );
            b.push(" AND ");
            let long_cond = range(*long);
            index_sql(
                b,
                ty,
                alias,
                (Table::Number, Some(&Codes::plain("near:long"))),
                (false, Role::Probe, depth),
                |b, _| cond_sql(b, &long_cond),
            );
        }
        Filter::ValueSet { .. } => {
            // Bound before SQL is built; an unbound one matches nothing.
            b.push("1 = 0");
        }
    }
}

/// `(f1 AND f2 ...)`, each filter as a probe of the candidate `alias`.
fn and_sql(b: &mut SqlBuilder, ty: Option<&str>, filters: &[Filter], alias: &str, depth: usize) {
    b.push("(");
    for (i, f) in filters.iter().enumerate() {
        if i > 0 {
            b.push(" AND ");
        }
        filter_sql(b, ty, f, alias, depth, Role::Probe);
    }
    b.push(")");
}

fn composite_alts_sql(
    b: &mut SqlBuilder,
    ty: Option<&str>,
    param: &str,
    alts: &[(Vec<String>, Cond)],
) {
    or_list(b, alts, |b, (keys, cond)| {
        b.push("(");
        params_sql(b, ty, param, keys);
        b.push(" AND (");
        cond_sql(b, cond);
        b.push("))");
    });
}

fn cond_sql(b: &mut SqlBuilder, cond: &Cond) {
    match cond {
        Cond::Token(values) => or_list(b, values, |b, v| {
            b.push("(1 = 1");
            if let Some(c) = &v.code {
                b.push(" AND value = ").text(c.clone());
            }
            match v.system.as_deref() {
                None => {}
                Some("") => {
                    b.push(" AND system IS NULL");
                }
                Some(s) => {
                    b.push(" AND system = ").text(s);
                }
            }
            b.push(")");
        }),
        Cond::TokenText(values) => or_list(b, values, |b, v| {
            b.push("lower(text) LIKE ")
                .text(format!("%{}%", escape_like(v)))
                .push(" ESCAPE '\\'");
        }),
        Cond::String(mode, values) => or_list(b, values, |b, v| match mode {
            StringMode::Exact => {
                b.push("exact = ").text(v.clone());
            }
            StringMode::StartsWith => {
                let n = fold(v);
                // A range scan: every string starting with n sorts below n + U+10FFFF.
                b.push("(norm >= ")
                    .text(n.clone())
                    .push(" AND norm < ")
                    .text(format!("{n}\u{10FFFF}"))
                    .push(")");
            }
            StringMode::Contains => {
                b.push("norm LIKE ")
                    .text(format!("%{}%", escape_like(&fold(v))))
                    .push(" ESCAPE '\\'");
            }
        }),
        Cond::Reference(values) => or_list(b, values, |b, v| match v {
            RefValue::Url(u) => {
                b.push("url = ").text(u.clone());
            }
            RefValue::Local(t, id) => {
                b.push("(target_id = ").text(id.clone());
                if let Some(t) = t {
                    b.push(" AND target_type = ").text(t.clone());
                }
                b.push(")");
            }
        }),
        Cond::Date(values) => or_list(b, values, |b, (p, lo, hi)| {
            date_condition(b, "lo", "hi", *p, *lo, *hi);
        }),
        Cond::Number(values) => or_list(b, values, number_condition),
        Cond::Quantity(values) => or_list(b, values, |b, q| {
            b.push("(");
            number_condition(b, &q.number);
            if let Some(s) = &q.system {
                b.push(" AND system = ").text(s.clone());
            }
            if let Some(c) = &q.code {
                if q.system.is_some() {
                    b.push(" AND unit_code = ").text(c.clone());
                } else {
                    b.push(" AND (unit_code = ")
                        .text(c.clone())
                        .push(" OR unit = ")
                        .text(c.clone())
                        .push(")");
                }
            }
            b.push(")");
        }),
        Cond::Uri(values) => {
            b.push("value IN ").list(values);
        }
        Cond::UriBelow(values) => or_list(b, values, |b, v| {
            b.push("(value >= ")
                .text(v.clone())
                .push(" AND value < ")
                .text(format!("{v}\u{10FFFF}"))
                .push(")");
        }),
    }
}

/// search.html#number over a stored point `value`.
fn number_condition(b: &mut SqlBuilder, n: &Number) {
    let real = |b: &mut SqlBuilder, v: f64| {
        b.bind(crate::store::Arg::Real(v));
    };
    match n.prefix {
        Prefix::Eq => {
            b.push("(value >= ");
            real(b, n.lo);
            b.push(" AND value < ");
            real(b, n.hi);
            b.push(")");
        }
        Prefix::Ne => {
            b.push("(value < ");
            real(b, n.lo);
            b.push(" OR value >= ");
            real(b, n.hi);
            b.push(")");
        }
        Prefix::Gt | Prefix::Sa => {
            b.push("value > ");
            real(b, n.value);
        }
        Prefix::Lt | Prefix::Eb => {
            b.push("value < ");
            real(b, n.value);
        }
        Prefix::Ge => {
            b.push("value >= ");
            real(b, n.value);
        }
        Prefix::Le => {
            b.push("value <= ");
            real(b, n.value);
        }
        Prefix::Ap => {
            // search.html leaves "approximately" to the server: within 10 %.
            let d = (n.value.abs() * 0.1).max(n.hi - n.value);
            b.push("(value >= ");
            real(b, n.value - d);
            b.push(" AND value <= ");
            real(b, n.value + d);
            b.push(")");
        }
    }
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// search.html#prefix over a stored range [lo_col, hi_col] and a search range [lo, hi].
fn date_condition(b: &mut SqlBuilder, lo_col: &str, hi_col: &str, p: Prefix, lo: i64, hi: i64) {
    match p {
        Prefix::Eq => {
            b.push(&format!("({lo_col} >= "))
                .int(lo)
                .push(&format!(" AND {hi_col} <= "))
                .int(hi)
                .push(")");
        }
        Prefix::Ap => {
            // Overlapping the search range widened by 10 % of its distance from now, at
            // least a day on each side.
            let now = crate::time::now_micros();
            let spread = ((now - lo).abs() / 10).max(86_400_000_000);
            b.push(&format!("({hi_col} >= "))
                .int(lo.saturating_sub(spread))
                .push(&format!(" AND {lo_col} <= "))
                .int(hi.saturating_add(spread))
                .push(")");
        }
        Prefix::Ne => {
            b.push(&format!("({lo_col} < "))
                .int(lo)
                .push(&format!(" OR {hi_col} > "))
                .int(hi)
                .push(")");
        }
        Prefix::Gt => {
            b.push(&format!("{hi_col} > ")).int(hi);
        }
        Prefix::Lt => {
            b.push(&format!("{lo_col} < ")).int(lo);
        }
        Prefix::Ge => {
            b.push(&format!("{hi_col} >= ")).int(lo);
        }
        Prefix::Le => {
            b.push(&format!("{lo_col} <= ")).int(hi);
        }
        Prefix::Sa => {
            b.push(&format!("{lo_col} > ")).int(hi);
        }
        Prefix::Eb => {
            b.push(&format!("{hi_col} < ")).int(lo);
        }
    }
}

/// The codes of a ValueSet for `:in`: its expansion when it has one, else the concepts and
/// whole systems its compose includes. Filters, imported value sets and excludes need a
/// terminology service this server does not have, so they are refused.
pub fn value_set_codes(vs: &Value) -> Result<Vec<TokenValue>> {
    let url = vs.get("url").and_then(Value::as_str).unwrap_or("?");
    let mut out = Vec::new();
    if let Some(contains) = vs.pointer("/expansion/contains").and_then(Value::as_array) {
        fn walk(items: &[Value], out: &mut Vec<TokenValue>) {
            for c in items {
                if let Some(code) = c.get("code").and_then(Value::as_str) {
                    out.push(TokenValue {
                        system: c.get("system").and_then(Value::as_str).map(str::to_string),
                        code: Some(code.to_string()),
                    });
                }
                if let Some(nested) = c.get("contains").and_then(Value::as_array) {
                    walk(nested, out);
                }
            }
        }
        walk(contains, &mut out);
        return Ok(out);
    }
    let unsupported = |what: &str| {
        Err(FhirError::not_supported(format!(
            "value set {url} uses {what}, which this server cannot expand"
        )))
    };
    if vs.pointer("/compose/exclude").is_some() {
        return unsupported("compose.exclude");
    }
    for inc in vs
        .pointer("/compose/include")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if inc.get("filter").is_some() {
            return unsupported("compose.include.filter");
        }
        if inc.get("valueSet").is_some() {
            return unsupported("compose.include.valueSet");
        }
        let system = inc
            .get("system")
            .and_then(Value::as_str)
            .map(str::to_string);
        match inc.get("concept").and_then(Value::as_array) {
            Some(concepts) => {
                for c in concepts {
                    if let Some(code) = c.get("code").and_then(Value::as_str) {
                        out.push(TokenValue {
                            system: system.clone(),
                            code: Some(code.to_string()),
                        });
                    }
                }
            }
            None if system.is_some() => out.push(TokenValue { system, code: None }),
            None => {}
        }
    }
    Ok(out)
}

/// SQL finding the body of the newest `ty` (ValueSet, CodeSystem) with canonical `url`.
pub fn canonical_sql(ty: &str, url: &str) -> SqlBuilder {
    let mut b = SqlBuilder::new(
        "SELECT v.body FROM resource r JOIN resource_version v ON v.seq = r.seq \
         WHERE r.res_type = ",
    );
    b.text(ty)
        .push(" AND r.deleted = 0 AND r.rid IN (SELECT rid FROM idx_uri WHERE param = ")
        .int(param_key(ty, "url"))
        .push(" AND value = ")
        .text(url)
        .push(") ORDER BY r.rid DESC LIMIT 1");
    b
}

/// Splits a [`HIERARCHY`] key into (above?, system, code).
pub fn parse_hierarchy_key(key: &str) -> Option<(bool, &str, &str)> {
    let rest = key.strip_prefix(HIERARCHY)?;
    let (mode, rest) = rest.split_once('|')?;
    let (system, code) = rest.rsplit_once('|')?;
    Some((mode == "above", system, code))
}

/// `:below` (the code and its descendants) or `:above` (the code and its ancestors) in a
/// CodeSystem's nested `concept` tree (codesystem.html#hierarchy).
pub fn hierarchy_codes(cs: &Value, code: &str, above: bool) -> Result<Vec<TokenValue>> {
    let system = cs.get("url").and_then(Value::as_str).unwrap_or_default();
    // Path from the root to `code`, then the subtree under it.
    fn find<'a>(concepts: &'a [Value], code: &str, path: &mut Vec<&'a Value>) -> bool {
        for c in concepts {
            path.push(c);
            if c.get("code").and_then(Value::as_str) == Some(code) {
                return true;
            }
            if let Some(children) = c.get("concept").and_then(Value::as_array)
                && find(children, code, path)
            {
                return true;
            }
            path.pop();
        }
        false
    }
    fn subtree(c: &Value, out: &mut Vec<String>) {
        if let Some(code) = c.get("code").and_then(Value::as_str) {
            out.push(code.to_string());
        }
        for child in c
            .get("concept")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            subtree(child, out);
        }
    }
    let concepts = cs
        .get("concept")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut path = Vec::new();
    if !find(concepts, code, &mut path) {
        return Err(FhirError::invalid(format!(
            "code {code:?} is not in code system {system}"
        )));
    }
    let mut codes = Vec::new();
    if above {
        codes.extend(
            path.iter()
                .filter_map(|c| c.get("code").and_then(Value::as_str))
                .map(str::to_string),
        );
    } else if let Some(last) = path.last() {
        subtree(last, &mut codes);
    }
    Ok(codes
        .into_iter()
        .map(|c| TokenValue {
            system: Some(system.to_string()),
            code: Some(c),
        })
        .collect())
}

/// Parses a conditional URL's query (`identifier=sys|123&active=true`).
pub fn parse_condition(registry: &Registry, res_type: &str, query: &str) -> Result<SearchQuery> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let q = SearchQuery::parse(registry, res_type, &params, false, 2, 2)?;
    if !q.has_filters() {
        return Err(FhirError::invalid(format!(
            "the condition {query:?} has no search criteria"
        )));
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_system_code_only_for_one_full_token() {
        assert_eq!(
            single_system_code(r"urn:k|root\|1.2"),
            Some(("urn:k".into(), "root|1.2".into()))
        );
        for v in ["a|b,c|d", "|x", "x", "urn:k|"] {
            assert_eq!(single_system_code(v), None, "{v}");
        }
    }

    #[test]
    fn splits_or_values_with_escapes() {
        assert_eq!(split_or("a,b"), vec!["a", "b"]);
        assert_eq!(split_or(r"a\,b,c"), vec!["a,b", "c"]);
        assert_eq!(split_or(r"a\$b"), vec!["a$b"]);
        assert_eq!(
            split_bar(r"http://x|1\|2"),
            (Some("http://x".into()), "1|2".into())
        );
        assert_eq!(split_bar("|abc"), (Some(String::new()), "abc".into()));
        assert_eq!(split_bar("abc"), (None, "abc".into()));
        assert_eq!(split_bars("5||mg"), vec!["5", "", "mg"]);
    }

    #[test]
    fn parses_prefixes() {
        assert_eq!(parse_prefix("ge2019"), (Prefix::Ge, "2019"));
        assert_eq!(parse_prefix("2019"), (Prefix::Eq, "2019"));
    }

    #[test]
    fn numbers_carry_their_implicit_precision() {
        let n = parse_number("n", "100").unwrap();
        assert_eq!((n.lo, n.hi), (99.5, 100.5));
        let n = parse_number("n", "gt1.50").unwrap();
        assert_eq!(n.prefix, Prefix::Gt);
        assert!((n.lo - 1.495).abs() < 1e-9 && (n.hi - 1.505).abs() < 1e-9);
        let n = parse_number("n", "1e2").unwrap();
        assert_eq!((n.lo, n.hi), (50.0, 150.0));
        assert!(parse_number("n", "abc").is_err());
        assert!(parse_number("n", "").is_err());
    }

    #[test]
    fn parses_quantities() {
        let q = parse_quantity("q", "gt100||mm[Hg]").unwrap();
        assert_eq!((q.system, q.code.as_deref()), (None, Some("mm[Hg]")));
        let q = parse_quantity("q", "5.4|http://unitsofmeasure.org|mg").unwrap();
        assert_eq!(q.system.as_deref(), Some("http://unitsofmeasure.org"));
        assert!(parse_quantity("q", "5|mg").is_err());
    }

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor("a12").unwrap(), Cursor::After(12));
        assert_eq!(parse_cursor("b3").unwrap(), Cursor::Before(3));
        assert!(parse_cursor("x").is_err());
        assert!(parse_cursor("").is_err());
    }

    #[test]
    fn expands_value_sets_from_compose_and_expansion() {
        let vs = serde_json::json!({"url": "u", "compose": {"include": [
            {"system": "s", "concept": [{"code": "a"}, {"code": "b"}]},
            {"system": "whole"}]}});
        let codes = value_set_codes(&vs).unwrap();
        assert_eq!(codes.len(), 3);
        assert_eq!(codes[2].code, None);
        let vs = serde_json::json!({"expansion": {"contains": [
            {"system": "s", "code": "x", "contains": [{"system": "s", "code": "y"}]}]}});
        assert_eq!(value_set_codes(&vs).unwrap().len(), 2);
        let vs = serde_json::json!({"compose": {"include": [{"system": "s", "filter": []}]}});
        assert!(value_set_codes(&vs).is_err());
    }
}
