//! The paper's reported values (WACV 2023, transcribed in `wacv2023_tables.toml`, a copy of
//! `shared/paper/wacv2023_tables.toml`), looked up by table, row (method) and column name.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The embedded copy of the paper's tables.
pub const PAPER_TABLES: &str = include_str!("wacv2023_tables.toml");

#[derive(Deserialize)]
struct PaperTable {
    title: String,
    columns: Vec<String>,
    #[serde(default)]
    rows: Vec<PaperRow>,
}

#[derive(Deserialize)]
struct PaperRow {
    method: String,
    values: Vec<[f64; 2]>,
}

/// One paper table: (method, column) → (mean, std).
#[derive(Clone, Debug, Default)]
pub struct Reference {
    pub title: String,
    pub columns: Vec<String>,
    values: BTreeMap<(String, String), (f64, f64)>,
}

impl Reference {
    /// The table `name` (`breakhis`, `bach`, `breast_cell`) of the paper.
    pub fn paper(name: &str) -> Result<Reference, String> {
        Reference::parse(PAPER_TABLES, name)
    }

    /// The table `name` of a reference file in the same format.
    pub fn parse(text: &str, name: &str) -> Result<Reference, String> {
        let tables: BTreeMap<String, toml::Value> =
            toml::from_str(text).map_err(|e| format!("the reference tables do not parse: {e}"))?;
        let Some(v) = tables.get(name) else {
            let names: Vec<&str> = tables.keys().map(String::as_str).collect();
            return Err(format!("no reference table `{name}`; the paper's tables are {}", names.join(", ")));
        };
        let t: PaperTable = v.clone().try_into().map_err(|e| format!("reference table `{name}`: {e}"))?;
        let mut values = BTreeMap::new();
        for r in &t.rows {
            if r.values.len() != t.columns.len() {
                return Err(format!(
                    "reference table `{name}`, row `{}`: {} values for {} columns",
                    r.method,
                    r.values.len(),
                    t.columns.len()
                ));
            }
            for (c, v) in t.columns.iter().zip(&r.values) {
                values.insert((r.method.clone(), c.clone()), (v[0], v[1]));
            }
        }
        Ok(Reference { title: t.title, columns: t.columns, values })
    }

    /// The paper's (mean, std) for a method and column, if it reports one.
    pub fn get(&self, method: &str, column: &str) -> Option<(f64, f64)> {
        self.values.get(&(method.to_string(), column.to_string())).copied()
    }

    pub fn methods(&self) -> Vec<&str> {
        let mut m: Vec<&str> = self.values.keys().map(|(m, _)| m.as_str()).collect();
        m.dedup();
        m
    }
}
