//! ReduceLROnPlateau with PyTorch semantics (`torch.optim.lr_scheduler.ReduceLROnPlateau`).

use super::{check_lr, OptimError, Optimizer, Result};

/// Whether a lower or a higher metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Min,
    Max,
}

/// How `threshold` defines a significant improvement over the best value so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThresholdMode {
    /// min: `a < best * (1 - threshold)`; max: `a > best * (1 + threshold)`.
    Rel,
    /// min: `a < best - threshold`; max: `a > best + threshold`.
    Abs,
}

/// Whether `a` improves significantly on `best` (shared with [`super::EarlyStopping`]).
pub(crate) fn is_better(mode: Mode, tm: ThresholdMode, threshold: f64, a: f64, best: f64) -> bool {
    match (mode, tm) {
        (Mode::Min, ThresholdMode::Rel) => a < best * (1.0 - threshold),
        (Mode::Min, ThresholdMode::Abs) => a < best - threshold,
        (Mode::Max, ThresholdMode::Rel) => a > best * (threshold + 1.0),
        (Mode::Max, ThresholdMode::Abs) => a > best + threshold,
    }
}

/// Scheduler settings. `Default` is PyTorch's (min, factor 0.1, patience 10, threshold 1e-4 rel,
/// cooldown 0, min_lr 0, eps 1e-8).
#[derive(Clone, Debug, PartialEq)]
pub struct PlateauConfig {
    pub mode: Mode,
    /// New lr = lr * factor; must be in [0, 1).
    pub factor: f64,
    /// Bad epochs tolerated; the lr drops on the (patience + 1)-th bad epoch in a row.
    pub patience: usize,
    pub threshold: f64,
    pub threshold_mode: ThresholdMode,
    /// Epochs after a reduction during which bad epochs are not counted.
    pub cooldown: usize,
    pub min_lr: f64,
    /// A reduction smaller than this is skipped (keeps the lr from creeping at `min_lr`).
    pub eps: f64,
}

impl Default for PlateauConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_mode: ThresholdMode::Rel,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
        }
    }
}

/// Lowers a learning rate when a metric stops improving.
#[derive(Clone, Debug)]
pub struct ReduceLrOnPlateau {
    cfg: PlateauConfig,
    lr: f64,
    best: f64,
    num_bad_epochs: usize,
    cooldown_counter: usize,
}

impl ReduceLrOnPlateau {
    /// A scheduler whose learning rate starts at `initial_lr` (usually `optimizer.lr()`).
    pub fn new(cfg: PlateauConfig, initial_lr: f64) -> Result<Self> {
        check_lr(initial_lr)?;
        if !(0.0..1.0).contains(&cfg.factor) {
            return Err(OptimError::Config(format!("ReduceLROnPlateau factor {} must be in [0, 1)", cfg.factor)));
        }
        for (what, v) in [("threshold", cfg.threshold), ("min_lr", cfg.min_lr), ("eps", cfg.eps)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(OptimError::Config(format!("ReduceLROnPlateau {what} = {v} must be finite and >= 0")));
            }
        }
        let best = match cfg.mode {
            Mode::Min => f64::INFINITY,
            Mode::Max => f64::NEG_INFINITY,
        };
        Ok(Self { cfg, lr: initial_lr, best, num_bad_epochs: 0, cooldown_counter: 0 })
    }

    /// Feeds one epoch's metric; returns whether the learning rate was reduced. A NaN or infinite metric is
    /// an error and changes nothing.
    pub fn step(&mut self, metric: f64) -> Result<bool> {
        if !metric.is_finite() {
            return Err(OptimError::NonFiniteMetric { what: "ReduceLROnPlateau", value: metric });
        }
        let c = &self.cfg;
        if is_better(c.mode, c.threshold_mode, c.threshold, metric, self.best) {
            self.best = metric;
            self.num_bad_epochs = 0;
        } else {
            self.num_bad_epochs += 1;
        }
        if self.cooldown_counter > 0 {
            self.cooldown_counter -= 1;
            self.num_bad_epochs = 0;
        }
        if self.num_bad_epochs > c.patience {
            self.cooldown_counter = c.cooldown;
            self.num_bad_epochs = 0;
            let new_lr = (self.lr * c.factor).max(c.min_lr);
            if self.lr - new_lr > c.eps {
                self.lr = new_lr;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`ReduceLrOnPlateau::step`] on the optimiser's current learning rate, writing the reduced one back.
    pub fn step_optimizer(&mut self, metric: f64, opt: &mut dyn Optimizer) -> Result<bool> {
        let saved = self.lr;
        self.lr = opt.lr();
        match self.step(metric) {
            Ok(true) => {
                opt.set_lr(self.lr)?;
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                self.lr = saved;
                Err(e)
            }
        }
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The best metric so far (±inf before the first step).
    pub fn best(&self) -> f64 {
        self.best
    }

    /// Bad epochs counted since the last improvement or reduction.
    pub fn num_bad_epochs(&self) -> usize {
        self.num_bad_epochs
    }
}
