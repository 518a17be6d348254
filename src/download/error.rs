//! The one error type of the download module. Every message names the URL or path involved and says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("bad url `{url}`: {reason}; use an http://, https:// or file:// URL")]
    BadUrl { url: String, reason: String },

    #[error("bad pinned {algo} digest `{value}`: {reason}; it must be 64 hex characters")]
    BadDigest { algo: &'static str, value: String, reason: String },

    #[error(
        "cannot tell which file name to store `{url}` under (the URL path has no last segment); set `filename = \"...\"`"
    )]
    NoFileName { url: String },

    #[error("bad file name `{name}`: {reason}; set `filename` to a plain file name")]
    BadFileName { name: String, reason: String },

    #[error("GET {url}: HTTP {status} {reason}; check the URL (and that the file is still published there)")]
    Http { url: String, status: u16, reason: String },

    #[error(
        "GET {url}: {detail} (gave up after {attempts} attempt(s)); check the network and rerun: bytes already received are kept and resumed"
    )]
    Network { url: String, attempts: u32, detail: String },

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{url}: {algo} mismatch: expected {expected}, got {got} ({bytes} bytes); nothing was kept. \
         The remote file changed or the pinned digest is wrong: check the source, then update or remove `{algo} = ...`"
    )]
    DigestMismatch { url: String, algo: &'static str, expected: String, got: String, bytes: u64 },

    #[error("{url}: the download is empty (0 bytes); nothing was kept. Check the URL")]
    Empty { url: String },

    #[error(
        "{archive}: refusing entry `{entry}`: {reason}; nothing was unpacked. The archive is unsafe: get it from a trusted source"
    )]
    UnsafeEntry { archive: String, entry: String, reason: String },

    #[error("{archive}: cannot unpack: {reason}; nothing was unpacked. Re-download it, or set `unpack = false`")]
    BadArchive { archive: String, reason: String },

    #[error("download of {url} cancelled; rerun to continue (an HTTP download resumes where it stopped)")]
    Cancelled { url: String },

    #[error("{path}: output directory exists and is not empty; remove it first")]
    OutputNotEmpty { path: PathBuf },
}

impl DownloadError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DownloadError::Io { what, path: path.into(), source }
    }
}
