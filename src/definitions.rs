//! The official FHIR R4 (4.0.1) definitions the server runs on, shipped inside the binary
//! (compressed): the JSON schema, an element table derived from the StructureDefinitions
//! (`profiles/gen_elements.py`), and the SearchParameters. Resource types, validation and
//! search parameters all come from here, never from lists typed by hand.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::search::compartment::Compartments;
use crate::search::registry::{LoadReport, Registry};
use crate::validation::{ElementTable, Validator};

static SCHEMA_GZ: &[u8] = include_bytes!("../profiles/fhir.schema.json.gz");
static ELEMENTS_GZ: &[u8] = include_bytes!("../profiles/elements.json.gz");
static COMPARTMENTS_GZ: &[u8] = include_bytes!("../profiles/compartments.json.gz");
static SEARCH_PARAMETERS_GZ: &[u8] = include_bytes!("../profiles/search-parameters.json.gz");

/// Everything derived from the official definitions, built once per process.
pub struct Definitions {
    /// The 146 R4 resource types, sorted.
    pub resource_types: Vec<String>,
    type_set: HashSet<String>,
    pub elements: Arc<ElementTable>,
    pub validator: Validator,
    pub registry: Registry,
    pub search_report: LoadReport,
    pub compartments: Compartments,
}

fn gunzip_json(name: &str, bytes: &[u8]) -> Result<Value, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .map_err(|e| format!("embedded {name} is not gzip: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("embedded {name} is not JSON: {e}"))
}

impl Definitions {
    fn build() -> Result<Definitions, String> {
        let schema = gunzip_json("fhir.schema.json", SCHEMA_GZ)?;
        let mut resource_types: Vec<String> = schema
            .pointer("/discriminator/mapping")
            .and_then(Value::as_object)
            .ok_or("fhir.schema.json has no discriminator mapping")?
            .keys()
            .cloned()
            .collect();
        resource_types.sort();
        let elements = Arc::new(ElementTable::from_json(&gunzip_json(
            "elements.json",
            ELEMENTS_GZ,
        )?)?);
        let validator = Validator::new(&schema, elements.clone())?;
        let (registry, search_report) = Registry::from_bundle(&gunzip_json(
            "search-parameters.json",
            SEARCH_PARAMETERS_GZ,
        )?);
        let compartments =
            Compartments::from_json(&gunzip_json("compartments.json", COMPARTMENTS_GZ)?)?;
        let type_set = resource_types.iter().cloned().collect();
        Ok(Definitions {
            resource_types,
            type_set,
            elements,
            validator,
            registry,
            search_report,
            compartments,
        })
    }

    /// The process-wide definitions (parsed and compiled on first use).
    pub fn get() -> Result<&'static Definitions, String> {
        static DEFS: OnceLock<Result<Definitions, String>> = OnceLock::new();
        DEFS.get_or_init(Definitions::build)
            .as_ref()
            .map_err(Clone::clone)
    }

    pub fn is_resource_type(&self, name: &str) -> bool {
        self.type_set.contains(name)
    }
}
