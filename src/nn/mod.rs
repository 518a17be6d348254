//! Neural-network building blocks on candle: torchvision-layout ResNets (plain and dilated),
//! BatchNorm with PyTorch's train/eval semantics, the MPCS projector, the classification head,
//! the contrastive losses, and weight import/export by torchvision names.

pub mod batchnorm;
pub mod error;
pub mod head;
pub mod loss;
pub mod pool;
pub mod projector;
pub mod resnet;
pub mod weights;

pub use batchnorm::BatchNorm;
pub use error::{NnError, Result};
pub use head::Head;
pub use loss::{mpcs_loss, nt_xent_symmetric, TEMPERATURE};
pub use projector::{l2_normalize, Projector};
pub use resnet::{Arch, Dilation, ResNet};
pub use weights::{
    load_into, load_into_with, save, save_with, trainable_vars, LoadOptions, LoadReport,
};
