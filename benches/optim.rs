//! One optimiser step over a ResNet-18-sized parameter set (62 tensors, 11,689,512 f32 parameters, random
//! gradients), single thread: candle-nn's AdamW against this crate's Adam/AdamW/SGD/LARS, on the fused CPU
//! path and on the tensor-op path (what GPU parameters use).
//!
//!     CARGO_TARGET_DIR=... cargo bench --bench optim [-- STEPS]

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use mpcs::optim::{split_by_ndim, Adam, AdamConfig, Lars, LarsConfig, Optimizer, Sgd, SgdConfig};

/// torchvision resnet18 parameter shapes, in order.
fn resnet18_shapes() -> Vec<Vec<usize>> {
    let mut s: Vec<Vec<usize>> = vec![vec![64, 3, 7, 7], vec![64], vec![64]];
    let mut cin = 64;
    for (stage, cout) in [64usize, 128, 256, 512].into_iter().enumerate() {
        for block in 0..2 {
            let c_in = if block == 0 { cin } else { cout };
            s.extend([vec![cout, c_in, 3, 3], vec![cout], vec![cout], vec![cout, cout, 3, 3], vec![cout], vec![cout]]);
            if block == 0 && stage > 0 {
                s.extend([vec![cout, c_in, 1, 1], vec![cout], vec![cout]]);
            }
        }
        cin = cout;
    }
    s.extend([vec![1000, 512], vec![1000]]);
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(name: &str, steps: usize, n_params: usize, mut f: impl FnMut()) {
    f(); // warm-up: first-touch of the state buffers
    let mut ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let m = median(ms);
    println!("{name:<34} {m:>9.1} ms/step  {:>6.2} ns/param", m * 1e6 / n_params as f64);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Single thread for every candle op as well as our loops (set before rayon's pool starts).
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let steps: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    let dev = Device::Cpu;
    let shapes = resnet18_shapes();
    let vars = shapes
        .iter()
        .map(|s| Var::from_tensor(&(Tensor::randn(0f32, 0.05, s.as_slice(), &dev)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut grads = GradStore::default();
    for v in &vars {
        grads.insert(v, Tensor::randn(0f32, 1e-3, v.shape(), &dev)?.to_dtype(DType::F32)?);
    }
    println!("ResNet-18 parameter set: {} tensors, {n_params} parameters, {steps} timed steps (median)", vars.len());
    let (w, b) = split_by_ndim(vars.clone());

    candle_nn_adamw(&vars, &grads, steps, n_params)?;
    let adam = AdamConfig { lr: 1e-4, weight_decay: 1e-6, ..Default::default() };
    let adamw = AdamConfig::adamw(1e-4, 1e-6);
    let sgd = SgdConfig { lr: 1e-3, momentum: 0.9, weight_decay: 1e-6, nesterov: true, ..Default::default() };
    let mut runs: Vec<(&str, Box<dyn Optimizer>)> = vec![
        ("mpcs Adam (fused)", Box::new(Adam::new(vars.clone(), adam.clone())?)),
        ("mpcs AdamW (fused)", Box::new(Adam::new(vars.clone(), adamw.clone())?)),
        ("mpcs SGD nesterov (fused)", Box::new(Sgd::new(vars.clone(), sgd.clone())?)),
        ("mpcs LARS (fused)", Box::new(Lars::new(vars.clone(), LarsConfig::default())?)),
        ("mpcs Adam (tensor ops)", Box::new(Adam::with_groups_tensor_ops(vars.clone(), vec![], adam)?)),
        ("mpcs AdamW (tensor ops)", Box::new(Adam::with_groups_tensor_ops(vars.clone(), vec![], adamw)?)),
        ("mpcs SGD nesterov (tensor ops)", Box::new(Sgd::with_groups_tensor_ops(vars.clone(), vec![], sgd)?)),
        ("mpcs LARS (tensor ops)", Box::new(Lars::with_groups_tensor_ops(w, b, LarsConfig::default())?)),
    ];
    for (name, opt) in runs.iter_mut() {
        time(name, steps, n_params, || opt.step(&grads).unwrap());
    }
    // Again at the end, so that machine load drifting during the run shows up as a difference.
    candle_nn_adamw(&vars, &grads, steps, n_params)?;
    Ok(())
}

fn candle_nn_adamw(vars: &[Var], grads: &GradStore, steps: usize, n_params: usize) -> candle_core::Result<()> {
    use candle_nn::optim::Optimizer as _;
    let p = candle_nn::ParamsAdamW { lr: 1e-4, weight_decay: 1e-6, ..Default::default() };
    let mut o = candle_nn::AdamW::new(vars.to_vec(), p)?;
    time("candle-nn AdamW", steps, n_params, || o.step(grads).unwrap());
    Ok(())
}
