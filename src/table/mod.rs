//! Result tables in the paper's layout: one row per method, one column per (metric, filter), each cell the
//! mean ± standard deviation over folds of the evaluate nodes' metrics, with the paper's reported value and the
//! difference beside it when a reference table is given. Written as Markdown, CSV, LaTeX and JSON.
//!
//! The standard deviation is the population one (ddof = 0, numpy's default), over the folds present.
//! A "mean" column (`mean_over = "magnification"`) first averages a fold's values over that key, then takes
//! mean ± std of those per-fold averages over folds.

mod reference;

use std::collections::BTreeMap;

use serde::Serialize;
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
    /// The matrix key of the folds.
    pub folds: String,
    pub columns: Vec<ColumnSpec>,
    pub decimals: usize,
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
    let mut rows = Vec::new();
    for rk in &row_keys {
        let label = spec.row_labels.get(rk).cloned().unwrap_or_else(|| rk.clone());
        let mut cells = Vec::new();
        for col in &spec.columns {
            let selected: Vec<&Entry> = entries
                .iter()
                .filter(|e| e.row_key(&spec.rows).as_ref() == Some(rk))
                .filter(|e| col.filter.iter().all(|(k, v)| e.key(k) == Some(v.as_str())))
                .collect();
            // Sorted by fold (numerically); the values a fold contributes (several for a mean column).
            let mut per_fold: BTreeMap<(u8, i64, String), Vec<f64>> = BTreeMap::new();
            for e in &selected {
                let fold = e.key(&spec.folds).unwrap_or("0");
                let value = metric_value(&e.metrics, &col.metric).ok_or_else(|| {
                    format!(
                        "column `{}`: `{}` has no metric `{}` in its metrics.json",
                        col.name,
                        describe(e),
                        col.metric
                    )
                })?;
                per_fold.entry(natural(fold)).or_default().push(value);
            }
            let mut fold_values = Vec::new();
            for vals in per_fold.into_values() {
                if col.mean_over.is_none() && vals.len() > 1 {
                    return Err(format!(
                        "column `{}`, row `{rk}`: {} evaluate results fall in one fold; add a `where` filter that \
                         picks one (e.g. the magnification)",
                        col.name,
                        vals.len()
                    ));
                }
                fold_values.push(vals.iter().sum::<f64>() / vals.len() as f64 * col.scale);
            }
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
    }
    let folds = entries.iter().filter_map(|e| e.key(&spec.folds)).collect::<std::collections::BTreeSet<_>>().len();
    let compared = rows.iter().flat_map(|r| &r.cells).flatten().any(|c| c.paper_mean.is_some());
    Ok(Table {
        title: spec.title.clone(),
        columns: spec.columns.iter().map(|c| c.name.clone()).collect(),
        rows,
        reference: reference.map(|(n, _)| n.to_string()),
        notes: format!(
            "mean ± std (population, ddof 0) over {} fold(s); accuracies in percent{}",
            folds.max(1),
            match reference {
                _ if compared => {
                    "; in brackets the paper's value and our difference".to_string()
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
    fn paper_reference_tables_parse() {
        for name in ["breakhis", "bach", "breast_cell"] {
            let r = Reference::paper(name).unwrap();
            assert!(!r.columns.is_empty() && !r.methods().is_empty(), "{name}");
        }
        assert_eq!(Reference::paper("bach").unwrap().get("MPCS-OP", "image_test"), Some((91.85, 1.77)));
        assert!(Reference::paper("nope").unwrap_err().contains("breakhis"));
    }
}
