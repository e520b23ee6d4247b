//! Compartments (FHIR R4 compartmentdefinition.html): which resources belong to the
//! compartment of a Patient, Encounter, RelatedPerson, Practitioner or Device, read from the
//! official CompartmentDefinition resources shipped in `profiles/compartments.json.gz`.

use std::collections::HashMap;

use serde_json::Value;

/// Per compartment type (`Patient`), per resource type, the search parameters that place a
/// resource in the compartment (`{def}` for the compartment's own type).
#[derive(Debug, Default)]
pub struct Compartments {
    by_type: HashMap<String, HashMap<String, Vec<String>>>,
}

impl Compartments {
    /// Reads a JSON array of CompartmentDefinition resources.
    pub fn from_json(defs: &Value) -> Result<Compartments, String> {
        let mut by_type = HashMap::new();
        for def in defs.as_array().ok_or("compartments.json is not an array")? {
            let code = def
                .get("code")
                .and_then(Value::as_str)
                .ok_or("a CompartmentDefinition has no code")?;
            let mut members: HashMap<String, Vec<String>> = HashMap::new();
            for r in def
                .get("resource")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (Some(ty), Some(params)) = (
                    r.get("code").and_then(Value::as_str),
                    r.get("param").and_then(Value::as_array),
                ) else {
                    continue;
                };
                let params: Vec<String> = params
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect();
                if !params.is_empty() {
                    members.insert(ty.to_string(), params);
                }
            }
            by_type.insert(code.to_string(), members);
        }
        Ok(Compartments { by_type })
    }

    /// The members of the compartment of `compartment_type`, if it is one.
    pub fn get(&self, compartment_type: &str) -> Option<&HashMap<String, Vec<String>>> {
        self.by_type.get(compartment_type)
    }

    /// The search parameters that place a `ty` resource in a `compartment_type`
    /// compartment; `None` when `ty` is not a member.
    pub fn params(&self, compartment_type: &str, ty: &str) -> Option<&[String]> {
        self.get(compartment_type)?.get(ty).map(Vec::as_slice)
    }
}
