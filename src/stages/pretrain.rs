//! `pretrain`: MPCS self-supervised pretraining (`crate::train::pretrain`) as a stage kind. Inputs: the split
//! (the fold's training patients are pretrained on) and the dataset; optionally initial weights (a file or an
//! input stage holding one, e.g. downloaded ImageNet weights). Writes `backbone.safetensors` (the encoder with
//! the lowest epoch loss, torchvision names), `buckets/epoch_<n>.safetensors` for the buckets reached, and
//! `loss.jsonl`. Checkpoints go to the node's scratch area, so an interrupted run resumes where it stopped.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::train::{
    candle_device, check_folds, fold_csv, init_weights, input_of_kind, plot_loss_curve, progress_reporter,
    resolve_init, weights_stage_of, InitConfig, DATASET_KINDS,
};
use super::{log_line, stage_error};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};
use crate::loader::PairMode;
use crate::nn::{Arch, Precision};
use crate::train::{pretrain, PretrainConfig};

pub struct Pretrain;

impl StageKind for Pretrain {
    type Spec = PretrainSpec;
    type Config = PretrainStageConfig;
    const NAME: &'static str = "pretrain";
    const VERSION: u32 = 1;
    const LOCATIONS: &'static [&'static str] = &["weights_file"];

    fn validate(spec: &PretrainSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(stage).and_then(|()| check_folds(spec.fold, stage, exp)).map_err(|m| stage_error(exp, stage, m))
    }

    fn resolve(spec: &PretrainSpec, node: &NodeView<'_>) -> Result<PretrainStageConfig, String> {
        let d = PretrainConfig::new(Path::new(""), Path::new(""), Path::new(""), Path::new(""));
        let pair = match (spec.pair, node.matrix("pair")) {
            (Some(p), _) => p,
            (None, Some(v)) => parse_pair(&v).ok_or_else(|| format!("unknown pair `{v}`; use FP, OP or RP"))?,
            (None, None) => return Err("give `pair = \"OP\"` or a `pair` matrix axis".into()),
        };
        let fold = match (spec.fold, node.matrix("fold")) {
            (Some(f), _) => f,
            (None, Some(v)) => v.parse().map_err(|_| format!("the `fold` matrix value `{v}` is not a fold index"))?,
            (None, None) => return Err("give `fold = K` or a `fold` matrix axis".into()),
        };
        let (init, weights_file) = resolve_init(node, spec.weights.as_deref(), None);
        Ok(PretrainStageConfig {
            fold,
            pair,
            portion: spec.portion.clone().unwrap_or(d.portion),
            arch: spec.arch.unwrap_or(d.arch),
            size: spec.size.unwrap_or(d.image_size),
            batch_size: spec.batch_size.unwrap_or(d.batch_size),
            epochs: spec.epochs.unwrap_or(d.epochs),
            lr: spec.lr.unwrap_or(d.lr),
            weight_decay: spec.weight_decay.unwrap_or(d.weight_decay),
            temperature: spec.temperature.unwrap_or(d.temperature),
            projector_hidden: spec.projector_hidden.unwrap_or(d.projector_hidden),
            plateau_patience: spec.plateau_patience.unwrap_or(d.plateau_patience),
            buckets: spec.buckets.clone().unwrap_or(d.buckets),
            init,
            weights_file,
            weights_stage: weights_stage_of(node, spec.weights.as_deref()),
            seed: node.node.seed,
            precision: spec.precision.unwrap_or(d.precision),
        })
    }

    fn execute(config: &PretrainStageConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

#[derive(Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PretrainSpec {
    /// Fold index (default: the node's `fold` matrix value).
    pub fold: Option<u32>,
    /// `FP`, `OP` or `RP` (default: the node's `pair` matrix value).
    pub pair: Option<PairMode>,
    /// The portion whose patients are pretrained on (default `train_60`).
    pub portion: Option<String>,
    pub arch: Option<Arch>,
    pub size: Option<usize>,
    pub batch_size: Option<usize>,
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    pub temperature: Option<f64>,
    /// Hidden width of the projector (the paper: 1024 for ResNet-50; default 256 for ResNet-18).
    pub projector_hidden: Option<usize>,
    pub plateau_patience: Option<usize>,
    /// Epochs at which the best backbone so far is kept (default: the paper's 100, 200, 300, 400, 500, 800, 1000).
    pub buckets: Option<Vec<usize>>,
    /// Initial encoder weights: a file, or the name of an input stage whose output holds one.
    pub weights: Option<String>,
    /// `"f32"` (default, the paper) or `"bf16"`: convolutions and linear layers in bfloat16, BatchNorm, loss
    /// and optimiser in f32 (`nn::precision`). Part of the node's key.
    pub precision: Option<Precision>,
}

/// A `pretrain` node, every default filled in (from `crate::train::PretrainConfig::new`).
#[derive(Deserialize, Serialize, Clone, Debug)]
pub struct PretrainStageConfig {
    pub fold: u32,
    pub pair: PairMode,
    pub portion: String,
    pub arch: Arch,
    pub size: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub temperature: f64,
    pub projector_hidden: usize,
    pub plateau_patience: usize,
    pub buckets: Vec<usize>,
    pub init: InitConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_file: Option<std::path::PathBuf>,
    /// An input stage that holds weights rather than the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_stage: Option<String>,
    pub seed: u64,
    /// Left out of the key when f32, so the keys of nodes from before this setting existed still hold.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl PretrainSpec {
    fn validate(&self, decl: &StageDecl) -> std::result::Result<(), String> {
        if decl.refs.is_empty() {
            return Err("needs `from` with the split and the dataset".into());
        }
        if self.pair.is_none() && !decl.has_matrix_key("pair") {
            return Err("give `pair = \"OP\"` or a `pair` matrix axis".into());
        }
        if self.fold.is_none() && !decl.has_matrix_key("fold") {
            return Err("give `fold = K` or a `fold` matrix axis".into());
        }
        if [self.size, self.epochs, self.projector_hidden].contains(&Some(0)) {
            return Err("size, epochs and projector_hidden must be at least 1".into());
        }
        if self.batch_size.is_some_and(|b| b < 2) {
            return Err("batch_size must be at least 2 (the contrastive loss needs negatives)".into());
        }
        if self.temperature.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return Err("`temperature` must be a positive number".into());
        }
        Ok(())
    }
}

impl PretrainStageConfig {
    fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let split = input_of_kind(ctx, &["split"], &[], "a split")?;
        let weights_stage: Vec<&str> = self.weights_stage.as_deref().into_iter().collect();
        let data = input_of_kind(ctx, DATASET_KINDS, &weights_stage, "the dataset")?;
        let fold_csv = fold_csv(ctx, split, self.fold)?;
        let mut cfg = PretrainConfig::new(data, &fold_csv, ctx.out, &ctx.scratch);
        cfg.pair_mode = self.pair;
        cfg.arch = self.arch;
        cfg.portion = self.portion.clone();
        cfg.image_size = self.size;
        cfg.batch_size = self.batch_size;
        cfg.epochs = self.epochs;
        cfg.lr = self.lr;
        cfg.weight_decay = self.weight_decay;
        cfg.temperature = self.temperature;
        cfg.projector_hidden = self.projector_hidden;
        cfg.plateau_patience = self.plateau_patience;
        cfg.buckets = self.buckets.clone();
        cfg.init = init_weights(ctx, &self.init, self.weights_file.as_deref())?;
        cfg.device = candle_device(ctx)?;
        cfg.seed = self.seed;
        cfg.precision = self.precision;
        log_line(ctx, &format!("initial encoder weights: {:?} (none = seeded random)", cfg.init));
        let progress = progress_reporter(ctx, cfg.batch_size);
        let outcome = pretrain(&cfg, &progress).map_err(|e| StageFailure(e.to_string()))?;
        log_line(ctx, &format!("{outcome:?}"));
        plot_loss_curve(ctx, "loss.jsonl", &["loss"]);
        Ok(serde_json::json!({
            "regions": outcome.regions,
            "epochs": outcome.epochs_done,
            "best_epoch": outcome.best_epoch,
            "best_loss": outcome.best_loss,
            "buckets": outcome.buckets.iter().map(|(e, _)| e).collect::<Vec<_>>(),
            "resumed_after": outcome.resumed_after,
        }))
    }
}

/// `FP`, `OP` or `RP` (any case) as a matrix value.
fn parse_pair(p: &str) -> Option<PairMode> {
    match p.to_ascii_uppercase().as_str() {
        "FP" => Some(PairMode::Fixed),
        "OP" => Some(PairMode::Ordered),
        "RP" => Some(PairMode::Random),
        _ => None,
    }
}
