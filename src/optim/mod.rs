//! Optimisers and training-control utilities over candle `Var`s.
//!
//! candle-nn ships only `AdamW` (about ten temporaries per tensor) and `SGD` without momentum or weight
//! decay, and no learning-rate schedulers. This module adds, with PyTorch semantics checked against golden
//! files made by PyTorch (`scripts/optim/make_golden.py`):
//!
//! - [`Adam`] (L2 decay added to the gradient, or decoupled decay = AdamW), [`Sgd`] (momentum, dampening,
//!   Nesterov, L2 decay) and [`Lars`] (facebookresearch/barlowtwins LARS, the config of the MPCS paper);
//! - [`ReduceLrOnPlateau`], [`EarlyStopping`] and [`GradAccumulator`].
//!
//! Every optimiser implements [`Optimizer`]. Updates run in f32. A parameter that lives on the CPU as a
//! contiguous f32 tensor is updated in place by one fused loop (a candle in-place custom op, no temporary
//! tensor at all); any other parameter (GPU, f16/bf16/f64) goes through candle tensor ops, whose count per
//! parameter each optimiser notes. Gradients are checked for NaN/inf before anything is touched, so a bad
//! batch leaves parameters and state unchanged and returns [`OptimError::NonFiniteGrad`].

mod accumulate;
mod adam;
mod early_stop;
mod error;
mod kernel;
mod lars;
mod params;
mod plateau;
mod sgd;

pub use accumulate::GradAccumulator;
pub use adam::{Adam, AdamConfig};
pub use early_stop::EarlyStopping;
pub use error::{OptimError, Result};
pub use lars::{Lars, LarsConfig};
pub use params::split_by_ndim;
pub use plateau::{Mode, PlateauConfig, ReduceLrOnPlateau, ThresholdMode};
pub use sgd::{Sgd, SgdConfig};

use candle_core::backprop::GradStore;

/// A first-order optimiser over a fixed list of variables.
///
/// Object safe, so schedulers and helpers take `&mut dyn Optimizer`.
pub trait Optimizer {
    /// Applies one update with the gradients in `grads`. Variables without a gradient are left alone (their
    /// state and step count too, as in PyTorch). On error nothing has been updated.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The learning rate (for [`Lars`], the one of the regular parameters).
    fn lr(&self) -> f64;
    /// Sets the learning rate; fails on a negative or non-finite value.
    fn set_lr(&mut self, lr: f64) -> Result<()>;
}

/// Checks that a learning rate can be used.
pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(OptimError::Config(format!("learning rate {lr} must be finite and >= 0")))
    }
}
