//! MPCS self-supervised pretraining (METHOD.md, "Self-supervised pretraining"): the regions (a sequence number
//! present at all four magnifications) of the training portion's patients, two magnification views per region
//! (pair mode FP/OP/RP), encoder + `Projector` (feature_dim → hidden → 128), `mpcs_loss` with τ = 0.1, Adam.
//! The encoder with the lowest epoch loss is kept as `backbone.safetensors` (torchvision names, no fc).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use super::checkpoint::{self, State};
use super::error::{Result, TrainError};
use super::finetune::write_jsonl;
use super::fold::{read_fold, select, FoldRow};
use super::{finite, step_err, to_tensor, TrainEvent};
use crate::data::breakhis::{regions_at_all_magnifications, ImageName, Region, Subtype};
use crate::data::{Dataset, ImageRecord};
use crate::loader::{region_samples, AugmentConfig, ImageStore, Loader, LoaderConfig, Normalize, PairMode};
use crate::nn::{autocast, mpcs_loss, weights, Arch, Dilation, Encoder, Precision, Projector};
use crate::optim::{Adam, AdamConfig, Optimizer, PlateauConfig, ReduceLrOnPlateau};

/// The epochs whose best-so-far backbone the paper's code keeps.
pub const PAPER_BUCKETS: [usize; 7] = [100, 200, 300, 400, 500, 800, 1000];

#[derive(Clone, Debug)]
pub struct PretrainConfig {
    pub data_root: PathBuf,
    pub fold_csv: PathBuf,
    /// The portion whose patients are pretrained on (all four magnifications of each).
    pub portion: String,
    pub pair_mode: PairMode,
    pub arch: Arch,
    /// Optional starting weights for the encoder (e.g. ImageNet); `fc` ignored.
    pub init: Option<PathBuf>,
    /// Projector hidden width (the paper: 1024 for ResNet-50); output is 128.
    pub projector_hidden: usize,
    pub temperature: f64,
    pub image_size: usize,
    pub batch_size: usize,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// ReduceLROnPlateau on the epoch loss (the paper: factor 0.1, patience 50).
    pub plateau_patience: usize,
    /// Epochs at which the best backbone so far is also kept as `buckets/epoch_<n>.safetensors` (METHOD.md:
    /// 100, 200, 300, 400, 500, 800, 1000), so fine-tuning can start from a shorter pretraining.
    pub buckets: Vec<usize>,
    pub seed: u64,
    /// The convolutions and linear layers in bf16 or f32 (`nn::precision`); the paper: f32.
    pub precision: Precision,
    pub threads: usize,
    /// Where `backbone.safetensors` and `loss.jsonl` go.
    pub out_dir: PathBuf,
    pub scratch_dir: PathBuf,
    pub device: Device,
}

impl PretrainConfig {
    /// The paper's settings (Adam lr 1e-5, weight decay 1e-6, τ 0.1, OP pairs, batch 14, portion train_60)
    /// scaled down to resnet18 at 64×64 with a 512 → 256 → 128 projector and 100 epochs.
    pub fn new(data_root: &Path, fold_csv: &Path, out_dir: &Path, scratch_dir: &Path) -> PretrainConfig {
        PretrainConfig {
            data_root: data_root.to_path_buf(),
            fold_csv: fold_csv.to_path_buf(),
            portion: "train_60".into(),
            pair_mode: PairMode::Ordered,
            arch: Arch::ResNet18,
            init: None,
            projector_hidden: 256,
            temperature: crate::nn::TEMPERATURE,
            image_size: 64,
            batch_size: 14,
            epochs: 100,
            lr: 1e-5,
            weight_decay: 1e-6,
            plateau_patience: 50,
            buckets: PAPER_BUCKETS.to_vec(),
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
pub struct PretrainOutcome {
    pub regions: usize,
    pub epochs_done: usize,
    pub epochs_run: usize,
    pub resumed_after: Option<usize>,
    pub best_epoch: usize,
    pub best_loss: f64,
    pub backbone: PathBuf,
    /// (epoch, file) of every bucket reached.
    pub buckets: Vec<(usize, PathBuf)>,
    pub losses: PathBuf,
}

/// Dataset records for the fold rows whose names parse as BreakHis images (the region finder needs the
/// sequence number and subtype).
fn records(rows: &[FoldRow]) -> Vec<ImageRecord> {
    rows.iter()
        .filter_map(|r| {
            let base = r.file.rsplit('/').next()?;
            let name = ImageName::parse(base)?;
            let st = Subtype::by_code(&r.subtype).or_else(|| Subtype::by_code(&name.subtype))?;
            Some(ImageRecord {
                rel_path: r.file.clone(),
                dataset: Dataset::BreakHis,
                label: r.label,
                class_name: r.class.clone(),
                subtype: Some(st.code.to_string()),
                subtype_label: Some(st.subtype_label),
                patient: Some(r.patient.clone()),
                batch: None,
                magnification: Some(name.magnification),
                seq: Some(name.seq),
            })
        })
        .collect()
}

/// The regions of `portion` in a fold manifest.
pub fn portion_regions(fold_csv: &Path, portion: &str) -> Result<Vec<Region>> {
    let rows = read_fold(fold_csv)?;
    let rows = select(&rows, portion, None, fold_csv)?;
    let regions = regions_at_all_magnifications(&records(&rows));
    if regions.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: portion '{portion}' has no region imaged at all four magnifications (40X, 100X, 200X, 400X); \
             MPCS pretraining needs BreakHis images at every magnification",
            fold_csv.display()
        )));
    }
    Ok(regions)
}

/// Pretrains an encoder with MPCS; see the module documentation. Resumes from `cfg.scratch_dir`.
///
/// Batches are shuffled with `drop_last` (the contrastive loss needs full batches of negatives), so the
/// portion must hold at least `batch_size` regions, and `batch_size` must be at least 2.
pub fn pretrain(cfg: &PretrainConfig, progress: &dyn Fn(TrainEvent)) -> Result<PretrainOutcome> {
    if cfg.batch_size < 2 {
        return Err(TrainError::Config(format!(
            "batch_size {} is too small for a contrastive loss; use at least 2",
            cfg.batch_size
        )));
    }
    if cfg.epochs == 0 || cfg.image_size < 16 || !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(TrainError::Config(format!(
            "epochs ({}) must be >= 1, image_size ({}) >= 16 and lr ({}) > 0",
            cfg.epochs, cfg.image_size, cfg.lr
        )));
    }
    let regions = portion_regions(&cfg.fold_csv, &cfg.portion)?;
    if regions.len() < cfg.batch_size {
        return Err(TrainError::Config(format!(
            "batch_size {} exceeds the {} regions of portion '{}' (batches are full, drop_last); lower batch_size",
            cfg.batch_size,
            regions.len(),
            cfg.portion
        )));
    }
    let (paths, samples) = region_samples(&cfg.data_root, &regions, cfg.pair_mode);
    let side = cfg.image_size as u32;
    let store = Arc::new(ImageStore::build(&paths, Some((side, side)))?);
    let lc = LoaderConfig {
        drop_last: true,
        threads: cfg.threads,
        normalize: Normalize::None,
        ..LoaderConfig::new(cfg.batch_size, cfg.seed, AugmentConfig::mpcs_pretrain(cfg.image_size))
    };
    let loader = Loader::new(store, samples, lc)?;

    let device = &cfg.device;
    let varmap = VarMap::new();
    let vb = super::deferred_init_builder(&varmap, device);
    let encoder = Encoder::new(cfg.arch, vb.pp("encoder"), None, Dilation::None)?;
    let projector = Projector::new(vb.pp("projector"), encoder.feature_dim(), cfg.projector_hidden, 128)?;
    super::seeded_init(&varmap, cfg.seed)?;
    if let Some(path) = &cfg.init {
        let opts = weights::LoadOptions { ignore_fc: true, prefix: "encoder.".into(), ..Default::default() };
        weights::load_into_with(&varmap, path, &opts)?;
    }
    let warn = |message: String| progress(TrainEvent::Warning { message });
    let bucket_name = |e: usize| format!("buckets/epoch_{e}.safetensors");
    // A state relies on the buckets it has passed: they are published from the scratch folder at the end.
    let buckets_of = |s: &State| -> Vec<PathBuf> {
        cfg.buckets.iter().filter(|&&e| e <= s.epochs_done).map(|&e| cfg.scratch_dir.join(bucket_name(e))).collect()
    };
    let resumed = checkpoint::load(&cfg.scratch_dir, "pretrain", &varmap, &buckets_of, &warn)?;
    let mut opt = Adam::new(
        weights::trainable_vars(&varmap, ""),
        AdamConfig { lr: cfg.lr, weight_decay: cfg.weight_decay, ..AdamConfig::default() },
    )?;
    let mut plateau =
        ReduceLrOnPlateau::new(PlateauConfig { patience: cfg.plateau_patience, ..PlateauConfig::default() }, cfg.lr)?;
    let resumed_after = resumed.as_ref().map(|s| s.epochs_done);
    let mut state = match resumed {
        Some(s) => {
            for line in &s.history {
                plateau.step(line["loss"].as_f64().unwrap_or(f64::INFINITY))?;
            }
            opt.set_lr(s.lr)?;
            s
        }
        None => State {
            kind: "pretrain".into(),
            epochs_done: 0,
            lr: cfg.lr,
            best: None,
            best_epoch: 0,
            stopped: false,
            history: Vec::new(),
            weights: String::new(),
            best_weights: String::new(),
        },
    };

    std::fs::create_dir_all(&cfg.out_dir).map_err(TrainError::io(&cfg.out_dir))?;
    std::fs::create_dir_all(cfg.scratch_dir.join("buckets")).map_err(TrainError::io(&cfg.scratch_dir))?;
    let backbone = cfg.out_dir.join("backbone.safetensors");
    let losses = cfg.out_dir.join("loss.jsonl");
    let batches = loader.batches_per_epoch();
    progress(TrainEvent::Start { first_epoch: state.epochs_done + 1, epochs: cfg.epochs, batches });
    let mut epochs_run = 0;
    for epoch in state.epochs_done + 1..=cfg.epochs {
        let lr = opt.lr();
        let start = Instant::now();
        let (mut sum, mut count, mut seen) = (0.0f64, 0usize, 0usize);
        for (i, batch) in loader.epoch(epoch as u64).enumerate() {
            let batch = batch?;
            let b = batch.labels.len();
            let v2 = batch.view2.ok_or_else(|| TrainError::Config("pretraining batch without a second view".into()))?;
            // Both views through the encoder as one batch of 2B, as the reference code does.
            let x =
                Tensor::cat(&[to_tensor(batch.view1, batch.shape, device)?, to_tensor(v2, batch.shape, device)?], 0)?;
            let z = autocast(cfg.precision, || projector.forward_t(&encoder.features_t(&x, true)?, true))?;
            let f = Tensor::stack(&[z.narrow(0, 0, b)?, z.narrow(0, b, b)?], 1)?;
            let loss = mpcs_loss(&f, cfg.temperature)?;
            let value = finite(loss.to_scalar::<f32>()? as f64, epoch, i)?;
            let grads = loss.backward()?;
            opt.step(&grads).map_err(|e| step_err(e, epoch, i))?;
            sum += value;
            count += 1;
            seen += b;
            progress(TrainEvent::Batch { epoch, batch: i, batches, loss: value });
        }
        let epoch_loss = sum / count.max(1) as f64;
        let elapsed = start.elapsed().as_secs_f64();
        plateau.step_optimizer(epoch_loss, &mut opt)?;
        if state.best.is_none_or(|b| epoch_loss < b) {
            state.best_weights = checkpoint::best_name(epoch);
            weights::save_with(&varmap, &cfg.scratch_dir.join(&state.best_weights), "encoder.")?;
            state.best = Some(epoch_loss);
            state.best_epoch = epoch;
        }
        if cfg.buckets.contains(&epoch) {
            checkpoint::publish(&cfg.scratch_dir.join(&state.best_weights), &cfg.scratch_dir.join(bucket_name(epoch)))?;
        }
        let line = serde_json::json!({
            "epoch": epoch,
            "loss": epoch_loss,
            "lr": lr,
            "images_per_s": 2.0 * seen as f64 / elapsed.max(1e-9),
        });
        state.history.push(line.clone());
        state.epochs_done = epoch;
        state.lr = opt.lr();
        state.weights = checkpoint::weights_name(epoch);
        checkpoint::save(&cfg.scratch_dir, &varmap, &state)?;
        epochs_run += 1;
        progress(TrainEvent::Epoch { epoch, line });
    }
    write_jsonl(&losses, &state.history)?;
    checkpoint::publish(&cfg.scratch_dir.join(&state.best_weights), &backbone)?;
    let mut buckets = Vec::new();
    for &e in cfg.buckets.iter().filter(|&&e| e <= state.epochs_done) {
        let to = cfg.out_dir.join(bucket_name(e));
        checkpoint::publish(&cfg.scratch_dir.join(bucket_name(e)), &to)?;
        buckets.push((e, to));
    }
    Ok(PretrainOutcome {
        regions: regions.len(),
        epochs_done: state.epochs_done,
        epochs_run,
        resumed_after,
        best_epoch: state.best_epoch,
        best_loss: state.best.unwrap_or(f64::NAN),
        backbone,
        buckets,
        losses,
    })
}
