//! Supervised fine-tuning (METHOD.md, "Fine-tuning and evaluation"): ResNet encoder + `Head`
//! (Dropout → Linear), Adam, ReduceLROnPlateau(min, factor 0.1) on the validation loss, early stopping,
//! the best-validation-loss model kept as `model.safetensors` under torchvision names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use candle_nn::VarMap;

use super::checkpoint::{self, State};
use super::error::{Result, TrainError};
use super::fold::{expand_patches, read_fold, select, FoldRow, LabelColumn};
use super::{finite, step_err, to_tensor, write_atomic, TrainEvent};
use crate::loader::{AugmentConfig, ImageStore, Loader, LoaderConfig, Normalize, Sample, Source};
use crate::nn::{autocast, no_grad, weights, Arch, Dilation, Encoder, Head, Precision};
use crate::optim::{
    Adam, AdamConfig, EarlyStopping, Mode, Optimizer, PlateauConfig, ReduceLrOnPlateau, Sgd, SgdConfig,
};

/// Where the encoder's weights come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// Random, torchvision's scheme drawn from the run's seed (see `seeded_init`).
    Random,
    /// A torchvision-layout state dict (`.pth` or `.safetensors`, e.g. ImageNet weights) or an MPCS
    /// `backbone.safetensors`; its `fc` is ignored and a new head is trained. Every other tensor must match.
    Weights(PathBuf),
}

/// The fine-tuning optimiser (METHOD.md: Adam for BreakHis, SGD with momentum 0.9 for BACH).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    Adam,
    Sgd { momentum: f64 },
}

/// The training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// One logit, BCE with logits; predicted class 1 when sigmoid(logit) >= 0.5 (BreakHis benign/malignant).
    Binary,
    /// `classes` logits, cross-entropy; predicted class = argmax.
    MultiClass { classes: usize },
}

impl Objective {
    pub fn classes(self) -> usize {
        match self {
            Objective::Binary => 2,
            Objective::MultiClass { classes } => classes,
        }
    }
    fn outputs(self) -> usize {
        match self {
            Objective::Binary => 1,
            Objective::MultiClass { classes } => classes,
        }
    }
}

#[derive(Clone, Debug)]
pub struct FinetuneConfig {
    /// The dataset root the fold's `file` column is relative to.
    pub data_root: PathBuf,
    pub fold_csv: PathBuf,
    /// Keep only this magnification (`40`, `40X`, ...); `None` = all rows of the portions.
    pub magnification: Option<String>,
    pub train_portion: String,
    pub val_portion: String,
    pub labels: LabelColumn,
    pub objective: Objective,
    pub arch: Arch,
    /// Dilated last stages (the paper's BACH / breast-cell encoder: output stride 8 or 16).
    pub dilation: Dilation,
    pub init: Init,
    /// Linear evaluation: the encoder is frozen (eval-mode BatchNorm, no gradient) and only the head trains.
    pub freeze_encoder: bool,
    /// Side of the square network input (the paper: 252, a crop of 341).
    pub image_size: usize,
    pub batch_size: usize,
    /// Total epochs wanted (a resumed run goes on up to this number).
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Adam (BreakHis) or SGD with momentum (BACH, momentum 0.9).
    pub optimizer: OptimizerKind,
    /// ReduceLROnPlateau patience (the paper: 5) and factor (0.1).
    pub plateau_patience: usize,
    pub plateau_factor: f64,
    /// Early-stopping patience on the validation loss (the paper: 100).
    pub early_stop_patience: usize,
    /// Head dropout probability in [0, 1).
    pub dropout: f32,
    /// "low" augmentation scaled to `image_size` (resize to size·341/252, random crop to size); false = resize only.
    pub augment: bool,
    pub normalize: Normalize,
    /// Seed of the weight initialisation, shuffling and augmentation.
    pub seed: u64,
    /// The convolutions and linear layers of the training steps in bf16 or f32 (`nn::precision`);
    /// validation and evaluation stay f32. The paper: f32.
    pub precision: Precision,
    /// Loader threads; 0 = one per core.
    pub threads: usize,
    /// Where `model.safetensors` and `metrics.jsonl` go.
    pub out_dir: PathBuf,
    /// Where per-epoch checkpoints go (resumed from when present).
    pub scratch_dir: PathBuf,
    pub device: Device,
}

impl FinetuneConfig {
    /// The paper's settings (Adam lr 1e-4, plateau factor 0.1 patience 5, batch 32, 100 epochs, early-stopping
    /// patience 100, binary, portions train_60/val_20) scaled down to resnet18 at 64×64 for the CPU.
    pub fn new(data_root: &Path, fold_csv: &Path, out_dir: &Path, scratch_dir: &Path) -> FinetuneConfig {
        FinetuneConfig {
            data_root: data_root.to_path_buf(),
            fold_csv: fold_csv.to_path_buf(),
            magnification: None,
            train_portion: "train_60".into(),
            val_portion: "val_20".into(),
            labels: LabelColumn::Label,
            objective: Objective::Binary,
            arch: Arch::ResNet18,
            dilation: Dilation::None,
            init: Init::Random,
            freeze_encoder: false,
            image_size: 64,
            batch_size: 32,
            epochs: 100,
            lr: 1e-4,
            weight_decay: 0.0,
            optimizer: OptimizerKind::Adam,
            plateau_patience: 5,
            plateau_factor: 0.1,
            early_stop_patience: 100,
            dropout: 0.0,
            augment: true,
            normalize: Normalize::None,
            seed: 1,
            precision: Precision::F32,
            threads: 0,
            out_dir: out_dir.to_path_buf(),
            scratch_dir: scratch_dir.to_path_buf(),
            device: Device::Cpu,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneOutcome {
    /// Epochs finished in total (over all resumed runs).
    pub epochs_done: usize,
    /// Epochs run by this call (0 when the checkpoint was already complete).
    pub epochs_run: usize,
    /// The epoch this call resumed after, when it resumed.
    pub resumed_after: Option<usize>,
    pub best_epoch: usize,
    pub best_val_loss: f64,
    pub stopped_early: bool,
    pub model: PathBuf,
    pub metrics: PathBuf,
}

/// The encoder + head of a fine-tuned classifier, with its variables in `varmap` under torchvision names.
pub(crate) struct Classifier {
    pub net: Encoder,
    pub head: Head,
    pub objective: Objective,
    /// The encoder is frozen (linear evaluation): always eval mode, no gradient through it.
    pub frozen: bool,
}

impl Classifier {
    /// The encoder and head under `varmap`, their weights still zero: call `seeded_init` and/or load weights.
    pub fn new(
        varmap: &VarMap,
        (arch, dilation): (Arch, Dilation),
        objective: Objective,
        dropout: f32,
        device: &Device,
    ) -> Result<Self> {
        if let Objective::MultiClass { classes } = objective {
            if classes < 2 {
                return Err(TrainError::Config(format!("multi-class needs at least 2 classes, got {classes}")));
            }
        }
        // Every variable is set right after: by `seeded_init` and a weights file (fine-tuning) or a strict load
        // (evaluation).
        let vb = super::deferred_init_builder(varmap, device);
        let net = Encoder::new(arch, vb.clone(), None, dilation)?;
        let head = Head::new(vb.pp(arch.classifier()), net.feature_dim(), objective.outputs(), dropout)?;
        Ok(Classifier { net, head, objective, frozen: false })
    }

    pub fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // A frozen encoder, and any evaluation-mode pass, records no graph (see `nn::no_grad`).
        let features = if self.frozen || !train {
            no_grad(|| self.net.features_t(x, false))?
        } else {
            self.net.features_t(x, true)?
        };
        // efficientnet_pytorch keeps its own dropout in front of the replaced `_fc` (the paper's
        // `Dropout(p) + Linear` head): in training both apply, as there.
        let p = self.net.classifier_dropout();
        let features = if train && p > 0.0 { candle_nn::ops::dropout(&features, p)? } else { features };
        Ok(self.head.forward_t(&features, train)?)
    }

    /// Mean loss over the batch.
    pub fn loss(&self, logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
        let device = logits.device();
        match self.objective {
            Objective::Binary => {
                // Stable BCE with logits: max(x, 0) − x·y + log(1 + exp(−|x|)).
                let x = logits.flatten_all()?;
                let y = Tensor::from_vec(labels.iter().map(|&l| l as f32).collect::<Vec<_>>(), labels.len(), device)?;
                let l = ((x.relu()? - (&x * &y)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                Ok(l.mean_all()?)
            }
            Objective::MultiClass { .. } => {
                let y = Tensor::from_vec(labels.to_vec(), labels.len(), device)?;
                Ok(candle_nn::loss::cross_entropy(logits, &y)?)
            }
        }
    }

    /// Predicted classes and the probability of the predicted class... per row: (class, score) where score is
    /// P(class 1) for binary and the softmax maximum for multi-class.
    pub fn predict(&self, logits: &Tensor) -> Result<Vec<(u32, f32)>> {
        match self.objective {
            Objective::Binary => {
                let p = candle_nn::ops::sigmoid(&logits.flatten_all()?)?.to_vec1::<f32>()?;
                Ok(p.into_iter().map(|p| (u32::from(p >= 0.5), p)).collect())
            }
            Objective::MultiClass { .. } => {
                let p = candle_nn::ops::softmax(logits, D::Minus1)?.to_vec2::<f32>()?;
                Ok(p.into_iter()
                    .map(|row| {
                        let (i, v) =
                            row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
                        (i as u32, v)
                    })
                    .collect())
            }
        }
    }
}

/// Store and samples for a list of fold rows, images decoded at `store_size` × `store_size`.
pub(crate) fn build_inputs(
    root: &Path,
    rows: &[FoldRow],
    labels: LabelColumn,
    objective: Objective,
    store_size: usize,
    fold_csv: &Path,
) -> Result<(Arc<ImageStore>, Vec<Sample>)> {
    let classes = objective.classes();
    let mut samples = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let label = labels.of(r, fold_csv)?;
        if label as usize >= classes {
            return Err(TrainError::BadFile {
                path: fold_csv.to_path_buf(),
                msg: format!(
                    "{}: label {label} does not fit a {classes}-class objective; choose the multi-class objective \
                     with enough classes",
                    r.file
                ),
            });
        }
        samples.push(Sample { source: Source::Image(i), label });
    }
    let paths: Vec<PathBuf> = rows.iter().map(|r| root.join(&r.file)).collect();
    let side = store_size as u32;
    let store = ImageStore::build(&paths, Some((side, side)))?;
    Ok((Arc::new(store), samples))
}

/// Mean loss and accuracy of `clf` over every sample of `loader` (eval mode).
pub(crate) fn validate(clf: &Classifier, loader: &Loader, device: &Device, epoch: usize) -> Result<(f64, f64)> {
    let (mut loss_sum, mut correct, mut n) = (0.0f64, 0usize, 0usize);
    for (i, batch) in loader.epoch(0).enumerate() {
        let batch = batch?;
        let x = to_tensor(batch.view1, batch.shape, device)?;
        let logits = clf.logits(&x, false)?;
        let loss = finite(clf.loss(&logits, &batch.labels)?.to_scalar::<f32>()? as f64, epoch, i)?;
        loss_sum += loss * batch.labels.len() as f64;
        let pred = clf.predict(&logits)?;
        correct += pred.iter().zip(&batch.labels).filter(|((p, _), l)| p == *l).count();
        n += batch.labels.len();
    }
    Ok((loss_sum / n.max(1) as f64, correct as f64 / n.max(1) as f64))
}

fn loader_config(cfg: &FinetuneConfig, batch_size: usize, augment: AugmentConfig, shuffle: bool) -> LoaderConfig {
    LoaderConfig {
        shuffle,
        threads: cfg.threads,
        normalize: cfg.normalize,
        ..LoaderConfig::new(batch_size, cfg.seed, augment)
    }
}

fn check(cfg: &FinetuneConfig) -> Result<()> {
    let bad = |m: String| Err(TrainError::Config(m));
    if cfg.batch_size == 0 {
        return bad("batch_size must be at least 1".into());
    }
    if cfg.image_size < 16 {
        return bad(format!("image_size {} is too small; use at least 16", cfg.image_size));
    }
    if cfg.epochs == 0 {
        return bad("epochs must be at least 1".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return bad(format!("learning rate {} must be a positive number", cfg.lr));
    }
    Ok(())
}

/// Fine-tunes a classifier; see the module documentation. Resumes from `cfg.scratch_dir` when it holds a
/// fine-tuning checkpoint.
///
/// The training set must hold at least `batch_size` images (else a configuration error says so). Training
/// batches are shuffled and the last incomplete batch is kept, except a trailing batch of a single image,
/// which is dropped (BatchNorm cannot train on one sample).
pub fn finetune(cfg: &FinetuneConfig, progress: &dyn Fn(TrainEvent)) -> Result<FinetuneOutcome> {
    check(cfg)?;
    let rows = read_fold(&cfg.fold_csv)?;
    let mag = cfg.magnification.as_deref();
    let (train_rows, _) = expand_patches(&cfg.data_root, select(&rows, &cfg.train_portion, mag, &cfg.fold_csv)?, true)?;
    let (val_rows, _) = expand_patches(&cfg.data_root, select(&rows, &cfg.val_portion, mag, &cfg.fold_csv)?, false)?;
    if train_rows.len() < cfg.batch_size {
        return Err(TrainError::Config(format!(
            "batch_size {} exceeds the {} training images of portion '{}'; lower batch_size",
            cfg.batch_size,
            train_rows.len(),
            cfg.train_portion
        )));
    }

    let size = cfg.image_size;
    let (train_aug, train_store_side) = if cfg.augment {
        // The paper resizes to 341 and crops 252; keep that ratio at other sizes.
        let resize = (size * 341).div_ceil(252);
        (AugmentConfig::finetune_low(resize, size), resize)
    } else {
        (AugmentConfig::eval(size), size)
    };
    let (train_store, train_samples) =
        build_inputs(&cfg.data_root, &train_rows, cfg.labels, cfg.objective, train_store_side, &cfg.fold_csv)?;
    let (val_store, val_samples) =
        build_inputs(&cfg.data_root, &val_rows, cfg.labels, cfg.objective, size, &cfg.fold_csv)?;
    let mut train_cfg = loader_config(cfg, cfg.batch_size, train_aug, true);
    train_cfg.drop_last = train_samples.len() % cfg.batch_size == 1;
    let train = Loader::new(train_store, train_samples, train_cfg)?;
    let val =
        Loader::new(val_store, val_samples, loader_config(cfg, cfg.batch_size, AugmentConfig::eval(size), false))?;

    let device = &cfg.device;
    let varmap = VarMap::new();
    let mut clf = Classifier::new(&varmap, (cfg.arch, cfg.dilation), cfg.objective, cfg.dropout, device)?;
    clf.frozen = cfg.freeze_encoder;
    super::seeded_init(&varmap, cfg.seed)?;
    if let Init::Weights(path) = &cfg.init {
        let opts = weights::LoadOptions { ignore_fc: true, ..Default::default() };
        weights::load_into_with(&varmap, path, &opts)?;
    }
    let warn = |message: String| progress(TrainEvent::Warning { message });
    let resumed = checkpoint::load(&cfg.scratch_dir, "finetune", &varmap, &|_| Vec::new(), &warn)?;

    let head_prefix = format!("{}.", cfg.arch.classifier());
    let trainable = weights::trainable_vars(&varmap, if cfg.freeze_encoder { &head_prefix } else { "" });
    let mut opt: Box<dyn Optimizer> = match cfg.optimizer {
        OptimizerKind::Adam => Box::new(Adam::new(
            trainable,
            AdamConfig { lr: cfg.lr, weight_decay: cfg.weight_decay, ..AdamConfig::default() },
        )?),
        OptimizerKind::Sgd { momentum } => Box::new(Sgd::new(
            trainable,
            SgdConfig { lr: cfg.lr, momentum, weight_decay: cfg.weight_decay, ..SgdConfig::default() },
        )?),
    };
    let plateau_cfg =
        PlateauConfig { factor: cfg.plateau_factor, patience: cfg.plateau_patience, ..PlateauConfig::default() };
    let mut plateau = ReduceLrOnPlateau::new(plateau_cfg, cfg.lr)?;
    let mut early = EarlyStopping::new(Mode::Min, cfg.early_stop_patience.max(1), 0.0)?;
    let mut state = State {
        kind: "finetune".into(),
        epochs_done: 0,
        lr: cfg.lr,
        best: None,
        best_epoch: 0,
        stopped: false,
        history: Vec::new(),
        weights: String::new(),
        best_weights: String::new(),
    };
    let resumed_after = resumed.as_ref().map(|s| s.epochs_done);
    if let Some(s) = resumed {
        // Rebuild the scheduler and early stopping exactly by replaying the validation losses.
        for line in &s.history {
            let v = line["val_loss"].as_f64().unwrap_or(f64::INFINITY);
            plateau.step(v)?;
            early.step(v)?;
        }
        opt.set_lr(s.lr)?;
        state = s;
    }

    std::fs::create_dir_all(&cfg.out_dir).map_err(TrainError::io(&cfg.out_dir))?;
    std::fs::create_dir_all(&cfg.scratch_dir).map_err(TrainError::io(&cfg.scratch_dir))?;
    let model_path = cfg.out_dir.join("model.safetensors");
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    let first = state.epochs_done + 1;
    let batches = train.batches_per_epoch();
    progress(TrainEvent::Start { first_epoch: first, epochs: cfg.epochs, batches });
    let mut epochs_run = 0;
    for epoch in first..=cfg.epochs {
        if state.stopped {
            break;
        }
        let lr = opt.lr();
        let start = Instant::now();
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        for (i, batch) in train.epoch(epoch as u64).enumerate() {
            let batch = batch?;
            let n = batch.labels.len();
            let x = to_tensor(batch.view1, batch.shape, device)?;
            let logits = autocast(cfg.precision, || clf.logits(&x, true))?;
            let loss = clf.loss(&logits, &batch.labels)?;
            let value = finite(loss.to_scalar::<f32>()? as f64, epoch, i)?;
            let grads = loss.backward()?;
            opt.step(&grads).map_err(|e| step_err(e, epoch, i))?;
            loss_sum += value * n as f64;
            seen += n;
            progress(TrainEvent::Batch { epoch, batch: i, batches, loss: value });
        }
        let elapsed = start.elapsed().as_secs_f64();
        let train_loss = loss_sum / seen.max(1) as f64;
        let (val_loss, val_accuracy) = validate(&clf, &val, device, epoch)?;
        plateau.step_optimizer(val_loss, opt.as_mut())?;
        let stop = early.step(val_loss)?;
        if state.best.is_none_or(|b| val_loss < b) {
            // The best model is this epoch's checkpoint (the whole model either way), written once below rather
            // than twice: file writes were about a sixth of a small fine-tune's CPU samples (perf).
            state.best_weights = checkpoint::weights_name(epoch);
            state.best = Some(val_loss);
            state.best_epoch = epoch;
        }
        let line = serde_json::json!({
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": lr,
            "images_per_s": seen as f64 / elapsed.max(1e-9),
        });
        state.history.push(line.clone());
        state.epochs_done = epoch;
        state.lr = opt.lr();
        state.stopped = stop;
        state.weights = checkpoint::weights_name(epoch);
        checkpoint::save(&cfg.scratch_dir, &varmap, &state)?;
        epochs_run += 1;
        progress(TrainEvent::Epoch { epoch, line });
        if stop {
            progress(TrainEvent::EarlyStop { epoch });
        }
    }
    write_jsonl(&metrics_path, &state.history)?;
    checkpoint::publish(&cfg.scratch_dir.join(&state.best_weights), &model_path)?;
    Ok(FinetuneOutcome {
        epochs_done: state.epochs_done,
        epochs_run,
        resumed_after,
        best_epoch: state.best_epoch,
        best_val_loss: state.best.unwrap_or(f64::NAN),
        stopped_early: state.stopped,
        model: model_path,
        metrics: metrics_path,
    })
}

/// The epoch log, rewritten whole (atomically) from the history each epoch, so a resumed run never
/// duplicates or loses lines.
pub(crate) fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}
