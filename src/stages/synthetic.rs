//! `synthetic`: generates a synthetic dataset in a real layout (BreakHis, BACH, breast cell); see
//! `crate::data::synth`. The seed defaults to the node's seed.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::{log_line, ExecContext, StageFailure};
use crate::data::synth::{generate_with, parse_size, SynthOptions};
use crate::data::Dataset;
use crate::error::Result;
use crate::experiment::{SourceText, StageDecl};
use crate::plan::Node;

pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// `breakhis`, `bach` or `breast-cell`.
    pub dataset: Spanned<String>,
    pub seed: Option<u64>,
    /// BreakHis: patients; BACH and breast cell: images per class.
    pub patients: Option<usize>,
    /// `WIDTHxHEIGHT` (default: the real size).
    pub size: Option<Spanned<String>>,
    pub regions_per_patient: Option<usize>,
    pub partial_regions: Option<bool>,
}

impl SyntheticSpec {
    pub fn validate(&self, decl: &StageDecl, src: &SourceText) -> Result<()> {
        if let Some(r) = decl.refs.first() {
            return Err(src.error(r.span.clone(), format!("synthetic stage `{}` cannot have `from`", decl.name), None));
        }
        if let Err(e) = self.dataset.get_ref().parse::<Dataset>() {
            return Err(src.error(self.dataset.span(), e.to_string(), None));
        }
        if let Some(s) = &self.size {
            if let Err(e) = parse_size(s.get_ref()) {
                return Err(src.error(s.span(), e.to_string(), None));
            }
        }
        if self.patients == Some(0) || self.regions_per_patient == Some(0) {
            return Err(src.error(decl.span.clone(), "`patients` and `regions_per_patient` must be at least 1", None));
        }
        Ok(())
    }

    pub fn options(&self, node: &Node) -> SynthOptions {
        let kind = self.dataset.get_ref().parse::<Dataset>().unwrap_or(Dataset::BreakHis);
        let mut o = SynthOptions::new(kind, self.seed.unwrap_or(node.seed));
        o.patients = self.patients;
        o.size = self.size.as_ref().and_then(|s| parse_size(s.get_ref()).ok());
        o.regions_per_patient = self.regions_per_patient;
        if let Some(p) = self.partial_regions {
            o.partial_regions = p;
        }
        o
    }

    pub fn key_params(&self, node: &Node) -> BTreeMap<String, Value> {
        let mut p = BTreeMap::new();
        if let Ok(Value::Object(m)) = serde_json::to_value(self.options(node)) {
            p.extend(m);
        }
        p
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let opts = self.options(ctx.node);
        let summary = generate_with(&opts, ctx.out).map_err(|e| StageFailure(e.to_string()))?;
        log_line(ctx, &format!("generated {} {} images ({} patients)", summary.images, summary.kind, summary.patients));
        serde_json::to_value(&summary).map_err(|e| StageFailure(e.to_string()))
    }
}
