//! Datasets: readers for the real layouts (BreakHis, BACH, UCSB breast cell), image
//! verification, and a synthetic H&E generator that writes the same layouts.
//!
//! Entry points: [`scan`] (read a dataset folder into [`ImageRecord`]s, optionally decoding
//! every image), [`breakhis::regions_at_all_magnifications`] (the MPCS pretraining samples) and
//! [`synth::generate`] (write a synthetic dataset).

pub mod bach;
pub mod breakhis;
pub mod breast_cell;
pub mod error;
pub mod image_check;
pub mod record;
pub mod synth;

use std::path::{Path, PathBuf};

pub use error::{DataError, Problem, ProblemKind};
pub use record::{Dataset, ImageRecord};

/// Reads a dataset folder and returns its images sorted by path (deterministic).
///
/// `root` may be the dataset's own top folder or a folder above it (see each reader).
/// With `verify_images` every image is decoded in full, in parallel, so truncated or corrupt
/// files are reported. Every problem found (misnamed, unexpected, empty, unreadable, ...) is
/// collected into one [`DataError::Invalid`].
pub fn scan(dataset: Dataset, root: &Path, verify_images: bool) -> Result<Vec<ImageRecord>, DataError> {
    if !root.is_dir() {
        return Err(DataError::NotFound {
            dataset: dataset.name(),
            root: root.to_path_buf(),
            reason: if root.exists() {
                "it is not a folder".to_string()
            } else {
                "no such folder; check the path".to_string()
            },
        });
    }
    let (mut records, mut problems) = match dataset {
        Dataset::BreakHis => breakhis::walk(root)?,
        Dataset::Bach => bach::walk(root)?,
        Dataset::BreastCell => breast_cell::walk(root)?,
    };
    let paths: Vec<PathBuf> = records.iter().map(|r| r.path(root)).collect();
    if verify_images {
        problems.extend(image_check::check_images(&paths));
    } else {
        // Without decoding, still catch what a stat shows: empty or unreadable files.
        problems.extend(image_check::check_sizes(&paths));
    }
    if !problems.is_empty() {
        problems.sort_by(|a, b| a.path.cmp(&b.path).then(a.kind.cmp(&b.kind)));
        return Err(DataError::Invalid { dataset: dataset.name(), root: root.to_path_buf(), problems });
    }
    if records.is_empty() {
        return Err(DataError::NotFound {
            dataset: dataset.name(),
            root: root.to_path_buf(),
            reason: "the layout is there but holds no images".to_string(),
        });
    }
    records.sort();
    Ok(records)
}

/// One entry of a folder listing.
pub(crate) struct Entry {
    pub path: PathBuf,
    pub name: String,
    pub is_dir: bool,
}

/// Lists a folder sorted by name, skipping hidden entries and OS litter (`Thumbs.db`, ...),
/// which archives often carry and which are never part of a dataset.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<Entry>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| DataError::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.eq_ignore_ascii_case("Thumbs.db") || name.eq_ignore_ascii_case("desktop.ini") {
            continue;
        }
        let path = ent.path();
        // Follow symlinks: a dataset folder linked in from elsewhere is normal.
        let is_dir = path.is_dir();
        out.push(Entry { path, name, is_dir });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The first candidate folder that exists and satisfies `looks_right`.
pub(crate) fn first_matching(candidates: &[PathBuf], looks_right: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    candidates.iter().find(|c| c.is_dir() && looks_right(c)).cloned()
}
