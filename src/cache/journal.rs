//! The run journal: one append-only JSON-lines file per experiment, one line per node whose recorded state
//! changed (a new key, a failure). It answers "what did this node look like last time?" for `mpcs graph --why`
//! and the "failed last time" state. It is never rewritten per node (that is what makes DVC's `dvc.lock`
//! quadratic); when it grows to several times the number of nodes it is compacted once, under a lock.
//! A line torn by a crash is skipped on reading. Entries, not the journal, are the truth about what is cached.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Cache, FileLock};
use crate::error::{Error, Result};
use crate::plan::key::Action;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub node: String,
    pub status: Status,
    pub key: String,
    pub action: Action,
    /// Output digest, when the node succeeded.
    #[serde(default)]
    pub digest: Option<String>,
    pub time_unix: f64,
    /// The failure log, when it failed.
    #[serde(default)]
    pub log: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Record {
    /// A node that succeeded (or was found cached) with output `digest`.
    pub fn ok(node: &str, key: String, action: Action, digest: &str) -> Record {
        Record {
            node: node.to_string(),
            status: Status::Ok,
            key,
            action,
            digest: Some(digest.to_string()),
            time_unix: now_unix(),
            log: None,
            error: None,
        }
    }

    /// A node that failed, with the log of the attempt.
    pub fn failed(node: &str, action: Action, log: Option<&std::path::Path>, error: &str) -> Record {
        Record {
            node: node.to_string(),
            status: Status::Failed,
            key: action.key(),
            action,
            digest: None,
            time_unix: now_unix(),
            log: log.map(|p| p.to_string_lossy().into_owned()),
            error: Some(error.to_string()),
        }
    }
}

pub struct Journal {
    path: PathBuf,
    lock_path: PathBuf,
}

impl Journal {
    /// The journal of the experiment named `name` in the file `file`: two checkouts of one experiment (same
    /// name, other folders) keep separate journals, so `--why` compares a run with its own history.
    pub fn open(cache: &Cache, name: &str, file: &Path) -> Journal {
        let safe: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let file = file.canonicalize().unwrap_or_else(|_| file.to_path_buf());
        let id = blake3::hash(file.as_os_str().as_encoded_bytes()).to_hex();
        Journal::at(&cache.journal_dir().join(format!("{safe}-{}.jsonl", &id[..12])))
    }

    /// The journal in the file `path` (`<cache>/v2/journal/<name>-<id>.jsonl`).
    pub fn at(path: &Path) -> Journal {
        Journal { path: path.to_path_buf(), lock_path: path.with_extension("lock") }
    }

    /// The latest record of every node.
    pub fn load(&self) -> Result<HashMap<String, Record>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(Error::io("cannot read journal", &self.path, e)),
        };
        let mut latest = HashMap::new();
        let mut lines = 0usize;
        for line in text.lines() {
            lines += 1;
            if let Ok(r) = serde_json::from_str::<Record>(line) {
                latest.insert(r.node.clone(), r);
            }
        }
        if lines > 4 * latest.len() + 1000 {
            self.compact(&latest);
        }
        Ok(latest)
    }

    /// Appends records, each as one `write` of a whole line.
    pub fn append(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let _shared = FileLock::shared(&self.lock_path)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(|e| Error::io("cannot open journal", &self.path, e))?;
        // A line torn by a crash must not swallow the next record: start on a fresh line. (Live writers append
        // whole lines in one write each, so a last byte other than a newline can only be a torn line.)
        let mut batch = Vec::new();
        if !ends_with_newline(&mut f) {
            batch.push(b'\n');
        }
        for r in records {
            batch.extend(serde_json::to_vec(r).map_err(|e| Error::internal(e.to_string()))?);
            batch.push(b'\n');
        }
        f.write_all(&batch).map_err(|e| Error::io("cannot append to journal", &self.path, e))
    }

    fn compact(&self, latest: &HashMap<String, Record>) {
        let Ok(Some(_lock)) = FileLock::try_exclusive(&self.lock_path) else {
            return;
        };
        // Re-read under the lock: another run may have appended since.
        let Ok(text) = fs::read_to_string(&self.path) else {
            return;
        };
        let mut current: HashMap<String, Record> = latest.clone();
        for line in text.lines() {
            if let Ok(r) = serde_json::from_str::<Record>(line) {
                current.insert(r.node.clone(), r);
            }
        }
        let mut records: Vec<&Record> = current.values().collect();
        records.sort_by(|a, b| a.time_unix.total_cmp(&b.time_unix));
        let mut out = Vec::new();
        for r in records {
            if let Ok(mut l) = serde_json::to_vec(r) {
                l.push(b'\n');
                out.extend_from_slice(&l);
            }
        }
        let _ = crate::fsutil::write_atomic(&self.path, &out);
    }
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Whether the file is empty or ends with a newline.
fn ends_with_newline(f: &mut fs::File) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut last = [b'\n'];
    match f.seek(SeekFrom::End(-1)) {
        Ok(_) => f.read_exact(&mut last).is_err() || last[0] == b'\n',
        Err(_) => true,
    }
}
