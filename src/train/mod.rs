//! Training loops on top of `nn`, `optim` and `loader` (METHOD.md, "Fine-tuning and evaluation" and
//! "Self-supervised pretraining"), as plain library functions for the runner's stages:
//!
//! - [`finetune`]: a supervised classifier on one fold portion (Adam, ReduceLROnPlateau on the validation
//!   loss, early stopping), keeping the best-validation-loss model as `model.safetensors` (torchvision names);
//! - [`evaluate`]: that model on the test portion → `metrics.json` and `predictions.csv`;
//! - [`pretrain`]: MPCS contrastive pretraining on the regions of the training patients → `backbone.safetensors`.
//!
//! Both training loops checkpoint into a caller-given scratch folder after every epoch and resume from it (from
//! the previous checkpoint, or from scratch, when the newest cannot be read: see `checkpoint`).
//! What a checkpoint holds: every model variable (BatchNorm buffers included), the epoch history (so the
//! plateau scheduler and early stopping are rebuilt exactly by replaying it) and the learning rate. Adam's
//! moment estimates are NOT saved: a resumed run restarts them from zero, so it is close to, not bit-identical
//! with, an uninterrupted one.

mod checkpoint;
mod error;
mod evaluate;
mod finetune;
mod fold;
mod pretrain;

pub use error::{Result, TrainError};
pub use evaluate::{evaluate, EvalConfig, EvalOutcome};
pub use finetune::{finetune, FinetuneConfig, FinetuneOutcome, Init, Objective, OptimizerKind};
pub use fold::{expand_patches, read_fold, select, FoldRow, LabelColumn};
pub use pretrain::{portion_regions, pretrain, PretrainConfig, PretrainOutcome, PAPER_BUCKETS};

use candle_core::{Device, Tensor};

/// Progress reported while training (for logs and progress bars).
#[derive(Clone, Debug, PartialEq)]
pub enum TrainEvent {
    /// Starting (or resuming at) `first_epoch` of `epochs`, `batches` batches per epoch.
    Start { first_epoch: usize, epochs: usize, batches: usize },
    /// A training batch finished.
    Batch { epoch: usize, batch: usize, batches: usize, loss: f64 },
    /// An epoch finished; `line` is what was written to the epoch log.
    Epoch { epoch: usize, line: serde_json::Value },
    /// Early stopping ended training after `epoch`.
    EarlyStop { epoch: usize },
    /// Something the user should know that does not stop training (a damaged checkpoint set aside).
    Warning { message: String },
}

/// An (N, 3, H, W) f32 tensor from a loader buffer.
pub(crate) fn to_tensor(data: Vec<f32>, shape: [usize; 4], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape.to_vec(), device)?)
}

/// Writes `bytes` to `path` atomically ([`crate::fsutil::write_atomic`]); the folder must exist.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    crate::fsutil::write_atomic(path, bytes).map_err(TrainError::io(path))
}

/// Checks a loss value, turning NaN/inf into the error that names the epoch.
pub(crate) fn finite(value: f64, epoch: usize, batch: usize) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(TrainError::NonFiniteLoss { epoch, batch, value })
    }
}

/// Maps an optimiser's non-finite-gradient refusal to the same error as a non-finite loss.
pub(crate) fn step_err(e: crate::optim::OptimError, epoch: usize, batch: usize) -> TrainError {
    match e {
        crate::optim::OptimError::NonFiniteGrad { .. } => TrainError::NonFiniteLoss { epoch, batch, value: f64::NAN },
        e => TrainError::from(e),
    }
}

/// Re-initialises every variable of `varmap` from `seed`, so a run is reproducible (candle's own CPU
/// initialisation cannot be seeded). torchvision's scheme: convolution weights kaiming-normal with fan-out and
/// ReLU gain (std √(2/fan_out)), linear weights uniform ±1/√fan_in, biases 0, BatchNorm γ 1 (its running
/// statistics are buffers and already deterministic). Each variable draws from its own stream derived from the
/// seed and its name, so the result does not depend on the order of the map.
pub fn seeded_init(varmap: &candle_nn::VarMap, seed: u64) -> Result<()> {
    use crate::split::SplitMix64;
    let data = varmap.data().lock().map_err(|_| TrainError::Config("variable map lock poisoned".into()))?;
    for (name, var) in data.iter() {
        if name.contains("running_") || name.ends_with("num_batches_tracked") {
            continue;
        }
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let name_hash = blake3::hash(name.as_bytes());
        let mut stream = [0u8; 8];
        stream.copy_from_slice(&name_hash.as_bytes()[..8]);
        let mut rng = SplitMix64::new(seed ^ u64::from_le_bytes(stream));
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let values: Vec<f32> = match dims.len() {
            4 => {
                let std = (2.0 / (dims[0] * dims[2] * dims[3]) as f64).sqrt();
                (0..n)
                    .map(|_| {
                        // Box-Muller.
                        let (u1, u2) = (uniform().max(f64::MIN_POSITIVE), uniform());
                        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                    })
                    .collect()
            }
            2 => {
                let bound = 1.0 / (dims[1] as f64).sqrt();
                (0..n).map(|_| ((2.0 * uniform() - 1.0) * bound) as f32).collect()
            }
            _ if name.ends_with("bias") => vec![0.0; n],
            _ if name.ends_with("weight") => vec![1.0; n],
            _ => continue,
        };
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
