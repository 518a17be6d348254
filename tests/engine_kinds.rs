//! The engine seam: every node's key comes from its kind's *resolved* config, so omitting a parameter and
//! writing its default give the same key, and a default that changes in a later mpcs changes the key and is
//! named by `--why`. Library-level: these tests register kinds and resolve nodes directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use mpcs::cache::Cache;
use mpcs::exec::progress::Silent;
use mpcs::exec::{ExecContext, NodeView, Project, Registry, RunOptions, StageFailure, StageKind};
use mpcs::experiment::{Experiment, StageDecl};

/// The stages every training kind needs upstream, and one stage of each built-in kind.
fn base_experiment(dir: &Path) -> toml::Table {
    std::fs::write(dir.join("target.png"), b"not decoded here, only hashed").unwrap();
    std::fs::write(dir.join("weights.pth"), b"also only hashed").unwrap();
    let text = r#"
[experiment]
name = "kinds"

[stage.raw]
kind = "source"
path = "data"

[stage.command]
kind = "command"
from = "raw"
run = ["sh", "-c", "echo {x} > {out}/f"]
params = { x = 1 }

[stage.download]
kind = "download"
url = "file:///tmp/archive.tar.gz"

[stage.synthetic]
kind = "synthetic"
dataset = "breakhis"

[stage.stain_normalise]
kind = "stain_normalise"
from = "synthetic"
method = "macenko"
target = "target.png"

[stage.patchify]
kind = "patchify"
from = "stain_normalise"
size = 32

[stage.split]
kind = "split"
from = "stain_normalise"
dataset = "breakhis"

[stage.pretrain]
kind = "pretrain"
from = ["split", "stain_normalise"]
matrix = { fold = [0], pair = ["OP"] }

[stage.finetune]
kind = "finetune"
from = ["split", "stain_normalise"]
matrix = { fold = [0], magnification = ["40X"] }
weights = "weights.pth"

[stage.linear_eval]
kind = "linear_eval"
from = ["split", "stain_normalise"]
matrix = { fold = [0] }

[stage.evaluate]
kind = "evaluate"
from = ["split", "stain_normalise", "finetune"]
matrix = { fold = [0], magnification = ["40X"] }

[stage.table]
kind = "table"
from = "evaluate"
layout = "breakhis"
"#;
    text.parse().unwrap()
}

fn load(dir: &Path, table: &toml::Table) -> mpcs::error::Result<Project> {
    Project::from_str(&dir.join("kinds.toml"), &toml::to_string(table).unwrap(), &[], mpcs::stages::builtin())
}

fn json_to_toml(v: &Value) -> Option<toml::Value> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(a.iter().filter_map(json_to_toml).collect()),
        Value::Object(m) => {
            toml::Value::Table(m.iter().filter_map(|(k, v)| Some((k.clone(), json_to_toml(v)?))).collect())
        }
    })
}

/// The key of the first node of `stage` (every input given a fixed digest).
fn key_of(project: &Project, stage: &str) -> String {
    let i = project.plan.nodes.iter().position(|n| project.exp.stages[n.stage].name == stage).unwrap();
    let digests = vec![Some("ab".repeat(32)); project.plan.nodes.len()];
    project.action(i, &digests).unwrap().key()
}

fn resolved(project: &Project, stage: &str) -> BTreeMap<String, Value> {
    let i = project.plan.nodes.iter().position(|n| project.exp.stages[n.stage].name == stage).unwrap();
    project.resolved[i].params.clone()
}

#[test]
fn writing_out_every_default_gives_the_same_key_for_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_experiment(dir.path());
    let project = load(dir.path(), &base).unwrap();
    // (kind, the least number of its resolved parameters the spec accepts written out)
    let kinds = [
        // Everything a command or a download does is written in the file: nothing to default.
        ("command", 0),
        ("download", 0),
        ("synthetic", 4),
        ("stain_normalise", 0),
        ("patchify", 4),
        ("split", 3),
        ("pretrain", 13),
        ("finetune", 19),
        ("linear_eval", 18),
        ("evaluate", 10),
        ("table", 4),
    ];
    let mut counts = Vec::new();
    for (stage, at_least) in kinds {
        let key = key_of(&project, stage);
        let config = resolved(&project, stage);
        let mut written = Vec::new();
        for (name, value) in &config {
            let Some(value) = json_to_toml(value) else { continue };
            let mut table = base.clone();
            let st = table["stage"].as_table_mut().unwrap()[stage].as_table_mut().unwrap();
            if st.contains_key(name) || name == "matrix" {
                continue;
            }
            st.insert(name.clone(), value);
            match load(dir.path(), &table) {
                Ok(p) => {
                    assert_eq!(key_of(&p, stage), key, "`{stage}`: writing `{name}` out changed the key");
                    assert_eq!(resolved(&p, stage), config, "`{stage}`: writing `{name}` out changed the config");
                    written.push(name.clone());
                }
                // Derived values (a file's digest, the node seed, the init source) are not keys of the spec.
                Err(e) if e.message.contains("unknown key") => {}
                Err(e) => panic!("`{stage}`: writing `{name}` = its default was refused: {e}"),
            }
        }
        counts.push((stage, written.len(), at_least, written));
    }
    for (stage, n, at_least, written) in &counts {
        assert!(n >= at_least, "`{stage}`: only {written:?} could be written out; all: {counts:?}");
    }
}

#[test]
fn the_resolved_config_holds_every_default() {
    let dir = tempfile::tempdir().unwrap();
    let project = load(dir.path(), &base_experiment(dir.path())).unwrap();
    let ft = resolved(&project, "finetune");
    for name in ["lr", "epochs", "batch_size", "size", "optimizer", "augment", "plateau_factor", "normalize", "seed"] {
        assert!(ft.contains_key(name), "finetune config lacks `{name}`: {ft:?}");
    }
    assert_eq!(ft["lr"], serde_json::json!(1e-4));
    assert_eq!(ft["init"], serde_json::json!({"from": "file", "blake3": ft["init"]["blake3"]}));
    let i = project.plan.nodes.iter().position(|n| project.exp.stages[n.stage].name == "finetune").unwrap();
    let action = project.action(i, &vec![Some("ab".repeat(32)); project.plan.nodes.len()]).unwrap();
    assert!(action.defaults.contains(&"lr".to_string()) && !action.defaults.contains(&"magnification".to_string()));
    assert!(action.locations.contains_key("weights_file"), "the weights path is recorded but not hashed");
}

#[test]
fn a_bad_word_is_reported_where_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = base_experiment(dir.path());
    table["stage"].as_table_mut().unwrap()["finetune"]
        .as_table_mut()
        .unwrap()
        .insert("optimizer".into(), toml::Value::String("adamw".into()));
    let err = load(dir.path(), &table).err().expect("an unknown optimizer is refused");
    assert!(err.message.contains("unknown variant `adamw`, expected `adam` or `sgd`"), "{}", err.message);
    assert!(err.message.contains("optimizer = \"adamw\""), "the line is shown: {}", err.message);
}

/// A test-only kind whose default learning rate a "later mpcs" changes.
static DEFAULT_LR_BITS: AtomicU64 = AtomicU64::new(0);

struct Toy;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToySpec {
    lr: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct ToyConfig {
    lr: f64,
}

impl StageKind for Toy {
    type Spec = ToySpec;
    type Config = ToyConfig;
    const NAME: &'static str = "toy";
    const VERSION: u32 = 1;

    fn validate(_: &ToySpec, _: &StageDecl, _: &Experiment) -> mpcs::error::Result<()> {
        Ok(())
    }
    fn resolve(spec: &ToySpec, _: &NodeView<'_>) -> Result<ToyConfig, String> {
        Ok(ToyConfig { lr: spec.lr.unwrap_or(f64::from_bits(DEFAULT_LR_BITS.load(Ordering::SeqCst))) })
    }
    fn execute(config: &ToyConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        std::fs::write(ctx.out.join("lr.txt"), config.lr.to_string()).map_err(|e| StageFailure(e.to_string()))?;
        Ok(Value::Null)
    }
}

#[test]
fn a_changed_default_changes_the_key_and_why_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("toy.toml");
    let text = "[stage.t]\nkind = \"toy\"\n";
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let load = |text: &str| Project::from_str(&path, text, &[], Registry::default().with::<Toy>()).unwrap();
    let run = |p: &Project| {
        let opts = RunOptions {
            jobs: 1,
            gpus: Vec::new(),
            keep_going: false,
            grace: Duration::from_secs(1),
            executor: Default::default(),
            remote: None,
        };
        mpcs::exec::run(p, &cache, &opts, &Silent, &Arc::new(Default::default())).unwrap()
    };

    DEFAULT_LR_BITS.store(1e-4f64.to_bits(), Ordering::SeqCst);
    let old = load(text);
    assert_eq!(run(&old).executed, ["t"]);
    assert_eq!(run(&old).cached, ["t"], "unchanged: cached");

    // A later mpcs changes the default: the node's key changes, and --why says it was the default.
    DEFAULT_LR_BITS.store(2e-4f64.to_bits(), Ordering::SeqCst);
    let new = load(text);
    assert_ne!(key_of(&new, "t"), key_of(&old, "t"));
    let a = mpcs::lineage::assess(&new, &cache).unwrap();
    assert_eq!(a.nodes[0].state, mpcs::lineage::State::WillRun);
    let why = mpcs::lineage::why(&new, &a, &cache, 0);
    assert!(why.contains("lr: 0.0001 → 0.0002 (default)"), "{why}");

    // Writing the old value out restores the old key: the entry is found, nothing runs.
    let pinned = load("[stage.t]\nkind = \"toy\"\nlr = 0.0001\n");
    assert_eq!(key_of(&pinned, "t"), key_of(&old, "t"));
    assert_eq!(run(&pinned).cached, ["t"]);
    let a = mpcs::lineage::assess(&pinned, &cache).unwrap();
    assert!(!mpcs::lineage::why(&pinned, &a, &cache, 0).contains("(default)"));
}

#[test]
fn the_manifest_lists_every_resolved_parameter_defaults_included() {
    let dir = tempfile::tempdir().unwrap();
    let exp = "[stage.synthetic]\nkind = \"synthetic\"\ndataset = \"breakhis\"\npatients = 2\nsize = \"70x46\"\n";
    std::fs::write(dir.path().join("e.toml"), exp).unwrap();
    let mpcs = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mpcs"))
            .current_dir(dir.path())
            .args(args)
            .env_remove("MPCS_CACHE")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    mpcs(&["run", "e.toml", "--quiet"]);
    let shown: Value = serde_json::from_slice(&mpcs(&["show", "synthetic", "--exp", "e.toml", "--json"])).unwrap();
    let params = &shown["action"]["params"];
    assert_eq!(params["patients"], 2, "written: {params}");
    assert_eq!(params["regions_per_patient"], 3, "a default, filled in: {params}");
    assert_eq!(params["partial_regions"], true, "a default, filled in: {params}");
    assert!(params["seed"].is_u64(), "the node seed it used: {params}");
    let defaults: Vec<&str> =
        shown["action"]["defaults"].as_array().unwrap().iter().filter_map(|d| d.as_str()).collect();
    assert!(defaults.contains(&"regions_per_patient") && !defaults.contains(&"patients"), "{defaults:?}");
    assert!(!defaults.contains(&"seed"), "the node seed is derived, not a default: {defaults:?}");
}
