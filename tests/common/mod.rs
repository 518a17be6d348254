//! Helpers for integration tests that drive the real `mpcs` binary in a temporary project.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The head of the experiments that error tests build on: a source `raw` reading `data/`.
pub const GOOD_HEAD: &str = r#"[experiment]
name = "bad"

[stage.raw]
kind = "source"
path = "data"
"#;

/// A tiny synthetic BreakHis (16 patients, 70×46) split into 2 folds, under `[experiment] name = NAME, seed = 5`:
/// the head of the training experiments the tests run in seconds.
pub fn tiny_training_head(name: &str) -> String {
    format!(
        r#"[experiment]
name = "{name}"
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
"#
    )
}

/// `--set` arguments that reduce the README's quickstart to one fold at one magnification on tiny images: the same
/// stages in seconds (tests/slurm.rs and tests/remote.rs).
pub fn one_fold_quickstart_sets() -> Vec<String> {
    [
        "stage.pretrain.matrix.fold=[0]",
        "stage.pretrain.matrix.replicate=[1]",
        "stage.finetune.matrix.fold=[0]",
        "stage.finetune.matrix.replicate=[1]",
        "stage.evaluate.matrix.replicate=[1]",
        "stage.finetune.matrix.magnification=[\"400X\"]",
        "stage.evaluate.matrix.fold=[0]",
        "stage.evaluate.matrix.magnification=[\"400X\"]",
        "stage.breakhis.patients=12",
        "stage.breakhis.regions_per_patient=2",
        "stage.breakhis.size=\"48x32\"",
        "stage.pretrain.epochs=1",
        "stage.pretrain.size=16",
        "stage.pretrain.batch_size=4",
        "stage.finetune.epochs=1",
        "stage.finetune.size=16",
        "stage.finetune.batch_size=4",
        "stage.evaluate.size=16",
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect()
}

pub struct Project {
    pub dir: tempfile::TempDir,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub executed: BTreeSet<String>,
    pub cached: BTreeSet<String>,
    pub failed: BTreeSet<String>,
    pub skipped: BTreeSet<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mpcs")
}

impl Project {
    pub fn new() -> Project {
        Project { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path()).args(args).env_remove("MPCS_CACHE").env_remove("CUDA_VISIBLE_DEVICES");
        c
    }

    pub fn mpcs(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run mpcs")
    }

    /// Runs `mpcs run EXP --json ARGS` and parses the summary line; panics with the output if it failed.
    pub fn run_ok(&self, exp: &str, args: &[&str]) -> Summary {
        let out = self.run_raw(exp, args);
        assert!(
            out.status.success(),
            "mpcs run failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        parse_summary(&out)
    }

    pub fn run_raw(&self, exp: &str, args: &[&str]) -> Output {
        let mut all = vec!["run", exp, "--json", "--plain", "--jobs", "2"];
        all.extend_from_slice(args);
        self.mpcs(&all)
    }

    pub fn entries(&self) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let dir = self.path("cache/v2/entries");
        if let Ok(rd) = fs::read_dir(dir) {
            for shard in rd.flatten() {
                for e in fs::read_dir(shard.path()).unwrap().flatten() {
                    keys.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        keys
    }

    /// The `nodes` of `mpcs graph EXP --format json [EXTRA...]`; fails the test if the command does.
    pub fn graph_nodes(&self, exp: &str, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["graph", exp, "--format", "json"];
        args.extend_from_slice(extra);
        let out = self.mpcs(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nodes"].as_array().unwrap().clone()
    }

    /// `mpcs graph EXP --format json` as (id → state).
    pub fn states(&self, exp: &str) -> std::collections::BTreeMap<String, String> {
        self.graph_nodes(exp, &[])
            .iter()
            .map(|n| (n["id"].as_str().unwrap().to_string(), n["state"].as_str().unwrap().to_string()))
            .collect()
    }
}

pub fn parse_summary(out: &Output) -> Summary {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last =
        stdout.lines().last().unwrap_or_else(|| panic!("no stdout; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"));
    let set = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    Summary { executed: set("executed"), cached: set("cached"), failed: set("failed"), skipped: set("skipped") }
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The paper-shaped DAG of command stages: 1 source → prepare → stain → 5 folds → 15 pretrain → 80 finetune →
/// 80 evaluate → 1 table, plus 15 linear-evaluation nodes and their table: 200 nodes. `extra` is appended to the
/// finetune stage (e.g. a `vary` line); `prepare_note` is a parameter of `prepare` that does not change its output.
/// Each command appends its node id to `exec.log` so tests can count executions.
pub fn paper_dag(prepare_note: &str, finetune_extra: &str, sleep: &str) -> String {
    format!(
        r#"[experiment]
name = "paper"
seed = 47

[stage.raw]
kind = "source"
path = "data/raw"

[stage.prepare]
kind = "command"
from = "raw"
params = {{ note = "{prepare_note}" }}
run = ["sh", "-c", "echo {{node}} >> exec.log; cat {{in}}/*.txt > {{out}}/data.txt"]

[stage.stain]
kind = "command"
from = "prepare"
run = ["sh", "-c", "echo {{node}} >> exec.log; cp {{in}}/data.txt {{out}}/stained.txt"]

[stage.folds]
kind = "command"
from = "stain"
matrix = {{ fold = [0, 1, 2, 3, 4] }}
run = ["sh", "-c", "echo {{node}} >> exec.log; {sleep} echo fold {{fold}} > {{out}}/split.csv; cat {{in}}/stained.txt >> {{out}}/split.csv"]

[stage.pretrain]
kind = "command"
from = "folds"
matrix = {{ fold = [0, 1, 2, 3, 4], pair = ["FP", "OP", "RP"] }}
params = {{ epochs = 3 }}
gpus = 1
run = ["sh", "-c", "echo {{node}} >> exec.log; {sleep} echo {{pair}} {{epochs}} > {{out}}/backbone.txt; cat {{in}}/split.csv >> {{out}}/backbone.txt"]

[stage.finetune]
kind = "command"
from = ["folds", "pretrain[fold={{fold}}, pair={{init}}]?"]
matrix = {{ fold = [0, 1, 2, 3, 4], magnification = ["40X", "100X", "200X", "400X"], init = ["imagenet", "FP", "OP", "RP"] }}
params = {{ lr = 0.001 }}
gpus = 1
run = ["sh", "-c", "echo {{node}} >> exec.log; {sleep} echo {{magnification}} {{init}} {{lr}} > {{out}}/model.txt; for d in {{in}}; do cat $d/*; done >> {{out}}/model.txt"]
{finetune_extra}

[stage.evaluate]
kind = "command"
from = "finetune"
matrix = {{ fold = [0, 1, 2, 3, 4], magnification = ["40X", "100X", "200X", "400X"], init = ["imagenet", "FP", "OP", "RP"] }}
run = ["sh", "-c", "echo {{node}} >> exec.log; {sleep} wc -c < {{in}}/model.txt > {{out}}/metrics.txt"]

[stage.table]
kind = "command"
from = "evaluate"
run = ["sh", "-c", "echo {{node}} >> exec.log; for d in {{in}}; do cat $d/metrics.txt; done > {{out}}/table.md"]

[stage.linear]
kind = "command"
from = "pretrain"
matrix = {{ fold = [0, 1, 2, 3, 4], pair = ["FP", "OP", "RP"] }}
run = ["sh", "-c", "echo {{node}} >> exec.log; {sleep} head -c 40 {{in}}/backbone.txt > {{out}}/probe.txt"]

[stage.linear_table]
kind = "command"
from = "linear"
run = ["sh", "-c", "echo {{node}} >> exec.log; for d in {{in}}; do cat $d/probe.txt; done > {{out}}/linear.md"]
"#
    )
}

/// Execution counts per node from `exec.log`.
pub fn exec_counts(p: &Project) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in fs::read_to_string(p.path("exec.log")).unwrap_or_default().lines() {
        *m.entry(l.to_string()).or_insert(0) += 1;
    }
    m
}

pub fn make_old(path: &Path) {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    fs::File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
}

/// Renders `html` in headless Chromium into `png` (1200×1600); `None`, with a notice, when there is no Chromium
/// (CI installs it; see .ci/run).
pub fn screenshot(html: &Path, png: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file());
    let Some(chromium) = chromium else {
        println!("SKIPPED screenshot: no chromium on PATH (apt-get install chromium)");
        return None;
    };
    let profile = png.with_extension("profile");
    let out = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("run chromium");
    assert!(png.exists(), "no screenshot; chromium said:\n{}", String::from_utf8_lossy(&out.stderr));
    Some(png.to_path_buf())
}
