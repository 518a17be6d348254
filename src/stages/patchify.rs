//! `patchify`: cuts every image of its input into grid patches (see `crate::patchify`), keeping the folder
//! layout, and writes `patches.csv` (patch, source image, position, augmentation, tissue fraction) so image-wise
//! metrics can vote over an image's patches.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{log_line, single_input, ExecContext, StageFailure};
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};
use crate::patchify::{patchify_dir, Edge, PatchOptions};

pub const VERSION: u32 = 1;

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

    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        let bad = |msg: &str| Err(src.error(decl.span.clone(), format!("stage `{}`: {msg}", decl.name), None));
        if decl.refs.is_empty() {
            return bad("a patchify stage needs `from` (the images to cut)");
        }
        if self.size == 0 {
            return bad("`size` must be at least 1");
        }
        if self.overlap.is_some() && self.stride.is_some() {
            return bad("give `overlap` or `stride`, not both");
        }
        if let Some(o) = self.overlap {
            if !(0.0..1.0).contains(&o) {
                return bad("`overlap` is a fraction: 0 ≤ overlap < 1");
            }
        }
        if self.stride == Some(0) {
            return bad("`stride` must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.min_tissue) {
            return bad("`min_tissue` is a fraction between 0 and 1");
        }
        Ok(())
    }

    pub fn key_params(&self) -> BTreeMap<String, Value> {
        let o = self.options();
        let mut p = BTreeMap::new();
        p.insert("size".into(), Value::from(o.size));
        p.insert("stride".into(), Value::from(o.stride));
        p.insert("edge".into(), serde_json::to_value(o.edge).unwrap_or_default());
        p.insert(
            "min_tissue".into(),
            serde_json::Number::from_f64(o.min_tissue).map(Value::Number).unwrap_or_default(),
        );
        p.insert("augment".into(), Value::Bool(o.augment));
        p
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let input = single_input(ctx, "patchify")?;
        let (records, dropped) = patchify_dir(input, ctx.out, &self.options()).map_err(StageFailure)?;
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
        std::fs::write(ctx.out.join("patches.csv"), csv)
            .map_err(|e| StageFailure(format!("cannot write patches.csv: {e}")))?;
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
