//! An encoder (ResNet or EfficientNet-b2, with its classifier when the weights have one) loaded for inference.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::error::{InferError, Result};
use crate::nn::weights::{detect_arch, read_tensors};
use crate::nn::{load_into_with, no_grad, Arch, Dilation, Encoder, Head, LoadOptions};

/// Encoder + optional linear classifier `fc`, in eval mode (BatchNorm running statistics).
pub struct Model {
    pub net: Encoder,
    /// The classifier (`fc` in torchvision's ResNet, `_fc` in efficientnet_pytorch, as `train::finetune`
    /// saves it); `None` for encoder-only weights.
    pub fc: Option<Head>,
    /// Number of outputs of `fc` (0 without one).
    pub outputs: usize,
    // Owns the variables `net` and `fc` read.
    _varmap: VarMap,
}

/// Loads `weights` (a torchvision `.pth`/`.safetensors`, an MPCS `backbone.safetensors` or a fine-tuned
/// `model.safetensors`). The number of outputs comes from `fc.weight`'s shape; every tensor must match
/// (strict), so weights of another depth are refused with the depth they look like.
pub fn load_model(arch: Arch, weights: &Path, device: &Device) -> Result<Model> {
    load_model_with(arch, Dilation::None, weights, device)
}

/// [`load_model`] for a dilated ResNet (the paper's BACH / breast-cell encoder: output stride 8 or 16). The
/// weights are the same tensors; the dilation changes what the network computes, so it must match training.
pub fn load_model_with(arch: Arch, dilation: Dilation, weights: &Path, device: &Device) -> Result<Model> {
    let tensors = read_tensors(weights)?;
    match detect_arch(tensors.keys().map(String::as_str)) {
        None => return Err(InferError::UnknownWeights { path: weights.to_path_buf() }),
        Some(found) if found != arch => {
            return Err(InferError::WrongArch {
                path: weights.to_path_buf(),
                requested: arch.name().into(),
                detected: found.name().into(),
            })
        }
        Some(_) => {}
    }
    let outputs = match tensors.get(&format!("{}.weight", arch.classifier())) {
        Some(t) if t.rank() == 2 => t.dim(0)?,
        _ => 0,
    };
    drop(tensors);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = Encoder::new(arch, vb.clone(), None, dilation)?;
    // Head with dropout 0 is exactly torchvision's `fc` (Linear) under the same names.
    let fc = (outputs > 0).then(|| Head::new(vb.pp(arch.classifier()), net.feature_dim(), outputs, 0.0)).transpose()?;
    load_into_with(&varmap, weights, &LoadOptions::default())?;
    Ok(Model { net, fc, outputs, _varmap: varmap })
}

impl Model {
    /// Raw outputs (N, outputs) of an (N, 3, H, W) batch.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let f = no_grad(|| self.net.features_t(x, false))?;
        match &self.fc {
            Some(fc) => Ok(fc.forward_t(&f, false)?),
            None => Err(InferError::Usage("the model has no classifier".into())),
        }
    }

    /// Globally average-pooled encoder features (N, feature_dim).
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(no_grad(|| self.net.features_t(x, false))?)
    }
}
