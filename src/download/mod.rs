//! The `download` stage's library: fetch one URL (http, https or file) into an output directory, resumably, with
//! an optional pinned digest, and unpack archives safely.
//!
//! Flow: bytes stream into `<scratch>/download.part` (hashed on the way) → size and digest checks → unpack (or move
//! the file) into a temporary directory beside `out_dir` → one rename makes it `out_dir`. A failure before the rename
//! leaves no output; a network failure keeps the partial download so the next run resumes it.

mod digest;
mod error;
mod http;
mod local;
mod partial;
mod unpack;

pub use digest::{Digest, DigestAlgo};
pub use error::DownloadError;
pub use partial::{PART_NAME, SIDECAR_NAME};
pub use unpack::ArchiveKind;

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Progress callback: (bytes so far, total bytes when the server said). Called often; the caller throttles drawing.
pub type Progress<'a> = &'a dyn Fn(u64, Option<u64>);

/// What to fetch and how. Build with [`FetchOptions::new`] and set the fields you need.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// `http://`, `https://` or `file://` URL.
    pub url: String,
    /// Pinned digest; a mismatch is an error and nothing is kept. Without it the sha256 seen is returned.
    pub digest: Option<Digest>,
    /// `Some(true)`: unpack (by extension, else by magic bytes; error if not an archive). `Some(false)`: store the
    /// file as is. `None` (default): unpack exactly when the name ends in `.tar.gz`, `.tgz`, `.tar` or `.zip`.
    pub unpack: Option<bool>,
    /// Name to store a non-archive under (also used to recognise the archive type); default: last URL segment.
    pub filename: Option<String>,
    /// Extra attempts after a connection failure, timeout or 5xx, each resuming where the last stopped.
    pub retries: u32,
    /// Pause before the first retry; doubled each time, at most 30 s.
    pub retry_delay: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for any single read from the server (not for the whole transfer).
    pub read_timeout: Duration,
    pub user_agent: String,
    /// Set to true (e.g. from a SIGINT handler) to stop the transfer at the next chunk with
    /// [`DownloadError::Cancelled`]; the partial download is kept for the next run.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl FetchOptions {
    pub fn new(url: impl Into<String>) -> FetchOptions {
        FetchOptions {
            url: url.into(),
            digest: None,
            unpack: None,
            filename: None,
            retries: 5,
            retry_delay: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            user_agent: format!("mpcs/{} (+download stage)", env!("CARGO_PKG_VERSION")),
            cancel: None,
        }
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// The result of a successful [`fetch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Every file and symlink now under `out_dir`, relative to it, sorted. Directories are not listed.
    pub files: Vec<PathBuf>,
    /// Digest of the downloaded bytes (the archive itself, before unpacking): the pinned algorithm, else sha256.
    pub digest: Digest,
    /// Whether `digest` was pinned (and so checked) rather than just observed.
    pub pinned: bool,
    /// Size of the downloaded file in bytes.
    pub bytes: u64,
    /// Bytes reused from an earlier interrupted run (0 when the transfer started from zero).
    pub resumed_from: u64,
    /// The archive type unpacked, or None when the file was stored as is.
    pub unpacked: Option<ArchiveKind>,
}

impl Fetched {
    /// For an unpinned download, the line to show the user: `add sha256 = "<hex>" to pin it`.
    pub fn pin_hint(&self) -> Option<String> {
        (!self.pinned).then(|| format!("add {} = \"{}\" to pin it", self.digest.algo.name(), self.digest.hex))
    }
}

/// What a transfer (http or file) left in the part file.
pub(crate) struct Transfer {
    pub bytes: u64,
    pub hex: String,
    pub resumed_from: u64,
}

/// Fetch `opts.url` into `out_dir`, which must be absent or empty; on success it holds exactly the unpacked tree or
/// the single file. `scratch_dir` (created if needed) keeps the resumable partial download across crashes and should
/// be stable for a given node; it is emptied of the partial on success and on digest/size/archive errors.
pub fn fetch(
    opts: &FetchOptions,
    out_dir: &Path,
    scratch_dir: &Path,
    progress: Progress<'_>,
) -> Result<Fetched, DownloadError> {
    let url = url::Url::parse(&opts.url)
        .map_err(|e| DownloadError::BadUrl { url: opts.url.clone(), reason: e.to_string() })?;
    if !matches!(url.scheme(), "http" | "https" | "file") {
        return Err(DownloadError::BadUrl {
            url: opts.url.clone(),
            reason: format!("scheme `{}` is not supported", url.scheme()),
        });
    }
    let name = match &opts.filename {
        Some(n) => n.clone(),
        None => file_name_from_url(&url).ok_or_else(|| DownloadError::NoFileName { url: opts.url.clone() })?,
    };
    check_file_name(&name)?;
    check_output_free(out_dir)?;

    let scratch = partial::Scratch::new(scratch_dir)?;
    let algo = opts.digest.as_ref().map_or(DigestAlgo::Sha256, |d| d.algo);
    let transfer = if url.scheme() == "file" {
        local::copy(&url, opts, &scratch, algo, progress)?
    } else {
        http::download(opts, &scratch, algo, progress)?
    };

    if transfer.bytes == 0 {
        scratch.clear()?;
        return Err(DownloadError::Empty { url: opts.url.clone() });
    }
    if let Some(expected) = &opts.digest {
        if expected.hex != transfer.hex {
            scratch.clear()?;
            return Err(DownloadError::DigestMismatch {
                url: opts.url.clone(),
                algo: expected.algo.name(),
                expected: expected.hex.clone(),
                got: transfer.hex,
                bytes: transfer.bytes,
            });
        }
    }

    let kind = match opts.unpack {
        Some(false) => None,
        None => ArchiveKind::from_name(&name),
        Some(true) => {
            Some(ArchiveKind::from_name(&name).or_else(|| ArchiveKind::sniff(&scratch.part)).ok_or_else(|| {
                DownloadError::BadArchive {
                    archive: name.clone(),
                    reason: "unpack = true but it is not a .tar.gz, .tgz, .tar or .zip archive".into(),
                }
            })?)
        }
    };

    let staging = staging_dir(out_dir)?;
    let placed = match kind {
        Some(kind) => unpack::unpack(kind, &scratch.part, &staging),
        None => move_file(&scratch.part, &staging.join(&name)),
    };
    if let Err(e) = placed {
        let _ = fs::remove_dir_all(&staging);
        // A refused or corrupt archive is of no further use; a disk error is worth resuming from after cleanup.
        if matches!(e, DownloadError::UnsafeEntry { .. } | DownloadError::BadArchive { .. }) {
            scratch.clear()?;
        }
        return Err(e);
    }
    if let Err(e) = commit(&staging, out_dir) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    scratch.clear()?;

    let mut files = Vec::new();
    list_files(out_dir, Path::new(""), &mut files)?;
    files.sort();
    Ok(Fetched {
        files,
        digest: Digest { algo, hex: transfer.hex },
        pinned: opts.digest.is_some(),
        bytes: transfer.bytes,
        resumed_from: transfer.resumed_from,
        unpacked: kind,
    })
}

/// The last non-empty path segment, percent-decoded.
fn file_name_from_url(url: &url::Url) -> Option<String> {
    let last = url.path_segments()?.rev().find(|s| !s.is_empty())?;
    Some(percent_decode(last))
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn check_file_name(name: &str) -> Result<(), DownloadError> {
    let bad = |reason: &str| DownloadError::BadFileName { name: name.to_string(), reason: reason.to_string() };
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("it is empty or a directory name"));
    }
    if name.contains('/') || name.contains('\\') || name.contains('\0') {
        return Err(bad("it contains a path separator"));
    }
    Ok(())
}

fn check_output_free(out_dir: &Path) -> Result<(), DownloadError> {
    match fs::read_dir(out_dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(DownloadError::OutputNotEmpty { path: out_dir.to_path_buf() }),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DownloadError::io("cannot read output directory", out_dir, e)),
    }
}

/// A fresh temporary directory beside `out_dir` (same filesystem, so the final rename is atomic).
fn staging_dir(out_dir: &Path) -> Result<PathBuf, DownloadError> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| DownloadError::io("cannot create directory", &parent, e))?;
    let base = out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let staging = parent.join(format!(".{base}.unpacking-{}", std::process::id()));
    // Left by an earlier crash of a process with the same id: it is ours to reuse.
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| DownloadError::io("cannot remove", &staging, e))?;
    }
    fs::create_dir(&staging).map_err(|e| DownloadError::io("cannot create directory", &staging, e))?;
    Ok(staging)
}

/// Move the part file into the staging directory; copy when scratch is on another filesystem.
fn move_file(from: &Path, to: &Path) -> Result<(), DownloadError> {
    if fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let tmp = to.with_extension("copying");
    fs::copy(from, &tmp).map_err(|e| DownloadError::io("cannot copy into", &tmp, e))?;
    fs::rename(&tmp, to).map_err(|e| DownloadError::io("cannot rename into place", to, e))?;
    let _ = fs::remove_file(from);
    Ok(())
}

/// Rename the finished staging directory to `out_dir` (an empty `out_dir` is replaced).
fn commit(staging: &Path, out_dir: &Path) -> Result<(), DownloadError> {
    match fs::remove_dir(out_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(DownloadError::io("cannot replace output directory", out_dir, e)),
    }
    fs::rename(staging, out_dir).map_err(|e| DownloadError::io("cannot rename into place", out_dir, e))
}

fn list_files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), DownloadError> {
    let dir = root.join(rel);
    let entries = fs::read_dir(&dir).map_err(|e| DownloadError::io("cannot list", &dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| DownloadError::io("cannot list", &dir, e))?;
        let kind = entry.file_type().map_err(|e| DownloadError::io("cannot stat", entry.path(), e))?;
        let child = rel.join(entry.file_name());
        if kind.is_dir() {
            list_files(root, &child, out)?;
        } else {
            out.push(child);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_urls() {
        let u = url::Url::parse("https://example.org/data/BreaKHis%20v1.tar.gz?x=1#f").unwrap();
        assert_eq!(file_name_from_url(&u).as_deref(), Some("BreaKHis v1.tar.gz"));
        let u = url::Url::parse("https://example.org/").unwrap();
        assert_eq!(file_name_from_url(&u), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%zz"), "A%zz");
        assert!(check_file_name("..").is_err());
        assert!(check_file_name("a/b").is_err());
        assert!(check_file_name("ok.bin").is_ok());
    }

    #[test]
    fn archive_kinds_by_name() {
        assert_eq!(ArchiveKind::from_name("x.TAR.GZ"), Some(ArchiveKind::TarGz));
        assert_eq!(ArchiveKind::from_name("x.tgz"), Some(ArchiveKind::TarGz));
        assert_eq!(ArchiveKind::from_name("x.tar"), Some(ArchiveKind::Tar));
        assert_eq!(ArchiveKind::from_name("x.zip"), Some(ArchiveKind::Zip));
        assert_eq!(ArchiveKind::from_name("x.gz"), None);
    }
}
