//! The error type of the `nn` module.

use std::path::PathBuf;

/// Errors raised while building models, loading or saving weights, or computing losses.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// An architecture name that is not one of the supported encoders.
    #[error("unknown architecture '{name}'; valid choices: resnet18, resnet34, resnet50, resnet101, resnet152, efficientnet_b2")]
    UnknownArch { name: String },

    /// Only the bottleneck ResNets have a dilated form (torchvision's BasicBlock and EfficientNet have none).
    #[error("{arch} has no dilated variant (as in torchvision, only bottleneck ResNets dilate); use resnet50/101/152 for output stride {output_stride}")]
    DilationUnsupported { arch: String, output_stride: usize },

    /// An output stride other than 8, 16 or 32.
    #[error("output stride {0} is not supported; choose 32 (plain), 16 or 8 (dilated)")]
    BadOutputStride(usize),

    /// A checkpoint tensor whose shape differs from the model's parameter.
    #[error("{path}: tensor '{name}' has shape {found:?} but the model expects {expected:?}{hint}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize>, hint: String },

    /// Model parameters that the checkpoint lacks (strict loading).
    #[error("{path}: the checkpoint lacks {count} tensor(s) the model needs, e.g. {examples}{hint}")]
    MissingTensors { path: PathBuf, count: usize, examples: String, hint: String },

    /// Checkpoint tensors that the model has no parameter for (strict loading).
    #[error("{path}: the checkpoint has {count} tensor(s) the model does not use, e.g. {examples}{hint}")]
    UnexpectedTensors { path: PathBuf, count: usize, examples: String, hint: String },

    /// A weights file that cannot be read or parsed.
    #[error("{path}: {msg}")]
    BadWeightsFile { path: PathBuf, msg: String },

    /// A filesystem error on a given path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Invalid arguments to a layer or loss (shapes, probabilities, temperatures).
    #[error("{0}")]
    InvalidInput(String),

    /// An error from candle itself.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, NnError>;
