//! The remote cache: the local cache's entries shared through S3-compatible object storage (AWS S3, MinIO, Ceph,
//! R2, `rclone serve s3`), laid out as Bazel's remote cache is:
//!
//! ```text
//! s3://bucket/prefix/ac/<key>                  action record: the entry's manifest + its log's digest (JSON)
//! s3://bucket/prefix/cas/<d[0..2]>/<blake3>    content store: one object per distinct file, by blake3 digest
//! s3://bucket/prefix/locks/<kind>.<host>.<pid>.<n>   who is pushing, who is collecting garbage
//! ```
//!
//! A node whose key is missing locally but recorded remotely is *pulled* instead of run: its blobs are
//! downloaded into a staging folder, every byte is checked against the manifest's digests, and the entry is
//! published with the same atomic rename as a computed one (`transfer.rs`). A node that ran is *pushed*:
//! blobs first, the record last, so a reader never sees a record whose blobs are missing.
//!
//! Why `object_store` (Apache Arrow's): one well-kept client that signs SigV4, retries with backoff, reads the
//! standard AWS environment variables, speaks path-style to non-AWS endpoints, and writes records create-only
//! (`If-None-Match: *`). It is async; mpcs is not, so the client lives on a small runtime of its own here and
//! every call blocks on it. `aws-sdk-s3` would bring the same runtime with a much larger build; `rust-s3` has
//! no conditional writes.

mod credentials;
mod gc;
mod pusher;
mod transfer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

use crate::error::{Error, Result};
pub use gc::RemoteGcReport;
pub use pusher::{PushTally, Pusher};
pub use transfer::{Pull, Push};

/// Environment variables of the remote settings (the flags win over them).
pub const REMOTE_ENV: &str = "MPCS_REMOTE";

/// What a run may do with the remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Pull what is missing here; push nothing (CI, laptops).
    Read,
    /// Push what ran here; never pull.
    Write,
    /// Both.
    ReadWrite,
}

impl Mode {
    pub fn reads(self) -> bool {
        self != Mode::Write
    }
    pub fn writes(self) -> bool {
        self != Mode::Read
    }
}

/// A remote's address and what to do when it cannot be reached.
#[derive(Clone, Debug)]
pub struct RemoteSpec {
    pub url: String,
    pub mode: Mode,
    /// On a remote that is down or refuses the credentials: warn once and work locally instead of failing.
    pub fallback: bool,
}

/// Requests made and bytes moved, for `--json` and the tests that bound them.
#[derive(Default)]
pub struct Stats {
    pub list: AtomicU64,
    pub head: AtomicU64,
    pub get: AtomicU64,
    pub put: AtomicU64,
    pub delete: AtomicU64,
    pub bytes_down: AtomicU64,
    pub bytes_up: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "list": g(&self.list), "head": g(&self.head), "get": g(&self.get), "put": g(&self.put),
            "delete": g(&self.delete), "bytes_down": g(&self.bytes_down), "bytes_up": g(&self.bytes_up),
        })
    }
}

/// An opened remote cache.
pub struct Remote {
    url: String,
    pub mode: Mode,
    store: Arc<dyn ObjectStore>,
    /// `prefix/` inside the bucket (empty: the bucket's root).
    prefix: String,
    runtime: tokio::runtime::Runtime,
    /// Keys with an action record, listed once when the remote is opened and grown by this process's pushes:
    /// "is it there?" costs no request per node.
    known: Mutex<HashSet<String>>,
    pub stats: Stats,
    /// This process's push lock (see `gc.rs`), once taken, and when it was last refreshed.
    push_lock: Mutex<Option<(String, std::time::Instant)>>,
    /// Keys whose remote blobs a pull found damaged: when this process computes them again, a push rewrites
    /// their blobs (a blob's name is its content's digest, so rewriting one can only repair it).
    damaged: Mutex<HashSet<String>>,
}

/// Transfers in flight at once (per node for blobs, per batch for existence checks).
const PARALLEL: usize = 16;

impl Remote {
    /// Connects to `spec.url` and lists its action records (one request per 1000 records). A remote that cannot
    /// be reached, a bucket that does not exist, or refused credentials are one clear environment error.
    pub fn open(spec: &RemoteSpec) -> Result<Remote> {
        let (bucket, prefix) = parse_url(&spec.url)?;
        let settings = credentials::Settings::from_env()?;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .with_region(settings.region.clone())
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                backoff: object_store::BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(300))
                    .with_allow_http(settings.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"))),
            );
        if let Some(endpoint) = &settings.endpoint {
            // A non-AWS endpoint (MinIO, Ceph, rclone, 127.0.0.1): path-style addressing.
            builder = builder.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
        }
        if let Some((id, secret, token)) = &settings.keys {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = token {
                builder = builder.with_token(token);
            }
        }
        let store = builder.build().map_err(|e| Error::user(format!("cannot use the remote {}: {e}", spec.url)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mpcs-remote")
            .enable_all()
            .build()
            .map_err(|e| Error::env(format!("cannot start the remote cache's I/O threads: {e}")))?;
        let remote = Remote {
            url: spec.url.trim_end_matches('/').to_string(),
            mode: spec.mode,
            store: Arc::new(store),
            prefix,
            runtime,
            known: Mutex::new(HashSet::new()),
            stats: Stats::default(),
            push_lock: Mutex::new(None),
            damaged: Mutex::new(HashSet::new()),
        };
        let keys = remote.list_records().map_err(|e| remote.unreachable(&e, &settings))?;
        *remote.known.lock().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(remote)
    }

    /// Opens the remote a command asked for; with `fallback`, a remote that cannot be used is one warning and
    /// the command works locally.
    pub fn connect(spec: Option<&RemoteSpec>) -> Result<Option<Arc<Remote>>> {
        let Some(spec) = spec else { return Ok(None) };
        match Remote::open(spec) {
            Ok(r) => Ok(Some(Arc::new(r))),
            Err(e) if spec.fallback && e.class == crate::error::Class::Environment => {
                eprintln!("warning: {}\nwarning: working without the remote cache (--remote-fallback)", e.message);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the remote has an action record for `key` (as listed at open, plus this process's pushes).
    pub fn has(&self, key: &str) -> bool {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    fn note_known(&self, key: &str) {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string());
    }

    fn forget_known(&self, key: &str) {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    fn path(&self, rest: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{rest}", self.prefix))
    }

    fn record_path(&self, key: &str) -> ObjectPath {
        self.path(&format!("ac/{key}"))
    }

    fn blob_path(&self, digest: &str) -> ObjectPath {
        self.path(&format!("cas/{}/{digest}", &digest[..2]))
    }

    /// Every key with an action record.
    fn list_records(&self) -> std::result::Result<HashSet<String>, object_store::Error> {
        Ok(self.list("ac/")?.into_iter().map(|m| last_segment(&m.location)).collect())
    }

    /// Every object under `rest` (one request per 1000).
    fn list(&self, rest: &str) -> std::result::Result<Vec<object_store::ObjectMeta>, object_store::Error> {
        let prefix = self.path(rest.trim_end_matches('/'));
        let all: Vec<object_store::ObjectMeta> = self.runtime.block_on(self.store.list(Some(&prefix)).try_collect())?;
        Stats::add(&self.stats.list, (all.len() as u64 / 1000) + 1);
        Ok(all)
    }

    /// Words an error of the first request: whose problem it is and what to change.
    fn unreachable(&self, e: &object_store::Error, settings: &credentials::Settings) -> Error {
        let text = error_chain(e);
        let endpoint = settings.endpoint.as_deref().unwrap_or("AWS S3");
        let advice = if text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || text.contains("AccessDenied")
            || text.contains("403")
        {
            format!(
                "the remote {} at {endpoint} refused the credentials ({}): check AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (or the profile in ~/.aws/credentials)",
                self.url,
                settings.source_of_keys()
            )
        } else if text.contains("NoSuchBucket") {
            format!("the bucket of the remote {} does not exist at {endpoint}: create it, or fix --remote", self.url)
        } else {
            format!(
                "cannot reach the remote {} at {endpoint} ({}): check AWS_ENDPOINT_URL and that the server is up",
                self.url,
                root_cause(e)
            )
        };
        Error::env(format!("{advice} (or pass --remote-fallback to work locally when the remote is down)"))
    }
}

/// `s3://bucket/prefix` → (bucket, "prefix/").
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        Error::user(format!("--remote {url}: a remote cache is an S3 address like s3://bucket/prefix"))
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::user(format!("--remote {url}: the address names no bucket (s3://bucket/prefix)")));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|s| s == "." || s == "..") || prefix.contains("//") {
        return Err(Error::user(format!("--remote {url}: the prefix must be a plain path (no `.`, `..` or `//`)")));
    }
    Ok((bucket.to_string(), if prefix.is_empty() { String::new() } else { format!("{prefix}/") }))
}

/// A byte count for people: "512 B", "12.3 kB", "4.6 MB", "1.2 GB".
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n < 1000 => format!("{n} B"),
        n if n < 1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        n if n < 1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n => format!("{:.1} GB", n as f64 / 1e9),
    }
}

fn last_segment(p: &ObjectPath) -> String {
    p.filename().unwrap_or_default().to_string()
}

/// An error with its causes, on one line (object_store's own Display stops at the outermost one).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The innermost cause of an error ("Connection refused (os error 111)"): what a person can act on.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(s) = cause.source() {
        cause = s;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_a_bucket_and_a_plain_prefix() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), String::new()));
        assert_eq!(parse_url("s3://b/").unwrap(), ("b".into(), String::new()));
        assert_eq!(parse_url("s3://lab-cache/mpcs/v1/").unwrap(), ("lab-cache".into(), "mpcs/v1/".into()));
        for bad in ["http://b/x", "s3:///x", "s3://b/../x", "s3://b/a//c", "b/x"] {
            let e = parse_url(bad).unwrap_err();
            assert_eq!(e.class, crate::error::Class::User, "{bad}: {}", e.message);
        }
    }

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_234), "1.2 kB");
        assert_eq!(human_bytes(4_560_000), "4.6 MB");
        assert_eq!(human_bytes(1_200_000_000), "1.2 GB");
    }

    #[test]
    fn modes_say_what_they_allow() {
        assert!(Mode::Read.reads() && !Mode::Read.writes());
        assert!(!Mode::Write.reads() && Mode::Write.writes());
        assert!(Mode::ReadWrite.reads() && Mode::ReadWrite.writes());
    }
}
