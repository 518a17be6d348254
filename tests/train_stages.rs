//! `pretrain`, `finetune`, `linear_eval` and `evaluate` as runner stages on a tiny synthetic BreakHis (seconds, not a learning test: that
//! is tests/train.rs).

mod common;
use common::*;

const EXP: &str = r#"[experiment]
name = "tiny"
seed = 5

[stage.data]
kind = "synthetic"
dataset = "breakhis"
patients = 16
size = "70x46"
seed = 2

[stage.folds]
kind = "split"
from = "data"
dataset = "breakhis"
folds = 2

[stage.finetune]
kind = "finetune"
from = ["folds", "data"]
matrix = { fold = [0] }
size = 32
batch_size = 16
epochs = 1
lr = 0.001

[stage.evaluate]
kind = "evaluate"
from = ["finetune", "folds", "data"]
matrix = { fold = [0] }
size = 32
"#;

#[test]
fn finetune_and_evaluate_run_as_cached_stages() {
    let p = Project::new();
    p.write("tiny.toml", EXP);
    let first = p.run_ok("tiny.toml", &[]);
    assert_eq!(first.executed, set(&["data", "folds", "finetune[fold=0]", "evaluate[fold=0]"]));
    let out = p.mpcs(&["show", "evaluate[fold=0]", "--exp", "tiny.toml", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acc = m["metrics"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(m["metrics"]["patient_accuracy"].as_f64().is_some());
    assert_eq!(m["metrics"]["confusion"].as_array().unwrap().len(), 2);
    let files: Vec<&str> = m["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert!(files.contains(&"metrics.json") && files.contains(&"predictions.csv"), "{files:?}");

    assert!(p.run_ok("tiny.toml", &[]).executed.is_empty());
    // One more epoch: the model and its evaluation rerun, the data and split do not.
    let s = p.run_ok("tiny.toml", &["--set", "stage.finetune.epochs=2"]);
    assert_eq!(s.executed, set(&["finetune[fold=0]", "evaluate[fold=0]"]));
}

#[test]
fn missing_inputs_and_misplaced_keys_are_clear() {
    let p = Project::new();
    p.write("tiny.toml", &EXP.replace("from = [\"finetune\", \"folds\", \"data\"]", "from = [\"folds\", \"data\"]"));
    let out = p.run_raw("tiny.toml", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a fine-tuned model among its inputs"));
    p.write("tiny.toml", &format!("{EXP}epochs = 3\n"));
    let out = p.run_raw("tiny.toml", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to the training stage"));
}

const PRETRAIN: &str = r#"
[stage.pretrain]
kind = "pretrain"
from = ["folds", "data"]
matrix = { fold = [0], pair = ["OP"] }
size = 16
batch_size = 4
epochs = 8
lr = 0.0003
projector_hidden = 32
buckets = [2, 4, 100]

[stage.probe]
kind = "linear_eval"
from = ["folds", "data", "pretrain[fold={fold}]"]
matrix = { fold = [0] }
size = 16
batch_size = 8
epochs = 1
bucket = 4

[stage.probe_eval]
kind = "evaluate"
from = ["probe", "folds", "data"]
matrix = { fold = [0] }
size = 16
"#;

fn state_epochs(p: &Project) -> Option<u64> {
    let dir = p.path("cache/v1/scratch");
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if let Ok(text) = std::fs::read(e.path().join("state.json")) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
                return v["epochs_done"].as_u64();
            }
        }
    }
    None
}

/// Killing a pretraining run mid-way loses at most the epoch in progress: the rerun resumes from the last
/// checkpoint in the scratch area and the published backbone, buckets and loss log cover every epoch.
#[test]
fn pretraining_killed_mid_way_resumes_from_its_checkpoint() {
    let p = Project::new();
    p.write("tiny.toml", &format!("{EXP}{PRETRAIN}"));
    let mut child = p.cmd(&["run", "tiny.toml", "--plain", "--jobs", "1"]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    let killed_after = loop {
        if let Some(n) = state_epochs(&p).filter(|&n| n >= 2) {
            child.kill().unwrap();
            child.wait().unwrap();
            break n;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(killed_after < 8, "killed after the last epoch");

    let s = p.run_ok("tiny.toml", &[]);
    assert!(s.executed.contains("pretrain[fold=0,pair=OP]"), "{:?}", s.executed);
    let out = p.mpcs(&["show", "pretrain[fold=0,pair=OP]", "--exp", "tiny.toml", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resumed = m["metrics"]["resumed_after"].as_u64().expect("the rerun resumed");
    assert!(resumed >= killed_after, "resumed after {resumed}, the checkpoint had {killed_after}");
    assert_eq!(m["metrics"]["epochs"], 8);
    assert_eq!(m["metrics"]["buckets"], serde_json::json!([2, 4]));
    let files: Vec<&str> = m["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for f in ["backbone.safetensors", "buckets/epoch_2.safetensors", "buckets/epoch_4.safetensors", "loss.jsonl"] {
        assert!(files.contains(&f), "{f} missing from {files:?}");
    }
    let dir = m["path"].as_str().map(std::path::PathBuf::from).unwrap_or_default();
    let log = std::fs::read_to_string(dir.join("loss.jsonl")).unwrap();
    let epochs: Vec<u64> =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, (1..=8).collect::<Vec<_>>());
    // The linear probe started from the epoch-4 bucket, and its evaluation ran.
    assert!(s.executed.contains("probe_eval[fold=0]"));
    // The scratch area is gone once the entry exists.
    assert_eq!(state_epochs(&p), None);
}
