//! HTTP(S) transfer into the scratch part file, with resume (`Range` + `If-Range`) and bounded retries.

use super::digest::{DigestAlgo, Hasher};
use super::partial::{Scratch, Sidecar};
use super::{DownloadError, FetchOptions, Progress, Transfer};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::time::Duration;

/// How one attempt ended when it did not finish.
enum Step {
    /// Worth trying again after a pause (connection reset, timeout, 5xx); the part file keeps what arrived.
    Retry(String),
    /// The partial cannot be continued (server refused the range, remote changed): drop it and start from zero.
    Restart(String),
    Fatal(DownloadError),
}

impl From<DownloadError> for Step {
    fn from(e: DownloadError) -> Step {
        Step::Fatal(e)
    }
}

/// The longest pause between two attempts, whatever the retry count.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Restarts from zero are bounded too, so a server that keeps changing its answer cannot loop us forever.
const MAX_RESTARTS: u32 = 3;

pub(crate) fn download(
    opts: &FetchOptions,
    scratch: &Scratch,
    algo: DigestAlgo,
    progress: Progress<'_>,
) -> Result<Transfer, DownloadError> {
    let agent = ureq::AgentBuilder::new()
        .user_agent(&opts.user_agent)
        .timeout_connect(opts.connect_timeout)
        // A per-read timeout, not a whole-request one: a multi-GB archive may rightly take an hour.
        .timeout_read(opts.read_timeout)
        .redirects(10)
        .build();
    let mut attempt = 1u32;
    let mut restarts = 0u32;
    let mut first_offset = None;
    loop {
        if opts.cancelled() {
            return Err(DownloadError::Cancelled { url: opts.url.clone() });
        }
        match attempt_once(&agent, opts, scratch, algo, progress, &mut first_offset) {
            Ok(mut t) => {
                t.resumed_from = first_offset.unwrap_or(0);
                return Ok(t);
            }
            Err(Step::Fatal(e)) => return Err(e),
            Err(Step::Restart(why)) => {
                scratch.clear()?;
                restarts += 1;
                if restarts > MAX_RESTARTS {
                    return Err(DownloadError::Network {
                        url: opts.url.clone(),
                        attempts: attempt,
                        detail: format!("had to restart from zero {restarts} times; last: {why}"),
                    });
                }
                tracing::warn!(url = %opts.url, "restarting download from zero: {why}");
            }
            Err(Step::Retry(detail)) => {
                if attempt > opts.retries {
                    return Err(DownloadError::Network { url: opts.url.clone(), attempts: attempt, detail });
                }
                let delay = opts.retry_delay.saturating_mul(1u32 << (attempt - 1).min(16)).min(MAX_BACKOFF);
                tracing::warn!(url = %opts.url, attempt, ?delay, "download interrupted, will resume: {detail}");
                std::thread::sleep(delay);
                attempt += 1;
            }
        }
    }
}

fn attempt_once(
    agent: &ureq::Agent,
    opts: &FetchOptions,
    scratch: &Scratch,
    algo: DigestAlgo,
    progress: Progress<'_>,
    first_offset: &mut Option<u64>,
) -> Result<Transfer, Step> {
    let url = &opts.url;
    // Resume only a partial of this very URL whose remote version we can check with If-Range.
    let previous = scratch.load().filter(|s| s.url == *url && s.validator().is_some());
    let have = match &previous {
        Some(_) => scratch.part_len(),
        None => 0,
    };
    if have == 0 {
        scratch.clear()?;
    }

    let mut request = agent.get(url);
    if let (Some(prev), true) = (&previous, have > 0) {
        let validator = prev.validator().unwrap_or_default();
        request = request.set("Range", &format!("bytes={have}-")).set("If-Range", validator);
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, r)) if have > 0 => {
            // Our range starts at or past the end: the partial is already whole (crash after the last byte), or the
            // remote file shrank. `Content-Range: bytes */N` tells which.
            let total = r.header("Content-Range").and_then(parse_unsatisfied);
            if total == Some(have) {
                *first_offset = first_offset.or(Some(have));
                return finish_existing(scratch, algo, have, progress);
            }
            return Err(Step::Restart(format!("server answered 416 to bytes={have}- (remote size {total:?})")));
        }
        Err(ureq::Error::Status(code, r)) => {
            let reason = r.status_text().to_string();
            if matches!(code, 408 | 429 | 500 | 502 | 503 | 504) {
                return Err(Step::Retry(format!("HTTP {code} {reason}")));
            }
            return Err(Step::Fatal(DownloadError::Http { url: url.clone(), status: code, reason }));
        }
        Err(ureq::Error::Transport(t)) => {
            use ureq::ErrorKind::*;
            return Err(match t.kind() {
                InvalidUrl | UnknownScheme | InsecureRequestHttpsOnly | InvalidProxyUrl => {
                    Step::Fatal(DownloadError::BadUrl { url: url.clone(), reason: t.to_string() })
                }
                TooManyRedirects | ProxyUnauthorized => {
                    Step::Fatal(DownloadError::Network { url: url.clone(), attempts: 1, detail: t.to_string() })
                }
                _ => Step::Retry(t.to_string()),
            });
        }
    };

    let etag = response.header("ETag").map(str::to_string);
    let last_modified = response.header("Last-Modified").map(str::to_string);
    let status = response.status();
    let (file, hasher, start, total) = match status {
        206 if have > 0 => {
            let range = response.header("Content-Range").and_then(parse_content_range);
            let Some((start, total)) = range else {
                return Err(Step::Restart("206 without a usable Content-Range".into()));
            };
            if start != have {
                return Err(Step::Restart(format!("asked for bytes={have}- but got a range starting at {start}")));
            }
            // If-Range already made the server compare; checking the ETag again costs nothing and also catches a
            // server that ignores If-Range.
            let old_etag = previous.as_ref().and_then(|p| p.etag.as_deref());
            if let (Some(old), Some(new)) = (old_etag, etag.as_deref()) {
                if old != new {
                    return Err(Step::Restart(format!("remote file changed (ETag {old} -> {new})")));
                }
            }
            let hasher = hash_prefix(scratch, algo)?;
            let file = OpenOptions::new()
                .append(true)
                .open(&scratch.part)
                .map_err(|e| DownloadError::io("cannot open", &scratch.part, e))?;
            (file, hasher, start, total)
        }
        200 => {
            // Fresh start, or the server ignored our Range / the If-Range validator failed: the body is the whole
            // file, so the old bytes must go. Sidecar first, so a crash never pairs old validators with new bytes.
            scratch.clear()?;
            let file = File::create(&scratch.part).map_err(|e| DownloadError::io("cannot create", &scratch.part, e))?;
            let total = response.header("Content-Length").and_then(|v| v.trim().parse().ok());
            (file, Hasher::new(algo), 0, total)
        }
        _ => {
            return Err(Step::Fatal(DownloadError::Http {
                url: url.clone(),
                status,
                reason: format!("{} (unexpected for a download)", response.status_text()),
            }))
        }
    };
    *first_offset = first_offset.or(Some(start));
    scratch.save(&Sidecar { url: url.clone(), etag, last_modified, total, bytes: start })?;
    progress(start, total);
    stream_body(response.into_reader(), file, hasher, (start, total), opts, scratch, progress)
}

/// Append the body to the part file while hashing it. A read error keeps what arrived (flushed) and asks for a retry.
fn stream_body(
    mut body: impl Read,
    file: File,
    mut hasher: Hasher,
    (start, total): (u64, Option<u64>),
    opts: &FetchOptions,
    scratch: &Scratch,
    progress: Progress<'_>,
) -> Result<Transfer, Step> {
    let part = &scratch.part;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = start;
    let mut cancelled = false;
    let lost = loop {
        if opts.cancelled() {
            cancelled = true;
            break None;
        }
        let n = match body.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(e.to_string()),
        };
        out.write_all(&buf[..n]).map_err(|e| DownloadError::io("cannot write", part, e))?;
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    };
    let file = out.into_inner().map_err(|e| DownloadError::io("cannot write", part, e.into_error()))?;
    if cancelled {
        return Err(Step::Fatal(DownloadError::Cancelled { url: opts.url.clone() }));
    }
    if let Some(e) = lost {
        return Err(Step::Retry(format!("connection lost after {done} bytes: {e}")));
    }
    match total {
        Some(t) if done < t => return Err(Step::Retry(format!("connection closed after {done} of {t} bytes"))),
        Some(t) if done > t => return Err(Step::Restart(format!("server sent {done} bytes but announced {t}"))),
        _ => {}
    }
    file.sync_all().map_err(|e| DownloadError::io("cannot sync", part, e))?;
    if let Some(mut s) = scratch.load() {
        s.bytes = done;
        scratch.save(&s)?;
    }
    Ok(Transfer { bytes: done, hex: hasher.finish(), resumed_from: 0 })
}

/// Hash the bytes already in the part file, so the digest covers the whole file without a second pass at the end.
fn hash_prefix(scratch: &Scratch, algo: DigestAlgo) -> Result<Hasher, DownloadError> {
    let mut hasher = Hasher::new(algo);
    let mut file = File::open(&scratch.part).map_err(|e| DownloadError::io("cannot open", &scratch.part, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| DownloadError::io("cannot read", &scratch.part, e))?;
        if n == 0 {
            return Ok(hasher);
        }
        hasher.update(&buf[..n]);
    }
}

fn finish_existing(scratch: &Scratch, algo: DigestAlgo, have: u64, progress: Progress<'_>) -> Result<Transfer, Step> {
    let hasher = hash_prefix(scratch, algo)?;
    progress(have, Some(have));
    Ok(Transfer { bytes: have, hex: hasher.finish(), resumed_from: 0 })
}

/// `bytes START-END/TOTAL` or `bytes START-END/*` -> (START, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

/// `bytes */TOTAL` (the form a 416 carries) -> TOTAL.
fn parse_unsatisfied(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes */")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_unsatisfied("bytes */4096"), Some(4096));
        assert_eq!(parse_unsatisfied("bytes 0-1/2"), None);
    }
}
