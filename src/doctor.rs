//! `mpcs doctor`: can this machine's training path be trusted? It lists the GPUs the machine shows (candle,
//! `nvidia-smi`, `CUDA_VISIBLE_DEVICES`) and runs one training step of a ResNet (forward, cross-entropy, backward,
//! Adam) on a reference path and a candidate path from the same weights and batch, comparing the loss, every
//! gradient, the BatchNorm running statistics and the weights after the optimiser step.
//!
//! The reference is the CPU with mpcs's fused kernels, as CPU training runs. The candidate is the GPU
//! (`--device cuda:N`), or on a machine without one, candle's own ops on the CPU: the code a GPU runs in place of
//! the fused kernels, so those fallbacks are checked even here. Both are float32. The truth is the same step in
//! float64 (candle's ops on the CPU). At random initialisation a BatchNorm channel with almost no variance in
//! the batch makes some gradients ill-conditioned: there float32 lands a few percent from the truth (measured:
//! candle's ops up to 2.7% in L2 on single tensors where the fused kernels were 1e-4 off, and the reverse), so
//! gradients are judged by their L2 distance from the truth with a 5% tolerance: wide enough for that, far below
//! what a wrong kernel gives (a wrong stride, a missing term: distances of order 1). Both paths' distances are
//! printed. The optimiser step of the candidate is given the reference's gradients,
//! so the weight check measures the optimiser alone (Adam's first step divides a gradient by its own magnitude:
//! a sign flip of a near-zero gradient would otherwise swamp it).

use std::io::Write;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::nn::weights::is_buffer;
use crate::nn::{set_fast_paths, Arch, Dilation, Encoder};
use crate::optim::{Adam, AdamConfig, Optimizer};

/// What `mpcs doctor` runs.
pub struct DoctorOptions {
    /// `cpu` (candle's ops on the CPU) or `cuda:N`.
    pub device: String,
    pub archs: Vec<Arch>,
    pub size: usize,
    pub batch: usize,
    /// The initial weights and the batch come from this seed: the same report on every run of one machine.
    pub seed: u64,
}

/// The largest difference between the two paths for one quantity, relative to the reference's largest magnitude
/// in the same tensor, and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub what: &'static str,
    pub worst: f64,
    pub at: String,
    pub tolerance: f64,
}

impl Delta {
    pub fn ok(&self) -> bool {
        self.worst.is_finite() && self.worst <= self.tolerance
    }
}

/// Tolerances (float32 throughout; the paths sum in different orders, and cuBLAS/cuDNN pick their own algorithms).
const LOSS_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 5e-2;
const STATS_TOL: f64 = 1e-4;
const WEIGHT_TOL: f64 = 1e-5;

/// What one path produced: tensors by variable name, copied to the CPU.
struct StepResult {
    loss: f32,
    grads: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    weights: Vec<(String, Tensor)>,
    seconds: f64,
}

/// Runs the checks and writes the report; returns whether every check passed.
pub fn run(opts: &DoctorOptions, out: &mut dyn Write) -> anyhow::Result<bool> {
    let device = open_device(&opts.device)?;
    writeln!(out, "{}", discovery())?;
    let candidate = match &device {
        Device::Cpu => "candle's own ops on the CPU (what a GPU runs)".to_string(),
        _ => opts.device.clone(),
    };
    let mut all_ok = true;
    for &arch in &opts.archs {
        writeln!(
            out,
            "{arch} {}x{} batch {}: {candidate} against the CPU's fused kernels",
            opts.size, opts.size, opts.batch
        )?;
        let deltas = compare(arch, opts, &device, out)?;
        for d in &deltas {
            let verdict = if d.ok() { "ok" } else { "MISMATCH" };
            writeln!(
                out,
                "  {:<17} worst {:.2e} at {} (tolerance {:.0e})  {verdict}",
                d.what, d.worst, d.at, d.tolerance
            )?;
            all_ok &= d.ok();
        }
    }
    writeln!(out, "{}", if all_ok { "doctor: every check passed" } else { "doctor: MISMATCHES above" })?;
    Ok(all_ok)
}

/// `cpu` or `cuda:N` as a candle device, with a message that says what to do when it cannot be opened.
pub fn open_device(name: &str) -> anyhow::Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = name.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) else {
        anyhow::bail!("--device {name}: use `cpu` or `cuda:N` (e.g. cuda:0)");
    };
    if !cfg!(feature = "cuda") {
        anyhow::bail!(
            "--device {name}: this mpcs was built without the `cuda` feature (scripts/gpu/build.sh builds one)"
        );
    }
    Device::new_cuda(ordinal).map_err(|e| anyhow::anyhow!("cannot open {name}: {e}"))
}

/// The GPUs as three sources see them.
fn discovery() -> String {
    let built = if cfg!(feature = "cuda") { "built with cuda" } else { "built without the cuda feature" };
    let candle = if cfg!(feature = "cuda") {
        let n = (0..64).take_while(|&i| Device::new_cuda(i).is_ok()).count();
        format!("candle opens {n} CUDA device(s)")
    } else {
        "candle: no CUDA".to_string()
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
    let smi = match std::process::Command::new("nvidia-smi").arg("-L").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().replace('\n', "; "),
        Ok(o) => format!("failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(_) => "not found".to_string(),
    };
    format!("devices: mpcs {built}; {candle}; CUDA_VISIBLE_DEVICES={visible}; nvidia-smi -L: {smi}")
}

/// One step on each path from the same initial weights and batch; the deltas between them.
fn compare(arch: Arch, opts: &DoctorOptions, device: &Device, out: &mut dyn Write) -> anyhow::Result<Vec<Delta>> {
    let (size, batch) = (opts.size, opts.batch);
    let init = VarMap::new();
    Encoder::new(arch, VarBuilder::from_varmap(&init, DType::F32, &Device::Cpu), Some(10), Dilation::None)?;
    crate::train::seeded_init(&init, opts.seed)?;
    let mut rng = crate::loader::rng::Rng::new(opts.seed);
    let pixels: Vec<f32> = (0..batch * 3 * size * size).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
    let x = Tensor::from_vec(pixels, (batch, 3, size, size), &Device::Cpu)?;
    let labels = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &Device::Cpu)?;
    let cpu = &Device::Cpu;
    let steps = (|| {
        set_fast_paths(true);
        let reference = one_step(arch, &init, cpu, DType::F32, &x, &labels, None)?;
        set_fast_paths(false);
        let truth = one_step(arch, &init, cpu, DType::F64, &x, &labels, Some(&reference.grads))?;
        let candidate = one_step(arch, &init, device, DType::F32, &x, &labels, Some(&reference.grads))?;
        anyhow::Ok((reference, truth, candidate))
    })();
    set_fast_paths(true);
    let (reference, truth, candidate) = steps?;
    let gpu_memory = match device {
        Device::Cpu => String::new(),
        _ => format!("; GPU memory in use {}", gpu_memory_used().unwrap_or_else(|| "unknown".into())),
    };
    writeln!(
        out,
        "  step time: reference {:.0} ms, candidate {:.0} ms (first step, includes set-up){gpu_memory}",
        reference.seconds * 1e3,
        candidate.seconds * 1e3
    )?;
    let loss = (reference.loss - candidate.loss).abs() as f64 / (reference.loss.abs() as f64).max(1e-6);
    let mut grads = Delta { what: "gradients", worst: 0.0, at: "-".into(), tolerance: GRAD_TOL };
    for ((name, t), ((_, r), (_, c))) in truth.grads.iter().zip(reference.grads.iter().zip(&candidate.grads)) {
        let off = relative_l2(c, t)?;
        if off.is_nan() || off > grads.worst {
            grads.worst = off;
            grads.at = format!("{name} (L2 from the float64 truth; the CPU's: {:.1e})", relative_l2(r, t)?);
        }
        if grads.worst.is_nan() {
            break;
        }
    }
    Ok(vec![
        Delta {
            what: "loss",
            worst: loss,
            at: format!("{} vs {}", reference.loss, candidate.loss),
            tolerance: LOSS_TOL,
        },
        grads,
        worst("BatchNorm stats", &reference.buffers, &candidate.buffers, STATS_TOL)?,
        worst("updated weights", &reference.weights, &candidate.weights, WEIGHT_TOL)?,
    ])
}

/// One training step of a fresh model loaded with `init` on `device`. With `feed`, the optimiser is given those
/// gradients instead of its own (see the module comment).
fn one_step(
    arch: Arch,
    init: &VarMap,
    device: &Device,
    dt: DType,
    x: &Tensor,
    labels: &Tensor,
    feed: Option<&[(String, Tensor)]>,
) -> anyhow::Result<StepResult> {
    let t0 = Instant::now();
    let varmap = VarMap::new();
    let model = Encoder::new(arch, VarBuilder::from_varmap(&varmap, dt, device), Some(10), Dilation::None)?;
    let vars = sorted(&varmap);
    {
        let src = init.data().lock().expect("VarMap mutex poisoned");
        for (name, var) in &vars {
            let value = src.get(name).ok_or_else(|| anyhow::anyhow!("no initial value for {name}"))?;
            let v = value.as_tensor();
            let v = if v.dtype().is_float() { v.to_dtype(dt)? } else { v.clone() };
            var.set(&v.to_device(device)?)?;
        }
    }
    let trainable: Vec<_> = vars.iter().filter(|(n, _)| !is_buffer(n)).cloned().collect();
    let plain: Vec<candle_core::Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = match device {
        // The fused CPU optimiser for the reference; tensor ops (what a GPU runs) otherwise.
        Device::Cpu if feed.is_none() && dt == DType::F32 => Adam::new(plain, AdamConfig::default())?,
        _ => Adam::with_groups_tensor_ops(plain, Vec::new(), AdamConfig::default())?,
    };
    let logits = model.forward_t(&x.to_device(device)?.to_dtype(dt)?, true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &labels.to_device(device)?)?;
    let loss_value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    let mut grads = loss.backward()?;
    let mut own = Vec::new();
    for (name, var) in &trainable {
        let g = grads.get(var.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
        own.push((name.clone(), g.to_device(&Device::Cpu)?.to_dtype(DType::F32)?));
    }
    if let Some(feed) = feed {
        for ((name, var), (fed_name, g)) in trainable.iter().zip(feed) {
            anyhow::ensure!(name == fed_name, "the two models name their variables differently ({name}, {fed_name})");
            grads.insert(var.as_tensor(), g.to_device(device)?.to_dtype(dt)?);
        }
    }
    opt.step(&grads)?;
    let on_cpu = |pick: &dyn Fn(&str) -> bool| -> anyhow::Result<Vec<(String, Tensor)>> {
        vars.iter()
            .filter(|(n, _)| pick(n))
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
            .collect()
    };
    let buffers = on_cpu(&|n| is_buffer(n) && !n.ends_with("num_batches_tracked"))?;
    let weights = on_cpu(&|n| !is_buffer(n))?;
    Ok(StepResult { loss: loss_value, grads: own, buffers, weights, seconds: t0.elapsed().as_secs_f64() })
}

fn sorted(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().expect("VarMap mutex poisoned");
    let mut v: Vec<(String, candle_core::Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The worst relative difference over paired tensors (see [`relative`]).
pub fn worst(
    what: &'static str,
    a: &[(String, Tensor)],
    b: &[(String, Tensor)],
    tolerance: f64,
) -> anyhow::Result<Delta> {
    anyhow::ensure!(a.len() == b.len(), "{what}: {} tensors against {}", a.len(), b.len());
    let mut delta = Delta { what, worst: 0.0, at: "-".into(), tolerance };
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let rel = relative(y, x)?;
        if rel.is_nan() || rel > delta.worst {
            delta.worst = rel;
            delta.at = name.clone();
        }
        if delta.worst.is_nan() {
            break;
        }
    }
    Ok(delta)
}

/// max |a − b| / max |b|: how far `a` is from `b`, relative to `b`'s largest magnitude (NaN when either holds a
/// non-finite value).
fn relative(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let Some((a, b)) = finite_values(a, b)? else { return Ok(f64::NAN) };
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f64, |m, y| m.max(y.abs()));
    Ok(if diff == 0.0 { 0.0 } else { diff / scale.max(1e-12) })
}

/// ‖a − b‖ / ‖b‖ (NaN when either holds a non-finite value): an error spread over the tensor, where a few
/// ill-conditioned elements do not dominate as they do the largest difference.
fn relative_l2(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let Some((a, b)) = finite_values(a, b)? else { return Ok(f64::NAN) };
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    Ok(if diff == 0.0 { 0.0 } else { (diff / norm.max(1e-300)).sqrt() })
}

/// Both tensors' values as f64, or None when either holds a NaN or an infinity.
fn finite_values(a: &Tensor, b: &Tensor) -> anyhow::Result<Option<(Vec<f64>, Vec<f64>)>> {
    let values = |t: &Tensor| -> anyhow::Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (a, b) = (values(a)?, values(b)?);
    anyhow::ensure!(a.len() == b.len(), "tensors of {} and {} values", a.len(), b.len());
    Ok(a.iter().chain(&b).all(|v| v.is_finite()).then_some((a, b)))
}

/// Memory in use on the GPUs, as nvidia-smi reports it.
fn gpu_memory_used() -> Option<String> {
    let o = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index,memory.used", "--format=csv,noheader"])
        .output()
        .ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().replace('\n', "; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_gradient_is_reported_with_its_name() {
        let a = vec![("conv1.weight".to_string(), Tensor::new(&[1f32, -2.0, 4.0], &Device::Cpu).unwrap())];
        let tolerance = 1e-3;
        let same = worst("gradients", &a, &a.clone(), tolerance).unwrap();
        assert!(same.ok() && same.worst == 0.0);
        // 0.04 off where the largest magnitude is 4: 1%, ten times the tolerance.
        let b = vec![("conv1.weight".to_string(), Tensor::new(&[1f32, -2.0, 4.04], &Device::Cpu).unwrap())];
        let d = worst("gradients", &a, &b, tolerance).unwrap();
        assert!(!d.ok() && (d.worst - 0.01).abs() < 1e-6 && d.at == "conv1.weight", "{d:?}");
        let nan = vec![("conv1.weight".to_string(), Tensor::new(&[1f32, f32::NAN, 4.0], &Device::Cpu).unwrap())];
        assert!(!worst("gradients", &a, &nan, tolerance).unwrap().ok(), "NaN never passes");
    }
}
