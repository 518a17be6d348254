//! Advisory file locks (flock). The kernel drops them when the holder dies, however it dies, so a crashed run
//! never leaves a stale lock for a person to remove.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// A held lock; released on drop (or when the process ends).
pub struct FileLock {
    _file: File,
}

fn open(path: &Path) -> Result<File> {
    // Rust opens files close-on-exec, so child processes never inherit (and so never keep) the lock.
    let open = || OpenOptions::new().create(true).truncate(false).write(true).open(path);
    match open() {
        Ok(f) => Ok(f),
        // The shard directory is created on first use only: mkdir is slow on some filesystems.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io("cannot create lock directory", parent, e))?;
            }
            open().map_err(|e| Error::io("cannot open lock file", path, e))
        }
        Err(e) => Err(Error::io("cannot open lock file", path, e)),
    }
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a valid open file descriptor owned by `file`.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl FileLock {
    /// Takes the exclusive lock if nobody holds it.
    pub fn try_exclusive(path: &Path) -> Result<Option<FileLock>> {
        let file = open(path)?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("cannot lock", path, e)),
        }
    }

    /// Waits for a shared lock on `path`.
    pub fn shared(path: &Path) -> Result<FileLock> {
        let file = open(path)?;
        flock(&file, libc::LOCK_SH).map_err(|e| Error::io("cannot lock", path, e))?;
        Ok(FileLock { _file: file })
    }
}
