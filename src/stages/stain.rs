//! `stain_normalise`: normalises every image of its input to a target's stain (see `crate::stain`), keeping the
//! folder layout (outputs are PNG). The action key holds the target image's *content* digest, so editing the
//! target reruns the stage and renaming it does not.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

use super::{log_line, parsed, single_input};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};
use crate::stain::{normalise_dir_with, Method, Normaliser};

pub struct StainNormalise;

impl StageKind for StainNormalise {
    type Spec = StainSpec;
    type Config = StainConfig;
    const NAME: &'static str = "stain_normalise";
    const VERSION: u32 = 1;
    const LOCATIONS: &'static [&'static str] = &["target"];

    fn validate(spec: &StainSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(stage, exp)
    }

    fn resolve(spec: &StainSpec, node: &NodeView<'_>) -> Result<StainConfig, String> {
        let target = spec.target.as_ref().map(|t| t.get_ref().as_str());
        Ok(StainConfig {
            method: spec.method,
            preset: spec.preset.as_ref().map(|p| p.get_ref().clone()),
            target_blake3: target.map(|t| node.file_digest(t)),
            target: target.map(|t| node.exp.resolve_path(t)),
        })
    }

    fn execute(config: &StainConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

/// The normalisation as it runs: the target counts by content (`target_blake3`); its path only locates it.
#[derive(Serialize, Deserialize)]
pub struct StainConfig {
    pub method: Method,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_blake3: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StainSpec {
    /// `macenko`, `reinhard` (HistomicsTK lαβ), `reinhard-lab` (CIE LAB) or `vahadane`.
    #[serde(deserialize_with = "parsed")]
    pub method: Method,
    /// Target image, relative to the experiment file.
    pub target: Option<Spanned<String>>,
    /// Built-in target instead of an image: `bach` (Reinhard lαβ with the paper's BACH statistics) or
    /// `torchstain` (Macenko with torchstain's default reference).
    pub preset: Option<Spanned<String>>,
}

impl StainSpec {
    pub fn validate(&self, decl: &StageDecl, exp: &Experiment) -> Result<()> {
        let src = &exp.source;
        if decl.refs.is_empty() {
            return Err(src.error(decl.span.clone(), format!("stage `{}` needs `from` (the images)", decl.name), None));
        }
        match (&self.target, &self.preset) {
            (Some(_), Some(p)) => Err(src.error(p.span(), "give `target` or `preset`, not both", None)),
            (None, None) => Err(src.error(
                decl.span.clone(),
                format!("stage `{}` needs `target = \"image.png\"` or a `preset`", decl.name),
                Some("presets: bach (reinhard), torchstain (macenko)".into()),
            )),
            (None, Some(p)) => match (p.get_ref().as_str(), self.method) {
                ("bach", Method::Reinhard) | ("torchstain", Method::Macenko) => Ok(()),
                (other, m) => Err(src.error(
                    p.span(),
                    format!("no preset `{other}` for method {m}"),
                    Some("presets: bach (with method = \"reinhard\"), torchstain (with method = \"macenko\")".into()),
                )),
            },
            (Some(t), None) => {
                let p = exp.resolve_path(t.get_ref());
                if !p.is_file() {
                    return Err(src.error(
                        t.span(),
                        format!("stain target {} does not exist", p.display()),
                        Some("give an image path relative to the experiment file".into()),
                    ));
                }
                Ok(())
            }
        }
    }
}

impl StainConfig {
    fn normaliser(&self) -> Result<Normaliser, String> {
        let method = self.method;
        if let Some(path) = &self.target {
            return Normaliser::fit_file(method, path).map_err(|e| e.to_string());
        }
        match self.preset.as_deref() {
            Some("bach") => Ok(Normaliser::bach_reinhard()),
            Some("torchstain") => Ok(Normaliser::Macenko(crate::stain::macenko::Macenko::torchstain_default())),
            _ => Err("no stain target".into()),
        }
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let input = single_input(ctx, "stain_normalise")?;
        let norm = self.normaliser().map_err(StageFailure)?;
        let done = std::sync::atomic::AtomicU64::new(0);
        let progress = |_: &Path, _: bool| {
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            (ctx.progress)(n, None, "images");
        };
        let counts = normalise_dir_with(&norm, input, ctx.out, &progress).map_err(|e| StageFailure(e.to_string()))?;
        if counts.images == 0 {
            return Err(StageFailure(format!("no images (png, jpg, tif) under {}", input.display())));
        }
        if counts.passed_through > 0 {
            (ctx.notice)(&format!(
                "stage `{}`: {} of {} images had almost no tissue and were passed through unchanged",
                ctx.stage_name(),
                counts.passed_through,
                counts.images
            ));
        }
        log_line(ctx, &format!("{} images normalised ({} passed through)", counts.images, counts.passed_through));
        Ok(serde_json::json!({
            "images": counts.images,
            "passed_through": counts.passed_through,
            "target": norm.target(),
        }))
    }
}
