//! `mpcs embed`: the pooled encoder features of every image of a folder, as one safetensors file
//! (`features`: [n, d] f32, rows in the order of the `files` metadata entry, a JSON list of paths relative to
//! the folder). Input for t-SNE maps (`report::tsne`) and linear probes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::error::{InferError, Result};
use super::images::{list_images, run_batches, write_atomic, InputOptions};
use super::model::load_model_with;
use crate::nn::Arch;

#[derive(Clone, Debug)]
pub struct EmbedOptions {
    pub arch: Arch,
    /// Dilated last stages, as the model was trained (default none).
    pub dilation: crate::nn::Dilation,
    /// Any torchvision-named ResNet weights; a classifier in them is loaded but not used.
    pub weights: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    pub input: InputOptions,
    pub batch_size: usize,
    pub device: Device,
}

impl EmbedOptions {
    pub fn new(arch: Arch, weights: PathBuf, images: PathBuf, out: PathBuf) -> Self {
        EmbedOptions {
            arch,
            dilation: crate::nn::Dilation::None,
            weights,
            images,
            out,
            input: InputOptions::default(),
            batch_size: 16,
            device: Device::Cpu,
        }
    }
}

/// Writes the features file and returns (its path, number of images, feature width).
pub fn embed(opts: &EmbedOptions) -> Result<(PathBuf, usize, usize)> {
    let files = list_images(&opts.images)?;
    let model = load_model_with(opts.arch, opts.dilation, &opts.weights, &opts.device)?;
    let rows = run_batches(&files, &opts.input, opts.batch_size, &opts.device, |x| {
        Ok(model.features(x)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    })?;
    let d = model.net.feature_dim();
    let mut bytes = Vec::with_capacity(rows.len() * d * 4);
    for ((_, path), row) in files.iter().zip(&rows) {
        if row.iter().any(|v| !v.is_finite()) {
            return Err(InferError::Usage(format!(
                "{}: the features are not finite (NaN or inf); the weights are likely broken",
                path.display()
            )));
        }
        bytes.extend(row.iter().flat_map(|v| v.to_le_bytes()));
    }
    let names: Vec<&str> = files.iter().map(|(r, _)| r.as_str()).collect();
    let meta = HashMap::from([
        ("format".to_string(), "mpcs-embeddings-v1".to_string()),
        ("arch".to_string(), opts.arch.name().to_string()),
        ("files".to_string(), serde_json::to_string(&names).expect("a list of strings serialises")),
    ]);
    let view = TensorView::new(Dtype::F32, vec![rows.len(), d], &bytes)
        .map_err(|e| InferError::Usage(format!("internal: {e}")))?;
    let out = safetensors::tensor::serialize([("features", view)], Some(meta))
        .map_err(|e| InferError::Usage(format!("internal: {e}")))?;
    write_atomic(&opts.out, &out)?;
    Ok((opts.out.clone(), rows.len(), d))
}

/// Reads a file written by [`embed`]: (files, one feature row per file).
pub fn read_embeddings(path: &Path) -> Result<(Vec<String>, Vec<Vec<f32>>)> {
    let bytes = std::fs::read(path).map_err(InferError::io(path))?;
    let bad = |msg: String| {
        InferError::Usage(format!("{}: not an embeddings file ({msg}); make it with `mpcs embed`", path.display()))
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let files: Vec<String> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("files"))
        .and_then(|f| serde_json::from_str(f).ok())
        .ok_or_else(|| bad("no 'files' list in its metadata".into()))?;
    let t = st.tensor("features").map_err(|e| bad(e.to_string()))?;
    if t.dtype() != Dtype::F32 || t.shape().len() != 2 || t.shape()[0] != files.len() {
        return Err(bad(format!("'features' is {:?} {:?} for {} files", t.dtype(), t.shape(), files.len())));
    }
    let d = t.shape()[1];
    let values: Vec<f32> =
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
    Ok((files, values.chunks(d.max(1)).map(|r| r.to_vec()).collect()))
}
