//! Unpack `.tar.gz`/`.tgz`, `.tar` and `.zip` into an empty directory, refusing anything that could write or point
//! outside it: absolute names, `..` components, links whose target leaves the tree, special files.
//!
//! Symlinks are created last, after every regular file and directory: while files are written no symlink exists
//! in the tree, so no write can be redirected through one. Each symlink target is checked lexically when created and
//! then, once all exist, resolved for real (a chain of in-tree links can still leave the tree lexically unnoticed).

use super::DownloadError;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::{Component, Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveKind {
    TarGz,
    Tar,
    Zip,
}

impl ArchiveKind {
    /// Known archive extensions (case-insensitive): `.tar.gz`, `.tgz`, `.tar`, `.zip`.
    pub fn from_name(name: &str) -> Option<ArchiveKind> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if lower.ends_with(".tar") {
            Some(ArchiveKind::Tar)
        } else if lower.ends_with(".zip") {
            Some(ArchiveKind::Zip)
        } else {
            None
        }
    }

    /// Recognise an archive by its first bytes, for `unpack = true` on a name without a known extension.
    pub(crate) fn sniff(path: &Path) -> Option<ArchiveKind> {
        let mut head = [0u8; 262];
        let mut file = File::open(path).ok()?;
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => return None,
            }
        }
        let head = &head[..n];
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(ArchiveKind::TarGz)
        } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            Some(ArchiveKind::Zip)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            Some(ArchiveKind::Tar)
        } else {
            None
        }
    }
}

/// Unpack `archive` into `dest`, an existing empty directory. On error `dest` may hold a partial tree: the caller
/// unpacks into a temporary directory and deletes it on failure.
pub(crate) fn unpack(kind: ArchiveKind, archive: &Path, dest: &Path) -> Result<(), DownloadError> {
    let file = File::open(archive).map_err(|e| DownloadError::io("cannot open", archive, e))?;
    let mut ctx = Unpacker { archive: archive.display().to_string(), dest: dest.to_path_buf(), symlinks: Vec::new() };
    match kind {
        ArchiveKind::TarGz => ctx.tar(tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file))))?,
        ArchiveKind::Tar => ctx.tar(tar::Archive::new(io::BufReader::new(file)))?,
        ArchiveKind::Zip => ctx.zip(file)?,
    }
    ctx.make_symlinks()
}

struct Unpacker {
    archive: String,
    dest: PathBuf,
    /// (link path relative to dest, target as stored), created at the end.
    symlinks: Vec<(PathBuf, PathBuf)>,
}

impl Unpacker {
    fn unsafe_entry(&self, entry: &Path, reason: impl Into<String>) -> DownloadError {
        DownloadError::UnsafeEntry {
            archive: self.archive.clone(),
            entry: entry.display().to_string(),
            reason: reason.into(),
        }
    }

    fn bad(&self, reason: impl std::fmt::Display) -> DownloadError {
        DownloadError::BadArchive { archive: self.archive.clone(), reason: reason.to_string() }
    }

    /// The entry's path relative to dest, or the reason it is refused. `None` means the archive root itself (`./`).
    fn relative(&self, raw: &Path) -> Result<Option<PathBuf>, DownloadError> {
        let mut rel = PathBuf::new();
        for c in raw.components() {
            match c {
                Component::Normal(p) => rel.push(p),
                Component::CurDir => {}
                Component::ParentDir => return Err(self.unsafe_entry(raw, "its path contains `..`")),
                Component::RootDir | Component::Prefix(_) => return Err(self.unsafe_entry(raw, "its path is absolute")),
            }
        }
        Ok((!rel.as_os_str().is_empty()).then_some(rel))
    }

    fn dir(&self, rel: &Path) -> Result<(), DownloadError> {
        let path = self.dest.join(rel);
        fs::create_dir_all(&path).map_err(|e| DownloadError::io("cannot create directory", path, e))
    }

    fn file(&self, rel: &Path, data: &mut dyn Read) -> Result<(), DownloadError> {
        let path = self.dest.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| DownloadError::io("cannot create directory", parent, e))?;
        }
        // A repeated name replaces the earlier entry (tar semantics); removing first also unshares a hard link.
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if meta.is_dir() {
                return Err(self.bad(format!("{} is both a directory and a file", rel.display())));
            }
            let _ = fs::remove_file(&path);
        }
        let mut out = File::create(&path).map_err(|e| DownloadError::io("cannot create", &path, e))?;
        io::copy(data, &mut out).map_err(|e| match e.kind() {
            // Reading the entry failed: a corrupt or truncated archive rather than a disk problem.
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidInput => {
                self.bad(format!("{}: {e}", rel.display()))
            }
            _ => DownloadError::io("cannot write", &path, e),
        })?;
        Ok(())
    }

    /// Queue a symlink after checking that its target, taken relative to the link's directory, stays in the tree.
    fn queue_symlink(&mut self, rel: PathBuf, target: PathBuf) -> Result<(), DownloadError> {
        if target.is_absolute() {
            return Err(self.unsafe_entry(&rel, format!("symlink to the absolute path {}", target.display())));
        }
        let mut depth = rel.parent().map_or(0, |p| p.components().count());
        for c in target.components() {
            match c {
                Component::Normal(_) => depth += 1,
                Component::CurDir => {}
                Component::ParentDir if depth > 0 => depth -= 1,
                _ => {
                    return Err(
                        self.unsafe_entry(&rel, format!("symlink to {} points outside the archive", target.display()))
                    )
                }
            }
        }
        self.symlinks.push((rel, target));
        Ok(())
    }

    /// A hard link to an entry already unpacked; its target is a path from the archive root.
    fn hardlink(&self, rel: &Path, target: &Path) -> Result<(), DownloadError> {
        let Some(target_rel) = self.relative(target).map_err(|_| {
            self.unsafe_entry(rel, format!("hard link to {} points outside the archive", target.display()))
        })?
        else {
            return Err(self.unsafe_entry(rel, "hard link to the archive root"));
        };
        let source = self.dest.join(&target_rel);
        match fs::symlink_metadata(&source) {
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(self.bad(format!(
                    "hard link {} -> {}: the target is not a file unpacked before it",
                    rel.display(),
                    target.display()
                )))
            }
        }
        let path = self.dest.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| DownloadError::io("cannot create directory", parent, e))?;
        }
        let _ = fs::remove_file(&path);
        fs::hard_link(&source, &path).map_err(|e| DownloadError::io("cannot hard-link", path, e))
    }

    fn tar<R: Read>(&mut self, mut archive: tar::Archive<R>) -> Result<(), DownloadError> {
        use tar::EntryType as T;
        let entries = archive.entries().map_err(|e| self.bad(e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.bad(e))?;
            let raw = entry.path().map_err(|e| self.bad(e))?.into_owned();
            let kind = entry.header().entry_type();
            // Metadata records (pax, GNU long names) are folded into the next entry by the tar crate; skip leftovers.
            if matches!(kind, T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink) {
                continue;
            }
            let rel = self.relative(&raw)?;
            match (kind, rel) {
                (T::Directory, None) => {}
                (T::Directory, Some(rel)) => self.dir(&rel)?,
                (_, None) => return Err(self.unsafe_entry(&raw, "a non-directory entry names the archive root")),
                (T::Regular | T::Continuous | T::GNUSparse, Some(rel)) => self.file(&rel, &mut entry)?,
                (T::Symlink, Some(rel)) => {
                    let target = entry.link_name().map_err(|e| self.bad(e))?;
                    let target = target.ok_or_else(|| self.bad(format!("symlink {} has no target", raw.display())))?;
                    self.queue_symlink(rel, target.into_owned())?
                }
                (T::Link, Some(rel)) => {
                    let target = entry.link_name().map_err(|e| self.bad(e))?;
                    let target =
                        target.ok_or_else(|| self.bad(format!("hard link {} has no target", raw.display())))?;
                    self.hardlink(&rel, &target)?
                }
                (other, Some(_)) => return Err(self.unsafe_entry(&raw, format!("special file of type {other:?}"))),
            }
        }
        Ok(())
    }

    fn zip<R: Read + Seek>(&mut self, reader: R) -> Result<(), DownloadError> {
        let mut archive = zip::ZipArchive::new(reader).map_err(|e| self.bad(e))?;
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i).map_err(|e| self.bad(e))?;
            let name = entry.name().map_err(|e| self.bad(e))?.into_owned();
            // Zip names use `/`; a `\` is a Windows separator that tools on other systems would honour.
            let raw = PathBuf::from(name.replace('\\', "/"));
            let rel = self.relative(&raw)?;
            if entry.is_dir() {
                if let Some(rel) = rel {
                    self.dir(&rel)?;
                }
                continue;
            }
            let Some(rel) = rel else {
                return Err(self.unsafe_entry(&raw, "a file entry names the archive root"));
            };
            if entry.is_symlink() {
                let mut target = String::new();
                entry.read_to_string(&mut target).map_err(|e| self.bad(format!("symlink {name}: {e}")))?;
                self.queue_symlink(rel, PathBuf::from(target))?;
            } else {
                self.file(&rel, &mut entry)?;
            }
        }
        Ok(())
    }

    fn make_symlinks(&self) -> Result<(), DownloadError> {
        for (rel, target) in &self.symlinks {
            // The link's own directory must not run through a symlink made just before.
            let mut prefix = self.dest.clone();
            for c in rel.parent().into_iter().flat_map(Path::components) {
                prefix.push(c);
                if fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(self.unsafe_entry(rel, "its path goes through a symlink"));
                }
            }
            let path = self.dest.join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| DownloadError::io("cannot create directory", parent, e))?;
            }
            if fs::symlink_metadata(&path).is_ok() {
                return Err(self.bad(format!("symlink {} collides with another entry", rel.display())));
            }
            symlink(target, &path)?;
        }
        // Resolve each link for real now that all exist; a dangling one cannot be proven to stay inside.
        let root = fs::canonicalize(&self.dest).map_err(|e| DownloadError::io("cannot resolve", &self.dest, e))?;
        for (rel, target) in &self.symlinks {
            match fs::canonicalize(self.dest.join(rel)) {
                Ok(real) if real.starts_with(&root) => {}
                Ok(real) => {
                    return Err(self.unsafe_entry(
                        rel,
                        format!("symlink to {} resolves outside the archive ({})", target.display(), real.display()),
                    ))
                }
                Err(_) => {
                    return Err(self.unsafe_entry(
                        rel,
                        format!("symlink to {} does not resolve to an unpacked entry", target.display()),
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(unix)]
fn symlink(target: &Path, path: &Path) -> Result<(), DownloadError> {
    std::os::unix::fs::symlink(target, path).map_err(|e| DownloadError::io("cannot create symlink", path, e))
}

#[cfg(not(unix))]
fn symlink(_target: &Path, path: &Path) -> Result<(), DownloadError> {
    Err(DownloadError::io(
        "cannot create symlink",
        path,
        io::Error::new(io::ErrorKind::Unsupported, "symlinks in archives are only supported on unix"),
    ))
}
