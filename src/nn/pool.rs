//! Max pooling with padding (the ResNet stem's 3×3, stride 2, padding 1).
//!
//! candle's `max_pool2d` has no padding, and its backward pass only supports kernel == stride.
//! For f32 on the CPU a custom op pools directly and, in the backward pass, sends each output's
//! gradient to the first maximum of its window (PyTorch's rule; padding never wins).
//! Elsewhere a composed version pads with -inf (what PyTorch does implicitly) and takes the
//! maximum over the kernel's shifted, strided views with `Tensor::maximum`, whose backward pass
//! exists on every device; it is separable (width, then height). On ties that version splits the
//! gradient between the tied inputs; after a ReLU the only likely ties are zeros, whose gradient
//! the ReLU discards anyway.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::cpu::{f32_slice, fast_cpu_f32, internal, par_filled, with_f32};
use super::error::{NnError, Result};

/// The 2-D max-pool custom op (f32, CPU).
#[derive(Clone, Copy)]
struct MaxPool {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool {
    fn out_size(&self, len: usize) -> usize {
        (len + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// The input range `a..b` (clipped to `0..len`) of output index `o`'s window.
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        (start.max(0) as usize, ((start + self.kernel as isize) as usize).min(len))
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "mpcs-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        // Separable: the maximum over each window's columns for every input row, then over rows.
        // The same values as the argmax scan of the backward pass, with fewer branches.
        let col_ranges: Vec<(usize, usize)> = (0..ow).map(|o| self.window(o, w)).collect();
        let row_ranges: Vec<(usize, usize)> = (0..oh).map(|o| self.window(o, h)).collect();
        // Planes in parallel; each task keeps its row maxima (h × ow) in a small buffer.
        let y = par_filled(n * c * oh * ow, oh * ow, |i, out| {
            let plane = &x[i * h * w..(i + 1) * h * w];
            let mut rows = vec![f32::NEG_INFINITY; h * ow];
            for (src, dst) in plane.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
                for (d, &(a, b)) in dst.iter_mut().zip(&col_ranges) {
                    *d = src[a..b].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                }
            }
            for (dst, &(a, b)) in out.chunks_exact_mut(ow).zip(&row_ranges) {
                dst.copy_from_slice(&rows[a * ow..(a + 1) * ow]);
                for r in a + 1..b {
                    for (d, &v) in dst.iter_mut().zip(&rows[r * ow..(r + 1) * ow]) {
                        *d = d.max(v);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let dy = dy.contiguous()?;
        let col_ranges: Vec<(usize, usize)> = (0..ow).map(|o| self.window(o, w)).collect();
        let row_ranges: Vec<(usize, usize)> = (0..oh).map(|o| self.window(o, h)).collect();
        let dx = with_f32(x, |xs| {
            with_f32(y, |ys| {
                with_f32(&dy, |g| {
                    par_filled(xs.len(), h * w, |i, dp| {
                        let plane = &xs[i * h * w..(i + 1) * h * w];
                        let (yp, gp) = (&ys[i * oh * ow..(i + 1) * oh * ow], &g[i * oh * ow..(i + 1) * oh * ow]);
                        for (oy, &(ya, yb)) in row_ranges.iter().enumerate() {
                            for (ox, &(xa, xb)) in col_ranges.iter().enumerate() {
                                let o = oy * ow + ox;
                                // The first input of the window (row-major) equal to the output is
                                // PyTorch's argmax; a NaN output matches the window's first NaN.
                                let target = yp[o];
                                let hit = (ya..yb).find_map(|r| {
                                    let row = &plane[r * w + xa..r * w + xb];
                                    row.iter()
                                        .position(|&v| v == target || (target.is_nan() && v.is_nan()))
                                        .map(|i| r * w + xa + i)
                                });
                                if let Some(i) = hit {
                                    dp[i] += gp[o];
                                }
                            }
                        }
                    })
                })
            })
        })
        .flatten()
        .flatten()
        .ok_or_else(|| internal(self.name()))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

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
    let (h_in, w_in) = (x.dim(2)?, x.dim(3)?);
    if kernel == 0 || stride == 0 || padding * 2 > kernel || h_in.min(w_in) + 2 * padding < kernel {
        return Err(NnError::InvalidInput(format!(
            "max pool: kernel {kernel}, stride {stride}, padding {padding} do not fit an input of {h_in}x{w_in}"
        )));
    }
    if fast_cpu_f32(x) {
        return Ok(x.contiguous()?.apply_op1(MaxPool { kernel, stride, padding })?);
    }
    max_pool2d_composed(x, kernel, stride, padding)
}

/// [`max_pool2d_padded`] through candle tensor ops on any device (ties split the gradient).
pub fn max_pool2d_composed(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(NnError::InvalidInput(format!("max pool expects an (N, C, H, W) tensor, got {:?}", x.dims())));
    }
    let w = max_pool_1d(x, 3, kernel, stride, padding)?;
    let h = max_pool_1d(&w, 2, kernel, stride, padding)?;
    // Keep a plain contiguous layout for the convolutions that follow.
    Ok(h.contiguous()?)
}
