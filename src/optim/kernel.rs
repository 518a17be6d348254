//! The CPU fast path: a candle in-place custom op that hands a closure the parameter's f32 storage (mutable)
//! and the gradient's (read-only), so an optimiser can update parameter and state in one loop with no
//! temporary tensor. Also the gradient finiteness check.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use super::Result;

/// Elements per parallel task of the element-wise update loops (rayon splits larger tensors).
pub(crate) const CHUNK: usize = 1 << 15;

/// Runs `f` on matching `CHUNK`-element pieces of the parameter, its gradient and two state
/// buffers (`a` and `b`, each either as long as the parameter or empty for state an optimiser does
/// not keep), in parallel for large tensors. Element-wise updates give the same values however the
/// pieces are shared out.
pub(crate) fn par_update(
    p: &mut [f32],
    g: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(&mut [f32], &[f32], &mut [f32], &mut [f32]) + Sync + Send,
) {
    if p.len() <= CHUNK || crate::runtime::cpu_threads() == 1 {
        return f(p, g, a, b);
    }
    let pieces = p.len().div_ceil(CHUNK);
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(pieces_of(a, pieces))
        .zip(pieces_of(b, pieces))
        .for_each(|(((p, g), a), b)| f(p, g, a, b));
}

/// `v` in `CHUNK`-element pieces, or `count` empty pieces when `v` is empty.
fn pieces_of(v: &mut [f32], count: usize) -> Vec<&mut [f32]> {
    if v.is_empty() {
        (0..count).map(|_| Default::default()).collect()
    } else {
        v.chunks_mut(CHUNK).collect()
    }
}

/// Runs the closure on the contiguous f32 data of `param` (mutable) and `grad` (read-only).
struct InPlace<F>(RefCell<F>);

fn contiguous_range(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("optim in-place update: {what} is not contiguous")))
}

impl<F: FnMut(&mut [f32], &[f32])> InplaceOp2 for InPlace<F> {
    fn name(&self) -> &'static str {
        "mpcs-optim-update"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        let (d0, d1) = contiguous_range(dl, "parameter")?;
        let (s0, s1) = contiguous_range(sl, "gradient")?;
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                (self.0.borrow_mut())(&mut d[d0..d1], &s[s0..s1]);
                Ok(())
            }
            _ => Err(candle_core::Error::Msg("optim in-place update: parameter and gradient must be f32".into())),
        }
    }
}

/// Updates a contiguous f32 CPU parameter in place: `f(param, grad)`. `grad` must be f32 of the same shape.
pub(crate) fn update_in_place<F: FnMut(&mut [f32], &[f32])>(param: &Var, grad: &Tensor, f: F) -> Result<()> {
    let grad = grad.contiguous()?;
    param.as_tensor().inplace_op2(&grad, &InPlace(RefCell::new(f)))?;
    Ok(())
}

/// Runs `f` on the f32 data of a contiguous CPU tensor; `None` for any other tensor.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let (a, b) = contiguous_range(layout, "tensor")?;
    Ok(Some(f(&cpu.as_slice::<f32>()?[a..b])))
}

/// Whether every element of the f32 tensor `g` is finite. On the CPU one read pass; elsewhere `g - g`
/// summed (0 for finite values, NaN otherwise, and no overflow unlike a plain sum).
pub(crate) fn all_finite(g: &Tensor) -> Result<bool> {
    // No early exit inside a chunk, so the check vectorises; chunks in parallel.
    let finite = |s: &[f32]| s.iter().fold(true, |ok, x| ok & x.is_finite());
    let check = |s: &[f32]| {
        if s.len() <= CHUNK || crate::runtime::cpu_threads() == 1 {
            s.chunks(CHUNK).all(finite)
        } else {
            s.par_chunks(CHUNK).all(finite)
        }
    };
    if let Some(ok) = with_cpu_f32(g, check)? {
        return Ok(ok);
    }
    let z = g.sub(g)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok(z == 0.0)
}

/// Sum of squares in f64 (for norms: f64 accumulation keeps 11M-element norms accurate).
pub(crate) fn sum_sq(x: &[f32]) -> f64 {
    // Four accumulators let the compiler vectorise without reassociating floats itself.
    let mut acc = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..4 {
            acc[k] += (c[k] as f64) * (c[k] as f64);
        }
    }
    let tail: f64 = rest.iter().map(|&v| (v as f64) * (v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}
