//! Per-epoch checkpoints in a scratch folder: `checkpoint-<epoch>.safetensors` (every variable, BatchNorm
//! buffers included) and `state.json`, which names that file. The weights are written first and the state
//! last (both atomically), and older weight files are removed only then, so a crash at any point leaves a
//! consistent pair.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::error::{Result, TrainError};
use super::write_atomic;
use crate::nn::weights;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct State {
    /// Which loop wrote it ("finetune" or "pretrain"); a scratch folder of the other kind is refused.
    pub kind: String,
    pub epochs_done: usize,
    pub lr: f64,
    pub best: Option<f64>,
    pub best_epoch: usize,
    /// True when early stopping ended the run: asking for more epochs does not restart it.
    pub stopped: bool,
    /// One JSON line per finished epoch (what the epoch log holds).
    pub history: Vec<serde_json::Value>,
    pub weights: String,
}

const STATE: &str = "state.json";

/// Saves the model and the state for the epoch just finished.
pub(crate) fn save(scratch: &Path, varmap: &VarMap, state: &State) -> Result<()> {
    std::fs::create_dir_all(scratch).map_err(TrainError::io(scratch))?;
    weights::save(varmap, &scratch.join(&state.weights))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Config(e.to_string()))?;
    write_atomic(&scratch.join(STATE), &json)?;
    if let Ok(dir) = std::fs::read_dir(scratch) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("checkpoint-") && name.ends_with(".safetensors") && name != state.weights {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The best model so far, kept in the scratch folder beside the checkpoint: the stage's output folder is new on
/// every attempt, so after a resume the best weights must come from here, not from an earlier attempt's output.
pub(crate) const BEST: &str = "best.safetensors";

/// Copies a finished scratch file into the output folder (atomically: [`crate::fsutil::write_atomic_with`]).
pub(crate) fn publish(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    let mut src = std::fs::File::open(from).map_err(TrainError::io(from))?;
    crate::fsutil::write_atomic_with(to, |f| std::io::copy(&mut src, f).map(drop)).map_err(TrainError::io(to))
}

pub(crate) fn weights_name(epoch: usize) -> String {
    format!("checkpoint-{epoch}.safetensors")
}

/// Loads the checkpoint of `kind` from `scratch` into `varmap`, if there is one.
pub(crate) fn load(scratch: &Path, kind: &str, varmap: &VarMap) -> Result<Option<State>> {
    let path: PathBuf = scratch.join(STATE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read(&path).map_err(TrainError::io(&path))?;
    let state: State = serde_json::from_slice(&text).map_err(|e| TrainError::BadFile {
        path: path.clone(),
        msg: format!("damaged checkpoint state ({e}); delete the scratch folder to start over"),
    })?;
    if state.kind != kind {
        return Err(TrainError::BadFile {
            path,
            msg: format!(
                "this scratch folder holds a {} checkpoint, not a {kind} one; use another scratch folder",
                state.kind
            ),
        });
    }
    weights::load_into_with(varmap, &scratch.join(&state.weights), &weights::LoadOptions::default())?;
    Ok(Some(state))
}
