//! history at instance, type and system level (FHIR R4 http.html#history), with `_since`,
//! `_at`, `_count` and keyset paging (`_cursor`), so pages stay correct while others write.

use serde_json::json;

use crate::error::{FhirError, Result};
use crate::interaction::bundle_text::{BundleText, url_with_query};
use crate::interaction::{Body, FhirRequest, FhirResponse, SharedCtx};
use crate::search::extract::parse_fhir_date_range;
use crate::store::resource::HistoryQuery;

const ACCEPTED: &[&str] = &[
    "_since", "_at", "_count", "_cursor", "_format", "_pretty", "_total",
];

pub async fn history(
    ctx: &SharedCtx,
    req: &FhirRequest,
    ty: Option<&str>,
    id: Option<&str>,
) -> Result<FhirResponse> {
    let mut q = HistoryQuery {
        res_type: ty.map(str::to_string),
        id: id.map(str::to_string),
        count: ctx.limits.default_count as i64,
        ..HistoryQuery::default()
    };
    for (k, v) in &req.query {
        match k.as_str() {
            "_since" => q.since = Some(instant(k, v)?.0),
            "_at" => q.at = Some(instant(k, v)?.1),
            "_count" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| FhirError::invalid(format!("_count: {v:?} is not a number")))?;
                q.count = n.clamp(1, ctx.limits.max_count) as i64;
            }
            "_cursor" => {
                q.before =
                    Some(v.parse().map_err(|_| {
                        FhirError::invalid(format!("_cursor: {v:?} is not a cursor"))
                    })?)
            }
            k if ACCEPTED.contains(&k) => {}
            k => {
                if !req.prefer_lenient {
                    return Err(FhirError::invalid(format!(
                        "history does not take the parameter {k:?}"
                    )));
                }
            }
        }
    }
    let mut db = ctx.store.reader().await?;
    if let (Some(t), Some(i)) = (ty, id)
        && db.current(t, i).await?.is_none()
    {
        return Err(crate::interaction::read::not_known(t, i));
    }
    let total = if req.param("_total") == Some("none") {
        None
    } else {
        Some(db.history_total(&q).await?)
    };
    let rows = db.history(&q).await?;
    let path = match (ty, id) {
        (Some(t), Some(i)) => format!("{t}/{i}/_history"),
        (Some(t), None) => format!("{t}/_history"),
        _ => "_history".to_string(),
    };
    let mut links = vec![("self", url_with_query(&ctx.base, &path, &req.query))];
    if rows.len() as i64 == q.count
        && let Some(last) = rows.last()
    {
        let mut next: Vec<(String, String)> = req
            .query
            .iter()
            .filter(|(k, _)| k != "_cursor")
            .cloned()
            .collect();
        next.push(("_cursor".into(), last.seq.to_string()));
        links.push(("next", url_with_query(&ctx.base, &path, &next)));
    }
    let mut b = BundleText::new("history", total, &links);
    for s in &rows {
        let full_url = format!("{}/{}/{}", ctx.base, s.res_type, s.id);
        let (url, status) = match s.method.as_str() {
            "POST" => (s.res_type.clone(), "201 Created"),
            "DELETE" => (format!("{}/{}", s.res_type, s.id), "204 No Content"),
            _ => (
                format!("{}/{}", s.res_type, s.id),
                if s.version == 1 {
                    "201 Created"
                } else {
                    "200 OK"
                },
            ),
        };
        b.entry(
            Some(&full_url),
            s.body.as_deref(),
            &[
                ("request", json!({ "method": s.method, "url": url })),
                (
                    "response",
                    json!({
                        "status": status,
                        "etag": format!("W/\"{}\"", s.version),
                        "lastModified": crate::time::format_instant(s.last_updated),
                    }),
                ),
            ],
        );
    }
    Ok(FhirResponse {
        body: Body::Raw(b.finish()),
        ..FhirResponse::json(200, serde_json::Value::Null)
    })
}

fn instant(k: &str, v: &str) -> Result<(i64, i64)> {
    parse_fhir_date_range(v)
        .ok_or_else(|| FhirError::invalid(format!("{k}: {v:?} is not a FHIR instant")))
}
