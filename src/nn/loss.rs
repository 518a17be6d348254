//! Contrastive losses on paired views: MPCS's loss (METHOD.md, "Loss") and the symmetric NT-Xent.
//!
//! Both take features `f` of shape (B, 2, D), usually L2-normalised projector outputs, and are
//! differentiable with respect to `f`. They compute in `f`'s dtype (f32 or f64).

use candle_core::{DType, IndexOp, Tensor};

use super::error::{NnError, Result};

/// The temperature MPCS uses.
pub const TEMPERATURE: f64 = 0.1;

fn check(f: &Tensor, temperature: f64) -> Result<(usize, usize)> {
    if f.rank() != 3 || f.dim(1)? != 2 || f.dim(0)? == 0 {
        return Err(NnError::InvalidInput(format!(
            "contrastive loss expects features of shape (B, 2, D) with B >= 1, got {:?}",
            f.dims()
        )));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(NnError::InvalidInput(format!("temperature must be a positive number, got {temperature}")));
    }
    Ok((f.dim(0)?, f.dim(2)?))
}

/// A constant (rows, cols) 0/1 mask with ones where `pred(i, j)`.
fn mask(rows: usize, cols: usize, dtype: DType, f: &Tensor, pred: impl Fn(usize, usize) -> bool) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols).map(|k| if pred(k / cols, k % cols) { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, (rows, cols), f.device())?.to_dtype(dtype)?)
}

/// −mean over rows of log( exp(logit_pos) / Σ_{j ≠ self} exp(logit_j) ), rows = anchors.
fn softmax_ce(logits: &Tensor, not_self: &Tensor, positive: &Tensor) -> Result<Tensor> {
    // Subtracting the (detached) row max changes nothing mathematically; it keeps exp() finite.
    let logits = logits.broadcast_sub(&logits.max_keepdim(1)?.detach())?;
    let denom = (logits.exp()? * not_self)?.sum_keepdim(1)?.log()?;
    let log_prob = logits.broadcast_sub(&denom)?;
    let pos = (log_prob * positive)?.sum(1)?;
    Ok(pos.mean(0)?.neg()?)
}

/// MPCS's loss (the SupCon formulation with one anchor view and no labels): contrast = both
/// views stacked (view 1 rows, then view 2 rows, 2B in all); anchors = view 1 only;
/// logits = anchor · contrastᵀ / τ; self-similarity excluded; the positive of anchor i is its own
/// second view (contrast row B + i). Returns a scalar. No `τ / base_τ` factor is applied.
pub fn mpcs_loss(f: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, _) = check(f, temperature)?;
    let v1 = f.i((.., 0, ..))?.contiguous()?;
    let v2 = f.i((.., 1, ..))?.contiguous()?;
    let contrast = Tensor::cat(&[&v1, &v2], 0)?;
    let logits = (v1.matmul(&contrast.t()?)? / temperature)?;
    let dt = f.dtype();
    let not_self = mask(b, 2 * b, dt, f, |i, j| i != j)?;
    let positive = mask(b, 2 * b, dt, f, |i, j| j == i + b)?;
    softmax_ce(&logits, &not_self, &positive)
}

/// The symmetric NT-Xent (SimCLR) over all 2B samples: every sample is an anchor, its positive is
/// the other view of the same item, the 2B − 2 others are negatives. Returns a scalar.
pub fn nt_xent_symmetric(f: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, _) = check(f, temperature)?;
    let v1 = f.i((.., 0, ..))?.contiguous()?;
    let v2 = f.i((.., 1, ..))?.contiguous()?;
    let z = Tensor::cat(&[&v1, &v2], 0)?;
    let logits = (z.matmul(&z.t()?)? / temperature)?;
    let n = 2 * b;
    let dt = f.dtype();
    let not_self = mask(n, n, dt, f, |i, j| i != j)?;
    let positive = mask(n, n, dt, f, |i, j| j == (i + b) % n)?;
    softmax_ce(&logits, &not_self, &positive)
}
