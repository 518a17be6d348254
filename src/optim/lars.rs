//! LARS as in facebookresearch/barlowtwins (`main.py`, class `LARS`), which the MPCS code uses:
//!
//!   for a regular parameter (rank >= 2 by default):  d = g + wd * p;
//!       q = eta * ||p|| / ||d||  (1 when either norm is 0);  d *= q
//!   for an excluded parameter (biases, BatchNorm):    d = g   (no decay, no trust ratio)
//!   buf = momentum * buf + d   (buf starts at 0);   p -= lr_group * buf
//!
//! Two learning rates, as in the paper's config: weights 0.2, biases 0.0048.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::params::{self, Entry};
use super::{check_lr, kernel, OptimError, Optimizer, Result};

/// LARS hyper-parameters. `Default` is the MPCS paper's config.
#[derive(Clone, Debug, PartialEq)]
pub struct LarsConfig {
    /// Learning rate of the regular parameters (weights).
    pub lr_weights: f64,
    /// Learning rate of the excluded parameters (biases, BatchNorm).
    pub lr_biases: f64,
    pub momentum: f64,
    pub eta: f64,
    pub weight_decay: f64,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self { lr_weights: 0.2, lr_biases: 0.0048, momentum: 0.9, eta: 0.001, weight_decay: 1e-6 }
    }
}

impl LarsConfig {
    fn validate(&self) -> Result<()> {
        check_lr(self.lr_weights)?;
        check_lr(self.lr_biases)?;
        for (what, v) in [("momentum", self.momentum), ("eta", self.eta), ("weight_decay", self.weight_decay)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(OptimError::Config(format!("LARS {what} = {v} must be finite and >= 0")));
            }
        }
        Ok(())
    }
}

enum Buffer {
    Cpu(Vec<f32>),
    Tensor(Tensor),
}

/// LARS over regular and excluded parameters.
pub struct Lars {
    cfg: LarsConfig,
    /// lr_biases / lr_weights at construction, kept by `set_lr` (None when lr_weights was 0).
    bias_ratio: Option<f64>,
    params: Vec<Entry>,
    bufs: Vec<Buffer>,
}

impl Lars {
    /// Rank >= 2 variables are regular, rank <= 1 (biases, BatchNorm) are excluded (barlowtwins'
    /// `exclude_bias_and_norm`).
    pub fn new(vars: Vec<Var>, cfg: LarsConfig) -> Result<Self> {
        let (regular, excluded) = params::split_by_ndim(vars);
        Self::with_groups(regular, excluded, cfg)
    }

    /// Explicit groups: `excluded` variables get no weight decay, no trust ratio and `lr_biases`.
    pub fn with_groups(regular: Vec<Var>, excluded: Vec<Var>, cfg: LarsConfig) -> Result<Self> {
        Self::build(regular, excluded, cfg, false)
    }

    /// Every variable takes the device-generic tensor-op path; for tests and benchmarks.
    pub fn with_groups_tensor_ops(regular: Vec<Var>, excluded: Vec<Var>, cfg: LarsConfig) -> Result<Self> {
        Self::build(regular, excluded, cfg, true)
    }

    fn build(regular: Vec<Var>, excluded: Vec<Var>, cfg: LarsConfig, tensor_ops: bool) -> Result<Self> {
        cfg.validate()?;
        let params = params::entries(regular, excluded, tensor_ops)?;
        let bufs = params
            .iter()
            .map(|e| {
                Ok(if e.fused {
                    Buffer::Cpu(vec![0.0; e.var.elem_count()])
                } else {
                    Buffer::Tensor(params::zeros_f32(&e.var)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let bias_ratio = (cfg.lr_weights > 0.0).then(|| cfg.lr_biases / cfg.lr_weights);
        Ok(Self { cfg, bias_ratio, params, bufs })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LarsConfig {
        &self.cfg
    }
}

/// barlowtwins' trust ratio from the two norms, in f32 like PyTorch.
fn trust_ratio(eta: f32, p_norm: f32, d_norm: f32) -> f32 {
    if p_norm > 0.0 && d_norm > 0.0 {
        eta * p_norm / d_norm
    } else {
        1.0
    }
}

impl Optimizer for Lars {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let gs = params::gather(&self.params, grads)?;
        let c = &self.cfg;
        for ((e, buf), g) in self.params.iter_mut().zip(self.bufs.iter_mut()).zip(gs) {
            let Some(g) = g else { continue };
            e.steps += 1;
            let adapt = !e.excluded;
            let (wd, lr) = if adapt { (c.weight_decay, c.lr_weights) } else { (0.0, c.lr_biases) };
            match buf {
                Buffer::Cpu(b) => {
                    // Two passes over p and g (norms, then the update) and one over buf; no tensor op.
                    let (wd, lr, mu, eta) = (wd as f32, lr as f32, c.momentum as f32, c.eta as f32);
                    kernel::update_in_place(&e.var, &g, |p, g| {
                        let q = if adapt {
                            let p_norm = kernel::sum_sq(p).sqrt() as f32;
                            let d_sq: f64 = p
                                .iter()
                                .zip(g)
                                .map(|(&p, &g)| {
                                    let d = (g + wd * p) as f64;
                                    d * d
                                })
                                .sum();
                            trust_ratio(eta, p_norm, d_sq.sqrt() as f32)
                        } else {
                            1.0
                        };
                        for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                            let d = (g + wd * *p) * q;
                            *b = mu * *b + d;
                            *p -= lr * *b;
                        }
                    })?;
                }
                Buffer::Tensor(b) => {
                    // Tensor ops per parameter: decay 2, norms 6 (+2 host reads), scale 1, buffer 3,
                    // update 2, plus 1 copy into the Var: at most 15.
                    let p = params::param_f32(&e.var)?;
                    let mut d = if wd != 0.0 { (&g + p.affine(wd, 0.0)?)? } else { g };
                    if adapt {
                        let p_norm = p.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
                        let d_norm = d.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
                        let q = trust_ratio(c.eta as f32, p_norm, d_norm);
                        d = d.affine(q as f64, 0.0)?;
                    }
                    *b = (b.affine(c.momentum, 0.0)? + d)?;
                    params::set_var(&e.var, &(p - b.affine(lr, 0.0)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// The learning rate of the regular parameters.
    fn lr(&self) -> f64 {
        self.cfg.lr_weights
    }

    /// Sets the regular parameters' learning rate and the excluded ones' to keep the ratio they had at
    /// construction (the paper's 0.2 : 0.0048), so a scheduler scales both groups like PyTorch would (with
    /// min_lr 0). If lr_weights was 0 at construction, lr_biases stays as configured.
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        if let Some(ratio) = self.bias_ratio {
            self.cfg.lr_biases = lr * ratio;
        }
        self.cfg.lr_weights = lr;
        Ok(())
    }
}
