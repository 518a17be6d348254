//! Optimisers and training-control utilities against PyTorch golden files
//! (tests/golden/optim/optim_golden.safetensors, made by scripts/optim/make_golden.py).
//!
//! The optimiser tests feed the exact gradients PyTorch computed at each of 3 steps and compare the
//! parameters after each step, on both the fused CPU path and the tensor-op path.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use mpcs::optim::{
    split_by_ndim, Adam, AdamConfig, EarlyStopping, GradAccumulator, Lars, LarsConfig, Mode, OptimError, Optimizer,
    PlateauConfig, ReduceLrOnPlateau, Sgd, SgdConfig, ThresholdMode,
};

const NAMES: [&str; 4] = ["w1", "b1", "w2", "b2"];

fn golden() -> HashMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/optim/optim_golden.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("golden file")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn init_vars(g: &HashMap<String, Tensor>, dtype: DType) -> Vec<Var> {
    NAMES.iter().map(|n| Var::from_tensor(&g[&format!("init/{n}")].to_dtype(dtype).unwrap()).unwrap()).collect()
}

fn grads_of(g: &HashMap<String, Tensor>, case: &str, k: usize, vars: &[Var]) -> GradStore {
    let mut gs = GradStore::default();
    for (v, n) in vars.iter().zip(NAMES) {
        gs.insert(v, g[&format!("{case}/{k}/grad/{n}")].to_dtype(v.dtype()).unwrap());
    }
    gs
}

/// Parameters within 1e-6 relative of PyTorch's, and the change from the initial value within 1e-4 of the
/// largest change (so that a wrong but tiny update cannot hide behind the parameter's magnitude).
fn assert_params(g: &HashMap<String, Tensor>, case: &str, k: usize, vars: &[Var], what: &str) {
    for (v, n) in vars.iter().zip(NAMES) {
        let got = flat(v.as_tensor());
        let want = flat(&g[&format!("{case}/{k}/param/{n}")]);
        let init = flat(&g[&format!("init/{n}")]);
        let max_delta = want.iter().zip(&init).map(|(w, i)| (w - i).abs()).fold(0f32, f32::max);
        for (j, ((a, b), i)) in got.iter().zip(&want).zip(&init).enumerate() {
            let tol = 1e-6 * b.abs() + 1e-9;
            assert!((a - b).abs() <= tol, "{what} {case} step {k} {n}[{j}]: got {a}, PyTorch {b}");
            let (da, db) = (a - i, b - i);
            assert!(
                (da - db).abs() <= 1e-4 * max_delta + 1e-8,
                "{what} {case} step {k} {n}[{j}]: change {da} vs PyTorch {db}"
            );
        }
        assert!(max_delta > 0.0 || case == "none", "{case} {n}: PyTorch did not move the parameter");
    }
}

type Make = fn(Vec<Var>, bool) -> Box<dyn Optimizer>;

fn run_case(case: &str, make: Make) {
    let g = golden();
    for tensor_ops in [false, true] {
        let what = if tensor_ops { "tensor ops" } else { "fused" };
        let vars = init_vars(&g, DType::F32);
        let mut opt = make(vars.clone(), tensor_ops);
        // A step with no gradients must change nothing, not even the per-parameter step counts.
        opt.step(&GradStore::default()).unwrap();
        for k in 0..3 {
            opt.step(&grads_of(&g, case, k, &vars)).unwrap();
            assert_params(&g, case, k, &vars, what);
        }
    }
}

fn adam(vars: Vec<Var>, tensor_ops: bool, cfg: AdamConfig) -> Box<dyn Optimizer> {
    if tensor_ops {
        Box::new(Adam::with_groups_tensor_ops(vars, vec![], cfg).unwrap())
    } else {
        Box::new(Adam::new(vars, cfg).unwrap())
    }
}

fn sgd(vars: Vec<Var>, tensor_ops: bool, cfg: SgdConfig) -> Box<dyn Optimizer> {
    if tensor_ops {
        Box::new(Sgd::with_groups_tensor_ops(vars, vec![], cfg).unwrap())
    } else {
        Box::new(Sgd::new(vars, cfg).unwrap())
    }
}

fn lars(vars: Vec<Var>, tensor_ops: bool, cfg: LarsConfig) -> Box<dyn Optimizer> {
    if tensor_ops {
        let (w, b) = split_by_ndim(vars);
        Box::new(Lars::with_groups_tensor_ops(w, b, cfg).unwrap())
    } else {
        Box::new(Lars::new(vars, cfg).unwrap())
    }
}

#[test]
fn adam_weight_decay_1e_6_matches_pytorch() {
    run_case("adam_wd1e-6", |v, t| adam(v, t, AdamConfig { lr: 1e-2, weight_decay: 1e-6, ..Default::default() }));
}

#[test]
fn adam_l2_matches_pytorch() {
    run_case("adam_l2", |v, t| {
        adam(v, t, AdamConfig { lr: 1e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1, decoupled: false })
    });
}

#[test]
fn adamw_matches_pytorch() {
    run_case("adamw", |v, t| adam(v, t, AdamConfig::adamw(1e-2, 0.1)));
}

#[test]
fn sgd_nesterov_matches_pytorch() {
    run_case("sgd_nesterov", |v, t| {
        sgd(v, t, SgdConfig { lr: 0.05, momentum: 0.9, weight_decay: 1e-2, nesterov: true, ..Default::default() })
    });
}

#[test]
fn sgd_dampening_matches_pytorch() {
    run_case("sgd_dampening", |v, t| {
        sgd(v, t, SgdConfig { lr: 0.05, momentum: 0.9, dampening: 0.3, weight_decay: 1e-3, nesterov: false })
    });
}

#[test]
fn sgd_plain_matches_pytorch() {
    run_case("sgd_plain", |v, t| sgd(v, t, SgdConfig { lr: 0.1, ..Default::default() }));
}

#[test]
fn lars_paper_config_matches_reference() {
    assert_eq!(
        LarsConfig::default(),
        LarsConfig { lr_weights: 0.2, lr_biases: 0.0048, momentum: 0.9, eta: 0.001, weight_decay: 1e-6 }
    );
    run_case("lars_paper", |v, t| lars(v, t, LarsConfig::default()));
}

#[test]
fn lars_strong_decay_matches_reference() {
    run_case("lars_strong", |v, t| {
        lars(v, t, LarsConfig { lr_weights: 0.5, lr_biases: 0.05, momentum: 0.9, eta: 0.02, weight_decay: 0.05 })
    });
}

#[test]
fn f64_parameters_take_the_tensor_path_and_match() {
    // f64 variables are updated in f32 and written back; they must still match PyTorch's f32 run.
    let g = golden();
    let vars = init_vars(&g, DType::F64);
    let mut opt = Adam::new(vars.clone(), AdamConfig::adamw(1e-2, 0.1)).unwrap();
    for k in 0..3 {
        opt.step(&grads_of(&g, "adamw", k, &vars)).unwrap();
        assert_params(&g, "adamw", k, &vars, "f64");
        assert_eq!(vars[0].dtype(), DType::F64);
    }
}

#[test]
fn adamw_agrees_with_candle_nn() {
    // An independent implementation of the same update (candle-nn's AdamW, eps outside the sqrt too).
    use candle_nn::optim::Optimizer as _;
    let g = golden();
    let ours = init_vars(&g, DType::F32);
    let theirs = init_vars(&g, DType::F32);
    let mut a = Adam::new(ours.clone(), AdamConfig::adamw(1e-2, 0.1)).unwrap();
    let params = candle_nn::ParamsAdamW { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut b = candle_nn::AdamW::new(theirs.clone(), params).unwrap();
    for k in 0..3 {
        a.step(&grads_of(&g, "adamw", k, &ours)).unwrap();
        b.step(&grads_of(&g, "adamw", k, &theirs)).unwrap();
    }
    for (x, y) in ours.iter().zip(&theirs) {
        for (p, q) in flat(x.as_tensor()).iter().zip(flat(y.as_tensor())) {
            assert!((p - q).abs() <= 1e-6 * q.abs() + 1e-9, "{p} vs candle-nn {q}");
        }
    }
}

#[test]
fn non_finite_gradient_changes_nothing() {
    let g = golden();
    for tensor_ops in [false, true] {
        let vars = init_vars(&g, DType::F32);
        let mut opt = adam(vars.clone(), tensor_ops, AdamConfig { lr: 1e-2, weight_decay: 1e-6, ..Default::default() });
        // The last parameter's gradient is bad: the earlier ones must not have been updated either.
        let mut bad = grads_of(&g, "adam_wd1e-6", 0, &vars);
        bad.insert(&vars[3], Tensor::new(&[0.5f32, f32::NAN], &Device::Cpu).unwrap());
        match opt.step(&bad) {
            Err(OptimError::NonFiniteGrad { index: 3, .. }) => {}
            other => panic!("expected NonFiniteGrad for #3, got {:?}", other.err()),
        }
        bad.insert(&vars[3], Tensor::new(&[f32::INFINITY, 0.0], &Device::Cpu).unwrap());
        assert!(opt.step(&bad).is_err());
        for (v, n) in vars.iter().zip(NAMES) {
            assert_eq!(flat(v.as_tensor()), flat(&g[&format!("init/{n}")]), "{n} changed by a failed step");
        }
        // And the state is untouched: the golden run still matches.
        for k in 0..3 {
            opt.step(&grads_of(&g, "adam_wd1e-6", k, &vars)).unwrap();
            assert_params(&g, "adam_wd1e-6", k, &vars, "after NaN");
        }
    }
}

#[test]
fn bad_gradient_shape_and_bad_configs_are_errors() {
    let g = golden();
    let vars = init_vars(&g, DType::F32);
    let mut opt = Sgd::new(vars.clone(), SgdConfig::default()).unwrap();
    let mut gs = GradStore::default();
    gs.insert(&vars[0], Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap());
    assert!(matches!(opt.step(&gs), Err(OptimError::GradShape { index: 0, .. })));

    let bad_adam = [
        AdamConfig { lr: -1.0, ..Default::default() },
        AdamConfig { lr: f64::NAN, ..Default::default() },
        AdamConfig { beta1: 1.0, ..Default::default() },
        AdamConfig { beta2: -0.1, ..Default::default() },
        AdamConfig { weight_decay: -1e-3, ..Default::default() },
    ];
    for cfg in bad_adam {
        assert!(matches!(Adam::new(vars.clone(), cfg), Err(OptimError::Config(_))));
    }
    let nesterov_without_momentum = SgdConfig { nesterov: true, ..Default::default() };
    assert!(matches!(Sgd::new(vars.clone(), nesterov_without_momentum), Err(OptimError::Config(_))));
    assert!(Lars::new(vars.clone(), LarsConfig { eta: -1.0, ..Default::default() }).is_err());
    assert!(matches!(
        Adam::new(vec![vars[0].clone(), vars[0].clone()], AdamConfig::default()),
        Err(OptimError::Config(_))
    ));
    assert!(opt.set_lr(-0.5).is_err());
    assert!(opt.set_lr(0.25).is_ok());
    assert_eq!(opt.lr(), 0.25);
}

#[test]
fn split_by_ndim_separates_biases() {
    let g = golden();
    let (w, b) = split_by_ndim(init_vars(&g, DType::F32));
    assert_eq!(w.iter().map(|v| v.dims().to_vec()).collect::<Vec<_>>(), vec![vec![3, 4], vec![2, 3]]);
    assert_eq!(b.iter().map(|v| v.dims().to_vec()).collect::<Vec<_>>(), vec![vec![3], vec![2]]);
}

fn plateau_case(name: &str, cfg: PlateauConfig) {
    let g = golden();
    let metrics = g[&format!("plateau/{name}/metrics")].to_vec1::<f64>().unwrap();
    let lrs = g[&format!("plateau/{name}/lrs")].to_vec1::<f64>().unwrap();
    let mut s = ReduceLrOnPlateau::new(cfg, 1.0).unwrap();
    let mut prev = 1.0;
    for (i, (m, want)) in metrics.iter().zip(&lrs).enumerate() {
        let reduced = s.step(*m).unwrap();
        assert_eq!(s.lr(), *want, "{name} step {i} (metric {m})");
        assert_eq!(reduced, *want < prev, "{name} step {i}: reported reduction");
        prev = *want;
    }
}

#[test]
fn plateau_min_rel_matches_pytorch() {
    plateau_case("min_rel", PlateauConfig { patience: 2, cooldown: 1, min_lr: 1e-4, ..Default::default() });
}

#[test]
fn plateau_max_abs_matches_pytorch() {
    plateau_case(
        "max_abs",
        PlateauConfig {
            mode: Mode::Max,
            factor: 0.5,
            patience: 0,
            threshold: 0.01,
            threshold_mode: ThresholdMode::Abs,
            ..Default::default()
        },
    );
}

#[test]
fn plateau_drives_an_optimizer_and_rejects_nan() {
    let g = golden();
    let mut opt = Lars::new(init_vars(&g, DType::F32), LarsConfig::default()).unwrap();
    let mut s = ReduceLrOnPlateau::new(PlateauConfig { patience: 0, ..Default::default() }, opt.lr()).unwrap();
    assert!(!s.step_optimizer(1.0, &mut opt).unwrap());
    assert!(s.step_optimizer(1.0, &mut opt).unwrap());
    assert!((opt.lr() - 0.02).abs() < 1e-15);
    // LARS keeps its weights:biases ratio.
    assert!((opt.config().lr_biases - 0.00048).abs() < 1e-15);
    assert!(matches!(s.step_optimizer(f64::NAN, &mut opt), Err(OptimError::NonFiniteMetric { .. })));
    assert!((opt.lr() - 0.02).abs() < 1e-15);
    assert!(ReduceLrOnPlateau::new(PlateauConfig { factor: 1.0, ..Default::default() }, 1.0).is_err());
}

#[test]
fn early_stopping_counts_patience_with_min_delta() {
    let mut es = EarlyStopping::new(Mode::Min, 2, 0.1).unwrap();
    // 1.0 best; 0.95 not better by > 0.1; 0.85 better (1.0 - 0.1 = 0.9 > 0.85); then two bad epochs stop.
    let expect =
        [(1.0, false, true), (0.95, false, false), (0.85, false, true), (0.8, false, false), (0.76, true, false)];
    for (i, (m, stop, improved)) in expect.into_iter().enumerate() {
        assert_eq!(es.step(m).unwrap(), stop, "epoch {i}");
        assert_eq!(es.improved(), improved, "epoch {i}");
    }
    assert_eq!(es.best(), Some(0.85));
    assert_eq!(es.best_epoch(), 3);
    assert!(es.step(f64::INFINITY).is_err());

    let mut es = EarlyStopping::new(Mode::Max, 1, 0.0).unwrap();
    assert!(!es.step(0.5).unwrap());
    assert!(!es.step(0.6).unwrap());
    assert!(es.step(0.6).unwrap(), "equal is not an improvement");
    assert!(EarlyStopping::new(Mode::Min, 0, 0.0).is_err());
    assert!(EarlyStopping::new(Mode::Min, 3, -1.0).is_err());
}

#[test]
fn accumulation_steps_on_the_mean() {
    let dev = Device::Cpu;
    let p = Var::new(&[1.0f32, 2.0, 3.0], &dev).unwrap();
    let mut opt = Sgd::new(vec![p.clone()], SgdConfig { lr: 1.0, ..Default::default() }).unwrap();
    let mut acc = GradAccumulator::new(vec![p.clone()], 3).unwrap();
    let micro = |x: [f32; 3]| {
        let mut gs = GradStore::default();
        gs.insert(&p, Tensor::new(&x, &dev).unwrap());
        gs
    };
    assert!(!acc.micro_step(&micro([0.3, 0.0, 3.0]), &mut opt).unwrap());
    assert!(!acc.micro_step(&micro([0.6, 0.3, -3.0]), &mut opt).unwrap());
    assert_eq!(flat(p.as_tensor()), vec![1.0, 2.0, 3.0], "no step before 3 micro-batches");
    assert!(acc.micro_step(&micro([0.0, 0.3, 0.3]), &mut opt).unwrap());
    let want = [1.0 - 0.3, 2.0 - 0.2, 3.0 - 0.1];
    for (a, b) in flat(p.as_tensor()).iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert_eq!(acc.pending(), 0);
    // A short final group is averaged over what it holds; a NaN micro-batch is refused and not counted.
    assert!(acc.add(&micro([f32::NAN, 0.0, 0.0])).is_err());
    acc.add(&micro([1.0, 1.0, 1.0])).unwrap();
    acc.add(&micro([3.0, 1.0, -1.0])).unwrap();
    assert!(acc.flush(&mut opt).unwrap());
    let want = [0.7 - 2.0, 1.8 - 1.0, 2.9];
    for (a, b) in flat(p.as_tensor()).iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert!(!acc.flush(&mut opt).unwrap(), "nothing pending");
    assert!(GradAccumulator::new(vec![p], 0).is_err());
}

#[test]
fn in_place_updates_are_seen_by_the_next_backward_pass() {
    // loss = sum(p²) → grad 2p; SGD lr 0.1 maps p to 0.8 p each step, through real autograd.
    let p = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
    let mut opt = Sgd::new(vec![p.clone()], SgdConfig { lr: 0.1, ..Default::default() }).unwrap();
    for k in 1..=3 {
        let grads = p.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        opt.step(&grads).unwrap();
        let s = 0.8f32.powi(k);
        for (a, b) in flat(p.as_tensor()).iter().zip([1.0 * s, -2.0 * s, 3.0 * s]) {
            assert!((a - b).abs() < 1e-6, "step {k}: {a} vs {b}");
        }
    }
    // Adam's first step moves every coordinate by lr against the sign of its gradient.
    let q = Var::new(&[[0.5f32, -0.25], [2.0, -4.0]], &Device::Cpu).unwrap();
    let mut adam = Adam::new(vec![q.clone()], AdamConfig { lr: 0.01, ..Default::default() }).unwrap();
    let grads = q.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    adam.step(&grads).unwrap();
    for (a, b) in flat(q.as_tensor()).iter().zip([0.49f32, -0.24, 1.99, -3.99]) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

/// Parameters of several hundred thousand values are updated in parallel pieces (the fused path
/// splits them between rayon's threads): the result is bit-identical under 1 and 3 threads and
/// agrees with the tensor-op path, and a NaN deep inside a large gradient is still caught.
#[test]
fn large_parameters_update_in_parallel_pieces_exactly() {
    let dev = Device::Cpu;
    let n = 200_001; // several pieces, the last one short
    let init = Tensor::randn(0f32, 1f32, n, &dev).unwrap();
    let grads: Vec<Tensor> = (0..3).map(|_| Tensor::randn(0f32, 1f32, n, &dev).unwrap()).collect();
    type MakeOne = fn(Var, bool) -> Box<dyn Optimizer>;
    let makers: [(&str, MakeOne); 2] = [
        ("adam", |v, t| adam(vec![v], t, AdamConfig { lr: 1e-2, weight_decay: 1e-4, ..Default::default() })),
        ("sgd", |v, t| {
            sgd(vec![v], t, SgdConfig { lr: 1e-2, momentum: 0.9, weight_decay: 1e-4, ..Default::default() })
        }),
    ];
    for (name, make) in makers {
        let run = |threads: usize, tensor_ops: bool| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let var = Var::from_tensor(&init).unwrap();
                let mut opt = make(var.clone(), tensor_ops);
                for g in &grads {
                    let mut gs = GradStore::default();
                    gs.insert(&var, g.clone());
                    opt.step(&gs).unwrap();
                }
                flat(var.as_tensor())
            })
        };
        let one = run(1, false);
        let three = run(3, false);
        assert!(one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: 1 vs 3 threads differ");
        let reference = run(1, true);
        for (j, (a, b)) in three.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name}[{j}]: fused {a}, tensor ops {b}");
        }
        assert_ne!(one, flat(&init), "{name}: nothing was updated");
    }
    // The finiteness check runs in pieces too.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    pool.install(|| {
        let var = Var::from_tensor(&init).unwrap();
        let mut opt = adam(vec![var.clone()], false, AdamConfig::default());
        let mut bad = flat(&grads[0]);
        bad[150_000] = f32::NAN;
        let mut gs = GradStore::default();
        gs.insert(&var, Tensor::from_vec(bad, n, &dev).unwrap());
        assert!(matches!(opt.step(&gs), Err(OptimError::NonFiniteGrad { index: 0, .. })));
        assert_eq!(flat(var.as_tensor()), flat(&init), "a failed step changed the parameter");
    });
}
