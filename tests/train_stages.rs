//! `finetune` and `evaluate` as runner stages on a tiny synthetic BreakHis (seconds, not a learning test: that
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("belong to `finetune`"));
}
