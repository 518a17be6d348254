//! CPU training and inference throughput, with a per-phase and per-layer breakdown (issue 4).
//!
//!   cargo bench --bench train_step                 # 1 thread
//!   BENCH_THREADS=1,2 cargo bench --bench train_step
//!   MPCS_NN_REFERENCE=1 cargo bench --bench train_step   # candle's own ops: the "before" figures
//!
//! Peer: scripts/bench/bench_torch.py prints the same rows for PyTorch. Each configuration runs
//! in a child process (this binary re-run with `--child <job>`) so that its peak resident memory
//! (VmHWM) is its own. Rows:
//! - train step (forward, backward, Adam step) of ResNet-18 at 64×64, ResNet-50 at 224×224 and
//!   EfficientNet-b2 at 128×128 (`train-b2`: depthwise convolutions, SE blocks, swish), batch 16:
//!   images/s and ms per phase;
//! - forward-only inference (eval mode) of the same;
//! - single layers at ResNet-50 shapes, batch 16: 3×3 conv 64→64 at 56×56, 1×1 conv 256→64 at
//!   56×56, the 7×7/s2 stem on 224×224, max-pool 3×3/s2/p1 on 64×112×112; forward and forward+backward;
//! - every convolution shape of ResNet-18 at 64×64 as inference runs it (`convs-r18`);
//! - the data pipeline: PNGs decoded once into an ImageStore, then MPCS augmentation and batching.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use mpcs::bench::{measure_inference, measure_train_steps, TrainBenchOptions};
use mpcs::loader::{geometry, AugmentConfig, ImageStore, Loader, LoaderConfig, Rgb8, Sample, Source};
use mpcs::nn::{conv::conv2d, pool::max_pool2d_padded, Arch};

// The allocator the `mpcs` binary uses too (src/main.rs): fewer page faults on the large
// per-op activation buffers than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Peak resident memory of this process in MB (Linux), or 0 where unknown.
fn peak_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn opts(arch: Arch, size: usize, steps: usize) -> TrainBenchOptions {
    TrainBenchOptions { arch, size, batch: BATCH, steps, ..Default::default() }
}

fn train(arch: Arch, size: usize, steps: usize) -> anyhow::Result<()> {
    let times = measure_train_steps(&opts(arch, size, steps))?;
    let n = times.len() as f64;
    let f = times.iter().map(|t| t.forward_s).sum::<f64>() / n;
    let b = times.iter().map(|t| t.backward_s).sum::<f64>() / n;
    let o = times.iter().map(|t| t.optimizer_s).sum::<f64>() / n;
    println!(
        "train {arch:>9} {size:3}x{size:<3} b{BATCH}: {:7.2} images/s | forward {:8.1} ms, backward {:8.1} ms, optimizer {:6.1} ms | peak {:6.0} MB",
        BATCH as f64 / (f + b + o),
        f * 1e3,
        b * 1e3,
        o * 1e3,
        peak_mb()
    );
    Ok(())
}

fn infer(arch: Arch, size: usize, steps: usize) -> anyhow::Result<()> {
    let s = measure_inference(&opts(arch, size, steps))?;
    println!(
        "infer {arch:>9} {size:3}x{size:<3} b{BATCH}: {:7.2} images/s | forward {:8.1} ms | peak {:6.0} MB",
        BATCH as f64 / s,
        s * 1e3,
        peak_mb()
    );
    Ok(())
}

/// Mean seconds of `f` over `iters` calls after one warm-up call.
fn time(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn layer(name: &str) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    // (input shape, Some(weight shape, stride, padding)) or None for the max-pool.
    type Shape4 = (usize, usize, usize, usize);
    let (x_shape, conv): (Shape4, Option<(Shape4, usize, usize)>) = match name {
        "conv3x3" => ((BATCH, 64, 56, 56), Some(((64, 64, 3, 3), 1, 1))),
        "conv1x1" => ((BATCH, 256, 56, 56), Some(((64, 256, 1, 1), 1, 0))),
        "stem" => ((BATCH, 3, 224, 224), Some(((64, 3, 7, 7), 2, 3))),
        "maxpool" => ((BATCH, 64, 112, 112), None),
        other => anyhow::bail!("unknown layer {other}"),
    };
    let x = Var::randn(0f32, 1f32, x_shape, &dev)?;
    let w = match conv {
        Some((ws, _, _)) => Some(Var::randn(0f32, 0.05f32, ws, &dev)?),
        None => None,
    };
    let run = |x: &Tensor| -> anyhow::Result<Tensor> {
        Ok(match (&w, conv) {
            (Some(w), Some((_, stride, pad))) => conv2d(x, w.as_tensor(), stride, pad, 1)?,
            _ => max_pool2d_padded(x, 3, 2, 1)?,
        })
    };
    let iters = env_usize("BENCH_LAYER_ITERS", 3);
    let fwd = time(iters, || {
        run(&x.as_tensor().detach())?;
        Ok(())
    })?;
    // The stem's input is the image: no input gradient, as in training.
    let x_bwd = if name == "stem" { x.as_tensor().detach() } else { x.as_tensor().clone() };
    let fwd_bwd = time(iters, || {
        let g = run(&x_bwd)?.backward()?;
        std::hint::black_box(g);
        Ok(())
    })?;
    println!(
        "layer {name:>8} {:?}: forward {:7.1} ms, forward+backward {:7.1} ms | peak {:6.0} MB",
        x_shape,
        fwd * 1e3,
        fwd_bwd * 1e3,
        peak_mb()
    );
    Ok(())
}

/// Every convolution shape of ResNet-18 at 64×64 (batch 16), forward only as inference runs it
/// (`no_grad`, with its evaluation-mode BatchNorm + ReLU fused): ms per call, and how many such
/// calls the network makes. `MPCS_NN_LANES=0` gives the im2col + GEMM figures for comparison.
fn r18_convs() -> anyhow::Result<()> {
    use mpcs::nn::conv::conv2d_channel_affine;
    let dev = Device::Cpu;
    // (input channels, input size, output channels, kernel, stride, padding, calls per forward)
    let shapes = [
        (3, 64, 64, 7, 2, 3, 1),
        (64, 16, 64, 3, 1, 1, 4),
        (64, 16, 128, 3, 2, 1, 1),
        (64, 16, 128, 1, 2, 0, 1),
        (128, 8, 128, 3, 1, 1, 3),
        (128, 8, 256, 3, 2, 1, 1),
        (128, 8, 256, 1, 2, 0, 1),
        (256, 4, 256, 3, 1, 1, 3),
        (256, 4, 512, 3, 2, 1, 1),
        (256, 4, 512, 1, 2, 0, 1),
        (512, 2, 512, 3, 1, 1, 3),
    ];
    let iters = env_usize("BENCH_CONV_ITERS", 100);
    let mut total = 0.0;
    for (c, size, o, k, stride, pad, calls) in shapes {
        let x = Tensor::randn(0f32, 1f32, (BATCH, c, size, size), &dev)?;
        let w = Tensor::randn(0f32, 0.05f32, (o, c, k, k), &dev)?;
        let scale = Tensor::ones(o, candle_core::DType::F32, &dev)?;
        let shift = Tensor::zeros(o, candle_core::DType::F32, &dev)?;
        let ms = 1e3
            * time(iters, || {
                mpcs::nn::no_grad(|| {
                    conv2d_channel_affine(&x, &w, stride, pad, 1, &scale, &shift, None, true)
                        .map_err(anyhow::Error::from)
                })?;
                Ok(())
            })?;
        total += ms * calls as f64;
        println!("conv  {c:3}->{o:3} {k}x{k}/s{stride} on {size:2}x{size:<2}: {ms:7.3} ms x{calls}");
    }
    println!("conv  resnet18 64x64 b{BATCH}, all convolutions: {total:7.2} ms");
    Ok(())
}

fn data(threads: usize) -> anyhow::Result<()> {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loader/breakhis_small.png");
    let img = image::open(&fixture)?.to_rgb8();
    let base = Rgb8::from_raw(img.width() as usize, img.height() as usize, img.into_raw())
        .ok_or_else(|| anyhow::anyhow!("bad fixture"))?;
    let big = geometry::resize(&base, 700, 460);
    let dir = tempfile::tempdir()?;
    let n = 32;
    let mut paths = Vec::new();
    for i in 0..n {
        let im = geometry::rotate(&big, i as f64 * 7.0, geometry::Border::Reflect101);
        let p = dir.path().join(format!("img{i:03}.png"));
        image::RgbImage::from_raw(700, 460, im.data).ok_or_else(|| anyhow::anyhow!("bad image"))?.save(&p)?;
        paths.push(p);
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    for size in [64usize, 224] {
        let t = Instant::now();
        let store = pool.install(|| ImageStore::build(&paths, Some((size as u32, size as u32))))?;
        let decode = n as f64 / t.elapsed().as_secs_f64();
        let samples: Vec<Sample> = (0..n).map(|i| Sample { source: Source::Image(i), label: 0 }).collect();
        let mut cfg = LoaderConfig::new(BATCH, 7, AugmentConfig::mpcs_pretrain(size));
        cfg.threads = threads;
        let loader = Loader::new(Arc::new(store), samples, cfg)?;
        let epochs = if size == 64 { 20 } else { 4 };
        let t = Instant::now();
        let mut images = 0usize;
        for e in 0..epochs {
            for b in loader.epoch(e) {
                images += b?.shape[0];
            }
        }
        println!(
            "data  {size:3}x{size:<3}: decode 700x460 PNG into store {decode:7.1} images/s | augment + batch {:8.1} images/s | peak {:6.0} MB",
            images as f64 / t.elapsed().as_secs_f64(),
            peak_mb()
        );
    }
    Ok(())
}

fn child(job: &str) -> anyhow::Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let r18_steps = env_usize("BENCH_R18_STEPS", 5);
    let r50_steps = env_usize("BENCH_R50_STEPS", 2);
    let b2_steps = env_usize("BENCH_B2_STEPS", 3);
    match job {
        "train-r18" => train(Arch::ResNet18, 64, r18_steps),
        "train-r50" => train(Arch::ResNet50, 224, r50_steps),
        "infer-r18" => infer(Arch::ResNet18, 64, r18_steps),
        "infer-r50" => infer(Arch::ResNet50, 224, r50_steps),
        "train-b2" => train(Arch::EfficientNetB2, 128, b2_steps),
        "infer-b2" => infer(Arch::EfficientNetB2, 128, b2_steps),
        "data" => data(threads),
        "convs-r18" => r18_convs(),
        l => layer(l),
    }
}

const JOBS: &[&str] = &[
    "conv3x3",
    "conv1x1",
    "stem",
    "maxpool",
    "convs-r18",
    "train-r18",
    "infer-r18",
    "train-r50",
    "infer-r50",
    "train-b2",
    "infer-b2",
    "data",
];

fn main() -> anyhow::Result<()> {
    if std::env::var_os("BENCH_PURGE").is_none() {
        mpcs::runtime::keep_freed_memory();
    }
    mpcs::runtime::one_cpu_thread_pool();
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let job = args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--child needs a job name"))?;
        return child(job);
    }
    let threads = std::env::var("BENCH_THREADS").unwrap_or_else(|_| "1".into());
    // A subset of jobs by name, e.g. BENCH_JOBS=train-r18,conv3x3.
    let only = std::env::var("BENCH_JOBS").ok();
    let exe = std::env::current_exe()?;
    let mode =
        if mpcs::nn::conv::fast_paths_enabled() { "fast paths" } else { "candle reference ops (MPCS_NN_REFERENCE)" };
    for t in threads.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        println!("== mpcs {mode}, {t} thread(s), batch {BATCH} ==");
        for job in JOBS.iter().filter(|j| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == **j))) {
            let status = Command::new(&exe).args(["--child", job]).env("RAYON_NUM_THREADS", t).status()?;
            if !status.success() {
                anyhow::bail!("job {job} failed with {status}");
            }
        }
    }
    Ok(())
}
