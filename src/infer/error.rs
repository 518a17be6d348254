//! The error type of `infer`. Every message names the file at fault and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("{}: no such folder; pass the folder that holds the images", path.display())]
    NoDir { path: PathBuf },
    #[error("{}: no images found (looked for .png, .jpg, .jpeg, .tif, .tiff in it and its sub-folders)", path.display())]
    NoImages { path: PathBuf },
    #[error("{}: cannot decode the image ({reason}); re-download or remove it", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("{}: these weights look like {detected}, not {requested}; use --arch {detected}", path.display())]
    WrongArch { path: PathBuf, requested: String, detected: String },
    #[error("{}: these weights look like neither a torchvision ResNet (layer1..layer4 tensors) nor an efficientnet_pytorch EfficientNet (_conv_stem, _blocks tensors)", path.display())]
    UnknownWeights { path: PathBuf },
    #[error("{}: these weights have no classifier (fc.weight); they are an encoder only: use `mpcs embed` for features, or pass a fine-tuned model.safetensors", path.display())]
    NoHead { path: PathBuf },
    #[error("{}: the model has {found} outputs but --classes says {expected}; drop --classes or pass the matching weights", path.display())]
    ClassCount { path: PathBuf, expected: usize, found: usize },
    #[error("class {class} is out of range: the model has {outputs} outputs (0..{outputs})")]
    ClassOutOfRange { class: usize, outputs: usize },
    #[error("{0}")]
    Usage(String),
    // Boxed: NnError is large and would make every Result of this module large.
    #[error(transparent)]
    Weights(Box<crate::nn::NnError>),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("computation failed: {0}")]
    Candle(Box<candle_core::Error>),
}

impl From<crate::nn::NnError> for InferError {
    fn from(e: crate::nn::NnError) -> Self {
        InferError::Weights(Box::new(e))
    }
}

impl From<candle_core::Error> for InferError {
    fn from(e: candle_core::Error) -> Self {
        InferError::Candle(Box::new(e))
    }
}

impl InferError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> InferError + '_ {
        move |source| InferError::Io { path: path.to_path_buf(), source }
    }

    /// True when the error is the user's input (exit code 2), false for the environment or a bug.
    pub fn is_user(&self) -> bool {
        match self {
            InferError::Io { .. } | InferError::Candle(_) => false,
            InferError::Weights(e) => !matches!(**e, crate::nn::NnError::Io { .. } | crate::nn::NnError::Candle(_)),
            _ => true,
        }
    }
}

pub type Result<T> = std::result::Result<T, InferError>;
