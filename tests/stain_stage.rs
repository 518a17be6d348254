//! Stain normalisation as a runner stage and as `mpcs stain`, on real fixture images.

mod common;
use common::*;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stain").join(name)
}

const EXP: &str = r#"[stage.data]
kind = "synthetic"
dataset = "breakhis"
patients = 16
size = "70x46"
seed = 3

[stage.stain]
kind = "stain_normalise"
from = "data"
method = "macenko"
target = "target.png"

[stage.folds]
kind = "split"
from = "stain"
dataset = "breakhis"
folds = 2
"#;

#[test]
fn stain_stage_is_keyed_by_target_content_and_method() {
    let p = Project::new();
    std::fs::copy(fixture("henorm1.png"), p.path("target.png")).unwrap();
    p.write("exp.toml", EXP);
    let first = p.run_ok("exp.toml", &[]);
    assert_eq!(first.executed, set(&["data", "stain", "folds"]));

    // The layout is kept: the split reads the normalised copy as BreakHis.
    let out = p.mpcs(&["show", "stain", "--exp", "exp.toml", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = m["files"].as_array().unwrap();
    let data = p.mpcs(&["show", "data", "--exp", "exp.toml", "--json"]);
    let d: serde_json::Value = serde_json::from_slice(&data.stdout).unwrap();
    assert_eq!(files.len(), d["files"].as_array().unwrap().len(), "one output per image");
    assert!(files.iter().all(|f| f["path"].as_str().unwrap().starts_with("BreaKHis_v1/histology_slides/breast/")));
    assert_eq!(m["metrics"]["passed_through"], 0);

    // Same bytes under another name: nothing reruns. New bytes: the stain stage and its consumer rerun.
    std::fs::copy(fixture("henorm1.png"), p.path("target2.png")).unwrap();
    assert!(p.run_ok("exp.toml", &["--set", "stage.stain.target=target2.png"]).executed.is_empty());
    std::fs::copy(fixture("bh_pt.png"), p.path("target.png")).unwrap();
    let s = p.run_ok("exp.toml", &[]);
    assert_eq!(s.executed, set(&["stain", "folds"]));
    let out = p.mpcs(&["graph", "exp.toml", "--why", "stain"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cached"), "{}", String::from_utf8_lossy(&out.stdout));

    // Another method reruns the stage.
    let s = p.run_ok("exp.toml", &["--set", "stage.stain.method=reinhard-lab"]);
    assert!(s.executed.contains("stain"));
}

#[test]
fn all_background_target_fails_clearly() {
    let p = Project::new();
    let white = image::RgbImage::from_pixel(64, 64, image::Rgb([250, 250, 250]));
    white.save(p.path("target.png")).unwrap();
    p.write("exp.toml", EXP);
    let out = p.run_raw("exp.toml", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("FAILED stain"), "{err}");
    assert!(err.contains("target.png") && err.to_lowercase().contains("tissue"), "{err}");
    assert!(!p.mpcs(&["graph", "exp.toml", "--format", "json"]).stdout.is_empty());
    assert_eq!(p.states("exp.toml")["stain"], "failed");
    assert_eq!(p.entries().len(), 1, "only the synthetic data was published");
}

#[test]
fn missing_target_is_an_input_error() {
    let p = Project::new();
    p.write("exp.toml", EXP);
    let out = p.run_raw("exp.toml", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stain target"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn stain_command_keeps_names() {
    let p = Project::new();
    let a = fixture("bh_dc.png");
    let b = fixture("bh_pt.png");
    let out = p.mpcs(&[
        "stain",
        "--method",
        "macenko",
        "--target",
        fixture("henorm1.png").to_str().unwrap(),
        "--out",
        "norm",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["bh_dc.png", "bh_pt.png"] {
        let img = image::open(p.path("norm").join(name)).unwrap();
        assert_eq!(img.width(), image::open(fixture(name)).unwrap().width());
    }
    let bad = p.mpcs(&["stain", "--method", "mackenzie", "--out", "norm", a.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    let missing = p.mpcs(&["stain", "--method", "reinhard", "--out", "norm", "nope.png"]);
    assert_ne!(missing.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.png"));
}
