//! The data stages through the runner: synthetic datasets, split-by-seed, patchify, download (file://).

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};

const EXP: &str = r#"[experiment]
name = "data"
seed = 1

[stage.data]
kind = "synthetic"
dataset = "breakhis"
patients = 16
size = "70x46"
seed = 5

[stage.folds]
kind = "split"
from = "data"
dataset = "breakhis"
folds = 4
seed = 47

[stage.bach]
kind = "synthetic"
dataset = "bach"
patients = 2
size = "256x192"

[stage.patches]
kind = "patchify"
from = "bach"
size = 128
augment = true
"#;

fn out_dir(p: &Project, node: &str) -> std::path::PathBuf {
    out_dir_set(p, node, &[])
}

/// The output folder of `node` in data.toml with `--set` overrides applied.
fn out_dir_set(p: &Project, node: &str, sets: &[&str]) -> std::path::PathBuf {
    let mut args = vec!["show", node, "--exp", "data.toml"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = p.mpcs(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("files")).unwrap_or_else(|| panic!("{text}"));
    std::path::PathBuf::from(line.split_whitespace().nth(1).unwrap())
}

/// portion → set of patients, for one fold file.
fn portions(csv: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        m.entry(f[6].to_string()).or_default().insert(format!("{}/{}", f[3], f[4]));
    }
    m
}

#[test]
fn data_stages_are_cached_keyed_and_correct() {
    let p = Project::new();
    p.write("data.toml", EXP);
    let first = p.run_ok("data.toml", &[]);
    assert_eq!(first.executed, set(&["data", "folds", "bach", "patches"]));

    let folds = out_dir(&p, "folds");
    let mut test_patients = BTreeSet::new();
    let mut all_patients = BTreeSet::new();
    for k in 0..4 {
        let csv = std::fs::read_to_string(folds.join(format!("fold_{k}.csv"))).unwrap();
        let mut m = portions(&csv);
        for portion in ["test_20", "train_60", "val_20", "train_70", "val_10", "train_20", "train_40", "train_80"] {
            m.entry(portion.to_string()).or_default();
        }
        assert!(!m["val_20"].is_empty() && !m["test_20"].is_empty() && !m["train_20"].is_empty(), "{m:?}");
        let (test, train, val) = (&m["test_20"], &m["train_60"], &m["val_20"]);
        assert!(test.is_disjoint(train) && test.is_disjoint(val) && train.is_disjoint(val), "fold {k}: {m:?}");
        assert!(m["train_70"].is_disjoint(&m["val_10"]) && m["train_70"].is_disjoint(test));
        assert!(m["train_20"].is_subset(&m["train_40"]) && m["train_40"].is_subset(train));
        let everyone: BTreeSet<_> = test.union(train).cloned().collect::<BTreeSet<_>>().union(val).cloned().collect();
        all_patients.extend(everyone.iter().cloned());
        assert_eq!(m["train_80"], train.union(val).cloned().collect::<BTreeSet<_>>());
        for t in test {
            assert!(test_patients.insert(t.clone()), "{t} is in two test folds");
        }
        assert!(std::fs::read_to_string(folds.join(format!("fold_{k}_counts.csv")))
            .unwrap()
            .starts_with("portion,class,subtype,images,patients\n"));
    }
    assert_eq!(test_patients, all_patients, "every patient is tested exactly once");
    assert_eq!(all_patients.len(), 16);

    // BACH patches: 256×192 at 128 → 2×2 windows, six augmented files each, class folders kept.
    let patches = out_dir(&p, "patches");
    let csv = std::fs::read_to_string(patches.join("patches.csv")).unwrap();
    assert_eq!(csv.lines().count() - 1, 8 * 4 * 6);
    let any = csv.lines().nth(1).unwrap().split(',').next().unwrap().to_string();
    assert!(patches.join(&any).exists(), "{any}");
    assert!(csv.contains("_rot270.png"), "augmented files are listed");
    assert!(any.contains("/Photos/"), "class layout kept: {any}");

    assert!(p.run_ok("data.toml", &[]).executed.is_empty(), "unchanged rerun");

    // Another split seed reruns the split only, and gives another split.
    let before = std::fs::read_to_string(folds.join("fold_0.csv")).unwrap();
    let s = p.run_ok("data.toml", &["--set", "stage.folds.seed=48"]);
    assert_eq!(s.executed, set(&["folds"]));
    let other = std::fs::read_to_string(out_dir_set(&p, "folds", &["stage.folds.seed=48"]).join("fold_0.csv")).unwrap();
    assert_ne!(before, other, "a different seed gives a different split");

    // A patch parameter reruns only the patches.
    assert_eq!(p.run_ok("data.toml", &["--set", "stage.patches.size=64"]).executed, set(&["patches"]));

    // The same seed in a fresh project gives the same split, byte for byte.
    let q = Project::new();
    q.write("data.toml", EXP);
    q.run_ok("data.toml", &[]);
    assert_eq!(before, std::fs::read_to_string(out_dir(&q, "folds").join("fold_0.csv")).unwrap());
}

#[test]
fn download_stage_fetches_unpacks_and_feeds_the_split() {
    let p = Project::new();
    let gen = p.mpcs(&["synth", "breakhis", "--out", "gen", "--seed", "2", "--patients", "8", "--size", "70x46"]);
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let tar = std::process::Command::new("tar")
        .current_dir(p.dir.path())
        .args(["czf", "BreaKHis_v1.tar.gz", "-C", "gen", "BreaKHis_v1"])
        .status()
        .unwrap();
    assert!(tar.success());
    let bytes = std::fs::read(p.path("BreaKHis_v1.tar.gz")).unwrap();
    let sha = sha256_hex(&bytes);
    let url = format!("file://{}", p.path("BreaKHis_v1.tar.gz").display());
    let exp = |digest: &str| {
        format!("[stage.breakhis]\nkind = \"download\"\nurl = \"{url}\"\n{digest}\n\n[stage.folds]\nkind = \"split\"\nfrom = \"breakhis\"\ndataset = \"breakhis\"\nfolds = 2\n")
    };

    // Unpinned: works, and tells how to pin.
    p.write("dl.toml", &exp(""));
    let out = p.run_raw("dl.toml", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("sha256 = \"{sha}\"")), "pin hint: {err}");

    // Pinned with the right digest: a new key (the digest is a parameter), same data.
    p.write("dl.toml", &exp(&format!("sha256 = \"{sha}\"")));
    let s = p.run_ok("dl.toml", &[]);
    assert!(s.executed.contains("breakhis"));
    assert!(s.cached.contains("folds"), "identical bytes downstream: the split is reused");

    // A wrong digest fails the node and keeps nothing.
    let wrong = format!("sha256 = \"{}\"", "0".repeat(64));
    p.write("dl.toml", &exp(&wrong));
    let before = p.entries();
    let out = p.run_raw("dl.toml", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).to_lowercase().contains("digest"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(before, p.entries(), "nothing half-written in the cache");
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}
