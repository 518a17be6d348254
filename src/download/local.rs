//! `file://` URLs: copy the local file into the part file, hashing on the way, so the rest of the flow (checks,
//! unpack, atomic placement) is the same as for HTTP. No resume: a local copy is restarted from zero.

use super::digest::{DigestAlgo, Hasher};
use super::partial::Scratch;
use super::{DownloadError, FetchOptions, Progress, Transfer};
use std::fs::File;
use std::io::{BufWriter, Read, Write};

pub(crate) fn copy(
    url: &url::Url,
    opts: &FetchOptions,
    scratch: &Scratch,
    algo: DigestAlgo,
    progress: Progress<'_>,
) -> Result<Transfer, DownloadError> {
    let path = url.to_file_path().map_err(|()| DownloadError::BadUrl {
        url: opts.url.clone(),
        reason: "a file:// URL needs an absolute local path (file:///abs/path)".into(),
    })?;
    let mut src = File::open(&path).map_err(|e| DownloadError::io("cannot open", &path, e))?;
    let total = src.metadata().ok().map(|m| m.len());
    scratch.clear()?;
    let file = File::create(&scratch.part).map_err(|e| DownloadError::io("cannot create", &scratch.part, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Hasher::new(algo);
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    progress(0, total);
    loop {
        if opts.cancelled() {
            // Nothing to resume for a local copy: drop the partial.
            drop(out);
            scratch.clear()?;
            return Err(DownloadError::Cancelled { url: opts.url.clone() });
        }
        let n = src.read(&mut buf).map_err(|e| DownloadError::io("cannot read", &path, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| DownloadError::io("cannot write", &scratch.part, e))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    out.flush().map_err(|e| DownloadError::io("cannot write", &scratch.part, e))?;
    Ok(Transfer { bytes: done, hex: hasher.finish(), resumed_from: 0 })
}
