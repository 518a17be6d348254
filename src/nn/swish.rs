//! Swish (SiLU), x · sigmoid(x): EfficientNet's activation, with a one-pass backward on the CPU.
//!
//! candle's `silu` backward builds the sigmoid again and then four full-size temporaries; here the
//! gradient dy · s · (1 + x · (1 − s)), s = sigmoid(x), is one loop over x and dy.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::cpu::{f32_slice, fast_cpu_f32, internal, par_map_values, par_zip_values, with_f32};
use super::error::Result;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

struct Swish;

impl CustomOp1 for Swish {
    fn name(&self) -> &'static str {
        "mpcs-swish"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        Ok((CpuStorage::F32(par_map_values(x, |v| v * sigmoid(v))), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, dy) = (x.contiguous()?, dy.contiguous()?);
        let dx = with_f32(&x, |x| {
            with_f32(&dy, |g| {
                par_zip_values(x, g, |x, g| {
                    let s = sigmoid(x);
                    g * s * (1.0 + x * (1.0 - s))
                })
            })
        })
        .flatten()
        .ok_or_else(|| internal(self.name()))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// x · sigmoid(x), through the fused op for f32 CPU tensors, candle's `silu` otherwise.
pub fn swish(x: &Tensor) -> Result<Tensor> {
    if fast_cpu_f32(x) {
        Ok(x.contiguous()?.apply_op1(Swish)?)
    } else {
        Ok(x.silu()?)
    }
}
