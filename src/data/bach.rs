//! BACH (ICIAR 2018) reader: `ICIAR2018_BACH_Challenge/Photos/<Benign|InSitu|Invasive|Normal>/*.tif`.
//! The top folder may be given at any level down to `Photos`; class folder names are matched
//! ignoring case and punctuation (`InSitu`, `in_situ`, `In Situ`).

use std::path::{Path, PathBuf};

use super::error::{DataError, Problem, ProblemKind};
use super::record::{rel_string, Dataset, ImageRecord};
use super::{first_matching, list_dir};

/// Class names by label, as the paper's code indexes them: benign 0, invasive 1, insitu 2, normal 3.
pub use super::record::BACH_CLASS_NAMES as CLASS_NAMES;
/// Folder names in the archive, by label.
pub const CLASS_FOLDERS: [&str; 4] = ["Benign", "Invasive", "InSitu", "Normal"];
/// File name prefixes in the archive (`b001.tif`, `iv001.tif`, `is001.tif`, `n001.tif`), by label.
pub const FILE_PREFIXES: [&str; 4] = ["b", "iv", "is", "n"];

fn normalise(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

/// Label of a class folder name, forgiving about case and punctuation.
pub fn label_of_folder(name: &str) -> Option<u32> {
    let n = normalise(name);
    CLASS_NAMES.iter().position(|c| *c == n).map(|i| i as u32)
}

/// Splits `iv012.tif` into (`iv`, 12) when it follows the archive's pattern.
fn split_name(name: &str) -> Option<(&str, u32)> {
    let stem = name.rsplit_once('.')?.0;
    let digits_at = stem.find(|c: char| c.is_ascii_digit())?;
    let (prefix, num) = stem.split_at(digits_at);
    let n = num.parse().ok()?;
    Some((prefix, n))
}

const EXPECTED: &str = "expected `ICIAR2018_BACH_Challenge/Photos/` with the class folders Benign, InSitu, \
Invasive and Normal of .tif images (give the folder containing ICIAR2018_BACH_Challenge, that folder, or Photos)";

/// Finds the folder holding the class folders.
pub fn resolve_root(root: &Path) -> Result<PathBuf, DataError> {
    let candidates = [
        root.join("ICIAR2018_BACH_Challenge/Photos"),
        root.join("ICIAR2018_BACH_Challenge/ICIAR2018_BACH_Challenge/Photos"),
        root.join("Photos"),
        root.to_path_buf(),
    ];
    first_matching(&candidates, |p| {
        list_dir(p).map(|es| es.iter().any(|e| e.is_dir && label_of_folder(&e.name).is_some())).unwrap_or(false)
    })
    .ok_or_else(|| DataError::NotFound {
        dataset: "bach",
        root: root.to_path_buf(),
        reason: format!("no class folder found; {EXPECTED}"),
    })
}

pub(crate) fn walk(root: &Path) -> Result<(Vec<ImageRecord>, Vec<Problem>), DataError> {
    let photos = resolve_root(root)?;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let mut problem =
        |path: &Path, kind, detail: String| problems.push(Problem { path: path.to_path_buf(), kind, detail });
    for class_dir in list_dir(&photos)? {
        if !class_dir.is_dir {
            // `microscopy_ground_truth.csv` sits here in the archive; loose images do not.
            if super::image_check::format_for(&class_dir.path).is_some() {
                problem(&class_dir.path, ProblemKind::Unexpected, "image outside a class folder".to_string());
            }
            continue;
        }
        let Some(label) = label_of_folder(&class_dir.name) else {
            problem(
                &class_dir.path,
                ProblemKind::Unexpected,
                format!("unexpected folder; Photos/ holds only {}", CLASS_FOLDERS.join(", ")),
            );
            continue;
        };
        let before = records.len();
        for e in list_dir(&class_dir.path)? {
            if e.is_dir {
                problem(&e.path, ProblemKind::Unexpected, "unexpected folder inside a class folder".to_string());
                continue;
            }
            let lower = e.name.to_ascii_lowercase();
            // PNG too: a stain-normalised copy of the archive keeps its layout but is written as PNG.
            if !(lower.ends_with(".tif") || lower.ends_with(".tiff") || lower.ends_with(".png")) {
                if super::image_check::format_for(&e.path).is_some() || lower.ends_with(".jpg") {
                    problem(
                        &e.path,
                        ProblemKind::NotAnImage,
                        "not a .tif (or .png) file; BACH images are TIFF".to_string(),
                    );
                }
                continue;
            }
            // The archive names images <prefix><number>.tif; a known prefix of another class is misfiled.
            let seq = match split_name(&lower) {
                Some((prefix, n)) => {
                    if let Some(other) = FILE_PREFIXES.iter().position(|p| *p == prefix) {
                        if other as u32 != label {
                            problem(
                                &e.path,
                                ProblemKind::Misnamed,
                                format!(
                                    "the name marks a {} image but it is in the {} folder",
                                    CLASS_NAMES[other], CLASS_FOLDERS[label as usize]
                                ),
                            );
                            continue;
                        }
                    }
                    Some(n)
                }
                None => None,
            };
            records.push(ImageRecord {
                rel_path: rel_string(root, &e.path),
                dataset: Dataset::Bach,
                label,
                class_name: CLASS_NAMES[label as usize].to_string(),
                subtype: None,
                subtype_label: None,
                patient: None,
                batch: None,
                magnification: None,
                seq,
            });
        }
        if records.len() == before {
            problem(&class_dir.path, ProblemKind::Empty, "class folder without any .tif image".to_string());
        }
    }
    Ok((records, problems))
}
