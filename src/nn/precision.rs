//! Mixed precision for training: [`autocast`] with [`Precision::Bf16`] runs the convolutions and
//! the linear layers of `mpcs::nn` in bfloat16 while everything else stays f32.
//!
//! What stays f32 and why (the same split as PyTorch's `torch.autocast(dtype=torch.bfloat16)`):
//! the variables themselves (the master weights the optimiser updates, and so the optimiser
//! state), BatchNorm's batch statistics and running buffers, the loss, and every gradient that
//! reaches a variable. Each convolution or linear layer casts its f32 input and weight to bf16,
//! computes, and casts its output back to f32; candle's backward pass of those casts turns the
//! bf16 gradients back into f32 ones. The cost of the casts is small against the products they
//! wrap, and keeping the tensors between layers in f32 means BatchNorm, ReLU and the loss need no
//! bf16 variants at all.
//!
//! bf16 pays where the hardware multiplies bf16 natively (tensor cores on a GPU). candle's CPU
//! backend has no bf16 matmul, so on the CPU bf16 is emulated as the GPU computes it: the operands
//! are rounded to bf16, multiplied and summed in f32 (by the same fused kernels as f32 training),
//! and the result is rounded to bf16; the gradients are rounded the same way on their way back.
//! That costs the roundings on top of an f32 step: `precision = "bf16"` on the CPU is for checking
//! a bf16 run (or running one where no GPU is), not for speed.

use std::cell::Cell;

use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use super::error::Result;

/// The precision a training stage runs its matmuls and convolutions in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32, as the paper.
    #[default]
    F32,
    /// Convolutions and linear layers in bfloat16; BatchNorm, loss and optimiser in f32.
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype the convolutions and linear layers compute in.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision `{other}`; use \"f32\" (the paper's) or \"bf16\"")),
        }
    }
}

thread_local! {
    static COMPUTE: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with this thread's `mpcs::nn` convolutions and linear layers computing at `precision`
/// (PyTorch's `torch.autocast`). The previous setting comes back afterwards, also on a panic.
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    crate::runtime::with_thread_local(&COMPUTE, precision, f)
}

/// The precision in force on this thread.
pub fn current() -> Precision {
    COMPUTE.get()
}

/// The dtype a layer should compute `x` in: Some(bf16) under bf16 autocast for an f32 input,
/// None when the layer runs as it is.
pub(crate) fn cast_to(x: &Tensor) -> Option<DType> {
    match current() {
        Precision::Bf16 if x.dtype() == DType::F32 => Some(DType::BF16),
        _ => None,
    }
}

/// Runs `op` on `x` and `w` cast to the autocast dtype and casts the result back to f32, or runs it
/// on them unchanged when no autocast applies. On the CPU, where candle has no bf16 matmul, the
/// operands are rounded to bf16 and back, `op` runs in f32, and its result is rounded likewise:
/// bf16 operands, f32 accumulation, bf16 result, as a GPU's bf16 GEMM.
pub(crate) fn with_compute_dtype(
    x: &Tensor,
    w: &Tensor,
    op: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let Some(dtype) = cast_to(x) else { return op(x, w) };
    if x.device().is_cpu() {
        let round = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?) };
        return round(&op(&round(x)?, &round(w)?)?);
    }
    Ok(op(&x.to_dtype(dtype)?, &w.to_dtype(dtype)?)?.to_dtype(DType::F32)?)
}

/// `fc(x)`, in bf16 under bf16 autocast (weight and bias cast, output back to f32).
pub(crate) fn linear(fc: &Linear, x: &Tensor) -> Result<Tensor> {
    if cast_to(x).is_none() {
        return Ok(fc.forward(x)?);
    }
    // The product in bf16 (emulated on the CPU, see `with_compute_dtype`); the bias added in f32.
    let y = with_compute_dtype(x, fc.weight(), |x, w| Ok(Linear::new(w.clone(), None).forward(x)?))?;
    Ok(match fc.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
