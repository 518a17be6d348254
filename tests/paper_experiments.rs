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
    p.graph_nodes(exp, extra)
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
            ("imagenet_b2", 1),
            ("folds", 1),
            ("pretrain", 15),
            ("finetune", 80),
            ("evaluate", 80),
            ("pretrain_b2", 15),
            ("finetune_b2", 80),
            ("evaluate_b2", 80),
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
    // The EfficientNet-b2 rows: their own ImageNet weights and backbones, never the ResNet-50's.
    assert_eq!(g["pretrain_b2[fold=1,pair=FP]"].1, set(&["folds", "breakhis", "imagenet_b2"]));
    assert_eq!(
        g["finetune_b2[fold=0,magnification=40X,init=RP]"].1,
        set(&["folds", "breakhis", "imagenet_b2", "pretrain_b2[fold=0,pair=RP]"])
    );
    assert_eq!(g["finetune_b2[fold=0,magnification=40X,init=imagenet]"].1, set(&["folds", "breakhis", "imagenet_b2"]));
    assert_eq!(
        g["evaluate_b2[fold=3,magnification=200X,init=OP]"].1,
        set(&["finetune_b2[fold=3,magnification=200X,init=OP]", "folds", "breakhis"])
    );
    assert_eq!(g["table"].1.len(), 160);
    assert_eq!(g["table"].1.iter().filter(|d| d.starts_with("evaluate[")).count(), 80);
    assert_eq!(g["table"].1.iter().filter(|d| d.starts_with("evaluate_b2[")).count(), 80);

    // The dry run: everything would run; training nodes want a GPU, data nodes run on the CPU.
    let out = p.mpcs(&["run", &exp, "--dry-run", "--json", "--devices", "0,1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let would = v["would_run"].as_array().unwrap();
    assert_eq!(would.len(), 355);
    for w in would {
        let id = w["id"].as_str().unwrap();
        let device = w["device"].as_str().unwrap();
        let stage = id.split('[').next().unwrap();
        let gpu = ["pretrain", "finetune", "evaluate"].iter().any(|s| stage.trim_end_matches("_b2") == *s);
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
    assert!(!p.path("cache/v2/entries").exists() || p.entries().is_empty());
}

/// The paper's own file, run end to end on a local copy: a BreakHis-layout archive (synthetic, packed with tar)
/// and ImageNet-layout ResNet-50 and EfficientNet-b2 weights, given as `file://` URLs with the weights' digests
/// re-pinned; the matrix and sizes are cut down with `--set` so it takes seconds. Download + digest + unpack, the
/// split, pretraining from the weights, fine-tuning (ImageNet row from `weights`, MPCS rows from their backbones),
/// evaluation, and the table with the paper's values beside ours — all four ResNet-50 rows and two Eff-net b2 rows
/// (ImageNet and MPCS-RP).
#[test]
fn wacv_table2_runs_end_to_end_on_a_local_copy() {
    use sha2::Digest;
    let p = Project::new();
    let root = p.path("BreaKHis_v1_root");
    let opts = mpcs::data::synth::SynthOptions {
        patients: Some(16),
        size: Some((70, 46)),
        ..mpcs::data::synth::SynthOptions::new(mpcs::data::Dataset::BreakHis, 3)
    };
    mpcs::data::synth::generate_with(&opts, &root).unwrap();
    let archive = p.path("BreaKHis_v1.tar.gz");
    let tar = std::process::Command::new("tar")
        .args(["czf", archive.to_str().unwrap(), "-C", root.to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(tar.success());
    // ImageNet-layout weights of each encoder (seeded, with their 1000-class head) and their digest, written by
    // `mpcs init-weights` as scripts/gpu/check.sh writes them where there is no network.
    let imagenet = |arch: &str, seed: &str, name: &str| {
        let path = p.path(name);
        let out = p.mpcs(&["init-weights", "--arch", arch, "--seed", seed, "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let sha = format!("{:x}", sha2::Sha256::digest(std::fs::read(&path).unwrap()));
        (path, sha)
    };
    let (weights, sha) = imagenet("resnet50", "1", "resnet50-imagenet.safetensors");
    let (weights_b2, sha_b2) = imagenet("efficientnet_b2", "2", "efficientnet-b2-imagenet.safetensors");
    let mut sets = vec![
        format!("stage.breakhis.url=\"file://{}\"", archive.display()),
        format!("stage.imagenet.url=\"file://{}\"", weights.display()),
        format!("stage.imagenet.sha256=\"{sha}\""),
        format!("stage.imagenet_b2.url=\"file://{}\"", weights_b2.display()),
        format!("stage.imagenet_b2.sha256=\"{sha_b2}\""),
        // One Eff-net b2 MPCS row (RP) beside its ImageNet row.
        "stage.pretrain_b2.matrix.pair=[\"RP\"]".into(),
        "stage.finetune_b2.matrix.init=[\"imagenet\", \"RP\"]".into(),
        "stage.evaluate_b2.matrix.init=[\"imagenet\", \"RP\"]".into(),
    ];
    // Both encoders' stages cut to fold 0, 200X, one epoch on 32 px images.
    for b2 in ["", "_b2"] {
        sets.extend(
            [
                "pretrain.matrix.fold=[0]",
                "finetune.matrix.fold=[0]",
                "evaluate.matrix.fold=[0]",
                "finetune.matrix.magnification=[\"200X\"]",
                "evaluate.matrix.magnification=[\"200X\"]",
                "pretrain.epochs=1",
                "pretrain.size=32",
                "pretrain.batch_size=4",
                "pretrain.projector_hidden=64",
                "finetune.epochs=1",
                "finetune.size=32",
                "finetune.batch_size=4",
                "evaluate.size=32",
            ]
            .map(|set| {
                let (stage, rest) = set.split_once('.').unwrap();
                format!("stage.{stage}{b2}.{rest}")
            }),
        );
    }
    let mut args: Vec<&str> = Vec::new();
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let exp = repo_exp("wacv_table2.toml");
    let s = p.run_ok(&exp, &args);
    // breakhis, imagenet, imagenet_b2, folds; RN-50 3 + 4 + 4; b2 1 + 2 + 2; table.
    assert_eq!(s.executed.len(), 4 + (3 + 4 + 4) + (1 + 2 + 2) + 1, "{:?}", s.executed);

    let show = |node: &str| {
        let mut a = vec!["show", node, "--exp", exp.as_str(), "--json"];
        a.extend(args.iter().copied());
        serde_json::from_slice::<serde_json::Value>(&p.mpcs(&a).stdout).unwrap()
    };
    // The ImageNet row started from the downloaded weights, the MPCS rows from their backbones.
    let log = |node: &str| {
        let key = show(node)["key"].as_str().unwrap().to_string();
        std::fs::read_to_string(p.path("cache/v2/entries").join(&key[..2]).join(&key).join("log.txt")).unwrap()
    };
    assert!(log("finetune[fold=0,magnification=200X,init=imagenet]").contains("resnet50-imagenet.safetensors"));
    assert!(log("finetune[fold=0,magnification=200X,init=OP]").contains("backbone.safetensors"));
    assert!(log("pretrain[fold=0,pair=OP]").contains("resnet50-imagenet.safetensors"));
    assert!(log("pretrain_b2[fold=0,pair=RP]").contains("efficientnet-b2-imagenet.safetensors"));
    assert!(
        log("finetune_b2[fold=0,magnification=200X,init=imagenet]").contains("efficientnet-b2-imagenet.safetensors")
    );
    assert!(log("finetune_b2[fold=0,magnification=200X,init=RP]").contains("backbone.safetensors"));
    // The table has the paper's rows and its reported values beside ours.
    let table = show("table");
    let t: serde_json::Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(table["path"].as_str().unwrap()).join("table.json")).unwrap(),
    )
    .unwrap();
    let labels: Vec<&str> = t["rows"].as_array().unwrap().iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "ImageNet (RN-50)",
            "MPCS-FP (RN-50)",
            "MPCS-OP (RN-50)",
            "MPCS-RP (RN-50)",
            "ImageNet (Eff-net b2)",
            "MPCS-RP (Eff-net b2)"
        ]
    );
    // MPCS-OP (RN-50), image_200X: the paper reports 92.45 ± 3.77.
    let cell = &t["rows"][2]["cells"][2];
    assert_eq!(t["columns"][2], "image_200X");
    assert_eq!(cell["paper_mean"], 92.45);
    assert!((cell["diff"].as_f64().unwrap() - (cell["mean"].as_f64().unwrap() - 92.45)).abs() < 1e-9);
    // MPCS-RP (Eff-net b2), image_200X: the paper reports 92.28 ± 3.49.
    let b2 = &t["rows"][5]["cells"][2];
    assert_eq!(b2["paper_mean"], 92.28);
    assert!((b2["diff"].as_f64().unwrap() - (b2["mean"].as_f64().unwrap() - 92.28)).abs() < 1e-9);
}

/// `mpcs init-weights` stands in for ImageNet weights where there is no network: torchvision's names and shapes
/// with the head asked for, the same bytes for the same seed, other values for another seed; a name it could not
/// load later or an unknown architecture is refused before anything is written.
#[test]
fn init_weights_writes_seeded_torchvision_layout_weights_and_refuses_bad_arguments() {
    let p = Project::new();
    let write = |seed: &str, name: &str| {
        let out = p.mpcs(&["init-weights", "--arch", "resnet18", "--classes", "7", "--seed", seed, "--out", name]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(p.path(name)).unwrap()
    };
    let (a, again, other) = (write("1", "a.safetensors"), write("1", "b.safetensors"), write("2", "c.safetensors"));
    assert_eq!(a, again, "one seed, one file");
    assert_ne!(a, other, "another seed, other weights");
    let tensors = candle_core::safetensors::load(p.path("a.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors["fc.weight"].dims(), &[7, 512]);
    assert_eq!(tensors["conv1.weight"].dims(), &[64, 3, 7, 7]);
    assert!(tensors.contains_key("layer4.1.bn2.running_var"), "{:?}", tensors.keys().collect::<Vec<_>>());
    // Kaiming-style spread, not zeros: the file is usable as a starting point.
    let std = tensors["conv1.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let rms = (std.iter().map(|v| v * v).sum::<f32>() / std.len() as f32).sqrt();
    assert!(rms > 1e-3, "conv1 weights rms {rms}");

    for (args, needle) in [
        (vec!["--arch", "resnet19", "--out", "x.safetensors"], "resnet19"),
        (vec!["--arch", "resnet18", "--out", "x.pth"], "must end in .safetensors"),
        (vec!["--arch", "resnet18", "--classes", "0", "--out", "x.safetensors"], "--classes"),
    ] {
        let mut all = vec!["init-weights"];
        all.extend(args);
        let out = p.mpcs(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!p.path("x.safetensors").exists() && !p.path("x.pth").exists());
    }
}
