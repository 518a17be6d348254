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

use super::{log_line, stage_error, write_output};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};
use crate::table::{breakhis_columns, build, ColumnSpec, Entry, Reference, TableSpec};

pub struct Table;

impl StageKind for Table {
    type Spec = TableStageSpec;
    type Config = TableConfig;
    const NAME: &'static str = "table";
    const VERSION: u32 = 1;

    fn validate(spec: &TableStageSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        let bad = |m: &str| Err(stage_error(exp, stage, m));
        if stage.refs.is_empty() {
            return bad("needs `from` with the evaluate stage(s)");
        }
        match (spec.layout, &spec.columns) {
            (Some(Layout::Breakhis), None) | (None, Some(_)) => Ok(()),
            (Some(Layout::Breakhis), Some(_)) => bad("give `layout` or `columns`, not both"),
            (None, None) => bad("give `layout = \"breakhis\"` or a `columns` list"),
        }
    }

    fn resolve(spec: &TableStageSpec, node: &NodeView<'_>) -> Result<TableConfig, String> {
        let exp = node.exp;
        let columns = spec.columns.as_ref().map(|cols| {
            cols.iter()
                .map(|c| ColumnConfig {
                    name: c.name.clone(),
                    metric: c.metric.clone(),
                    filter: c.filter.clone(),
                    mean_over: c.mean_over.clone(),
                    scale: c.scale.unwrap_or(100.0),
                })
                .collect()
        });
        Ok(TableConfig {
            title: spec.title.clone().unwrap_or_else(|| exp.title.clone().unwrap_or_else(|| exp.name.clone())),
            layout: spec.layout,
            columns,
            rows: spec.rows.clone().unwrap_or_else(|| "init".into()),
            row_labels: spec.row_labels.clone(),
            folds: spec.folds.clone().unwrap_or_else(|| "fold".into()),
            reference: spec.reference,
            decimals: spec.decimals.unwrap_or(2),
            baseline: spec.baseline.clone(),
        })
    }

    fn execute(config: &TableConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

/// A column layout of the paper's.
#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Patient- and image-level accuracy per magnification and their mean.
    Breakhis,
}

/// A table of the paper to compare with.
#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PaperTable {
    Breakhis,
    Bach,
    BreastCell,
}

impl PaperTable {
    fn name(self) -> &'static str {
        match self {
            PaperTable::Breakhis => "breakhis",
            PaperTable::Bach => "bach",
            PaperTable::BreastCell => "breast_cell",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableStageSpec {
    pub title: Option<String>,
    /// `breakhis`: the paper's BreakHis columns over the inputs' magnifications.
    pub layout: Option<Layout>,
    pub columns: Option<Vec<ColumnDecl>>,
    pub rows: Option<String>,
    #[serde(default)]
    pub row_labels: BTreeMap<String, String>,
    pub folds: Option<String>,
    /// A table of the paper to compare with: `breakhis`, `bach` or `breast_cell`.
    pub reference: Option<PaperTable>,
    pub decimals: Option<usize>,
    /// A row (e.g. `random`) the others are compared with, run by run, with a sign test.
    pub baseline: Option<String>,
}

#[derive(Deserialize)]
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

/// A table as it is built, every default filled in.
#[derive(Deserialize, Serialize)]
pub struct TableConfig {
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<ColumnConfig>>,
    pub rows: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub row_labels: BTreeMap<String, String>,
    pub folds: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PaperTable>,
    pub decimals: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
}

#[derive(Deserialize, Serialize)]
pub struct ColumnConfig {
    pub name: String,
    pub metric: String,
    #[serde(default, rename = "where", skip_serializing_if = "BTreeMap::is_empty")]
    pub filter: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_over: Option<String>,
    pub scale: f64,
}

impl TableConfig {
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
                    scale: c.scale,
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
            title: self.title.clone(),
            rows: self.rows.clone(),
            row_labels: self.row_labels.clone(),
            folds: self.folds.clone(),
            columns,
            decimals: self.decimals,
            baseline: self.baseline.clone(),
        };
        let reference = match self.reference {
            Some(r) => Some((r.name(), Reference::paper(r.name()).map_err(StageFailure)?)),
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
            write_output(ctx, name, text)?;
        }
        log_line(ctx, &table.to_markdown(spec.decimals));
        Ok(serde_json::json!({ "rows": table.rows.len(), "columns": table.columns.len(), "inputs": entries.len() }))
    }
}
