//! Gradient accumulation: sum the gradients of N micro-batches, step the optimiser on their mean.
//!
//! The mean of the micro-batch gradients is the gradient of the mean loss when the micro-batches have equal
//! sizes, so N micro-batches of size B step like one batch of N·B (BatchNorm statistics aside).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{OptimError, Optimizer, Result};

/// Accumulates gradients for a fixed list of variables.
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    pending: usize,
    every: usize,
}

impl GradAccumulator {
    /// Steps after every `every` (>= 1) micro-batches.
    pub fn new(vars: Vec<Var>, every: usize) -> Result<Self> {
        if every == 0 {
            return Err(OptimError::Config("gradient accumulation needs at least 1 micro-batch per step".into()));
        }
        let sums = vec![None; vars.len()];
        Ok(Self { vars, sums, pending: 0, every })
    }

    /// Adds one micro-batch's gradients (f32 sums; one tensor op per variable after the first micro-batch).
    /// Fails, adding nothing, if a gradient holds NaN or infinity.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        let mut fresh = Vec::with_capacity(self.vars.len());
        for (index, v) in self.vars.iter().enumerate() {
            let g = match grads.get(v) {
                Some(g) => Some(g.to_dtype(DType::F32)?.detach()),
                None => None,
            };
            if let Some(g) = &g {
                if !super::kernel::all_finite(&g.contiguous()?)? {
                    return Err(OptimError::NonFiniteGrad { index, shape: g.dims().to_vec() });
                }
            }
            fresh.push(g);
        }
        for (sum, g) in self.sums.iter_mut().zip(fresh) {
            if let Some(g) = g {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.pending += 1;
        Ok(())
    }

    /// Adds a micro-batch and, once `every` are pending, steps `opt` on their mean. Returns whether it
    /// stepped.
    pub fn micro_step(&mut self, grads: &GradStore, opt: &mut dyn Optimizer) -> Result<bool> {
        self.add(grads)?;
        if self.pending >= self.every {
            return self.flush(opt);
        }
        Ok(false)
    }

    /// Steps `opt` on the mean of the pending micro-batches (e.g. the last, short group of an epoch) and
    /// clears them. Returns false, doing nothing, when none are pending.
    pub fn flush(&mut self, opt: &mut dyn Optimizer) -> Result<bool> {
        let Some(mean) = self.take_mean()? else { return Ok(false) };
        opt.step(&mean)?;
        Ok(true)
    }

    /// The mean gradients of the pending micro-batches (a variable that got a gradient in only some of them
    /// is still divided by the number of micro-batches), clearing them; `None` when none are pending.
    pub fn take_mean(&mut self) -> Result<Option<GradStore>> {
        if self.pending == 0 {
            return Ok(None);
        }
        let scale = 1.0 / self.pending as f64;
        let mut out = GradStore::default();
        for (v, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                out.insert(v, s.affine(scale, 0.0)?);
            }
        }
        self.pending = 0;
        Ok(Some(out))
    }

    /// Micro-batches added since the last step.
    pub fn pending(&self) -> usize {
        self.pending
    }
}
