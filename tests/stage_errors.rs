//! Issue 13's stage-level regressions ("no wrong result, no lost entry, no hang"): what a hostile user found in
//! the built-in stages, each driven through the `mpcs` binary. A uniform Reinhard target is refused (S9); a
//! misnamed image carried by `stain_normalise` is reported at its source, never at its cache copy (B2); a damaged
//! checkpoint is set aside instead of failing every rerun (B3); a fold the split does not have is refused before
//! anything runs.

mod common;
use common::*;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stain").join(name)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_has(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "expected `{n}` in:\n{text}");
    }
}

// ------------------------------------------------------------------------------------- S9: uniform targets

/// Solid black, a single pixel and flat pink: Reinhard standardises to the target's spread, which is zero, so every
/// output would be one flat colour. Both Reinhard variants refuse, as Macenko and Vahadane do, naming the file.
#[test]
fn reinhard_refuses_a_uniform_target() {
    let p = Project::new();
    let targets = [("black.png", 64, [0, 0, 0]), ("dot.png", 1, [0, 0, 0]), ("pink.png", 32, [230, 150, 190])];
    for (name, side, rgb) in targets {
        image::RgbImage::from_pixel(side, side, image::Rgb(rgb)).save(p.path(name)).unwrap();
    }
    let image = fixture("bh_pt.png");
    for method in ["reinhard", "reinhard-lab"] {
        for (name, _, _) in targets {
            let out =
                p.mpcs(&["stain", "--method", method, "--target", name, "--out", "norm", image.to_str().unwrap()]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{method} {name}: {err}");
            assert_has(
                &err,
                &[name, &format!("target is degenerate for {method}"), "uniform", "choose another target image"],
            );
            assert!(!p.path("norm/bh_pt.png").exists(), "{method} {name}: nothing is written");
        }
    }
    // A grey target has lightness but no colour: every output would be grey.
    let mut grey = image::RgbImage::new(32, 32);
    for (x, _, px) in grey.enumerate_pixels_mut() {
        *px = image::Rgb([(40 + x * 6) as u8; 3]);
    }
    grey.save(p.path("grey.png")).unwrap();
    let out =
        p.mpcs(&["stain", "--method", "reinhard", "--target", "grey.png", "--out", "norm", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_has(&stderr(&out), &["grey.png", "target is degenerate for reinhard", "not vary", "grey images"]);

    // As a stage: the node fails like Macenko's refusal, and nothing is published for it.
    p.write(
        "exp.toml",
        "[stage.data]\nkind = \"synthetic\"\ndataset = \"breakhis\"\npatients = 2\nsize = \"70x46\"\nseed = 3\n\n\
         [stage.stain]\nkind = \"stain_normalise\"\nfrom = \"data\"\nmethod = \"reinhard\"\ntarget = \"pink.png\"\n",
    );
    let out = p.run_raw("exp.toml", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_has(&err, &["FAILED stain", "pink.png", "target is degenerate for reinhard", "uniform"]);
    assert_eq!(p.entries().len(), 1, "only the synthetic data was published");
}

// ------------------------------------------------------------------- B2: a misnamed image carried by a stage

/// A BreakHis source with one image renamed: (its name before, its name now), relative to the project.
fn misnamed_source(p: &Project) -> (String, String) {
    let out = p.mpcs(&["synth", "breakhis", "--out", "data", "--seed", "1", "--patients", "4", "--size", "70x46"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = "data/BreaKHis_v1/histology_slides/breast/malignant/SOB/ductal_carcinoma";
    let patient = std::fs::read_dir(p.path(dir)).unwrap().flatten().map(|e| e.file_name()).min().unwrap();
    let folder = format!("{dir}/{}/400X", patient.to_string_lossy());
    let first = std::fs::read_dir(p.path(&folder)).unwrap().flatten().map(|e| e.file_name()).min().unwrap();
    let original = format!("{folder}/{}", first.to_string_lossy());
    let renamed = format!("{folder}/renamed_oops.png");
    std::fs::rename(p.path(&original), p.path(&renamed)).unwrap();
    (original, renamed)
}

const STAIN_SPLIT: &str = r#"
[stage.stain]
kind = "stain_normalise"
from = "raw"
method = "reinhard"
preset = "bach"

[stage.folds]
kind = "split"
from = "stain"
dataset = "breakhis"
folds = 2
"#;

/// `split` used to report the stain stage's cache copy and advise "restore the original name" there, which would
/// corrupt the entry. Now it names the source file, the stage that carried it, and says to fix the source.
#[test]
fn a_misnamed_image_carried_by_stain_is_named_at_its_source() {
    let p = Project::new();
    let (original, renamed) = misnamed_source(&p);
    p.write("exp.toml", &format!("[stage.raw]\nkind = \"source\"\npath = \"data\"\n{STAIN_SPLIT}"));
    let out = p.run_raw("exp.toml", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let source_file = p.dir.path().canonicalize().unwrap().join(&renamed);
    assert_has(
        &err,
        &[
            "FAILED folds",
            &format!("{}: file name does not read as", source_file.display()),
            "stage `stain`",
            "source `raw`",
            "rename",
            "in the source data, not in the cache",
            "mpcs reruns `stain`",
        ],
    );
    assert!(!err.contains("cache/v2/entries"), "no advice points into the cache:\n{err}");
    assert_eq!(p.states("exp.toml")["folds"], "failed");

    // Renaming the source file back is the whole fix: the stain stage reruns and the split succeeds.
    std::fs::rename(p.path(&renamed), p.path(&original)).unwrap();
    let s = p.run_ok("exp.toml", &[]);
    assert!(s.executed.contains("stain") && s.executed.contains("folds"), "{:?}", s.executed);
}

/// Where the chain of name-keeping stages does not reach a source (here a command copies the data first), the
/// message names the stage the file comes from and its path there, still never the cache.
#[test]
fn a_misnamed_image_from_a_command_names_that_stage() {
    let p = Project::new();
    let (_, renamed) = misnamed_source(&p);
    let copy = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.copy]\nkind = \"command\"\nfrom = \"raw\"\n\
                run = [\"cp\", \"-R\", \"{in}/BreaKHis_v1\", \"{out}/\"]\n";
    p.write("exp.toml", &format!("{copy}{}", STAIN_SPLIT.replace("from = \"raw\"", "from = \"copy\"")));
    let out = p.run_raw("exp.toml", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let rel = renamed.trim_start_matches("data/");
    assert_has(
        &err,
        &["FAILED folds", &format!("{rel}: file name does not read as"), "stage `copy`", "not in the cache"],
    );
    assert!(!err.contains("cache/v2/entries"), "no advice points into the cache:\n{err}");
}

// --------------------------------------------------------------------------------- B3: damaged checkpoints

fn train_head() -> String {
    tiny_training_head("ckpt")
}

const FINETUNE: &str = r#"
[stage.finetune]
kind = "finetune"
from = ["folds", "data"]
matrix = { fold = [0] }
magnification = "40X"
size = 16
batch_size = 8
epochs = 3
"#;

/// The state of an interrupted fine-tuning: the data and split are cached, and the finetune node's scratch area
/// holds the checkpoints of 2 of its 3 epochs (written by the training library, as an interrupted run leaves
/// them). Returns the scratch folder.
fn interrupted_finetune(p: &Project) -> std::path::PathBuf {
    p.write("exp.toml", &train_head());
    p.run_ok("exp.toml", &[]);
    p.write("exp.toml", &format!("{}{FINETUNE}", train_head()));
    let node = p.graph_nodes("exp.toml", &[]).into_iter().find(|n| n["stage"] == "finetune").unwrap();
    let scratch = p.path("cache/v2/scratch").join(node["key"].as_str().unwrap());
    let path_of = |node: &str| {
        let out = p.mpcs(&["show", node, "--exp", "exp.toml", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        std::path::PathBuf::from(v["path"].as_str().unwrap())
    };
    let (data, folds) = (path_of("data"), path_of("folds"));
    let mut cfg = mpcs::train::FinetuneConfig::new(&data, &folds.join("fold_0.csv"), &p.path("elsewhere"), &scratch);
    cfg.magnification = Some("40X".into());
    cfg.image_size = 16;
    cfg.batch_size = 8;
    cfg.epochs = 2;
    mpcs::train::finetune(&cfg, &|_| {}).unwrap();
    scratch
}

fn state(scratch: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(scratch.join("state.json")).unwrap()).unwrap()
}

fn finetune_metrics(p: &Project) -> serde_json::Value {
    let out = p.mpcs(&["show", "finetune[fold=0]", "--exp", "exp.toml", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["metrics"].clone()
}

/// A truncated newest checkpoint (a crash or a full disk while it was written) used to fail every rerun. Now it is
/// reported, set aside, and the node resumes from the checkpoint before it.
#[test]
fn a_truncated_checkpoint_falls_back_to_the_previous_one() {
    let p = Project::new();
    let scratch = interrupted_finetune(&p);
    assert_eq!(state(&scratch)["epochs_done"], 2);
    let newest = state(&scratch)["weights"].as_str().unwrap().to_string();
    let bytes = std::fs::read(scratch.join(&newest)).unwrap();
    std::fs::write(scratch.join(&newest), &bytes[..bytes.len() / 3]).unwrap();

    let out = p.run_raw("exp.toml", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_has(&err, &[&newest, "cannot be used", "set aside", "resuming from the checkpoint after epoch 1"]);
    let m = finetune_metrics(&p);
    assert_eq!(m["resumed_after"], 1, "{m}");
    assert_eq!(m["epochs"], 3, "{m}");
}

/// With no readable checkpoint left the node restarts from epoch 1, saying so, instead of failing.
#[test]
fn an_unreadable_checkpoint_state_restarts_the_node() {
    let p = Project::new();
    let scratch = interrupted_finetune(&p);
    let text = std::fs::read(scratch.join("state.json")).unwrap();
    std::fs::write(scratch.join("state.json"), &text[..text.len() / 2]).unwrap();
    let _ = std::fs::remove_file(scratch.join("state.prev.json"));

    let out = p.run_raw("exp.toml", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_has(&err, &["state.json", "cannot be used", "set aside", "no usable checkpoint", "restarts from epoch 1"]);
    let m = finetune_metrics(&p);
    assert_eq!(m["resumed_after"], serde_json::Value::Null, "{m}");
    assert_eq!(m["epochs"], 3, "{m}");
}

// ------------------------------------------------------------------------------ a fold the split lacks

/// `fold = 7` on a 2-fold split used to fail at run time with only `fold_7.csv: No such file`. It is now refused
/// while the experiment is checked (exit 2, nothing run, no cache), naming the split, its folds and the fix.
#[test]
fn a_fold_the_split_does_not_have_is_refused_before_anything_runs() {
    let check = |extra: &str, sets: &[&str], needles: &[&str]| {
        let p = Project::new();
        p.write("exp.toml", &format!("{}{extra}", train_head()));
        let out = p.run_raw("exp.toml", sets);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_has(&err, needles);
        assert!(!p.path("cache").exists(), "nothing ran:\n{err}");
    };
    let finetune = FINETUNE.replace("matrix = { fold = [0] }", "fold = 7");
    let advice = ["split stage `folds` makes 2 folds (fold_0.csv, fold_1.csv)", "choose a fold from 0 to 1", "raise"];
    check(&finetune, &[], &[&["stage `finetune`", "fold 7 does not exist"][..], &advice].concat());
    // A matrix value, in an evaluate stage.
    let evaluate =
        "\n[stage.evaluate]\nkind = \"evaluate\"\nfrom = [\"folds\", \"data\"]\nmatrix = { fold = [0, 2] }\n";
    check(evaluate, &[], &[&["stage `evaluate`", "fold 2 does not exist"][..], &advice].concat());
    // The split's `folds` as changed by --set, in a pretrain stage.
    let pretrain = "\n[stage.pretrain]\nkind = \"pretrain\"\nfrom = [\"folds\", \"data\"]\nmatrix = { fold = [0, 3], pair = [\"OP\"] }\n";
    check(
        pretrain,
        &["--set", "stage.folds.folds=3"],
        &["stage `pretrain`", "fold 3 does not exist", "makes 3 folds (fold_0.csv, fold_1.csv, fold_2.csv)"],
    );

    // Enough folds: the experiment is valid.
    let p = Project::new();
    p.write("exp.toml", &format!("{}{finetune}", train_head()));
    let out = p.mpcs(&["run", "exp.toml", "--dry-run", "--set", "stage.folds.folds=8"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
