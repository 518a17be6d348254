//! The record every dataset reader produces: one image, its labels and grouping fields.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::error::DataError;

/// BACH's class names by label, as the paper's code indexes them: benign 0, invasive 1, insitu 2, normal 3.
/// Here rather than in `bach` so that [`Dataset::class_names`] needs nothing from the readers (`bach::CLASS_NAMES`
/// re-exports it).
pub const BACH_CLASS_NAMES: [&str; 4] = ["benign", "invasive", "insitu", "normal"];

/// The three datasets the paper uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dataset {
    #[serde(rename = "breakhis")]
    BreakHis,
    #[serde(rename = "bach")]
    Bach,
    #[serde(rename = "breast-cell")]
    BreastCell,
}

impl Dataset {
    pub const ALL: [Dataset; 3] = [Dataset::BreakHis, Dataset::Bach, Dataset::BreastCell];

    /// The CLI / TOML name: `breakhis`, `bach`, `breast-cell`.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::BreakHis => "breakhis",
            Dataset::Bach => "bach",
            Dataset::BreastCell => "breast-cell",
        }
    }

    /// Class names indexed by label.
    pub fn class_names(self) -> &'static [&'static str] {
        match self {
            Dataset::BreakHis => &["benign", "malignant"],
            Dataset::Bach => &BACH_CLASS_NAMES,
            Dataset::BreastCell => &["benign", "malignant"],
        }
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dataset {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "breakhis" => Ok(Dataset::BreakHis),
            "bach" | "iciar2018" => Ok(Dataset::Bach),
            "breast-cell" | "breastcell" | "ucsb" => Ok(Dataset::BreastCell),
            _ => Err(DataError::Usage(format!("unknown dataset `{s}`; expected one of breakhis, bach, breast-cell"))),
        }
    }
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Path relative to the root given to [`super::scan`], with `/` separators.
    pub rel_path: String,
    pub dataset: Dataset,
    /// Class index: BreakHis B=0 M=1; BACH benign 0, invasive 1, insitu 2, normal 3; breast cell benign 0 malignant 1.
    pub label: u32,
    /// Name of `label` (`benign`, `malignant`, `invasive`, ...).
    pub class_name: String,
    /// BreakHis subtype code (`A`, `F`, `PT`, `TA`, `DC`, `LC`, `MC`, `PC`).
    pub subtype: Option<String>,
    /// BreakHis 8-class label (A,F,PT,TA,DC,MC,LC,PC = 0..7).
    pub subtype_label: Option<u32>,
    /// BreakHis patient id: the slide field of the name (`22549AB`).
    pub patient: Option<String>,
    /// Breast cell: the TMA batch (`ytma10_010704`), the natural grouping unit.
    pub batch: Option<String>,
    /// BreakHis magnification (40, 100, 200, 400).
    pub magnification: Option<u32>,
    /// BreakHis sequence number; BACH / breast cell: the number in the file name.
    pub seq: Option<u32>,
}

impl ImageRecord {
    /// The absolute path of the image, given the root passed to [`super::scan`].
    pub fn path(&self, root: &Path) -> PathBuf {
        root.join(&self.rel_path)
    }
}

/// Joins path components relative to the scan root with `/`, whatever the platform.
pub(crate) fn rel_string(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}
