//! Errors of the data module. Validation never stops at the first problem: every bad file is
//! collected into one [`DataError::Invalid`] so a user fixes a dataset in one pass.

use std::fmt;
use std::path::PathBuf;

/// How many problems an [`DataError::Invalid`] message prints before "and N more".
pub const MAX_PRINTED_PROBLEMS: usize = 20;

/// What is wrong with one path of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The file could not be opened or read.
    Unreadable,
    /// The file has zero bytes.
    ZeroByte,
    /// The image data stops before the image is complete.
    Truncated,
    /// The bytes are not an image of the expected format (wrong magic number).
    NotAnImage,
    /// The image has a valid header but its data does not decode.
    Corrupt,
    /// The file or folder name does not follow the dataset's naming scheme, or disagrees with its folders.
    Misnamed,
    /// A folder or image where the layout has no place for one.
    Unexpected,
    /// A folder that should hold images holds none.
    Empty,
}

impl ProblemKind {
    /// What the user should do about a problem of this kind.
    pub fn advice(self) -> &'static str {
        match self {
            ProblemKind::Unreadable => "check its permissions or re-download it",
            ProblemKind::ZeroByte | ProblemKind::Truncated | ProblemKind::Corrupt => {
                "re-download the archive or remove the file"
            }
            ProblemKind::NotAnImage => "replace it with the original image or remove it",
            ProblemKind::Misnamed => "restore the original name or move it to the folder it names",
            ProblemKind::Unexpected => "move it out of the dataset folder",
            ProblemKind::Empty => "restore its images or remove the folder",
        }
    }
}

/// One problem found while scanning or verifying a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub kind: ProblemKind,
    /// What exactly is wrong, e.g. "truncated PNG (file ends after 1234 bytes)".
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; {}", self.path.display(), self.detail, self.kind.advice())
    }
}

/// Renders the problem list, capped at [`MAX_PRINTED_PROBLEMS`].
pub struct ProblemList<'a>(pub &'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0.iter().take(MAX_PRINTED_PROBLEMS) {
            write!(f, "\n  - {p}")?;
        }
        if self.0.len() > MAX_PRINTED_PROBLEMS {
            write!(f, "\n  ... and {} more", self.0.len() - MAX_PRINTED_PROBLEMS)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The root does not exist or does not hold the dataset's layout anywhere we look.
    #[error("{dataset} dataset not found at {}: {reason}", root.display())]
    NotFound { dataset: &'static str, root: PathBuf, reason: String },
    /// The layout was found but some files or folders are wrong; every problem is listed.
    #[error("{dataset} dataset at {} has {} problem(s):{}", root.display(), problems.len(), ProblemList(problems))]
    Invalid { dataset: &'static str, root: PathBuf, problems: Vec<Problem> },
    /// An I/O error outside a per-file check (listing a folder, writing output).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad argument (unknown dataset name, zero size, non-empty output folder, ...).
    #[error("{0}")]
    Usage(String),
    /// Encoding an image failed while writing synthetic data.
    #[error("{}: cannot encode image: {message}", path.display())]
    Encode { path: PathBuf, message: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// The problems of an [`DataError::Invalid`], empty for other variants (handy in tests and reports).
    pub fn problems(&self) -> &[Problem] {
        match self {
            DataError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}
