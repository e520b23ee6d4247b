//! Code translation from FHIR R4 ConceptMap resources (conceptmap.html, `$translate`
//! semantics without a server): MDC → LOINC for vital signs and MDC units → UCUM.
//!
//! No code tables live in Rust: the maps are data (`terminology/*.json`), loaded once and
//! looked up by (source system, code, target system).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::hl7v2::map::datatypes::{LOINC, MDC, UCUM};

/// One target of a ConceptMap element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    pub code: String,
    pub display: Option<String>,
    /// R4 ConceptMapEquivalence (`equivalent`, `wider`, ...).
    pub equivalence: String,
}

#[derive(Debug, Clone, Default)]
struct Element {
    display: Option<String>,
    targets: Vec<Translation>,
}

/// Translations loaded from ConceptMaps. Targets keep their order in the map: the first
/// target of an element is the primary one (e.g. LOINC 2708-6 before 59408-5 for SpO2,
/// because the R4 vital-signs profile requires 2708-6).
#[derive(Debug, Clone, Default)]
pub struct Terminology {
    /// (source system, target system) → source code → element.
    groups: BTreeMap<(String, String), BTreeMap<String, Element>>,
}

impl Terminology {
    /// Loads R4 ConceptMaps. Targets whose equivalence says there is no match
    /// (`unmatched`, `disjoint`) are not translations and are skipped.
    pub fn from_concept_maps(maps: &[Value]) -> Result<Terminology, String> {
        let mut t = Terminology::default();
        for (i, map) in maps.iter().enumerate() {
            let name = map
                .get("url")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            let at = |what: &str| format!("ConceptMap #{i} ({name}): {what}");
            if map.get("resourceType").and_then(Value::as_str) != Some("ConceptMap") {
                return Err(at("resourceType is not ConceptMap"));
            }
            let groups = map
                .get("group")
                .and_then(Value::as_array)
                .ok_or_else(|| at("no group"))?;
            for (g, group) in groups.iter().enumerate() {
                let text = |k: &str| group.get(k).and_then(Value::as_str).map(str::to_string);
                let (Some(source), Some(target)) = (text("source"), text("target")) else {
                    return Err(at(&format!("group[{g}] needs source and target")));
                };
                let elements = group
                    .get("element")
                    .and_then(Value::as_array)
                    .ok_or_else(|| at(&format!("group[{g}] has no element")))?;
                let table = t.groups.entry((source, target)).or_default();
                for (e, element) in elements.iter().enumerate() {
                    let code = element
                        .get("code")
                        .and_then(Value::as_str)
                        .ok_or_else(|| at(&format!("group[{g}].element[{e}] has no code")))?;
                    let entry = table.entry(code.to_string()).or_default();
                    if entry.display.is_none() {
                        entry.display = element
                            .get("display")
                            .and_then(Value::as_str)
                            .map(str::to_string);
                    }
                    for (k, target) in element
                        .get("target")
                        .and_then(Value::as_array)
                        .map_or(&[][..], Vec::as_slice)
                        .iter()
                        .enumerate()
                    {
                        let field = |f: &str| target.get(f).and_then(Value::as_str);
                        let equivalence = field("equivalence").ok_or_else(|| {
                            at(&format!(
                                "group[{g}].element[{e}].target[{k}] has no equivalence"
                            ))
                        })?;
                        if matches!(equivalence, "unmatched" | "disjoint") {
                            continue;
                        }
                        let code = field("code").ok_or_else(|| {
                            at(&format!("group[{g}].element[{e}].target[{k}] has no code"))
                        })?;
                        entry.targets.push(Translation {
                            code: code.to_string(),
                            display: field("display").map(str::to_string),
                            equivalence: equivalence.to_string(),
                        });
                    }
                }
            }
        }
        Ok(t)
    }

    /// All translations of `code` from `source_system` into `target_system`, primary first.
    pub fn translate(
        &self,
        source_system: &str,
        code: &str,
        target_system: &str,
    ) -> &[Translation] {
        self.groups
            .get(&(source_system.to_string(), target_system.to_string()))
            .and_then(|g| g.get(code))
            .map_or(&[], |e| e.targets.as_slice())
    }

    /// The display a ConceptMap gives a source code (e.g. an MDC reference id).
    pub fn source_display(&self, source_system: &str, code: &str) -> Option<&str> {
        self.groups
            .iter()
            .filter(|((s, _), _)| s == source_system)
            .find_map(|(_, g)| g.get(code).and_then(|e| e.display.as_deref()))
    }

    /// The primary LOINC code (and display) for an MDC observation code.
    pub fn loinc_for_mdc(&self, mdc_code: &str) -> Option<(String, String)> {
        primary(self.translate(MDC, mdc_code, LOINC))
    }

    /// The UCUM code (and display) for an MDC unit code.
    pub fn ucum_for_mdc_unit(&self, mdc_unit_code: &str) -> Option<(String, String)> {
        primary(self.translate(MDC, mdc_unit_code, UCUM))
    }
}

fn primary(targets: &[Translation]) -> Option<(String, String)> {
    targets
        .first()
        .map(|t| (t.code.clone(), t.display.clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn loads_and_translates() {
        let map = json!({
            "resourceType": "ConceptMap", "url": "urn:test", "status": "active",
            "group": [{"source": MDC, "target": LOINC, "element": [
                {"code": "150456", "display": "MDC_PULS_OXIM_SAT_O2", "target": [
                    {"code": "2708-6", "display": "Oxygen saturation", "equivalence": "wider"},
                    {"code": "59408-5", "equivalence": "equivalent"},
                    {"code": "x", "equivalence": "unmatched"}]}]}]
        });
        let t = Terminology::from_concept_maps(&[map]).unwrap();
        assert_eq!(
            t.loinc_for_mdc("150456"),
            Some(("2708-6".into(), "Oxygen saturation".into()))
        );
        assert_eq!(t.translate(MDC, "150456", LOINC).len(), 2);
        assert_eq!(t.loinc_for_mdc("1"), None);
        assert_eq!(t.ucum_for_mdc_unit("262688"), None);
        assert_eq!(
            t.source_display(MDC, "150456"),
            Some("MDC_PULS_OXIM_SAT_O2")
        );
    }

    #[test]
    fn rejects_malformed_maps() {
        assert!(Terminology::from_concept_maps(&[json!({"resourceType": "ValueSet"})]).is_err());
        let no_equivalence = json!({"resourceType": "ConceptMap", "group": [{"source": "a", "target": "b",
            "element": [{"code": "1", "target": [{"code": "2"}]}]}]});
        assert!(Terminology::from_concept_maps(&[no_equivalence]).is_err());
    }
}
