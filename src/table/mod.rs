//! Result tables in the paper's layout: one row per method, one column per (metric, filter), each cell the
//! mean ± standard deviation over folds of the evaluate nodes' metrics, with the paper's reported value and the
//! difference beside it when a reference table is given. Written as Markdown, CSV, LaTeX and JSON.
//!
//! The standard deviation is the population one (ddof = 0, numpy's default), over the folds present.
//! A "mean" column (`mean_over = "magnification"`) first averages a fold's values over that key, then takes
//! mean ± std of those per-fold averages over folds.

mod reference;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use reference::{Reference, PAPER_TABLES};

/// One column: which metric of `metrics.json`, from which evaluate nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnSpec {
    pub name: String,
    /// A key of `metrics.json`, or a dotted path into it (`per_class.1.precision`).
    pub metric: String,
    /// Matrix values (or `stage` = the evaluate stage's name) the node must have.
    pub filter: BTreeMap<String, String>,
    /// A "mean" column: a fold's several matching results (one per value of this matrix key) are averaged
    /// first. Without it, a fold must match exactly one result.
    pub mean_over: Option<String>,
    /// Multiplier for display (100 for accuracies in percent).
    pub scale: f64,
}

/// One evaluate node's result.
#[derive(Clone, Debug)]
pub struct Entry {
    pub stage: String,
    pub matrix: BTreeMap<String, String>,
    pub metrics: Value,
}

impl Entry {
    fn key(&self, k: &str) -> Option<&str> {
        if k == "stage" {
            Some(&self.stage)
        } else {
            self.matrix.get(k).map(String::as_str)
        }
    }

    /// The entry's run (what mean ± std is taken over): the values of the `folds` key(s), e.g. `fold` or
    /// `fold,replicate`, each sorted naturally; a missing key counts as run 0.
    fn run_key(&self, keys: &str) -> Vec<(u8, i64, String)> {
        keys.split(',').map(|k| natural(self.key(k.trim()).unwrap_or("0"))).collect()
    }

    /// The entry's row: the value of the `rows` key, or for several comma-separated keys (`stage,init`)
    /// their values joined by "/" (`evaluate_b2/FP`), so that two evaluate stages with the same matrix
    /// values make separate rows.
    fn row_key(&self, rows: &str) -> Option<String> {
        let parts: Option<Vec<&str>> = rows.split(',').map(|k| self.key(k.trim())).collect();
        parts.map(|p| p.join("/"))
    }
}

#[derive(Clone, Debug)]
pub struct TableSpec {
    pub title: String,
    /// The matrix key whose values are the rows (e.g. `init`), `stage` for one row per evaluate stage, or
    /// several of them comma-separated (`stage,init`: row keys like `evaluate_b2/FP`).
    pub rows: String,
    /// Display names of row values (e.g. `FP` → `MPCS-FP (RN-50)`), also used to find the paper's row.
    pub row_labels: BTreeMap<String, String>,
    /// The matrix key of the folds, or several comma-separated (`fold,replicate`): each distinct combination is
    /// one run, and cells are mean ± std over runs.
    pub folds: String,
    pub columns: Vec<ColumnSpec>,
    pub decimals: usize,
    /// A row key (e.g. `random`) every other row is compared with, run by run (see [`Comparison`]).
    pub baseline: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Cell {
    pub mean: f64,
    pub std: f64,
    /// The per-fold values, in fold order.
    pub folds: Vec<f64>,
    pub paper_mean: Option<f64>,
    pub paper_std: Option<f64>,
    /// mean − paper_mean.
    pub diff: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    pub key: String,
    pub label: String,
    pub cells: Vec<Option<Cell>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    pub reference: Option<String>,
    pub notes: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

/// Each row against a baseline row, paired by run: same fold (and replicate), same data, only the
/// initialisation differs. Run-to-run spread is mostly shared between the two (a hard fold is hard for both),
/// so the paired difference says more than two overlapping mean ± std.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    /// The baseline row's label.
    pub baseline: String,
    /// The columns compared: the "mean" columns when there are any, else all.
    pub columns: Vec<String>,
    pub rows: Vec<ComparedRow>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ComparedRow {
    pub label: String,
    pub deltas: Vec<Option<Delta>>,
    /// On the first compared column: `better` or `worse` than the baseline when the sign test says so at [`ALPHA`], else
    /// `inconclusive` (too few runs, or too many going the other way).
    pub verdict: String,
}

/// Row minus baseline over the runs both have.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Delta {
    pub mean: f64,
    pub std: f64,
    pub better: usize,
    pub worse: usize,
    pub ties: usize,
    /// One-sided exact sign test (ties dropped): P(at least `better` of `better + worse` fair coin flips).
    pub p_better: f64,
    pub p_worse: f64,
}

/// Significance level of the verdict.
pub const ALPHA: f64 = 0.05;

/// P(X ≥ k) for X ~ Binomial(n, 1/2).
pub fn sign_test_p(k: usize, n: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    // Σ_{i=k}^{n} C(n, i) / 2^n, with C(n, i) built up in floating point (n is a few dozen runs at most).
    let mut c = 1f64; // C(n, 0)
    let mut tail = 0f64;
    for i in 0..=n {
        if i >= k {
            tail += c;
        }
        c = c * (n - i) as f64 / (i + 1) as f64;
    }
    (tail / 2f64.powi(n as i32)).min(1.0)
}

fn delta(row: &BTreeMap<Vec<(u8, i64, String)>, f64>, base: &BTreeMap<Vec<(u8, i64, String)>, f64>) -> Option<Delta> {
    let diffs: Vec<f64> = row.iter().filter_map(|(run, v)| base.get(run).map(|b| v - b)).collect();
    if diffs.is_empty() {
        return None;
    }
    let (mean, std) = mean_std(&diffs);
    // Differences within float noise are ties (e.g. two models that classify every test image alike).
    let better = diffs.iter().filter(|d| **d > 1e-9).count();
    let worse = diffs.iter().filter(|d| **d < -1e-9).count();
    let n = better + worse;
    Some(Delta {
        mean,
        std,
        better,
        worse,
        ties: diffs.len() - n,
        p_better: sign_test_p(better, n),
        p_worse: sign_test_p(worse, n),
    })
}

/// The paper's BreakHis layout: patient-level accuracy per magnification and their mean, then image-level.
pub fn breakhis_columns(magnifications: &[String]) -> Vec<ColumnSpec> {
    let mut cols = Vec::new();
    for (prefix, metric) in [("patient", "patient_accuracy"), ("image", "accuracy")] {
        for m in magnifications {
            cols.push(ColumnSpec {
                name: format!("{prefix}_{m}"),
                metric: metric.into(),
                filter: BTreeMap::from([("magnification".to_string(), m.clone())]),
                mean_over: None,
                scale: 100.0,
            });
        }
        cols.push(ColumnSpec {
            name: format!("{prefix}_mean"),
            metric: metric.into(),
            filter: BTreeMap::new(),
            mean_over: Some("magnification".into()),
            scale: 100.0,
        });
    }
    cols
}

/// Looks up a metric: a key, or a dotted path whose numeric parts index arrays.
pub fn metric_value(metrics: &Value, path: &str) -> Option<f64> {
    let mut v = metrics;
    for part in path.split('.') {
        v = match part.parse::<usize>() {
            Ok(i) if v.is_array() => v.get(i)?,
            _ => v.get(part)?,
        };
    }
    v.as_f64()
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Sort key for fold and matrix values: numbers numerically, then text.
fn natural(a: &str) -> (u8, i64, String) {
    match a.parse::<i64>() {
        Ok(n) => (0, n, String::new()),
        Err(_) => (1, 0, a.to_string()),
    }
}

/// Builds the table from the evaluate nodes' results.
pub fn build(spec: &TableSpec, entries: &[Entry], reference: Option<(&str, &Reference)>) -> Result<Table, String> {
    if entries.is_empty() {
        return Err("the table has no evaluate results as inputs; add the evaluate stage to `from`".into());
    }
    // Rows in order of first appearance (the plan's matrix order).
    let mut row_keys: Vec<String> = Vec::new();
    for e in entries {
        let k = e.row_key(&spec.rows).ok_or_else(|| {
            format!(
                "the input `{}` has no matrix key `{}` (table rows); set `rows` to its keys or `stage`",
                e.stage, spec.rows
            )
        })?;
        if !row_keys.contains(&k) {
            row_keys.push(k);
        }
    }
    if let Some(b) = &spec.baseline {
        if !row_keys.contains(b) {
            return Err(format!("baseline `{b}` is not a row of the table; its rows are: {}", row_keys.join(", ")));
        }
    }
    type Runs = BTreeMap<Vec<(u8, i64, String)>, f64>;
    let mut runs_of: Vec<Vec<Runs>> = Vec::new();
    let mut rows = Vec::new();
    for rk in &row_keys {
        let label = spec.row_labels.get(rk).cloned().unwrap_or_else(|| rk.clone());
        let mut cells = Vec::new();
        let mut row_runs = Vec::new();
        for col in &spec.columns {
            let selected: Vec<&Entry> = entries
                .iter()
                .filter(|e| e.row_key(&spec.rows).as_ref() == Some(rk))
                .filter(|e| col.filter.iter().all(|(k, v)| e.key(k) == Some(v.as_str())))
                .collect();
            // Sorted by run (numerically); the values a run contributes (several for a mean column).
            let mut per_fold: BTreeMap<Vec<(u8, i64, String)>, Vec<f64>> = BTreeMap::new();
            for e in &selected {
                let value = metric_value(&e.metrics, &col.metric).ok_or_else(|| {
                    format!(
                        "column `{}`: `{}` has no metric `{}` in its metrics.json",
                        col.name,
                        describe(e),
                        col.metric
                    )
                })?;
                per_fold.entry(e.run_key(&spec.folds)).or_default().push(value);
            }
            let mut runs = Runs::new();
            for (run, vals) in per_fold {
                if col.mean_over.is_none() && vals.len() > 1 {
                    return Err(format!(
                        "column `{}`, row `{rk}`: {} evaluate results fall in one fold; add a `where` filter that \
                         picks one (e.g. the magnification)",
                        col.name,
                        vals.len()
                    ));
                }
                runs.insert(run, vals.iter().sum::<f64>() / vals.len() as f64 * col.scale);
            }
            // In run order (the map's), as the cell lists them.
            let fold_values: Vec<f64> = runs.values().copied().collect();
            row_runs.push(runs);
            if fold_values.is_empty() {
                cells.push(None);
                continue;
            }
            let (mean, std) = mean_std(&fold_values);
            let paper = reference.and_then(|(_, r)| r.get(&label, &col.name));
            cells.push(Some(Cell {
                mean,
                std,
                folds: fold_values,
                paper_mean: paper.map(|p| p.0),
                paper_std: paper.map(|p| p.1),
                diff: paper.map(|p| mean - p.0),
            }));
        }
        rows.push(Row { key: rk.clone(), label, cells });
        runs_of.push(row_runs);
    }
    let comparison = spec.baseline.as_ref().map(|b| {
        let bi = row_keys.iter().position(|k| k == b).expect("checked above");
        let means: Vec<usize> = (0..spec.columns.len()).filter(|&c| spec.columns[c].mean_over.is_some()).collect();
        let compared = if means.is_empty() { (0..spec.columns.len()).collect() } else { means };
        let baseline = rows[bi].label.clone();
        let compared_rows = (0..rows.len())
            .filter(|&r| r != bi)
            .map(|r| {
                let deltas: Vec<Option<Delta>> =
                    compared.iter().map(|&c| delta(&runs_of[r][c], &runs_of[bi][c])).collect();
                let verdict = match deltas.first().cloned().flatten() {
                    Some(d) if d.p_better < ALPHA => "better",
                    Some(d) if d.p_worse < ALPHA => "worse",
                    _ => "inconclusive",
                };
                ComparedRow { label: rows[r].label.clone(), deltas, verdict: verdict.into() }
            })
            .collect();
        Comparison {
            baseline,
            columns: compared.iter().map(|&c| spec.columns[c].name.clone()).collect(),
            rows: compared_rows,
        }
    });
    let runs: std::collections::BTreeSet<_> = entries.iter().map(|e| e.run_key(&spec.folds)).collect();
    let over = if spec.folds.contains(',') {
        format!(
            "{} run(s) ({})",
            runs.len().max(1),
            spec.folds.split(',').map(str::trim).collect::<Vec<_>>().join(" × ")
        )
    } else {
        format!("{} fold(s)", runs.len().max(1))
    };
    let compared = rows.iter().flat_map(|r| &r.cells).flatten().any(|c| c.paper_mean.is_some());
    Ok(Table {
        title: spec.title.clone(),
        columns: spec.columns.iter().map(|c| c.name.clone()).collect(),
        rows,
        reference: reference.map(|(n, _)| n.to_string()),
        comparison,
        notes: format!(
            "mean ± std (population, ddof 0) over {over}; accuracies in percent{}",
            match reference {
                _ if compared => {
                    "; with each value the paper's and our difference".to_string()
                }
                Some((name, _)) => format!("; no row label matches a method of the paper's `{name}` table"),
                None => String::new(),
            }
        ),
    })
}

fn describe(e: &Entry) -> String {
    let m: Vec<String> = e.matrix.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}[{}]", e.stage, m.join(","))
}

impl Table {
    fn cell_text(&self, c: &Option<Cell>, d: usize, latex: bool) -> String {
        let Some(c) = c else { return "–".into() };
        let pm = if latex { "$\\pm$" } else { " ± " };
        let mut s = format!("{:.d$}{pm}{:.d$}", c.mean, c.std);
        if let (Some(p), Some(diff)) = (c.paper_mean, c.diff) {
            let sign = if diff >= 0.0 { "+" } else { "−" };
            if latex {
                let sign = if diff >= 0.0 { "+" } else { "$-$" };
                s.push_str(&format!(" {{\\scriptsize({p:.d$}, {sign}{:.d$})}}", diff.abs()));
            } else {
                s.push_str(&format!(" (paper {p:.d$}, {sign}{:.d$})", diff.abs()));
            }
        }
        s
    }

    pub fn to_markdown(&self, decimals: usize) -> String {
        let mut s = format!("## {}\n\n| method | {} |\n|---|", self.title, self.columns.join(" | "));
        s.push_str(&"---|".repeat(self.columns.len()));
        s.push('\n');
        for r in &self.rows {
            let cells: Vec<String> = r.cells.iter().map(|c| self.cell_text(c, decimals, false)).collect();
            s.push_str(&format!("| {} | {} |\n", r.label, cells.join(" | ")));
        }
        s.push_str(&format!("\n{}\n", self.notes));
        if let Some(c) = &self.comparison {
            s.push_str(&c.to_markdown(decimals));
        }
        s
    }

    /// Long format: one line per cell, machine-readable.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("method,column,mean,std,folds,paper_mean,paper_std,diff\n");
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_default();
        for r in &self.rows {
            for (col, c) in self.columns.iter().zip(&r.cells) {
                let Some(c) = c else { continue };
                s.push_str(&format!(
                    "{},{col},{:.4},{:.4},{},{},{},{}\n",
                    csv_field(&r.label),
                    c.mean,
                    c.std,
                    c.folds.len(),
                    opt(c.paper_mean),
                    opt(c.paper_std),
                    opt(c.diff)
                ));
            }
        }
        s
    }

    pub fn to_latex(&self, decimals: usize) -> String {
        let esc = |t: &str| t.replace('_', "\\_").replace('%', "\\%").replace('&', "\\&");
        let mut s = format!(
            "% {}\n% {}\n\\begin{{tabular}}{{l{}}}\n\\hline\nMethod & {} \\\\\n\\hline\n",
            self.title,
            self.notes,
            "c".repeat(self.columns.len()),
            self.columns.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" & ")
        );
        for r in &self.rows {
            let cells: Vec<String> = r.cells.iter().map(|c| self.cell_text(c, decimals, true)).collect();
            s.push_str(&format!("{} & {} \\\\\n", esc(&r.label), cells.join(" & ")));
        }
        s.push_str("\\hline\n\\end{tabular}\n");
        s
    }
}

impl Delta {
    /// `+1.23 ± 0.45, better in 5/6`.
    pub fn text(&self, d: usize) -> String {
        let sign = if self.mean >= 0.0 { "+" } else { "−" };
        let n = self.better + self.worse + self.ties;
        format!("{sign}{:.d$} ± {:.d$}, better in {}/{n}", self.mean.abs(), self.std, self.better)
    }
}

impl ComparedRow {
    /// The verdict with its evidence: `better (sign test p = 0.016)`.
    pub fn verdict_text(&self) -> String {
        match self.deltas.first().cloned().flatten() {
            Some(d) => {
                let p = if self.verdict == "worse" { d.p_worse } else { d.p_better };
                format!("{} (one-sided sign test p = {p:.3})", self.verdict)
            }
            None => "no runs in common".into(),
        }
    }
}

impl Comparison {
    pub fn to_markdown(&self, decimals: usize) -> String {
        let first = self.columns.first().map(String::as_str).unwrap_or("");
        let mut s = format!(
            "\n### Against {}: paired differences, run by run\n\n| method | {} | verdict on {first} |\n|---|",
            self.baseline,
            self.columns.iter().map(|c| format!("Δ {c}")).collect::<Vec<_>>().join(" | ")
        );
        s.push_str(&"---|".repeat(self.columns.len() + 1));
        s.push('\n');
        for r in &self.rows {
            let cells: Vec<String> =
                r.deltas.iter().map(|d| d.as_ref().map_or("–".to_string(), |d| d.text(decimals))).collect();
            s.push_str(&format!("| {} | {} | {} |\n", r.label, cells.join(" | "), r.verdict_text()));
        }
        s.push_str(&format!(
            "\nΔ = method − {} on the same run, mean ± std over runs; `better`/`worse` when the one-sided sign \
             test gives p < {ALPHA} over the runs that differ, else `inconclusive`.\n",
            self.baseline
        ));
        s
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(init: &str, fold: u32, mag: &str, acc: f64, patient: f64) -> Entry {
        Entry {
            stage: "evaluate".into(),
            matrix: BTreeMap::from([
                ("init".into(), init.into()),
                ("fold".into(), fold.to_string()),
                ("magnification".into(), mag.into()),
            ]),
            metrics: serde_json::json!({"accuracy": acc, "patient_accuracy": patient,
                "per_class": [{"precision": 0.5}, {"precision": 0.25}]}),
        }
    }

    fn spec(mags: &[&str]) -> TableSpec {
        TableSpec {
            title: "t".into(),
            rows: "init".into(),
            row_labels: BTreeMap::from([("FP".to_string(), "MPCS-FP (RN-50)".to_string())]),
            folds: "fold".into(),
            columns: breakhis_columns(&mags.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
            decimals: 2,
            baseline: None,
        }
    }

    #[test]
    fn mean_std_over_folds_and_mean_column_by_hand() {
        // FP: fold 0 → 40X 0.8, 100X 0.6; fold 1 → 40X 0.9, 100X 0.7.
        let e = vec![
            entry("FP", 0, "40X", 0.8, 0.5),
            entry("FP", 0, "100X", 0.6, 0.5),
            entry("FP", 1, "40X", 0.9, 0.7),
            entry("FP", 1, "100X", 0.7, 0.7),
        ];
        let reference = Reference::paper("breakhis").unwrap();
        let t = build(&spec(&["40X", "100X"]), &e, Some(("breakhis", &reference))).unwrap();
        assert_eq!(t.columns, ["patient_40X", "patient_100X", "patient_mean", "image_40X", "image_100X", "image_mean"]);
        let r = &t.rows[0];
        assert_eq!(r.label, "MPCS-FP (RN-50)");
        let image_40 = r.cells[3].as_ref().unwrap();
        assert!((image_40.mean - 85.0).abs() < 1e-9 && (image_40.std - 5.0).abs() < 1e-9);
        // Mean column: fold means 70 and 80 → 75 ± 5.
        let image_mean = r.cells[5].as_ref().unwrap();
        assert!((image_mean.mean - 75.0).abs() < 1e-9 && (image_mean.std - 5.0).abs() < 1e-9);
        // The paper's MPCS-FP (RN-50) image_40X is 92.24 ± 3.48.
        assert_eq!(image_40.paper_mean, Some(92.24));
        assert!((image_40.diff.unwrap() - (85.0 - 92.24)).abs() < 1e-9);
        let md = t.to_markdown(1);
        assert!(md.contains("| MPCS-FP (RN-50) | 60.0 ± 10.0 (paper 91.8, −31.8) |"), "{md}");
        assert!(t.to_csv().contains("MPCS-FP (RN-50),image_40X,85.0000,5.0000,2,92.2400,3.4800,-7.2400\n"));
        assert!(t.to_latex(1).contains("85.0$\\pm$5.0 {\\scriptsize(92.2, $-$7.2)}"));
    }

    #[test]
    fn ambiguous_cells_and_missing_metrics_are_errors() {
        let e = vec![entry("FP", 0, "40X", 0.8, 0.5), entry("FP", 0, "100X", 0.6, 0.5)];
        let mut s = spec(&["40X"]);
        s.columns[0].filter.clear();
        let err = build(&s, &e, None).unwrap_err();
        assert!(err.contains("2 evaluate results fall in one fold"), "{err}");
        s.columns[0].metric = "nope".into();
        let err = build(&s, &e, None).unwrap_err();
        assert!(err.contains("no metric `nope`"), "{err}");
        assert_eq!(metric_value(&e[0].metrics, "per_class.1.precision"), Some(0.25));
    }

    /// Two evaluate stages with the same matrix values (the ResNet-50 and EfficientNet-b2 rows of Table 2)
    /// stay apart with `rows = "stage,init"`, each with its own label and paper value.
    #[test]
    fn composite_rows_keep_two_stages_apart() {
        let mut e = vec![entry("FP", 0, "40X", 0.8, 0.5), entry("FP", 1, "40X", 0.9, 0.5)];
        let mut b2 = vec![entry("FP", 0, "40X", 0.6, 0.5), entry("FP", 1, "40X", 0.7, 0.5)];
        b2.iter_mut().for_each(|x| x.stage = "evaluate_b2".into());
        e.extend(b2);
        let mut s = spec(&["40X"]);
        s.rows = "stage, init".into();
        s.row_labels = BTreeMap::from([
            ("evaluate/FP".to_string(), "MPCS-FP (RN-50)".to_string()),
            ("evaluate_b2/FP".to_string(), "MPCS-FP (Eff-net b2)".to_string()),
        ]);
        let reference = Reference::paper("breakhis").unwrap();
        let t = build(&s, &e, Some(("breakhis", &reference))).unwrap();
        let keys: Vec<&str> = t.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["evaluate/FP", "evaluate_b2/FP"]);
        let image_40 = |r: usize| t.rows[r].cells[3].clone().unwrap();
        assert!((image_40(0).mean - 85.0).abs() < 1e-9 && (image_40(1).mean - 65.0).abs() < 1e-9);
        assert_eq!(t.rows[1].label, "MPCS-FP (Eff-net b2)");
        assert!(image_40(1).paper_mean.is_some() && image_40(1).paper_mean != image_40(0).paper_mean);
        s.rows = "stage,nope".into();
        assert!(build(&s, &e, None).unwrap_err().contains("no matrix key `stage,nope`"));
    }

    #[test]
    fn sign_test_matches_the_binomial_tail() {
        // P(X ≥ k), X ~ Bin(n, 1/2), by hand: n = 6 → 1/64, 7/64, 22/64; n = 0 or k = 0 → 1.
        assert!((sign_test_p(6, 6) - 1.0 / 64.0).abs() < 1e-15);
        assert!((sign_test_p(5, 6) - 7.0 / 64.0).abs() < 1e-15);
        assert!((sign_test_p(4, 6) - 22.0 / 64.0).abs() < 1e-15);
        assert_eq!(sign_test_p(0, 0), 1.0);
        assert_eq!(sign_test_p(0, 5), 1.0);
        // n = 24, k = 18: Σ_{i=18}^{24} C(24, i) / 2^24 = 190051 / 16777216 exactly (Python's math.comb).
        assert!((sign_test_p(18, 24) - 190051.0 / 16777216.0).abs() < 1e-15);
    }

    /// Runs are (fold, replicate) pairs; each row is compared with the baseline on the same run. FP beats random
    /// on all 4 runs by 10 points (sign test 1/16 = 0.0625: not below 0.05 with 4 runs, so no verdict); OP ties
    /// on two and loses on two.
    #[test]
    fn rows_are_compared_with_the_baseline_run_by_run() {
        let mut e = Vec::new();
        for fold in 0..2 {
            for rep in 1..=2 {
                let base = 0.5 + 0.1 * fold as f64 + 0.01 * rep as f64;
                for (init, acc) in
                    [("random", base), ("FP", base + 0.1), ("OP", base - if rep == 1 { 0.0 } else { 0.05 })]
                {
                    let mut x = entry(init, fold, "40X", acc, acc);
                    x.matrix.insert("replicate".into(), rep.to_string());
                    e.push(x);
                }
            }
        }
        let mut s = spec(&["40X"]);
        s.folds = "fold,replicate".into();
        s.baseline = Some("random".into());
        let t = build(&s, &e, None).unwrap();
        assert!(t.notes.contains("over 4 run(s) (fold × replicate)"), "{}", t.notes);
        let c = t.comparison.as_ref().unwrap();
        assert_eq!(c.baseline, "random");
        assert_eq!(c.columns, ["patient_mean", "image_mean"]);
        let fp = &c.rows[0];
        assert_eq!(fp.label, "MPCS-FP (RN-50)");
        let d = fp.deltas[0].clone().unwrap();
        assert!((d.mean - 10.0).abs() < 1e-9 && d.std < 1e-9, "{d:?}");
        assert_eq!((d.better, d.worse, d.ties), (4, 0, 0));
        assert!((d.p_better - 0.0625).abs() < 1e-12);
        assert_eq!(fp.verdict, "inconclusive");
        let op = c.rows[1].deltas[0].clone().unwrap();
        assert_eq!((op.better, op.worse, op.ties), (0, 2, 2));
        assert!((op.mean + 2.5).abs() < 1e-9);
        let md = t.to_markdown(2);
        assert!(md.contains("### Against random: paired differences, run by run"), "{md}");
        assert!(md.contains("| MPCS-FP (RN-50) | +10.00 ± 0.00, better in 4/4 | +10.00 ± 0.00, better in 4/4 | inconclusive (one-sided sign test p = 0.062) |"), "{md}");
        // With 5 fold × replicate runs all better, the verdict is `better` (1/32 < 0.05).
        let mut more = e.clone();
        for (init, acc) in [("random", 0.5), ("FP", 0.7), ("OP", 0.5)] {
            let mut x = entry(init, 2, "40X", acc, acc);
            x.matrix.insert("replicate".into(), "1".into());
            more.push(x);
        }
        assert_eq!(build(&s, &more, None).unwrap().comparison.unwrap().rows[0].verdict, "better");
        // A baseline that is not a row is refused with the rows there are.
        s.baseline = Some("imagenet".into());
        let err = build(&s, &e, None).unwrap_err();
        assert!(err.contains("baseline `imagenet` is not a row") && err.contains("random, FP, OP"), "{err}");
    }

    #[test]
    fn paper_reference_tables_parse() {
        for name in ["breakhis", "bach", "breast_cell"] {
            let r = Reference::paper(name).unwrap();
            assert!(!r.columns.is_empty() && !r.methods().is_empty(), "{name}");
        }
        assert_eq!(Reference::paper("bach").unwrap().get("MPCS-OP", "image_test"), Some((91.85, 1.77)));
        assert!(Reference::paper("nope").unwrap_err().contains("breakhis"));
    }
}
