//! Grid tiling of images into patches, as EMPatches does it (the paper's code uses EMPatches): windows of
//! `size` every `stride` pixels (stride = size·(1 − overlap)), x-major order, and where the grid does not reach
//! the right or bottom border one more window aligned to that border ("shift"). Optionally a minimum tissue
//! fraction per patch, and the BACH offline augmentation (original, horizontal flip, vertical flip, rotations by
//! 90, 180, 270 degrees: six files per patch).

use std::path::{Path, PathBuf};

use image::{imageops, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// What happens at the right and bottom borders when the grid does not end exactly there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Edge {
    /// One more window, aligned to the border (overlapping its neighbour) — EMPatches' behaviour.
    #[default]
    Shift,
    /// Drop the partial windows.
    Drop,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PatchOptions {
    pub size: u32,
    pub stride: u32,
    pub edge: Edge,
    /// Keep a patch only if at least this fraction of its pixels is tissue (not near-white).
    pub min_tissue: f64,
    /// Write the six-file BACH offline augmentation of every kept patch.
    pub augment: bool,
}

impl PatchOptions {
    /// Stride from an overlap fraction the way EMPatches computes it: size − int(size·overlap).
    pub fn stride_from_overlap(size: u32, overlap: f64) -> u32 {
        (size - (f64::from(size) * overlap) as u32).max(1)
    }
}

/// Offsets of the windows along one axis (EMPatches: range(0, last+1, step) plus `last` if missing).
pub fn offsets(len: u32, window: u32, stride: u32, edge: Edge) -> Vec<u32> {
    let window = window.min(len);
    let last = len - window;
    let mut v: Vec<u32> = (0..=last).step_by(stride.max(1) as usize).collect();
    if edge == Edge::Shift && v.last() != Some(&last) {
        v.push(last);
    }
    v
}

/// One written patch.
#[derive(Clone, Debug, Serialize)]
pub struct PatchRecord {
    /// Patch file, relative to the output root.
    pub file: String,
    /// Source image, relative to the input root.
    pub source: String,
    pub index: usize,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    /// `none`, `hflip`, `vflip`, `rot90`, `rot180`, `rot270`.
    pub augmentation: &'static str,
    pub tissue_fraction: f64,
}

/// A pixel is background when all three channels are above this (white glass, as in most H&E tissue masks).
const BACKGROUND_LEVEL: u8 = 220;

pub fn tissue_fraction(img: &RgbImage) -> f64 {
    let n = (img.width() as usize * img.height() as usize).max(1);
    let tissue = img.pixels().filter(|p| p.0.iter().any(|&c| c <= BACKGROUND_LEVEL)).count();
    tissue as f64 / n as f64
}

const AUGMENTATIONS: [&str; 6] = ["none", "hflip", "vflip", "rot90", "rot180", "rot270"];

fn augmented(img: &RgbImage, which: &str) -> RgbImage {
    match which {
        "hflip" => imageops::flip_horizontal(img),
        "vflip" => imageops::flip_vertical(img),
        "rot90" => imageops::rotate90(img),
        "rot180" => imageops::rotate180(img),
        "rot270" => imageops::rotate270(img),
        _ => img.clone(),
    }
}

/// Cuts one image into patches (in memory): (index, x, y, patch).
pub fn cut(img: &RgbImage, opts: &PatchOptions) -> Vec<(usize, u32, u32, RgbImage)> {
    let (w, h) = img.dimensions();
    let xs = offsets(w, opts.size, opts.stride, opts.edge);
    let ys = offsets(h, opts.size, opts.stride, opts.edge);
    let (pw, ph) = (opts.size.min(w), opts.size.min(h));
    let mut out = Vec::with_capacity(xs.len() * ys.len());
    for &x in &xs {
        for &y in &ys {
            let idx = out.len();
            out.push((idx, x, y, imageops::crop_imm(img, x, y, pw, ph).to_image()));
        }
    }
    out
}

/// Image files under `root` (png, jpg, jpeg, tif, tiff), sorted, relative paths.
pub fn image_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn is_image(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("png" | "jpg" | "jpeg" | "tif" | "tiff")
    )
}

/// Patchifies every image under `input` into `output`, keeping the relative folders; patch files are named
/// `{stem}_{index}.png` (augmented copies `{stem}_{index}_{aug}.png`). Returns the records of all written patches
/// and how many patches were dropped for too little tissue.
pub fn patchify_dir(input: &Path, output: &Path, opts: &PatchOptions) -> Result<(Vec<PatchRecord>, usize), String> {
    if opts.size == 0 {
        return Err("patch size must be at least 1 pixel".into());
    }
    let files = image_files(input).map_err(|e| format!("cannot list {}: {e}", input.display()))?;
    if files.is_empty() {
        return Err(format!("no images (png, jpg, tif) under {}", input.display()));
    }
    let results: Vec<Result<(Vec<PatchRecord>, usize), String>> = files
        .par_iter()
        .map(|rel| {
            let src = input.join(rel);
            let img = image::open(&src)
                .map_err(|e| format!("{}: cannot decode ({e}); re-download or remove it", src.display()))?
                .to_rgb8();
            let dir = rel.parent().map(|p| output.join(p)).unwrap_or_else(|| output.to_path_buf());
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let stem = rel.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let mut recs = Vec::new();
            let mut dropped = 0;
            for (idx, x, y, patch) in cut(&img, opts) {
                let tissue = tissue_fraction(&patch);
                if tissue < opts.min_tissue {
                    dropped += 1;
                    continue;
                }
                let augs: &[&'static str] = if opts.augment { &AUGMENTATIONS } else { &AUGMENTATIONS[..1] };
                for &aug in augs {
                    let name =
                        if aug == "none" { format!("{stem}_{idx}.png") } else { format!("{stem}_{idx}_{aug}.png") };
                    let path = dir.join(&name);
                    augmented(&patch, aug).save(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    let rel_out = rel.parent().map(|p| p.join(&name)).unwrap_or_else(|| PathBuf::from(&name));
                    recs.push(PatchRecord {
                        file: rel_out.to_string_lossy().replace('\\', "/"),
                        source: rel.to_string_lossy().replace('\\', "/"),
                        index: idx,
                        x,
                        y,
                        width: patch.width(),
                        height: patch.height(),
                        augmentation: aug,
                        tissue_fraction: tissue,
                    });
                }
            }
            Ok((recs, dropped))
        })
        .collect();
    let mut all = Vec::new();
    let mut dropped = 0;
    for r in results {
        let (recs, d) = r?;
        all.extend(recs);
        dropped += d;
    }
    all.sort_by(|a, b| a.file.cmp(&b.file));
    Ok((all, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_empatches() {
        // BACH: 2048×1536 at 512, no overlap.
        assert_eq!(offsets(2048, 512, 512, Edge::Shift), vec![0, 512, 1024, 1536]);
        assert_eq!(offsets(1536, 512, 512, Edge::Shift), vec![0, 512, 1024]);
        // Breast cell: 896×768 at 224 → x 0..672 (4), y 0..544 (4 exact: 768 = 3·224 + 96 → extra window at 544).
        assert_eq!(offsets(896, 224, 224, Edge::Shift), vec![0, 224, 448, 672]);
        assert_eq!(offsets(768, 224, 224, Edge::Shift), vec![0, 224, 448, 544]);
        assert_eq!(offsets(768, 224, 224, Edge::Drop), vec![0, 224, 448]);
        // Overlap 0.5 → stride 112; a window larger than the image is clipped to it.
        assert_eq!(PatchOptions::stride_from_overlap(224, 0.5), 112);
        assert_eq!(offsets(100, 224, 112, Edge::Shift), vec![0]);
    }

    #[test]
    fn cut_covers_the_image_in_x_major_order() {
        let img = RgbImage::from_fn(10, 6, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let opts = PatchOptions { size: 4, stride: 4, edge: Edge::Shift, min_tissue: 0.0, augment: false };
        let patches = cut(&img, &opts);
        let pos: Vec<(u32, u32)> = patches.iter().map(|p| (p.1, p.2)).collect();
        assert_eq!(pos, vec![(0, 0), (0, 2), (4, 0), (4, 2), (6, 0), (6, 2)]);
        let last = &patches[5].3;
        assert_eq!(last.get_pixel(0, 0).0, [6, 2, 0], "the border window is aligned to the border");
        assert_eq!(last.get_pixel(3, 3).0, [9, 5, 0]);
    }

    #[test]
    fn augmentations_are_the_six_dihedral_views() {
        let img = RgbImage::from_fn(2, 2, |x, y| image::Rgb([(x + 2 * y) as u8, 0, 0]));
        let v = |which: &str| augmented(&img, which).pixels().map(|p| p.0[0]).collect::<Vec<_>>();
        assert_eq!(v("none"), vec![0, 1, 2, 3]);
        assert_eq!(v("hflip"), vec![1, 0, 3, 2]);
        assert_eq!(v("vflip"), vec![2, 3, 0, 1]);
        assert_eq!(v("rot90"), vec![2, 0, 3, 1]);
        assert_eq!(v("rot180"), vec![3, 2, 1, 0]);
        assert_eq!(v("rot270"), vec![1, 3, 0, 2]);
    }

    #[test]
    fn tissue_fraction_counts_non_white_pixels() {
        let img =
            RgbImage::from_fn(
                4,
                1,
                |x, _| if x == 0 { image::Rgb([200, 100, 180]) } else { image::Rgb([245, 245, 245]) },
            );
        assert!((tissue_fraction(&img) - 0.25).abs() < 1e-12);
    }
}
