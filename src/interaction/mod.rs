//! FHIR RESTful interactions (FHIR R4 http.html), independent of HTTP framing: a REST call
//! and a Bundle entry both become a [`FhirRequest`], are routed to one [`Interaction`] and
//! produce one [`FhirResponse`]. Only `crate::rest` knows axum.

pub mod audit;
pub mod authorized;
pub mod bundle_text;
pub mod capabilities;
pub mod create;
pub mod delete;
pub mod device_data;
pub mod history;
pub mod hl7v2;
pub mod patch;
pub mod read;
pub mod reindex;
pub mod search_type;
pub mod subset;
pub mod transaction;
pub mod update;
pub mod validate;
pub mod write;

use std::sync::Arc;

use serde_json::Value;

use crate::definitions::Definitions;
use crate::error::{ErrorKind, FhirError, Result};
use crate::store::Store;
use crate::store::resource::Written;
use crate::time::Micros;

/// Shared by every request: the store, the definitions and the server's settings.
///
/// Aligned to two cache lines so that in an `Arc<Ctx>` no field shares a line with the
/// reference counts, which every request writes (from both cores): the fields are read on
/// every request and would otherwise be fetched again from the other core each time.
#[repr(align(128))]
pub struct Ctx {
    pub store: Store,
    pub defs: &'static Definitions,
    /// Public base URL without a trailing slash (`http://127.0.0.1:8080/fhir`).
    pub base: String,
    pub limits: Limits,
    pub conditional_delete: delete::ConditionalDeleteMode,
    /// Whether writes extract search index values (see `Settings::search_indexing`).
    pub search_indexing: bool,
    /// The search parameters in force: the official ones plus the SearchParameter resources
    /// activated by `$reindex`; swapped whole by `$reindex`.
    pub registry: std::sync::RwLock<Arc<crate::search::registry::Registry>>,
    /// Bumped after each swap of `registry`: what was decided with the search parameters
    /// can tell it is stale without taking the lock.
    pub registry_generation: std::sync::atomic::AtomicU64,
    /// Device feed templates and settings (`$device-data`, MQTT).
    pub devices: device_data::DeviceFeeds,
    /// Authorization (`--auth`), registered clients' tokens.
    pub auth: crate::auth::Auth,
    /// The AuditEvent queue (`--auth smart`).
    pub audit: audit::Audit,
}

impl Ctx {
    /// The search parameters in force now.
    pub fn registry(&self) -> Arc<crate::search::registry::Registry> {
        match self.registry.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn set_registry(&self, registry: crate::search::registry::Registry) {
        let registry = Arc::new(registry);
        match self.registry.write() {
            Ok(mut r) => *r = registry,
            Err(poisoned) => *poisoned.into_inner() = registry,
        }
        // After the swap: whoever reads the new generation then reads the new registry.
        self.registry_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Which `registry` is in force (see `registry_generation`).
    pub fn registry_generation(&self) -> u64 {
        self.registry_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

pub type SharedCtx = Arc<Ctx>;

/// Configurable limits on client input.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_bundle_entries: usize,
    pub default_count: usize,
    pub max_count: usize,
}

/// HTTP method, as FHIR uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Other,
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => Method::Other,
        }
    }
}

/// `Prefer: return=...` (http.html#ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Return {
    Minimal,
    #[default]
    Representation,
    OperationOutcome,
}

/// Body of a request, as parsed by the transport.
#[derive(Debug, Clone)]
pub enum RequestBody {
    None,
    Resource(Value),
    /// JSON Patch document (`application/json-patch+json`).
    JsonPatch(Value),
    /// `application/x-www-form-urlencoded` search parameters.
    Form(Vec<(String, String)>),
    /// Bytes the transport does not interpret (an HL7 v2 message).
    Bytes(Vec<u8>),
}

/// One FHIR request, from HTTP or from a Bundle entry.
#[derive(Debug, Clone)]
pub struct FhirRequest {
    pub method: Method,
    /// Path segments after the base, percent-decoded.
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<Micros>,
    pub if_none_exist: Option<String>,
    /// `Prefer: return=...`, `None` when the client did not say.
    pub prefer_return: Option<Return>,
    pub prefer_lenient: bool,
    /// The client accepts FHIR JSON (for operations that can also answer in another format).
    pub wants_fhir_json: bool,
    pub body: RequestBody,
    /// The access token's grant (`--auth smart`); `None` when authorization is off or the
    /// request comes from inside the server (HL7 v2, device feeds, import).
    pub grant: Option<Arc<crate::auth::access::Grant>>,
}

impl FhirRequest {
    pub fn new(method: Method, segments: Vec<String>, query: Vec<(String, String)>) -> Self {
        FhirRequest {
            method,
            segments,
            query,
            if_match: None,
            if_none_match: None,
            if_modified_since: None,
            if_none_exist: None,
            prefer_return: None,
            prefer_lenient: false,
            wants_fhir_json: false,
            body: RequestBody::None,
            grant: None,
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The URL's parameters, and for POST `_search` the form's after them.
    pub fn search_params(&self) -> Vec<(String, String)> {
        let mut params = self.query.clone();
        if let RequestBody::Form(form) = &self.body {
            params.extend(form.iter().cloned());
        }
        params
    }

    /// `after=<id>&_count=<n>` of the stored-message listings (`$hl7v2-messages`,
    /// `$device-data/errors`): the id to list after, and the page size within the limits.
    pub fn listing_window(&self, limits: &Limits) -> Result<(i64, i64)> {
        let after = self
            .param("after")
            .map_or(Ok(0), str::parse)
            .map_err(|_| FhirError::invalid("after must be a message id"))?;
        let count = self
            .param("_count")
            .map_or(Ok(limits.default_count as i64), str::parse)
            .map_err(|_| FhirError::invalid("_count must be a number"))?
            .clamp(1, limits.max_count as i64);
        Ok((after, count))
    }

    pub fn take_resource(&mut self) -> Result<Value> {
        match std::mem::replace(&mut self.body, RequestBody::None) {
            RequestBody::Resource(v) => Ok(v),
            _ => Err(FhirError::invalid(
                "this interaction needs a resource in the request body",
            )),
        }
    }
}

/// A response body.
#[derive(Debug, Clone)]
pub enum Body {
    None,
    /// Stored JSON text, sent as it is unless the client asked for a subset or pretty print.
    Raw(String),
    Json(Value),
    /// Another media type (e.g. an HL7 v2 acknowledgement).
    Bytes(&'static str, Vec<u8>),
}

/// One FHIR response, before HTTP framing.
#[derive(Debug, Clone)]
pub struct FhirResponse {
    pub status: u16,
    pub body: Body,
    pub version: Option<i64>,
    pub last_modified: Option<Micros>,
    /// Relative location (`Patient/1/_history/2`); the transport makes it absolute.
    pub location: Option<String>,
    /// The body is a single resource to which `_summary` / `_elements` apply.
    pub is_resource: bool,
}

impl FhirResponse {
    pub fn json(status: u16, body: Value) -> Self {
        FhirResponse {
            status,
            body: Body::Json(body),
            version: None,
            last_modified: None,
            location: None,
            is_resource: false,
        }
    }

    /// The response of a write, honouring `Prefer: return`.
    pub fn written(ty: &str, w: &Written, status: u16, ret: Option<Return>) -> Self {
        let body = match (ret.unwrap_or_default(), &w.body) {
            (Return::Minimal, _) | (_, None) => Body::None,
            (Return::Representation, Some(b)) => Body::Raw(b.clone()),
            (Return::OperationOutcome, Some(_)) => Body::Json(crate::error::information(format!(
                "{ty}/{} version {} stored",
                w.id, w.version
            ))),
        };
        FhirResponse {
            status,
            body,
            version: Some(w.version),
            last_modified: Some(w.last_updated),
            location: Some(format!("{ty}/{}/_history/{}", w.id, w.version)),
            is_resource: true,
        }
    }
}

/// Every interaction the server routes (http.html summary table, plus operations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    Bundle,
    /// `POST [base]/$device-data`: device telemetry (JSON, JSON array, NDJSON).
    DeviceData,
    /// `GET [base]/$device-data/errors`: device messages that could not be mapped.
    DeviceDataErrors,
    /// `POST [base]/$device-data/replay`: map the dead letters again.
    DeviceDataReplay,
    /// `GET [base]/$device-data/templates`: the mapping templates in force.
    DeviceDataTemplates,
    /// `POST [base]/$hl7v2`: HL7 v2 message ingestion.
    Hl7v2,
    /// `GET [base]/$hl7v2-messages`: the stored HL7 v2 messages.
    Hl7v2Messages,
    /// `POST [base]/$hl7v2-replay`: process stored messages again.
    Hl7v2Replay,
    HistorySystem,
    /// `POST [base]/$reindex`: activate stored SearchParameters, rebuild indexes.
    Reindex,
    SearchSystem,
    SearchType(String),
    /// `[Compartment]/[id]/[type or *]`.
    SearchCompartment(String, String, String),
    /// `Patient/[id]/$everything`.
    Everything(String),
    Create(String),
    ConditionalUpdate(String),
    ConditionalDelete(String),
    ConditionalPatch(String),
    HistoryType(String),
    ValidateType(String),
    Read(String, String),
    Update(String, String),
    Patch(String, String),
    Delete(String, String),
    HistoryInstance(String, String),
    ValidateInstance(String, String),
    Vread(String, String, String),
}

/// Routes a method and path to an interaction; unknown input becomes a 404/405 value.
pub fn route(defs: &Definitions, method: Method, segments: &[String]) -> Result<Interaction> {
    use Interaction as I;
    use Method as M;
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let not_allowed = || {
        Err(FhirError::new(
            ErrorKind::MethodNotAllowed,
            format!("method not allowed on /{}", seg.join("/")),
        ))
    };
    let known_type = |t: &str| -> Result<String> {
        if defs.is_resource_type(t) {
            Ok(t.to_string())
        } else {
            Err(FhirError::not_found(format!("unknown resource type {t:?}")))
        }
    };
    let get = matches!(method, M::Get | M::Head);
    match seg.as_slice() {
        [] => match method {
            M::Post => Ok(I::Bundle),
            _ if get => Ok(I::SearchSystem),
            _ => not_allowed(),
        },
        ["$device-data"] if method == M::Post => Ok(I::DeviceData),
        ["$device-data", "errors"] if get => Ok(I::DeviceDataErrors),
        ["$device-data", "replay"] if method == M::Post => Ok(I::DeviceDataReplay),
        ["$device-data", "templates"] if get => Ok(I::DeviceDataTemplates),
        ["$device-data"] | ["$device-data", "errors" | "replay" | "templates"] => not_allowed(),
        ["$hl7v2"] => {
            if method == M::Post {
                Ok(I::Hl7v2)
            } else {
                not_allowed()
            }
        }
        ["$hl7v2-messages"] => {
            if get {
                Ok(I::Hl7v2Messages)
            } else {
                not_allowed()
            }
        }
        ["$hl7v2-replay"] => {
            if method == M::Post {
                Ok(I::Hl7v2Replay)
            } else {
                not_allowed()
            }
        }
        ["$reindex"] => {
            if method == M::Post {
                Ok(I::Reindex)
            } else {
                not_allowed()
            }
        }
        ["_search"] => {
            if method == M::Post {
                Ok(I::SearchSystem)
            } else {
                not_allowed()
            }
        }
        ["metadata"] => {
            if get {
                Ok(I::Capabilities)
            } else {
                not_allowed()
            }
        }
        ["_history"] => {
            if get {
                Ok(I::HistorySystem)
            } else {
                not_allowed()
            }
        }
        [t] => {
            let t = known_type(t)?;
            match method {
                _ if get => Ok(I::SearchType(t)),
                M::Post => Ok(I::Create(t)),
                M::Put => Ok(I::ConditionalUpdate(t)),
                M::Delete => Ok(I::ConditionalDelete(t)),
                M::Patch => Ok(I::ConditionalPatch(t)),
                _ => not_allowed(),
            }
        }
        [t, "_search"] => {
            let t = known_type(t)?;
            if method == M::Post {
                Ok(I::SearchType(t))
            } else {
                not_allowed()
            }
        }
        [t, "_history"] => {
            let t = known_type(t)?;
            if get {
                Ok(I::HistoryType(t))
            } else {
                not_allowed()
            }
        }
        [t, "$validate"] => {
            let t = known_type(t)?;
            if method == M::Post {
                Ok(I::ValidateType(t))
            } else {
                not_allowed()
            }
        }
        [t, op] if op.starts_with('$') => {
            known_type(t)?;
            Err(FhirError::not_supported(format!(
                "operation {op} is not supported"
            )))
        }
        [t, id] => {
            let t = known_type(t)?;
            let id = parse_id(id)?;
            match method {
                _ if get => Ok(I::Read(t, id)),
                M::Put => Ok(I::Update(t, id)),
                M::Patch => Ok(I::Patch(t, id)),
                M::Delete => Ok(I::Delete(t, id)),
                _ => not_allowed(),
            }
        }
        [t, id, "_history"] => {
            let (t, id) = (known_type(t)?, parse_id(id)?);
            if get {
                Ok(I::HistoryInstance(t, id))
            } else {
                not_allowed()
            }
        }
        [t, id, "$validate"] => {
            let (t, id) = (known_type(t)?, parse_id(id)?);
            if method == M::Post {
                Ok(I::ValidateInstance(t, id))
            } else {
                not_allowed()
            }
        }
        ["Patient", id, "$everything"] => {
            let id = parse_id(id)?;
            if get || method == M::Post {
                Ok(I::Everything(id))
            } else {
                not_allowed()
            }
        }
        [t, id, c] | [t, id, c, "_search"] if !c.starts_with('$') && !c.starts_with('_') => {
            let (t, id) = (known_type(t)?, parse_id(id)?);
            let c = if *c == "*" {
                c.to_string()
            } else {
                known_type(c)?
            };
            let post_search = seg.len() == 4 && method == M::Post;
            if (seg.len() == 3 && get) || post_search {
                Ok(I::SearchCompartment(t, id, c))
            } else {
                not_allowed()
            }
        }
        [t, id, "_history", vid] => {
            let (t, id) = (known_type(t)?, parse_id(id)?);
            if get {
                Ok(I::Vread(t, id, (*vid).to_string()))
            } else {
                not_allowed()
            }
        }
        _ => Err(FhirError::not_found(format!(
            "no such endpoint /{}",
            seg.join("/")
        ))),
    }
}

/// Splits a URL path below the base into percent-decoded segments.
pub fn split_path(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// Decodes a query string (`a=1&b=2`) into its parameters, in order.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A logical id (datatypes.html#id): 1-64 of `[A-Za-z0-9\-\.]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub fn parse_id(id: &str) -> Result<String> {
    if is_valid_id(id) {
        Ok(id.to_string())
    } else {
        Err(FhirError::invalid(format!(
            "{id:?} is not a valid id (1-64 characters of A-Z a-z 0-9 - .)"
        )))
    }
}

/// A new server-assigned id: a version 7 UUID (time first, then random), so new resources
/// are added at the end of the indexes on id instead of on a random page of each.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Parses an ETag / If-Match value (`W/"3"`, `"3"` or `3`) to a version number.
pub fn parse_etag(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.trim_matches('"').parse().ok()
}

/// Handles one request. Reads run on a pooled connection; each write runs as one job
/// (one database transaction) through the store.
pub async fn handle(ctx: &SharedCtx, req: FhirRequest) -> Result<FhirResponse> {
    let interaction = route(ctx.defs, req.method, &req.segments)?;
    use Interaction as I;
    // The terminology the HL7 v2 mapping runs on is served, not edited, over the API.
    if let I::Update(t, id) | I::Patch(t, id) | I::Delete(t, id) = &interaction
        && hl7v2::is_managed_concept_map(t, id)
    {
        return Err(FhirError::new(
            ErrorKind::MethodNotAllowed,
            format!("{t}/{id} is read-only: it comes from the server's terminology/ folder"),
        ));
    }
    if ctx.auth.enabled() {
        server_written(&interaction)?;
    }
    if let Some(grant) = req.grant.clone() {
        return authorized::handle(ctx, grant, interaction, req).await;
    }
    dispatch(ctx, interaction, req).await
}

/// Under `--auth smart` the audit trail is the server's: no API write may touch it.
pub fn server_written(interaction: &Interaction) -> Result<()> {
    use Interaction as I;
    match interaction {
        I::Create(t)
        | I::Update(t, _)
        | I::Patch(t, _)
        | I::Delete(t, _)
        | I::ConditionalUpdate(t)
        | I::ConditionalPatch(t)
        | I::ConditionalDelete(t)
            if t == "AuditEvent" =>
        {
            Err(FhirError::new(
                ErrorKind::MethodNotAllowed,
                "AuditEvents are written by the server only",
            ))
        }
        _ => Ok(()),
    }
}

/// Runs a routed interaction (after any authorization).
pub async fn dispatch(
    ctx: &SharedCtx,
    interaction: Interaction,
    mut req: FhirRequest,
) -> Result<FhirResponse> {
    use Interaction as I;
    // Each interaction's future is boxed, so this one is small (without it: 11 KB, the
    // largest interaction's state), and so are the futures of `handle`, the request handler
    // and the middleware around it, which are copied each time a layer wraps them.
    match interaction {
        I::Capabilities => Ok(FhirResponse::json(200, capabilities::statement(ctx))),
        I::Bundle => Box::pin(transaction::bundle(ctx, &mut req)).await,
        I::DeviceData => Box::pin(device_data::http(ctx, req)).await,
        I::DeviceDataErrors => Box::pin(device_data::http_errors(ctx, &req)).await,
        I::DeviceDataReplay => Box::pin(device_data::http_replay(ctx, &req)).await,
        I::DeviceDataTemplates => Ok(device_data::http_templates(ctx)),
        I::Hl7v2 => Box::pin(hl7v2::http(ctx, req)).await,
        I::Hl7v2Messages => Box::pin(hl7v2::http_list(ctx, &req)).await,
        I::Hl7v2Replay => Box::pin(hl7v2::http_replay(ctx, &req)).await,
        I::HistorySystem => Box::pin(history::history(ctx, &req, None, None)).await,
        I::HistoryType(t) => Box::pin(history::history(ctx, &req, Some(&t), None)).await,
        I::HistoryInstance(t, id) => {
            Box::pin(history::history(ctx, &req, Some(&t), Some(&id))).await
        }
        I::SearchType(t) => Box::pin(search_type::search(ctx, &t, &req)).await,
        I::SearchSystem => Box::pin(search_type::search_system(ctx, &req)).await,
        I::Reindex => Box::pin(reindex::http(ctx, &req)).await,
        I::SearchCompartment(c, id, t) => {
            Box::pin(search_type::search_compartment(ctx, &c, &id, &t, &req)).await
        }
        I::Everything(id) => Box::pin(search_type::everything(ctx, &id, &req)).await,
        I::Read(t, id) => Box::pin(read::read(ctx, &t, &id, &req)).await,
        I::Vread(t, id, vid) => Box::pin(read::vread(ctx, &t, &id, &vid)).await,
        I::Create(t) => Box::pin(create::create(ctx, &t, req)).await,
        I::Update(t, id) => Box::pin(update::update(ctx, &t, &id, req)).await,
        I::ConditionalUpdate(t) => Box::pin(update::conditional_update(ctx, &t, req)).await,
        I::Patch(t, id) => Box::pin(patch::patch(ctx, &t, Some(id), req)).await,
        I::ConditionalPatch(t) => Box::pin(patch::patch(ctx, &t, None, req)).await,
        I::Delete(t, id) => Box::pin(delete::delete(ctx, &t, &id, req)).await,
        I::ConditionalDelete(t) => Box::pin(delete::conditional_delete(ctx, &t, req)).await,
        I::ValidateType(t) => Box::pin(validate::validate(ctx, &t, None, req)).await,
        I::ValidateInstance(t, id) => Box::pin(validate::validate(ctx, &t, Some(&id), req)).await,
    }
}
