//! `synthetic`: generates a synthetic dataset in a real layout (BreakHis, BACH, breast cell); see
//! `crate::data::synth`. The seed defaults to the node's seed.

use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use super::{log_line, parsed, stage_error};
use crate::data::synth::{generate_with, parse_size, SynthOptions};
use crate::data::Dataset;
use crate::error::Result;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::{Experiment, StageDecl};

pub struct Synthetic;

impl StageKind for Synthetic {
    type Spec = SyntheticSpec;
    /// The generator's own options, every count filled in.
    type Config = SynthOptions;
    const NAME: &'static str = "synthetic";
    const VERSION: u32 = 1;

    fn validate(spec: &SyntheticSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        if let Some(r) = stage.refs.first() {
            let msg = format!("synthetic stage `{}` cannot have `from`", stage.name);
            return Err(exp.source.error(r.span.clone(), msg, None));
        }
        if let Some(s) = &spec.size {
            if let Err(e) = parse_size(s.get_ref()) {
                return Err(exp.source.error(s.span(), e.to_string(), None));
            }
        }
        if spec.patients == Some(0) || spec.regions_per_patient == Some(0) {
            return Err(stage_error(exp, stage, "`patients` and `regions_per_patient` must be at least 1"));
        }
        Ok(())
    }

    fn resolve(spec: &SyntheticSpec, node: &NodeView<'_>) -> Result<SynthOptions, String> {
        let mut o = SynthOptions::new(spec.dataset, spec.seed.unwrap_or(node.node.seed));
        o.patients = Some(spec.patients.unwrap_or_else(|| SynthOptions::default_count(spec.dataset)));
        o.size = spec.size.as_ref().map(|s| parse_size(s.get_ref())).transpose().map_err(|e| e.to_string())?;
        o.regions_per_patient = Some(spec.regions_per_patient.unwrap_or(SynthOptions::DEFAULT_REGIONS));
        o.partial_regions = spec.partial_regions.unwrap_or(o.partial_regions);
        Ok(o)
    }

    fn execute(opts: &SynthOptions, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let summary = generate_with(opts, ctx.out).map_err(|e| StageFailure(e.to_string()))?;
        log_line(ctx, &format!("generated {} {} images ({} patients)", summary.images, summary.kind, summary.patients));
        serde_json::to_value(&summary).map_err(|e| StageFailure(e.to_string()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// `breakhis`, `bach` or `breast-cell`.
    #[serde(deserialize_with = "parsed")]
    pub dataset: Dataset,
    pub seed: Option<u64>,
    /// BreakHis: patients; BACH and breast cell: images per class.
    pub patients: Option<usize>,
    /// `WIDTHxHEIGHT` (default: the real size).
    pub size: Option<Spanned<String>>,
    pub regions_per_patient: Option<usize>,
    pub partial_regions: Option<bool>,
}
