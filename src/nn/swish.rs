//! Swish (SiLU), x · sigmoid(x): EfficientNet's activation, with a one-pass backward on the CPU.
//!
//! candle's `silu` backward builds the sigmoid again and then four full-size temporaries; here the
//! gradient dy · s · (1 + x · (1 − s)), s = sigmoid(x), is one loop over x and dy.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::cpu::{f32_slice, fast_cpu_f32, internal, par_map_values, par_zip_values, with_f32};
use super::error::Result;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// e^x in f32 without a libm call, so that the loops above vectorise: Cephes' `expf` (range reduction by
/// ln 2 in two parts, a degree-6 polynomial, 2^n put into the exponent bits), within 2 ulp of the exact value on
/// [-87, 88] (see the test). Inputs beyond are clamped (e^x then over- or underflows in f32 anyway); NaN stays
/// NaN through the caller's multiplication by x.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let e = p * r * r + r + 1.0;
    let k = t.to_bits() as i32 - ROUND.to_bits() as i32; // = n
    e * f32::from_bits(((k + 127) << 23) as u32)
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

#[cfg(test)]
mod tests {
    /// Against f64's exp on a dense sweep: at most 2 ulp (relative 2.4e-7) over the range swish uses.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < 2.4e-7, "max relative error {worst:.3e}");
        assert_eq!(super::exp(0.0), 1.0);
        // Beyond the range: no infinity, no NaN, no panic.
        assert!(super::exp(1000.0).is_finite() && super::exp(-1000.0) >= 0.0);
    }
}
