//! `pretrain`: MPCS self-supervised pretraining (`crate::train::pretrain`) as a stage kind. Inputs: the split
//! (the fold's training patients are pretrained on) and the dataset; optionally initial weights (a file or an
//! input stage holding one, e.g. downloaded ImageNet weights). Writes `backbone.safetensors` (the encoder with
//! the lowest epoch loss, torchvision names), `buckets/epoch_<n>.safetensors` for the buckets reached, and
//! `loss.jsonl`. Checkpoints go to the node's scratch area, so an interrupted run resumes where it stopped.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::train::{candle_device, input_of_kind, plot_loss_curve, progress_reporter, weights_path, DATASET_KINDS};
use super::{log_line, ExecContext, StageFailure};
use crate::error::Result;
use crate::experiment::{Experiment, SourceText, StageDecl};
use crate::loader::PairMode;
use crate::nn::Arch;
use crate::plan::Node;
use crate::train::{pretrain, PretrainConfig};

pub const VERSION: u32 = 1;

#[derive(Deserialize, Serialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PretrainSpec {
    /// Fold index (default: the node's `fold` matrix value).
    pub fold: Option<u32>,
    /// `FP`, `OP` or `RP` (default: the node's `pair` matrix value).
    pub pair: Option<String>,
    /// The portion whose patients are pretrained on (default `train_60`).
    pub portion: Option<String>,
    pub arch: Option<String>,
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
}

impl PretrainSpec {
    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        let bad = |m: String| Err(src.error(decl.span.clone(), format!("stage `{}`: {m}", decl.name), None));
        if decl.refs.is_empty() {
            return bad("needs `from` with the split and the dataset".into());
        }
        if let Some(a) = &self.arch {
            if let Err(e) = a.parse::<Arch>() {
                return bad(e.to_string());
            }
        }
        match &self.pair {
            Some(p) if parse_pair(p).is_none() => return bad(format!("unknown pair `{p}`; use FP, OP or RP")),
            None if !decl.has_matrix_key("pair") => return bad("give `pair = \"OP\"` or a `pair` matrix axis".into()),
            _ => {}
        }
        if self.fold.is_none() && !decl.has_matrix_key("fold") {
            return bad("give `fold = K` or a `fold` matrix axis".into());
        }
        if [self.size, self.epochs, self.projector_hidden].contains(&Some(0)) {
            return bad("size, epochs and projector_hidden must be at least 1".into());
        }
        if self.batch_size.is_some_and(|b| b < 2) {
            return bad("batch_size must be at least 2 (the contrastive loss needs negatives)".into());
        }
        if self.temperature.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return bad("`temperature` must be a positive number".into());
        }
        Ok(())
    }

    pub(crate) fn fold(&self, node: &Node) -> u32 {
        self.fold.or_else(|| node.matrix_value("fold").and_then(|v| v.to_string().parse().ok())).unwrap_or(0)
    }

    pub(crate) fn arch(&self) -> Arch {
        self.arch.as_deref().and_then(|a| a.parse().ok()).unwrap_or(Arch::ResNet18)
    }

    fn pair(&self, node: &Node) -> Option<PairMode> {
        let p = self.pair.clone().or_else(|| node.matrix_value("pair").map(|v| v.to_string()))?;
        parse_pair(&p)
    }

    pub fn key_params(&self, exp: &Experiment, node: &Node) -> BTreeMap<String, Value> {
        let mut p: BTreeMap<String, Value> = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
            _ => BTreeMap::new(),
        };
        p.insert("fold".into(), Value::from(self.fold(node)));
        if let Some(pair) = self.pair(node) {
            p.insert("pair".into(), serde_json::to_value(pair).unwrap_or_default());
        }
        if let Some(w) = self.weights.as_ref().filter(|w| exp.stage(w).is_none()) {
            let digest = crate::cache::fingerprint::param_file_digest(&exp.resolve_path(w));
            p.insert("weights_blake3".into(), Value::String(digest));
        }
        p
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let split = input_of_kind(ctx, &["split"], &[], "a split")?;
        let weights_stage: Vec<&str> = self.weights.as_deref().into_iter().collect();
        let data = input_of_kind(ctx, DATASET_KINDS, &weights_stage, "the dataset")?;
        let fold_csv = split.join(format!("fold_{}.csv", self.fold(ctx.node)));
        let mut cfg = PretrainConfig::new(data, &fold_csv, ctx.out, &ctx.scratch);
        cfg.pair_mode = self.pair(ctx.node).ok_or_else(|| StageFailure("no pair mode".into()))?;
        cfg.arch = self.arch.as_deref().and_then(|a| a.parse().ok()).unwrap_or(cfg.arch);
        if let Some(p) = &self.portion {
            cfg.portion = p.clone();
        }
        cfg.image_size = self.size.unwrap_or(cfg.image_size);
        cfg.batch_size = self.batch_size.unwrap_or(cfg.batch_size);
        cfg.epochs = self.epochs.unwrap_or(cfg.epochs);
        cfg.lr = self.lr.unwrap_or(cfg.lr);
        cfg.weight_decay = self.weight_decay.unwrap_or(cfg.weight_decay);
        cfg.temperature = self.temperature.unwrap_or(cfg.temperature);
        cfg.projector_hidden = self.projector_hidden.unwrap_or(cfg.projector_hidden);
        cfg.plateau_patience = self.plateau_patience.unwrap_or(cfg.plateau_patience);
        if let Some(b) = &self.buckets {
            cfg.buckets = b.clone();
        }
        if let Some(w) = &self.weights {
            cfg.init = Some(weights_path(ctx, w)?);
        }
        cfg.device = candle_device(ctx)?;
        cfg.seed = ctx.node.seed;
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

fn parse_pair(p: &str) -> Option<PairMode> {
    match p.to_ascii_uppercase().as_str() {
        "FP" => Some(PairMode::Fixed),
        "OP" => Some(PairMode::Ordered),
        "RP" => Some(PairMode::Random),
        _ => None,
    }
}
