//! `finetune`, `linear_eval` and `evaluate`: the training library (`crate::train`) as stage kinds.
//!
//! Inputs are found by the kind of the stage they come from: the `split` input gives `fold_<k>.csv`, the dataset
//! input (`synthetic`, `stain_normalise`, `download`, `source`, `patchify`) gives the image root, a `pretrain`
//! input gives the MPCS backbone to start from, a `finetune` or `linear_eval` input gives the model to evaluate.
//! `fold` and `magnification` default to the node's matrix values of the same name. Binary (benign/malignant)
//! by default as in the paper's BreakHis experiments; `objective = "multiclass"` with `classes` for BACH.
//! `linear_eval` is `finetune` with the encoder frozen (METHOD.md, breast cell).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{log_line, ExecContext, StageFailure};
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};
use crate::nn::{Arch, Dilation};
use crate::plan::Node;
use crate::train::{
    evaluate, finetune, EvalConfig, FinetuneConfig, Init, LabelColumn, Objective, OptimizerKind, TrainEvent,
};

pub const VERSION: u32 = 1;

pub const DATASET_KINDS: &[&str] = &["synthetic", "stain_normalise", "download", "source", "patchify"];

/// The keys of `finetune`, `linear_eval` and `evaluate` (each kind checks which of them it accepts).
#[derive(Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Fold index (default: the node's `fold` matrix value).
    pub fold: Option<u32>,
    /// `40X`... (default: the node's `magnification` matrix value; none = every magnification).
    pub magnification: Option<String>,
    /// `resnet18` (default), `resnet34`, `resnet50`, ...
    pub arch: Option<String>,
    /// 8 or 16: the dilated ResNet of the paper's BACH / breast-cell experiments (default: none).
    pub output_stride: Option<usize>,
    /// `binary` (default; one logit, BCE) or `multiclass` (`classes` logits, cross-entropy).
    pub objective: Option<String>,
    /// Number of classes for `multiclass`.
    pub classes: Option<usize>,
    /// `label` (default) or `subtype` (the BreakHis 8-class subtype).
    pub labels: Option<String>,
    /// Network input side in pixels (default 64; the paper: 252).
    pub size: Option<usize>,
    pub batch_size: Option<usize>,
    /// finetune / linear_eval only:
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    /// `adam` (default) or `sgd` (with `momentum`, default 0.9; the paper's BACH fine-tuning).
    pub optimizer: Option<String>,
    pub momentum: Option<f64>,
    pub train_portion: Option<String>,
    pub val_portion: Option<String>,
    pub augment: Option<bool>,
    pub dropout: Option<f32>,
    pub plateau_patience: Option<usize>,
    pub early_stop_patience: Option<usize>,
    /// Initial weights when the node has no `pretrain` input: a file (torchvision layout, .pth or .safetensors,
    /// relative to the experiment file) or the name of an input stage whose output holds one such file (e.g. a
    /// `download` of ImageNet weights).
    pub weights: Option<String>,
    /// Start from the pretraining's epoch-`bucket` backbone instead of its overall best.
    pub bucket: Option<usize>,
    /// evaluate only (default: the node's `portion` matrix value, else `test_20`):
    pub test_portion: Option<String>,
}

const FINETUNE_ONLY: &[&str] = &[
    "epochs",
    "lr",
    "weight_decay",
    "optimizer",
    "momentum",
    "train_portion",
    "val_portion",
    "augment",
    "dropout",
    "plateau_patience",
    "early_stop_patience",
    "weights",
    "bucket",
];

impl TrainSpec {
    fn set_keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k).collect(),
            _ => Vec::new(),
        }
    }

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
        if let Err(e) = self.dilation() {
            return bad(e);
        }
        if let Err(e) = self.objective().and(self.labels()).and(self.optimizer()) {
            return bad(e);
        }
        if self.fold.is_none() && !decl.has_matrix_key("fold") {
            return bad("give `fold = K` or a `fold` matrix axis".into());
        }
        let keys = self.set_keys();
        if kind == "evaluate" {
            if let Some(k) = keys.iter().find(|k| FINETUNE_ONLY.contains(&k.as_str())) {
                return bad(format!("`{k}` belongs to the training stage (finetune / linear_eval), not `evaluate`"));
            }
        } else if self.test_portion.is_some() {
            return bad("`test_portion` belongs to `evaluate`".into());
        }
        if [self.size, self.batch_size, self.epochs].contains(&Some(0)) {
            return bad("size, batch_size and epochs must be at least 1".into());
        }
        if self.dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
            return bad("`dropout` is a probability: 0 ≤ dropout < 1".into());
        }
        if self.lr.is_some_and(|lr| !(lr.is_finite() && lr > 0.0)) {
            return bad("`lr` must be a positive number".into());
        }
        Ok(())
    }

    pub(crate) fn dilation(&self) -> std::result::Result<Dilation, String> {
        match self.output_stride {
            None => Ok(Dilation::None),
            Some(os) => Dilation::from_output_stride(os).map_err(|e| e.to_string()),
        }
    }

    fn objective(&self) -> std::result::Result<Objective, String> {
        match (self.objective.as_deref(), self.classes) {
            (None | Some("binary"), None | Some(2)) => Ok(Objective::Binary),
            (None | Some("binary"), Some(k)) => {
                Err(format!("`classes = {k}` needs `objective = \"multiclass\"` (binary has 2)"))
            }
            (Some("multiclass"), Some(k)) if k >= 2 => Ok(Objective::MultiClass { classes: k }),
            (Some("multiclass"), _) => Err("`objective = \"multiclass\"` needs `classes = K` with K ≥ 2".into()),
            (Some(o), _) => Err(format!("unknown objective `{o}`; use \"binary\" or \"multiclass\"")),
        }
    }

    fn optimizer(&self) -> std::result::Result<OptimizerKind, String> {
        match (self.optimizer.as_deref(), self.momentum) {
            (None | Some("adam"), None) => Ok(OptimizerKind::Adam),
            (None | Some("adam"), Some(_)) => Err("`momentum` needs `optimizer = \"sgd\"`".into()),
            (Some("sgd"), m) => match m.unwrap_or(0.9) {
                m if (0.0..1.0).contains(&m) => Ok(OptimizerKind::Sgd { momentum: m }),
                m => Err(format!("`momentum = {m}` must be in [0, 1)")),
            },
            (Some(o), _) => Err(format!("unknown optimizer `{o}`; use \"adam\" or \"sgd\"")),
        }
    }

    fn labels(&self) -> std::result::Result<LabelColumn, String> {
        match self.labels.as_deref() {
            None | Some("label") => Ok(LabelColumn::Label),
            Some("subtype") => Ok(LabelColumn::Subtype),
            Some(o) => Err(format!("unknown `labels = \"{o}\"`; use \"label\" or \"subtype\"")),
        }
    }

    pub(crate) fn arch(&self) -> Arch {
        self.arch.as_deref().and_then(|a| a.parse().ok()).unwrap_or(Arch::ResNet18)
    }

    /// The fold a node trains on: `fold`, else its `fold` matrix value.
    pub(crate) fn fold(&self, node: &Node) -> u32 {
        self.fold.or_else(|| node.matrix_value("fold").and_then(|v| v.to_string().parse().ok())).unwrap_or(0)
    }

    /// `test_portion`, else the node's `portion` matrix value (a table with val and test columns).
    fn test_portion(&self, node: &Node) -> Option<String> {
        self.test_portion.clone().or_else(|| node.matrix_value("portion").map(|v| v.to_string()))
    }

    pub(crate) fn magnification(&self, node: &Node) -> Option<String> {
        self.magnification.clone().or_else(|| node.matrix_value("magnification").map(|v| v.to_string()))
    }

    pub fn key_params(&self, exp: &crate::experiment::Experiment, node: &Node) -> BTreeMap<String, Value> {
        let mut p = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
            _ => BTreeMap::new(),
        };
        p.insert("fold".into(), Value::from(self.fold(node)));
        if let Some(m) = self.magnification(node) {
            p.insert("magnification".into(), Value::String(m));
        }
        // Initial weights given as a file count by content, like a stain target (a stage name counts through
        // that input's digest).
        if let Some(w) = self.weights.as_ref().filter(|w| exp.stage(w).is_none()) {
            let digest = crate::cache::fingerprint::param_file_digest(&exp.resolve_path(w));
            p.insert("weights_blake3".into(), Value::String(digest));
        }
        p
    }
}

/// The one input whose stage is of one of `kinds`, except the stages named in `skip`.
pub(super) fn input_of_kind<'a>(
    ctx: &'a ExecContext<'_>,
    kinds: &[&str],
    skip: &[&str],
    what: &str,
) -> Result<&'a Path, StageFailure> {
    let found: Vec<&Path> = ctx
        .inputs
        .iter()
        .filter(|i| !skip.contains(&i.stage.as_str()))
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

/// Resolves a `weights` value: an input stage's output holding one weights file, or a file path.
pub(super) fn weights_path(ctx: &ExecContext<'_>, weights: &str) -> Result<PathBuf, StageFailure> {
    let Some(input) = ctx.inputs.iter().find(|i| i.stage == weights) else {
        if ctx.exp.stage(weights).is_some() {
            return Err(StageFailure(format!(
                "`weights = \"{weights}\"` names a stage that is not among the inputs of `{}`; add it to `from`",
                ctx.node.id
            )));
        }
        let path = ctx.exp.resolve_path(weights);
        if !path.is_file() {
            return Err(StageFailure(format!(
                "`weights = \"{weights}\"`: {} is not a file (a relative path is relative to the experiment file; \
                 a stage name must be one of the node's inputs)",
                path.display()
            )));
        }
        return Ok(path);
    };
    let mut files: Vec<PathBuf> = walk_files(&input.path)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pth" || e == "pt" || e == "safetensors"))
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        0 => Err(StageFailure(format!(
            "the output of `{weights}` ({}) holds no .pth or .safetensors file",
            input.path.display()
        ))),
        n => Err(StageFailure(format!(
            "the output of `{weights}` holds {n} weight files; give the file's path in `weights` instead"
        ))),
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The candle device for the node's assignment (the `cuda` feature; otherwise the CPU).
pub(super) fn candle_device(ctx: &ExecContext<'_>) -> Result<candle_core::Device, StageFailure> {
    match ctx.device.gpus.first() {
        None => Ok(candle_core::Device::Cpu),
        Some(gpu) if cfg!(feature = "cuda") => {
            let ordinal: usize = gpu.parse().map_err(|_| StageFailure(format!("GPU id `{gpu}` is not a number")))?;
            candle_core::Device::new_cuda(ordinal)
                .map_err(|e| StageFailure(format!("cannot open GPU {gpu} ({e}); run with --devices cpu")))
        }
        Some(_) => {
            log_line(ctx, "this mpcs was built without the `cuda` feature: training on the CPU");
            Ok(candle_core::Device::Cpu)
        }
    }
}

/// Forwards training events to the node's progress bar (epoch, batch, loss, images/s) and its log.
pub(super) fn progress_reporter<'a>(ctx: &'a ExecContext<'_>, batch_size: usize) -> impl Fn(TrainEvent) + 'a {
    let state = Mutex::new((Instant::now(), 0usize, 0usize));
    move |e: TrainEvent| {
        let Ok(mut s) = state.lock() else { return };
        match e {
            TrainEvent::Start { first_epoch, epochs, batches } => {
                *s = (Instant::now(), epochs, batches);
                if first_epoch > 1 {
                    log_line(ctx, &format!("resuming from the checkpoint after epoch {}", first_epoch - 1));
                }
            }
            TrainEvent::Batch { epoch, batch, batches, loss } => {
                let done = (epoch - 1) * batches + batch + 1;
                let rate = ((batch + 1) * batch_size) as f64 / s.0.elapsed().as_secs_f64().max(1e-9);
                let msg = format!("epoch {epoch}/{} batch {}/{batches} loss {loss:.4} {rate:.1} img/s", s.1, batch + 1);
                (ctx.progress)(done as u64, Some((s.1 * batches) as u64), &msg);
            }
            TrainEvent::Epoch { line, .. } => {
                s.0 = Instant::now();
                log_line(ctx, &line.to_string());
            }
            TrainEvent::EarlyStop { epoch } => log_line(ctx, &format!("early stopping after epoch {epoch}")),
        }
    }
}

/// Draws an epoch log as `loss_curve.png` beside it. A picture that cannot be drawn is logged, not fatal: it
/// must never cost a finished training run.
pub(super) fn plot_loss_curve(ctx: &ExecContext<'_>, log: &str, fields: &[&str]) {
    let drawn = crate::report::series_from_jsonl(&ctx.out.join(log), fields)
        .and_then(|series| crate::report::loss_curve_png(&series, &ctx.out.join("loss_curve.png")));
    if let Err(e) = drawn {
        log_line(ctx, &format!("warning: no loss_curve.png ({e})"));
    }
}

/// `finetune` (`freeze_encoder` false) and `linear_eval` (true).
pub fn execute_finetune(spec: &TrainSpec, ctx: &ExecContext<'_>, freeze_encoder: bool) -> Result<Value, StageFailure> {
    let split = input_of_kind(ctx, &["split"], &[], "a split")?;
    let weights_stage: Vec<&str> = spec.weights.as_deref().into_iter().collect();
    let data = input_of_kind(ctx, DATASET_KINDS, &weights_stage, "the dataset")?;
    let fold_csv = split.join(format!("fold_{}.csv", spec.fold(ctx.node)));
    let mut cfg = FinetuneConfig::new(data, &fold_csv, ctx.out, &ctx.scratch);
    cfg.magnification = spec.magnification(ctx.node);
    cfg.arch = spec.arch();
    cfg.dilation = spec.dilation().map_err(StageFailure)?;
    cfg.objective = spec.objective().map_err(StageFailure)?;
    cfg.labels = spec.labels().map_err(StageFailure)?;
    cfg.freeze_encoder = freeze_encoder;
    cfg.image_size = spec.size.unwrap_or(cfg.image_size);
    cfg.batch_size = spec.batch_size.unwrap_or(cfg.batch_size);
    cfg.epochs = spec.epochs.unwrap_or(cfg.epochs);
    cfg.lr = spec.lr.unwrap_or(cfg.lr);
    cfg.weight_decay = spec.weight_decay.unwrap_or(cfg.weight_decay);
    cfg.optimizer = spec.optimizer().map_err(StageFailure)?;
    cfg.augment = spec.augment.unwrap_or(cfg.augment);
    cfg.dropout = spec.dropout.unwrap_or(cfg.dropout);
    cfg.plateau_patience = spec.plateau_patience.unwrap_or(cfg.plateau_patience);
    cfg.early_stop_patience = spec.early_stop_patience.unwrap_or(cfg.early_stop_patience);
    cfg.device = candle_device(ctx)?;
    cfg.seed = ctx.node.seed;
    if let Some(p) = &spec.train_portion {
        cfg.train_portion = p.clone();
    }
    if let Some(p) = &spec.val_portion {
        cfg.val_portion = p.clone();
    }
    // A pretrain input (an MPCS backbone) comes first; `weights` serve the nodes without one (e.g. the ImageNet
    // row of a table whose other rows start from MPCS checkpoints); neither means a seeded random init.
    if let Ok(pre) = input_of_kind(ctx, &["pretrain"], &[], "a pretrained backbone") {
        let file = match spec.bucket {
            Some(b) => pre.join(format!("buckets/epoch_{b}.safetensors")),
            None => pre.join("backbone.safetensors"),
        };
        if !file.exists() {
            return Err(StageFailure(format!(
                "{} does not exist: the pretraining did not reach epoch {} (buckets are kept at the epochs listed \
                 in its `buckets`)",
                file.display(),
                spec.bucket.unwrap_or(0)
            )));
        }
        cfg.init = Init::Weights(file);
    } else if let Some(w) = &spec.weights {
        cfg.init = Init::Weights(weights_path(ctx, w)?);
    } else if freeze_encoder {
        log_line(ctx, "linear evaluation of a randomly initialised encoder (no pretrain input, no weights)");
    }
    log_line(ctx, &format!("initial weights: {:?}", cfg.init));
    let progress = progress_reporter(ctx, cfg.batch_size);
    let outcome = finetune(&cfg, &progress).map_err(|e| StageFailure(e.to_string()))?;
    log_line(ctx, &format!("{outcome:?}"));
    plot_loss_curve(ctx, "metrics.jsonl", &["train_loss", "val_loss"]);
    Ok(serde_json::json!({
        "epochs": outcome.epochs_done,
        "best_epoch": outcome.best_epoch,
        "best_val_loss": outcome.best_val_loss,
        "stopped_early": outcome.stopped_early,
        "resumed_after": outcome.resumed_after,
    }))
}

pub fn execute_evaluate(spec: &TrainSpec, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
    let split = input_of_kind(ctx, &["split"], &[], "a split")?;
    let data = input_of_kind(ctx, DATASET_KINDS, &[], "the dataset")?;
    let model_dir = input_of_kind(ctx, &["finetune", "linear_eval"], &[], "a fine-tuned model")?;
    let fold_csv = split.join(format!("fold_{}.csv", spec.fold(ctx.node)));
    let model: PathBuf = model_dir.join("model.safetensors");
    let mut cfg = EvalConfig::new(data, &fold_csv, &model, ctx.out);
    cfg.magnification = spec.magnification(ctx.node);
    cfg.arch = spec.arch();
    cfg.dilation = spec.dilation().map_err(StageFailure)?;
    cfg.objective = spec.objective().map_err(StageFailure)?;
    cfg.labels = spec.labels().map_err(StageFailure)?;
    cfg.image_size = spec.size.unwrap_or(cfg.image_size);
    cfg.batch_size = spec.batch_size.unwrap_or(cfg.batch_size);
    cfg.device = candle_device(ctx)?;
    if let Some(p) = spec.test_portion(ctx.node) {
        cfg.test_portion = p;
    }
    let outcome = evaluate(&cfg).map_err(|e| StageFailure(e.to_string()))?;
    log_line(ctx, &format!("accuracy {:.4} on {} images", outcome.report.accuracy, outcome.report.images));
    if let Err(e) =
        crate::report::confusion_png(&outcome.report.confusion, &outcome.class_names, &ctx.out.join("confusion.png"))
    {
        log_line(ctx, &format!("warning: no confusion.png ({e})"));
    }
    let mut v = serde_json::to_value(&outcome.report).map_err(|e| StageFailure(e.to_string()))?;
    v["majority_rate"] = Value::from(outcome.majority_rate);
    if let Some(a) = outcome.image_wise_accuracy {
        v["image_wise_accuracy"] = Value::from(a);
    }
    Ok(v)
}
