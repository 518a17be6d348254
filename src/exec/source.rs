//! `source`: a local file or folder, used in place and fingerprinted by content (with a stat cache). Sources
//! are part of the engine rather than a registered kind: they are never executed, their identity is their
//! content digest.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::experiment::{Experiment, StageDecl};

pub const NAME: &str = "source";
pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// File or folder, relative to the experiment file.
    pub path: Spanned<String>,
}

impl SourceSpec {
    pub fn validate(&self, decl: &StageDecl, exp: &Experiment) -> Result<()> {
        let src = &exp.source;
        if let Some(r) = decl.refs.first() {
            return Err(src.error(
                r.span.clone(),
                format!("source stage `{}` cannot have `from`: a source reads a path, not other stages", decl.name),
                None,
            ));
        }
        if !decl.matrix.is_empty() {
            return Err(src.error(
                decl.span.clone(),
                format!("source stage `{}` cannot have a `matrix`", decl.name),
                Some("declare one source stage per path".into()),
            ));
        }
        if self.path.get_ref().trim().is_empty() {
            return Err(src.error(self.path.span(), "`path` is empty", None));
        }
        Ok(())
    }

    /// The absolute path, or a located error if it does not exist.
    pub fn resolve(&self, exp: &Experiment, decl: &StageDecl) -> Result<PathBuf> {
        let p = exp.resolve_path(self.path.get_ref());
        if !p.exists() {
            return Err(exp.source.error(
                self.path.span(),
                format!("source `{}`: {} does not exist", decl.name, p.display()),
                Some(format!("create it, fix `path`, or point it elsewhere with --set stage.{}.path=DIR", decl.name)),
            ));
        }
        let kind = std::fs::metadata(&p).map(|m| m.file_type()).map_err(|e| Error::io("cannot read", &p, e))?;
        if !(kind.is_file() || kind.is_dir()) {
            return Err(exp.source.error(
                self.path.span(),
                format!("source `{}`: {} is neither a file nor a folder", decl.name, p.display()),
                Some(
                    "a source is a regular file or a folder of files (a pipe or a device cannot be fingerprinted)"
                        .into(),
                ),
            ));
        }
        p.canonicalize().map_err(|e| Error::io("cannot resolve", &p, e))
    }

    /// Resolves and fingerprints the source: (path, content digest).
    pub fn fingerprint(&self, exp: &Experiment, decl: &StageDecl, cache: &Cache) -> Result<(PathBuf, String)> {
        let path = self.resolve(exp, decl)?;
        let fp = crate::cache::fingerprint::fingerprint_source(&path, &cache.stat_dir())?;
        Ok((path, fp.digest))
    }
}
