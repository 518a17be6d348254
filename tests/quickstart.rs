//! The README's main command: `mpcs run experiments/quickstart.toml`, run as a user would from the repository.

mod common;
use common::*;

#[test]
fn quickstart_runs_then_reruns_nothing() {
    let p = Project::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let exp = repo.join("experiments/quickstart.toml");
    let exp = exp.to_str().unwrap();
    let first = p.run_ok(exp, &[]);
    assert_eq!(first.executed.len(), 109, "{:?}", first.failed);
    assert!(p.run_ok(exp, &[]).executed.is_empty());

    // The table has a row per (init, magnification), with accuracies in [0, 1].
    let out = p.mpcs(&["show", "table", "--exp", exp]);
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text.lines().find(|l| l.starts_with("files")).unwrap().split_whitespace().nth(1).unwrap().to_string();
    let table = std::fs::read_to_string(std::path::Path::new(&dir).join("table.md")).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 16, "{table}");
    for r in rows {
        let acc: f64 = r.split('|').nth(3).unwrap().split('±').next().unwrap().trim().parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{r}");
    }

    // A fine-tuning parameter reruns fine-tuning (and, where its output changes, evaluation and the table) only.
    let s = p.run_ok(exp, &["--set", "stage.finetune.params.portion=train_40"]);
    assert_eq!(s.executed.iter().filter(|n| n.starts_with("finetune[")).count(), 48);
    assert!(
        s.executed.iter().all(|n| n.starts_with("finetune[") || n.starts_with("evaluate[") || n == "table"),
        "{:?}",
        s.executed
    );
}
