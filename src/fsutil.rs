//! Atomic file writes, shared by every module that writes a file readers may look at while it is being written.
//!
//! A file is written under a hidden temporary name in the same folder (so the final `rename` stays on one
//! filesystem and is atomic) and renamed over `path`: a reader sees the old file or the new one, whole, never
//! half of one. The temporary name is unique per process and per call, so threads and processes writing the
//! same path never share a temporary file; on any failure it is removed.
//!
//! A leaf module: it uses nothing else in the crate, and each caller maps the `io::Error` to its own error type.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Calls of [`temp_path_beside`] in this process; with the process id it makes every temporary name unique.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary path in the folder of `path`: `.<file name>.tmp.<pid>.<n>`, hidden, and different for
/// every call in every process (threads included).
pub fn temp_path_beside(path: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename. The parent folder must exist.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], for callers that stream: `write` gets the freshly created temporary file and writes
/// the whole content to it (flushing any buffer it wraps around the file). If `write`, or the rename, fails,
/// the temporary file is removed and `path` is left as it was.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_path_beside(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Every file in `dir`, by name, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_content_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        write_atomic(&p, b"a much longer first content").unwrap();
        write_atomic(&p, b"short").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
        write_atomic_with(&p, |f| {
            f.write_all(b"streamed ")?;
            f.write_all(b"in two parts")
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"streamed in two parts");
        assert_eq!(names(d.path()), ["a.txt"]);
    }

    #[test]
    fn temp_paths_are_hidden_beside_and_unique() {
        let p = Path::new("/some/dir/out.json");
        let a = temp_path_beside(p);
        let b = temp_path_beside(p);
        assert_ne!(a, b);
        assert_eq!(a.parent(), p.parent());
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".out.json.tmp."));
    }

    #[test]
    fn failure_removes_the_temporary_and_keeps_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |f| {
            f.write_all(b"half of the new")?;
            Err(io::Error::other("encoder failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "encoder failed");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(d.path()), ["a.txt"]);

        // The rename fails (the target is a non-empty folder): the temporary goes too.
        let folder = d.path().join("folder");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("inside"), b"x").unwrap();
        assert!(write_atomic(&folder, b"new").is_err());
        assert_eq!(names(d.path()), ["a.txt", "folder"]);

        // The parent folder is missing: nothing is created.
        assert!(write_atomic(&d.path().join("missing/a.txt"), b"new").is_err());
        assert_eq!(names(d.path()), ["a.txt", "folder"]);
    }

    #[test]
    fn concurrent_writers_leave_one_whole_content() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("shared.bin");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64 * 1024 + i as usize]).collect();
        std::thread::scope(|s| {
            for c in &contents {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic_with(p, |f| {
                            // Several writes, so the threads' writes interleave if they shared a file.
                            for part in c.chunks(4096) {
                                f.write_all(part)?;
                            }
                            Ok(())
                        })
                        .unwrap();
                    }
                });
            }
        });
        let mut got = Vec::new();
        File::open(&p).unwrap().read_to_end(&mut got).unwrap();
        assert!(contents.contains(&got), "the file is not one writer's whole content ({} bytes)", got.len());
        assert_eq!(names(d.path()), ["shared.bin"]);
    }
}
