//! `table`: the evaluate nodes' `metrics.json` aggregated into the paper's table layout (`crate::table`), with
//! the paper's reported values beside ours. Writes `table.md`, `table.csv`, `table.tex` and `table.json`.
//!
//! ```toml
//! [stage.table]
//! kind = "table"
//! from = "evaluate"
//! layout = "breakhis"            # patient/image accuracy per magnification + mean (or give `columns`)
//! rows = "init"                  # the matrix key of the rows (default "init")
//! row_labels = { imagenet = "ImageNet (RN-50)", FP = "MPCS-FP (RN-50)" }
//! reference = "breakhis"         # compare with the paper's table (breakhis, bach, breast_cell)
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{log_line, ExecContext, StageFailure};
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};
use crate::table::{breakhis_columns, build, ColumnSpec, Entry, Reference, TableSpec};

pub const VERSION: u32 = 1;

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TableStageSpec {
    pub title: Option<String>,
    /// `breakhis`: the paper's BreakHis columns over the inputs' magnifications.
    pub layout: Option<String>,
    pub columns: Option<Vec<ColumnDecl>>,
    pub rows: Option<String>,
    #[serde(default)]
    pub row_labels: BTreeMap<String, String>,
    pub folds: Option<String>,
    /// A table of the paper to compare with: `breakhis`, `bach` or `breast_cell`.
    pub reference: Option<String>,
    pub decimals: Option<usize>,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ColumnDecl {
    pub name: String,
    pub metric: String,
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, String>,
    pub mean_over: Option<String>,
    /// Display multiplier (default 100: accuracies in percent).
    pub scale: Option<f64>,
}

impl TableStageSpec {
    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        let bad = |m: String| Err(src.error(decl.span.clone(), format!("stage `{}`: {m}", decl.name), None));
        if decl.refs.is_empty() {
            return bad("needs `from` with the evaluate stage(s)".into());
        }
        match (self.layout.as_deref(), &self.columns) {
            (Some("breakhis"), None) | (None, Some(_)) => {}
            (Some("breakhis"), Some(_)) => return bad("give `layout` or `columns`, not both".into()),
            (Some(l), _) => return bad(format!("unknown layout `{l}`; use \"breakhis\" or give `columns`")),
            (None, None) => return bad("give `layout = \"breakhis\"` or a `columns` list".into()),
        }
        if let Some(r) = &self.reference {
            if let Err(e) = Reference::paper(r) {
                return bad(e);
            }
        }
        Ok(())
    }

    pub fn key_params(&self) -> BTreeMap<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
            _ => BTreeMap::new(),
        }
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let mut entries = Vec::new();
        for input in &ctx.inputs {
            let path = input.path.join("metrics.json");
            let text = std::fs::read(&path).map_err(|e| {
                StageFailure(format!("cannot read {} ({e}); is `{}` an evaluate stage?", path.display(), input.stage))
            })?;
            let metrics: Value = serde_json::from_slice(&text)
                .map_err(|e| StageFailure(format!("{} is not JSON: {e}", path.display())))?;
            entries.push(Entry { stage: input.stage.clone(), matrix: input.matrix.iter().cloned().collect(), metrics });
        }
        let columns = match &self.columns {
            Some(cols) => cols
                .iter()
                .map(|c| ColumnSpec {
                    name: c.name.clone(),
                    metric: c.metric.clone(),
                    filter: c.filter.clone(),
                    mean_over: c.mean_over.clone(),
                    scale: c.scale.unwrap_or(100.0),
                })
                .collect(),
            None => {
                let mut mags: Vec<String> = Vec::new();
                for e in &entries {
                    match e.matrix.get("magnification") {
                        Some(m) if !mags.contains(m) => mags.push(m.clone()),
                        Some(_) => {}
                        None => {
                            return Err(StageFailure(format!(
                                "layout \"breakhis\" needs a `magnification` matrix key on the inputs; `{}` has none",
                                e.stage
                            )))
                        }
                    }
                }
                breakhis_columns(&mags)
            }
        };
        let spec = TableSpec {
            title: self.title.clone().unwrap_or_else(|| ctx.exp.title.clone().unwrap_or_else(|| ctx.exp.name.clone())),
            rows: self.rows.clone().unwrap_or_else(|| "init".into()),
            row_labels: self.row_labels.clone(),
            folds: self.folds.clone().unwrap_or_else(|| "fold".into()),
            columns,
            decimals: self.decimals.unwrap_or(2),
        };
        let reference = match &self.reference {
            Some(r) => Some((r.as_str(), Reference::paper(r).map_err(StageFailure)?)),
            None => None,
        };
        let table = build(&spec, &entries, reference.as_ref().map(|(n, r)| (*n, r))).map_err(StageFailure)?;
        let json = serde_json::to_value(&table).map_err(|e| StageFailure(e.to_string()))?;
        let files = [
            ("table.md", table.to_markdown(spec.decimals)),
            ("table.csv", table.to_csv()),
            ("table.tex", table.to_latex(spec.decimals)),
            ("table.json", serde_json::to_string_pretty(&json).unwrap_or_default()),
        ];
        for (name, text) in files {
            std::fs::write(ctx.out.join(name), text).map_err(|e| StageFailure(format!("cannot write {name}: {e}")))?;
        }
        log_line(ctx, &table.to_markdown(spec.decimals));
        Ok(serde_json::json!({ "rows": table.rows.len(), "columns": table.columns.len(), "inputs": entries.len() }))
    }
}
