//! `mpcs gc` and `mpcs verify`.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use rayon::prelude::*;

use super::fingerprint::{hash_tree, tree_digest};
use super::{first_difference, Cache, Difference, FORMAT_DIR};
use crate::error::Result;

#[derive(Debug, Default)]
pub struct GcReport {
    pub kept: usize,
    pub removed: Vec<String>,
    pub bytes_freed: u64,
    /// Entries not reached but locked by a running `mpcs run`, left alone.
    pub busy: usize,
    /// Folders of older cache formats (`v1/`), which this mpcs never reads: removed whole.
    pub old_formats: Vec<String>,
}

/// Removes every entry whose key is not in `keep` (and the scratch, failure logs and stale staging directories
/// that belong to no live key). An entry is removed only while holding its lock, by renaming it out of the
/// entries tree first, so a concurrent run never sees half of one.
pub fn gc(cache: &Cache, keep: &HashSet<String>, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    for key in cache.all_keys()? {
        if keep.contains(&key) {
            report.kept += 1;
            continue;
        }
        let dir = cache.entry_dir(&key);
        let size = dir_size(&dir);
        if dry_run {
            report.removed.push(key);
            report.bytes_freed += size;
            continue;
        }
        let Some(_lock) = cache.try_lock(&key)? else {
            report.busy += 1;
            continue;
        };
        if dir.exists() && cache.remove_entry(&key).is_ok() {
            report.removed.push(key);
            report.bytes_freed += size;
        }
    }
    remove_old_formats(cache, dry_run, &mut report);
    if !dry_run {
        // Scratch and failure logs of keys nobody reaches, and staging directories of runs that died.
        for sub in ["scratch", "failed", "tmp"] {
            let d = cache.root().join(FORMAT_DIR).join(sub);
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = name.split('.').next().unwrap_or("").to_string();
                if key.len() != 32 || (sub != "tmp" && keep.contains(&key)) {
                    continue;
                }
                if let Ok(Some(_lock)) = cache.try_lock(&key) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }
    Ok(report)
}

/// Folders of other cache formats (`v<N>` beside the current one): no key of this mpcs can reach them.
fn remove_old_formats(cache: &Cache, dry_run: bool, report: &mut GcReport) {
    let Ok(rd) = fs::read_dir(cache.root()) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let versioned = name.strip_prefix('v').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !versioned || name == FORMAT_DIR || !e.path().is_dir() {
            continue;
        }
        let size = dir_size(&e.path());
        if dry_run || fs::remove_dir_all(e.path()).is_ok() {
            report.bytes_freed += size;
            report.old_formats.push(name);
        }
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: usize,
    /// (key, what is wrong)
    pub corrupt: Vec<(String, String)>,
    pub removed: usize,
}

/// Re-hashes every entry against its manifest. With `remove`, corrupt entries are deleted (under their lock)
/// so the next run recomputes them.
pub fn verify(cache: &Cache, remove: bool) -> Result<VerifyReport> {
    let keys = cache.all_keys()?;
    let problems: Vec<(String, Option<String>)> =
        keys.par_iter().map(|key| (key.clone(), check_entry(cache, key))).collect();
    let mut report = VerifyReport { checked: keys.len(), ..Default::default() };
    for (key, problem) in problems {
        if let Some(p) = problem {
            if remove {
                if let Ok(Some(_lock)) = cache.try_lock(&key) {
                    if cache.entry_dir(&key).exists() && cache.remove_entry(&key).is_ok() {
                        report.removed += 1;
                    }
                }
            }
            report.corrupt.push((key, p));
        }
    }
    Ok(report)
}

fn check_entry(cache: &Cache, key: &str) -> Option<String> {
    let m = match cache.lookup(key) {
        Ok(Some(m)) => m,
        Ok(None) => return Some("manifest.json is missing".into()),
        Err(e) => return Some(e.to_string()),
    };
    if m.key != key {
        return Some(format!("manifest says key {} but sits under {key}", m.key));
    }
    let files = match hash_tree(&cache.entry_out(key)) {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot read its files: {e}")),
    };
    match first_difference(&m.files, &files) {
        Some(Difference::Missing(p)) => return Some(format!("file {p} is missing")),
        Some(Difference::Added(p)) => return Some(format!("file {p} was added after publishing")),
        Some(Difference::Changed { path, was, now }) => {
            return Some(format!("file {path} changed (size {was} → {now}, content differs)"))
        }
        None => {}
    }
    if tree_digest(&files) != m.output_digest {
        return Some("output digest does not match the manifest".into());
    }
    None
}
