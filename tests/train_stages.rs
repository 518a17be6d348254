//! `pretrain`, `finetune`, `linear_eval` and `evaluate` as runner stages on a tiny synthetic BreakHis (seconds, not a learning test: that
//! is tests/train.rs).

mod common;
use common::*;

/// The tiny data and split, then a fine-tuning and its evaluation.
fn exp() -> String {
    format!("{}\n{FINETUNE_AND_EVALUATE}", tiny_training_head("tiny"))
}

const FINETUNE_AND_EVALUATE: &str = r#"[stage.finetune]
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
    p.write("tiny.toml", &exp());
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
    p.write("tiny.toml", &exp().replace("from = [\"finetune\", \"folds\", \"data\"]", "from = [\"folds\", \"data\"]"));
    let out = p.run_raw("tiny.toml", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a fine-tuned model among its inputs"));
    p.write("tiny.toml", &format!("{}epochs = 3\n", exp()));
    let out = p.run_raw("tiny.toml", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to the training stage"));
}

#[test]
fn precision_is_part_of_the_training_key() {
    let p = Project::new();
    p.write("tiny.toml", &exp());
    p.run_ok("tiny.toml", &[]);
    // Spelling out the default changes nothing: the key of an f32 node is the key it had before
    // `precision` existed, so no cache entry is orphaned.
    assert!(p.run_ok("tiny.toml", &["--set", "stage.finetune.precision=\"f32\""]).executed.is_empty());
    // bf16 is another model: it and its evaluation rerun, nothing upstream does.
    let s = p.run_ok("tiny.toml", &["--set", "stage.finetune.precision=\"bf16\""]);
    assert_eq!(s.executed, set(&["finetune[fold=0]", "evaluate[fold=0]"]));
    let out = p.mpcs(&["show", "evaluate[fold=0]", "--exp", "tiny.toml", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((0.0..=1.0).contains(&m["metrics"]["accuracy"].as_f64().unwrap()), "{m}");
    // Both models stay cached side by side.
    assert!(p.run_ok("tiny.toml", &[]).executed.is_empty());
    // An unknown precision is refused before anything runs, naming the choices.
    let out = p.run_raw("tiny.toml", &["--set", "stage.finetune.precision=\"fp16\""]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fp16") && err.contains("bf16"), "{err}");
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
    let dir = p.path("cache/v2/scratch");
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
    p.write("tiny.toml", &format!("{}{PRETRAIN}", exp()));
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

/// The BACH pipeline of experiments/wacv_bach.toml on a tiny synthetic BACH: Reinhard → split → patches with
/// offline augmentation → four-class fine-tuning of a dilated ResNet-50 → patch-wise and image-wise (majority
/// vote) evaluation on val and test → the table's columns.
const BACH: &str = r#"[experiment]
name = "bach"
seed = 3

[stage.bach]
kind = "synthetic"
dataset = "bach"
patients = 4
size = "96x64"

[stage.stain]
kind = "stain_normalise"
from = "bach"
method = "reinhard"
preset = "bach"

[stage.folds]
kind = "split"
from = "stain"
dataset = "bach"
folds = 2

[stage.patches]
kind = "patchify"
from = "stain"
size = 32
overlap = 0.0
augment = true

[stage.finetune]
kind = "finetune"
from = ["folds", "patches"]
matrix = { fold = [0] }
arch = "resnet50"
output_stride = 8
objective = "multiclass"
classes = 4
size = 16
batch_size = 8
epochs = 1
optimizer = "sgd"
lr = 0.01
augment = false
train_portion = "train"
val_portion = "val"

[stage.evaluate]
kind = "evaluate"
from = ["finetune", "folds", "patches"]
matrix = { fold = [0], portion = ["val", "test"] }
arch = "resnet50"
output_stride = 8
objective = "multiclass"
classes = 4
size = 16

[stage.table]
kind = "table"
from = "evaluate"
rows = "stage"
columns = [
  { name = "image_val", metric = "image_wise_accuracy", where = { portion = "val" } },
  { name = "image_test", metric = "image_wise_accuracy", where = { portion = "test" } },
  { name = "patch_test", metric = "accuracy", where = { portion = "test" } },
]
"#;

#[test]
fn bach_style_patch_pipeline_runs_end_to_end() {
    let p = Project::new();
    p.write("bach.toml", BACH);
    let s = p.run_ok("bach.toml", &[]);
    assert_eq!(s.executed.len(), 8, "{:?}", s.executed);
    let show = |node: &str| {
        let out = p.mpcs(&["show", node, "--exp", "bach.toml", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let patches =
        std::fs::read_to_string(std::path::Path::new(show("patches")["path"].as_str().unwrap()).join("patches.csv"))
            .unwrap();
    let test = show("evaluate[fold=0,portion=test]");
    let m = &test["metrics"];
    // Four classes; only original patches are evaluated (the six-fold augmentation is for training).
    assert_eq!(m["confusion"].as_array().unwrap().len(), 4);
    let originals = patches.lines().filter(|l| l.contains(",none,")).count();
    let all = patches.lines().count() - 1;
    assert_eq!(all, originals * 6);
    let images = m["images"].as_u64().unwrap() as usize;
    assert!(images > 0 && images < originals, "{images} test patches of {originals} originals");
    let iw = m["image_wise_accuracy"].as_f64().expect("image-wise accuracy for a patch dataset");
    assert!((0.0..=1.0).contains(&iw));
    // The image-wise accuracy is the majority vote over each image's patches in predictions.csv.
    let preds =
        std::fs::read_to_string(std::path::Path::new(test["path"].as_str().unwrap()).join("predictions.csv")).unwrap();
    let source_of: std::collections::HashMap<String, String> = patches
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].to_string())
        })
        .collect();
    let mut votes: std::collections::BTreeMap<String, (u32, [usize; 4])> = Default::default();
    for l in preds.lines().skip(1) {
        let f: Vec<&str> = l.split(',').collect();
        let (label, pred): (u32, usize) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        let e = votes.entry(source_of[f[0]].clone()).or_insert((label, [0; 4]));
        e.1[pred] += 1;
    }
    let correct = votes
        .values()
        .filter(|(label, c)| {
            let best = (0..4).fold(0, |b, i| if c[i] > c[b] { i } else { b });
            best as u32 == *label
        })
        .count();
    assert!((iw - correct as f64 / votes.len() as f64).abs() < 1e-12);
    // The table's image_test cell is that number in percent.
    let table = show("table");
    let t: serde_json::Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(table["path"].as_str().unwrap()).join("table.json")).unwrap(),
    )
    .unwrap();
    assert!((t["rows"][0]["cells"][1]["mean"].as_f64().unwrap() - iw * 100.0).abs() < 1e-9);
}

/// Bad training input fails the node with a message that says what is wrong and what to do (exit 1), keeps the
/// upstream entries, and publishes nothing for the node.
#[test]
fn bad_training_inputs_fail_the_node_clearly() {
    let p = Project::new();
    p.write("tiny.toml", &exp());
    std::fs::write(p.path("junk.pth"), b"not weights").unwrap();
    {
        // A checkpoint of another architecture.
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
        mpcs::nn::ResNet::new(mpcs::nn::Arch::ResNet34, vb, None, mpcs::nn::Dilation::None).unwrap();
        mpcs::nn::weights::save(&vm, &p.path("resnet34.safetensors")).unwrap();
    }
    let cases: &[(&str, &[&str])] = &[
        ("stage.finetune.batch_size=100000", &["batch_size 100000 exceeds the", "lower batch_size"]),
        ("stage.finetune.train_portion=\"train_33\"", &["portion 'train_33' has no images", "train_60"]),
        ("stage.finetune.weights=\"missing.pth\"", &["missing.pth is not a file"]),
        ("stage.finetune.weights=\"junk.pth\"", &["junk.pth", "neither a PyTorch .pth"]),
        ("stage.finetune.weights=\"resnet34.safetensors\"", &["resnet34"]),
    ];
    for (set, needles) in cases {
        let out = p.run_raw("tiny.toml", &["--set", set]);
        assert_eq!(out.status.code(), Some(1), "{set}");
        let err = String::from_utf8_lossy(&out.stderr);
        for n in *needles {
            assert!(err.contains(n), "{set}: `{n}` not in\n{err}");
        }
        let s = parse_summary(&out);
        assert!(s.failed.contains("finetune[fold=0]") && s.skipped.contains("evaluate[fold=0]"), "{set}: {s:?}");
    }
    // Only the data and the split were ever published.
    assert_eq!(p.entries().len(), 2);
}
