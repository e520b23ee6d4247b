//! search at type level (FHIR R4 http.html#search, search.html), GET and POST `_search`.

use serde_json::json;

use crate::error::Result;
use crate::interaction::bundle_text::{BundleText, url_with_query};
use crate::interaction::{Body, Ctx, FhirRequest, FhirResponse, RequestBody, SharedCtx};
use crate::search::query::SearchQuery;
use crate::store::{Db, Ty};

pub async fn search(ctx: &SharedCtx, ty: &str, req: &FhirRequest) -> Result<FhirResponse> {
    // POST _search: form parameters join the URL's.
    let mut params = req.query.clone();
    if let RequestBody::Form(form) = &req.body {
        params.extend(form.iter().cloned());
    }
    let mut db = ctx.store.reader().await?;
    let body = search_in(&mut db, ctx, ty, params, req.prefer_lenient).await?;
    Ok(FhirResponse {
        body: Body::Raw(body),
        ..FhirResponse::json(200, serde_json::Value::Null)
    })
}

/// Runs a search on `db` (inside a transaction for a transaction's GET entries) and
/// returns the searchset Bundle as JSON text.
pub async fn search_in(
    db: &mut Db,
    ctx: &Ctx,
    ty: &str,
    params: Vec<(String, String)>,
    lenient: bool,
) -> Result<String> {
    let q = SearchQuery::parse(
        &ctx.defs.registry,
        ty,
        &params,
        lenient,
        ctx.limits.default_count,
        ctx.limits.max_count,
    )?;
    // Inside a transaction, earlier entries' index rows must be visible.
    db.flush().await?;
    let total = if params.iter().any(|(k, v)| k == "_total" && v == "none") {
        None
    } else {
        let c = q.count_sql();
        Some(db.fetch_one_int(&c.sql, &c.args).await?)
    };
    let rows = if q.count_only || q.count == 0 {
        Vec::new()
    } else {
        let p = q.page_sql();
        db.fetch_all(&p.sql, &p.args, &[Ty::Text, Ty::Text]).await?
    };
    let self_params: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_offset")
        .cloned()
        .collect();
    let page = |offset: usize| {
        let mut p = self_params.clone();
        if offset > 0 {
            p.push(("_offset".into(), offset.to_string()));
        }
        url_with_query(&ctx.base, ty, &p)
    };
    let mut links = vec![("self", page(q.offset))];
    let has_more = total.map_or(rows.len() == q.count, |t| {
        ((q.offset + rows.len()) as i64) < t
    });
    if !rows.is_empty() && has_more {
        links.push(("next", page(q.offset + q.count)));
    }
    if q.offset > 0 {
        links.push(("previous", page(q.offset.saturating_sub(q.count))));
    }
    let mut b = BundleText::new("searchset", total, &links);
    for row in rows {
        let mut it = row.into_iter();
        let (Some(id), Some(body)) = (
            it.next().and_then(|v| v.text()),
            it.next().and_then(|v| v.text()),
        ) else {
            continue;
        };
        b.entry(
            Some(&format!("{}/{ty}/{id}", ctx.base)),
            Some(&body),
            &[("search", json!({"mode": "match"}))],
        );
    }
    if !q.ignored.is_empty() {
        let oo = crate::error::operation_outcome(
            &q.ignored
                .iter()
                .map(|d| crate::error::Issue {
                    severity: "warning",
                    code: "not-supported",
                    diagnostics: format!("ignored {d}"),
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
