//! The MPCS projection head: Linear(no bias) → BatchNorm1d → ReLU → Linear(no bias) →
//! BatchNorm1d(affine=False) → L2 normalisation.
//!
//! Parameter names follow a PyTorch `nn.Sequential` of those five modules, so under a prefix `p`
//! they are `p.0.weight`, `p.1.{weight,bias,running_*}`, `p.3.weight`, `p.4.running_*`.

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};

use super::batchnorm::BatchNorm;
use super::error::{NnError, Result};
use super::precision::linear as linear_at_precision;
use super::resnet::linear;

/// MPCS's defaults: 2048 → 1024 → 128.
pub const HIDDEN_DIM: usize = 1024;
pub const OUT_DIM: usize = 128;

#[derive(Clone, Debug)]
pub struct Projector {
    fc1: Linear,
    bn1: BatchNorm,
    fc2: Linear,
    bn2: BatchNorm,
    in_dim: usize,
}

impl Projector {
    /// `in_dim` is the encoder's feature width (2048 for ResNet-50).
    pub fn new(vb: VarBuilder, in_dim: usize, hidden_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            fc1: linear(vb.pp("0"), in_dim, hidden_dim, false)?,
            bn1: BatchNorm::new(hidden_dim, vb.pp("1"))?,
            fc2: linear(vb.pp("3"), hidden_dim, out_dim, false)?,
            bn2: BatchNorm::with_affine(out_dim, false, vb.pp("4"))?,
            in_dim,
        })
    }

    /// (N, in_dim) → (N, out_dim), each row of unit L2 norm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 2 || x.dim(1)? != self.in_dim {
            return Err(NnError::InvalidInput(format!(
                "projector expects (N, {}) features, got {:?}",
                self.in_dim,
                x.dims()
            )));
        }
        let h = self.bn1.forward_t(&linear_at_precision(&self.fc1, x)?, train)?.relu()?;
        let z = self.bn2.forward_t(&linear_at_precision(&self.fc2, &h)?, train)?;
        l2_normalize(&z)
    }
}

/// Row-wise L2 normalisation as `torch.nn.functional.normalize(x, dim=1)` (eps 1e-12), so a
/// zero row stays zero instead of becoming NaN.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}
