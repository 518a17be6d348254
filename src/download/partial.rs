//! The resumable partial download in the caller's scratch directory: `download.part` (the bytes received so far, a
//! valid prefix of the remote file) and `download.json` (which URL and which remote version those bytes came from).
//! Both survive a crash; the next run resumes from the part file's length when the sidecar still matches.

use super::DownloadError;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub const PART_NAME: &str = "download.part";
pub const SIDECAR_NAME: &str = "download.json";

/// What the part file holds. `bytes` is informative (written when a transfer starts and ends); the part file's
/// length is the truth, because a crash can happen between a write and a sidecar update.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Sidecar {
    pub url: String,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub total: Option<u64>,
    pub bytes: u64,
}

impl Sidecar {
    /// The validator to send in `If-Range`. Weak ETags are not allowed there (RFC 9110 §13.1.5), so fall back to
    /// Last-Modified; with neither the remote version cannot be checked and the partial must not be resumed.
    pub(crate) fn validator(&self) -> Option<&str> {
        match &self.etag {
            Some(e) if !e.starts_with("W/") => Some(e),
            _ => self.last_modified.as_deref(),
        }
    }
}

pub(crate) struct Scratch {
    pub part: PathBuf,
    pub sidecar: PathBuf,
}

impl Scratch {
    pub(crate) fn new(dir: &Path) -> Result<Scratch, DownloadError> {
        fs::create_dir_all(dir).map_err(|e| DownloadError::io("cannot create scratch directory", dir, e))?;
        Ok(Scratch { part: dir.join(PART_NAME), sidecar: dir.join(SIDECAR_NAME) })
    }

    /// The sidecar, or None when missing or unreadable (an unreadable one just means "start from zero").
    pub(crate) fn load(&self) -> Option<Sidecar> {
        let text = fs::read_to_string(&self.sidecar).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Write the sidecar atomically (temp name then rename) so a crash never leaves half a JSON file.
    pub(crate) fn save(&self, sidecar: &Sidecar) -> Result<(), DownloadError> {
        let text = serde_json::to_string_pretty(sidecar).expect("sidecar serialises");
        crate::fsutil::write_atomic(&self.sidecar, text.as_bytes())
            .map_err(|e| DownloadError::io("cannot write", &self.sidecar, e))
    }

    pub(crate) fn part_len(&self) -> u64 {
        fs::metadata(&self.part).map(|m| m.len()).unwrap_or(0)
    }

    /// Forget the partial download (both files). Missing files are fine.
    pub(crate) fn clear(&self) -> Result<(), DownloadError> {
        for path in [&self.sidecar, &self.part] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(DownloadError::io("cannot remove", path, e)),
            }
        }
        Ok(())
    }
}
