//! `$validate` at type and instance level (FHIR R4 resource-operation-validate.html): an
//! OperationOutcome with one issue per problem and its location.

use serde_json::Value;

use crate::error::{FhirError, Issue, Result, operation_outcome};
use crate::interaction::{FhirRequest, FhirResponse, SharedCtx, write};

pub async fn validate(
    ctx: &SharedCtx,
    ty: &str,
    id: Option<&str>,
    mut req: FhirRequest,
) -> Result<FhirResponse> {
    let body = req.take_resource()?;
    // The resource comes either directly or as the `resource` parameter of a Parameters.
    let mut mode = req.param("mode").map(str::to_string);
    let mut resource = if body.get("resourceType").and_then(Value::as_str) == Some("Parameters")
        && ty != "Parameters"
    {
        let params = body
            .get("parameter")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut found = None;
        for p in params {
            match p.get("name").and_then(Value::as_str) {
                Some("resource") => found = p.get("resource").cloned(),
                Some("mode") => {
                    mode = p
                        .get("valueCode")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                }
                _ => {}
            }
        }
        found.ok_or_else(|| {
            FhirError::invalid("Parameters has no `resource` parameter to validate")
        })?
    } else {
        body
    };
    if mode.as_deref() == Some("delete") {
        return Ok(FhirResponse::json(
            200,
            crate::error::information("delete would be allowed"),
        ));
    }
    let url_id = match (mode.as_deref(), id) {
        (Some("update"), Some(id)) | (None, Some(id)) => Some(id),
        _ => None,
    };
    let outcome = match write::check(ctx, ty, &mut resource, url_id) {
        Ok(()) => crate::error::information("validation passed: no errors"),
        Err(e) => operation_outcome(
            &e.issues
                .into_iter()
                .map(|i| Issue {
                    severity: "error",
                    ..i
                })
                .collect::<Vec<_>>(),
        ),
    };
    Ok(FhirResponse::json(200, outcome))
}
