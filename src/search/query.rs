//! Search queries (FHIR R4 search.html) compiled to SQL over the `idx_*` tables.
//!
//! Supported here: `_id`, `_lastUpdated`, and the parameter types token, string, reference,
//! date and uri with the common modifiers (`:exact`, `:contains`, `:missing` is not yet),
//! prefixes on dates, OR with commas, AND with repeats, and escaping. Anything else is
//! refused with a 400 naming the parameter, never silently ignored.

use crate::error::{FhirError, Result};
use crate::search::extract::{fold, parse_fhir_date_range};
use crate::search::registry::{ParamType, Registry};
use crate::store::SqlBuilder;

/// Result parameters a search accepts besides the filters.
const CONTROL: &[&str] = &[
    "_count",
    "_offset",
    "_format",
    "_pretty",
    "_summary",
    "_elements",
    "_total",
    "_sort",
];

/// One parsed filter: AND of these, each an OR of values.
#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Id(Vec<String>),
    LastUpdated(Vec<(Prefix, i64, i64)>),
    Token {
        code: String,
        values: Vec<TokenValue>,
        text: bool,
    },
    String {
        code: String,
        values: Vec<String>,
        mode: StringMode,
    },
    Reference {
        code: String,
        values: Vec<(Option<String>, String)>,
    },
    Date {
        code: String,
        values: Vec<(Prefix, i64, i64)>,
    },
    Uri {
        code: String,
        values: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct TokenValue {
    /// `None`: any system; `Some("")`: no system (`|code`).
    system: Option<String>,
    code: Option<String>,
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

/// A parsed search over one resource type.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub res_type: String,
    filters: Vec<Filter>,
    pub count: usize,
    pub offset: usize,
    /// Parameters that were ignored (lenient handling), reported back to the client.
    pub ignored: Vec<String>,
    /// `_summary=count`.
    pub count_only: bool,
}

/// Splits a parameter value on unescaped commas and unescapes `\,` `\|` `\$` `\\`.
fn split_or(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next()
                    && let Some(last) = out.last_mut()
                {
                    // Keep the escape for `|` so token parsing can tell it apart.
                    if n == '|' {
                        last.push('\\');
                    }
                    last.push(n);
                }
            }
            ',' => out.push(String::new()),
            c => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    out
}

/// Splits `system|code` on the first unescaped `|`.
fn split_bar(v: &str) -> (Option<String>, String) {
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == b'|' {
            return (Some(unescape_bar(&v[..i])), unescape_bar(&v[i + 1..]));
        }
        i += 1;
    }
    (None, unescape_bar(v))
}

fn unescape_bar(s: &str) -> String {
    s.replace("\\|", "|")
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
        let mut q = SearchQuery {
            res_type: res_type.to_string(),
            filters: Vec::new(),
            count: default_count,
            offset: 0,
            ignored: Vec::new(),
            count_only: false,
        };
        for (key, value) in params {
            let (name, modifier) = match key.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (key.as_str(), None),
            };
            match name {
                "_count" => {
                    let n: usize = value.parse().map_err(|_| {
                        FhirError::invalid(format!("_count: {value:?} is not a number"))
                    })?;
                    q.count = n.min(max_count);
                    continue;
                }
                "_offset" => {
                    q.offset = value.parse().map_err(|_| {
                        FhirError::invalid(format!("_offset: {value:?} is not a number"))
                    })?;
                    continue;
                }
                "_summary" if value == "count" => {
                    q.count_only = true;
                    continue;
                }
                "_sort" | "_total" if !lenient => {
                    // Accepted only in their default meaning for now.
                    if name == "_sort" && value != "_id" {
                        return Err(FhirError::not_supported(format!(
                            "_sort={value} is not supported yet"
                        )));
                    }
                    continue;
                }
                n if CONTROL.contains(&n) => continue,
                _ => {}
            }
            match q.filter(registry, name, modifier, value) {
                Ok(f) => q.filters.push(f),
                Err(e) if lenient => q.ignored.push(format!(
                    "{key}: {}",
                    e.issues.first().map_or("", |i| i.diagnostics.as_str())
                )),
                Err(e) => return Err(e),
            }
        }
        Ok(q)
    }

    fn filter(
        &self,
        registry: &Registry,
        name: &str,
        modifier: Option<&str>,
        value: &str,
    ) -> Result<Filter> {
        let unsupported_modifier = || {
            Err(FhirError::not_supported(format!(
                "modifier :{} on {name} is not supported",
                modifier.unwrap_or("")
            )))
        };
        if name == "_id" {
            if modifier.is_some() {
                return unsupported_modifier();
            }
            return Ok(Filter::Id(split_or(value)));
        }
        if name == "_lastUpdated" {
            if modifier.is_some() {
                return unsupported_modifier();
            }
            return Ok(Filter::LastUpdated(date_values(name, value)?));
        }
        let param = registry.get(&self.res_type, name).ok_or_else(|| {
            FhirError::invalid(format!(
                "unknown search parameter {name:?} for {}",
                self.res_type
            ))
        })?;
        if param.expression.is_none() {
            return Err(FhirError::not_supported(format!(
                "search parameter {name} cannot be evaluated by this server"
            )));
        }
        let code = param.code.clone();
        match param.kind {
            ParamType::Token => {
                let text = match modifier {
                    None => false,
                    Some("text") => true,
                    Some(_) => return unsupported_modifier(),
                };
                let values = split_or(value)
                    .iter()
                    .map(|v| {
                        let (system, code) = split_bar(v);
                        TokenValue {
                            system,
                            code: (!code.is_empty()).then_some(code),
                        }
                    })
                    .collect();
                Ok(Filter::Token { code, values, text })
            }
            ParamType::String => {
                let mode = match modifier {
                    None => StringMode::StartsWith,
                    Some("exact") => StringMode::Exact,
                    Some("contains") => StringMode::Contains,
                    Some(_) => return unsupported_modifier(),
                };
                Ok(Filter::String {
                    code,
                    values: split_or(value),
                    mode,
                })
            }
            ParamType::Reference => {
                let forced_type = match modifier {
                    None => None,
                    Some(t) if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
                        Some(t.to_string())
                    }
                    Some(_) => return unsupported_modifier(),
                };
                let values = split_or(value)
                    .iter()
                    .map(|v| reference_value(v, forced_type.as_deref()))
                    .collect();
                Ok(Filter::Reference { code, values })
            }
            ParamType::Date => {
                if modifier.is_some() {
                    return unsupported_modifier();
                }
                Ok(Filter::Date {
                    code,
                    values: date_values(name, value)?,
                })
            }
            ParamType::Uri => {
                if modifier.is_some() {
                    return unsupported_modifier();
                }
                Ok(Filter::Uri {
                    code,
                    values: split_or(value),
                })
            }
            other => Err(FhirError::not_supported(format!(
                "search parameter {name} of type {other:?} is not supported yet"
            ))),
        }
    }

    /// Appends `WHERE ...` conditions over the alias `r` (table `resource`).
    fn where_clause(&self, b: &mut SqlBuilder) {
        b.push(" WHERE r.res_type = ")
            .text(self.res_type.clone())
            .push(" AND r.deleted = 0");
        for f in &self.filters {
            b.push(" AND ");
            self.filter_sql(f, b);
        }
    }

    fn filter_sql(&self, f: &Filter, b: &mut SqlBuilder) {
        let ty = self.res_type.clone();
        match f {
            Filter::Id(ids) => {
                b.push("r.res_id IN (");
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        b.push(", ");
                    }
                    b.text(id.clone());
                }
                b.push(")");
            }
            Filter::LastUpdated(values) => {
                b.push("(");
                for (i, (p, lo, hi)) in values.iter().enumerate() {
                    if i > 0 {
                        b.push(" OR ");
                    }
                    // A lastUpdated instant is a range of one microsecond.
                    date_condition(b, "r.last_updated", "r.last_updated", *p, *lo, *hi);
                }
                b.push(")");
            }
            Filter::Token { code, values, text } => {
                b.push("r.rid IN (SELECT rid FROM idx_token WHERE res_type = ")
                    .text(ty);
                b.push(" AND code = ").text(code.clone()).push(" AND (");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        b.push(" OR ");
                    }
                    if *text {
                        let needle = fold(v.code.as_deref().unwrap_or_default());
                        b.push("lower(text) LIKE ")
                            .text(format!("%{}%", escape_like(&needle)))
                            .push(" ESCAPE '\\'");
                        continue;
                    }
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
                }
                b.push("))");
            }
            Filter::String { code, values, mode } => {
                b.push("r.rid IN (SELECT rid FROM idx_string WHERE res_type = ")
                    .text(ty);
                b.push(" AND code = ").text(code.clone()).push(" AND (");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        b.push(" OR ");
                    }
                    match mode {
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
                    }
                }
                b.push("))");
            }
            Filter::Reference { code, values } => {
                b.push("r.rid IN (SELECT rid FROM idx_reference WHERE res_type = ")
                    .text(ty);
                b.push(" AND code = ").text(code.clone()).push(" AND (");
                for (i, (t, id)) in values.iter().enumerate() {
                    if i > 0 {
                        b.push(" OR ");
                    }
                    if id.contains("://") || id.starts_with("urn:") {
                        b.push("url = ").text(id.clone());
                        continue;
                    }
                    b.push("(target_id = ").text(id.clone());
                    if let Some(t) = t {
                        b.push(" AND target_type = ").text(t.clone());
                    }
                    b.push(")");
                }
                b.push("))");
            }
            Filter::Date { code, values } => {
                b.push("r.rid IN (SELECT rid FROM idx_date WHERE res_type = ")
                    .text(ty);
                b.push(" AND code = ").text(code.clone()).push(" AND (");
                for (i, (p, lo, hi)) in values.iter().enumerate() {
                    if i > 0 {
                        b.push(" OR ");
                    }
                    date_condition(b, "lo", "hi", *p, *lo, *hi);
                }
                b.push("))");
            }
            Filter::Uri { code, values } => {
                b.push("r.rid IN (SELECT rid FROM idx_uri WHERE res_type = ")
                    .text(ty);
                b.push(" AND code = ")
                    .text(code.clone())
                    .push(" AND value IN (");
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        b.push(", ");
                    }
                    b.text(v.clone());
                }
                b.push("))");
            }
        }
    }

    /// SQL selecting `(res_id, body)` of one page of matches, in insertion order.
    pub fn page_sql(&self) -> SqlBuilder {
        let mut b = SqlBuilder::new(
            "SELECT r.res_id, v.body FROM resource r JOIN resource_version v ON v.seq = r.seq",
        );
        self.where_clause(&mut b);
        b.push(" ORDER BY r.rid LIMIT ").int(self.count as i64);
        b.push(" OFFSET ").int(self.offset as i64);
        b
    }

    /// SQL selecting the ids of at most `limit` matches (conditional interactions).
    pub fn ids_sql(&self, limit: usize) -> SqlBuilder {
        let mut b = SqlBuilder::new("SELECT r.res_id FROM resource r");
        self.where_clause(&mut b);
        b.push(" ORDER BY r.rid LIMIT ").int(limit as i64);
        b
    }

    /// SQL counting all matches.
    pub fn count_sql(&self) -> SqlBuilder {
        let mut b = SqlBuilder::new("SELECT COUNT(*) FROM resource r");
        self.where_clause(&mut b);
        b
    }

    pub fn has_filters(&self) -> bool {
        !self.filters.is_empty()
    }
}

fn reference_value(v: &str, forced_type: Option<&str>) -> (Option<String>, String) {
    if v.contains("://") || v.starts_with("urn:") {
        return (None, v.to_string());
    }
    let parts: Vec<&str> = v.split('/').collect();
    match parts.as_slice() {
        [t, id] => (Some((*t).to_string()), (*id).to_string()),
        [t, id, "_history", _] => (Some((*t).to_string()), (*id).to_string()),
        _ => (forced_type.map(str::to_string), v.to_string()),
    }
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// search.html#prefix over a stored range [lo_col, hi_col] and a search range [lo, hi].
fn date_condition(b: &mut SqlBuilder, lo_col: &str, hi_col: &str, p: Prefix, lo: i64, hi: i64) {
    let lo_col = lo_col.to_string();
    let hi_col = hi_col.to_string();
    match p {
        Prefix::Eq | Prefix::Ap => {
            b.push(&format!("({lo_col} >= "))
                .int(lo)
                .push(&format!(" AND {hi_col} <= "))
                .int(hi)
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
    }

    #[test]
    fn parses_prefixes() {
        assert_eq!(parse_prefix("ge2019"), (Prefix::Ge, "2019"));
        assert_eq!(parse_prefix("2019"), (Prefix::Eq, "2019"));
    }
}
