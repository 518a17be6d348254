//! Pull (remote → local entry) and push (local entry → remote).
//!
//! A pull writes into a staging folder of the local cache under the key's lock, checks every file's size and
//! blake3 against the record's manifest as it streams in, and publishes with the local cache's one rename: an
//! interrupted or damaged pull leaves nothing visible (the staging folder is swept by the next run). A push
//! uploads the blobs the remote lacks, then writes the record create-only: a record is never visible before
//! its blobs, and the first writer of a key wins where the server honours `If-None-Match`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path};

use futures::{StreamExt, TryStreamExt};
use object_store::{PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{root_cause, Remote, Stats, PARALLEL};
use crate::cache::fingerprint::tree_digest;
use crate::cache::{Cache, EntryCheck, Manifest};
use crate::error::{Error, Result};

const RECORD_FORMAT: u32 = 1;
/// Files larger than this go up as multipart uploads of [`PART_SIZE`] parts.
const MULTIPART_ABOVE: u64 = 32 << 20;
const PART_SIZE: usize = 16 << 20;
const PARTS_IN_FLIGHT: usize = 4;
/// Entries pulled at once by [`Remote::pull_many`] (each pull also fetches its files in parallel).
const PULL_THREADS: usize = 8;

/// What `ac/<key>` holds.
#[derive(Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub manifest: Manifest,
    /// The entry's `log.txt` in the content store.
    pub log: Option<Blob>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct Blob {
    pub blake3: String,
    pub size: u64,
}

impl Record {
    /// Every blob the record refers to, by digest (with its size).
    pub fn blobs(&self) -> BTreeMap<&str, u64> {
        let files = self.manifest.files.iter().map(|f| (f.blake3.as_str(), f.size));
        files.chain(self.log.iter().map(|b| (b.blake3.as_str(), b.size))).collect()
    }

    /// What is wrong with a record fetched for `key` (None: nothing), before any blob is fetched.
    fn problem(&self, key: &str) -> Option<String> {
        if self.format != RECORD_FORMAT {
            return Some(format!("its record has format {} (this mpcs reads {RECORD_FORMAT})", self.format));
        }
        if self.manifest.key != key {
            return Some(format!("its record is for another key ({})", self.manifest.key));
        }
        if tree_digest(&self.manifest.files) != self.manifest.output_digest {
            return Some("its record's file list does not match its output digest".into());
        }
        let digest_ok = |d: &str| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(b) = self.blobs().keys().find(|d| !digest_ok(d)) {
            return Some(format!("its record names a malformed digest `{b}`"));
        }
        if let Some(f) = self.manifest.files.iter().find(|f| !plain_relative(&f.path)) {
            return Some(format!("its record names a file outside the entry (`{}`)", f.path));
        }
        None
    }
}

/// A path inside an entry: relative, with no `..`, `.` or root.
fn plain_relative(p: &str) -> bool {
    !p.is_empty() && Path::new(p).components().all(|c| matches!(c, Component::Normal(_)))
}

/// How a pull ended.
pub enum Pull {
    /// Published locally.
    Pulled(Box<Manifest>),
    /// Another process here holds the key (computing or pulling it): the node goes the usual way.
    Busy,
    /// The remote has no record for the key.
    Absent,
    /// The remote entry is damaged, incomplete, or could not be fetched: nothing was published; why.
    Unusable(String),
}

/// How a push ended.
pub enum Push {
    Pushed {
        blobs: usize,
        bytes: u64,
    },
    /// The remote has a record for the key (this process's, or another writer's).
    AlreadyThere,
    /// Not pushed, and why (the run goes on).
    Skipped(String),
}

impl Remote {
    /// The record of `key`, or None if there is none.
    pub fn record(&self, key: &str) -> std::result::Result<Option<Record>, String> {
        self.runtime.block_on(self.fetch_record(key))
    }

    /// The records of `keys`, [`super::PARALLEL`] requests at a time; in the order of `keys`.
    pub fn records(&self, keys: &[&str]) -> Vec<std::result::Result<Option<Record>, String>> {
        self.runtime.block_on(
            futures::stream::iter(keys.iter()).map(|k| self.fetch_record(k)).buffered(PARALLEL).collect::<Vec<_>>(),
        )
    }

    pub(super) async fn fetch_record(&self, key: &str) -> std::result::Result<Option<Record>, String> {
        Stats::add(&self.stats.get, 1);
        let got = match self.store.get(&self.record_path(key)).await {
            Ok(r) => r.bytes().await.map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        let bytes = match got {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("cannot fetch its record: {}", root_cause(&e))),
        };
        Stats::add(&self.stats.bytes_down, bytes.len() as u64);
        serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("its record does not parse ({e})"))
    }

    /// Pulls entry `key` into `cache`.
    pub fn pull(&self, cache: &Cache, key: &str) -> Result<Pull> {
        let record = match self.record(key) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.forget_known(key);
                return Ok(Pull::Absent);
            }
            Err(why) => return Ok(Pull::Unusable(why)),
        };
        if let Some(why) = record.problem(key) {
            return Ok(Pull::Unusable(why));
        }
        let Some(lock) = cache.try_lock(key)? else { return Ok(Pull::Busy) };
        if let Some(m) = cache.lookup(key)? {
            return Ok(Pull::Pulled(Box::new(m)));
        }
        let staging = cache.begin(key, &lock)?;
        let mut wanted: Vec<(std::path::PathBuf, &str, u64)> =
            record.manifest.files.iter().map(|f| (staging.out.join(&f.path), f.blake3.as_str(), f.size)).collect();
        if let Some(log) = &record.log {
            wanted.push((staging.log.clone(), log.blake3.as_str(), log.size));
        }
        let fetched = self.runtime.block_on(
            futures::stream::iter(wanted.iter())
                .map(|(path, digest, size)| self.download(path, digest, *size))
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<()>>(),
        );
        if let Err(why) = fetched {
            let _ = std::fs::remove_dir_all(&staging.dir);
            self.damaged.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_string());
            return Ok(Pull::Unusable(why));
        }
        let manifest = cache.publish(staging, record.manifest, &lock)?;
        Ok(Pull::Pulled(Box::new(manifest)))
    }

    /// Pulls the entries of `keys` into `cache`, [`PULL_THREADS`] at a time; results in the order of `keys`.
    pub fn pull_many(&self, cache: &Cache, keys: &[&str]) -> Vec<Result<Pull>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<(usize, Result<Pull>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..PULL_THREADS.min(keys.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(key) = keys.get(n) else { break };
                            done.push((n, self.pull(cache, key)));
                        }
                        done
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
        });
        results.sort_by_key(|(n, _)| *n);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// Streams blob `digest` into `path`, checking its size and digest; the error says what was wrong.
    async fn download(&self, path: &Path, digest: &str, size: u64) -> std::result::Result<(), String> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let fail = |what: String| format!("blob {} ({name}): {what}", &digest[..12]);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
        }
        Stats::add(&self.stats.get, 1);
        let got = match self.store.get(&self.blob_path(digest)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(fail("missing from the remote".into())),
            Err(e) => return Err(fail(root_cause(&e).to_string())),
        };
        let mut file =
            std::fs::File::create(path).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        let mut hasher = blake3::Hasher::new();
        let mut n = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(|e| fail(root_cause(&e).to_string()))? {
            hasher.update(&chunk);
            n += chunk.len() as u64;
            file.write_all(&chunk).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        }
        Stats::add(&self.stats.bytes_down, n);
        if n != size {
            return Err(fail(format!("{n} bytes, the manifest says {size}")));
        }
        if hasher.finalize().to_hex().as_str() != digest {
            return Err(fail("its bytes do not match its digest (damaged or tampered with)".into()));
        }
        Ok(())
    }

    /// Pushes the local entry `key`: the blobs the remote lacks, then the record (create-only).
    pub fn push(&self, cache: &Cache, key: &str) -> Result<Push> {
        let repair = self.damaged.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
        if self.has(key) && !repair {
            return Ok(Push::AlreadyThere);
        }
        let Some(manifest) = cache.lookup(key)? else {
            return Ok(Push::Skipped("it has no entry in the local cache".into()));
        };
        // Never share damaged bytes: the same check a consumer makes before reading the entry.
        if let EntryCheck::Damaged(why) = cache.check_entry(key, &manifest.stat) {
            return Ok(Push::Skipped(format!("its local entry is damaged ({why}); `mpcs verify --remove` drops it")));
        }
        if let Err(why) = self.hold_push_lock() {
            return Ok(Push::Skipped(why));
        }
        let dir = cache.entry_dir(key);
        let log_bytes = std::fs::read(dir.join("log.txt")).ok();
        let log =
            log_bytes.as_ref().map(|b| Blob { blake3: blake3::hash(b).to_hex().to_string(), size: b.len() as u64 });
        let record = Record { format: RECORD_FORMAT, manifest, log };
        // Every distinct blob with a file that holds it.
        let mut sources: BTreeMap<String, (std::path::PathBuf, u64)> = BTreeMap::new();
        for f in &record.manifest.files {
            sources.entry(f.blake3.clone()).or_insert_with(|| (dir.join("out").join(&f.path), f.size));
        }
        if let Some(b) = &record.log {
            sources.entry(b.blake3.clone()).or_insert_with(|| (dir.join("log.txt"), b.size));
        }
        let uploaded = self.runtime.block_on(
            futures::stream::iter(sources.iter())
                .map(|(digest, (path, size))| self.upload_if_missing(digest, path, *size, repair))
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<Option<u64>>>(),
        );
        let uploaded = match uploaded {
            Ok(u) => u,
            Err(why) => return Ok(Push::Skipped(why)),
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| Error::internal(e.to_string()))?;
        Stats::add(&self.stats.put, 1);
        let put = self.runtime.block_on(self.store.put_opts(
            &self.record_path(key),
            PutPayload::from(bytes),
            PutOptions { mode: PutMode::Create, ..Default::default() },
        ));
        match put {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) if !repair => {
                self.note_known(key);
                return Ok(Push::AlreadyThere);
            }
            // The record stays the first writer's; its blobs were rewritten above.
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Ok(Push::Skipped(format!("cannot write its record: {}", root_cause(&e)))),
        }
        self.note_known(key);
        let sent: Vec<u64> = uploaded.into_iter().flatten().collect();
        Ok(Push::Pushed { blobs: sent.len(), bytes: sent.iter().sum() })
    }

    /// Streams a large file up as a multipart upload, [`PART_SIZE`] at a time (a few parts in flight), hashing as
    /// it reads: memory stays bounded whatever the file's size, and S3's 5 GB limit on one PUT does not apply. The
    /// object appears only when the upload completes; a file whose bytes no longer match `digest` aborts it.
    async fn upload_in_parts(
        &self,
        blob: &object_store::path::Path,
        digest: &str,
        path: &Path,
    ) -> std::result::Result<u64, String> {
        use std::io::Read;
        let fail = |what: String| format!("cannot upload blob {}: {what}", &digest[..12]);
        let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Stats::add(&self.stats.put, 1);
        let upload = self.store.put_multipart(blob).await.map_err(|e| fail(root_cause(&e)))?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let read = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(r) => r,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(format!("cannot read {}: {e}", path.display()));
                }
            };
            hasher.update(&buf[..read]);
            n += read as u64;
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(fail(root_cause(&e)));
            }
            writer.write(&buf[..read]);
        }
        if hasher.finalize().to_hex().as_str() != digest {
            let _ = writer.abort().await;
            return Err(format!("{} changed while it was being pushed", path.display()));
        }
        Stats::add(&self.stats.put, n.div_ceil(PART_SIZE as u64) + 1);
        writer.finish().await.map_err(|e| fail(root_cause(&e)))?;
        Ok(n)
    }

    /// Uploads `path` as blob `digest` unless the remote has it; Some(bytes) when it was uploaded. A blob of
    /// another size than `size` (left truncated by a server that died mid-write) is uploaded again.
    /// `rewrite`: upload even a blob that is there (to repair one found damaged).
    async fn upload_if_missing(
        &self,
        digest: &str,
        path: &Path,
        size: u64,
        rewrite: bool,
    ) -> std::result::Result<Option<u64>, String> {
        let blob = self.blob_path(digest);
        if !rewrite {
            Stats::add(&self.stats.head, 1);
            match self.store.head(&blob).await {
                Ok(meta) if meta.size == size => return Ok(None),
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(format!("cannot check blob {}: {}", &digest[..12], root_cause(&e))),
            }
        }
        let n = if size > MULTIPART_ABOVE {
            self.upload_in_parts(&blob, digest, path).await?
        } else {
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            // The entry was checked before the push; a file changed since would store bytes under a wrong name.
            if blake3::hash(&bytes).to_hex().as_str() != digest {
                return Err(format!("{} changed while it was being pushed", path.display()));
            }
            let n = bytes.len() as u64;
            Stats::add(&self.stats.put, 1);
            // One PUT: the object appears whole or not at all, so an interrupted upload leaves nothing.
            self.store
                .put(&blob, PutPayload::from(bytes))
                .await
                .map_err(|e| format!("cannot upload blob {}: {}", &digest[..12], root_cause(&e)))?;
            n
        };
        Stats::add(&self.stats.bytes_up, n);
        Ok(Some(n))
    }
}
