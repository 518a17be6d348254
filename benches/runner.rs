//! Runner overhead: cold run, unchanged rerun and `mpcs graph` on paper-shaped DAGs of trivial command nodes
//! (≈200 and ≈2,000 nodes), beside an equivalent Makefile run by GNU make in the same process tree.
//! Run with `cargo bench --bench runner`; prints one row per measurement.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Paper-shaped DAG: source → prepare → stain → F folds → 3F pretrain → 16F finetune → 16F evaluate → table,
/// plus 3F linear probes and their table: 5 + 39F nodes (F = 5 gives the paper's 200).
fn dag(folds: usize) -> (String, usize) {
    let f: Vec<String> = (0..folds).map(|i| i.to_string()).collect();
    let f = f.join(", ");
    let run = r#"run = ["sh", "-c", "echo {node} > {out}/x"]"#;
    let text = format!(
        r#"[experiment]
name = "bench{folds}"

[stage.raw]
kind = "source"
path = "data"

[stage.prepare]
kind = "command"
from = "raw"
{run}

[stage.stain]
kind = "command"
from = "prepare"
{run}

[stage.folds]
kind = "command"
from = "stain"
matrix = {{ fold = [{f}] }}
{run}

[stage.pretrain]
kind = "command"
from = "folds"
matrix = {{ fold = [{f}], pair = ["FP", "OP", "RP"] }}
gpus = 1
{run}

[stage.finetune]
kind = "command"
from = ["folds", "pretrain[fold={{fold}}, pair={{init}}]?"]
matrix = {{ fold = [{f}], magnification = ["40X", "100X", "200X", "400X"], init = ["imagenet", "FP", "OP", "RP"] }}
gpus = 1
{run}

[stage.evaluate]
kind = "command"
from = "finetune"
matrix = {{ fold = [{f}], magnification = ["40X", "100X", "200X", "400X"], init = ["imagenet", "FP", "OP", "RP"] }}
{run}

[stage.table]
kind = "command"
from = "evaluate"
{run}

[stage.linear]
kind = "command"
from = "pretrain"
matrix = {{ fold = [{f}], pair = ["FP", "OP", "RP"] }}
{run}

[stage.linear_table]
kind = "command"
from = "linear"
{run}
"#
    );
    (text, 5 + 39 * folds)
}

fn mpcs(bin: &Path, dir: &Path, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new(bin).current_dir(dir).args(args).output().expect("mpcs");
    let s = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The same DAG shape as a Makefile (one target file per node), for the floor of a cold and a no-op build.
fn makefile(folds: usize) -> String {
    let mut rules = String::from(
        ".PHONY: all\nall: out/table out/linear_table\nout/raw: data/x\n\tmkdir -p out && echo raw > $@\n",
    );
    rules.push_str("out/prepare: out/raw\n\techo prepare > $@\nout/stain: out/prepare\n\techo stain > $@\n");
    let mut evals = Vec::new();
    let mut linears = Vec::new();
    for f in 0..folds {
        rules.push_str(&format!("out/folds_{f}: out/stain\n\techo $@ > $@\n"));
        for p in ["FP", "OP", "RP"] {
            rules.push_str(&format!("out/pretrain_{f}_{p}: out/folds_{f}\n\techo $@ > $@\n"));
            rules.push_str(&format!("out/linear_{f}_{p}: out/pretrain_{f}_{p}\n\techo $@ > $@\n"));
            linears.push(format!("out/linear_{f}_{p}"));
        }
        for m in ["40X", "100X", "200X", "400X"] {
            for i in ["imagenet", "FP", "OP", "RP"] {
                let dep = if i == "imagenet" { String::new() } else { format!(" out/pretrain_{f}_{i}") };
                rules.push_str(&format!("out/finetune_{f}_{m}_{i}: out/folds_{f}{dep}\n\techo $@ > $@\n"));
                rules.push_str(&format!("out/evaluate_{f}_{m}_{i}: out/finetune_{f}_{m}_{i}\n\techo $@ > $@\n"));
                evals.push(format!("out/evaluate_{f}_{m}_{i}"));
            }
        }
    }
    rules.push_str(&format!("out/table: {}\n\techo table > $@\n", evals.join(" ")));
    rules.push_str(&format!("out/linear_table: {}\n\techo linear > $@\n", linears.join(" ")));
    rules
}

/// The binaries measured: this build's, and with `MPCS_BASE=/path/to/mpcs` a previous build's too (measured in
/// the same run, one after the other at every step, so both see the same machine).
fn binaries() -> Vec<(String, PathBuf)> {
    let mut bins = vec![("mpcs".to_string(), PathBuf::from(env!("CARGO_BIN_EXE_mpcs")))];
    if let Some(base) = std::env::var_os("MPCS_BASE") {
        bins.push(("base".to_string(), PathBuf::from(base)));
    }
    bins
}

fn main() {
    let has_make = Command::new("make").arg("--version").output().is_ok();
    println!("{:<44} {:>10}", "measurement", "seconds");
    // Every folder lives until the end: deleting a big cache just before a cold run makes the next file
    // creations slow on some filesystems (ext4 without a journal rescans recently freed inodes).
    let mut keep = Vec::new();
    for folds in [5usize, 51] {
        let (text, nodes) = dag(folds);
        let mut dirs = Vec::new();
        for (name, _) in binaries().iter().map(|(n, b)| (n.clone(), b.clone())).chain([("make".into(), PathBuf::new())])
        {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            std::fs::create_dir_all(d.join("data")).unwrap();
            std::fs::write(d.join("data/x"), "x").unwrap();
            std::fs::write(d.join("exp.toml"), &text).unwrap();
            std::fs::write(d.join("Makefile"), makefile(folds)).unwrap();
            dirs.push((name, dir));
        }
        let bins = binaries();
        for (name, bin) in &bins {
            let d = dirs.iter().find(|(n, _)| n == name).unwrap().1.path();
            let cold = mpcs(bin, d, &["run", "exp.toml", "--jobs", "2", "--quiet", "--devices", "cpu"]);
            println!("{:<44} {:>10.3}", format!("{name} cold run, {nodes} nodes, --jobs 2"), cold);
        }
        for (what, args, reps) in [
            ("unchanged rerun", &["run", "exp.toml", "--quiet"][..], 7),
            ("graph --format json", &["graph", "exp.toml", "--format", "json"][..], 7),
            ("run --dry-run", &["run", "exp.toml", "--dry-run"][..], 5),
        ] {
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
            for _ in 0..reps {
                for (b, (name, bin)) in bins.iter().enumerate() {
                    let d = dirs.iter().find(|(n, _)| n == name).unwrap().1.path();
                    times[b].push(mpcs(bin, d, args));
                }
            }
            for (b, (name, _)) in bins.iter().enumerate() {
                println!("{:<44} {:>10.3}", format!("{name} {what}, {nodes} nodes"), median(times[b].clone()));
            }
        }
        if has_make {
            let d = dirs.iter().find(|(n, _)| n == "make").unwrap().1.path();
            let t = Instant::now();
            let ok = Command::new("make").current_dir(d).args(["-s", "-j2"]).status().unwrap().success();
            assert!(ok);
            println!("{:<44} {:>10.3}", format!("make -j2 cold, {nodes} targets"), t.elapsed().as_secs_f64());
            let noop: Vec<f64> = (0..7)
                .map(|_| {
                    let t = Instant::now();
                    Command::new("make").current_dir(d).args(["-s", "-j2"]).status().unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            println!("{:<44} {:>10.3}", format!("make unchanged, {nodes} targets"), median(noop));
        }
        keep.push(dirs);
    }
}
