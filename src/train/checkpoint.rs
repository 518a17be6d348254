//! Per-epoch checkpoints in a scratch folder. A checkpoint is `state.json` (the epoch history and learning rate),
//! the model it names (`checkpoint-<epoch>.safetensors`, every variable, BatchNorm buffers included) and the best
//! model so far that it names (`best-<epoch>.safetensors`). The previous checkpoint is kept beside the newest
//! (`state.prev.json` and the files it names), so a newest one that cannot be read costs one epoch, not the run.
//!
//! Every file is written atomically and synced before its rename, weights first and the state last, and files are
//! removed only once no kept state names them, so a crash at any point leaves consistent checkpoints. A checkpoint
//! that cannot be used anyway (a damaged disk, a copy cut short, a hand-edited state) is reported, renamed to
//! `<name>.damaged` and skipped: training resumes from the previous checkpoint, or restarts from epoch 1, instead
//! of failing every rerun.

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::error::{Result, TrainError};
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
    /// The file of the best model so far (a state written before it was named had `best.safetensors`).
    #[serde(default = "legacy_best")]
    pub best_weights: String,
}

fn legacy_best() -> String {
    "best.safetensors".into()
}

const STATE: &str = "state.json";
const PREV_STATE: &str = "state.prev.json";

/// Saves the model and the state for the epoch just finished (the best model, if this epoch's, is already saved
/// under `state.best_weights`); the newest state before it becomes the previous one.
pub(crate) fn save(scratch: &Path, varmap: &VarMap, state: &State) -> Result<()> {
    std::fs::create_dir_all(scratch).map_err(TrainError::io(scratch))?;
    weights::save(varmap, &scratch.join(&state.weights))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Config(e.to_string()))?;
    let (newest, prev) = (scratch.join(STATE), scratch.join(PREV_STATE));
    match std::fs::rename(&newest, &prev) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(TrainError::io(&newest)(e)),
        _ => {}
    }
    crate::fsutil::write_atomic_with(&newest, |f| {
        std::io::Write::write_all(f, &json)?;
        f.sync_all()
    })
    .map_err(TrainError::io(&newest))?;
    // Remove the model files no kept state names (the previous state may be unreadable: then keep only ours).
    let mut keep = vec![state.weights.clone(), state.best_weights.clone()];
    if let Some(p) = std::fs::read(&prev).ok().and_then(|b| serde_json::from_slice::<State>(&b).ok()) {
        keep.extend([p.weights, p.best_weights]);
    }
    if let Ok(dir) = std::fs::read_dir(scratch) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let model = name.starts_with("checkpoint-") || name.starts_with("best");
            if model && name.ends_with(".safetensors") && !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// The file name of the best model when it was found at `epoch`. It is kept in the scratch folder beside the
/// checkpoint: the stage's output folder is new on every attempt, so after a resume the best weights must come
/// from here. Named by epoch so that each kept state names its own best model.
pub(crate) fn best_name(epoch: usize) -> String {
    format!("best-{epoch}.safetensors")
}

/// Copies a finished scratch file into the output folder or a bucket (atomically:
/// [`crate::fsutil::write_atomic_with`], synced before the rename like every checkpoint file).
pub(crate) fn publish(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    let mut src = std::fs::File::open(from).map_err(TrainError::io(from))?;
    crate::fsutil::write_atomic_with(to, |f| {
        std::io::copy(&mut src, f)?;
        f.sync_all()
    })
    .map_err(TrainError::io(to))
}

pub(crate) fn weights_name(epoch: usize) -> String {
    format!("checkpoint-{epoch}.safetensors")
}

/// Loads the newest usable checkpoint of `kind` from `scratch` into `varmap`, if there is one. A checkpoint that
/// cannot be used is reported through `warn`, set aside and skipped (see the module documentation); `varmap` is
/// only written once a checkpoint has passed every check, so after a restart it holds the caller's initialisation.
/// `needs` names further files a state relies on (pretraining's buckets up to its epoch), checked the same way.
pub(crate) fn load(
    scratch: &Path,
    kind: &str,
    varmap: &VarMap,
    needs: &dyn Fn(&State) -> Vec<PathBuf>,
    warn: &dyn Fn(String),
) -> Result<Option<State>> {
    let mut skipped = false;
    for name in [STATE, PREV_STATE] {
        let path = scratch.join(name);
        if !path.exists() {
            continue;
        }
        match usable(scratch, &path, kind, varmap, needs)? {
            Ok(state) => {
                if skipped {
                    warn(format!("resuming from the checkpoint after epoch {} ({name}) instead", state.epochs_done));
                }
                return Ok(Some(state));
            }
            Err((bad, why)) => {
                let mut aside = vec![set_aside(&bad)];
                if bad != path {
                    aside.push(set_aside(&path));
                }
                let aside: Vec<String> = aside.into_iter().flatten().collect();
                warn(format!("a checkpoint cannot be used: {why}; set aside as {}", aside.join(" and ")));
                skipped = true;
            }
        }
    }
    if skipped {
        warn(format!("no usable checkpoint is left in {}: training restarts from epoch 1", scratch.display()));
    }
    Ok(None)
}

/// The state at `path` if it and the model files it names can be read (then loaded into `varmap`); else the file
/// at fault and why. A checkpoint of another kind is an error: that scratch folder belongs to another loop.
fn usable(
    scratch: &Path,
    path: &Path,
    kind: &str,
    varmap: &VarMap,
    needs: &dyn Fn(&State) -> Vec<PathBuf>,
) -> Result<std::result::Result<State, (PathBuf, String)>> {
    let damaged = |file: &Path, why: String| Ok(Err((file.to_path_buf(), format!("{}: {why}", file.display()))));
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) => return damaged(path, format!("cannot read it ({e})")),
    };
    let state: State = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => return damaged(path, format!("not a checkpoint state, cut short or edited ({e})")),
    };
    if state.kind != kind {
        return Err(TrainError::BadFile {
            path: path.to_path_buf(),
            msg: format!(
                "this scratch folder holds a {} checkpoint, not a {kind} one; use another scratch folder",
                state.kind
            ),
        });
    }
    let best = state.best.is_some().then(|| scratch.join(&state.best_weights));
    for file in best.into_iter().chain(needs(&state)) {
        if let Err(e) = weights::read_tensors(&file) {
            return Ok(Err((file, format!("a model file that {} names: {e}", path.display()))));
        }
    }
    // All checks come before this load, which itself changes nothing unless it succeeds.
    if let Err(e) = weights::load_into_with(varmap, &scratch.join(&state.weights), &weights::LoadOptions::default()) {
        return Ok(Err((scratch.join(&state.weights), e.to_string())));
    }
    Ok(Ok(state))
}

/// Renames a file that cannot be used to `<name>.damaged` (kept for a post-mortem until the node completes and its
/// scratch folder goes); the new name, or None when there was nothing to rename.
fn set_aside(file: &Path) -> Option<String> {
    let name = format!("{}.damaged", file.file_name()?.to_string_lossy());
    std::fs::rename(file, file.with_file_name(&name)).ok().map(|()| name)
}
