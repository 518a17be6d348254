//! Pushes the entries a run computes, on a thread of its own, so an upload never holds up the scheduler.

use std::sync::{mpsc, Arc};
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
    tx: Option<mpsc::Sender<(String, String)>>,
    handle: Option<JoinHandle<PushTally>>,
}

impl Pusher {
    pub fn start(remote: Arc<Remote>, cache: Cache) -> Pusher {
        let (tx, rx) = mpsc::channel::<(String, String)>();
        let handle = std::thread::Builder::new()
            .name("mpcs-push".into())
            .spawn(move || {
                let mut tally = PushTally::default();
                for (node, key) in rx {
                    match remote.push(&cache, &key) {
                        Ok(Push::Pushed { blobs, bytes }) => {
                            tally.pushed += 1;
                            tally.blobs_uploaded += blobs;
                            tally.bytes_uploaded += bytes;
                        }
                        Ok(Push::AlreadyThere) => tally.already_there += 1,
                        Ok(Push::Skipped(why)) => tally.not_pushed.push(format!("{node}: {why}")),
                        Err(e) => tally.not_pushed.push(format!("{node}: {}", e.message)),
                    }
                }
                remote.release_push_lock();
                tally
            })
            .ok();
        Pusher { tx: handle.as_ref().map(|_| tx), handle }
    }

    /// Queues the entry of `node` (key `key`) for pushing.
    pub fn push(&self, node: &str, key: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((node.to_string(), key.to_string()));
        }
    }

    /// Waits for the queued pushes to end.
    pub fn finish(mut self) -> PushTally {
        self.tx.take();
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}
