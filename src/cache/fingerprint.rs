//! Content fingerprints of file trees: node outputs and external sources.
//!
//! A tree's digest is blake3 over its sorted listing of (relative path, size, file blake3), so it depends only on
//! content and names, never on timestamps. For sources a stat cache maps (path, size, mtime, inode) → digest, so
//! an unchanged 4 GB dataset is not re-read on every run; a file whose mtime is within two seconds of the time the
//! stat cache was written is re-hashed anyway ("racy" entries, as git does), because a write in the same clock
//! tick would not change its stat.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One file of a tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    /// Path relative to the tree root, `/`-separated. For a single-file tree, the file name.
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// Digest of a listing (sorted by path).
pub fn tree_digest(files: &[FileDigest]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"mpcs-tree-v1\0");
    for f in files {
        h.update(f.path.as_bytes());
        h.update(b"\0");
        h.update(&f.size.to_le_bytes());
        h.update(f.blake3.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// blake3 of a file's bytes.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let meta = fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
    if meta.len() > 16 << 20 {
        // Large files: memory-map and hash with all cores.
        h.update_mmap_rayon(path).map_err(|e| Error::io("cannot read", path, e))?;
    } else {
        let mut f = fs::File::open(path).map_err(|e| Error::io("cannot read", path, e))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io("cannot read", path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// blake3 of a file that parameters refer to by path (a stain target, initial weights), computed once per
/// process and (path, size, mtime): action keys are computed for every node on every run, and 80 fine-tune nodes
/// sharing one 100 MB weights file must not hash it 80 times. Unreadable files give `"unreadable"` (the stage
/// then fails with the real error when it runs).
pub fn param_file_digest(path: &Path) -> String {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    /// (path, size, mtime in ns) → digest
    type Memo = HashMap<(PathBuf, u64, i128), String>;
    static MEMO: OnceLock<Mutex<Memo>> = OnceLock::new();
    let Ok(meta) = fs::metadata(path) else { return "unreadable".into() };
    let id = (path.to_path_buf(), meta.len(), i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()));
    let memo = MEMO.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(d) = memo.lock().ok().and_then(|m| m.get(&id).cloned()) {
        return d;
    }
    let d = hash_file(path).unwrap_or_else(|_| "unreadable".into());
    if let Ok(mut m) = memo.lock() {
        m.insert(id, d.clone());
    }
    d
}

/// A file found by a walk, with the stat fields the stat cache compares.
struct Walked {
    rel: String,
    abs: PathBuf,
    size: u64,
    mtime_ns: i128,
    /// Changes on every write and metadata change, even `cp -p` restoring an old mtime (git compares it too).
    ctime_ns: i128,
    ino: u64,
}

/// Every regular file under `root` (or `root` itself if it is a file), sorted by relative path. Symbolic links
/// are followed; a link cycle or a dangling link is an error.
fn walk(root: &Path, skip_caches: bool) -> Result<Vec<Walked>> {
    let meta = fs::metadata(root).map_err(|e| Error::io("cannot read", root, e))?;
    let mut out = Vec::new();
    if meta.is_file() {
        let rel = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        out.push(walked(rel, root.to_path_buf(), &meta));
        return Ok(out);
    }
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        if depth > 64 {
            return Err(Error::env(format!("{} is nested more than 64 levels deep (a symlink loop?)", dir.display())));
        }
        let rd = fs::read_dir(&dir).map_err(|e| Error::io("cannot list", &dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| Error::io("cannot list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let abs = entry.path();
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let meta = fs::metadata(&abs).map_err(|e| Error::io("cannot read", &abs, e))?;
            if meta.is_dir() {
                // A cache inside a source (`path = "."`) would change with every run and never converge.
                if skip_caches && abs.join("CACHEDIR.TAG").is_file() {
                    continue;
                }
                stack.push((abs, rel, depth + 1));
            } else if meta.is_file() {
                out.push(walked(rel, abs, &meta));
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

fn walked(rel: String, abs: PathBuf, meta: &fs::Metadata) -> Walked {
    Walked {
        rel,
        abs,
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        ino: meta.ino(),
    }
}

/// Hashes every file of a tree (in parallel) — used for node outputs, which are new bytes every time.
pub fn hash_tree(root: &Path) -> Result<Vec<FileDigest>> {
    let files = walk(root, false)?;
    files.par_iter().map(|w| Ok(FileDigest { path: w.rel.clone(), size: w.size, blake3: hash_file(&w.abs)? })).collect()
}

/// A node's staged output, hashed for its manifest. A symbolic link must stay inside the output (a link to a
/// file elsewhere would let the entry's content change after it was published) and lead somewhere; either
/// problem, or an unreadable file, is a message for the node's failure.
pub fn hash_outputs(root: &Path) -> std::result::Result<Vec<FileDigest>, String> {
    let inside = root.canonicalize().map_err(|e| format!("cannot read the output {}: {e}", root.display()))?;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in rd.flatten() {
            let path = entry.path();
            let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            let kind = entry.file_type().map_err(|e| format!("cannot read {shown}: {e}"))?;
            if kind.is_symlink() {
                let target = fs::read_link(&path).unwrap_or_default();
                match path.canonicalize() {
                    Err(_) => {
                        return Err(format!(
                            "the output {shown} is a symbolic link to {} that leads nowhere; write a file instead",
                            target.display()
                        ))
                    }
                    Ok(real) if !real.starts_with(&inside) => {
                        return Err(format!(
                            "the output {shown} is a symbolic link to {}, outside the node's output; its content \
                             could change after the entry is stored: copy the file into {{out}} instead",
                            real.display()
                        ))
                    }
                    Ok(_) => {}
                }
            } else if kind.is_dir() {
                stack.push(path);
            }
        }
    }
    hash_tree(root).map_err(|e| format!("its output cannot be stored: {e}"))
}

/// A digest of the stat of everything under a published entry's output (`lstat` of every file, folder and link:
/// name, type, size, mtime, ctime, inode), taken at publish. Recomputing it reads no file, yet any write,
/// truncation, creation, removal or rename below `root` changes it (ctime moves even when a writer restores the
/// mtime): the cheap check that an entry is still what its manifest says before a node reads it.
pub fn stat_digest(root: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(b"mpcs-stat-v1\0");
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        h.update(rel.as_bytes());
        h.update(b"\0");
        for n in
            [meta.mode() as i64, meta.size() as i64, meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec()]
        {
            h.update(&n.to_le_bytes());
        }
        h.update(&meta.ino().to_le_bytes());
        if meta.is_dir() {
            let mut names: Vec<_> =
                fs::read_dir(&path)?.map(|e| e.map(|e| e.file_name())).collect::<std::io::Result<_>>()?;
            // Popped in reverse: the walk visits names in sorted order, so the digest does not depend on readdir.
            names.sort_unstable_by(|a, b| b.cmp(a));
            for name in names {
                let child = if rel.is_empty() {
                    name.to_string_lossy().into_owned()
                } else {
                    format!("{rel}/{}", name.to_string_lossy())
                };
                stack.push((path.join(&name), child));
            }
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Makes every regular file under `root` read-only, so that a consumer that tries to append to its input gets
/// "Permission denied" instead of silently changing a published entry (root ignores this; the stat check
/// catches what it writes).
pub fn make_read_only(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let meta = entry.metadata()?;
                let mode = meta.permissions().mode();
                if mode & 0o222 != 0 {
                    fs::set_permissions(entry.path(), fs::Permissions::from_mode(mode & !0o222))?;
                }
            }
        }
    }
    Ok(())
}

#[derive(Default, Serialize, Deserialize)]
struct StatCache {
    /// When this cache was written (ns since the epoch); entries with an mtime close to it are not trusted.
    written_ns: i128,
    /// relative path → (size, mtime ns, inode, blake3, ctime ns)
    files: BTreeMap<String, (u64, i128, u64, String, i128)>,
}

/// The result of fingerprinting a source.
pub struct SourceFingerprint {
    pub digest: String,
    pub files: usize,
    pub bytes: u64,
    /// Bytes actually read (0 on a warm, unchanged re-check).
    pub hashed_bytes: u64,
}

const RACY_NS: i128 = 2_000_000_000;

/// Fingerprints an external source, re-hashing only files whose stat changed since the last time.
/// `stat_dir` holds one stat-cache file per source path.
pub fn fingerprint_source(path: &Path, stat_dir: &Path) -> Result<SourceFingerprint> {
    let abs = path.canonicalize().map_err(|e| Error::io("cannot resolve", path, e))?;
    let cache_file =
        stat_dir.join(format!("{}.json", &blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex()[..32]));
    let old: StatCache = fs::read(&cache_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let started_ns = now_ns();
    let files = walk(&abs, true)?;
    let results: Vec<(FileDigest, bool, i128, u64, i128)> = files
        .par_iter()
        .map(|w| {
            let cached = old.files.get(&w.rel).filter(|(size, mtime, ino, _, ctime)| {
                let same = *size == w.size && *mtime == w.mtime_ns && *ino == w.ino && *ctime == w.ctime_ns;
                same && w.mtime_ns < old.written_ns - RACY_NS
            });
            let (digest, hashed) = match cached {
                Some((_, _, _, d, _)) => (d.clone(), false),
                None => (hash_file(&w.abs)?, true),
            };
            let file = FileDigest { path: w.rel.clone(), size: w.size, blake3: digest };
            Ok((file, hashed, w.mtime_ns, w.ino, w.ctime_ns))
        })
        .collect::<Result<_>>()?;

    let hashed_bytes = results.iter().filter(|r| r.1).map(|r| r.0.size).sum();
    let listing: Vec<FileDigest> = results.iter().map(|r| r.0.clone()).collect();
    let digest = tree_digest(&listing);
    let changed = results.iter().any(|r| r.1) || old.files.len() != results.len();
    if changed {
        let new = StatCache {
            written_ns: started_ns,
            files: results.into_iter().map(|(f, _, m, i, c)| (f.path, (f.size, m, i, f.blake3, c))).collect(),
        };
        // Best effort: a failed write only costs a re-hash next time.
        let _ = fs::create_dir_all(stat_dir);
        if let Ok(bytes) = serde_json::to_vec(&new) {
            let _ = crate::fsutil::write_atomic(&cache_file, &bytes);
        }
    }
    Ok(SourceFingerprint { digest, files: listing.len(), bytes: listing.iter().map(|f| f.size).sum(), hashed_bytes })
}

fn now_ns() -> i128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_digest_depends_on_content_and_names_only() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("x.txt"), "hello").unwrap();
        fs::write(a.join("sub/y.txt"), "world").unwrap();
        let listing = hash_tree(&a).unwrap();
        assert_eq!(listing.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), vec!["sub/y.txt", "x.txt"]);
        assert_eq!(listing[1].blake3, blake3::hash(b"hello").to_hex().to_string());
        let d1 = tree_digest(&listing);
        fs::write(a.join("x.txt"), "hellO").unwrap();
        assert_ne!(d1, tree_digest(&hash_tree(&a).unwrap()));
        fs::write(a.join("x.txt"), "hello").unwrap();
        assert_eq!(d1, tree_digest(&hash_tree(&a).unwrap()));
        fs::rename(a.join("x.txt"), a.join("z.txt")).unwrap();
        assert_ne!(d1, tree_digest(&hash_tree(&a).unwrap()));
    }

    #[test]
    fn param_file_digest_is_the_content_hash_and_follows_edits() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("w.bin");
        fs::write(&f, b"weights").unwrap();
        assert_eq!(param_file_digest(&f), blake3::hash(b"weights").to_hex().to_string());
        fs::write(&f, b"other weights").unwrap();
        assert_eq!(param_file_digest(&f), blake3::hash(b"other weights").to_hex().to_string(), "size changed");
        assert_eq!(param_file_digest(&d.path().join("missing")), "unreadable");
    }

    #[test]
    fn stat_cache_skips_unchanged_files_and_catches_changes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("big.bin"), vec![7u8; 100_000]).unwrap();
        // Make the file old so it is not "racy".
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(src.join("big.bin")).unwrap().set_modified(old).unwrap();
        let stat = d.path().join("stat");
        let first = fingerprint_source(&src, &stat).unwrap();
        assert_eq!(first.hashed_bytes, 100_000);
        let second = fingerprint_source(&src, &stat).unwrap();
        assert_eq!(second.hashed_bytes, 0, "an unchanged file is not re-read");
        assert_eq!(first.digest, second.digest);
        // Same size, new bytes, the old mtime forced back (`cp -p`): same inode, size and mtime, but the ctime
        // moved, so the file is re-read (issue 13 S6).
        fs::write(src.join("big.bin"), vec![8u8; 100_000]).unwrap();
        fs::File::options().write(true).open(src.join("big.bin")).unwrap().set_modified(old).unwrap();
        let third = fingerprint_source(&src, &stat).unwrap();
        assert_eq!(third.hashed_bytes, 100_000);
        assert_ne!(third.digest, first.digest);
        // A cache inside a source (its CACHEDIR.TAG) is not part of the source (issue 13 S10).
        fs::create_dir_all(src.join("cache/v2")).unwrap();
        fs::write(src.join("cache/CACHEDIR.TAG"), "Signature: 8a477f597d28d172789f06886806bc55\n").unwrap();
        fs::write(src.join("cache/v2/entry"), "changes every run").unwrap();
        assert_eq!(fingerprint_source(&src, &stat).unwrap().digest, third.digest);
    }
}
