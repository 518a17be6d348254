//! `finetune` and `evaluate`: the training library (`crate::train`) as stage kinds.
//!
//! Inputs are found by the kind of the stage they come from: the `split` input gives `fold_<k>.csv`, the dataset
//! input (`synthetic`, `stain_normalise`, `download`, `source`, `patchify`) gives the image root, a `finetune`
//! input gives the model to evaluate. `fold` and `magnification` default to the node's matrix values of the same
//! name. Binary (benign/malignant) classification as in the paper's BreakHis experiments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{log_line, ExecContext, StageFailure};
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};
use crate::nn::Arch;
use crate::plan::Node;
use crate::train::{evaluate, finetune, EvalConfig, FinetuneConfig, Init, TrainEvent};

pub const VERSION: u32 = 1;

const DATASET_KINDS: &[&str] = &["synthetic", "stain_normalise", "download", "source", "patchify"];

/// Fields shared by both kinds.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Fold index (default: the node's `fold` matrix value).
    pub fold: Option<u32>,
    /// `40X`... (default: the node's `magnification` matrix value; none = every magnification).
    pub magnification: Option<String>,
    /// `resnet18` (default), `resnet34`, `resnet50`, ...
    pub arch: Option<String>,
    /// Network input side in pixels (default 64; the paper: 252).
    pub size: Option<usize>,
    pub batch_size: Option<usize>,
    /// finetune only:
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub train_portion: Option<String>,
    pub val_portion: Option<String>,
    pub augment: Option<bool>,
    pub dropout: Option<f32>,
    /// Initial weights (torchvision layout, .pth or .safetensors), relative to the experiment file.
    pub weights: Option<String>,
    /// evaluate only:
    pub test_portion: Option<String>,
}

impl TrainSpec {
    pub fn validate(&self, kind: &str, decl: &StageDecl, src: &SourceText) -> Result<()> {
        let bad = |m: String| Err(src.error(decl.span.clone(), format!("stage `{}`: {m}", decl.name), None));
        if decl.refs.is_empty() {
            return bad("needs `from` with the split and the dataset".into());
        }
        if let Some(a) = &self.arch {
            if let Err(e) = a.parse::<Arch>() {
                return bad(e.to_string());
            }
        }
        if self.fold.is_none() && !decl.has_matrix_key("fold") {
            return bad("give `fold = K` or a `fold` matrix axis".into());
        }
        let finetune_only = self.epochs.is_some()
            || self.lr.is_some()
            || self.train_portion.is_some()
            || self.val_portion.is_some()
            || self.augment.is_some()
            || self.dropout.is_some()
            || self.weights.is_some();
        if kind == "evaluate" && finetune_only {
            return bad(
                "epochs, lr, train_portion, val_portion, augment, dropout and weights belong to `finetune`".into()
            );
        }
        if kind == "finetune" && self.test_portion.is_some() {
            return bad("`test_portion` belongs to `evaluate`".into());
        }
        if [self.size, self.batch_size, self.epochs].contains(&Some(0)) {
            return bad("size, batch_size and epochs must be at least 1".into());
        }
        Ok(())
    }

    fn fold(&self, node: &Node) -> u32 {
        self.fold.or_else(|| node.matrix_value("fold").and_then(|v| v.to_string().parse().ok())).unwrap_or(0)
    }

    fn magnification(&self, node: &Node) -> Option<String> {
        self.magnification.clone().or_else(|| node.matrix_value("magnification").map(|v| v.to_string()))
    }

    pub fn key_params(&self, exp: &crate::experiment::Experiment, node: &Node) -> BTreeMap<String, Value> {
        let mut p = match serde_json::to_value(SpecView(self)) {
            Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
            _ => BTreeMap::new(),
        };
        p.insert("fold".into(), Value::from(self.fold(node)));
        if let Some(m) = self.magnification(node) {
            p.insert("magnification".into(), Value::String(m));
        }
        // Initial weights count by content, like a stain target.
        if let Some(w) = &self.weights {
            let digest = crate::cache::fingerprint::param_file_digest(&exp.resolve_path(w));
            p.insert("weights_blake3".into(), Value::String(digest));
        }
        p
    }
}

/// Serialises the spec for the key (the spec itself only derives Deserialize).
struct SpecView<'a>(&'a TrainSpec);

impl serde::Serialize for SpecView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let t = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("arch", &t.arch)?;
        m.serialize_entry("size", &t.size)?;
        m.serialize_entry("batch_size", &t.batch_size)?;
        m.serialize_entry("epochs", &t.epochs)?;
        m.serialize_entry("lr", &t.lr)?;
        m.serialize_entry("train_portion", &t.train_portion)?;
        m.serialize_entry("val_portion", &t.val_portion)?;
        m.serialize_entry("augment", &t.augment)?;
        m.serialize_entry("dropout", &t.dropout)?;
        m.serialize_entry("weights", &t.weights)?;
        m.serialize_entry("test_portion", &t.test_portion)?;
        m.end()
    }
}

fn input_of_kind<'a>(ctx: &'a ExecContext<'_>, kinds: &[&str], what: &str) -> Result<&'a Path, StageFailure> {
    let found: Vec<&Path> = ctx
        .inputs
        .iter()
        .filter(|i| ctx.exp.stage(&i.stage).is_some_and(|s| kinds.contains(&s.spec.kind())))
        .map(|i| i.path.as_path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(StageFailure(format!(
            "`{}` needs {what} among its inputs (a stage of kind {}); add it to `from`",
            ctx.node.id,
            kinds.join(" or ")
        ))),
        _ => Err(StageFailure(format!("`{}` has several {what} inputs; narrow `from` with a selector", ctx.node.id))),
    }
}

fn arch(spec: &TrainSpec) -> Arch {
    spec.arch.as_deref().and_then(|a| a.parse().ok()).unwrap_or(Arch::ResNet18)
}

pub fn execute_finetune(spec: &TrainSpec, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
    let split = input_of_kind(ctx, &["split"], "a split")?;
    let data = input_of_kind(ctx, DATASET_KINDS, "the dataset")?;
    let fold_csv = split.join(format!("fold_{}.csv", spec.fold(ctx.node)));
    let mut cfg = FinetuneConfig::new(data, &fold_csv, ctx.out, &ctx.scratch);
    cfg.magnification = spec.magnification(ctx.node);
    cfg.arch = arch(spec);
    cfg.image_size = spec.size.unwrap_or(cfg.image_size);
    cfg.batch_size = spec.batch_size.unwrap_or(cfg.batch_size);
    cfg.epochs = spec.epochs.unwrap_or(cfg.epochs);
    cfg.lr = spec.lr.unwrap_or(cfg.lr);
    cfg.augment = spec.augment.unwrap_or(cfg.augment);
    cfg.dropout = spec.dropout.unwrap_or(cfg.dropout);
    cfg.seed = ctx.node.seed;
    if let Some(p) = &spec.train_portion {
        cfg.train_portion = p.clone();
    }
    if let Some(p) = &spec.val_portion {
        cfg.val_portion = p.clone();
    }
    if let Some(w) = &spec.weights {
        cfg.init = Init::Weights(ctx.exp.resolve_path(w));
    } else if let Ok(pre) = input_of_kind(ctx, &["pretrain"], "a pretrained backbone") {
        cfg.init = Init::Weights(pre.join("backbone.safetensors"));
    }
    let progress = |e: TrainEvent| {
        if let TrainEvent::Epoch { .. } = e {
            (ctx.progress)(0, None, &format!("{e:?}"));
        }
    };
    let outcome = finetune(&cfg, &progress).map_err(|e| StageFailure(e.to_string()))?;
    log_line(ctx, &format!("{outcome:?}"));
    Ok(serde_json::json!({
        "epochs": outcome.epochs_done,
        "best_epoch": outcome.best_epoch,
        "best_val_loss": outcome.best_val_loss,
        "stopped_early": outcome.stopped_early,
    }))
}

pub fn execute_evaluate(spec: &TrainSpec, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
    let split = input_of_kind(ctx, &["split"], "a split")?;
    let data = input_of_kind(ctx, DATASET_KINDS, "the dataset")?;
    let model_dir = input_of_kind(ctx, &["finetune"], "a fine-tuned model")?;
    let fold_csv = split.join(format!("fold_{}.csv", spec.fold(ctx.node)));
    let model: PathBuf = model_dir.join("model.safetensors");
    let mut cfg = EvalConfig::new(data, &fold_csv, &model, ctx.out);
    cfg.magnification = spec.magnification(ctx.node);
    cfg.arch = arch(spec);
    cfg.image_size = spec.size.unwrap_or(cfg.image_size);
    cfg.batch_size = spec.batch_size.unwrap_or(cfg.batch_size);
    if let Some(p) = &spec.test_portion {
        cfg.test_portion = p.clone();
    }
    let outcome = evaluate(&cfg).map_err(|e| StageFailure(e.to_string()))?;
    log_line(ctx, &format!("accuracy {:.4} on {} images", outcome.report.accuracy, outcome.report.images));
    let mut v = serde_json::to_value(&outcome.report).map_err(|e| StageFailure(e.to_string()))?;
    v["majority_rate"] = Value::from(outcome.majority_rate);
    Ok(v)
}
