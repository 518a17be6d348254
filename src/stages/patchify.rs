//! `patchify`: cuts every image of its input into grid patches (see `crate::patchify`), keeping the folder
//! layout, and writes `patches.csv` (patch, source image, position, augmentation, tissue fraction) so image-wise
//! metrics can vote over an image's patches.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{log_line, single_input, stage_error, write_output};
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};
use crate::patchify::{patchify_dir, Edge, PatchOptions};

pub struct Patchify;

impl StageKind for Patchify {
    type Spec = PatchifySpec;
    type Config = PatchifyConfig;
    const NAME: &'static str = "patchify";
    const VERSION: u32 = 1;

    fn validate(spec: &PatchifySpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(stage).map_err(|m| stage_error(exp, stage, m))
    }

    fn resolve(spec: &PatchifySpec, _node: &NodeView<'_>) -> Result<PatchifyConfig, String> {
        let o = spec.options();
        Ok(PatchifyConfig {
            size: o.size,
            stride: o.stride,
            edge: o.edge,
            min_tissue: o.min_tissue,
            augment: o.augment,
        })
    }

    fn execute(config: &PatchifyConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

/// The grid as it is cut (`overlap` resolved into `stride`).
#[derive(Serialize, Deserialize)]
pub struct PatchifyConfig {
    pub size: u32,
    pub stride: u32,
    pub edge: Edge,
    pub min_tissue: f64,
    pub augment: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchifySpec {
    /// Patch side in pixels.
    pub size: u32,
    /// Fraction of overlap between neighbouring patches (0 ≤ overlap < 1); default 0.
    pub overlap: Option<f64>,
    /// Step in pixels (instead of `overlap`).
    pub stride: Option<u32>,
    #[serde(default)]
    pub edge: Edge,
    /// Minimum fraction of tissue (non-white) pixels for a patch to be kept; default 0 (keep all).
    #[serde(default)]
    pub min_tissue: f64,
    /// BACH offline augmentation: six files per patch.
    #[serde(default)]
    pub augment: bool,
}

impl PatchifySpec {
    fn options(&self) -> PatchOptions {
        let stride =
            self.stride.unwrap_or_else(|| PatchOptions::stride_from_overlap(self.size, self.overlap.unwrap_or(0.0)));
        PatchOptions { size: self.size, stride, edge: self.edge, min_tissue: self.min_tissue, augment: self.augment }
    }

    fn validate(&self, decl: &StageDecl) -> Result<(), &'static str> {
        if decl.refs.is_empty() {
            return Err("a patchify stage needs `from` (the images to cut)");
        }
        if self.size == 0 {
            return Err("`size` must be at least 1");
        }
        if self.overlap.is_some() && self.stride.is_some() {
            return Err("give `overlap` or `stride`, not both");
        }
        if self.overlap.is_some_and(|o| !(0.0..1.0).contains(&o)) {
            return Err("`overlap` is a fraction: 0 ≤ overlap < 1");
        }
        if self.stride == Some(0) {
            return Err("`stride` must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.min_tissue) {
            return Err("`min_tissue` is a fraction between 0 and 1");
        }
        Ok(())
    }
}

impl PatchifyConfig {
    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let input = single_input(ctx, "patchify")?;
        let options = PatchOptions {
            size: self.size,
            stride: self.stride,
            edge: self.edge,
            min_tissue: self.min_tissue,
            augment: self.augment,
        };
        let (records, dropped) = patchify_dir(input, ctx.out, &options).map_err(StageFailure)?;
        if records.is_empty() {
            return Err(StageFailure(format!(
                "no patch kept from {} ({dropped} had less than {:.0}% tissue); lower `min_tissue`",
                input.display(),
                self.min_tissue * 100.0
            )));
        }
        let mut csv = String::from("file,source,index,x,y,width,height,augmentation,tissue_fraction\n");
        for r in &records {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{},{:.4}\n",
                r.file, r.source, r.index, r.x, r.y, r.width, r.height, r.augmentation, r.tissue_fraction
            ));
        }
        write_output(ctx, "patches.csv", csv)?;
        let sources: std::collections::BTreeSet<&str> = records.iter().map(|r| r.source.as_str()).collect();
        log_line(
            ctx,
            &format!(
                "{} patches from {} images ({dropped} dropped for too little tissue)",
                records.len(),
                sources.len()
            ),
        );
        Ok(serde_json::json!({"patches": records.len(), "images": sources.len(), "dropped": dropped}))
    }
}
