//! Finding the images of a folder and turning them into network input.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::error::{InferError, Result};
use crate::loader::{store, LoaderError, Normalize, Rgb8};

const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "tif", "tiff"];

/// How an image becomes a network input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputOptions {
    /// Resize to `size` × `size` (bilinear, `cv2.resize` semantics); `None` = keep the image's own size.
    pub size: Option<usize>,
    pub normalize: Normalize,
}

/// Every image under `dir`, recursively, as (path relative to `dir` with '/' separators, full path), sorted by
/// the relative path. Hidden files and folders (names starting with '.') are skipped.
pub fn list_images(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Err(InferError::NoDir { path: dir.to_path_buf() });
    }
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Folders already walked, by canonical path: a symlink loop must not walk forever.
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        if !seen.insert(std::fs::canonicalize(&d).map_err(InferError::io(&d))?) {
            continue;
        }
        for entry in std::fs::read_dir(&d).map_err(InferError::io(&d))? {
            let entry = entry.map_err(InferError::io(&d))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // Follow symlinks: datasets are often linked in.
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                let rel = path.strip_prefix(dir).unwrap_or(&path);
                let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                found.push((rel.join("/"), path));
            }
        }
    }
    if found.is_empty() {
        return Err(InferError::NoImages { path: dir.to_path_buf() });
    }
    found.sort();
    Ok(found)
}

/// Decodes one image as RGB, resized when `opts.size` says so.
pub fn load_image(path: &Path, opts: &InputOptions) -> Result<Rgb8> {
    if opts.size == Some(0) {
        return Err(InferError::Usage("--size must be at least 1".into()));
    }
    let resize = opts.size.map(|s| (s as u32, s as u32));
    store::decode(path, resize).map_err(|e| match e {
        LoaderError::Decode { path, reason } => InferError::Decode { path, reason },
        LoaderError::Io { path, source } => InferError::Decode { path, reason: source.to_string() },
        other => InferError::Decode { path: path.to_path_buf(), reason: other.to_string() },
    })
}

/// An (N, 3, H, W) f32 tensor from images that share one size: values in [0, 1], then ImageNet mean/std when
/// asked (the same arithmetic as the training loader).
pub fn image_tensor(images: &[Rgb8], normalize: Normalize, device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        return Err(InferError::Usage("no images to make a batch of".into()));
    };
    let (w, h) = (first.width, first.height);
    if images.iter().any(|i| (i.width, i.height) != (w, h)) {
        return Err(InferError::Usage("images of one batch must share one size".into()));
    }
    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];
    let plane = w * h;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (img, out) in images.iter().zip(data.chunks_mut(3 * plane)) {
        for (p, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let v = px[c] as f32 / 255.0;
                out[c * plane + p] = match normalize {
                    Normalize::None => v,
                    Normalize::ImageNet => (v - MEAN[c]) / STD[c],
                };
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, h, w), device)?)
}

/// Writes `bytes` atomically ([`crate::fsutil::write_atomic`]), creating the parent folders first.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(InferError::io(parent))?;
    }
    crate::fsutil::write_atomic(path, bytes).map_err(InferError::io(path))
}

/// Runs `f` over the images in order, `batch_size` at a time when they share one size, else one by one
/// (a batch needs one size). `f` gets an (n, 3, H, W) tensor and returns one row per image. Images are decoded in parallel, one chunk at a time, so memory stays bounded.
pub(crate) fn run_batches(
    files: &[(String, PathBuf)],
    input: &InputOptions,
    batch_size: usize,
    device: &Device,
    mut f: impl FnMut(&Tensor) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    let batch_size = batch_size.max(1);
    let mut rows = Vec::with_capacity(files.len());
    for chunk in files.chunks(batch_size) {
        let images: Vec<Rgb8> = chunk.par_iter().map(|(_, p)| load_image(p, input)).collect::<Result<_>>()?;
        let same = images.iter().all(|i| (i.width, i.height) == (images[0].width, images[0].height));
        let groups: Vec<&[Rgb8]> = if same { vec![&images[..]] } else { images.chunks(1).collect() };
        for g in groups {
            let out = f(&image_tensor(g, input.normalize, device)?)?;
            if out.len() != g.len() {
                return Err(InferError::Usage(format!("internal: {} rows for {} images", out.len(), g.len())));
            }
            rows.extend(out);
        }
    }
    Ok(rows)
}
