//! The parameter list shared by the optimisers: which variables, which are excluded from weight decay (and,
//! for LARS, from the trust ratio), and which take the fused CPU path; gathering and checking gradients.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{kernel, OptimError, Result};

/// One parameter of an optimiser.
pub(crate) struct Entry {
    pub var: Var,
    /// Excluded from weight decay (and from LARS adaptation).
    pub excluded: bool,
    /// Updated in place by a fused CPU loop (contiguous f32 on the CPU) rather than by tensor ops.
    pub fused: bool,
    /// Steps taken with a gradient (PyTorch keeps this per parameter).
    pub steps: u64,
}

/// Splits variables into (rank >= 2, rank <= 1): weights vs biases and BatchNorm scales/shifts, the split
/// that LARS (and decay-excluding setups) use by default.
pub fn split_by_ndim(vars: Vec<Var>) -> (Vec<Var>, Vec<Var>) {
    vars.into_iter().partition(|v| v.rank() >= 2)
}

/// Builds the entries; non-float variables are skipped (they never have gradients), a variable listed twice
/// is an error (it would be updated twice per step).
pub(crate) fn entries(regular: Vec<Var>, excluded: Vec<Var>, tensor_ops: bool) -> Result<Vec<Entry>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(regular.len() + excluded.len());
    let tagged = regular.into_iter().map(|v| (v, false)).chain(excluded.into_iter().map(|v| (v, true)));
    for (i, (var, excluded)) in tagged.enumerate() {
        if !var.dtype().is_float() {
            continue;
        }
        if !seen.insert(var.id()) {
            return Err(OptimError::Config(format!(
                "variable #{i} (shape {:?}) is listed twice; pass each variable once",
                var.dims()
            )));
        }
        let fused = !tensor_ops && var.device().is_cpu() && var.dtype() == DType::F32 && var.is_contiguous();
        out.push(Entry { var, excluded, fused, steps: 0 });
    }
    Ok(out)
}

/// The f32 gradient of each entry (`None` where `grads` has none), contiguous for fused entries. Fails
/// before anything is updated if a shape differs or a value is not finite.
pub(crate) fn gather(entries: &[Entry], grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
    let mut out = Vec::with_capacity(entries.len());
    for (index, e) in entries.iter().enumerate() {
        let Some(g) = grads.get(&e.var) else {
            out.push(None);
            continue;
        };
        if g.dims() != e.var.dims() {
            return Err(OptimError::GradShape { index, param: e.var.dims().to_vec(), grad: g.dims().to_vec() });
        }
        let g = g.to_dtype(DType::F32)?.detach();
        let g = if e.fused || g.device().is_cpu() { g.contiguous()? } else { g };
        if !kernel::all_finite(&g)? {
            return Err(OptimError::NonFiniteGrad { index, shape: g.dims().to_vec() });
        }
        out.push(Some(g));
    }
    Ok(out)
}

/// Writes an f32 result back into a variable of any float dtype (tensor-op path).
pub(crate) fn set_var(var: &Var, value: &Tensor) -> Result<()> {
    var.set(&value.to_dtype(var.dtype())?)?;
    Ok(())
}

/// The parameter as a detached f32 tensor (tensor-op path; detached so no autograd graph is recorded).
pub(crate) fn param_f32(var: &Var) -> Result<Tensor> {
    Ok(var.as_detached_tensor().to_dtype(DType::F32)?)
}

/// Zeros shaped like the parameter, in f32 on its device (optimiser state of the tensor-op path).
pub(crate) fn zeros_f32(var: &Var) -> Result<Tensor> {
    Ok(Tensor::zeros(var.shape(), DType::F32, var.device())?)
}
