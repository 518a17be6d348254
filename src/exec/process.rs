//! Child processes of running nodes, so an interrupt can end their process groups.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct ProcessRegistry {
    next: AtomicU64,
    pids: Mutex<HashMap<u64, i32>>,
}

impl ProcessRegistry {
    pub fn register(&self, pid: i32) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.pids.lock() {
            p.insert(token, pid);
        }
        token
    }

    pub fn unregister(&self, token: u64) {
        if let Ok(mut p) = self.pids.lock() {
            p.remove(&token);
        }
    }

    /// Sends `signal` to the process group of every registered child.
    pub fn signal_all(&self, signal: i32) {
        if let Ok(p) = self.pids.lock() {
            for &pid in p.values() {
                // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
                unsafe {
                    libc::kill(-pid, signal);
                }
            }
        }
    }
}
