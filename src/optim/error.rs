//! Errors of the optimisers and training-control utilities.

/// What went wrong in an optimiser, scheduler or training-control helper.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A configuration value is out of range (the message names the field, its value and the allowed range).
    #[error("optimiser configuration: {0}")]
    Config(String),
    /// A gradient holds NaN or ±inf; nothing was updated, so the step can be skipped safely.
    #[error(
        "gradient of parameter #{index} (shape {shape:?}) holds NaN or infinity; no parameter was updated: \
         skip this batch, lower the learning rate or clip the gradients"
    )]
    NonFiniteGrad { index: usize, shape: Vec<usize> },
    /// A gradient's shape differs from its parameter's.
    #[error("gradient of parameter #{index} has shape {grad:?} but the parameter has shape {param:?}")]
    GradShape { index: usize, param: Vec<usize>, grad: Vec<usize> },
    /// A metric fed to a scheduler or to early stopping is NaN or infinite.
    #[error("{what} was given the metric {value}, which is not finite; check the loss for divergence")]
    NonFiniteMetric { what: &'static str, value: f64 },
    /// An error from candle (device, dtype, tensor layout).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, OptimError>;
