//! `split`: cross-validation folds of a dataset as manifests (see `crate::split`). Writes `images.csv` (every
//! image), `fold_<k>.csv` (one row per image and portion) and `fold_<k>_counts.csv` for each fold.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::{log_line, single_input, ExecContext, StageFailure};
use crate::data::{scan, Dataset};
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};
use crate::plan::Node;
use crate::split::{counts_csv, portions, rows_csv, split};

pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// `breakhis`, `bach` or `breast-cell`.
    pub dataset: Spanned<String>,
    /// Number of folds (default 5).
    pub folds: Option<usize>,
    /// Default: the node's seed. The paper used 47, 86, 16 and 12.
    pub seed: Option<u64>,
    /// Decode every image first so a truncated file is reported here (default true).
    pub verify: Option<bool>,
}

impl SplitSpec {
    fn dataset(&self) -> Dataset {
        self.dataset.get_ref().parse().unwrap_or(Dataset::BreakHis)
    }

    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        if decl.refs.is_empty() {
            return Err(src.error(
                decl.span.clone(),
                format!("split stage `{}` needs `from` (the dataset)", decl.name),
                None,
            ));
        }
        if let Err(e) = self.dataset.get_ref().parse::<Dataset>() {
            return Err(src.error(self.dataset.span(), e.to_string(), None));
        }
        if self.folds.is_some_and(|k| k < 2) {
            return Err(src.error(
                decl.span.clone(),
                format!("stage `{}`: `folds` must be at least 2", decl.name),
                None,
            ));
        }
        Ok(())
    }

    pub fn key_params(&self, node: &Node) -> BTreeMap<String, Value> {
        let mut p = BTreeMap::new();
        p.insert("dataset".into(), Value::String(self.dataset().name().into()));
        p.insert("folds".into(), Value::from(self.folds.unwrap_or(5)));
        p.insert("seed".into(), Value::from(self.seed.unwrap_or(node.seed)));
        p.insert("verify".into(), Value::Bool(self.verify.unwrap_or(true)));
        p
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let root = single_input(ctx, "split")?;
        let dataset = self.dataset();
        let records = scan(dataset, root, self.verify.unwrap_or(true)).map_err(|e| StageFailure(e.to_string()))?;
        if records.is_empty() {
            return Err(StageFailure(format!("no {dataset} images under {}", root.display())));
        }
        let k = self.folds.unwrap_or(5);
        let seed = self.seed.unwrap_or(ctx.node.seed);
        let folds = split(dataset, &records, k, seed).map_err(StageFailure)?;
        let write = |name: &str, text: String| {
            std::fs::write(ctx.out.join(name), text).map_err(|e| StageFailure(format!("cannot write {name}: {e}")))
        };
        let mut images = String::from("file,label,class,subtype,patient,magnification,seq\n");
        for r in &records {
            images.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                r.rel_path,
                r.label,
                r.class_name,
                r.subtype.as_deref().unwrap_or(""),
                r.patient.as_deref().or(r.batch.as_deref()).unwrap_or(""),
                r.magnification.map(|m| format!("{m}X")).unwrap_or_default(),
                r.seq.map(|s| s.to_string()).unwrap_or_default()
            ));
        }
        write("images.csv", images)?;
        let mut sizes = Vec::new();
        for (i, fold) in folds.iter().enumerate() {
            write(&format!("fold_{i}.csv"), rows_csv(&fold.rows))?;
            write(&format!("fold_{i}_counts.csv"), counts_csv(&fold.rows))?;
            let mut per: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &fold.rows {
                *per.entry(r.portion.as_str()).or_default() += 1;
            }
            sizes
                .push(per.into_iter().map(|(k, v)| (k.to_string(), Value::from(v))).collect::<serde_json::Map<_, _>>());
        }
        let summary = serde_json::json!({
            "dataset": dataset.name(), "folds": k, "seed": seed, "images": records.len(),
            "portions": portions(dataset), "images_per_portion": sizes,
        });
        write("split.json", serde_json::to_string_pretty(&summary).unwrap_or_default())?;
        log_line(ctx, &format!("{} images into {k} folds (seed {seed})", records.len()));
        Ok(summary)
    }
}
