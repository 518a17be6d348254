//! BatchNorm with PyTorch's semantics in both modes, for any input of rank >= 2 (N, C, ...).
//!
//! candle-nn has a BatchNorm too; this one exists so that (a) the training output stays in NCHW
//! layout (no transpose + copy per layer), (b) `num_batches_tracked` is kept as an i64 variable
//! like PyTorch's buffer, so a saved state dict loads into PyTorch with `strict=True`, and
//! (c) the parameter names and initial values follow `torch.nn.BatchNorm{1,2}d` exactly.

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

use super::error::{NnError, Result};

/// PyTorch's defaults: eps 1e-5, momentum 0.1.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// Batch normalisation over dimension 1.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    num_features: usize,
    weight_and_bias: Option<(Tensor, Tensor)>,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: f64,
}

/// The tensor of a variable from the var builder, as the same `Var` (so in-place updates of the
/// running statistics are seen by the `VarMap` and therefore saved).
fn get_var(vb: &VarBuilder, shape: &[usize], name: &str, init: Init, dtype: DType) -> Result<Var> {
    let t = vb.get_with_hints_dtype(shape, name, init, dtype)?;
    Ok(Var::from_tensor(&t)?)
}

impl BatchNorm {
    /// A BatchNorm with learnable `weight` and `bias` (PyTorch `affine=True`).
    pub fn new(num_features: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_affine(num_features, true, vb)
    }

    /// `affine = false` gives PyTorch's `BatchNorm1d(n, affine=False)`: no learnable parameters.
    pub fn with_affine(num_features: usize, affine: bool, vb: VarBuilder) -> Result<Self> {
        let n = [num_features];
        let weight_and_bias = if affine {
            let w = vb.get_with_hints(num_features, "weight", Init::Const(1.0))?;
            let b = vb.get_with_hints(num_features, "bias", Init::Const(0.0))?;
            Some((w, b))
        } else {
            None
        };
        let dtype = vb.dtype();
        Ok(Self {
            num_features,
            weight_and_bias,
            running_mean: get_var(&vb, &n, "running_mean", Init::Const(0.0), dtype)?,
            running_var: get_var(&vb, &n, "running_var", Init::Const(1.0), dtype)?,
            num_batches_tracked: get_var(&vb, &[], "num_batches_tracked", Init::Const(0.0), DType::I64)?,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// The shape that broadcasts a per-channel vector against `x` (1, C, 1, ...).
    fn channel_shape(&self, x: &Tensor) -> Result<Vec<usize>> {
        if x.rank() < 2 || x.dim(1)? != self.num_features {
            return Err(NnError::InvalidInput(format!(
                "batch-norm expects input (N, {}, ...) but got {:?}",
                self.num_features,
                x.dims()
            )));
        }
        Ok((0..x.rank()).map(|i| if i == 1 { self.num_features } else { 1 }).collect())
    }

    fn affine(&self, x: Tensor, shape: &[usize]) -> Result<Tensor> {
        match &self.weight_and_bias {
            None => Ok(x),
            Some((w, b)) => Ok(x.broadcast_mul(&w.reshape(shape)?)?.broadcast_add(&b.reshape(shape)?)?),
        }
    }

    /// Training mode: normalise with the batch statistics (biased variance) and update the
    /// running statistics with momentum, using the unbiased variance as PyTorch does.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let shape = self.channel_shape(x)?;
        let dims: Vec<usize> = (0..x.rank()).filter(|&d| d != 1).collect();
        let count = x.elem_count() / self.num_features;
        if count < 2 {
            return Err(NnError::InvalidInput(format!(
                "batch-norm in training mode needs more than one value per channel, got input {:?}",
                x.dims()
            )));
        }
        let mean = x.mean_keepdim(dims.as_slice())?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(dims.as_slice())?;
        let y = centred.broadcast_div(&(&var + self.eps)?.sqrt()?)?;

        // Running statistics: no gradient flows through them.
        let m = self.momentum;
        let mean_d = mean.detach().flatten_all()?;
        let var_unbiased = (var.detach().flatten_all()? * (count as f64 / (count as f64 - 1.0)))?;
        let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean_d * m)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (var_unbiased * m)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        let one = Tensor::ones((), DType::I64, x.device())?;
        let n = (self.num_batches_tracked.as_tensor() + one)?;
        self.num_batches_tracked.set(&n)?;

        self.affine(y, &shape)
    }

    /// Training (batch statistics, running averages updated) or evaluation mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }

    /// Evaluation mode: normalise with the running statistics.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let shape = self.channel_shape(x)?;
        let mean = self.running_mean.as_detached_tensor().reshape(shape.as_slice())?;
        let std = (self.running_var.as_detached_tensor() + self.eps)?.sqrt()?.reshape(shape.as_slice())?;
        let y = x.broadcast_sub(&mean)?.broadcast_div(&std)?;
        self.affine(y, &shape)
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        BatchNorm::forward_t(self, x, train).map_err(into_candle)
    }
}

/// Wraps our error into candle's so that `ModuleT` implementations can return it.
pub(crate) fn into_candle(e: NnError) -> candle_core::Error {
    match e {
        NnError::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    }
}
