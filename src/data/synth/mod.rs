//! Synthetic H&E datasets in the exact layouts and file names of BreakHis, BACH and the UCSB
//! breast cancer cell set, for tests, demos and the `synthetic` pipeline stage.
//!
//! * Each image is rendered from a continuous procedural tissue field (see [`render`]); the four
//!   BreakHis magnifications of one sequence number are nested zooms of the same place
//!   (µm/px 2.5, 1.0, 0.5, 0.25 at 700×460), so the magnification prior holds.
//! * Classes and subtypes differ in learnable tissue statistics (nuclear density, size, shape,
//!   darkness; gland architecture; mucin); each patient has its own stain.
//! * Output bytes are a pure function of the options: same seed → identical files, whatever the
//!   thread count. Files are written under a temporary name and renamed.

mod noise;
mod render;
mod rng;
mod tissue;

use std::path::{Path, PathBuf};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::tiff::TiffEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::bach;
use super::breakhis::{ImageName, PatientDir, Subtype, MAGNIFICATIONS, SUBTYPES};
use super::breast_cell::CellName;
use super::error::DataError;
use super::record::Dataset;
use render::{render, Field, View};
use rng::{hash, Rng};

/// Which dataset layout to generate (same names as [`Dataset`]).
pub type SynthKind = Dataset;

/// Everything that determines a synthetic dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthOptions {
    pub kind: SynthKind,
    pub seed: u64,
    /// BreakHis: patients (spread round-robin over the 8 subtypes, alternating benign and
    /// malignant). BACH and breast cell: images per class. `None` = [`SynthOptions::default_count`].
    pub patients: Option<usize>,
    /// Image size (width, height); `None` = the real size. The field of view stays that of the
    /// real size, so a smaller image is a downscaled one with the same content.
    pub size: Option<(u32, u32)>,
    /// BreakHis: sequence numbers per patient present at all four magnifications (default 3).
    pub regions_per_patient: Option<usize>,
    /// BreakHis: add, for about half the patients, one more sequence number present at only
    /// some magnifications, as in the real data (default true).
    pub partial_regions: bool,
}

impl SynthOptions {
    /// BreakHis: sequence numbers per patient present at all four magnifications, by default.
    pub const DEFAULT_REGIONS: usize = 3;

    pub fn new(kind: SynthKind, seed: u64) -> SynthOptions {
        SynthOptions { kind, seed, patients: None, size: None, regions_per_patient: None, partial_regions: true }
    }

    /// Default count: 16 BreakHis patients (2 per subtype), 2 BACH images per class,
    /// 4 breast cell images per class.
    pub fn default_count(kind: SynthKind) -> usize {
        match kind {
            Dataset::BreakHis => 16,
            Dataset::Bach => 2,
            Dataset::BreastCell => 4,
        }
    }

    /// The real image size of a dataset.
    pub fn default_size(kind: SynthKind) -> (u32, u32) {
        match kind {
            Dataset::BreakHis => (700, 460),
            Dataset::Bach => (2048, 1536),
            Dataset::BreastCell => (896, 768),
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub kind: SynthKind,
    /// The folder to give to [`super::scan`] (the `out` argument).
    pub root: PathBuf,
    pub images: usize,
    /// Patients (BreakHis) or images per class (BACH, breast cell).
    pub patients: usize,
    /// BreakHis regions present at all four magnifications (0 for the others).
    pub regions_all_magnifications: usize,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

/// Parses `700x460` (also `700X460`, `700×460`).
pub fn parse_size(s: &str) -> Result<(u32, u32), DataError> {
    let bad = || DataError::Usage(format!("bad size `{s}`; expected WIDTHxHEIGHT, e.g. 700x460"));
    let (w, h) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    if w < 16 || h < 16 || w > 8192 || h > 8192 {
        return Err(DataError::Usage(format!(
            "size {w}x{h} out of range; width and height must be between 16 and 8192"
        )));
    }
    Ok((w, h))
}

/// Writes a synthetic dataset of `kind` under `out` (which must be absent or empty; the data
/// is staged in a hidden sibling folder and appears at `out` only when complete).
/// The convenience form of [`generate_with`] that the CLI maps onto:
/// `mpcs synth breakhis|bach|breast-cell --out DIR --seed S [--patients N] [--size WxH]`.
pub fn generate(
    kind: SynthKind,
    out: &Path,
    seed: u64,
    patients: Option<usize>,
    size: Option<(u32, u32)>,
) -> Result<Summary, DataError> {
    let opts = SynthOptions { patients, size, ..SynthOptions::new(kind, seed) };
    generate_with(&opts, out)
}

/// One image to render: where it goes and what it shows.
struct Job {
    rel_path: PathBuf,
    field: usize,
    view: View,
    format: image::ImageFormat,
}

/// Writes a synthetic dataset as described by `opts` under `out` (absent or empty).
pub fn generate_with(opts: &SynthOptions, out: &Path) -> Result<Summary, DataError> {
    let count = opts.patients.unwrap_or_else(|| SynthOptions::default_count(opts.kind));
    if count == 0 {
        return Err(DataError::Usage("--patients must be at least 1".to_string()));
    }
    let (width, height) = opts.size.unwrap_or_else(|| SynthOptions::default_size(opts.kind));
    if width < 16 || height < 16 {
        return Err(DataError::Usage(format!("size {width}x{height} too small; at least 16x16")));
    }
    let staging = prepare_out(out)?;
    let (fields, jobs, regions) = match opts.kind {
        Dataset::BreakHis => plan_breakhis(opts, count, width, height),
        Dataset::Bach => plan_flat(opts, count, width, height),
        Dataset::BreastCell => plan_flat(opts, count, width, height),
    };
    let bytes: Vec<u64> = jobs
        .par_iter()
        .map(|job| {
            let img = render(&fields[job.field], &job.view);
            write_image(&staging.join(&job.rel_path), &img, job.format)
        })
        .collect::<Result<_, _>>()
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&staging);
        })?;
    publish(&staging, out)?;
    Ok(Summary {
        kind: opts.kind,
        root: out.to_path_buf(),
        images: jobs.len(),
        patients: count,
        regions_all_magnifications: regions,
        width,
        height,
        bytes: bytes.iter().sum(),
    })
}

/// Checks that `out` is absent or empty (a run never mixes two datasets) and creates the
/// staging folder beside it, where the dataset is written before it appears at `out` whole.
fn prepare_out(out: &Path) -> Result<PathBuf, DataError> {
    if out.exists() {
        let mut rd = std::fs::read_dir(out).map_err(|e| DataError::io(out, e))?;
        if rd.next().is_some() {
            return Err(DataError::Usage(format!(
                "output folder {} is not empty; give a new or empty folder",
                out.display()
            )));
        }
    }
    let name = out.file_name().ok_or_else(|| DataError::Usage(format!("bad output folder {}", out.display())))?;
    let staging = out.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    if staging.exists() {
        // Left over from an interrupted run.
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    Ok(staging)
}

/// Moves the finished staging folder to `out` (replacing an empty `out`).
fn publish(staging: &Path, out: &Path) -> Result<(), DataError> {
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| DataError::io(out, e))?;
    }
    std::fs::rename(staging, out).map_err(|e| DataError::io(out, e))
}

/// Encodes and writes one image atomically ([`crate::fsutil::write_atomic`]). Returns its size.
fn write_image(path: &Path, img: &RgbImage, format: image::ImageFormat) -> Result<u64, DataError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut bytes = Vec::with_capacity(img.len() / 2);
    let encoded = match format {
        image::ImageFormat::Png => PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, FilterType::Sub)
            .write_image(img, img.width(), img.height(), ExtendedColorType::Rgb8),
        _ => TiffEncoder::new(std::io::Cursor::new(&mut bytes)).write_image(
            img,
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        ),
    };
    encoded.map_err(|e| DataError::Encode { path: path.to_path_buf(), message: e.to_string() })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| DataError::io(path, e))?;
    Ok(bytes.len() as u64)
}

/// µm per pixel of the real image at 40X … 400X; the field of view is kept for other sizes.
fn breakhis_um_per_px(mag: u32, width: u32) -> f64 {
    100.0 / mag as f64 * 700.0 / width as f64
}

/// Subtypes in round-robin order, alternating benign and malignant so even 2 patients give
/// both classes: A, DC, F, MC, PT, LC, TA, PC.
fn subtype_order() -> [Subtype; 8] {
    [0, 4, 1, 5, 2, 6, 3, 7].map(|i| SUBTYPES[i])
}

/// A synthetic slide id in BreakHis style (digits, sometimes two letters).
fn slide_id(i: usize) -> String {
    let suffix = ["", "AB", "", "CD", "EF"][i % 5];
    format!("9{:04}{suffix}", i + 1)
}

fn plan_breakhis(opts: &SynthOptions, patients: usize, width: u32, height: u32) -> (Vec<Field>, Vec<Job>, usize) {
    let regions = opts.regions_per_patient.unwrap_or(SynthOptions::DEFAULT_REGIONS).max(1);
    let order = subtype_order();
    let mut fields = Vec::new();
    let mut jobs = Vec::new();
    let mut full_regions = 0;
    for p in 0..patients {
        let st = order[p % order.len()];
        let mut rng = Rng::new(hash(opts.seed, &[0xB4EA, p as u64]));
        let field = Field {
            seed: rng.next_u64(),
            arch: tissue::breakhis(st.code).jittered(&mut rng),
            stain: tissue::Stain::random(&mut rng),
        };
        let pd = PatientDir {
            class_letter: st.class_letter(),
            subtype: st.code.to_string(),
            year: "14".to_string(),
            slide: slide_id(p),
        };
        // Regions 1..=regions at all four magnifications; maybe one more at only some.
        let mut seqs: Vec<(u32, Vec<u32>)> = (1..=regions as u32).map(|s| (s, MAGNIFICATIONS.to_vec())).collect();
        full_regions += regions;
        if opts.partial_regions && rng.chance(0.5) {
            // A non-empty proper subset of the four magnifications.
            let mask = 1 + rng.below(14) as u32;
            let mags =
                MAGNIFICATIONS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, &m)| m).collect();
            seqs.push((regions as u32 + 1, mags));
        }
        for (seq, mags) in seqs {
            let (cx, cy) = field.region_centre(seq as u64);
            for mag in mags {
                let name = ImageName {
                    class_letter: pd.class_letter,
                    subtype: pd.subtype.clone(),
                    year: pd.year.clone(),
                    slide: pd.slide.clone(),
                    magnification: mag,
                    seq,
                };
                let rel_path = PathBuf::from("BreaKHis_v1/histology_slides/breast")
                    .join(st.class_folder())
                    .join("SOB")
                    .join(st.folder)
                    .join(pd.name())
                    .join(format!("{mag}X"))
                    .join(name.name());
                jobs.push(Job {
                    rel_path,
                    field: fields.len(),
                    view: View {
                        cx,
                        cy,
                        um_per_px: breakhis_um_per_px(mag, width),
                        width,
                        height,
                        grain_seed: hash(field.seed, &[seq as u64, mag as u64]),
                    },
                    format: image::ImageFormat::Png,
                });
            }
        }
        fields.push(field);
    }
    (fields, jobs, full_regions)
}

/// BACH and breast cell: `per_class` images per class, each its own field.
fn plan_flat(opts: &SynthOptions, per_class: usize, width: u32, height: u32) -> (Vec<Field>, Vec<Job>, usize) {
    let (classes, real_width, real_upp) = match opts.kind {
        Dataset::Bach => (4u32, 2048.0, 0.42),
        _ => (2u32, 896.0, 0.4),
    };
    let upp = real_upp * real_width / width as f64;
    // Breast cell: two TMA batches, each with its own stain.
    let batches = ["ytma10_010704", "ytma49_042003"];
    let batch_stains: Vec<tissue::Stain> = (0..batches.len())
        .map(|b| tissue::Stain::random(&mut Rng::new(hash(opts.seed, &[0xBA7C, b as u64]))))
        .collect();
    let mut fields = Vec::new();
    let mut jobs = Vec::new();
    for label in 0..classes {
        for i in 0..per_class {
            let mut rng = Rng::new(hash(opts.seed, &[0xF1A7, label as u64, i as u64]));
            let (arch, stain, rel_path) = match opts.kind {
                Dataset::Bach => (
                    tissue::bach(label),
                    tissue::Stain::random(&mut rng),
                    PathBuf::from("ICIAR2018_BACH_Challenge/Photos")
                        .join(bach::CLASS_FOLDERS[label as usize])
                        .join(format!("{}{:03}.tif", bach::FILE_PREFIXES[label as usize], i + 1)),
                ),
                _ => {
                    let b = i % batches.len();
                    let name =
                        CellName { batch: batches[b].to_string(), label, number: (i / batches.len() + 1) as u32 };
                    (tissue::breast_cell(label), batch_stains[b].varied(&mut rng), PathBuf::from(name.name()))
                }
            };
            let field = Field { seed: rng.next_u64(), arch: arch.jittered(&mut rng), stain };
            let (cx, cy) = field.region_centre(0);
            jobs.push(Job {
                rel_path,
                field: fields.len(),
                view: View { cx, cy, um_per_px: upp, width, height, grain_seed: hash(field.seed, &[1]) },
                format: image::ImageFormat::Tiff,
            });
            fields.push(field);
        }
    }
    (fields, jobs, 0)
}
