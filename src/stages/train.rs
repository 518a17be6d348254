//! `finetune`, `linear_eval` and `evaluate`: the training library (`crate::train`) as stage kinds.
//!
//! Inputs are found by the kind of the stage they come from: the `split` input gives `fold_<k>.csv`, the dataset
//! input (`synthetic`, `stain_normalise`, `download`, `source`, `patchify`) gives the image root, a `pretrain`
//! input gives the MPCS backbone to start from, a `finetune` or `linear_eval` input gives the model to evaluate.
//! `fold` and `magnification` default to the node's matrix values of the same name. Binary (benign/malignant)
//! by default as in the paper's BreakHis experiments; `objective = "multiclass"` with `classes` for BACH.
//! `linear_eval` is `finetune` with the encoder frozen (METHOD.md, breast cell).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{log_line, stage_error};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};
use crate::loader::Normalize;
use crate::nn::{Arch, Dilation, Precision};
use crate::train::{
    evaluate, finetune, EvalConfig, FinetuneConfig, Init, LabelColumn, Objective, OptimizerKind, TrainEvent,
};

pub const DATASET_KINDS: &[&str] = &["synthetic", "stain_normalise", "download", "source", "patchify"];

/// `finetune` (`FROZEN` false: the encoder and a new head trained on the fold's labelled images) and
/// `linear_eval` (`FROZEN` true: only the head trains; METHOD.md, breast cell).
pub struct Training<const FROZEN: bool>;
pub type Finetune = Training<false>;
pub type LinearEval = Training<true>;
/// `evaluate`: a trained model's metrics on the fold's test images.
pub struct Evaluate;

impl<const FROZEN: bool> StageKind for Training<FROZEN> {
    type Spec = TrainSpec;
    type Config = TrainConfig;
    const NAME: &'static str = if FROZEN { "linear_eval" } else { "finetune" };
    const VERSION: u32 = 1;
    const LOCATIONS: &'static [&'static str] = &["weights_file"];

    fn validate(spec: &TrainSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(false, stage, exp)
    }
    fn resolve(spec: &TrainSpec, node: &NodeView<'_>) -> Result<TrainConfig, String> {
        spec.resolve_training(node, FROZEN)
    }
    fn execute(config: &TrainConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        execute_training(config, ctx)
    }
}

impl StageKind for Evaluate {
    type Spec = TrainSpec;
    type Config = EvaluateConfig;
    const NAME: &'static str = "evaluate";
    const VERSION: u32 = 1;

    fn validate(spec: &TrainSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(true, stage, exp)
    }
    fn resolve(spec: &TrainSpec, node: &NodeView<'_>) -> Result<EvaluateConfig, String> {
        spec.resolve_evaluation(node)
    }
    fn execute(config: &EvaluateConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        execute_evaluate(config, ctx)
    }
}

/// `binary` (one logit, BCE) or `multiclass` (`classes` logits, cross-entropy).
#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveName {
    Binary,
    Multiclass,
}

/// `adam` or `sgd` (with momentum).
#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    Adam,
    Sgd,
}

/// The keys of `finetune`, `linear_eval` and `evaluate` (each kind checks which of them it accepts).
#[derive(Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Fold index (default: the node's `fold` matrix value).
    pub fold: Option<u32>,
    /// `40X`... (default: the node's `magnification` matrix value; none = every magnification).
    pub magnification: Option<String>,
    /// `resnet18` (default), `resnet34`, `resnet50`, `resnet101`, `resnet152` or `efficientnet_b2`.
    pub arch: Option<Arch>,
    /// 8 or 16: the dilated ResNet of the paper's BACH / breast-cell experiments (default: none).
    pub output_stride: Option<usize>,
    pub objective: Option<ObjectiveName>,
    /// Number of classes for `multiclass`.
    pub classes: Option<usize>,
    /// `label` (default) or `subtype` (the BreakHis 8-class subtype).
    pub labels: Option<LabelColumn>,
    /// Network input side in pixels (default 64; the paper: 252).
    pub size: Option<usize>,
    pub batch_size: Option<usize>,
    /// finetune / linear_eval only:
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    /// `adam` (default) or `sgd` (with `momentum`, default 0.9; the paper's BACH fine-tuning).
    pub optimizer: Option<OptimizerName>,
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
    /// `"f32"` (default, the paper) or `"bf16"`: the training steps' convolutions and linear layers in
    /// bfloat16, BatchNorm, loss and optimiser in f32 (`nn::precision`). Part of the node's key.
    pub precision: Option<Precision>,
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
    "precision",
];

/// Where a training node's encoder weights come from.
#[derive(Deserialize, Serialize, Clone, PartialEq, Debug)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum InitConfig {
    /// torchvision's initialisation drawn from the node seed.
    Random,
    /// The `pretrain` input's best backbone, or its epoch-`bucket` one.
    Pretrain { bucket: Option<usize> },
    /// The one weights file in the output of input stage `stage`.
    Stage { stage: String },
    /// A file named in the experiment, by content (its path is the location `weights_file`).
    File { blake3: String },
}

/// What the model is and what it reads: shared by training and evaluation.
#[derive(Deserialize, Serialize, Clone, Debug)]
pub struct ModelConfig {
    pub fold: u32,
    pub magnification: Option<String>,
    pub arch: Arch,
    /// 32 = no dilation; 16 or 8 = the dilated ResNet.
    pub output_stride: usize,
    pub objective: ObjectiveName,
    pub classes: usize,
    pub labels: LabelColumn,
    pub size: usize,
    pub batch_size: usize,
    pub normalize: Normalize,
}

/// A `finetune` / `linear_eval` node, every default filled in (from `crate::train`'s own defaults).
#[derive(Deserialize, Serialize, Clone, Debug)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub model: ModelConfig,
    pub freeze_encoder: bool,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub optimizer: OptimizerName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    pub train_portion: String,
    pub val_portion: String,
    pub augment: bool,
    pub dropout: f32,
    pub plateau_patience: usize,
    pub plateau_factor: f64,
    pub early_stop_patience: usize,
    pub init: InitConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_file: Option<PathBuf>,
    /// An input stage that holds weights rather than the dataset (even where a pretrain input wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_stage: Option<String>,
    pub seed: u64,
    /// Left out of the key when f32, so the keys of nodes from before this setting existed still hold.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// An `evaluate` node, every default filled in.
#[derive(Deserialize, Serialize, Clone, Debug)]
pub struct EvaluateConfig {
    #[serde(flatten)]
    pub model: ModelConfig,
    pub test_portion: String,
}

impl TrainSpec {
    fn written_keys(&self) -> Vec<String> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k).collect(),
            _ => Vec::new(),
        }
    }

    fn validate(&self, evaluate: bool, decl: &StageDecl, exp: &Experiment) -> Result<()> {
        let bad = |m: String| Err(stage_error(exp, decl, m));
        if decl.refs.is_empty() {
            return bad("needs `from` with the split and the dataset".into());
        }
        if let Err(e) = self.dilation().and(self.objective()).and(self.optimizer()) {
            return bad(e);
        }
        if self.fold.is_none() && !decl.has_matrix_key("fold") {
            return bad("give `fold = K` or a `fold` matrix axis".into());
        }
        if let Err(e) = check_folds(self.fold, decl, exp) {
            return bad(e);
        }
        if evaluate {
            if let Some(k) = self.written_keys().iter().find(|k| FINETUNE_ONLY.contains(&k.as_str())) {
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
        match (self.objective, self.classes) {
            (None | Some(ObjectiveName::Binary), None | Some(2)) => Ok(Objective::Binary),
            (None | Some(ObjectiveName::Binary), Some(k)) => {
                Err(format!("`classes = {k}` needs `objective = \"multiclass\"` (binary has 2)"))
            }
            (Some(ObjectiveName::Multiclass), Some(k)) if k >= 2 => Ok(Objective::MultiClass { classes: k }),
            (Some(ObjectiveName::Multiclass), _) => {
                Err("`objective = \"multiclass\"` needs `classes = K` with K ≥ 2".into())
            }
        }
    }

    fn optimizer(&self) -> std::result::Result<OptimizerKind, String> {
        match (self.optimizer, self.momentum) {
            (None | Some(OptimizerName::Adam), None) => Ok(OptimizerKind::Adam),
            (None | Some(OptimizerName::Adam), Some(_)) => Err("`momentum` needs `optimizer = \"sgd\"`".into()),
            (Some(OptimizerName::Sgd), m) => match m.unwrap_or(0.9) {
                m if (0.0..1.0).contains(&m) => Ok(OptimizerKind::Sgd { momentum: m }),
                m => Err(format!("`momentum = {m}` must be in [0, 1)")),
            },
        }
    }

    /// The fold a node trains on: `fold`, else its `fold` matrix value.
    pub(crate) fn fold(&self, node: &NodeView<'_>) -> std::result::Result<u32, String> {
        match (self.fold, node.matrix("fold")) {
            (Some(f), _) => Ok(f),
            (None, Some(v)) => v.parse().map_err(|_| format!("the `fold` matrix value `{v}` is not a fold index")),
            (None, None) => Err("give `fold = K` or a `fold` matrix axis".into()),
        }
    }

    fn model(
        &self,
        node: &NodeView<'_>,
        size: usize,
        batch: usize,
        normalize: Normalize,
    ) -> Result<ModelConfig, String> {
        let (objective, classes) = match self.objective()? {
            Objective::Binary => (ObjectiveName::Binary, 2),
            Objective::MultiClass { classes } => (ObjectiveName::Multiclass, classes),
        };
        Ok(ModelConfig {
            fold: self.fold(node)?,
            magnification: self.magnification.clone().or_else(|| node.matrix("magnification")),
            arch: self.arch.unwrap_or(Arch::ResNet18),
            output_stride: self.dilation()?.output_stride(),
            objective,
            classes,
            labels: self.labels.unwrap_or_default(),
            size: self.size.unwrap_or(size),
            batch_size: self.batch_size.unwrap_or(batch),
            normalize,
        })
    }

    fn resolve_training(&self, node: &NodeView<'_>, freeze_encoder: bool) -> Result<TrainConfig, String> {
        let d = FinetuneConfig::new(Path::new(""), Path::new(""), Path::new(""), Path::new(""));
        let (optimizer, momentum) = match self.optimizer()? {
            OptimizerKind::Adam => (OptimizerName::Adam, None),
            OptimizerKind::Sgd { momentum } => (OptimizerName::Sgd, Some(momentum)),
        };
        let (init, weights_file) = resolve_init(node, self.weights.as_deref(), self.bucket);
        Ok(TrainConfig {
            model: self.model(node, d.image_size, d.batch_size, d.normalize)?,
            freeze_encoder,
            epochs: self.epochs.unwrap_or(d.epochs),
            lr: self.lr.unwrap_or(d.lr),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            optimizer,
            momentum,
            train_portion: self.train_portion.clone().unwrap_or(d.train_portion),
            val_portion: self.val_portion.clone().unwrap_or(d.val_portion),
            augment: self.augment.unwrap_or(d.augment),
            dropout: self.dropout.unwrap_or(d.dropout),
            plateau_patience: self.plateau_patience.unwrap_or(d.plateau_patience),
            plateau_factor: d.plateau_factor,
            early_stop_patience: self.early_stop_patience.unwrap_or(d.early_stop_patience),
            init,
            weights_file,
            weights_stage: weights_stage_of(node, self.weights.as_deref()),
            seed: node.node.seed,
            precision: self.precision.unwrap_or(d.precision),
        })
    }

    fn resolve_evaluation(&self, node: &NodeView<'_>) -> Result<EvaluateConfig, String> {
        let d = EvalConfig::new(Path::new(""), Path::new(""), Path::new(""), Path::new(""));
        // A table with val and test columns evaluates each portion: the node's `portion` matrix value.
        let test_portion = self.test_portion.clone().or_else(|| node.matrix("portion")).unwrap_or(d.test_portion);
        Ok(EvaluateConfig { model: self.model(node, d.image_size, d.batch_size, d.normalize)?, test_portion })
    }
}

/// `weights` when it names a stage of the experiment.
pub(crate) fn weights_stage_of(node: &NodeView<'_>, weights: Option<&str>) -> Option<String> {
    weights.filter(|w| node.exp.stage(w).is_some()).map(str::to_string)
}

/// A training node's initial weights: a `pretrain` input comes first; `weights` serve the nodes without one
/// (the ImageNet row of a table whose other rows start from MPCS); neither means a seeded random init.
pub(crate) fn resolve_init(
    node: &NodeView<'_>,
    weights: Option<&str>,
    bucket: Option<usize>,
) -> (InitConfig, Option<PathBuf>) {
    if node.has_input_of_kind(&["pretrain"]) {
        return (InitConfig::Pretrain { bucket }, None);
    }
    match weights {
        None => (InitConfig::Random, None),
        Some(w) if node.exp.stage(w).is_some() => (InitConfig::Stage { stage: w.to_string() }, None),
        Some(w) => (InitConfig::File { blake3: node.file_digest(w) }, Some(node.exp.resolve_path(w))),
    }
}

/// Refuses, while the experiment is checked, a fold that a `split` input of stage `decl` does not make: `fold`
/// when the stage gives one, else each value of its `fold` matrix axis. Without this the node failed at run time
/// with only `fold_7.csv: No such file` (after its upstream stages had run).
pub(super) fn check_folds(fold: Option<u32>, decl: &StageDecl, exp: &Experiment) -> std::result::Result<(), String> {
    let wanted: Vec<i64> = match fold {
        Some(f) => vec![f.into()],
        // Values that are not integers are reported by `resolve`, which parses them.
        None => decl
            .matrix
            .iter()
            .filter(|(k, _)| k == "fold")
            .flat_map(|(_, vs)| vs.iter().filter_map(|v| v.to_string().parse().ok()))
            .collect(),
    };
    for split in decl.refs.iter().filter_map(|r| exp.stage(&r.stage)).filter(|s| s.kind == "split") {
        let Some(folds) = super::split::declared_folds(split) else { continue };
        // (A negative value is not a fold index at all; `resolve` says so.)
        let mut bad: Vec<i64> = wanted.iter().copied().filter(|&f| f >= folds as i64).collect();
        bad.sort_unstable();
        bad.dedup();
        let Some(&highest) = bad.iter().max() else { continue };
        let listed = bad.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        let (what, verb) = if bad.len() == 1 { ("fold", "does") } else { ("folds", "do") };
        return Err(format!(
            "{what} {listed} {verb} not exist: split stage `{}` makes {folds} folds ({}); choose a fold from 0 to {}, \
             or raise `folds` of stage `{}` to at least {}",
            split.name,
            fold_files(folds),
            folds - 1,
            split.name,
            highest + 1
        ));
    }
    Ok(())
}

/// `fold_0.csv, fold_1.csv`, or `fold_0.csv … fold_9.csv` for many folds.
fn fold_files(folds: usize) -> String {
    if folds <= 5 {
        (0..folds).map(|k| format!("fold_{k}.csv")).collect::<Vec<_>>().join(", ")
    } else {
        format!("fold_0.csv … fold_{}.csv", folds - 1)
    }
}

/// The fold file of `fold` in a split's output. Validation already refuses folds the split does not make; this
/// is the same message at run time, in case the split's output lacks it anyway (a split from an older mpcs).
pub(super) fn fold_csv(ctx: &ExecContext<'_>, split: &Path, fold: u32) -> Result<PathBuf, StageFailure> {
    let file = split.join(format!("fold_{fold}.csv"));
    if file.is_file() {
        return Ok(file);
    }
    let folds = (0..).take_while(|k| split.join(format!("fold_{k}.csv")).is_file()).count();
    Err(StageFailure(format!(
        "`{}` wants fold {fold}, but its split has {folds} folds ({}); choose a fold from 0 to {}, or raise the \
         split's `folds`",
        ctx.node.id,
        fold_files(folds),
        folds.saturating_sub(1)
    )))
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
        .filter(|i| kinds.contains(&i.kind.as_str()))
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

/// The weights file a training node starts from, or None for a random initialisation.
pub(super) fn init_weights(
    ctx: &ExecContext<'_>,
    init: &InitConfig,
    file: Option<&Path>,
) -> Result<Option<PathBuf>, StageFailure> {
    match init {
        InitConfig::Random => Ok(None),
        InitConfig::Pretrain { bucket } => {
            let pre = input_of_kind(ctx, &["pretrain"], &[], "a pretrained backbone")?;
            let file = match bucket {
                Some(b) => pre.join(format!("buckets/epoch_{b}.safetensors")),
                None => pre.join("backbone.safetensors"),
            };
            if !file.exists() {
                return Err(StageFailure(format!(
                    "{} does not exist: the pretraining did not reach epoch {} (buckets are kept at the epochs listed \
                     in its `buckets`)",
                    file.display(),
                    bucket.unwrap_or(0)
                )));
            }
            Ok(Some(file))
        }
        InitConfig::File { .. } => match file {
            Some(p) if p.is_file() => Ok(Some(p.to_path_buf())),
            other => Err(StageFailure(format!(
                "the weights file {} is not a file (a relative path is relative to the experiment file)",
                other.map(|p| p.display().to_string()).unwrap_or_default()
            ))),
        },
        InitConfig::Stage { stage } => stage_weights(ctx, stage).map(Some),
    }
}

/// The one weights file in the output of input stage `stage`.
fn stage_weights(ctx: &ExecContext<'_>, stage: &str) -> Result<PathBuf, StageFailure> {
    let Some(input) = ctx.inputs.iter().find(|i| i.stage == stage) else {
        return Err(StageFailure(format!(
            "`weights = \"{stage}\"` names a stage that is not among the inputs of `{}`; add it to `from`",
            ctx.node.id
        )));
    };
    let mut files: Vec<PathBuf> = walk_files(&input.path)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pth" || e == "pt" || e == "safetensors"))
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        0 => Err(StageFailure(format!(
            "the output of `{stage}` ({}) holds no .pth or .safetensors file",
            input.path.display()
        ))),
        n => Err(StageFailure(format!(
            "the output of `{stage}` holds {n} weight files; give the file's path in `weights` instead"
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
            TrainEvent::Warning { message } => {
                log_line(ctx, &format!("warning: {message}"));
                (ctx.notice)(&format!("`{}`: {message}", ctx.node.id));
            }
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

impl ModelConfig {
    fn dilation(&self) -> Result<Dilation, StageFailure> {
        Dilation::from_output_stride(self.output_stride).map_err(|e| StageFailure(e.to_string()))
    }

    fn objective(&self) -> Objective {
        match self.objective {
            ObjectiveName::Binary => Objective::Binary,
            ObjectiveName::Multiclass => Objective::MultiClass { classes: self.classes },
        }
    }
}

/// Copies a [`ModelConfig`] into the fields of the same names that `FinetuneConfig` and `EvalConfig` share (two
/// library types with no common trait), and picks the node's device.
macro_rules! set_model_fields {
    ($cfg:ident, $model:expr, $ctx:expr) => {
        $cfg.magnification = $model.magnification.clone();
        $cfg.arch = $model.arch;
        $cfg.dilation = $model.dilation()?;
        $cfg.objective = $model.objective();
        $cfg.labels = $model.labels;
        $cfg.normalize = $model.normalize;
        $cfg.image_size = $model.size;
        $cfg.batch_size = $model.batch_size;
        $cfg.device = candle_device($ctx)?;
    };
}

/// `finetune` and `linear_eval`.
fn execute_training(c: &TrainConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
    let split = input_of_kind(ctx, &["split"], &[], "a split")?;
    let skip: Vec<&str> = c.weights_stage.as_deref().into_iter().collect();
    let data = input_of_kind(ctx, DATASET_KINDS, &skip, "the dataset")?;
    let fold_csv = fold_csv(ctx, split, c.model.fold)?;
    let mut cfg = FinetuneConfig::new(data, &fold_csv, ctx.out, &ctx.scratch);
    set_model_fields!(cfg, c.model, ctx);
    cfg.freeze_encoder = c.freeze_encoder;
    cfg.epochs = c.epochs;
    cfg.lr = c.lr;
    cfg.weight_decay = c.weight_decay;
    cfg.optimizer = match c.optimizer {
        OptimizerName::Adam => OptimizerKind::Adam,
        OptimizerName::Sgd => OptimizerKind::Sgd { momentum: c.momentum.unwrap_or(0.9) },
    };
    cfg.augment = c.augment;
    cfg.dropout = c.dropout;
    cfg.plateau_patience = c.plateau_patience;
    cfg.plateau_factor = c.plateau_factor;
    cfg.early_stop_patience = c.early_stop_patience;
    cfg.train_portion = c.train_portion.clone();
    cfg.val_portion = c.val_portion.clone();
    cfg.seed = c.seed;
    cfg.precision = c.precision;
    cfg.init = match init_weights(ctx, &c.init, c.weights_file.as_deref())? {
        Some(file) => Init::Weights(file),
        None => Init::Random,
    };
    if c.freeze_encoder && cfg.init == Init::Random {
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

fn execute_evaluate(c: &EvaluateConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
    let split = input_of_kind(ctx, &["split"], &[], "a split")?;
    let data = input_of_kind(ctx, DATASET_KINDS, &[], "the dataset")?;
    let model_dir = input_of_kind(ctx, &["finetune", "linear_eval"], &[], "a fine-tuned model")?;
    let fold_csv = fold_csv(ctx, split, c.model.fold)?;
    let model: PathBuf = model_dir.join(MODEL_FILE);
    let mut cfg = EvalConfig::new(data, &fold_csv, &model, ctx.out);
    set_model_fields!(cfg, c.model, ctx);
    cfg.test_portion = c.test_portion.clone();
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

/// The trained model a `finetune` / `linear_eval` entry holds.
pub const MODEL_FILE: &str = "model.safetensors";
