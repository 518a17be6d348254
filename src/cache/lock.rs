//! Advisory locks: whole-file `flock`, and byte-range open-file-description locks (`F_OFD_SETLK`) so that one
//! file can hold a lock per cache key without a file per key. The kernel drops both when the holder dies,
//! however it dies, so a crashed run never leaves a stale lock for a person to remove.

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

    /// Takes the exclusive lock on byte `offset` of `path` if nobody holds it. Locks on different bytes of one
    /// file are independent, and each belongs to its own open file (not to the process), like `flock`'s.
    pub fn try_exclusive_byte(path: &Path, offset: u64) -> Result<Option<FileLock>> {
        let file = open(path)?;
        // SAFETY: a zeroed flock is a valid argument; the fields that matter are set below.
        let mut range: libc::flock = unsafe { std::mem::zeroed() };
        range.l_type = libc::F_WRLCK as libc::c_short;
        range.l_whence = libc::SEEK_SET as libc::c_short;
        range.l_start = (offset & (i64::MAX as u64 >> 1)) as libc::off_t;
        range.l_len = 1;
        loop {
            // SAFETY: fcntl on a valid descriptor owned by `file` with a valid flock struct.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &range) };
            if r == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::EACCES) => return Ok(None),
                _ => return Err(Error::io("cannot lock", path, err)),
            }
        }
    }

    /// Waits for a shared lock on `path`.
    pub fn shared(path: &Path) -> Result<FileLock> {
        let file = open(path)?;
        flock(&file, libc::LOCK_SH).map_err(|e| Error::io("cannot lock", path, e))?;
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::FileLock;

    #[test]
    fn byte_locks_exclude_per_byte_even_within_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ab");
        let held = FileLock::try_exclusive_byte(&path, 7).unwrap().expect("free");
        assert!(FileLock::try_exclusive_byte(&path, 7).unwrap().is_none(), "the same byte is taken (another thread)");
        let other = FileLock::try_exclusive_byte(&path, 8).unwrap();
        assert!(other.is_some(), "another key's byte is independent");
        drop(held);
        assert!(FileLock::try_exclusive_byte(&path, 7).unwrap().is_some(), "released on drop");
    }
}
