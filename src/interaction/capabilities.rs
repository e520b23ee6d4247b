//! capabilities (FHIR R4 http.html#capabilities, capabilitystatement.html): generated from
//! what the server really does: every resource type of the definitions, the interactions
//! routed in `crate::interaction::route`, and exactly the search parameters that
//! `crate::search::query` can run.

use serde_json::{Value, json};

use crate::interaction::Ctx;
use crate::interaction::delete::ConditionalDeleteMode;
use crate::search::registry::{ParamType, Registry};

/// Whether `crate::search::query` can run this parameter.
fn runnable(p: &crate::search::registry::SearchParam) -> bool {
    p.expression.is_some()
        && (searchable(p.kind) || (p.kind == ParamType::Special && p.code == "near"))
}

/// Parameter types `crate::search::query` supports.
pub fn searchable(kind: ParamType) -> bool {
    matches!(
        kind,
        ParamType::Token
            | ParamType::String
            | ParamType::Reference
            | ParamType::Date
            | ParamType::Uri
            | ParamType::Number
            | ParamType::Quantity
            | ParamType::Composite
    )
}

fn type_code(kind: ParamType) -> &'static str {
    match kind {
        ParamType::Number => "number",
        ParamType::Date => "date",
        ParamType::String => "string",
        ParamType::Token => "token",
        ParamType::Reference => "reference",
        ParamType::Composite => "composite",
        ParamType::Quantity => "quantity",
        ParamType::Uri => "uri",
        ParamType::Special => "special",
    }
}

/// When what the statement describes last changed. The snapshot test
/// (`tests/snapshots/capability-statement.json`) fails until this is bumped with it.
const STATEMENT_DATE: &str = "2026-11-21";

pub fn statement(ctx: &Ctx) -> Value {
    let interactions = json!([
        {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "patch"},
        {"code": "delete"}, {"code": "history-instance"}, {"code": "history-type"},
        {"code": "create"}, {"code": "search-type"}
    ]);
    let compartments: Vec<String> = [
        "Device",
        "Encounter",
        "Patient",
        "Practitioner",
        "RelatedPerson",
    ]
    .iter()
    .filter(|c| ctx.defs.compartments.get(c).is_some())
    .map(|c| {
        format!(
            "http://hl7.org/fhir/CompartmentDefinition/{}",
            c.to_ascii_lowercase()
        )
    })
    .collect();
    let conditional_delete = match ctx.conditional_delete {
        ConditionalDeleteMode::Single => "single",
        ConditionalDeleteMode::Multiple => "multiple",
    };
    let registry = ctx.registry();
    let registry = &*registry;
    // Every reference parameter once, in type order, for each type's `searchRevInclude`.
    let references: Vec<(String, &[String])> = ctx
        .defs
        .resource_types
        .iter()
        .flat_map(|source| {
            registry
                .for_type(source)
                .into_iter()
                .filter(|p| p.expression.is_some() && p.kind == ParamType::Reference)
                .map(move |p| (format!("{source}:{}", p.code), p.targets.as_slice()))
        })
        .collect();
    let resources: Vec<Value> = ctx
        .defs
        .resource_types
        .iter()
        .map(|t| {
            let params = search_params(registry, t);
            let mut includes: Vec<String> = registry
                .for_type(t)
                .into_iter()
                .filter(|p| p.expression.is_some() && p.kind == ParamType::Reference)
                .map(|p| format!("{t}:{}", p.code))
                .collect();
            includes.sort();
            let rev_includes: Vec<&String> = references
                .iter()
                .filter(|(_, targets)| targets.is_empty() || targets.iter().any(|x| x == t))
                .map(|(label, _)| label)
                .collect();
            let mut includes_all = vec!["*".to_string()];
            includes_all.extend(includes);
            let mut operations = vec![json!({
                "name": "validate",
                "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"
            })];
            if t == "Patient" {
                operations.push(json!({
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
                }));
            }
            json!({
                "type": t,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{t}"),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "full-support",
                "conditionalUpdate": true,
                "conditionalDelete": conditional_delete,
                "referencePolicy": ["literal", "local"],
                "searchInclude": includes_all,
                "searchRevInclude": rev_includes,
                "searchParam": params,
                "operation": operations
            })
        })
        .collect();
    let mut statement = json!({
        "resourceType": "CapabilityStatement",
        "id": "iomt-fhir",
        "name": "IomtFhir",
        "title": "iomt-fhir FHIR R4 server",
        "status": "active",
        "date": STATEMENT_DATE,
        "publisher": "iomt-fhir",
        "kind": "instance",
        "software": {"name": "iomt-fhir", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "iomt-fhir FHIR R4 server", "url": ctx.base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [
                {"code": "transaction"}, {"code": "batch"}, {"code": "search-system"},
                {"code": "history-system"}
            ],
            "searchParam": search_params(registry, "Resource"),
            "operation": [{
                "name": "reindex",
                "definition": "urn:iomt-fhir:operation:reindex",
                "documentation": "Activates the stored SearchParameter resources and rebuilds the search indexes (optionally only of the _type given)."
            }, {
                "name": "hl7v2",
                "definition": "urn:iomt-fhir:operation:hl7v2",
                "documentation": "POST an HL7 v2 message (x-application/hl7-v2+er7 or text/plain; batch files too): ADT, ORU (incl. IHE PCD-01), RDE, RAS become FHIR resources in one transaction; the answer is the ACK (AA only after commit), or an OperationOutcome with Accept: application/fhir+json. GET $hl7v2-messages lists the stored messages, POST $hl7v2-replay processes them again."
            }, {
                "name": "device-data",
                "definition": "urn:iomt-fhir:operation:device-data",
                "documentation": "POST device telemetry (one JSON message, a JSON array, or NDJSON): mapped by the device templates (GET $device-data/templates) to Devices, Observations and Locations; 202 with counts once committed. GET $device-data/errors lists the messages that could not be mapped, POST $device-data/replay maps them again."
            }],
            "compartment": compartments
        }]
    });
    if ctx.auth.enabled() {
        // SMART App Launch 2.0 conformance.html: some clients find the OAuth endpoints only
        // here, in the oauth-uris extension.
        let e = |name: &str| crate::auth::oauth::endpoint(ctx, name);
        statement["rest"][0]["security"] = json!({
            "cors": true,
            "service": [{
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}],
                "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"
            }],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    {"url": "authorize", "valueUri": e("authorize")},
                    {"url": "token", "valueUri": e("token")},
                    {"url": "introspect", "valueUri": e("introspect")},
                    {"url": "revoke", "valueUri": e("revoke")}
                ]
            }]
        });
    }
    statement
}

/// The searchParam list of `ty` (`Resource` for a system-level search without `_type`):
/// `_id` and `_lastUpdated` (store columns), then every runnable parameter by name.
fn search_params(registry: &Registry, ty: &str) -> Vec<Value> {
    let mut params = vec![
        json!({"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"}),
        json!({"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated", "type": "date"}),
    ];
    let mut found: Vec<Value> = registry
        .for_type(ty)
        .into_iter()
        .filter(|p| runnable(p) && p.code != "_id" && p.code != "_lastUpdated")
        .map(|p| json!({"name": p.code, "definition": p.url, "type": type_code(p.kind)}))
        .collect();
    found.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    params.extend(found);
    params
}
