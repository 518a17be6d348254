//! Adam and AdamW with PyTorch semantics (`torch.optim.Adam` / `AdamW`, single-tensor path, no amsgrad).
//!
//! Per step t of a parameter p with gradient g:
//!   Adam:  g += wd * p                                   (L2 decay enters the moments)
//!   AdamW: p *= 1 - lr * wd                              (decoupled decay, before the update)
//!   m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g²
//!   p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)     (eps outside the sqrt)

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::params::{self, Entry};
use super::{check_lr, kernel, OptimError, Optimizer, Result};

/// Adam / AdamW hyper-parameters. `Default` is PyTorch's Adam default.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// false: Adam (L2 added to the gradient); true: AdamW (decoupled decay).
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }
}

impl AdamConfig {
    /// PyTorch's AdamW default (lr 1e-3, weight decay 1e-2) with the given lr and decay.
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        Self { lr, weight_decay, decoupled: true, ..Self::default() }
    }

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        let bad = |what: &str, v: f64, range: &str| {
            Err(OptimError::Config(format!("Adam {what} = {v} is out of range; it must be in {range}")))
        };
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "[0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "[0, 1)");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", self.eps, "[0, inf)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "[0, inf)");
        }
        Ok(())
    }
}

enum Moments {
    /// Fused CPU path.
    Cpu { m: Vec<f32>, v: Vec<f32> },
    /// Tensor-op path (f32 on the parameter's device).
    Tensors { m: Tensor, v: Tensor },
}

/// Adam or AdamW (see [`AdamConfig::decoupled`]) over a list of variables.
pub struct Adam {
    cfg: AdamConfig,
    params: Vec<Entry>,
    state: Vec<Moments>,
}

impl Adam {
    /// Weight decay applies to every variable (PyTorch's single parameter group).
    pub fn new(vars: Vec<Var>, cfg: AdamConfig) -> Result<Self> {
        Self::with_groups(vars, Vec::new(), cfg)
    }

    /// `no_decay` variables (e.g. from [`super::split_by_ndim`]) get weight decay 0.
    pub fn with_groups(decay: Vec<Var>, no_decay: Vec<Var>, cfg: AdamConfig) -> Result<Self> {
        Self::build(decay, no_decay, cfg, false)
    }

    /// Like [`Adam::with_groups`] but every variable takes the device-generic tensor-op path (what GPU and
    /// non-f32 parameters use); for tests and benchmarks.
    pub fn with_groups_tensor_ops(decay: Vec<Var>, no_decay: Vec<Var>, cfg: AdamConfig) -> Result<Self> {
        Self::build(decay, no_decay, cfg, true)
    }

    fn build(decay: Vec<Var>, no_decay: Vec<Var>, cfg: AdamConfig, tensor_ops: bool) -> Result<Self> {
        cfg.validate()?;
        let params = params::entries(decay, no_decay, tensor_ops)?;
        let state = params
            .iter()
            .map(|e| {
                Ok(if e.fused {
                    let n = e.var.elem_count();
                    Moments::Cpu { m: vec![0.0; n], v: vec![0.0; n] }
                } else {
                    Moments::Tensors { m: params::zeros_f32(&e.var)?, v: params::zeros_f32(&e.var)? }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, params, state })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let gs = params::gather(&self.params, grads)?;
        let c = &self.cfg;
        for ((e, st), g) in self.params.iter_mut().zip(self.state.iter_mut()).zip(gs) {
            let Some(g) = g else { continue };
            e.steps += 1;
            let t = e.steps as i32;
            let wd = if e.excluded { 0.0 } else { c.weight_decay };
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
            let step_size = c.lr / bc1;
            let (l2, shrink) = if c.decoupled { (0.0, 1.0 - c.lr * wd) } else { (wd, 1.0) };
            match st {
                Moments::Cpu { m, v } => {
                    // One pass: reads p, g, m, v and writes p, m, v; no tensor op at all.
                    let (b2, eps) = (c.beta2 as f32, c.eps as f32);
                    let (l2, shrink, ss, bc2s) = (l2 as f32, shrink as f32, step_size as f32, bc2_sqrt as f32);
                    // 1 - beta in f64 first, as PyTorch does: 1 - 0.999f32 is off by 5e-5 relative.
                    let (w1, w2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
                    kernel::update_in_place(&e.var, &g, |p, g| {
                        kernel::par_update(p, g, m, v, |p, g, m, v| {
                            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                                let mut x = *p;
                                if shrink != 1.0 {
                                    x *= shrink;
                                }
                                let g = g + l2 * x;
                                *m += w1 * (g - *m);
                                *v = b2 * *v + w2 * (g * g);
                                *p = x - ss * (*m / (v.sqrt() / bc2s + eps));
                            }
                        })
                    })?;
                }
                Moments::Tensors { m, v } => {
                    // Tensor ops per parameter: decay 2 (L2) or 1 (decoupled), m 3, v 4, denominator 2,
                    // update 3, plus 1 copy into the Var (2 dtype casts for non-f32 parameters): 14–15.
                    let mut p = params::param_f32(&e.var)?;
                    if shrink != 1.0 {
                        p = p.affine(shrink, 0.0)?;
                    }
                    let g = if l2 != 0.0 { (&g + p.affine(l2, 0.0)?)? } else { g };
                    *m = (m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
                    *v = (v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
                    let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, c.eps)?;
                    let p = (p - (&*m / denom)?.affine(step_size, 0.0)?)?;
                    params::set_var(&e.var, &p)?;
                }
            }
        }
        Ok(())
    }

    fn lr(&self) -> f64 {
        self.cfg.lr
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.cfg.lr = lr;
        Ok(())
    }
}
