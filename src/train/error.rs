//! The error type of the `train` module.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value that cannot work (batch size 0, empty portion, ...).
    #[error("training configuration: {0}")]
    Config(String),
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The loss (or a gradient) became NaN or infinite; the last good checkpoint is kept.
    #[error(
        "epoch {epoch}, batch {batch}: the loss is not finite ({value}); training stopped and the last good \
         checkpoint was kept; lower the learning rate or check the input images"
    )]
    NonFiniteLoss { epoch: usize, batch: usize, value: f64 },
    // The wrapped errors are boxed: some are large, and every `Result` of this module carries the enum.
    #[error(transparent)]
    Nn(Box<crate::nn::NnError>),
    #[error(transparent)]
    Optim(Box<crate::optim::OptimError>),
    #[error(transparent)]
    Loader(Box<crate::loader::LoaderError>),
    #[error(transparent)]
    Data(Box<crate::data::DataError>),
    #[error("tensor computation failed: {0}")]
    Candle(Box<candle_core::Error>),
}

macro_rules! boxed_from {
    ($($variant:ident: $ty:ty),*) => {$(
        impl From<$ty> for TrainError {
            fn from(e: $ty) -> Self {
                TrainError::$variant(Box::new(e))
            }
        }
    )*};
}
boxed_from!(
    Nn: crate::nn::NnError,
    Optim: crate::optim::OptimError,
    Loader: crate::loader::LoaderError,
    Data: crate::data::DataError,
    Candle: candle_core::Error
);

pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
        move |source| TrainError::Io { path: path.to_path_buf(), source }
    }
}
