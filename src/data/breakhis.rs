//! BreakHis v1 reader.
//!
//! Layout: `BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype folder>/
//! SOB_<B|M>_<T>_<yy>-<slide>/<40X|100X|200X|400X>/SOB_<B|M>_<T>-<yy>-<slide>-<mag>-<seq>.png`.
//! Every file name is cross-checked against its folders; a disagreement is a problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DataError, Problem, ProblemKind};
use super::record::{rel_string, Dataset, ImageRecord};
use super::{first_matching, list_dir, Entry};

/// The four magnifications, in the order regions list their images.
pub const MAGNIFICATIONS: [u32; 4] = [40, 100, 200, 400];

/// A BreakHis tumour subtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subtype {
    /// Code used in names: `A`, `F`, `PT`, `TA`, `DC`, `LC`, `MC`, `PC`.
    pub code: &'static str,
    /// Folder name under `SOB/`.
    pub folder: &'static str,
    /// Binary label: benign 0, malignant 1.
    pub label: u32,
    /// 8-class label, METHOD.md order A,F,PT,TA,DC,MC,LC,PC = 0..7.
    pub subtype_label: u32,
}

/// All subtypes, in 8-class label order.
pub const SUBTYPES: [Subtype; 8] = [
    Subtype { code: "A", folder: "adenosis", label: 0, subtype_label: 0 },
    Subtype { code: "F", folder: "fibroadenoma", label: 0, subtype_label: 1 },
    Subtype { code: "PT", folder: "phyllodes_tumor", label: 0, subtype_label: 2 },
    Subtype { code: "TA", folder: "tubular_adenoma", label: 0, subtype_label: 3 },
    Subtype { code: "DC", folder: "ductal_carcinoma", label: 1, subtype_label: 4 },
    Subtype { code: "MC", folder: "mucinous_carcinoma", label: 1, subtype_label: 5 },
    Subtype { code: "LC", folder: "lobular_carcinoma", label: 1, subtype_label: 6 },
    Subtype { code: "PC", folder: "papillary_carcinoma", label: 1, subtype_label: 7 },
];

pub const CLASS_FOLDERS: [&str; 2] = ["benign", "malignant"];

impl Subtype {
    pub fn by_code(code: &str) -> Option<Subtype> {
        SUBTYPES.iter().copied().find(|s| s.code == code)
    }
    pub fn by_folder(folder: &str) -> Option<Subtype> {
        SUBTYPES.iter().copied().find(|s| s.folder == folder)
    }
    /// `B` or `M`, as in the names.
    pub fn class_letter(self) -> char {
        if self.label == 0 {
            'B'
        } else {
            'M'
        }
    }
    pub fn class_folder(self) -> &'static str {
        CLASS_FOLDERS[self.label as usize]
    }
}

/// The fields of a patient folder name `SOB_B_A_14-22549AB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientDir {
    pub class_letter: char,
    pub subtype: String,
    pub year: String,
    pub slide: String,
}

impl PatientDir {
    pub fn parse(name: &str) -> Option<PatientDir> {
        let rest = name.strip_prefix("SOB_")?;
        let (class, rest) = rest.split_once('_')?;
        let (subtype, rest) = rest.split_once('_')?;
        let (year, slide) = rest.split_once('-')?;
        let class_letter = single_class_letter(class)?;
        if !is_code(subtype) || !is_digits(year) || !is_slide(slide) {
            return None;
        }
        Some(PatientDir {
            class_letter,
            subtype: subtype.to_string(),
            year: year.to_string(),
            slide: slide.to_string(),
        })
    }

    pub fn name(&self) -> String {
        format!("SOB_{}_{}_{}-{}", self.class_letter, self.subtype, self.year, self.slide)
    }
}

/// The fields of an image name `SOB_B_A-14-22549AB-40-001.png`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    pub class_letter: char,
    pub subtype: String,
    pub year: String,
    pub slide: String,
    pub magnification: u32,
    pub seq: u32,
}

impl ImageName {
    pub fn parse(name: &str) -> Option<ImageName> {
        let stem = name.strip_suffix(".png").or_else(|| name.strip_suffix(".PNG"))?;
        let rest = stem.strip_prefix("SOB_")?;
        let (class, rest) = rest.split_once('_')?;
        let parts: Vec<&str> = rest.split('-').collect();
        let [subtype, year, slide, mag, seq] = parts[..] else {
            return None;
        };
        let class_letter = single_class_letter(class)?;
        if !is_code(subtype) || !is_digits(year) || !is_slide(slide) || !is_digits(seq) {
            return None;
        }
        let magnification: u32 = mag.parse().ok()?;
        if !MAGNIFICATIONS.contains(&magnification) {
            return None;
        }
        Some(ImageName {
            class_letter,
            subtype: subtype.to_string(),
            year: year.to_string(),
            slide: slide.to_string(),
            magnification,
            seq: seq.parse().ok()?,
        })
    }

    /// The file name; sequence numbers are written with (at least) three digits as in BreakHis.
    pub fn name(&self) -> String {
        format!(
            "SOB_{}_{}-{}-{}-{}-{:03}.png",
            self.class_letter, self.subtype, self.year, self.slide, self.magnification, self.seq
        )
    }
}

fn single_class_letter(s: &str) -> Option<char> {
    match s {
        "B" => Some('B'),
        "M" => Some('M'),
        _ => None,
    }
}
fn is_code(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_uppercase())
}
fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}
fn is_slide(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// `40X` → 40.
fn parse_mag_folder(name: &str) -> Option<u32> {
    let n: u32 = name.strip_suffix('X').or_else(|| name.strip_suffix('x'))?.parse().ok()?;
    MAGNIFICATIONS.contains(&n).then_some(n)
}

const EXPECTED: &str = "expected the folder that contains `BreaKHis_v1/`, `BreaKHis_v1` itself, or \
`BreaKHis_v1/histology_slides/breast` (holding `benign/` and `malignant/`), as unpacked from BreaKHis_v1.tar.gz";

/// Finds the `breast` folder (the one holding `benign/` and `malignant/`) under `root`.
pub fn resolve_root(root: &Path) -> Result<PathBuf, DataError> {
    let candidates = [
        root.join("BreaKHis_v1/histology_slides/breast"),
        root.join("histology_slides/breast"),
        root.join("breast"),
        root.to_path_buf(),
    ];
    first_matching(&candidates, |p| CLASS_FOLDERS.iter().any(|c| p.join(c).is_dir())).ok_or_else(|| {
        DataError::NotFound {
            dataset: "breakhis",
            root: root.to_path_buf(),
            reason: format!("no `benign/` or `malignant/` folder found; {EXPECTED}"),
        }
    })
}

struct Walker<'a> {
    root: &'a Path,
    records: Vec<ImageRecord>,
    problems: Vec<Problem>,
}

impl Walker<'_> {
    fn problem(&mut self, path: &Path, kind: ProblemKind, detail: impl Into<String>) {
        self.problems.push(Problem { path: path.to_path_buf(), kind, detail: detail.into() });
    }

    /// At a folder level that holds only folders: loose images are misplaced, other files ignored
    /// (archives carry spreadsheets and readmes beside the images).
    fn stray_file(&mut self, e: &Entry, level: &str) {
        if super::image_check::format_for(&e.path).is_some() {
            self.problem(
                &e.path,
                ProblemKind::Unexpected,
                format!("image outside the BreakHis layout (a {level} folder holds only folders)"),
            );
        }
    }

    fn walk_breast(&mut self, breast: &Path) -> Result<(), DataError> {
        for e in list_dir(breast)? {
            if !e.is_dir {
                self.stray_file(&e, "`breast`");
            } else if CLASS_FOLDERS.contains(&e.name.as_str()) {
                self.walk_class(&e.path, &e.name)?;
            } else {
                self.problem(
                    &e.path,
                    ProblemKind::Unexpected,
                    "unexpected folder; `breast/` holds only `benign/` and `malignant/`",
                );
            }
        }
        Ok(())
    }

    fn walk_class(&mut self, dir: &Path, class: &str) -> Result<(), DataError> {
        for e in list_dir(dir)? {
            if !e.is_dir {
                self.stray_file(&e, "class");
            } else if e.name == "SOB" {
                self.walk_sob(&e.path, class)?;
            } else {
                self.problem(
                    &e.path,
                    ProblemKind::Unexpected,
                    format!("unexpected folder; `{class}/` holds only `SOB/`"),
                );
            }
        }
        Ok(())
    }

    fn walk_sob(&mut self, dir: &Path, class: &str) -> Result<(), DataError> {
        for e in list_dir(dir)? {
            if !e.is_dir {
                self.stray_file(&e, "`SOB`");
                continue;
            }
            match Subtype::by_folder(&e.name) {
                Some(st) if st.class_folder() == class => self.walk_subtype(&e.path, st)?,
                Some(st) => self.problem(
                    &e.path,
                    ProblemKind::Misnamed,
                    format!("subtype `{}` is {}, but this folder is under `{class}/`", st.folder, st.class_folder()),
                ),
                None => {
                    let valid: Vec<&str> =
                        SUBTYPES.iter().filter(|s| s.class_folder() == class).map(|s| s.folder).collect();
                    self.problem(
                        &e.path,
                        ProblemKind::Unexpected,
                        format!("unknown subtype folder; `{class}/SOB/` holds {}", valid.join(", ")),
                    )
                }
            }
        }
        Ok(())
    }

    fn walk_subtype(&mut self, dir: &Path, st: Subtype) -> Result<(), DataError> {
        for e in list_dir(dir)? {
            if !e.is_dir {
                self.stray_file(&e, "subtype");
                continue;
            }
            let Some(pd) = PatientDir::parse(&e.name) else {
                self.problem(
                    &e.path,
                    ProblemKind::Misnamed,
                    format!(
                        "patient folder name does not read as SOB_{}_{}_<year>-<slide>",
                        st.class_letter(),
                        st.code
                    ),
                );
                continue;
            };
            if pd.class_letter != st.class_letter() || pd.subtype != st.code {
                self.problem(
                    &e.path,
                    ProblemKind::Misnamed,
                    format!(
                        "patient folder says class {} subtype {} but it is in `{}/SOB/{}/` (class {} subtype {})",
                        pd.class_letter,
                        pd.subtype,
                        st.class_folder(),
                        st.folder,
                        st.class_letter(),
                        st.code
                    ),
                );
                continue;
            }
            self.walk_patient(&e.path, st, &pd)?;
        }
        Ok(())
    }

    fn walk_patient(&mut self, dir: &Path, st: Subtype, pd: &PatientDir) -> Result<(), DataError> {
        let before = self.records.len();
        for e in list_dir(dir)? {
            if !e.is_dir {
                self.stray_file(&e, "patient");
                continue;
            }
            match parse_mag_folder(&e.name) {
                Some(mag) => self.walk_mag(&e.path, st, pd, mag)?,
                None => self.problem(
                    &e.path,
                    ProblemKind::Unexpected,
                    "unexpected folder; a patient folder holds only 40X, 100X, 200X and 400X",
                ),
            }
        }
        if self.records.len() == before {
            self.problem(dir, ProblemKind::Empty, "patient folder without any image");
        }
        Ok(())
    }

    fn walk_mag(&mut self, dir: &Path, st: Subtype, pd: &PatientDir, mag: u32) -> Result<(), DataError> {
        for e in list_dir(dir)? {
            if e.is_dir {
                self.problem(&e.path, ProblemKind::Unexpected, "unexpected folder inside a magnification folder");
                continue;
            }
            if !e.name.to_ascii_lowercase().ends_with(".png") {
                self.problem(&e.path, ProblemKind::NotAnImage, "not a .png file; BreakHis images are PNG");
                continue;
            }
            let Some(name) = ImageName::parse(&e.name) else {
                self.problem(
                    &e.path,
                    ProblemKind::Misnamed,
                    format!(
                        "file name does not read as SOB_{}_{}-{}-{}-{}-<seq>.png",
                        pd.class_letter, pd.subtype, pd.year, pd.slide, mag
                    ),
                );
                continue;
            };
            let mut clashes = Vec::new();
            if name.class_letter != pd.class_letter {
                clashes.push(format!("class {} (folder: {})", name.class_letter, pd.class_letter));
            }
            if name.subtype != st.code {
                clashes.push(format!("subtype {} (folder: {})", name.subtype, st.code));
            }
            if name.year != pd.year {
                clashes.push(format!("year {} (folder: {})", name.year, pd.year));
            }
            if name.slide != pd.slide {
                clashes.push(format!("patient {} (folder: {})", name.slide, pd.slide));
            }
            if name.magnification != mag {
                clashes.push(format!("magnification {}X (folder: {mag}X)", name.magnification));
            }
            if !clashes.is_empty() {
                self.problem(
                    &e.path,
                    ProblemKind::Misnamed,
                    format!("file name disagrees with its folders: {}", clashes.join(", ")),
                );
                continue;
            }
            self.records.push(ImageRecord {
                rel_path: rel_string(self.root, &e.path),
                dataset: Dataset::BreakHis,
                label: st.label,
                class_name: st.class_folder().to_string(),
                subtype: Some(st.code.to_string()),
                subtype_label: Some(st.subtype_label),
                patient: Some(pd.slide.clone()),
                batch: None,
                magnification: Some(mag),
                seq: Some(name.seq),
            });
        }
        Ok(())
    }
}

/// Walks the layout under `root`; returns the well-named images and every problem found.
pub(crate) fn walk(root: &Path) -> Result<(Vec<ImageRecord>, Vec<Problem>), DataError> {
    let breast = resolve_root(root)?;
    let mut w = Walker { root, records: Vec::new(), problems: Vec::new() };
    w.walk_breast(&breast)?;
    Ok((w.records, w.problems))
}

/// One tissue region: a (patient, sequence number) present at all four magnifications.
/// This is one MPCS pretraining sample (METHOD.md: the "magnification prior").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Region {
    pub patient: String,
    pub subtype: String,
    pub label: u32,
    pub subtype_label: u32,
    pub seq: u32,
    /// `rel_path`s at 40X, 100X, 200X, 400X (the order of [`MAGNIFICATIONS`]).
    pub images: [String; 4],
}

/// The regions whose sequence number exists at all four magnifications, sorted.
///
/// Keyed by (subtype, patient, seq): in the real data one slide id can appear under two
/// subtypes, and those are different patient folders.
pub fn regions_at_all_magnifications(records: &[ImageRecord]) -> Vec<Region> {
    type Key<'a> = (&'a str, &'a str, u32);
    let mut by_region: BTreeMap<Key, ([Option<&ImageRecord>; 4], u32, u32)> = BTreeMap::new();
    for r in records.iter().filter(|r| r.dataset == Dataset::BreakHis) {
        let (Some(st), Some(p), Some(m), Some(seq), Some(sl)) =
            (r.subtype.as_deref(), r.patient.as_deref(), r.magnification, r.seq, r.subtype_label)
        else {
            continue;
        };
        let Some(i) = MAGNIFICATIONS.iter().position(|&x| x == m) else {
            continue;
        };
        let slot = by_region.entry((st, p, seq)).or_insert(([None; 4], r.label, sl));
        slot.0[i] = Some(r);
    }
    by_region
        .into_iter()
        .filter_map(|((st, p, seq), (imgs, label, sl))| {
            let [Some(a), Some(b), Some(c), Some(d)] = imgs else {
                return None;
            };
            Some(Region {
                patient: p.to_string(),
                subtype: st.to_string(),
                label,
                subtype_label: sl,
                seq,
                images: [a.rel_path.clone(), b.rel_path.clone(), c.rel_path.clone(), d.rel_path.clone()],
            })
        })
        .collect()
}
