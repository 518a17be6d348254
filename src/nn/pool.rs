//! Max pooling with padding (the ResNet stem's 3×3, stride 2, padding 1).
//!
//! candle's `max_pool2d` has no padding, and its backward pass only supports kernel == stride.
//! This version pads with -inf (what PyTorch does implicitly) and takes the maximum over the
//! kernel's shifted, strided views with `Tensor::maximum`, whose backward pass exists on every
//! device. It is separable: first along the width, then along the height.
//! On ties the gradient is split between the tied inputs (PyTorch gives all of it to the first);
//! after a ReLU the only likely ties are zeros, whose gradient the ReLU discards anyway.

use candle_core::Tensor;

use super::error::{NnError, Result};

/// Pads `dim` with `left`/`right` values of -inf.
fn pad_neg_inf(x: &Tensor, dim: usize, left: usize, right: usize) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(3);
    let mut shape = x.dims().to_vec();
    if left > 0 {
        shape[dim] = left;
        parts.push(Tensor::full(f32::NEG_INFINITY, shape.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    parts.push(x.clone());
    if right > 0 {
        shape[dim] = right;
        parts.push(Tensor::full(f32::NEG_INFINITY, shape.as_slice(), x.device())?.to_dtype(x.dtype())?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

/// Elements `start, start + stride, ...` (`n` of them) of `dim`.
fn strided(x: &Tensor, dim: usize, start: usize, n: usize, stride: usize) -> Result<Tensor> {
    let x = x.narrow(dim, start, n * stride)?;
    if stride == 1 {
        return Ok(x);
    }
    let mut shape = x.dims().to_vec();
    shape[dim] = n;
    shape.insert(dim + 1, stride);
    Ok(x.reshape(shape.as_slice())?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?)
}

/// 1-D max pooling along `dim` (kernel, stride, padding as in PyTorch, no ceil mode).
fn max_pool_1d(x: &Tensor, dim: usize, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let len = x.dim(dim)?;
    if kernel == 0 || stride == 0 || padding * 2 > kernel || len + 2 * padding < kernel {
        return Err(NnError::InvalidInput(format!(
            "max pool: kernel {kernel}, stride {stride}, padding {padding} do not fit an input of size {len}"
        )));
    }
    let out = (len + 2 * padding - kernel) / stride + 1;
    // Enough right padding for every strided view to be a plain narrow of length out * stride.
    let needed = (kernel - 1) + out * stride;
    let right = needed.saturating_sub(len + padding);
    let xp = pad_neg_inf(x, dim, padding, right)?;
    let mut acc = strided(&xp, dim, 0, out, stride)?;
    for k in 1..kernel {
        acc = acc.maximum(&strided(&xp, dim, k, out, stride)?)?;
    }
    Ok(acc)
}

/// 2-D max pooling of an (N, C, H, W) tensor, differentiable for any kernel/stride/padding.
pub fn max_pool2d_padded(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(NnError::InvalidInput(format!("max pool expects an (N, C, H, W) tensor, got {:?}", x.dims())));
    }
    let w = max_pool_1d(x, 3, kernel, stride, padding)?;
    let h = max_pool_1d(&w, 2, kernel, stride, padding)?;
    // Keep a plain contiguous layout for the convolutions that follow.
    Ok(h.contiguous()?)
}
