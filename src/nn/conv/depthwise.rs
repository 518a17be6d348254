//! Depthwise convolution (`groups = channels`, one k×k filter per channel) with asymmetric zero
//! padding: EfficientNet's `_depthwise_conv` under TensorFlow-style "same" padding.
//!
//! candle runs a grouped convolution as one convolution per group followed by a concatenation
//! (1 056 tiny im2col + GEMM calls for one EfficientNet-b2 layer), so on the CPU this is a direct
//! kernel: per (image, channel) plane, each of the k² taps adds a shifted row of the input times
//! one weight (contiguous and vectorised at stride 1). Both gradients are direct loops too: the
//! input gradient scatters per plane, the weight gradient sums each channel over the batch in a
//! fixed order, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::valid_range;
use crate::nn::cpu::{f32_slice, fast_cpu_f32, par_chunks, par_filled};
use crate::nn::error::{NnError, Result};
use crate::nn::grad::grad_enabled;

/// Zero padding on each side (top, bottom, left, right), as `torch.nn.ZeroPad2d` takes it in the
/// order (left, right, top, bottom).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    pub fn uniform(p: usize) -> Self {
        Padding { top: p, bottom: p, left: p, right: p }
    }
}

/// Shapes of one depthwise convolution: input (n, c, h, w), weight (c, 1, k, k).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: Padding,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &[usize], wt: &[usize], stride: usize, pad: Padding) -> Result<Self> {
        let bad = |m: String| Err(NnError::InvalidInput(m));
        if x.len() != 4 || wt.len() != 4 {
            return bad(format!(
                "depthwise conv: expects input (N, C, H, W) and weight (C, 1, K, K), got {x:?} and {wt:?}"
            ));
        }
        if wt[0] != x[1] || wt[1] != 1 || wt[2] != wt[3] {
            return bad(format!(
                "depthwise conv: weight {wt:?} does not fit input {x:?} (expected ({}, 1, K, K))",
                x[1]
            ));
        }
        if stride == 0 {
            return bad("depthwise conv: stride must be at least 1".into());
        }
        let (ph, pw) = (x[2] + pad.top + pad.bottom, x[3] + pad.left + pad.right);
        let k = wt[2];
        if k == 0 || ph < k || pw < k {
            return bad(format!("depthwise conv: kernel {k}x{k} does not fit the padded input {ph}x{pw}"));
        }
        Ok(Geometry {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            k,
            stride,
            pad,
            oh: (ph - k) / stride + 1,
            ow: (pw - k) / stride + 1,
        })
    }

    fn plane_in(&self) -> usize {
        self.h * self.w
    }

    fn plane_out(&self) -> usize {
        self.oh * self.ow
    }

    /// For each tap column kx, the output columns [lo, hi) whose input column is inside the image. The same for
    /// every row and plane, so computed once per call rather than per row and tap (it divides).
    fn tap_columns(&self) -> Vec<(usize, usize)> {
        (0..self.k).map(|kx| valid_range(self.ow, self.w, self.stride, self.pad.left, kx)).collect()
    }

    /// The input row read by output row `oy` at tap row `ky`, when inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride + ky).checked_sub(self.pad.top)?;
        (iy < self.h).then_some(iy)
    }
}

/// y = depthwise(x, w), one plane per chunk.
fn forward(g: &Geometry, x: &[f32], wt: &[f32]) -> Vec<f32> {
    let (k, s, pl) = (g.k, g.stride, g.pad.left);
    let columns = g.tap_columns();
    par_filled(g.n * g.c * g.plane_out(), g.plane_out(), |plane, out| {
        let c = plane % g.c;
        let xp = &x[plane * g.plane_in()..][..g.plane_in()];
        let wc = &wt[c * k * k..][..k * k];
        for oy in 0..g.oh {
            let row = &mut out[oy * g.ow..][..g.ow];
            for ky in 0..k {
                let Some(iy) = g.input_row(oy, ky) else { continue };
                let xr = &xp[iy * g.w..][..g.w];
                for (kx, &(lo, hi)) in columns.iter().enumerate() {
                    let wv = wc[ky * k + kx];
                    // No output reads this tap inside the image (a kernel wider than a tiny input).
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * s + kx - pl;
                    if s == 1 {
                        for (o, &v) in row[lo..hi].iter_mut().zip(&xr[first..]) {
                            *o += wv * v;
                        }
                    } else {
                        for (o, &v) in row[lo..hi].iter_mut().zip(xr[first..].iter().step_by(s)) {
                            *o += wv * v;
                        }
                    }
                }
            }
        }
    })
}

/// dx from dy: every output's gradient, times each tap's weight, added to the input it read.
fn input_grad(g: &Geometry, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    let (k, s, pl) = (g.k, g.stride, g.pad.left);
    let columns = g.tap_columns();
    par_filled(g.n * g.c * g.plane_in(), g.plane_in(), |plane, dxp| {
        let c = plane % g.c;
        let dyp = &dy[plane * g.plane_out()..][..g.plane_out()];
        let wc = &wt[c * k * k..][..k * k];
        for oy in 0..g.oh {
            let gr = &dyp[oy * g.ow..][..g.ow];
            for ky in 0..k {
                let Some(iy) = g.input_row(oy, ky) else { continue };
                let xr = &mut dxp[iy * g.w..][..g.w];
                for (kx, &(lo, hi)) in columns.iter().enumerate() {
                    let wv = wc[ky * k + kx];
                    // No output reads this tap inside the image (a kernel wider than a tiny input).
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * s + kx - pl;
                    if s == 1 {
                        for (d, &v) in xr[first..].iter_mut().zip(&gr[lo..hi]) {
                            *d += wv * v;
                        }
                    } else {
                        for (d, &v) in xr[first..].iter_mut().step_by(s).zip(&gr[lo..hi]) {
                            *d += wv * v;
                        }
                    }
                }
            }
        }
    })
}

/// dw from x and dy: per channel, the sum over the batch (in image order) of each tap's
/// input-times-gradient products.
fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, s, pl) = (g.k, g.stride, g.pad.left);
    let columns = g.tap_columns();
    let mut dw = vec![0f32; g.c * k * k];
    par_chunks(&mut dw, k * k, |c, dwc| {
        for img in 0..g.n {
            let plane = img * g.c + c;
            let xp = &x[plane * g.plane_in()..][..g.plane_in()];
            let dyp = &dy[plane * g.plane_out()..][..g.plane_out()];
            for ky in 0..k {
                for (kx, &(lo, hi)) in columns.iter().enumerate() {
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * s + kx - pl;
                    let mut acc = 0f32;
                    for oy in 0..g.oh {
                        let Some(iy) = g.input_row(oy, ky) else { continue };
                        let xr = &xp[iy * g.w..][..g.w];
                        let gr = &dyp[oy * g.ow..][..g.ow];
                        if s == 1 {
                            acc += gr[lo..hi].iter().zip(&xr[first..]).map(|(a, b)| a * b).sum::<f32>();
                        } else {
                            acc +=
                                gr[lo..hi].iter().zip(xr[first..].iter().step_by(s)).map(|(a, b)| a * b).sum::<f32>();
                        }
                    }
                    dwc[ky * k + kx] += acc;
                }
            }
        }
    });
    dw
}

#[derive(Clone, Copy, Debug)]
struct DepthwiseOp {
    stride: usize,
    pad: Padding,
}

impl DepthwiseOp {
    fn geometry(&self, x: &[usize], w: &[usize]) -> candle_core::Result<Geometry> {
        Geometry::new(x, w, self.stride, self.pad).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl CustomOp2 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "mpcs-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.geometry(l1.dims(), l2.dims())?;
        let y = forward(&g, f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let g = self.geometry(x.dims(), w.dims())?;
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &InputGrad { g })?) } else { None };
        let dw = if w.track_op() { Some(x.apply_op2_no_bwd(&dy, &WeightGrad { g })?) } else { None };
        Ok((dx, dw))
    }
}

/// (dy, weight) → dx.
struct InputGrad {
    g: Geometry,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "mpcs-depthwise-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.g;
        if l1.dims() != [g.n, g.c, g.oh, g.ow] {
            candle_core::bail!("{}: gradient shape {:?} does not match the output", self.name(), l1.dims());
        }
        let dx = input_grad(g, f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// (x, dy) → dweight.
struct WeightGrad {
    g: Geometry,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "mpcs-depthwise-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = &self.g;
        if l2.dims() != [g.n, g.c, g.oh, g.ow] {
            candle_core::bail!("{}: gradient shape {:?} does not match the output", self.name(), l2.dims());
        }
        let dw = weight_grad(g, f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(dw), Shape::from((g.c, 1, g.k, g.k))))
    }
}

/// Depthwise convolution of x (N, C, H, W) with weight (C, 1, K, K), no bias, after zero padding
/// `pad`: `F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride, groups=C)`. f32 on the
/// CPU takes the direct kernel; anything else [`depthwise_conv2d_candle`].
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Padding) -> Result<Tensor> {
    Geometry::new(x.dims(), w.dims(), stride, pad)?;
    // Under bf16 autocast (`nn::precision`): candle's grouped convolution on bf16 copies.
    super::super::precision::with_compute_dtype(x, w, |x, w| depthwise_conv2d_as_is(x, w, stride, pad))
}

/// [`depthwise_conv2d`] in the dtype of its arguments.
fn depthwise_conv2d_as_is(x: &Tensor, w: &Tensor, stride: usize, pad: Padding) -> Result<Tensor> {
    if !(fast_cpu_f32(x) && fast_cpu_f32(w)) {
        return depthwise_conv2d_candle(x, w, stride, pad);
    }
    let op = DepthwiseOp { stride, pad };
    if !grad_enabled() {
        return Ok(x.detach().contiguous()?.apply_op2_no_bwd(&w.detach().contiguous()?, &op)?);
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// The same through candle's ops: explicit zero padding, then a grouped convolution (the reference
/// the kernel is tested against, and the GPU path).
pub fn depthwise_conv2d_candle(x: &Tensor, w: &Tensor, stride: usize, pad: Padding) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.dims(), stride, pad)?;
    let x = if grad_enabled() { x.clone() } else { x.detach() };
    Ok(pad_for_candle(&x, pad, g.k, stride)?.conv2d(w, 0, stride, 1, g.c)?)
}

/// Zero-pads x (N, C, H, W) by `pad`, then drops the trailing rows and columns no output of a k×k
/// convolution at `stride` reads: candle's convolution backward returns an input gradient without
/// them (its shape then mismatches the input and backward fails) when (padded − k) is not a
/// multiple of the stride, as EfficientNet's static padding makes it at many input sizes.
pub fn pad_for_candle(x: &Tensor, pad: Padding, k: usize, stride: usize) -> Result<Tensor> {
    let x = x.pad_with_zeros(2, pad.top, pad.bottom)?.pad_with_zeros(3, pad.left, pad.right)?;
    let (_, _, h, w) = x.dims4()?;
    let used = |size: usize| if size < k { size } else { (size - k) / stride * stride + k };
    let (uh, uw) = (used(h), used(w));
    if (uh, uw) == (h, w) {
        return Ok(x);
    }
    Ok(x.narrow(2, 0, uh)?.narrow(3, 0, uw)?)
}
