//! The paper's experiment files: without data, network or GPU, `mpcs graph` and `mpcs run --dry-run` show the
//! full expansion with the right dependencies and device classes; a missing local dataset is reported, not
//! hidden. (Running them needs the real datasets; the reduced quickstart and tests/train_stages.rs run the
//! same stage kinds end to end.)

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};

fn repo_exp(name: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments").join(name).display().to_string()
}

/// Node id → (stage, deps).
fn graph(p: &Project, exp: &str, extra: &[&str]) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut args = vec!["graph", exp, "--format", "json"];
    args.extend_from_slice(extra);
    let out = p.mpcs(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
            (n["id"].as_str().unwrap().to_string(), (n["stage"].as_str().unwrap().to_string(), deps))
        })
        .collect()
}

fn per_stage(g: &BTreeMap<String, (String, BTreeSet<String>)>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (stage, _) in g.values() {
        *m.entry(stage.clone()).or_insert(0) += 1;
    }
    m
}

fn counts(items: &[(&str, usize)]) -> BTreeMap<String, usize> {
    items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn wacv_table2_expands_to_the_papers_dag() {
    let p = Project::new();
    let exp = repo_exp("wacv_table2.toml");
    let g = graph(&p, &exp, &[]);
    assert_eq!(
        per_stage(&g),
        counts(&[
            ("breakhis", 1),
            ("imagenet", 1),
            ("folds", 1),
            ("pretrain", 15),
            ("finetune", 80),
            ("evaluate", 80),
            ("table", 1)
        ])
    );
    assert_eq!(g["folds"].1, set(&["breakhis"]));
    assert_eq!(g["pretrain[fold=3,pair=RP]"].1, set(&["folds", "breakhis", "imagenet"]));
    // An MPCS fine-tune takes the backbone of its own fold and pair; the ImageNet one has none.
    assert_eq!(
        g["finetune[fold=2,magnification=100X,init=OP]"].1,
        set(&["folds", "breakhis", "imagenet", "pretrain[fold=2,pair=OP]"])
    );
    assert_eq!(g["finetune[fold=2,magnification=100X,init=imagenet]"].1, set(&["folds", "breakhis", "imagenet"]));
    assert_eq!(
        g["evaluate[fold=4,magnification=400X,init=FP]"].1,
        set(&["finetune[fold=4,magnification=400X,init=FP]", "folds", "breakhis"])
    );
    assert_eq!(g["table"].1.len(), 80);
    assert!(g["table"].1.iter().all(|d| d.starts_with("evaluate[")));

    // The dry run: everything would run; training nodes want a GPU, data nodes run on the CPU.
    let out = p.mpcs(&["run", &exp, "--dry-run", "--json", "--devices", "0,1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let would = v["would_run"].as_array().unwrap();
    assert_eq!(would.len(), 179);
    for w in would {
        let id = w["id"].as_str().unwrap();
        let device = w["device"].as_str().unwrap();
        let gpu = id.starts_with("pretrain[") || id.starts_with("finetune[") || id.starts_with("evaluate[");
        assert_eq!(device, if gpu { "gpu×1" } else { "cpu" }, "{id}");
    }
    // Without GPUs the dry run says where they will run instead.
    let out = p.mpcs(&["run", &exp, "--dry-run", "--devices", "cpu"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pretrain[fold=0,pair=FP]") && text.contains("wants 1 gpu"), "{text}");
}

#[test]
fn wacv_bach_fine_tunes_from_breakhis_mpcs_and_evaluates_val_and_test() {
    let p = Project::new();
    let g = graph(&p, &repo_exp("wacv_bach.toml"), &[]);
    assert_eq!(
        per_stage(&g),
        counts(&[
            ("bach", 1),
            ("breakhis", 1),
            ("imagenet", 1),
            ("breakhis_folds", 1),
            ("pretrain", 3),
            ("stain", 1),
            ("folds", 1),
            ("patches", 1),
            ("finetune", 20),
            ("evaluate", 40),
            ("table", 1)
        ])
    );
    assert_eq!(g["patches"].1, set(&["stain"]));
    assert_eq!(g["finetune[fold=1,init=RP]"].1, set(&["folds", "patches", "imagenet", "pretrain[pair=RP]"]));
    assert_eq!(g["evaluate[fold=1,init=RP,portion=test]"].1, set(&["finetune[fold=1,init=RP]", "folds", "patches"]));
}

#[test]
fn wacv_breast_cell_graph_shows_a_missing_dataset_and_the_run_says_how_to_fix_it() {
    let p = Project::new();
    let exp = repo_exp("wacv_breast_cell.toml");
    let g = graph(&p, &exp, &[]);
    assert_eq!(per_stage(&g)["finetune"], 15);
    assert_eq!(per_stage(&g)["linear"], 15);
    assert_eq!(g["table"].1.len(), 30);
    let out = p.mpcs(&["graph", &exp]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains(" breast_cell ")).unwrap();
    assert!(line.contains("missing") && line.contains("--set stage.breast_cell.path=DIR"), "{line}");

    let out = p.mpcs(&["run", &exp, "--plain"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist") && err.contains("--set stage.breast_cell.path=DIR"), "{err}");
    assert!(!p.path("cache/v1/entries").exists() || p.entries().is_empty());
}
