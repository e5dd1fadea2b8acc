//! Document type and category codes: the curated table in `document_codes.json` (its sources
//! are listed in the file's `_source`), optionally replaced by an operator's file of the same
//! shape and restricted to the configured type systems.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The table shipped with the binary.
const SHIPPED: &str = include_str!("document_codes.json");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentCode {
    pub system: String,
    pub code: String,
    pub display: String,
    /// Default category code (in [`CodeTable::category_system`]).
    pub category: String,
}

#[derive(Deserialize)]
struct FileCode {
    code: String,
    display: String,
    #[serde(default)]
    category: Option<String>,
}

#[derive(Deserialize)]
struct FileSystem {
    name: String,
    system: String,
    codes: Vec<FileCode>,
}

#[derive(Deserialize)]
struct FileCategories {
    system: String,
    codes: Vec<FileCode>,
}

#[derive(Deserialize)]
struct CodeFile {
    categories: FileCategories,
    type_systems: Vec<FileSystem>,
}

/// Known document types (by `system|code`) and categories.
#[derive(Debug, Clone)]
pub struct CodeTable {
    category_system: String,
    categories: BTreeMap<String, String>,
    /// name → system URI
    systems: BTreeMap<String, String>,
    types: BTreeMap<String, DocumentCode>,
}

impl CodeTable {
    /// The shipped table (LOINC subset and WS/T 500 shared documents).
    pub fn shipped() -> Result<CodeTable, String> {
        CodeTable::from_json(SHIPPED)
    }

    /// Parse a table file; every type's category must be a listed category.
    pub fn from_json(json: &str) -> Result<CodeTable, String> {
        let file: CodeFile = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let categories: BTreeMap<String, String> = file
            .categories
            .codes
            .into_iter()
            .map(|c| (c.code, c.display))
            .collect();
        let mut systems = BTreeMap::new();
        let mut types = BTreeMap::new();
        for s in file.type_systems {
            systems.insert(s.name.clone(), s.system.clone());
            for c in s.codes {
                let category = c
                    .category
                    .ok_or_else(|| format!("type {}|{} has no category", s.system, c.code))?;
                if !categories.contains_key(&category) {
                    return Err(format!(
                        "type {}|{}: unknown category {category}",
                        s.system, c.code
                    ));
                }
                types.insert(
                    format!("{}|{}", s.system, c.code),
                    DocumentCode {
                        system: s.system.clone(),
                        code: c.code,
                        display: c.display,
                        category,
                    },
                );
            }
        }
        Ok(CodeTable {
            category_system: file.categories.system,
            categories,
            systems,
            types,
        })
    }

    /// Keep only the named type systems (e.g. `["loinc", "wst500"]`); unknown names are an error.
    pub fn restrict(mut self, names: &[String]) -> Result<CodeTable, String> {
        let mut keep = Vec::new();
        for n in names {
            let uri = self
                .systems
                .get(n)
                .ok_or_else(|| format!("unknown document type system {n}"))?;
            keep.push(uri.clone());
        }
        self.systems.retain(|_, uri| keep.contains(uri));
        self.types.retain(|_, t| keep.contains(&t.system));
        Ok(self)
    }

    pub fn category_system(&self) -> &str {
        &self.category_system
    }

    /// System URIs of the enabled type systems.
    pub fn type_systems(&self) -> impl Iterator<Item = &str> {
        self.systems.values().map(String::as_str)
    }

    pub fn is_type_system(&self, system: &str) -> bool {
        self.systems.values().any(|s| s == system)
    }

    pub fn document_type(&self, system: &str, code: &str) -> Option<&DocumentCode> {
        self.types.get(&format!("{system}|{code}"))
    }

    /// Every known `system|code` with this code (a search token without a system).
    pub fn types_with_code(&self, code: &str) -> Vec<String> {
        self.types
            .values()
            .filter(|t| t.code == code)
            .map(|t| format!("{}|{}", t.system, t.code))
            .collect()
    }

    pub fn category(&self, code: &str) -> Option<&str> {
        self.categories.get(code).map(String::as_str)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shipped_table_has_both_systems_and_consistent_categories() {
        let t = CodeTable::shipped().unwrap();
        let loinc = t.document_type("http://loinc.org", "18842-5").unwrap();
        assert_eq!(loinc.category, "summary");
        let wst = t
            .document_type(
                "https://yiqiao.health/fhir/CodeSystem/wst500-document",
                "C0053",
            )
            .unwrap();
        assert_eq!(wst.category, "summary");
        assert_eq!(t.types_with_code("C0007").len(), 1);
        assert!(t.category("imaging").is_some());
        assert!(t.document_type("http://loinc.org", "C0007").is_none());
    }

    #[test]
    fn restricting_drops_other_systems_and_rejects_unknown_names() {
        let t = CodeTable::shipped()
            .unwrap()
            .restrict(&["wst500".to_string()])
            .unwrap();
        assert!(t.document_type("http://loinc.org", "18842-5").is_none());
        assert!(!t.is_type_system("http://loinc.org"));
        assert!(
            CodeTable::shipped()
                .unwrap()
                .restrict(&["snomed".to_string()])
                .is_err()
        );
    }

    #[test]
    fn a_type_with_an_unknown_category_is_rejected() {
        let bad = r#"{"categories":{"system":"c","codes":[{"code":"a","display":"A"}]},
            "type_systems":[{"name":"x","system":"s","codes":[{"code":"1","display":"one","category":"b"}]}]}"#;
        assert!(
            CodeTable::from_json(bad)
                .unwrap_err()
                .contains("unknown category")
        );
    }
}
