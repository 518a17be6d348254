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

/// A `VarBuilder` for a model whose weights `seeded_init` (or a weights file) sets right after it is built:
/// variables candle would fill with random numbers start as zeros instead (constant initialisations such as
/// BatchNorm's running variance of 1 are kept). Drawing random weights twice, candle's and then ours, was about a
/// quarter of the CPU samples (perf) of a one-epoch ResNet-18 fine-tune at 32 px.
pub(crate) fn deferred_init_builder(
    varmap: &candle_nn::VarMap,
    device: &candle_core::Device,
) -> candle_nn::VarBuilder<'static> {
    struct Deferred(candle_nn::VarMap);
    impl candle_nn::var_builder::SimpleBackend for Deferred {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: candle_core::DType,
            dev: &candle_core::Device,
        ) -> candle_core::Result<Tensor> {
            let init = match h {
                candle_nn::Init::Const(_) => h,
                _ => candle_nn::Init::Const(0.0),
            };
            self.0.get(s, name, init, dtype, dev)
        }

        fn get_unchecked(
            &self,
            name: &str,
            dtype: candle_core::DType,
            dev: &candle_core::Device,
        ) -> candle_core::Result<Tensor> {
            candle_nn::var_builder::SimpleBackend::get_unchecked(&self.0, name, dtype, dev)
        }

        fn contains_tensor(&self, name: &str) -> bool {
            candle_nn::var_builder::SimpleBackend::contains_tensor(&self.0, name)
        }
    }
    candle_nn::VarBuilder::from_backend(Box::new(Deferred(varmap.clone())), candle_core::DType::F32, device.clone())
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
                // Box-Muller, both of each pair's normals (one logarithm and one sin/cos per two values).
                let mut v = Vec::with_capacity(n + 1);
                while v.len() < n {
                    let (u1, u2) = (uniform().max(f64::MIN_POSITIVE), uniform());
                    let (r, (sin, cos)) = ((-2.0 * u1.ln()).sqrt() * std, (2.0 * std::f64::consts::PI * u2).sin_cos());
                    v.extend([(r * cos) as f32, (r * sin) as f32]);
                }
                v.truncate(n);
                v
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Arch, Dilation, Encoder};

    fn values(vm: &candle_nn::VarMap, name: &str) -> Vec<f32> {
        vm.data().lock().unwrap()[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// torchvision's scheme, checked on the drawn values: kaiming-normal (fan-out) convolutions, uniform ±1/√fan_in
    /// linear weights, BatchNorm γ 1 / β 0, running variance 1; the same whichever builder made the variables,
    /// reproducible from the seed and different for another seed.
    #[test]
    fn seeded_init_draws_torchvisions_scheme_whatever_the_builder() {
        let build = |deferred: bool, seed: u64| {
            let vm = candle_nn::VarMap::new();
            let vb = if deferred {
                deferred_init_builder(&vm, &Device::Cpu)
            } else {
                candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu)
            };
            Encoder::new(Arch::ResNet18, vb, Some(10), Dilation::None).unwrap();
            seeded_init(&vm, seed).unwrap();
            vm
        };
        let (a, b, c) = (build(true, 7), build(false, 7), build(true, 8));
        for name in ["layer3.0.conv1.weight", "fc.weight", "bn1.weight", "bn1.running_var", "layer1.0.bn2.bias"] {
            assert_eq!(values(&a, name), values(&b, name), "{name}");
        }
        assert_ne!(values(&a, "layer3.0.conv1.weight"), values(&c, "layer3.0.conv1.weight"));
        // layer3.0.conv1: 256 × 128 × 3 × 3, fan-out 256·9 → std √(2/2304) = 0.02946; 294 912 draws.
        let w = values(&a, "layer3.0.conv1.weight");
        let n = w.len() as f64;
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let want = (2.0f64 / 2304.0).sqrt();
        // The sample mean's standard error is want/√n; six of them is far beyond chance.
        assert!(mean.abs() < 6.0 * want / n.sqrt(), "mean {mean}");
        assert!((std / want - 1.0).abs() < 0.01, "std {std} vs {want}");
        // Normal, not uniform: about 68.3 % within one standard deviation.
        let within = w.iter().filter(|v| (**v as f64).abs() < want).count() as f64 / n;
        assert!((within - 0.6827).abs() < 0.005, "{within}");
        let fc = values(&a, "fc.weight");
        let bound = 1.0 / (512f32).sqrt();
        assert!(fc.iter().all(|v| v.abs() <= bound) && fc.iter().any(|v| v.abs() > 0.9 * bound));
        assert!(values(&a, "bn1.weight").iter().all(|&v| v == 1.0));
        assert!(values(&a, "layer1.0.bn2.bias").iter().all(|&v| v == 0.0));
        assert!(values(&a, "bn1.running_var").iter().all(|&v| v == 1.0));
        assert!(values(&a, "bn1.running_mean").iter().all(|&v| v == 0.0));
    }
}
