//! Evaluation metrics as METHOD.md defines them: image-level accuracy, patient-level accuracy (the mean over
//! patients of each patient's share of correctly classified images), weighted F1, per-class precision / recall /
//! F1 (scikit-learn semantics, 0 where undefined), the confusion matrix, and image-wise accuracy by majority vote
//! over an image's patches (BACH).

use std::collections::BTreeMap;

use serde::Serialize;

/// One classified image (or patch).
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub label: u32,
    pub predicted: u32,
    /// Patient (BreakHis) or source image (BACH patches).
    pub group: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClassStats {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub images: usize,
    pub accuracy: f64,
    /// Present when every prediction has a group.
    pub patient_accuracy: Option<f64>,
    pub weighted_f1: f64,
    pub per_class: Vec<ClassStats>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Metrics over `preds` for labels 0..classes. Labels or predictions outside that range are an error.
pub fn evaluate(preds: &[Prediction], classes: usize) -> Result<Report, String> {
    if preds.is_empty() {
        return Err("no predictions to evaluate (is the test portion empty?)".into());
    }
    let mut confusion = vec![vec![0usize; classes]; classes];
    for p in preds {
        let (t, q) = (p.label as usize, p.predicted as usize);
        if t >= classes || q >= classes {
            return Err(format!("label {t} or prediction {q} is outside 0..{classes}"));
        }
        confusion[t][q] += 1;
    }
    let n = preds.len();
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class: Vec<ClassStats> = (0..classes)
        .map(|c| {
            let tp = confusion[c][c];
            let predicted: usize = (0..classes).map(|t| confusion[t][c]).sum();
            let support: usize = confusion[c].iter().sum();
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
            ClassStats { precision, recall, f1, support }
        })
        .collect();
    let weighted_f1 = per_class.iter().map(|c| c.f1 * c.support as f64).sum::<f64>() / n as f64;
    let patient_accuracy = if preds.iter().all(|p| p.group.is_some()) {
        let mut by: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for p in preds {
            let e = by.entry(p.group.as_deref().unwrap_or_default()).or_default();
            e.0 += usize::from(p.label == p.predicted);
            e.1 += 1;
        }
        Some(by.values().map(|(c, t)| ratio(*c, *t)).sum::<f64>() / by.len() as f64)
    } else {
        None
    };
    Ok(Report { images: n, accuracy: ratio(correct, n), patient_accuracy, weighted_f1, per_class, confusion })
}

/// One prediction per group by majority vote over its members (ties go to the smallest label); the group's
/// label is its first member's. Used for BACH image-wise accuracy over patches.
pub fn majority_vote(preds: &[Prediction], classes: usize) -> Vec<Prediction> {
    let mut by: BTreeMap<&str, (u32, Vec<usize>)> = BTreeMap::new();
    for p in preds {
        let e = by.entry(p.group.as_deref().unwrap_or_default()).or_insert_with(|| (p.label, vec![0; classes]));
        if let Some(v) = e.1.get_mut(p.predicted as usize) {
            *v += 1;
        }
    }
    by.into_iter()
        .map(|(g, (label, votes))| {
            let best = votes.iter().enumerate().fold(0, |b, (i, &v)| if v > votes[b] { i } else { b });
            Prediction { label, predicted: best as u32, group: Some(g.to_string()) }
        })
        .collect()
}
