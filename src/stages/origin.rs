//! Where a file in a node's input came from, for messages about bad data. A file inside a cache entry must never
//! be reported at its cache path with advice to rename or move it: the entry is checked against its digest, and a
//! fix there is lost (or breaks the entry) while the real cause stays. So such a file is named at its origin: the
//! source file that a chain of name-keeping stages copied it from, or else the stage that made it, with the advice
//! to fix it there and the note that mpcs then reruns what follows.

use std::path::{Path, PathBuf};

use crate::data::error::{DataError, Problem, ProblemList};
use crate::exec::InputDir;
use crate::experiment::{Experiment, StageDecl};

/// Kinds whose output keeps each input file's path relative to the input (only the extension may change: stain
/// normalisation writes PNG), so a name seen in their output is the name in their input.
const NAME_KEEPING: &[&str] = &["stain_normalise"];

/// The origin of the files of one input.
pub enum Origin {
    /// The files of source stage `stage` (the folder `root`), copied under their own names by `carried_by`.
    Source { stage: String, root: PathBuf, carried_by: Vec<String> },
    /// Files that stage `stage` made, copied under their own names by `carried_by`.
    Stage { stage: String, carried_by: Vec<String> },
}

impl Origin {
    /// The stages that copied the files, nearest to the reader first.
    fn carried_by(&self) -> &[String] {
        match self {
            Origin::Source { carried_by, .. } | Origin::Stage { carried_by, .. } => carried_by,
        }
    }

    /// The first stage mpcs reruns once the origin is fixed.
    fn first_rerun(&self) -> &str {
        match self {
            Origin::Source { carried_by, .. } => carried_by.last().map_or("", String::as_str),
            Origin::Stage { stage, .. } => stage,
        }
    }
}

/// Follows `input` up through name-keeping stages with a single input; `None` when the input is a source itself
/// (its paths are the user's own files already).
pub fn origin(exp: &Experiment, input: &InputDir) -> Option<Origin> {
    let mut stage: &StageDecl = exp.stage(&input.stage)?;
    if stage.kind == crate::exec::source::NAME {
        return None;
    }
    let mut carried_by = Vec::new();
    loop {
        if stage.kind == crate::exec::source::NAME {
            if let Some(path) = stage.values.get("path").and_then(|v| v.as_str()) {
                let root = exp.resolve_path(path);
                let root = root.canonicalize().unwrap_or(root);
                return Some(Origin::Source { stage: stage.name.clone(), root, carried_by });
            }
        }
        let upstream = match stage.refs.as_slice() {
            [only] if NAME_KEEPING.contains(&stage.kind.as_str()) => exp.stage(&only.stage),
            _ => None,
        };
        match upstream {
            Some(up) => {
                carried_by.push(stage.name.clone());
                stage = up;
            }
            None => return Some(Origin::Stage { stage: stage.name.clone(), carried_by }),
        }
    }
}

/// The source file whose copy is `rel` (relative to the copy's root): the same relative path, or the same stem
/// with another extension (stain normalisation writes every image as PNG).
fn source_file(root: &Path, rel: &Path) -> PathBuf {
    let same = root.join(rel);
    if same.exists() {
        return same;
    }
    let stem = rel.file_stem();
    let found = std::fs::read_dir(same.parent().unwrap_or(root))
        .ok()
        .and_then(|dir| dir.flatten().map(|e| e.path()).filter(|p| p.is_file() && p.file_stem() == stem).min());
    found.unwrap_or(same)
}

/// A dataset error about `input`, with every path inside it named at its origin (see the module documentation);
/// other errors, and errors about a source input, as they are.
pub fn dataset_error(exp: &Experiment, input: &InputDir, error: DataError) -> String {
    let Some(origin) = origin(exp, input) else { return error.to_string() };
    let from = match (&origin, origin.carried_by()) {
        (Origin::Source { stage, root, .. }, _) => {
            format!("in files it carried over from source `{stage}` ({})", root.display())
        }
        (Origin::Stage { .. }, []) => "in files it made (paths relative to its output)".to_string(),
        (Origin::Stage { stage, .. }, _) => format!("in files that come from stage `{stage}` (paths as it wrote them)"),
    };
    let fix = match &origin {
        Origin::Source { .. } => "fix them in the source data, not in the cache (rename, move or remove the source \
                                  files as said above)"
            .to_string(),
        Origin::Stage { stage, .. } => {
            format!("fix them where stage `{stage}` gets them from (its inputs or its settings), not in the cache")
        }
    };
    let then = format!(
        "{fix}: mpcs reruns `{}` and the stages after it on the next run (a cache entry is checked against its \
         digest; never edit one)",
        origin.first_rerun()
    );
    match error {
        DataError::Invalid { dataset, problems, .. } => {
            let shown: Vec<Problem> = problems
                .into_iter()
                .map(|p| {
                    let rel =
                        p.path.strip_prefix(&input.path).map(Path::to_path_buf).unwrap_or_else(|_| p.path.clone());
                    let path = match &origin {
                        Origin::Source { root, .. } => source_file(root, &rel),
                        Origin::Stage { .. } => rel,
                    };
                    Problem { path, ..p }
                })
                .collect();
            format!(
                "{dataset} dataset from stage `{}` has {} problem(s), {from}:{}\n{then}",
                input.stage,
                shown.len(),
                ProblemList(&shown)
            )
        }
        DataError::NotFound { dataset, reason, .. } => {
            format!("{dataset} dataset not found in the output of stage `{}`: {reason}\n{then}", input.stage)
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normalised_copy_maps_back_to_its_source_under_another_extension() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/x.tif"), "tif").unwrap();
        std::fs::write(d.path().join("a/y.png"), "png").unwrap();
        assert_eq!(source_file(d.path(), Path::new("a/x.png")), d.path().join("a/x.tif"));
        assert_eq!(source_file(d.path(), Path::new("a/y.png")), d.path().join("a/y.png"));
        // Gone from the source since: the path it would have.
        assert_eq!(source_file(d.path(), Path::new("a/z.png")), d.path().join("a/z.png"));
    }
}
