//! Reading a fold manifest (`fold_<k>.csv` written by `split`): one row per (image, portion), with the
//! columns file,label,class,subtype,patient,magnification,portion; `file` is relative to the dataset root.

use std::path::Path;

use super::error::{Result, TrainError};
use crate::data::breakhis::Subtype;

/// One row of a fold manifest: the type `split` writes them from.
pub use crate::split::Row as FoldRow;

/// Which label a classifier learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelColumn {
    /// The `label` column (BreakHis benign/malignant, BACH's 4 classes, ...).
    #[default]
    Label,
    /// The BreakHis 8-class subtype (A,F,PT,TA,DC,MC,LC,PC = 0..7) from the `subtype` column.
    Subtype,
}

impl LabelColumn {
    pub(crate) fn of(self, row: &FoldRow, path: &Path) -> Result<u32> {
        match self {
            LabelColumn::Label => Ok(row.label),
            LabelColumn::Subtype => {
                Subtype::by_code(&row.subtype).map(|s| s.subtype_label).ok_or_else(|| TrainError::BadFile {
                    path: path.to_path_buf(),
                    msg: format!("{}: subtype '{}' is not a BreakHis subtype code", row.file, row.subtype),
                })
            }
        }
    }
}

/// Reads every row of a fold manifest.
pub fn read_fold(path: &Path) -> Result<Vec<FoldRow>> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let bad = |msg: String| TrainError::BadFile { path: path.to_path_buf(), msg };
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| bad("empty file; expected a fold manifest with a header".into()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let find = |name: &str| {
        cols.iter().position(|c| *c == name).ok_or_else(|| {
            bad(format!("header lacks the column '{name}' (found: {header}); is this a fold_<k>.csv from `split`?"))
        })
    };
    let idx = [
        find("file")?,
        find("label")?,
        find("class")?,
        find("subtype")?,
        find("patient")?,
        find("magnification")?,
        find("portion")?,
    ];
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != cols.len() {
            return Err(bad(format!("line {}: {} fields, the header has {}", n + 2, f.len(), cols.len())));
        }
        let label = f[idx[1]]
            .trim()
            .parse()
            .map_err(|_| bad(format!("line {}: label '{}' is not a non-negative integer", n + 2, f[idx[1]])))?;
        rows.push(FoldRow {
            file: f[idx[0]].to_string(),
            label,
            class: f[idx[2]].to_string(),
            subtype: f[idx[3]].to_string(),
            patient: f[idx[4]].to_string(),
            magnification: f[idx[5]].to_string(),
            portion: f[idx[6]].trim().to_string(),
        });
    }
    Ok(rows)
}

/// Normalises a magnification filter: `40`, `40x`, `40X` → `40X`.
pub(crate) fn magnification_tag(m: &str) -> String {
    let m = m.trim().trim_end_matches(['x', 'X']);
    format!("{m}X")
}

/// The rows of `portion`, at `magnification` when given; an empty selection is an error naming what exists.
pub fn select(rows: &[FoldRow], portion: &str, magnification: Option<&str>, path: &Path) -> Result<Vec<FoldRow>> {
    let tag = magnification.map(magnification_tag);
    let out: Vec<FoldRow> = rows
        .iter()
        .filter(|r| r.portion == portion && tag.as_ref().is_none_or(|t| r.magnification.eq_ignore_ascii_case(t)))
        .cloned()
        .collect();
    if out.is_empty() {
        let mut portions: Vec<&str> = rows.iter().map(|r| r.portion.as_str()).collect();
        portions.sort_unstable();
        portions.dedup();
        let at = tag.map(|t| format!(" at magnification {t}")).unwrap_or_default();
        return Err(TrainError::Config(format!(
            "{}: portion '{portion}' has no images{at}; portions in this file: {}",
            path.display(),
            portions.join(", ")
        )));
    }
    Ok(out)
}

/// When `root` is a `patchify` output (it holds `patches.csv`), replaces every fold row (a source image) by the
/// rows of its patches, which inherit its label, patient and portion. Returns the rows and, per row, the source
/// image it came from (for image-wise majority votes); without `patches.csv` the rows are returned unchanged
/// and each is its own source. `augmented` keeps the offline-augmented copies (flips, rotations) too: the paper
/// trains on them, but validation and test use the original patches only.
pub fn expand_patches(root: &Path, rows: Vec<FoldRow>, augmented: bool) -> Result<(Vec<FoldRow>, Vec<String>)> {
    let index = root.join("patches.csv");
    if !index.exists() {
        let sources = rows.iter().map(|r| r.file.clone()).collect();
        return Ok((rows, sources));
    }
    let text = std::fs::read_to_string(&index).map_err(TrainError::io(&index))?;
    let bad = |msg: String| TrainError::BadFile { path: index.clone(), msg };
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| {
        header.iter().position(|c| *c == name).ok_or_else(|| bad(format!("header lacks the column '{name}'")))
    };
    let (file_col, source_col) = (col("file")?, col("source")?);
    let aug_col = header.iter().position(|c| *c == "augmentation");
    let mut by_source: std::collections::HashMap<&str, Vec<&str>> = std::collections::HashMap::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if !augmented && aug_col.and_then(|c| f.get(c)).is_some_and(|a| *a != "none") {
            continue;
        }
        match (f.get(file_col), f.get(source_col)) {
            (Some(file), Some(source)) => by_source.entry(source).or_default().push(file),
            _ => return Err(bad(format!("short line '{line}'"))),
        }
    }
    let (mut out, mut sources) = (Vec::new(), Vec::new());
    let mut missing = Vec::new();
    for r in rows {
        match by_source.get(r.file.as_str()) {
            Some(patches) => {
                for p in patches {
                    out.push(FoldRow { file: (*p).to_string(), ..r.clone() });
                    sources.push(r.file.clone());
                }
            }
            None => missing.push(r.file),
        }
    }
    if !missing.is_empty() {
        return Err(bad(format!(
            "{} image(s) of the fold have no patches (first: {}); was the split made from another dataset than the \
             one that was patchified?",
            missing.len(),
            missing[0]
        )));
    }
    Ok((out, sources))
}
