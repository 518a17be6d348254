//! `mpcs predict`: raw model outputs (logits) for every image of a folder, as CSV.

use std::fmt::Write as _;
use std::path::PathBuf;

use candle_core::Device;

use super::error::{InferError, Result};
use super::images::{list_images, run_batches, write_atomic, InputOptions};
use super::model::load_model_with;
use crate::nn::Arch;

#[derive(Clone, Debug)]
pub struct PredictOptions {
    pub arch: Arch,
    /// Dilated last stages, as the model was trained (default none).
    pub dilation: crate::nn::Dilation,
    pub weights: PathBuf,
    /// Folder of images, searched recursively.
    pub images: PathBuf,
    pub out: PathBuf,
    pub input: InputOptions,
    /// When set, the model must have exactly this many outputs (a guard against the wrong weights).
    pub classes: Option<usize>,
    pub batch_size: usize,
    pub device: Device,
}

impl PredictOptions {
    pub fn new(arch: Arch, weights: PathBuf, images: PathBuf, out: PathBuf) -> Self {
        PredictOptions {
            dilation: crate::nn::Dilation::None,
            arch,
            weights,
            images,
            out,
            input: InputOptions::default(),
            classes: None,
            batch_size: 16,
            device: Device::Cpu,
        }
    }
}

/// Quotes a CSV field when it needs it (RFC 4180).
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes `file,out_0,...,out_{k-1}`: one row per image (file relative to the folder, sorted), the model's raw
/// outputs in f32's shortest round-trip form. Returns the CSV's path.
pub fn predict(opts: &PredictOptions) -> Result<PathBuf> {
    let files = list_images(&opts.images)?;
    let model = load_model_with(opts.arch, opts.dilation, &opts.weights, &opts.device)?;
    if model.fc.is_none() {
        return Err(InferError::NoHead { path: opts.weights.clone() });
    }
    if let Some(k) = opts.classes.filter(|&k| k != model.outputs) {
        return Err(InferError::ClassCount { path: opts.weights.clone(), expected: k, found: model.outputs });
    }
    let rows = run_batches(&files, &opts.input, opts.batch_size, &opts.device, |x| {
        Ok(model.logits(x)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    })?;
    let mut csv = String::from("file");
    for k in 0..model.outputs {
        write!(csv, ",out_{k}").expect("write to String");
    }
    csv.push('\n');
    for ((rel, path), row) in files.iter().zip(&rows) {
        if row.iter().any(|v| !v.is_finite()) {
            return Err(InferError::Usage(format!(
                "{}: the model's output is not finite (NaN or inf); the weights are likely broken",
                path.display()
            )));
        }
        csv.push_str(&csv_field(rel));
        for v in row {
            write!(csv, ",{v}").expect("write to String");
        }
        csv.push('\n');
    }
    write_atomic(&opts.out, csv.as_bytes())?;
    Ok(opts.out.clone())
}
