//! `mpcs gc --remote`, and the locks that keep it from removing what a concurrent push is writing.
//!
//! A blob a push has just uploaded (or found already there) is referenced by no record until the push writes
//! its record, so garbage collection and pushes must not overlap. Both announce themselves with an object
//! under `locks/` and then list `locks/` (as restic does): whichever lists second sees the other, because
//! S3 lists are strongly consistent. A pusher that sees a collector skips its push (the run goes on; `mpcs push`
//! later); a collector that sees a live pusher stops before removing anything. A pusher refreshes its lock
//! before a push when it is older than [`PUSH_REFRESH`]; a lock older than [`PUSH_STALE`] (a pusher that died)
//! no longer stops a collector.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::PutPayload;

use super::{last_segment, root_cause, Remote, Stats, PARALLEL};
use crate::error::{Error, Result};

/// A pusher rewrites its lock before a push once it is this old.
const PUSH_REFRESH: Duration = Duration::from_secs(10 * 60);
/// A push lock not rewritten for this long belongs to a process that is gone.
const PUSH_STALE: Duration = Duration::from_secs(30 * 60);
/// A collector's lock counts for this long (a collection of a very large remote may take a while).
const GC_STALE: Duration = Duration::from_secs(6 * 3600);

static LOCK_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
pub struct RemoteGcReport {
    pub records_kept: usize,
    pub records_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

fn lock_name(kind: &str) -> String {
    let n = LOCK_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{kind}.{}.{}.{nanos}.{n}", crate::cache::hostname(), std::process::id())
}

impl Remote {
    fn put_lock(&self, name: &str) -> std::result::Result<(), String> {
        Stats::add(&self.stats.put, 1);
        let body = format!("{{\"host\":\"{}\",\"pid\":{}}}\n", crate::cache::hostname(), std::process::id());
        self.runtime
            .block_on(self.store.put(&self.path(&format!("locks/{name}")), PutPayload::from(body.into_bytes())))
            .map(|_| ())
            .map_err(|e| format!("cannot write the lock {name}: {}", root_cause(&e)))
    }

    fn delete_lock(&self, name: &str) {
        Stats::add(&self.stats.delete, 1);
        let _ = self.runtime.block_on(self.store.delete(&self.path(&format!("locks/{name}"))));
    }

    /// Live locks of `kind` other than `mine`: names younger than `stale`.
    fn live_locks(&self, kind: &str, mine: &str, stale: Duration) -> std::result::Result<Vec<String>, String> {
        let now = unix_now();
        let locks = self.list("locks/").map_err(|e| format!("cannot list locks: {}", root_cause(&e)))?;
        Ok(locks
            .into_iter()
            .filter(|m| now - m.last_modified.timestamp() < stale.as_secs() as i64)
            .map(|m| last_segment(&m.location))
            .filter(|n| n != mine && n.starts_with(&format!("{kind}.")))
            .collect())
    }

    /// Takes (or refreshes) this process's push lock; Err when a collector is at work.
    pub(super) fn hold_push_lock(&self) -> std::result::Result<(), String> {
        let mut held = self.push_lock.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_some_and(|(_, at)| at.elapsed() < PUSH_REFRESH) {
            return Ok(());
        }
        let name = held.as_ref().map(|(n, _)| n.clone()).unwrap_or_else(|| lock_name("push"));
        self.put_lock(&name)?;
        let collectors = self.live_locks("gc", &name, GC_STALE)?;
        if let Some(gc) = collectors.first() {
            self.delete_lock(&name);
            *held = None;
            return Err(format!(
                "`mpcs gc --remote` is collecting garbage on {} (lock {gc}); not pushed: run `mpcs push EXP` when \
                 it has finished",
                self.url
            ));
        }
        *held = Some((name, Instant::now()));
        Ok(())
    }

    /// Removes this process's push lock (at the end of a run or a push).
    pub fn release_push_lock(&self) {
        let held = self.push_lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((name, _)) = held {
            self.delete_lock(&name);
        }
    }

    /// Removes every record whose key is not in `keep`, then every blob no remaining record refers to.
    /// Refuses (removing nothing) while another process pushes or collects.
    pub fn gc(&self, keep: &HashSet<String>, dry_run: bool) -> Result<RemoteGcReport> {
        let name = lock_name("gc");
        if !dry_run {
            self.put_lock(&name).map_err(Error::env)?;
        }
        let result = self.collect(keep, dry_run, &name);
        if !dry_run {
            self.delete_lock(&name);
        }
        result
    }

    fn collect(&self, keep: &HashSet<String>, dry_run: bool, mine: &str) -> Result<RemoteGcReport> {
        let busy = |what: &str, locks: Vec<String>| {
            Error::env(format!(
                "{} has {what} at work ({}); gc --remote removed nothing: run it again when they have finished \
                 (a lock of a process that died stops counting after {} min)",
                self.url,
                locks.join(", "),
                PUSH_STALE.as_secs() / 60
            ))
        };
        let pushers = self.live_locks("push", mine, PUSH_STALE).map_err(Error::env)?;
        if !pushers.is_empty() && !dry_run {
            return Err(busy("a push", pushers));
        }
        let others = self.live_locks("gc", mine, GC_STALE).map_err(Error::env)?;
        if !others.is_empty() && !dry_run {
            return Err(busy("another gc", others));
        }
        let io = |e: object_store::Error| Error::env(format!("gc --remote on {}: {}", self.url, root_cause(&e)));
        let records = self.list("ac/").map_err(io)?;
        let (kept, doomed): (Vec<_>, Vec<_>) =
            records.into_iter().map(|m| last_segment(&m.location)).partition(|k| keep.contains(k));
        // Blobs still referred to: those of the records that stay.
        let referenced: Vec<HashSet<String>> = self
            .runtime
            .block_on(
                futures::stream::iter(kept.iter())
                    .map(|k| async move {
                        self.fetch_record(k).await.map(|r| {
                            r.map(|r| r.blobs().keys().map(|d| d.to_string()).collect::<HashSet<_>>())
                                .unwrap_or_default()
                        })
                    })
                    .buffer_unordered(PARALLEL)
                    .try_collect(),
            )
            .map_err(|why| Error::env(format!("gc --remote on {}: a kept entry: {why}; removed nothing", self.url)))?;
        let referenced: HashSet<String> = referenced.into_iter().flatten().collect();
        let blobs = self.list("cas/").map_err(io)?;
        let unreferenced: Vec<_> =
            blobs.into_iter().filter(|m| !referenced.contains(&last_segment(&m.location))).collect();
        let report = RemoteGcReport {
            records_kept: kept.len(),
            records_removed: doomed.len(),
            blobs_removed: unreferenced.len(),
            bytes_freed: unreferenced.iter().map(|m| m.size).sum(),
        };
        if dry_run {
            return Ok(report);
        }
        // Records first: a blob is removed only once no record refers to it.
        self.delete_all(doomed.iter().map(|k| self.record_path(k)).collect()).map_err(io)?;
        for k in &doomed {
            self.forget_known(k);
        }
        self.delete_all(unreferenced.into_iter().map(|m| m.location).collect()).map_err(io)?;
        Ok(report)
    }

    fn delete_all(&self, paths: Vec<object_store::path::Path>) -> std::result::Result<(), object_store::Error> {
        Stats::add(&self.stats.delete, paths.len() as u64);
        self.runtime.block_on(
            futures::stream::iter(paths)
                .map(|p| async move {
                    match self.store.delete(&p).await {
                        Err(object_store::Error::NotFound { .. }) => Ok(()),
                        r => r,
                    }
                })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<()>>(),
        )?;
        Ok(())
    }
}

/// Seconds since the epoch, as the servers' `Last-Modified` counts them.
fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
