//! SGD with PyTorch semantics (`torch.optim.SGD`, single-tensor path).
//!
//! Per step of a parameter p with gradient g:
//!   d = g + wd * p
//!   with momentum mu > 0: buf = d on the first step, else buf = mu * buf + (1 - dampening) * d;
//!                         d = d + mu * buf (Nesterov) or d = buf
//!   p -= lr * d

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::params::{self, Entry};
use super::{check_lr, kernel, OptimError, Optimizer, Result};

/// SGD hyper-parameters. `Default` is PyTorch's (lr 1e-3, everything else 0 / false).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { lr: 1e-3, momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false }
    }
}

impl SgdConfig {
    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        for (what, v) in
            [("momentum", self.momentum), ("dampening", self.dampening), ("weight_decay", self.weight_decay)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return Err(OptimError::Config(format!("SGD {what} = {v} must be finite and >= 0")));
            }
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(OptimError::Config(format!(
                "SGD Nesterov needs momentum > 0 and dampening 0 (got momentum {}, dampening {})",
                self.momentum, self.dampening
            )));
        }
        Ok(())
    }
}

enum Buffer {
    None,
    Cpu(Vec<f32>),
    Tensor(Option<Tensor>),
}

/// SGD with momentum, dampening, Nesterov and L2 weight decay.
pub struct Sgd {
    cfg: SgdConfig,
    params: Vec<Entry>,
    bufs: Vec<Buffer>,
}

impl Sgd {
    /// Weight decay applies to every variable.
    pub fn new(vars: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        Self::with_groups(vars, Vec::new(), cfg)
    }

    /// `no_decay` variables get weight decay 0.
    pub fn with_groups(decay: Vec<Var>, no_decay: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        Self::build(decay, no_decay, cfg, false)
    }

    /// Every variable takes the device-generic tensor-op path; for tests and benchmarks.
    pub fn with_groups_tensor_ops(decay: Vec<Var>, no_decay: Vec<Var>, cfg: SgdConfig) -> Result<Self> {
        Self::build(decay, no_decay, cfg, true)
    }

    fn build(decay: Vec<Var>, no_decay: Vec<Var>, cfg: SgdConfig, tensor_ops: bool) -> Result<Self> {
        cfg.validate()?;
        let params = params::entries(decay, no_decay, tensor_ops)?;
        let bufs = params
            .iter()
            .map(|e| match (cfg.momentum != 0.0, e.fused) {
                (false, _) => Buffer::None,
                (true, true) => Buffer::Cpu(vec![0.0; e.var.elem_count()]),
                (true, false) => Buffer::Tensor(None),
            })
            .collect();
        Ok(Self { cfg, params, bufs })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let gs = params::gather(&self.params, grads)?;
        let c = &self.cfg;
        for ((e, buf), g) in self.params.iter_mut().zip(self.bufs.iter_mut()).zip(gs) {
            let Some(g) = g else { continue };
            e.steps += 1;
            let first = e.steps == 1;
            let wd = if e.excluded { 0.0 } else { c.weight_decay };
            if e.fused {
                // One pass: reads p, g (and buf), writes p (and buf); no tensor op.
                let (lr, wd, mu, keep) = (c.lr as f32, wd as f32, c.momentum as f32, (1.0 - c.dampening) as f32);
                let nesterov = c.nesterov;
                let buf = match buf {
                    Buffer::Cpu(b) => Some(b),
                    _ => None,
                };
                let b = buf.map(|b| b.as_mut_slice()).unwrap_or_default();
                kernel::update_in_place(&e.var, &g, |p, g| {
                    kernel::par_update(p, g, b, &mut [], |p, g, b, _| {
                        if b.is_empty() {
                            for (p, &g) in p.iter_mut().zip(g) {
                                *p -= lr * (g + wd * *p);
                            }
                        } else {
                            for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                                let d = g + wd * *p;
                                *b = if first { d } else { mu * *b + keep * d };
                                let d = if nesterov { d + mu * *b } else { *b };
                                *p -= lr * d;
                            }
                        }
                    })
                })?;
                continue;
            }
            // Tensor ops per parameter: decay 2, momentum buffer 3 (first step 0), Nesterov 2, update 2, plus
            // 1 copy into the Var: at most 10.
            let p = params::param_f32(&e.var)?;
            let d = if wd != 0.0 { (&g + p.affine(wd, 0.0)?)? } else { g };
            let d = match buf {
                Buffer::Tensor(b) => {
                    let next = match b.take() {
                        Some(old) if !first => (old.affine(c.momentum, 0.0)? + d.affine(1.0 - c.dampening, 0.0)?)?,
                        _ => d.clone(),
                    };
                    let out = if c.nesterov { (&d + next.affine(c.momentum, 0.0)?)? } else { next.clone() };
                    *b = Some(next);
                    out
                }
                _ => d,
            };
            params::set_var(&e.var, &(p - d.affine(c.lr, 0.0)?)?)?;
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
