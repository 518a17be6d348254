//! Pushes the entries a run computes, on threads of their own, so an upload never holds up the scheduler.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;

use super::{Push, Remote};
use crate::cache::Cache;

/// What a run's pushes came to.
#[derive(Debug, Default, Serialize)]
pub struct PushTally {
    pub pushed: usize,
    /// Entries another writer had pushed first.
    pub already_there: usize,
    pub blobs_uploaded: usize,
    pub bytes_uploaded: u64,
    /// Why each entry that was not pushed was not ("node: reason").
    pub not_pushed: Vec<String>,
}

pub struct Pusher {
    remote: Arc<Remote>,
    tx: Option<mpsc::Sender<(String, String)>>,
    workers: Vec<JoinHandle<PushTally>>,
}

/// Entries pushed at once: each push is a few round trips (check the blobs, upload the missing ones, write the
/// record), so one at a time leaves a run waiting on the network long after its last node.
const PUSH_THREADS: usize = 8;

impl Pusher {
    pub fn start(remote: Arc<Remote>, cache: Cache) -> Pusher {
        let (tx, rx) = mpsc::channel::<(String, String)>();
        let rx = Arc::new(Mutex::new(rx));
        let workers: Vec<JoinHandle<PushTally>> = (0..PUSH_THREADS)
            .filter_map(|n| {
                let (remote, cache, rx) = (Arc::clone(&remote), cache.clone(), Arc::clone(&rx));
                std::thread::Builder::new()
                    .name(format!("mpcs-push-{n}"))
                    .spawn(move || {
                        let mut tally = PushTally::default();
                        loop {
                            let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok((node, key)) = next else { break };
                            tally.add(&node, remote.push(&cache, &key));
                        }
                        tally
                    })
                    .ok()
            })
            .collect();
        // Without a worker thread (none could start) nothing is queued: the run goes on unpushed.
        let tx = (!workers.is_empty()).then_some(tx);
        Pusher { remote, tx, workers }
    }

    /// Queues the entry of `node` (key `key`) for pushing.
    pub fn push(&self, node: &str, key: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((node.to_string(), key.to_string()));
        }
    }

    /// Waits for the queued pushes to end, then gives up this process's push lock.
    pub fn finish(mut self) -> PushTally {
        self.tx.take();
        let mut total = PushTally::default();
        for w in self.workers.drain(..) {
            let t = w.join().unwrap_or_default();
            total.pushed += t.pushed;
            total.already_there += t.already_there;
            total.blobs_uploaded += t.blobs_uploaded;
            total.bytes_uploaded += t.bytes_uploaded;
            total.not_pushed.extend(t.not_pushed);
        }
        self.remote.release_push_lock();
        total
    }
}

impl PushTally {
    fn add(&mut self, node: &str, push: crate::error::Result<Push>) {
        match push {
            Ok(Push::Pushed { blobs, bytes }) => {
                self.pushed += 1;
                self.blobs_uploaded += blobs;
                self.bytes_uploaded += bytes;
            }
            Ok(Push::AlreadyThere) => self.already_there += 1,
            Ok(Push::Skipped(why)) => self.not_pushed.push(format!("{node}: {why}")),
            Err(e) => self.not_pushed.push(format!("{node}: {}", e.message)),
        }
    }
}
