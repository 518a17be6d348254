//! File- and folder-level normalisation: decoding with clear errors, atomic PNG output, rayon.
//!
//! Output naming: every output is a PNG (lossless, so normalisation is not followed by a second,
//! lossy re-encode). [`normalise_files`] writes `<out_dir>/<input stem>.png`; [`normalise_dir`]
//! keeps each image's path relative to the input folder and only sets the extension to `.png`
//! (`40X/a.tif` → `40X/a.png`, `40X/b.png` → `40X/b.png`). Two inputs mapping to one output is an
//! error raised before anything is written.

use std::collections::BTreeMap;
use std::io::{BufWriter, Cursor, Write};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use rayon::prelude::*;

use super::{Normaliser, StainError};

/// File extensions (lower case) treated as images by [`normalise_dir`].
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "tif", "tiff"];

/// How many images a run wrote, and how many of those were copied unchanged (too little tissue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub images: usize,
    pub passed_through: usize,
}

/// Reads an image as 8-bit RGB: alpha is dropped, grey is expanded, 16-bit is scaled down.
/// The format is taken from the file's header, not its extension.
pub fn load_rgb(path: &Path) -> Result<RgbImage, StainError> {
    let bytes = std::fs::read(path).map_err(|source| StainError::Read { path: path.to_path_buf(), source })?;
    let format = image::guess_format(&bytes).map_err(|_| StainError::NotImage { path: path.to_path_buf() })?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Tiff) {
        return Err(StainError::NotImage { path: path.to_path_buf() });
    }
    let decoded = ImageReader::with_format(Cursor::new(&bytes), format).decode().map_err(|e| StainError::Decode {
        path: path.to_path_buf(),
        format: format!("{format:?}").to_uppercase(),
        bytes: bytes.len() as u64,
        detail: e.to_string(),
    })?;
    Ok(match decoded {
        DynamicImage::ImageRgb8(img) => img,
        other => other.to_rgb8(),
    })
}

/// Writes `img` as PNG to `path` atomically ([`crate::fsutil::write_atomic_with`], synced to disk
/// before the rename), so a reader never sees a half-written file. Creates the parent folders.
pub fn save_png_atomic(img: &RgbImage, path: &Path) -> Result<(), StainError> {
    let werr = |detail: String| StainError::Write { path: path.to_path_buf(), detail };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| werr(e.to_string()))?;
    if path.file_name().is_none() {
        return Err(werr("no file name".to_string()));
    }
    crate::fsutil::write_atomic_with(path, |file| {
        let mut w = BufWriter::new(&mut *file);
        img.write_to(&mut w, ImageFormat::Png).map_err(std::io::Error::other)?;
        w.flush()?;
        drop(w);
        file.sync_all()
    })
    .map_err(|e| werr(e.to_string()))
}

/// Output path of an input, relative to the output folder: same relative path, extension `.png`.
pub fn output_relpath(rel: &Path) -> PathBuf {
    rel.with_extension("png")
}

/// Normalises `inputs` into `out_dir/<stem>.png` in parallel (the CLI's `mpcs stain`).
/// Fails before writing anything if two inputs share a stem; otherwise the first failing input (in
/// input order) is reported, and outputs already written for other inputs stay (each complete).
pub fn normalise_files(norm: &Normaliser, inputs: &[PathBuf], out_dir: &Path) -> Result<Counts, StainError> {
    let mut jobs = Vec::with_capacity(inputs.len());
    for input in inputs {
        let stem = input.file_stem().ok_or_else(|| StainError::NotImage { path: input.clone() })?;
        jobs.push((input.clone(), output_relpath(Path::new(stem))));
    }
    run(norm, jobs, out_dir, &|_, _| {})
}

/// Normalises every image (by extension, see [`IMAGE_EXTENSIONS`]) under `in_dir` into `out_dir`,
/// keeping the relative layout and writing PNGs (the `stain_normalise` stage). Other files are
/// ignored. Runs in parallel with rayon.
pub fn normalise_dir(norm: &Normaliser, in_dir: &Path, out_dir: &Path) -> Result<Counts, StainError> {
    normalise_dir_with(norm, in_dir, out_dir, &|_, _| {})
}

/// [`normalise_dir`] that also calls `progress(input, passed_through)` after each image is
/// written (from rayon worker threads, in completion order), e.g. to drive a progress bar.
pub fn normalise_dir_with(
    norm: &Normaliser,
    in_dir: &Path,
    out_dir: &Path,
    progress: &(dyn Fn(&Path, bool) + Sync),
) -> Result<Counts, StainError> {
    if !in_dir.is_dir() {
        return Err(StainError::NotADirectory { path: in_dir.to_path_buf() });
    }
    let mut rels = Vec::new();
    collect_images(in_dir, Path::new(""), &mut rels)?;
    rels.sort();
    let jobs = rels.into_iter().map(|rel| (in_dir.join(&rel), output_relpath(&rel))).collect();
    run(norm, jobs, out_dir, progress)
}

fn collect_images(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), StainError> {
    let dir = root.join(rel);
    let entries = std::fs::read_dir(&dir).map_err(|source| StainError::Read { path: dir.clone(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| StainError::Read { path: dir.clone(), source })?;
        let rel_child = rel.join(entry.file_name());
        let path = entry.path();
        if path.is_dir() {
            collect_images(root, &rel_child, out)?;
        } else if is_image_name(&path) {
            out.push(rel_child);
        }
    }
    Ok(())
}

fn is_image_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn run(
    norm: &Normaliser,
    jobs: Vec<(PathBuf, PathBuf)>,
    out_dir: &Path,
    progress: &(dyn Fn(&Path, bool) + Sync),
) -> Result<Counts, StainError> {
    let mut seen: BTreeMap<&Path, &Path> = BTreeMap::new();
    for (input, rel_out) in &jobs {
        if let Some(first) = seen.insert(rel_out.as_path(), input.as_path()) {
            return Err(StainError::OutputCollision {
                first: first.to_path_buf(),
                second: input.clone(),
                out: out_dir.join(rel_out),
            });
        }
    }
    let results: Vec<Result<bool, StainError>> = jobs
        .par_iter()
        .map(|(input, rel_out)| {
            let img = load_rgb(input)?;
            let n = norm.normalise(&img);
            save_png_atomic(&n.image, &out_dir.join(rel_out))?;
            progress(input, n.passed_through);
            Ok(n.passed_through)
        })
        .collect();
    let mut counts = Counts::default();
    for r in results {
        counts.passed_through += usize::from(r?);
        counts.images += 1;
    }
    Ok(counts)
}
