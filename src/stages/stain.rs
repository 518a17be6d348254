//! `stain_normalise`: normalises every image of its input to a target's stain (see `crate::stain`), keeping the
//! folder layout (outputs are PNG). The action key holds the target image's *content* digest, so editing the
//! target reruns the stage and renaming it does not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::{log_line, single_input, ExecContext, StageFailure};
use crate::error::Result;
use crate::experiment::{Experiment, SourceText, StageDecl};
use crate::stain::{normalise_dir_with, Method, Normaliser};

pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StainSpec {
    /// `macenko`, `reinhard` (HistomicsTK lαβ), `reinhard-lab` (CIE LAB) or `vahadane`.
    pub method: Spanned<String>,
    /// Target image, relative to the experiment file.
    pub target: Option<Spanned<String>>,
    /// Built-in target instead of an image: `bach` (Reinhard lαβ with the paper's BACH statistics) or
    /// `torchstain` (Macenko with torchstain's default reference).
    pub preset: Option<Spanned<String>>,
}

impl StainSpec {
    fn method(&self) -> Method {
        self.method.get_ref().parse().unwrap_or(Method::Macenko)
    }

    fn target_path(&self, dir: &Path) -> Option<PathBuf> {
        self.target.as_ref().map(|t| dir.join(t.get_ref()))
    }

    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        if decl.refs.is_empty() {
            return Err(src.error(decl.span.clone(), format!("stage `{}` needs `from` (the images)", decl.name), None));
        }
        if let Err(e) = self.method.get_ref().parse::<Method>() {
            return Err(src.error(
                self.method.span(),
                e.to_string(),
                Some("methods: macenko, reinhard, reinhard-lab, vahadane".into()),
            ));
        }
        match (&self.target, &self.preset) {
            (Some(_), Some(p)) => Err(src.error(p.span(), "give `target` or `preset`, not both", None)),
            (None, None) => Err(src.error(
                decl.span.clone(),
                format!("stage `{}` needs `target = \"image.png\"` or a `preset`", decl.name),
                Some("presets: bach (reinhard), torchstain (macenko)".into()),
            )),
            (None, Some(p)) => match (p.get_ref().as_str(), self.method()) {
                ("bach", Method::Reinhard) | ("torchstain", Method::Macenko) => Ok(()),
                (other, m) => Err(src.error(
                    p.span(),
                    format!("no preset `{other}` for method {m}"),
                    Some("presets: bach (with method = \"reinhard\"), torchstain (with method = \"macenko\")".into()),
                )),
            },
            (Some(t), None) => {
                let dir = src.path.parent().unwrap_or(Path::new("."));
                let p = dir.join(t.get_ref());
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

    pub fn key_params(&self, exp: &Experiment) -> BTreeMap<String, Value> {
        let mut p = BTreeMap::new();
        p.insert("method".into(), Value::String(self.method().as_str().into()));
        if let Some(preset) = &self.preset {
            p.insert("preset".into(), Value::String(preset.get_ref().clone()));
        }
        if let Some(path) = self.target_path(&exp.dir) {
            let digest = crate::cache::fingerprint::param_file_digest(&path);
            p.insert("target_blake3".into(), Value::String(digest));
        }
        p
    }

    fn normaliser(&self, exp: &Experiment) -> Result<Normaliser, String> {
        let method = self.method();
        if let Some(path) = self.target_path(&exp.dir) {
            return Normaliser::fit_file(method, &path).map_err(|e| e.to_string());
        }
        match self.preset.as_ref().map(|p| p.get_ref().as_str()) {
            Some("bach") => Ok(Normaliser::bach_reinhard()),
            Some("torchstain") => Ok(Normaliser::Macenko(crate::stain::macenko::Macenko::torchstain_default())),
            _ => Err("no stain target".into()),
        }
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let input = single_input(ctx, "stain_normalise")?;
        let norm = self.normaliser(ctx.exp).map_err(StageFailure)?;
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
                ctx.decl.name, counts.passed_through, counts.images
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
