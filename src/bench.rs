//! Training-step throughput on synthetic input (`mpcs bench train`, and benches/train_step.rs):
//! a torchvision ResNet with a 10-class `fc`, cross-entropy, the project's Adam; per step the
//! forward, backward and optimiser times. Synthetic data keeps the figure about the model alone
//! (the loader has its own row in benches/train_step.rs).

use std::io::Write;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::nn::{autocast, trainable_vars, Arch, Dilation, Encoder, NnError, Precision};
use crate::optim::{Adam, AdamConfig, OptimError, Optimizer};

/// Errors of the benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Options(String),
    #[error("bench: building or running the model failed: {0}")]
    Nn(Box<NnError>),
    #[error("bench: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("bench: optimiser step failed: {0}")]
    Optim(#[from] OptimError),
    #[error("bench: cannot write the report: {0}")]
    Io(#[from] std::io::Error),
}

impl From<NnError> for BenchError {
    fn from(e: NnError) -> Self {
        BenchError::Nn(Box::new(e))
    }
}

/// What to run: `mpcs bench train --arch resnet18 --size 64 --batch 16 --steps 5 --threads 1`.
#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    pub arch: Arch,
    /// Square input side in pixels.
    pub size: usize,
    pub batch: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub steps: usize,
    pub warmup: usize,
    /// CPU threads for candle and GEMM (sets RAYON_NUM_THREADS for this process); None keeps the
    /// environment's setting.
    pub threads: Option<usize>,
    /// Where the model runs (`Device::Cpu`, or a CUDA device with the `cuda` feature).
    pub device: Device,
    /// The forward pass's convolutions and linear layers in f32 or bf16 (`nn::precision`).
    pub precision: Precision,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        Self {
            arch: Arch::ResNet18,
            size: 64,
            batch: 16,
            steps: 5,
            warmup: 1,
            threads: None,
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }
}

impl TrainBenchOptions {
    fn validate(&self) -> Result<(), BenchError> {
        if self.batch < 2 {
            return Err(BenchError::Options(format!(
                "--batch {} is too small: batch-norm in training mode needs at least 2",
                self.batch
            )));
        }
        if self.size < 32 {
            return Err(BenchError::Options(format!(
                "--size {} is too small (the encoders downsample 32×); use 32 or more",
                self.size
            )));
        }
        if self.steps == 0 {
            return Err(BenchError::Options("--steps must be at least 1".into()));
        }
        if self.threads == Some(0) {
            return Err(BenchError::Options("--threads must be at least 1".into()));
        }
        Ok(())
    }
}

/// The CPU model and the kernel families its training steps run, so a figure can be read beside others:
/// `cpu: Intel Xeon; kernels: GEMM AVX-512, lane convolutions AVX-512`. The `gemm` crate picks its 512-bit kernels
/// at run time where the CPU has AVX-512F (its `x86-v4` feature is on); the batch-in-lanes convolutions too, for
/// runs of adjacent output positions (see `nn::conv::lanes`), unless `MPCS_NN_LANES` says otherwise.
pub fn cpu_report() -> String {
    use crate::nn::conv::{lane_kernels, LaneKernels};
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    #[cfg(target_arch = "x86_64")]
    let (fma, avx512) =
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"), is_x86_feature_detected!("avx512f"));
    #[cfg(not(target_arch = "x86_64"))]
    let (fma, avx512) = (false, false);
    let gemm = match (fma, avx512) {
        (_, true) => "AVX-512",
        (true, false) => "AVX2+FMA",
        (false, false) => "scalar",
    };
    let lanes = match lane_kernels() {
        Some(LaneKernels::Avx512) => "AVX-512",
        Some(LaneKernels::Avx2) => "AVX2+FMA",
        None if fma => "off (MPCS_NN_LANES=0)",
        None => "off (no AVX2+FMA)",
    };
    let family = if crate::nn::fast_paths_enabled() {
        format!("GEMM {gemm}, lane convolutions {lanes}")
    } else {
        "candle's own ops (MPCS_NN_REFERENCE)".into()
    };
    format!("cpu: {model}; kernels: {family}")
}

/// Seconds spent in each phase of one training step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimes {
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

impl StepTimes {
    pub fn total_s(&self) -> f64 {
        self.forward_s + self.backward_s + self.optimizer_s
    }
}

const CLASSES: usize = 10;

/// A model with a 10-class head, its Adam, a random batch and labels.
struct Setup {
    model: Encoder,
    precision: Precision,
    opt: Adam,
    x: Tensor,
    labels: Tensor,
}

fn setup(opts: &TrainBenchOptions) -> Result<Setup, BenchError> {
    opts.validate()?;
    if let Some(t) = opts.threads {
        // candle reads the thread count from this variable at every op, gemm through candle's value.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let dev = opts.device.clone();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = Encoder::new(opts.arch, vb, Some(CLASSES), Dilation::None)?;
    let opt = Adam::new(trainable_vars(&varmap, ""), AdamConfig::default())?;
    let x = Tensor::randn(0f32, 1f32, (opts.batch, 3, opts.size, opts.size), &dev)?;
    let labels =
        Tensor::from_vec((0..opts.batch as u32).map(|i| i % CLASSES as u32).collect::<Vec<_>>(), opts.batch, &dev)?;
    Ok(Setup { model, precision: opts.precision, opt, x, labels })
}

fn step(s: &mut Setup) -> Result<StepTimes, BenchError> {
    let t0 = Instant::now();
    let logits = autocast(s.precision, || s.model.forward_t(&s.x, true))?;
    let loss = candle_nn::loss::cross_entropy(&logits, &s.labels)?;
    // Reading the loss forces nothing extra on the CPU (ops are eager) but checks it is finite.
    let value = loss.to_scalar::<f32>()?;
    if !value.is_finite() {
        return Err(BenchError::Options(format!("the loss became {value}; the model diverged")));
    }
    let t1 = Instant::now();
    let grads = loss.backward()?;
    // A GPU runs asynchronously: wait for its work so each phase is timed (a no-op on the CPU).
    s.x.device().synchronize()?;
    let t2 = Instant::now();
    s.opt.step(&grads)?;
    drop(grads);
    s.x.device().synchronize()?;
    let t3 = Instant::now();
    Ok(StepTimes {
        forward_s: (t1 - t0).as_secs_f64(),
        backward_s: (t2 - t1).as_secs_f64(),
        optimizer_s: (t3 - t2).as_secs_f64(),
    })
}

/// Runs `warmup` then `steps` training steps and returns the timed ones.
pub fn measure_train_steps(opts: &TrainBenchOptions) -> Result<Vec<StepTimes>, BenchError> {
    let mut s = setup(opts)?;
    for _ in 0..opts.warmup {
        step(&mut s)?;
    }
    (0..opts.steps).map(|_| step(&mut s)).collect()
}

/// Seconds per batch of forward-only inference (eval mode, no graph kept), averaged over `steps`.
pub fn measure_inference(opts: &TrainBenchOptions) -> Result<f64, BenchError> {
    let s = setup(opts)?;
    let run = || -> Result<(), BenchError> {
        let y = crate::nn::no_grad(|| s.model.forward_t(&s.x, false))?;
        y.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    for _ in 0..opts.warmup {
        run()?;
    }
    let t = Instant::now();
    for _ in 0..opts.steps {
        run()?;
    }
    Ok(t.elapsed().as_secs_f64() / opts.steps as f64)
}

/// `mpcs bench train`: one line per timed step, then a summary; the LAST line is exactly
/// `images_per_s=<number>` (training images per second over the timed steps). Returns that number.
pub fn train_bench(opts: &TrainBenchOptions, out: &mut dyn Write) -> Result<f64, BenchError> {
    let mut s = setup(opts)?;
    writeln!(out, "{}", cpu_report())?;
    writeln!(
        out,
        "bench train: {} {}x{} batch {} {} on {}, {} CPU thread(s), {} warm-up + {} timed step(s), Adam",
        opts.arch,
        opts.size,
        opts.size,
        opts.batch,
        opts.precision.name(),
        if opts.device.is_cpu() { "the CPU".to_string() } else { format!("{:?}", opts.device.location()) },
        candle_core::utils::get_num_threads(),
        opts.warmup,
        opts.steps
    )?;
    for i in 0..opts.warmup {
        let t = step(&mut s)?;
        writeln!(out, "warm-up {}: {:.1} ms", i + 1, t.total_s() * 1e3)?;
    }
    let mut total = StepTimes::default();
    for i in 0..opts.steps {
        let t = step(&mut s)?;
        writeln!(
            out,
            "step {}: forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms, {:.1} images/s",
            i + 1,
            t.forward_s * 1e3,
            t.backward_s * 1e3,
            t.optimizer_s * 1e3,
            opts.batch as f64 / t.total_s()
        )?;
        total.forward_s += t.forward_s;
        total.backward_s += t.backward_s;
        total.optimizer_s += t.optimizer_s;
    }
    let n = opts.steps as f64;
    let images_per_s = opts.batch as f64 * n / total.total_s();
    writeln!(
        out,
        "mean: forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms",
        total.forward_s / n * 1e3,
        total.backward_s / n * 1e3,
        total.optimizer_s / n * 1e3
    )?;
    writeln!(out, "images_per_s={images_per_s:.2}")?;
    Ok(images_per_s)
}

/// What to run: `mpcs bench loader --size 224 --batch 64 --threads 16`.
#[derive(Clone, Debug)]
pub struct LoaderBenchOptions {
    /// Square output side in pixels (the stored images have this size, as the pretraining stage stores them).
    pub size: usize,
    pub batch: usize,
    /// Loader worker threads.
    pub threads: usize,
    /// Batches timed per configuration (after one untimed batch).
    pub batches: usize,
}

/// `mpcs bench loader`: images/s the training loader delivers with the MPCS pretraining augmentation
/// (ColorJitter, Flip, Rotate, Affine, Resize), as MPCS pairs (two views per sample, pretraining)
/// and as single views (fine-tuning), through the same prefetching [`crate::loader::Loader`] the
/// stages use. Put the figure beside `mpcs bench train`'s on the same machine: the loader keeps a
/// device fed when it delivers more images/s than the training step consumes. The LAST line is
/// `images_per_s=<number>` for the pairs. Synthetic texture stands in for tissue: the transforms'
/// cost depends on the image size, not its content.
pub fn loader_bench(opts: &LoaderBenchOptions, out: &mut dyn Write) -> Result<f64, BenchError> {
    use crate::loader::{AugmentConfig, ImageStore, Loader, LoaderConfig, Rgb8, Sample, Source};
    use std::sync::Arc;
    if opts.size < 8 || opts.batch == 0 || opts.threads == 0 || opts.batches == 0 {
        return Err(BenchError::Options("--size must be at least 8, --batch, --threads and --steps at least 1".into()));
    }
    writeln!(out, "{}", cpu_report())?;
    // One epoch of `batches` + 1 full batches (the first untimed), four magnifications per region;
    // the images repeat a few textures (content does not change the cost).
    let regions = opts.batch * (opts.batches + 1);
    let side = opts.size;
    let textures: Vec<Rgb8> = (0..7)
        .map(|i| {
            let data = (0..side * side * 3)
                .map(|j| {
                    let (p, c) = (j / 3, j % 3);
                    let (x, y) = (p % side, p / side);
                    ((x * (3 + c) + y * (5 + i) + (x * y) % (11 + c)) % 256) as u8
                })
                .collect();
            Rgb8::from_raw(side, side, data).expect("size matches")
        })
        .collect();
    let images: Vec<Rgb8> = (0..4 * regions).map(|i| textures[i % textures.len()].clone()).collect();
    let store = Arc::new(ImageStore::from_images((0..images.len()).map(|i| i.to_string()).collect(), images));
    let mut pairs_per_s = 0.0;
    for paired in [false, true] {
        let samples: Vec<Sample> = if paired {
            (0..regions)
                .map(|r| Sample {
                    source: Source::Region {
                        images: [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3],
                        mode: crate::loader::PairMode::Ordered,
                    },
                    label: 0,
                })
                .collect()
        } else {
            (0..regions).map(|i| Sample { source: Source::Image(i), label: 0 }).collect()
        };
        let mut cfg = LoaderConfig::new(opts.batch, 7, AugmentConfig::mpcs_pretrain(opts.size));
        cfg.threads = opts.threads;
        let loader = Loader::new(store.clone(), samples, cfg).map_err(|e| BenchError::Options(e.to_string()))?;
        let views_of = |b: &crate::loader::Batch| b.shape[0] * if b.view2.is_some() { 2 } else { 1 };
        let (mut views, mut timed) = (0usize, 0usize);
        let mut start = Instant::now();
        for (i, b) in loader.epoch(0).enumerate() {
            let b = b.map_err(|e| BenchError::Options(e.to_string()))?;
            if i == 0 {
                start = Instant::now();
            } else {
                views += views_of(&b);
                timed += 1;
            }
        }
        let per_s = views as f64 / start.elapsed().as_secs_f64();
        let kind = if paired { "MPCS pairs (OP), 2 views per sample" } else { "single views" };
        writeln!(
            out,
            "loader {side}x{side} batch {} {kind}, {} thread(s), {timed} batches: {per_s:.1} images/s",
            opts.batch, opts.threads
        )?;
        if paired {
            pairs_per_s = per_s;
        }
    }
    writeln!(out, "images_per_s={pairs_per_s:.1}")?;
    Ok(pairs_per_s)
}
