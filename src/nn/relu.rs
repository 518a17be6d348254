//! ReLU with a one-pass backward on the CPU.
//!
//! candle's ReLU backward builds `grad * (x >= 0).to_dtype()` plus an accumulation: four
//! full-size temporaries per activation. Here the gradient is one masked copy (dy where y > 0).
//! Same convention as PyTorch at 0 (gradient 0).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::cpu::{f32_slice, fast_cpu_f32, internal, par_map_values, par_zip_values, relu_grad, with_f32};
use super::error::Result;

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "mpcs-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        Ok((CpuStorage::F32(par_map_values(x, |v| v.max(0.0))), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        let dx = with_f32(y, |y| with_f32(&dy, |g| relu_grad(y, g))).flatten().ok_or_else(|| internal(self.name()))?;
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// max(x, 0), through the fused op for f32 CPU tensors, candle's `relu` otherwise.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if fast_cpu_f32(x) {
        Ok(x.contiguous()?.apply_op1(Relu)?)
    } else {
        Ok(x.relu()?)
    }
}

/// relu(a + b) as one op (the residual join of a ResNet block): one pass forward, and one masked
/// gradient shared by both inputs backward.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "mpcs-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: shapes differ: {:?} and {:?}", self.name(), l1.dims(), l2.dims());
        }
        let (a, b) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(par_zip_values(a, b, |a, b| (a + b).max(0.0))), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let g = with_f32(y, |y| with_f32(&dy, |g| relu_grad(y, g))).flatten().ok_or_else(|| internal(self.name()))?;
        let g = Tensor::from_vec(g, y.shape(), y.device())?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// relu(a + b) for two tensors of one shape: fused for f32 CPU tensors, candle's ops otherwise.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast_cpu_f32(a) && fast_cpu_f32(b) && a.shape() == b.shape() {
        Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
    } else {
        Ok((a + b)?.relu()?)
    }
}
