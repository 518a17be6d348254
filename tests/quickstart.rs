//! The README's main command, `mpcs run experiments/quickstart.toml`, reduced with `--set` to seconds (tiny
//! images, one epoch, 2 of its 3 folds, its 2 magnifications and both replicates) but with the same stages:
//! synthetic BreakHis → Macenko → split → MPCS pretraining (FP, OP, RP) → few-label fine-tuning (random and each
//! MPCS backbone) × folds × magnifications × replicates → evaluation → table with the comparison against random.

mod common;
use common::*;

const REDUCED: &[&str] = &[
    "--set",
    "stage.pretrain.matrix.fold=[0, 1]",
    "--set",
    "stage.finetune.matrix.fold=[0, 1]",
    "--set",
    "stage.finetune.matrix.magnification=[\"40X\", \"400X\"]",
    "--set",
    "stage.evaluate.matrix.fold=[0, 1]",
    "--set",
    "stage.evaluate.matrix.magnification=[\"40X\", \"400X\"]",
    "--set",
    "stage.breakhis.patients=12",
    "--set",
    "stage.breakhis.regions_per_patient=2",
    "--set",
    "stage.breakhis.size=\"48x32\"",
    "--set",
    "stage.pretrain.epochs=1",
    "--set",
    "stage.pretrain.size=16",
    "--set",
    "stage.pretrain.batch_size=4",
    "--set",
    "stage.finetune.epochs=1",
    "--set",
    "stage.finetune.size=16",
    "--set",
    "stage.finetune.batch_size=4",
    "--set",
    "stage.evaluate.size=16",
];

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = REDUCED.to_vec();
    v.extend_from_slice(extra);
    v
}

fn metrics(p: &Project, exp: &str, node: &str) -> serde_json::Value {
    let out = p.mpcs(&["show", node, "--exp", exp, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["metrics"].clone()
}

#[test]
fn reduced_quickstart_runs_end_to_end_and_its_table_holds_the_evaluations() {
    let p = Project::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let exp = repo.join("experiments/quickstart.toml");
    let exp = exp.to_str().unwrap();

    // As a user runs it (no --json): the table and its path are printed at the end.
    let mut args = vec!["run", exp, "--plain", "--jobs", "2"];
    args.extend(REDUCED);
    let out = p.mpcs(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let path_line = stdout.lines().find(|l| l.starts_with("table of `table`: ")).expect(&stdout);
    let md_path = path_line.trim_start_matches("table of `table`: ").split(" (").next().unwrap();
    let md = std::fs::read_to_string(md_path).unwrap();
    assert!(stdout.contains(md.trim()), "the printed table is the file's");

    // Nothing reruns.
    let again = p.run_ok(exp, REDUCED);
    assert!(again.executed.is_empty(), "{:?}", again.executed);
    assert_eq!(again.cached.len(), 1 + 1 + 1 + 12 + 32 + 32 + 1);

    // The table: rows = initialisations, columns = the paper's layout over the declared magnifications, every
    // cell = mean ± std over the folds of the evaluate nodes' metrics (in percent).
    let dir = std::path::Path::new(md_path).parent().unwrap();
    let table: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("table.json")).unwrap()).unwrap();
    let columns: Vec<&str> = table["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(columns, ["patient_40X", "patient_400X", "patient_mean", "image_40X", "image_400X", "image_mean"]);
    let rows = table["rows"].as_array().unwrap();
    let mut runs: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["Random init (RN-18)", "MPCS-FP (RN-18)", "MPCS-OP (RN-18)", "MPCS-RP (RN-18)"]);
    for row in rows {
        let init = row["key"].as_str().unwrap();
        for (c, col) in columns.iter().enumerate() {
            let cell = &row["cells"][c];
            let metric = if col.starts_with("patient") { "patient_accuracy" } else { "accuracy" };
            // One value per run (fold, replicate), in that order.
            let mut expected = Vec::new();
            for fold in 0..2 {
                for replicate in 1..=2 {
                    let per_mag: Vec<f64> = ["40X", "400X"]
                        .iter()
                        .filter(|m| col.ends_with("mean") || col.ends_with(*m))
                        .map(|m| {
                            let node =
                                format!("evaluate[fold={fold},magnification={m},init={init},replicate={replicate}]");
                            metrics(&p, exp, &node)[metric].as_f64().unwrap() * 100.0
                        })
                        .collect();
                    expected.push(per_mag.iter().sum::<f64>() / per_mag.len() as f64);
                }
            }
            runs.insert((init.to_string(), col.to_string()), expected.clone());
            let folds: Vec<f64> = cell["folds"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(folds.len(), 4);
            for (a, b) in folds.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-9, "{init} {col}: table {folds:?} vs evaluate {expected:?}");
            }
            let mean = expected.iter().sum::<f64>() / 4.0;
            let std = (expected.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 4.0).sqrt();
            assert!((cell["mean"].as_f64().unwrap() - mean).abs() < 1e-9);
            assert!((cell["std"].as_f64().unwrap() - std).abs() < 1e-9);
            // The Markdown shows the same number.
            let md_row = md.lines().find(|l| l.starts_with(&format!("| {} |", row["label"].as_str().unwrap())));
            let md_cell = md_row.unwrap().split('|').nth(c + 2).unwrap().trim();
            assert!(md_cell.starts_with(&format!("{mean:.2} ±")), "{md_cell} vs {mean}");
        }
    }
    assert!(dir.join("table.csv").exists() && dir.join("table.tex").exists());
    assert!(table["notes"].as_str().unwrap().contains("over 4 run(s) (fold × replicate)"), "{}", table["notes"]);

    // Each MPCS row against random initialisation, run by run: the differences of the per-run values above.
    let comparison = &table["comparison"];
    assert_eq!(comparison["baseline"], "Random init (RN-18)");
    assert_eq!(comparison["columns"], serde_json::json!(["patient_mean", "image_mean"]));
    for (r, init) in ["FP", "OP", "RP"].iter().enumerate() {
        let row = &comparison["rows"][r];
        let ours = &runs[&(init.to_string(), "patient_mean".to_string())];
        let base = &runs[&("random".to_string(), "patient_mean".to_string())];
        let diffs: Vec<f64> = ours.iter().zip(base).map(|(a, b)| a - b).collect();
        let d = &row["deltas"][0];
        assert!((d["mean"].as_f64().unwrap() - diffs.iter().sum::<f64>() / 4.0).abs() < 1e-9, "{row}");
        assert_eq!(d["better"].as_u64().unwrap() as usize, diffs.iter().filter(|v| **v > 1e-9).count(), "{row}");
        assert_eq!(d["worse"].as_u64().unwrap() as usize, diffs.iter().filter(|v| **v < -1e-9).count(), "{row}");
        // Four runs cannot reach p < 0.05 with a sign test (best case 1/16): no verdict either way.
        assert_eq!(row["verdict"], "inconclusive", "{row}");
    }
    assert!(md.contains("### Against Random init (RN-18): paired differences, run by run"), "{md}");

    // `mpcs report`: one self-contained page with the table, curves, confusion matrices, Grad-CAM and t-SNE.
    let mut args = vec!["report", exp, "--out", "results", "--cams", "2", "--tsne-points", "60"];
    args.extend(REDUCED);
    let out = p.mpcs(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(p.path("results/report.html")).unwrap();
    for label in
        ["Random init (RN-18)", "MPCS-FP (RN-18)", "Grad-CAM", "t-SNE", "Loss per epoch", "Confusion", "Against Random"]
    {
        assert!(html.contains(label) || html.contains(&label.to_lowercase()), "the report lacks {label}");
    }
    let first_cell = md.lines().find(|l| l.starts_with("| MPCS-FP (RN-18) |")).unwrap().split('|').nth(2).unwrap();
    assert!(html.contains(first_cell.trim()), "the report's table shows the table's numbers ({first_cell})");
    // Pictures are inlined (no file or network request), at least: 6 loss curves, 4 confusion matrices,
    // 2 Grad-CAM overlays and 2 t-SNE maps.
    assert!(html.matches("src=\"data:image/png;base64,").count() >= 14);
    assert!(!html.contains("src=\"http") && !html.contains("src=\"file"));
    for f in ["cam_0.png", "cam_1.png", "tsne_class.png", "tsne_magnification.png"] {
        assert!(p.path("results").join(f).exists(), "{f}");
    }
    if let Some(shot) = screenshot(&p.path("results/report.html"), &p.path("shot.png")) {
        let img = image::open(&shot).unwrap().to_rgb8();
        let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        assert!(colours.len() > 50, "the rendered report is blank ({} colours)", colours.len());
    }

    // A fine-tuning parameter reruns every fine-tune node, their evaluations and the table only.
    let s = p.run_ok(exp, &with(&["--set", "stage.finetune.lr=0.002"]));
    assert_eq!(s.executed.iter().filter(|n| n.starts_with("finetune[")).count(), 32);
    assert!(
        s.executed.iter().all(|n| n.starts_with("finetune[") || n.starts_with("evaluate[") || n == "table"),
        "{:?}",
        s.executed
    );
}
