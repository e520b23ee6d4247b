//! search (FHIR R4 http.html#search, search.html) at type, system and compartment level, GET
//! and POST `_search`, and `Patient/[id]/$everything` (patient-operation-everything.html).

use std::collections::{HashMap, HashSet};

use serde_json::json;

use crate::error::{FhirError, Result};
use crate::interaction::bundle_text::{BundleText, url_with_query};
use crate::interaction::subset::{Summary, subset};
use crate::interaction::{Body, Ctx, FhirRequest, FhirResponse, SharedCtx};
use crate::search::query::{
    CHEAP_TOTAL, Cursor, Include, SearchQuery, TokenValue, TotalMode, all_reference_rows_sql,
    canonical_sql, hierarchy_codes, parse_hierarchy_key, reference_rows_sql, value_set_codes,
};
use crate::search::registry::Registry;
use crate::store::{Db, SqlBuilder, Ty, Val};

/// Included resources per page at most (`_include`, `_revinclude`), against result explosion.
const MAX_INCLUDED: usize = 1000;
/// A filter matching at least this many resources does not drive a search (see
/// `search::query::Driver::Scan`).
const SCAN_THRESHOLD: i64 = 2000;
/// A filter with fewer candidates than this drives without looking at the others.
const GOOD_DRIVER: i64 = 200;
/// Rounds of `:iterate`.
const MAX_ITERATE: usize = 3;

fn raw(body: String) -> FhirResponse {
    FhirResponse {
        body: Body::Raw(body),
        ..FhirResponse::json(200, serde_json::Value::Null)
    }
}

/// `GET [base]/[type]?...`
pub async fn search(ctx: &SharedCtx, ty: &str, req: &FhirRequest) -> Result<FhirResponse> {
    let mut db = ctx.store.reader().await?;
    let body = search_in(&mut db, ctx, ty, req.search_params(), req.prefer_lenient).await?;
    Ok(raw(body))
}

/// Runs a type-level search on `db` (inside a transaction for a transaction's GET entries)
/// and returns the searchset Bundle as JSON text.
pub async fn search_in(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    params: Vec<(String, String)>,
    lenient: bool,
) -> Result<String> {
    let q = parse(ctx, Some(vec![ty.to_string()]), &params, lenient)?;
    run(db, ctx, q, ty, &params).await
}

/// Parses a search over `types` (`None`: every type) with the server's page-size limits.
fn parse(
    ctx: &Ctx,
    types: Option<Vec<String>>,
    params: &[(String, String)],
    lenient: bool,
) -> Result<SearchQuery> {
    SearchQuery::parse_scoped(
        &ctx.registry(),
        types,
        params,
        lenient,
        ctx.limits.default_count,
        ctx.limits.max_count,
    )
}

/// The `_type` parameter's types, checked.
pub(crate) fn types_param(ctx: &Ctx, params: &[(String, String)]) -> Result<Option<Vec<String>>> {
    let mut out: Option<Vec<String>> = None;
    for (_, v) in params.iter().filter(|(k, _)| k == "_type") {
        for t in v.split(',').filter(|t| !t.is_empty()) {
            if !ctx.defs.is_resource_type(t) {
                return Err(FhirError::invalid(format!(
                    "_type: unknown resource type {t:?}"
                )));
            }
            let list = out.get_or_insert_with(Vec::new);
            if !list.iter().any(|x| x == t) {
                list.push(t.to_string());
            }
        }
    }
    Ok(out)
}

/// `GET [base]?_type=...`: system-level search. Without `_type` only the parameters every
/// resource has (`_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`) apply.
pub async fn search_system(ctx: &SharedCtx, req: &FhirRequest) -> Result<FhirResponse> {
    let params = req.search_params();
    let types = types_param(ctx, &params)?;
    let q = parse(ctx, types, &params, req.prefer_lenient)?;
    let mut db = ctx.store.reader().await?;
    Ok(raw(run(&mut db, ctx, q, "", &params).await?))
}

/// `GET [base]/[Compartment]/[id]/[type]?...` and `.../*` (compartmentdefinition.html).
pub async fn search_compartment(
    ctx: &SharedCtx,
    compartment: &str,
    id: &str,
    ty: &str,
    req: &FhirRequest,
) -> Result<FhirResponse> {
    let members =
        ctx.defs.compartments.get(compartment).ok_or_else(|| {
            FhirError::not_found(format!("{compartment} is not a compartment type"))
        })?;
    let params = req.search_params();
    let types = if ty == "*" {
        None
    } else {
        if !members.contains_key(ty) {
            return Err(FhirError::invalid(format!(
                "{ty} is not in the {compartment} compartment"
            )));
        }
        Some(vec![ty.to_string()])
    };
    let mut q = parse(ctx, types, &params, req.prefer_lenient)?;
    let type_filter = types_param(ctx, &params)?;
    q.restrict_to_compartment(
        &ctx.registry(),
        compartment,
        id,
        members,
        type_filter.as_deref(),
    );
    let mut db = ctx.store.reader().await?;
    let path = format!("{compartment}/{id}/{ty}");
    Ok(raw(run(&mut db, ctx, q, &path, &params).await?))
}

/// `GET|POST [base]/Patient/[id]/$everything` with `_since`, `_type`, `_count`: the
/// patient, everything in its compartment, and what those resources refer to.
pub async fn everything(ctx: &SharedCtx, id: &str, req: &FhirRequest) -> Result<FhirResponse> {
    let members = ctx
        .defs
        .compartments
        .get("Patient")
        .ok_or_else(|| FhirError::not_found("no Patient compartment definition"))?;
    let mut db = ctx.store.reader().await?;
    if db.current("Patient", id).await?.is_none_or(|c| c.deleted) {
        return Err(crate::interaction::read::not_known("Patient", id));
    }
    let given = req.search_params();
    let mut params: Vec<(String, String)> = Vec::new();
    for (k, v) in &given {
        match k.as_str() {
            "_since" => params.push(("_lastUpdated".into(), format!("ge{v}"))),
            "_count" | "_cursor" | "_total" | "_type" => params.push((k.clone(), v.clone())),
            "start" | "end" => {
                return Err(FhirError::not_supported(format!(
                    "$everything: {k} is not supported; use _since"
                )));
            }
            _ => {}
        }
    }
    params.push(("_include".into(), "*".into()));
    let types = types_param(ctx, &params)?;
    let mut q = parse(ctx, None, &params, false)?;
    q.restrict_to_compartment(&ctx.registry(), "Patient", id, members, types.as_deref());
    let path = format!("Patient/{id}/$everything");
    let link_params: Vec<(String, String)> = given
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "_since" | "_count" | "_cursor" | "_type"))
        .collect();
    Ok(raw(run(&mut db, ctx, q, &path, &link_params).await?))
}

struct Row {
    rid: i64,
    ty: String,
    id: String,
    body: String,
}

fn rows_of(raw: Vec<Vec<Val>>) -> Vec<Row> {
    raw.into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            let rid = it.next()?.int();
            let ty = it.next()?.text()?;
            let id = it.next()?.text()?;
            let body = it.next()?.text()?;
            Some(Row { rid, ty, id, body })
        })
        .collect()
}

const ROW_TYPES: [Ty; 4] = [Ty::Int, Ty::Text, Ty::Text, Ty::Text];

/// The newest stored `ty` (ValueSet, CodeSystem) with canonical `url`, if the server holds one.
async fn fetch_canonical(db: &mut Db, ty: &str, url: &str) -> Result<Option<serde_json::Value>> {
    let b = canonical_sql(ty, url);
    let Some(body) = db
        .fetch_all(&b.sql, &b.args, &[Ty::Text])
        .await?
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next())
        .and_then(Val::text)
    else {
        return Ok(None);
    };
    serde_json::from_str(&body)
        .map(Some)
        .map_err(|e| FhirError::internal(format!("stored {ty} is not JSON: {e}")))
}

/// Readies a parsed search for `db`: says whether its planner uses statistics (see
/// `SqlBuilder::statistics`), and turns `:in` / `:not-in` value set URLs, and `:above` /
/// `:below` subsumption keys, into codes from the ValueSets and CodeSystems the server holds.
pub async fn bind_value_sets(db: &mut Db, q: &mut SearchQuery) -> Result<()> {
    q.statistics = db.is_postgres();
    let urls = q.value_set_urls();
    if urls.is_empty() {
        return Ok(());
    }
    let mut sets: HashMap<String, Vec<TokenValue>> = HashMap::new();
    for url in urls {
        let codes = match parse_hierarchy_key(&url) {
            Some((above, system, code)) => {
                let cs = fetch_canonical(db, "CodeSystem", system)
                    .await?
                    .ok_or_else(|| {
                        FhirError::invalid(format!(
                            ":{}: code system {system} is not held by this server",
                            if above { "above" } else { "below" }
                        ))
                    })?;
                hierarchy_codes(&cs, code, above)?
            }
            None => {
                let vs = fetch_canonical(db, "ValueSet", &url)
                    .await?
                    .ok_or_else(|| {
                        FhirError::invalid(format!("value set {url} is not held by this server"))
                    })?;
                value_set_codes(&vs)?
            }
        };
        sets.insert(url, codes);
    }
    q.bind_value_sets(&sets);
    Ok(())
}

/// Runs a parsed search and builds the searchset Bundle; `path` (below the base) and
/// `params` build the paging links.
async fn run(
    db: &mut Db,
    ctx: &Ctx,
    mut q: SearchQuery,
    path: &str,
    params: &[(String, String)],
) -> Result<String> {
    bind_value_sets(db, &mut q).await?;
    // Inside a transaction, earlier entries' index rows must be visible.
    db.flush().await?;
    // The number of matches, when an estimate already counted them exactly.
    let mut counted = None;
    if !q.count_only && q.count > 0 {
        let mut estimates = Vec::new();
        for (i, sql) in q.estimate_sqls(SCAN_THRESHOLD) {
            let n = db.search_int(&sql.sql, &sql.args).await?;
            estimates.push((i, n));
            if n < GOOD_DRIVER {
                break;
            }
        }
        if !estimates.is_empty() {
            q.choose_driver(&estimates, SCAN_THRESHOLD);
        }
        // A lone filter has the only estimate.
        counted = estimates
            .first()
            .map(|(_, n)| *n)
            .filter(|n| q.estimate_is_total() && *n < SCAN_THRESHOLD);
    }
    let mut rows = if q.count_only || q.count == 0 || q.is_empty() {
        Vec::new()
    } else {
        let p = q.page_sql();
        rows_of(db.search_rows(&p.sql, &p.args, &ROW_TYPES).await?)
    };
    let more = rows.len() > q.count;
    rows.truncate(q.count);
    let backwards = matches!(q.cursor, Cursor::Before(_));
    if backwards {
        rows.reverse();
    }
    let first_page = q.cursor == Cursor::First && q.offset == 0;
    let total = if let Some(n) = counted.filter(|_| q.total != TotalMode::None) {
        Some(n)
    } else if q.count_only || q.total == TotalMode::Accurate {
        let c = q.count_sql(None);
        Some(db.search_int(&c.sql, &c.args).await?)
    } else if q.total == TotalMode::None || !first_page || q.count == 0 {
        None
    } else if q.scans() && more {
        // Every filter matches thousands: counting them is not cheap.
        None
    } else if !more {
        Some(rows.len() as i64)
    } else {
        let c = q.count_sql(Some(CHEAP_TOTAL + 1));
        let n = db.search_int(&c.sql, &c.args).await?;
        (n <= CHEAP_TOTAL).then_some(n)
    };

    // Links: keyset cursors on the default order, offsets under _sort.
    let base_params: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_offset" && k != "_cursor")
        .cloned()
        .collect();
    let link = |extra: Option<(&str, String)>| {
        let mut p = base_params.clone();
        if let Some((k, v)) = extra {
            p.push((k.to_string(), v));
        }
        url_with_query(&ctx.base, path, &p)
    };
    let self_link = match (q.cursor, q.offset) {
        (Cursor::After(r), _) => link(Some(("_cursor", format!("a{r}")))),
        (Cursor::Before(r), _) => link(Some(("_cursor", format!("b{r}")))),
        (Cursor::First, 0) => link(None),
        (Cursor::First, o) => link(Some(("_offset", o.to_string()))),
    };
    let mut links = vec![("self", self_link)];
    if q.is_sorted() || q.offset > 0 {
        if more {
            links.push((
                "next",
                link(Some(("_offset", (q.offset + q.count).to_string()))),
            ));
        }
        if q.offset > 0 {
            let prev = q.offset.saturating_sub(q.count);
            links.push((
                "previous",
                link((prev > 0).then(|| ("_offset", prev.to_string()))),
            ));
        }
    } else if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        if more || backwards {
            links.push(("next", link(Some(("_cursor", format!("a{}", last.rid))))));
        }
        if !first_page && (!backwards || more) {
            links.push((
                "previous",
                link(Some(("_cursor", format!("b{}", first.rid)))),
            ));
        }
    }

    let mut included = includes(db, &ctx.registry(), &q, &rows).await?;
    // _summary / _elements shape every entry (search.html#summary, #elements).
    let summary = params
        .iter()
        .find(|(k, _)| k == "_summary")
        .and_then(|(_, v)| Summary::parse(v))
        .filter(|s| *s != Summary::False);
    let wanted: Option<Vec<String>> =
        params.iter().find(|(k, _)| k == "_elements").map(|(_, v)| {
            v.split(',')
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect()
        });
    if summary.is_some() || wanted.is_some() {
        for row in rows.iter_mut().chain(included.rows.iter_mut()) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&row.body) {
                row.body = subset(&ctx.defs.elements, v, summary, wanted.as_deref()).to_string();
            }
        }
    }
    let mut b = BundleText::new("searchset", total, &links);
    for row in &rows {
        b.entry(
            Some(&format!("{}/{}/{}", ctx.base, row.ty, row.id)),
            Some(&row.body),
            &[("search", json!({"mode": "match"}))],
        );
    }
    for row in &included.rows {
        b.entry(
            Some(&format!("{}/{}/{}", ctx.base, row.ty, row.id)),
            Some(&row.body),
            &[("search", json!({"mode": "include"}))],
        );
    }
    let mut warnings: Vec<String> = q.ignored.iter().map(|d| format!("ignored {d}")).collect();
    if included.truncated {
        warnings.push(format!(
            "included resources were cut at {MAX_INCLUDED} for this page; use a smaller _count"
        ));
    }
    if !warnings.is_empty() {
        let oo = crate::error::operation_outcome(
            &warnings
                .into_iter()
                .map(|d| crate::error::Issue {
                    severity: "warning",
                    code: "not-supported",
                    diagnostics: d,
                    expression: vec![],
                })
                .collect::<Vec<_>>(),
        );
        b.entry(
            None,
            Some(&oo.to_string()),
            &[("search", json!({"mode": "outcome"}))],
        );
    }
    Ok(b.finish())
}

struct Included {
    rows: Vec<Row>,
    truncated: bool,
}

/// Resources that `_include` (targets of the page's references) and `_revinclude`
/// (resources referring to the page) add, with `:iterate` applied to what was included.
async fn includes(
    db: &mut Db,
    registry: &Registry,
    q: &SearchQuery,
    page: &[Row],
) -> Result<Included> {
    let mut out = Included {
        rows: Vec::new(),
        truncated: false,
    };
    if page.is_empty() || (q.includes.is_empty() && q.revincludes.is_empty()) {
        return Ok(out);
    }
    let mut seen: HashSet<i64> = page.iter().map(|r| r.rid).collect();
    // The resources whose references are followed this round, as (rid, type, id).
    let mut frontier: Vec<(i64, String, String)> = page
        .iter()
        .map(|r| (r.rid, r.ty.clone(), r.id.clone()))
        .collect();
    for round in 0..=MAX_ITERATE {
        let active = |i: &&Include| round == 0 || i.iterate;
        let mut found: Vec<i64> = Vec::new();
        for inc in q.includes.iter().filter(active) {
            let sources: Vec<i64> = frontier
                .iter()
                .filter(|(_, t, _)| inc.source == "*" || *t == inc.source)
                .map(|(rid, _, _)| *rid)
                .collect();
            if sources.is_empty() {
                continue;
            }
            let mut b = SqlBuilder::new(
                "SELECT DISTINCT t.rid FROM idx_reference x JOIN resource t \
                 ON t.res_type = x.target_type AND t.res_id = x.target_id \
                 WHERE t.deleted = 0 AND x.rid IN ",
            );
            b.list(sources);
            if let Some(c) = &inc.code {
                b.push(" AND ");
                reference_rows_sql(&mut b, registry, &inc.source, c, "x");
            }
            if let Some(t) = &inc.target {
                b.push(" AND x.target_type = ").text(t.clone());
            }
            for r in db.search_rows(&b.sql, &b.args, &[Ty::Int]).await? {
                if let Some(v) = r.first() {
                    found.push(v.int());
                }
            }
        }
        for inc in q.revincludes.iter().filter(active) {
            let targets: Vec<&(i64, String, String)> = frontier
                .iter()
                .filter(|(_, t, _)| inc.target.as_ref().is_none_or(|x| x == t))
                .collect();
            if targets.is_empty() {
                continue;
            }
            let mut b = match &inc.code {
                Some(c) => {
                    let mut b =
                        SqlBuilder::new("SELECT DISTINCT x.rid FROM idx_reference x WHERE ");
                    reference_rows_sql(&mut b, registry, &inc.source, c, "x");
                    b
                }
                None => {
                    // Every reference parameter of the source: seeks in the lookup index.
                    let mut b =
                        SqlBuilder::new("SELECT DISTINCT x.rid FROM idx_reference x WHERE ");
                    all_reference_rows_sql(&mut b, registry, &inc.source, "x.param");
                    b
                }
            };
            // The ids first, as one list: with the OR over (type, id) pairs alone SQLite
            // (no statistics) seeks by `param` only and reads every row of the parameter.
            let mut ids: Vec<&String> = targets.iter().map(|(_, _, id)| id).collect();
            ids.sort_unstable();
            ids.dedup();
            b.push(" AND x.target_id IN ").list(ids);
            b.push(" AND (");
            for (i, (_, t, id)) in targets.iter().enumerate() {
                if i > 0 {
                    b.push(" OR ");
                }
                b.push("(x.target_type = ")
                    .text(t.clone())
                    .push(" AND x.target_id = ")
                    .text(id.clone())
                    .push(")");
            }
            b.push(")");
            for r in db.search_rows(&b.sql, &b.args, &[Ty::Int]).await? {
                if let Some(v) = r.first() {
                    found.push(v.int());
                }
            }
        }
        found.retain(|rid| seen.insert(*rid));
        if found.is_empty() {
            break;
        }
        if out.rows.len() + found.len() > MAX_INCLUDED {
            found.truncate(MAX_INCLUDED.saturating_sub(out.rows.len()));
            out.truncated = true;
        }
        let mut b = SqlBuilder::new(
            "SELECT r.rid, r.res_type, r.res_id, v.body FROM resource r \
             JOIN resource_version v ON v.seq = r.seq WHERE r.deleted = 0 AND r.rid IN ",
        );
        b.list(found);
        b.push(" ORDER BY r.rid");
        let rows = rows_of(db.search_rows(&b.sql, &b.args, &ROW_TYPES).await?);
        frontier = rows
            .iter()
            .map(|r| (r.rid, r.ty.clone(), r.id.clone()))
            .collect();
        out.rows.extend(rows);
        if out.truncated {
            break;
        }
    }
    Ok(out)
}
