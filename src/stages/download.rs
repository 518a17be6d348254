//! `download`: fetches a URL (http, https, file) into the cache, resuming an interrupted transfer from the
//! node's scratch area, checking a pinned digest and unpacking archives (see `crate::download`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

use super::log_line;
use crate::download::{fetch, Digest, DigestAlgo, FetchOptions};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};

pub struct Download;

impl StageKind for Download {
    type Spec = DownloadSpec;
    type Config = DownloadConfig;
    const NAME: &'static str = "download";
    const VERSION: u32 = 1;

    fn validate(spec: &DownloadSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(stage, exp)
    }

    fn resolve(spec: &DownloadSpec, _node: &NodeView<'_>) -> Result<DownloadConfig, String> {
        let digest = spec.digest().transpose()?;
        Ok(DownloadConfig {
            url: spec.url.get_ref().clone(),
            sha256: digest.as_ref().filter(|d| d.algo == DigestAlgo::Sha256).map(|d| d.hex.clone()),
            blake3: digest.as_ref().filter(|d| d.algo == DigestAlgo::Blake3).map(|d| d.hex.clone()),
            unpack: spec.unpack,
            filename: spec.filename.clone(),
        })
    }

    fn execute(config: &DownloadConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

/// A download as it runs. `unpack` and `filename` stay optional: their defaults come from the URL.
#[derive(Serialize, Deserialize)]
pub struct DownloadConfig {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpack: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

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

    pub fn validate(&self, decl: &StageDecl, exp: &Experiment) -> Result<()> {
        let src = &exp.source;
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
}

impl DownloadConfig {
    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let mut opts = FetchOptions::new(self.url.clone());
        opts.digest = match (&self.sha256, &self.blake3) {
            (Some(s), _) => Some(Digest::sha256(s).map_err(|e| StageFailure(e.to_string()))?),
            (None, Some(b)) => Some(Digest::blake3(b).map_err(|e| StageFailure(e.to_string()))?),
            (None, None) => None,
        };
        opts.unpack = self.unpack;
        opts.filename = self.filename.clone();
        opts.cancel = Some(Arc::clone(ctx.cancel));
        let progress = |done: u64, total: Option<u64>| {
            (ctx.progress)(done, total, "bytes");
        };
        std::fs::create_dir_all(&ctx.scratch)
            .map_err(|e| StageFailure(format!("cannot create {}: {e}", ctx.scratch.display())))?;
        // `fetch` wants an absent or empty output directory and builds beside it.
        let fetched = fetch(&opts, ctx.out, &ctx.scratch, &progress).map_err(|e| StageFailure(e.to_string()))?;
        log_line(ctx, &format!("downloaded {} ({} bytes, {} resumed)", self.url, fetched.bytes, fetched.resumed_from));
        if let Some(hint) = fetched.pin_hint() {
            (ctx.notice)(&format!("stage `{}`: {hint}", ctx.stage_name()));
            log_line(ctx, &hint);
        }
        Ok(serde_json::json!({
            "url": self.url,
            "bytes": fetched.bytes,
            "resumed_from": fetched.resumed_from,
            "files": fetched.files.len(),
            fetched.digest.algo.name(): fetched.digest.hex,
            "pinned": fetched.pinned,
        }))
    }
}
