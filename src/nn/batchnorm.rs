//! BatchNorm with PyTorch's semantics in both modes, for any input of rank >= 2 (N, C, ...).
//!
//! candle-nn has a BatchNorm too; this one exists so that (a) the training output stays in NCHW
//! layout (no transpose + copy per layer), (b) `num_batches_tracked` is kept as an i64 variable
//! like PyTorch's buffer, so a saved state dict loads into PyTorch with `strict=True`, and
//! (c) the parameter names and initial values follow `torch.nn.BatchNorm{1,2}d` exactly.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

use super::cpu::{f32_slice, fast_cpu_f32, internal, par_filled, par_map, with_f32, zeros};
use super::error::{NnError, Result};
use super::grad::grad_enabled;

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

    /// A BatchNorm with learnable parameters and other hyper-parameters than PyTorch's defaults
    /// (EfficientNet's: eps 1e-3, momentum 0.01, from TensorFlow's decay 0.99).
    pub fn with_eps_momentum(num_features: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { eps, momentum, ..Self::new(num_features, vb)? })
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
        if let (Some((w, b)), true) = (&self.weight_and_bias, fast_cpu_f32(x)) {
            if fast_cpu_f32(w) && fast_cpu_f32(b) {
                return self.forward_train_fused(x, w, b, false);
            }
        }
        self.forward_train_composed(x)
    }

    /// [`BatchNorm::forward_train`] through candle tensor ops on any device and dtype (what non-CPU
    /// tensors use; the reference the fused CPU path is tested against).
    pub fn forward_train_composed(&self, x: &Tensor) -> Result<Tensor> {
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

    /// `relu(self.forward_t(x, train))`, fused into one op in CPU f32 training (the ResNet's
    /// conv → bn → relu: one graph node and one pass fewer, forward and backward).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let (true, Some((w, b))) = (train, &self.weight_and_bias) {
            if fast_cpu_f32(x) && fast_cpu_f32(w) && fast_cpu_f32(b) {
                return self.forward_train_fused(x, w, b, true);
            }
        }
        if !train {
            return self.eval_impl(x, true);
        }
        super::relu::relu(&self.forward_t(x, train)?)
    }

    /// Training (batch statistics, running averages updated) or evaluation mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(x)
        } else {
            self.forward_eval(x)
        }
    }

    /// Evaluation mode: normalise with the running statistics, as one per-channel scale and shift
    /// (two full-size ops; the per-channel arithmetic is on C values).
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        self.eval_impl(x, false)
    }

    /// Evaluation mode as one per-channel scale and shift (C values each):
    /// y = x · scale + shift with scale = weight / sqrt(running_var + eps) and
    /// shift = bias − running_mean · scale.
    pub fn eval_scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let mean = self.running_mean.as_detached_tensor();
        let inv_std = (self.running_var.as_detached_tensor() + self.eps)?.sqrt()?.recip()?;
        Ok(match &self.weight_and_bias {
            Some((w, b)) => {
                let scale = (w * inv_std)?;
                let shift = (b - (&mean * &scale)?)?;
                (scale, shift)
            }
            None => (inv_std.clone(), (mean.neg()? * inv_std)?),
        })
    }

    /// Evaluation mode, with a ReLU after it when `relu`: one fused op for f32 CPU tensors.
    fn eval_impl(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        if !grad_enabled() && (x.track_op() || self.weight_and_bias.as_ref().is_some_and(|(w, _)| w.track_op())) {
            let detached = Self {
                weight_and_bias: self.weight_and_bias.as_ref().map(|(w, b)| (w.detach(), b.detach())),
                ..self.clone()
            };
            return detached.eval_impl(&x.detach(), relu);
        }
        let shape = self.channel_shape(x)?;
        let (scale, shift) = self.eval_scale_shift()?;
        if fast_cpu_f32(x) && fast_cpu_f32(&scale) && fast_cpu_f32(&shift) {
            let spatial = x.dims()[2..].iter().product::<usize>();
            let op = ChannelAffine { spatial, relu };
            return Ok(x.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, op)?);
        }
        let y = x.broadcast_mul(&scale.reshape(shape.as_slice())?)?.broadcast_add(&shift.reshape(shape.as_slice())?)?;
        if relu {
            Ok(y.relu()?)
        } else {
            Ok(y)
        }
    }

    /// The CPU f32 training path: batch statistics in one loop, normalisation and affine in one
    /// custom op whose backward pass gives dx, dweight and dbias in two passes over the data.
    fn forward_train_fused(&self, x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Result<Tensor> {
        self.channel_shape(x)?;
        let x = x.contiguous()?;
        let c = self.num_features;
        let count = x.elem_count() / c;
        if count < 2 {
            return Err(NnError::InvalidInput(format!(
                "batch-norm in training mode needs more than one value per channel, got input {:?}",
                x.dims()
            )));
        }
        let spatial = x.dims()[2..].iter().product::<usize>();
        let (mean, var) = with_f32(&x, |xs| channel_stats(xs, c, spatial)).ok_or_else(|| internal("batch-norm"))?;
        let invstd: Vec<f32> = var.iter().map(|&v| (1.0 / (v + self.eps).sqrt()) as f32).collect();
        let mean_f32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();

        // Running statistics, in f32 as the tensor-op path computes them.
        let m = self.momentum;
        let unbias = count as f64 / (count as f64 - 1.0);
        let old_mean = self.running_mean.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let old_var = self.running_var.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let new_mean: Vec<f32> =
            old_mean.iter().zip(&mean_f32).map(|(&r, &v)| r * (1.0 - m) as f32 + v * m as f32).collect();
        let new_var: Vec<f32> = old_var
            .iter()
            .zip(&var)
            .map(|(&r, &v)| r * (1.0 - m) as f32 + (v as f32 * unbias as f32) * m as f32)
            .collect();
        let dev = x.device();
        let dtype = self.running_mean.dtype();
        self.running_mean.set(&Tensor::from_vec(new_mean, c, dev)?.to_dtype(dtype)?)?;
        self.running_var.set(&Tensor::from_vec(new_var, c, dev)?.to_dtype(dtype)?)?;
        let one = Tensor::ones((), DType::I64, dev)?;
        self.num_batches_tracked.set(&(self.num_batches_tracked.as_tensor() + one)?)?;

        Ok(x.apply_op3(&w.contiguous()?, &b.contiguous()?, BnTrain { mean: mean_f32, invstd, spatial, relu })?)
    }
}

/// Plane `i` (`len` values) of a contiguous buffer.
fn plane(v: &[f32], i: usize, len: usize) -> &[f32] {
    &v[i * len..(i + 1) * len]
}

/// Per-channel mean and biased variance (two passes, f64 accumulation) of a contiguous
/// (N, C, spatial) buffer. Planes are summed in parallel and their sums added in plane order, so
/// the result does not depend on the thread count.
fn channel_stats(x: &[f32], c: usize, spatial: usize) -> (Vec<f64>, Vec<f64>) {
    let planes = x.len() / spatial;
    let plane = |i: usize| &x[i * spatial..(i + 1) * spatial];
    let plane_sums = par_map(planes, spatial, |i| plane(i).iter().map(|&v| v as f64).sum::<f64>());
    let mut sum = vec![0f64; c];
    for (i, s) in plane_sums.iter().enumerate() {
        sum[i % c] += s;
    }
    let count = (x.len() / c) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let plane_sq = par_map(planes, spatial, |i| {
        let m = mean[i % c];
        plane(i).iter().map(|&v| (v as f64 - m) * (v as f64 - m)).sum::<f64>()
    });
    let mut sq = vec![0f64; c];
    for (i, s) in plane_sq.iter().enumerate() {
        sq[i % c] += s;
    }
    (mean, sq.iter().map(|s| s / count).collect())
}

/// y = x · scale[c] + shift[c] for a contiguous (N, C, spatial) x, then max(y, 0) when `relu`:
/// the forward pass of both BatchNorm modes, planes in parallel.
fn channel_affine(x: &[f32], spatial: usize, scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
    let c = scale.len();
    par_filled(x.len(), spatial, |i, out| {
        let (a, b) = (scale[i % c], shift[i % c]);
        let block = &x[i * spatial..];
        if relu {
            for (o, &v) in out.iter_mut().zip(block) {
                *o = (v * a + b).max(0.0);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(block) {
                *o = v * a + b;
            }
        }
    })
}

/// y = (x − mean) · invstd · weight + bias with the batch statistics fixed at construction,
/// followed by max(y, 0) when `relu`.
struct BnTrain {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    spatial: usize,
    relu: bool,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "mpcs-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (w, b) = (f32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let scale: Vec<f32> = self.invstd.iter().zip(w).map(|(&is, &w)| is * w).collect();
        let shift: Vec<f32> = b.iter().zip(&self.mean).zip(&scale).map(|((&b, &m), &a)| b - m * a).collect();
        let y = channel_affine(x, self.spatial, &scale, &shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let c = self.mean.len();
        let s = self.spatial;
        let wv = w.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let need_dx = x.track_op();
        let relu = self.relu;
        let (dx, dw, db) = with_f32(x, |xs| {
            with_f32(y, |ys| {
                with_f32(&dy, |g| {
                    // The gradient through the ReLU (when fused): it only passes where y > 0.
                    let grad = |y: f32, g: f32| if relu && y <= 0.0 { 0.0 } else { g };
                    // Pass 1: per plane Σdy and Σdy·x̂ (in parallel), added per channel in order.
                    let plane_sums = par_map(xs.len() / s, s, |i| {
                        let ch = i % c;
                        let (m, is) = (self.mean[ch], self.invstd[ch]);
                        let (mut a, mut bsum) = (0f32, 0f32);
                        for ((&xv, &yv), &gv) in plane(xs, i, s).iter().zip(plane(ys, i, s)).zip(plane(g, i, s)) {
                            let gv = grad(yv, gv);
                            a += gv;
                            bsum += gv * (xv - m) * is;
                        }
                        (a, bsum)
                    });
                    let mut sum_dy = vec![0f64; c];
                    let mut sum_dy_xhat = vec![0f64; c];
                    for (i, &(a, bsum)) in plane_sums.iter().enumerate() {
                        sum_dy[i % c] += a as f64;
                        sum_dy_xhat[i % c] += bsum as f64;
                    }
                    // Pass 2: dx = w·invstd·(dy − Σdy/M − x̂·Σdy·x̂/M).
                    let dx = need_dx.then(|| {
                        let count = (xs.len() / c) as f64;
                        par_filled(xs.len(), s, |i, db| {
                            let ch = i % c;
                            let (m, is) = (self.mean[ch], self.invstd[ch]);
                            let k = wv[ch] * is;
                            let mean_dy = (sum_dy[ch] / count) as f32;
                            let mean_dy_xhat = (sum_dy_xhat[ch] / count) as f32;
                            let planes = plane(xs, i, s).iter().zip(plane(ys, i, s)).zip(plane(g, i, s));
                            for (d, ((&xv, &yv), &gv)) in db.iter_mut().zip(planes) {
                                let xhat = (xv - m) * is;
                                *d = k * (grad(yv, gv) - mean_dy - xhat * mean_dy_xhat);
                            }
                        })
                    });
                    let to_f32 = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
                    (dx, to_f32(sum_dy_xhat), to_f32(sum_dy))
                })
            })
        })
        .flatten()
        .flatten()
        .ok_or_else(|| internal(self.name()))?;
        let dev = x.device();
        let dx = match dx {
            Some(dx) => Some(Tensor::from_vec(dx, x.shape(), dev)?),
            None => None,
        };
        Ok((dx, Some(Tensor::from_vec(dw, c, dev)?), Some(Tensor::from_vec(db, c, dev)?)))
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

/// y = x · scale[c] + shift[c] (then max(y, 0) when `relu`) for a contiguous (N, C, spatial) x:
/// evaluation-mode batch-norm in one pass. Gradients flow to x, scale and shift (and from those,
/// through candle's ops on C values, to the weight and bias), e.g. for Grad-CAM or fine-tuning
/// with frozen statistics.
struct ChannelAffine {
    spatial: usize,
    relu: bool,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "mpcs-channel-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let (scale, shift) = (f32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let y = channel_affine(x, self.spatial, scale, shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let sc = scale.to_vec1::<f32>()?;
        let c = sc.len();
        let s = self.spatial;
        let (want_dx, want_params) = (x.track_op(), scale.track_op() || shift.track_op());
        let (dx, dscale, dshift) = with_f32(x, |xs| {
            with_f32(y, |ys| {
                with_f32(&dy, |g| {
                    let mut dx = if want_dx { zeros(xs.len()) } else { Vec::new() };
                    let (mut dscale, mut dshift) = (vec![0f64; c], vec![0f64; c]);
                    for i in 0..xs.len() / s {
                        let ch = i % c;
                        let r = i * s..(i + 1) * s;
                        let (xb, yb, gb) = (&xs[r.clone()], &ys[r.clone()], &g[r.clone()]);
                        let (mut a, mut b) = (0f32, 0f32);
                        for j in 0..s {
                            let gv = if self.relu && yb[j] <= 0.0 { 0.0 } else { gb[j] };
                            if want_dx {
                                dx[i * s + j] = gv * sc[ch];
                            }
                            a += gv * xb[j];
                            b += gv;
                        }
                        dscale[ch] += a as f64;
                        dshift[ch] += b as f64;
                    }
                    let to_f32 = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
                    (dx, to_f32(dscale), to_f32(dshift))
                })
            })
        })
        .flatten()
        .flatten()
        .ok_or_else(|| internal(self.name()))?;
        let dev = x.device();
        let dx = if want_dx { Some(Tensor::from_vec(dx, x.shape(), dev)?) } else { None };
        let (ds, dh) = if want_params {
            (Some(Tensor::from_vec(dscale, c, dev)?), Some(Tensor::from_vec(dshift, c, dev)?))
        } else {
            (None, None)
        };
        Ok((dx, ds, dh))
    }
}
