//! The content-addressed cache.
//!
//! ```text
//! <cache>/CACHEDIR.TAG
//! <cache>/v2/entries/<k[0..2]>/<key>/{manifest.json, log.txt, out/...}   published entries, immutable
//! <cache>/v2/tmp/<key>.<pid>.<n>/                                       entries being written
//! <cache>/v2/locks/<k[0..2]>                                            per-key locks: one byte each (OFD locks)
//! <cache>/v2/scratch/<key>/                                             checkpoints of long stages, for resume
//! <cache>/v2/failed/<key>/log.txt                                       the log of the last failed attempt
//! <cache>/v2/stat/<hash>.json                                           stat caches of sources
//! <cache>/v2/journal/<experiment>.jsonl                                 append-only run records per experiment
//! ```
//!
//! An entry is written in `tmp/` and published with one `rename`, so a half-written entry is never visible and
//! a killed run leaves only a `tmp/` directory that the next holder of the key's lock removes.

pub mod fingerprint;
pub mod journal;
pub mod lock;
pub mod maintenance;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::plan::key::Action;
pub use fingerprint::FileDigest;
pub use lock::FileLock;

/// Environment variable that moves the cache (the `--cache` flag wins over it).
pub const CACHE_ENV: &str = "MPCS_CACHE";
/// The folder under the cache root that holds everything of the current on-disk format (bump it with the format).
pub const FORMAT_DIR: &str = "v2";
const MANIFEST_FORMAT: u32 = 1;

/// What an entry records about how it was made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: String,
    pub node: String,
    pub experiment: String,
    pub action: Action,
    pub output_digest: String,
    pub files: Vec<FileDigest>,
    pub started_unix: f64,
    pub duration_s: f64,
    pub device: String,
    pub host: String,
    pub tool_version: String,
    pub seed: u64,
    /// Stage-specific results (metrics of an evaluation, counts of a data stage...).
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// [`fingerprint::stat_digest`] of `out/` on this machine when the entry was published (or last verified):
    /// a consumer compares it before reading the entry. Empty in entries older than the check.
    #[serde(default)]
    pub stat: String,
}

/// The result of [`Cache::check_entry`].
pub enum EntryCheck {
    /// The entry holds what its manifest lists; its current stat digest.
    Intact(String),
    /// What is wrong with it.
    Damaged(String),
}

/// What the resolver reads of an entry's manifest: enough to key consumers and to check the entry before use.
#[derive(Clone, Debug, Deserialize)]
pub struct EntryHead {
    pub output_digest: String,
    #[serde(default)]
    pub stat: String,
}

/// A cache directory.
#[derive(Clone)]
pub struct Cache {
    root: PathBuf,
    base: PathBuf,
}

/// An entry being written: its files go in `out`, its log in `log`.
pub struct Staging {
    pub dir: PathBuf,
    pub out: PathBuf,
    pub log: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache> {
        let base = root.join(FORMAT_DIR);
        for sub in ["entries", "tmp", "locks", "scratch", "failed", "stat", "journal"] {
            let d = base.join(sub);
            fs::create_dir_all(&d).map_err(|e| {
                Error::env(format!(
                    "cannot create the cache directory {}: {e}; pass --cache DIR or set {CACHE_ENV} to a writable place",
                    d.display()
                ))
            })?;
        }
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            let _ = fs::write(
                &tag,
                "Signature: 8a477f597d28d172789f06886806bc55\n# This directory is the mpcs cache (see `mpcs gc`).\n",
            );
        }
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let base = root.join(FORMAT_DIR);
        Ok(Cache { root, base })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.base.join("entries")
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.base.join("entries").join(&key[..2]).join(key)
    }

    /// Directory holding an entry's output files.
    pub fn entry_out(&self, key: &str) -> PathBuf {
        self.entry_dir(key).join("out")
    }

    pub fn scratch_dir(&self, key: &str) -> PathBuf {
        self.base.join("scratch").join(key)
    }

    pub fn failed_log(&self, key: &str) -> PathBuf {
        self.base.join("failed").join(key).join("log.txt")
    }

    pub fn stat_dir(&self) -> PathBuf {
        self.base.join("stat")
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.base.join("journal")
    }

    /// One lock file per shard of keys (at most 256), one locked byte per key: no inode per key.
    fn lock_path(&self, key: &str) -> PathBuf {
        self.base.join("locks").join(&key[..2])
    }

    /// The manifest of a published entry, or None if there is no entry for `key`.
    pub fn lookup(&self, key: &str) -> Result<Option<Manifest>> {
        self.read_manifest(key)
    }

    /// The output digest and stat record of a published entry, or None if there is none. Reads the manifest
    /// without building its file list and action: the resolver asks this of every node of a DAG.
    pub fn lookup_head(&self, key: &str) -> Result<Option<EntryHead>> {
        self.read_manifest::<EntryHead>(key)
    }

    /// Whether entry `key` still holds what its manifest lists, before a node reads it. The stat digest recorded
    /// at publish is compared first (no file is read); only when it differs (a copied cache, a hard link made to
    /// a file, or damage) are the files re-hashed against the manifest, and an intact entry gets its stat record
    /// refreshed so the next check is cheap again.
    pub fn check_entry(&self, key: &str, recorded_stat: &str) -> EntryCheck {
        let out = self.entry_out(key);
        let now = match fingerprint::stat_digest(&out) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return EntryCheck::Damaged("out/ is gone".into()),
            Err(e) => return EntryCheck::Damaged(format!("{}: {e}", out.display())),
        };
        if !recorded_stat.is_empty() && now == recorded_stat {
            return EntryCheck::Intact(now);
        }
        let mut manifest = match self.lookup(key) {
            Ok(Some(m)) => m,
            Ok(None) => return EntryCheck::Damaged("its manifest is gone".into()),
            Err(e) => return EntryCheck::Damaged(e.message),
        };
        let files = match fingerprint::hash_outputs(&out) {
            Ok(f) => f,
            Err(e) => return EntryCheck::Damaged(e),
        };
        let damage = match first_difference(&manifest.files, &files) {
            None => None,
            Some(Difference::Missing(p)) => Some(format!("out/{p} is missing")),
            Some(Difference::Added(p)) => Some(format!("out/{p} was added after it was stored")),
            Some(Difference::Changed { path, was, now }) if was != now => {
                Some(format!("out/{path} is {now} bytes, {was} when it was stored"))
            }
            Some(Difference::Changed { path, .. }) => {
                Some(format!("out/{path} has other bytes than when it was stored"))
            }
        };
        if let Some(damage) = damage {
            return EntryCheck::Damaged(damage);
        }
        // Intact: remember this stat so the next check is cheap (best effort; a failure only costs a re-hash).
        manifest.stat = now.clone();
        if let Ok(bytes) = serde_json::to_vec_pretty(&manifest) {
            let _ = crate::fsutil::write_atomic(&self.entry_dir(key).join("manifest.json"), &bytes);
        }
        EntryCheck::Intact(now)
    }

    /// Removes a damaged entry (its key then counts as missing and the node runs again). The entry vanishes
    /// with one rename, so a reader sees it whole or not at all.
    /// Used for damaged entries, `gc` and `verify --remove`; the caller holds the key's lock where it can.
    pub fn remove_entry(&self, key: &str) -> Result<()> {
        let dir = self.entry_dir(key);
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let doomed = self.base.join("tmp").join(format!("{key}.removed.{}.{n}", std::process::id()));
        match fs::rename(&dir, &doomed) {
            Ok(()) => {
                let _ = fs::remove_dir_all(&doomed);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("cannot remove the damaged cache entry", &dir, e)),
        }
    }

    fn read_manifest<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let path = self.entry_dir(key).join("manifest.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::env(format!(
                    "cache entry {} has an unreadable manifest ({e}); run `mpcs verify --remove` to drop it",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("cannot read", &path, e)),
        }
    }

    /// Held (shared) by every `mpcs run` for as long as it runs, so `gc` can tell that entries are in use.
    pub fn hold_for_run(&self) -> Result<FileLock> {
        FileLock::shared(&self.base.join("locks").join("runs"))
    }

    /// For `gc`: the guarantee that no `mpcs run` uses the cache while entries are removed (None: one does).
    pub fn try_exclude_runs(&self) -> Result<Option<FileLock>> {
        FileLock::try_exclusive(&self.base.join("locks").join("runs"))
    }

    /// Takes the lock of `key` if nobody holds it. Whoever holds it is the only one computing that entry.
    pub fn try_lock(&self, key: &str) -> Result<Option<FileLock>> {
        // The byte: the key's next 15 hex digits (60 bits), so two keys collide only by a 2^-60 chance (and a
        // collision only makes two keys wait for each other).
        let offset = u64::from_str_radix(key.get(2..17).unwrap_or("0"), 16).unwrap_or(0);
        FileLock::try_exclusive_byte(&self.lock_path(key), offset)
    }

    /// Removes staging directories left by runs that died: each belongs to a key whose lock is free (a live
    /// writer holds its key's lock for as long as its staging directory exists). Called once per run.
    pub fn sweep_stale_staging(&self) {
        let Ok(rd) = fs::read_dir(self.base.join("tmp")) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.split('.').next().unwrap_or("");
            if key.len() == 32 && key.chars().all(|c| c.is_ascii_hexdigit()) {
                if let Ok(Some(_lock)) = self.try_lock(key) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// The process writing entry `key` on this machine, from its staging directory's name (`<key>.<pid>.<n>`).
    pub fn writer_of(&self, key: &str) -> Option<u32> {
        let rd = fs::read_dir(self.base.join("tmp")).ok()?;
        rd.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('.');
            (parts.next() == Some(key)).then(|| parts.next()?.parse().ok()).flatten()
        })
    }

    /// The logs in staging folders for `key`: of a writer at work, or of one killed before it could clean up.
    pub fn staging_logs(&self, key: &str) -> Vec<PathBuf> {
        let prefix = format!("{key}.");
        let Ok(rd) = fs::read_dir(self.base.join("tmp")) else { return Vec::new() };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join("log.txt"))
            .filter(|p| p.exists())
            .collect()
    }

    /// Starts writing an entry for `key`; the caller holds the key's lock.
    pub fn begin(&self, key: &str, _lock: &FileLock) -> Result<Staging> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.base.join("tmp").join(format!("{key}.{}.{n}", std::process::id()));
        let out = dir.join("out");
        fs::create_dir(&dir).and_then(|_| fs::create_dir(&out)).map_err(|e| Error::io("cannot create", &out, e))?;
        Ok(Staging { log: dir.join("log.txt"), dir, out })
    }

    /// The staged outputs, hashed: what `publish` records. An output that cannot be stored (a link that leaves
    /// the output folder or leads nowhere, an unreadable file) is the node's failure, not the run's.
    pub fn staged_files(&self, staging: &Staging) -> Result<Vec<FileDigest>, String> {
        fingerprint::hash_outputs(&staging.out)
    }

    /// Writes the manifest (with `manifest.files` from [`Cache::staged_files`]) and publishes the entry with one
    /// rename.
    /// Returns the manifest as published.
    pub fn publish(&self, staging: Staging, mut manifest: Manifest, _lock: &FileLock) -> Result<Manifest> {
        manifest.output_digest = fingerprint::tree_digest(&manifest.files);
        manifest.format = MANIFEST_FORMAT;
        fingerprint::make_read_only(&staging.out).map_err(|e| Error::io("cannot seal", &staging.out, e))?;
        manifest.stat =
            fingerprint::stat_digest(&staging.out).map_err(|e| Error::io("cannot read", &staging.out, e))?;
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::internal(e.to_string()))?;
        let mpath = staging.dir.join("manifest.json");
        fs::write(&mpath, bytes).map_err(|e| Error::io("cannot write", &mpath, e))?;
        let dest = self.entry_dir(&manifest.key);
        let mut renamed = fs::rename(&staging.dir, &dest);
        if matches!(&renamed, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            // First entry of this shard: create it (only then, since mkdir is slow on some filesystems).
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io("cannot create", parent, e))?;
            }
            renamed = fs::rename(&staging.dir, &dest);
        }
        match renamed {
            Ok(()) => {}
            // Published meanwhile by someone not holding our lock (should not happen): keep theirs.
            Err(_) if dest.join("manifest.json").exists() => {
                let _ = fs::remove_dir_all(&staging.dir);
            }
            Err(e) => return Err(Error::io("cannot publish cache entry", &dest, e)),
        }
        let _ = fs::remove_dir_all(self.base.join("failed").join(&manifest.key));
        Ok(manifest)
    }

    /// Throws a staged entry away, keeping its log as the key's last failure log. Returns that log's path.
    pub fn discard(&self, staging: Staging, key: &str) -> PathBuf {
        let failed = self.failed_log(key);
        if let Some(parent) = failed.parent() {
            let _ = fs::create_dir_all(parent);
        }
        if fs::rename(&staging.log, &failed).is_err() {
            let _ = fs::write(&failed, b"");
        }
        let _ = fs::remove_dir_all(&staging.dir);
        failed
    }

    /// Every published key (for gc and verify).
    pub fn all_keys(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let entries = self.entries_dir();
        let rd = fs::read_dir(&entries).map_err(|e| Error::io("cannot list", &entries, e))?;
        for shard in rd.flatten() {
            if let Ok(inner) = fs::read_dir(shard.path()) {
                for e in inner.flatten() {
                    keys.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Finds keys starting with `prefix` (at least 4 hex digits).
    pub fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(Vec::new());
        }
        let shard = self.entries_dir().join(&prefix[..2]);
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(shard) {
            for e in rd.flatten() {
                let k = e.file_name().to_string_lossy().into_owned();
                if k.starts_with(prefix) {
                    out.push(k);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The first way a tree's listing differs from the one its manifest recorded.
pub enum Difference<'a> {
    Missing(&'a str),
    Added(&'a str),
    Changed { path: &'a str, was: u64, now: u64 },
}

/// How `now` differs from `recorded` (None: it does not): a missing file first, then an added one, then a changed
/// one. `check_entry` (before a node reads an entry) and `mpcs verify` word it each in their own way.
pub fn first_difference<'a>(recorded: &'a [FileDigest], now: &'a [FileDigest]) -> Option<Difference<'a>> {
    use std::collections::BTreeMap;
    let by_path = |files: &'a [FileDigest]| -> BTreeMap<&'a str, &'a FileDigest> {
        files.iter().map(|f| (f.path.as_str(), f)).collect()
    };
    let (was, is) = (by_path(recorded), by_path(now));
    if let Some(p) = was.keys().find(|p| !is.contains_key(*p)) {
        return Some(Difference::Missing(p));
    }
    if let Some(p) = is.keys().find(|p| !was.contains_key(*p)) {
        return Some(Difference::Added(p));
    }
    was.iter().find(|(p, r)| is[*p] != **r).map(|(p, r)| Difference::Changed { path: p, was: r.size, now: is[p].size })
}

/// This machine's host name, for manifests.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}
