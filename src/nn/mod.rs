//! Neural-network building blocks on candle: torchvision-layout ResNets (plain and dilated),
//! `efficientnet_pytorch`-layout EfficientNet-b2 (static "same" padding, depthwise convolutions, swish),
//! BatchNorm with PyTorch's train/eval semantics, the MPCS projector, the classification head,
//! the contrastive losses, and weight import/export by torchvision names.
//!
//! For f32 tensors on the CPU the hot layers run as fused candle custom ops with hand-written
//! backward passes: [`conv::conv2d`] (im2col + GEMM; the batch in the vector lanes on small maps), max-pool, ReLU, add+ReLU and BatchNorm
//! (+ReLU) in both modes; on other devices and dtypes the same functions use candle's composed ops.
//! `MPCS_NN_REFERENCE=1` forces the composed ops everywhere (benchmarks' "before" figures).
//! Figures: notes/speed.md; parity tests: tests/nn_fastconv.rs.
//!
//! Typical use (MPCS pretraining): one `VarMap`, the encoder under "encoder." and the projector
//! under "projector.", ImageNet weights loaded into the encoder only, the trainable variables
//! handed to the optimiser, the encoder saved as a plain torchvision state dict.
//!
//! ```text
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
//! let encoder = ResNet::new(Arch::from_str("resnet50")?, vb.pp("encoder"), None, Dilation::None)?;
//! let projector = Projector::new(vb.pp("projector"), encoder.feature_dim(), 1024, 128)?;
//! let opts = LoadOptions { ignore_fc: true, prefix: "encoder.".into(), ..Default::default() };
//! weights::load_into_with(&varmap, Path::new("resnet50.pth"), &opts)?;
//! let params = weights::trainable_vars(&varmap, "");           // BatchNorm buffers excluded
//! // per step, x: (B, 2, 3, H, W) → both views through the encoder as one batch of 2B:
//! let z = projector.forward_t(&encoder.features_t(&views, true)?, true)?; // (2B, 128)
//! let f = Tensor::stack(&[z.narrow(0, 0, b)?, z.narrow(0, b, b)?], 1)?;  // (B, 2, 128)
//! let loss = mpcs_loss(&f, TEMPERATURE)?;
//! weights::save_with(&varmap, Path::new("encoder.safetensors"), "encoder.")?;
//! ```

pub mod batchnorm;
pub mod conv;
mod cpu;
pub mod efficientnet;
pub mod encoder;
pub mod error;
mod grad;
pub mod head;
pub mod loss;
pub mod pool;
pub mod precision;
pub mod projector;
pub mod relu;
pub mod resnet;
pub mod swish;
pub mod weights;

pub use batchnorm::BatchNorm;
pub use cpu::{fast_paths_enabled, set_fast_paths};
pub use efficientnet::EfficientNet;
pub use encoder::{Arch, Encoder};
pub use error::{NnError, Result};
pub use grad::{grad_enabled, no_grad};
pub use head::Head;
pub use loss::{mpcs_loss, nt_xent_symmetric, TEMPERATURE};
pub use precision::{autocast, Precision};
pub use projector::{l2_normalize, Projector};
pub use resnet::{Dilation, ResNet};
pub use weights::{load_into, load_into_with, save, save_with, trainable_vars, LoadOptions, LoadReport};
