//! `split`: cross-validation folds of a dataset as manifests (see `crate::split`). Writes `images.csv` (every
//! image), `fold_<k>.csv` (one row per image and portion) and `fold_<k>_counts.csv` for each fold.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::origin::dataset_error;
use super::{log_line, parsed, single_input, stage_error, write_output};
use crate::data::{scan, Dataset};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};
use crate::split::{counts_csv, portions, rows_csv, split};

pub struct Split;

/// Folds of a split that does not say (`folds`).
pub const DEFAULT_FOLDS: usize = 5;

/// The number of folds a split stage makes, from its declaration (what `resolve` will fill in); `None` when its
/// `folds` is not a valid count, which the split's own validation reports.
pub fn declared_folds(decl: &StageDecl) -> Option<usize> {
    match decl.values.get("folds") {
        None => Some(DEFAULT_FOLDS),
        Some(v) => v.as_integer().and_then(|k| usize::try_from(k).ok()).filter(|&k| k >= 2),
    }
}

impl StageKind for Split {
    type Spec = SplitSpec;
    type Config = SplitConfig;
    const NAME: &'static str = "split";
    const VERSION: u32 = 1;

    fn validate(spec: &SplitSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        if stage.refs.is_empty() {
            return Err(stage_error(exp, stage, "a split stage needs `from` (the dataset)"));
        }
        if spec.folds.is_some_and(|k| k < 2) {
            return Err(stage_error(exp, stage, "`folds` must be at least 2"));
        }
        Ok(())
    }

    fn resolve(spec: &SplitSpec, node: &NodeView<'_>) -> Result<SplitConfig, String> {
        Ok(SplitConfig {
            dataset: spec.dataset,
            folds: spec.folds.unwrap_or(DEFAULT_FOLDS),
            seed: spec.seed.unwrap_or(node.node.seed),
            verify: spec.verify.unwrap_or(true),
        })
    }

    fn execute(config: &SplitConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

#[derive(Serialize, Deserialize)]
pub struct SplitConfig {
    pub dataset: Dataset,
    pub folds: usize,
    pub seed: u64,
    pub verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// `breakhis`, `bach` or `breast-cell`.
    #[serde(deserialize_with = "parsed")]
    pub dataset: Dataset,
    /// Number of folds (default [`DEFAULT_FOLDS`]).
    pub folds: Option<usize>,
    /// Default: the node's seed. The paper used 47, 86, 16 and 12.
    pub seed: Option<u64>,
    /// Decode every image first so a truncated file is reported here (default true).
    pub verify: Option<bool>,
}

impl SplitConfig {
    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let root = single_input(ctx, "split")?;
        let dataset = self.dataset;
        // A bad file inside a stage's output is named where it comes from, never at its cache copy.
        let records =
            scan(dataset, root, self.verify).map_err(|e| StageFailure(dataset_error(ctx.exp, &ctx.inputs[0], e)))?;
        if records.is_empty() {
            return Err(StageFailure(format!("no {dataset} images under {}", root.display())));
        }
        let (k, seed) = (self.folds, self.seed);
        let folds = split(dataset, &records, k, seed).map_err(StageFailure)?;
        let write = |name: &str, text: String| write_output(ctx, name, text);
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
