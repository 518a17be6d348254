//! UCSB Bio-Segmentation "Breast Cancer Cell" reader: a flat folder of
//! `ytma<batch>_<date>_<benign|malignant><n>_ccd.tif` (e.g. `ytma10_010704_benign1_ccd.tif`).
//! The TMA batch (`ytma10_010704`) is kept as the grouping field.

use std::path::{Path, PathBuf};

use super::error::{DataError, Problem, ProblemKind};
use super::record::{rel_string, Dataset, ImageRecord};
use super::{first_matching, image_check::format_for, list_dir};

pub const CLASS_NAMES: [&str; 2] = ["benign", "malignant"];

/// The fields of a UCSB file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellName {
    /// `ytma10_010704`: TMA number and date.
    pub batch: String,
    /// benign 0, malignant 1.
    pub label: u32,
    pub number: u32,
}

impl CellName {
    pub fn parse(name: &str) -> Option<CellName> {
        let lower = name.to_ascii_lowercase();
        // `.png` for stain-normalised copies, which keep the layout but are written as PNG.
        let stem = lower
            .strip_suffix("_ccd.tif")
            .or_else(|| lower.strip_suffix("_ccd.tiff"))
            .or_else(|| lower.strip_suffix("_ccd.png"))?;
        let (tma, rest) = stem.split_once('_')?;
        let (date, class_n) = rest.split_once('_')?;
        let tma_num = tma.strip_prefix("ytma")?;
        if tma_num.is_empty() || !tma_num.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        if date.is_empty() || !date.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let (label, num) =
            if let Some(n) = class_n.strip_prefix("benign") { (0, n) } else { (1, class_n.strip_prefix("malignant")?) };
        Some(CellName { batch: format!("{tma}_{date}"), label, number: num.parse().ok()? })
    }

    pub fn name(&self) -> String {
        format!("{}_{}{}_ccd.tif", self.batch, CLASS_NAMES[self.label as usize], self.number)
    }
}

fn holds_cells(dir: &Path) -> bool {
    list_dir(dir).map(|es| es.iter().any(|e| !e.is_dir && CellName::parse(&e.name).is_some())).unwrap_or(false)
}

/// The folder holding the images: `root` itself, or its only subfolder that holds them.
pub fn resolve_root(root: &Path) -> Result<PathBuf, DataError> {
    if let Some(p) = first_matching(&[root.to_path_buf()], holds_cells) {
        return Ok(p);
    }
    let subs: Vec<PathBuf> =
        list_dir(root)?.into_iter().filter(|e| e.is_dir && holds_cells(&e.path)).map(|e| e.path).collect();
    match subs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(DataError::NotFound {
            dataset: "breast-cell",
            root: root.to_path_buf(),
            reason: "no `ytma<batch>_<date>_<benign|malignant><n>_ccd.tif` image here or in a subfolder; \
give the folder of the UCSB Breast Cancer Cell images"
                .to_string(),
        }),
        _ => Err(DataError::NotFound {
            dataset: "breast-cell",
            root: root.to_path_buf(),
            reason: format!("{} subfolders hold UCSB images; give the one to use", subs.len()),
        }),
    }
}

pub(crate) fn walk(root: &Path) -> Result<(Vec<ImageRecord>, Vec<Problem>), DataError> {
    let dir = resolve_root(root)?;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for e in list_dir(&dir)? {
        if e.is_dir {
            // Ground-truth masks ship in their own folders; they are not images of this set.
            continue;
        }
        if format_for(&e.path).is_none() {
            continue;
        }
        let Some(cn) = CellName::parse(&e.name) else {
            problems.push(Problem {
                path: e.path.clone(),
                kind: ProblemKind::Misnamed,
                detail: "image name does not read as ytma<batch>_<date>_<benign|malignant><n>_ccd.tif".to_string(),
            });
            continue;
        };
        records.push(ImageRecord {
            rel_path: rel_string(root, &e.path),
            dataset: Dataset::BreastCell,
            label: cn.label,
            class_name: CLASS_NAMES[cn.label as usize].to_string(),
            subtype: None,
            subtype_label: None,
            patient: None,
            batch: Some(cn.batch),
            magnification: None,
            seq: Some(cn.number),
        });
    }
    Ok((records, problems))
}
