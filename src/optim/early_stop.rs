//! Early stopping on a validation metric (Keras `EarlyStopping` semantics: an improvement must beat the best
//! value by more than `min_delta`; stop once `patience` epochs in a row brought none).

use super::plateau::{is_better, Mode, ThresholdMode};
use super::{OptimError, Result};

/// Tracks the best metric and says when to stop.
#[derive(Clone, Debug)]
pub struct EarlyStopping {
    mode: Mode,
    patience: usize,
    min_delta: f64,
    best: Option<f64>,
    best_epoch: usize,
    epochs: usize,
    wait: usize,
    improved: bool,
}

impl EarlyStopping {
    /// `patience` >= 1 epochs without improvement stop training; `min_delta` >= 0 is the absolute margin.
    pub fn new(mode: Mode, patience: usize, min_delta: f64) -> Result<Self> {
        if patience == 0 {
            return Err(OptimError::Config("early-stopping patience must be at least 1 epoch".into()));
        }
        if !(min_delta.is_finite() && min_delta >= 0.0) {
            return Err(OptimError::Config(format!("early-stopping min_delta {min_delta} must be finite and >= 0")));
        }
        Ok(Self { mode, patience, min_delta, best: None, best_epoch: 0, epochs: 0, wait: 0, improved: false })
    }

    /// Feeds one epoch's metric; returns true when training should stop. A NaN or infinite metric is an
    /// error and changes nothing.
    pub fn step(&mut self, metric: f64) -> Result<bool> {
        if !metric.is_finite() {
            return Err(OptimError::NonFiniteMetric { what: "EarlyStopping", value: metric });
        }
        self.epochs += 1;
        self.improved = match self.best {
            None => true,
            Some(best) => is_better(self.mode, ThresholdMode::Abs, self.min_delta, metric, best),
        };
        if self.improved {
            self.best = Some(metric);
            self.best_epoch = self.epochs;
            self.wait = 0;
        } else {
            self.wait += 1;
        }
        Ok(self.should_stop())
    }

    /// Whether `patience` epochs in a row brought no improvement.
    pub fn should_stop(&self) -> bool {
        self.wait >= self.patience
    }

    /// Whether the last metric was a new best (the moment to save a checkpoint).
    pub fn improved(&self) -> bool {
        self.improved
    }

    /// The best metric so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    /// The 1-based epoch of the best metric (0 before the first step).
    pub fn best_epoch(&self) -> usize {
        self.best_epoch
    }
}
