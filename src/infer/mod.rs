//! Inference with a trained (or torchvision) ResNet on a folder of images: raw outputs to CSV
//! ([`predict`]), pooled encoder features to safetensors ([`embed`]) and Grad-CAM heat maps ([`cam`]).
//!
//! Inputs are prepared as the training loader does at evaluation: decoded as RGB, resized with
//! `cv2.resize(INTER_LINEAR)` semantics only when a size is asked for, scaled to [0, 1] and optionally
//! normalised with ImageNet mean/std.

pub mod cam;
pub mod embed;
pub mod error;
pub mod images;
pub mod model;
pub mod predict;

pub use cam::{cam_files, grad_cam, jet, overlay, Cam, CamOptions};
pub use embed::{embed, read_embeddings, EmbedOptions};
pub use error::{InferError, Result};
pub use images::{image_tensor, list_images, InputOptions};
pub use model::{load_model, load_model_with, Model};
pub use predict::{predict, PredictOptions};
