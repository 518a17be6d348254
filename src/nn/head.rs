//! The fine-tuning classification head: Dropout(p) → Linear(num_features, n).
//!
//! The linear layer's parameters are `weight` and `bias` directly under the head's prefix, so a
//! head built at `vb.pp("fc")` saves as torchvision's `fc.weight`/`fc.bias` and the fine-tuned
//! model loads into torchvision's ResNet with `fc = Linear(num_features, n)`.

use candle_core::Tensor;
use candle_nn::{Dropout, Linear, VarBuilder};

use super::error::{NnError, Result};
use super::resnet::linear;

#[derive(Clone, Debug)]
pub struct Head {
    dropout: Dropout,
    p: f32,
    fc: Linear,
    num_features: usize,
}

impl Head {
    /// `p` is the dropout probability, in [0, 1).
    pub fn new(vb: VarBuilder, num_features: usize, num_outputs: usize, p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(NnError::InvalidInput(format!("dropout probability must be in [0, 1), got {p}")));
        }
        Ok(Self { dropout: Dropout::new(p), p, fc: linear(vb, num_features, num_outputs, true)?, num_features })
    }

    pub fn dropout_p(&self) -> f32 {
        self.p
    }

    /// (N, num_features) → (N, num_outputs) logits. Dropout is active only when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if x.rank() != 2 || x.dim(1)? != self.num_features {
            return Err(NnError::InvalidInput(format!(
                "head expects (N, {}) features, got {:?}",
                self.num_features,
                x.dims()
            )));
        }
        let x = if train && self.p > 0.0 { self.dropout.forward(x, true)? } else { x.clone() };
        super::precision::linear(&self.fc, &x)
    }
}
