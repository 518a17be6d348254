//! The error type of `report`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Data that cannot be drawn or embedded (empty series, NaN, mismatched lengths, ...).
    #[error("{0}")]
    Input(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("drawing failed: {0}")]
    Draw(String),
}

impl ReportError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
        move |source| ReportError::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T> = std::result::Result<T, ReportError>;

/// Writes `bytes` atomically ([`crate::fsutil::write_atomic`]), creating the parent folders first.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(ReportError::io(parent))?;
    }
    crate::fsutil::write_atomic(path, bytes).map_err(ReportError::io(path))
}
