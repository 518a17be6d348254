//! Evaluation of a fine-tuned model on a test portion (eval mode, resize only): image-level and
//! patient-level accuracy, weighted F1, per-class statistics and the confusion matrix (`metrics::evaluate`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;

use super::error::{Result, TrainError};
use super::finetune::{build_inputs, Classifier, Objective};
use super::fold::{expand_patches, read_fold, select, LabelColumn};
use super::{to_tensor, write_atomic};
use crate::loader::{AugmentConfig, Loader, LoaderConfig, Normalize};
use crate::metrics::{self, Prediction, Report};
use crate::nn::{weights, Arch, Dilation};

#[derive(Clone, Debug)]
pub struct EvalConfig {
    pub data_root: PathBuf,
    pub fold_csv: PathBuf,
    pub magnification: Option<String>,
    pub test_portion: String,
    pub labels: LabelColumn,
    pub objective: Objective,
    pub arch: Arch,
    pub dilation: Dilation,
    /// The fine-tuned `model.safetensors`.
    pub model: PathBuf,
    pub image_size: usize,
    pub batch_size: usize,
    /// Must match the fine-tuning run's.
    pub normalize: Normalize,
    pub threads: usize,
    /// Where `metrics.json` and `predictions.csv` go.
    pub out_dir: PathBuf,
    pub device: Device,
}

impl EvalConfig {
    /// Binary resnet18 at 64×64 on portion test_20 (matching [`super::FinetuneConfig::new`]).
    pub fn new(data_root: &Path, fold_csv: &Path, model: &Path, out_dir: &Path) -> EvalConfig {
        EvalConfig {
            data_root: data_root.to_path_buf(),
            fold_csv: fold_csv.to_path_buf(),
            magnification: None,
            test_portion: "test_20".into(),
            labels: LabelColumn::Label,
            objective: Objective::Binary,
            arch: Arch::ResNet18,
            dilation: Dilation::None,
            model: model.to_path_buf(),
            image_size: 64,
            batch_size: 32,
            normalize: Normalize::None,
            threads: 0,
            out_dir: out_dir.to_path_buf(),
            device: Device::Cpu,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EvalOutcome {
    pub report: Report,
    /// The share of the majority class among the test images (what always guessing it scores).
    pub majority_rate: f64,
    /// Patch datasets (BACH): the share of source images whose patches' majority vote is right.
    pub image_wise_accuracy: Option<f64>,
    /// Class names by label, from the fold's `class` column (`class <k>` for labels it does not name).
    pub class_names: Vec<String>,
    pub metrics: PathBuf,
    pub predictions: PathBuf,
}

/// Predicts every image of the test portion and writes `metrics.json` (the [`Report`] plus `majority_rate`)
/// and `predictions.csv` (file,patient,label,predicted,score; score = P(class 1) for binary, the top softmax
/// probability for multi-class).
pub fn evaluate(cfg: &EvalConfig) -> Result<EvalOutcome> {
    if cfg.batch_size == 0 {
        return Err(TrainError::Config("batch_size must be at least 1".into()));
    }
    let rows = read_fold(&cfg.fold_csv)?;
    let rows = select(&rows, &cfg.test_portion, cfg.magnification.as_deref(), &cfg.fold_csv)?;
    let (rows, sources) = expand_patches(&cfg.data_root, rows, false)?;
    let patches = rows.iter().zip(&sources).any(|(r, s)| &r.file != s);
    let (store, samples) =
        build_inputs(&cfg.data_root, &rows, cfg.labels, cfg.objective, cfg.image_size, &cfg.fold_csv)?;
    let lc = LoaderConfig {
        shuffle: false,
        threads: cfg.threads,
        normalize: cfg.normalize,
        ..LoaderConfig::new(cfg.batch_size, 0, AugmentConfig::eval(cfg.image_size))
    };
    let loader = Loader::new(store, samples, lc)?;

    let varmap = VarMap::new();
    let clf = Classifier::new(&varmap, (cfg.arch, cfg.dilation), cfg.objective, 0.0, &cfg.device)?;
    if !cfg.model.exists() {
        return Err(TrainError::BadFile {
            path: cfg.model.clone(),
            msg: "no such model file; run fine-tuning first".into(),
        });
    }
    // Strict: the head must match too (a model fine-tuned for another objective is refused).
    weights::load_into_with(&varmap, &cfg.model, &weights::LoadOptions::default())?;

    let mut preds = Vec::with_capacity(rows.len());
    let mut pred_sources = Vec::with_capacity(rows.len());
    let mut csv = String::from("file,patient,label,predicted,score\n");
    for batch in loader.epoch(0) {
        let batch = batch?;
        let x = to_tensor(batch.view1, batch.shape, &cfg.device)?;
        let out = clf.predict(&clf.logits(&x, false)?)?;
        for ((&i, &label), (predicted, score)) in batch.samples.iter().zip(&batch.labels).zip(out) {
            let row = &rows[i];
            if !score.is_finite() {
                return Err(TrainError::BadFile {
                    path: cfg.model.clone(),
                    msg: format!("the model outputs a non-finite score for {}; the weights are damaged", row.file),
                });
            }
            csv.push_str(&format!("{},{},{label},{predicted},{score}\n", row.file, row.patient));
            let group = Some(if row.patient.is_empty() { sources[i].clone() } else { row.patient.clone() });
            preds.push(Prediction { label, predicted, group });
            pred_sources.push(sources[i].clone());
        }
    }
    let classes = cfg.objective.classes();
    let report = metrics::evaluate(&preds, classes).map_err(TrainError::Config)?;
    let majority = report.per_class.iter().map(|c| c.support).max().unwrap_or(0);
    let majority_rate = majority as f64 / report.images.max(1) as f64;
    // Class names by label: the fold's `class` column names the `label` classes; subtypes have their codes.
    let mut class_names: Vec<String> = (0..classes).map(|k| format!("class {k}")).collect();
    match cfg.labels {
        LabelColumn::Label => {
            for r in rows.iter().filter(|r| !r.class.is_empty()) {
                if let Some(slot) = class_names.get_mut(r.label as usize) {
                    slot.clone_from(&r.class);
                }
            }
        }
        LabelColumn::Subtype => {
            for st in crate::data::breakhis::SUBTYPES {
                if let Some(slot) = class_names.get_mut(st.subtype_label as usize) {
                    *slot = st.code.to_string();
                }
            }
        }
    }
    let image_wise_accuracy = patches.then(|| majority_vote_accuracy(&preds, &pred_sources, classes));

    std::fs::create_dir_all(&cfg.out_dir).map_err(TrainError::io(&cfg.out_dir))?;
    let metrics_path = cfg.out_dir.join("metrics.json");
    let predictions = cfg.out_dir.join("predictions.csv");
    let mut json = serde_json::to_value(&report).map_err(|e| TrainError::Config(e.to_string()))?;
    json["majority_rate"] = serde_json::json!(majority_rate);
    if let Some(a) = image_wise_accuracy {
        json["image_wise_accuracy"] = serde_json::json!(a);
    }
    let text = serde_json::to_vec_pretty(&json).map_err(|e| TrainError::Config(e.to_string()))?;
    write_atomic(&predictions, csv.as_bytes())?;
    write_atomic(&metrics_path, &text)?;
    Ok(EvalOutcome { report, majority_rate, image_wise_accuracy, class_names, metrics: metrics_path, predictions })
}

/// Image-wise accuracy by majority vote over each source image's patches (METHOD.md, BACH). A tie goes to
/// the lowest class index, so the vote is deterministic.
pub(crate) fn majority_vote_accuracy(preds: &[Prediction], sources: &[String], classes: usize) -> f64 {
    let mut votes: std::collections::BTreeMap<&str, (u32, Vec<usize>)> = std::collections::BTreeMap::new();
    for (p, s) in preds.iter().zip(sources) {
        let e = votes.entry(s.as_str()).or_insert_with(|| (p.label, vec![0; classes]));
        e.1[p.predicted as usize] += 1;
    }
    let correct = votes
        .values()
        .filter(|(label, counts)| {
            let best = counts.iter().enumerate().fold(0, |b, (i, &c)| if c > counts[b] { i } else { b });
            best as u32 == *label
        })
        .count();
    correct as f64 / votes.len().max(1) as f64
}
