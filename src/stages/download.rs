//! `download`: fetches a URL (http, https, file) into the cache, resuming an interrupted transfer from the
//! node's scratch area, checking a pinned digest and unpacking archives (see `crate::download`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::{log_line, ExecContext, StageFailure};
use crate::download::{fetch, Digest, FetchOptions};
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};

pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadSpec {
    pub url: Spanned<String>,
    pub sha256: Option<Spanned<String>>,
    pub blake3: Option<Spanned<String>>,
    /// Unpack .tar.gz/.tgz/.tar/.zip (default: when the file name says it is an archive).
    pub unpack: Option<bool>,
    /// Name of the stored file (default: the URL's last segment).
    pub filename: Option<String>,
}

impl DownloadSpec {
    fn digest(&self) -> Option<Result<Digest, String>> {
        match (&self.sha256, &self.blake3) {
            (Some(s), _) => Some(Digest::sha256(s.get_ref()).map_err(|e| e.to_string())),
            (None, Some(b)) => Some(Digest::blake3(b.get_ref()).map_err(|e| e.to_string())),
            (None, None) => None,
        }
    }

    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        if let Some(r) = decl.refs.first() {
            return Err(src.error(r.span.clone(), format!("download stage `{}` cannot have `from`", decl.name), None));
        }
        if self.sha256.is_some() && self.blake3.is_some() {
            let span = self.blake3.as_ref().map(|b| b.span()).unwrap_or(0..0);
            return Err(src.error(span, "give either `sha256` or `blake3`, not both", None));
        }
        if let Some(Err(e)) = self.digest() {
            let span = self.sha256.as_ref().or(self.blake3.as_ref()).map(|s| s.span()).unwrap_or(0..0);
            return Err(src.error(span, e, Some("a digest is 64 hexadecimal characters".into())));
        }
        let url = self.url.get_ref();
        if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("file://")) {
            return Err(src.error(
                self.url.span(),
                format!("`url` must start with http://, https:// or file:// (got `{url}`)"),
                Some("for a local folder use kind = \"source\" with `path`".into()),
            ));
        }
        Ok(())
    }

    pub fn key_params(&self) -> BTreeMap<String, Value> {
        let mut p = BTreeMap::new();
        p.insert("url".into(), Value::String(self.url.get_ref().clone()));
        if let Some(Ok(d)) = self.digest() {
            p.insert(d.algo.name().into(), Value::String(d.hex.clone()));
        }
        if let Some(u) = self.unpack {
            p.insert("unpack".into(), Value::Bool(u));
        }
        if let Some(f) = &self.filename {
            p.insert("filename".into(), Value::String(f.clone()));
        }
        p
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let mut opts = FetchOptions::new(self.url.get_ref().clone());
        opts.digest = self.digest().transpose().map_err(StageFailure)?;
        opts.unpack = self.unpack;
        opts.filename = self.filename.clone();
        opts.cancel = Some(Arc::clone(ctx.cancel));
        let progress = |done: u64, total: Option<u64>| {
            (ctx.progress)(done, total, "bytes");
        };
        std::fs::create_dir_all(&ctx.scratch).map_err(|e| StageFailure(format!("cannot create scratch: {e}")))?;
        // `fetch` wants an absent or empty output directory and builds beside it.
        let fetched = fetch(&opts, ctx.out, &ctx.scratch, &progress).map_err(|e| StageFailure(e.to_string()))?;
        log_line(
            ctx,
            &format!("downloaded {} ({} bytes, {} resumed)", self.url.get_ref(), fetched.bytes, fetched.resumed_from),
        );
        if let Some(hint) = fetched.pin_hint() {
            (ctx.notice)(&format!("stage `{}`: {hint}", ctx.decl.name));
            log_line(ctx, &hint);
        }
        Ok(serde_json::json!({
            "url": self.url.get_ref(),
            "bytes": fetched.bytes,
            "resumed_from": fetched.resumed_from,
            "files": fetched.files.len(),
            fetched.digest.algo.name(): fetched.digest.hex,
            "pinned": fetched.pinned,
        }))
    }
}
