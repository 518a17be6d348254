//! Stage kinds. Each kind is a typed spec (serde, unknown keys rejected) plus what it contributes to the action
//! key and how it executes. Adding a kind: a file here, a variant in [`StageSpec`], its name in `KINDS`.

pub mod command;
pub mod download;
pub mod patchify;
pub mod pretrain;
pub mod source;
pub mod split;
pub mod stain;
pub mod synthetic;
pub mod table;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use toml::de::DeValue;
use toml::Spanned;

use crate::error::Result;
use crate::exec::ProcessRegistry;
use crate::experiment::{Experiment, SourceText, StageDecl};
use crate::plan::Node;

pub enum StageSpec {
    Source(source::SourceSpec),
    Command(command::CommandSpec),
    Download(download::DownloadSpec),
    Patchify(patchify::PatchifySpec),
    Synthetic(synthetic::SyntheticSpec),
    Split(split::SplitSpec),
    StainNormalise(stain::StainSpec),
    Pretrain(pretrain::PretrainSpec),
    Finetune(train::TrainSpec),
    LinearEval(train::TrainSpec),
    Evaluate(train::TrainSpec),
    Table(table::TableStageSpec),
}

/// One input of a node as its stage sees it.
pub struct InputDir {
    pub node: String,
    pub stage: String,
    /// The input node's matrix values (key, value as text), e.g. `fold` → `0` (the table stage groups by them).
    pub matrix: Vec<(String, String)>,
    /// The input's output directory (for a source: the source path itself).
    pub path: PathBuf,
}

/// The device(s) a node runs on.
#[derive(Clone, Debug)]
pub struct DeviceAssignment {
    /// GPU ids (as in CUDA_VISIBLE_DEVICES); empty = CPU.
    pub gpus: Vec<String>,
    /// Whether the scheduler manages GPUs at all (then CPU nodes get an empty CUDA_VISIBLE_DEVICES).
    pub gpus_managed: bool,
}

impl DeviceAssignment {
    /// `cuda:0,cuda:1` or `cpu`.
    pub fn label(&self) -> String {
        if self.gpus.is_empty() {
            "cpu".into()
        } else {
            self.gpus.iter().map(|g| format!("cuda:{g}")).collect::<Vec<_>>().join(",")
        }
    }
}

/// Everything a stage needs to execute one node.
pub struct ExecContext<'a> {
    pub exp: &'a Experiment,
    pub decl: &'a StageDecl,
    pub node: &'a Node,
    /// Where the node writes its outputs (published as the entry's `out/`).
    pub out: &'a Path,
    /// The node's log file (stdout and stderr of commands).
    pub log: &'a Path,
    /// A directory that survives interruptions, for checkpoints (keyed by the action key).
    pub scratch: PathBuf,
    pub inputs: Vec<InputDir>,
    pub device: DeviceAssignment,
    pub cancel: &'a Arc<AtomicBool>,
    pub processes: &'a ProcessRegistry,
    /// Reports progress of the node (done, total, message) to the live display.
    pub progress: &'a (dyn Fn(u64, Option<u64>, &str) + Sync),
    /// Tells the user something once (e.g. how to pin a download's digest).
    pub notice: &'a (dyn Fn(&str) + Sync),
}

impl ExecContext<'_> {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// Why a node failed: a message for the user (the log path is added by the scheduler).
#[derive(Debug)]
pub struct StageFailure(pub String);

impl StageFailure {
    pub fn new(msg: impl Into<String>) -> Self {
        StageFailure(msg.into())
    }
}

/// The single input directory of a node, or a failure naming the stage kind that needs exactly one.
pub fn single_input<'a>(ctx: &'a ExecContext<'_>, kind: &str) -> Result<&'a Path, StageFailure> {
    match ctx.inputs.as_slice() {
        [one] => Ok(&one.path),
        other => Err(StageFailure(format!(
            "a `{kind}` node takes exactly one input, but `{}` has {}; narrow `from` with a selector",
            ctx.node.id,
            other.len()
        ))),
    }
}

/// Appends a line to the node's log (built-in stages log what they did, like commands do).
pub fn log_line(ctx: &ExecContext<'_>, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(ctx.log) {
        let _ = writeln!(f, "{line}");
    }
}

impl StageSpec {
    /// Every stage kind, for validation and "did you mean".
    pub const KINDS: &'static [&'static str] = &[
        "source",
        "command",
        "download",
        "synthetic",
        "stain_normalise",
        "patchify",
        "split",
        "pretrain",
        "finetune",
        "linear_eval",
        "evaluate",
        "table",
    ];

    pub fn parse(kind: &str, table: Spanned<DeValue<'_>>) -> Result<StageSpec, toml::de::Error> {
        let de = toml::de::ValueDeserializer::from(table);
        Ok(match kind {
            "source" => StageSpec::Source(source::SourceSpec::deserialize(de)?),
            "command" => StageSpec::Command(command::CommandSpec::deserialize(de)?),
            "download" => StageSpec::Download(download::DownloadSpec::deserialize(de)?),
            "patchify" => StageSpec::Patchify(patchify::PatchifySpec::deserialize(de)?),
            "synthetic" => StageSpec::Synthetic(synthetic::SyntheticSpec::deserialize(de)?),
            "split" => StageSpec::Split(split::SplitSpec::deserialize(de)?),
            "stain_normalise" => StageSpec::StainNormalise(stain::StainSpec::deserialize(de)?),
            "pretrain" => StageSpec::Pretrain(pretrain::PretrainSpec::deserialize(de)?),
            "finetune" => StageSpec::Finetune(train::TrainSpec::deserialize(de)?),
            "linear_eval" => StageSpec::LinearEval(train::TrainSpec::deserialize(de)?),
            "evaluate" => StageSpec::Evaluate(train::TrainSpec::deserialize(de)?),
            "table" => StageSpec::Table(table::TableStageSpec::deserialize(de)?),
            other => return Err(serde::de::Error::custom(format!("unknown stage kind `{other}`"))),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            StageSpec::Source(_) => "source",
            StageSpec::Command(_) => "command",
            StageSpec::Download(_) => "download",
            StageSpec::Patchify(_) => "patchify",
            StageSpec::Synthetic(_) => "synthetic",
            StageSpec::Split(_) => "split",
            StageSpec::StainNormalise(_) => "stain_normalise",
            StageSpec::Pretrain(_) => "pretrain",
            StageSpec::Finetune(_) => "finetune",
            StageSpec::LinearEval(_) => "linear_eval",
            StageSpec::Evaluate(_) => "evaluate",
            StageSpec::Table(_) => "table",
        }
    }

    /// Bumped when the kind's semantics change, which invalidates its cache entries.
    pub fn version(&self) -> u32 {
        match self {
            StageSpec::Source(_) => source::VERSION,
            StageSpec::Command(_) => command::VERSION,
            StageSpec::Download(_) => download::VERSION,
            StageSpec::Patchify(_) => patchify::VERSION,
            StageSpec::Synthetic(_) => synthetic::VERSION,
            StageSpec::Split(_) => split::VERSION,
            StageSpec::StainNormalise(_) => stain::VERSION,
            StageSpec::Pretrain(_) => pretrain::VERSION,
            StageSpec::Finetune(_) | StageSpec::LinearEval(_) | StageSpec::Evaluate(_) => train::VERSION,
            StageSpec::Table(_) => table::VERSION,
        }
    }

    /// Sources are fingerprinted where they are instead of executed into the cache.
    pub fn as_source(&self) -> Option<&source::SourceSpec> {
        match self {
            StageSpec::Source(s) => Some(s),
            _ => None,
        }
    }

    /// Checks that need the whole experiment (placeholders, inputs).
    pub fn validate(&self, decl: &StageDecl, all: &[StageDecl], src: &SourceText) -> Result<()> {
        match self {
            StageSpec::Source(s) => s.validate(decl, src),
            StageSpec::Command(c) => c.validate(decl, all, src),
            StageSpec::Download(d) => d.validate(decl, src),
            StageSpec::Patchify(p) => p.validate(decl, src),
            StageSpec::Synthetic(s) => s.validate(decl, src),
            StageSpec::Split(s) => s.validate(decl, src),
            StageSpec::StainNormalise(s) => s.validate(decl, src),
            StageSpec::Pretrain(p) => p.validate(decl, src),
            StageSpec::Finetune(t) => t.validate("finetune", decl, src),
            StageSpec::LinearEval(t) => t.validate("linear_eval", decl, src),
            StageSpec::Evaluate(t) => t.validate("evaluate", decl, src),
            StageSpec::Table(t) => t.validate(decl, src),
        }
    }

    /// The parameters that go into the action key (besides kind, version and input digests).
    pub fn key_params(&self, exp: &Experiment, decl: &StageDecl, node: &Node) -> BTreeMap<String, Value> {
        let mut params = match self {
            StageSpec::Source(s) => s.key_params(),
            StageSpec::Command(c) => c.key_params(node),
            StageSpec::Download(d) => d.key_params(),
            StageSpec::Patchify(p) => p.key_params(),
            StageSpec::Synthetic(s) => s.key_params(node),
            StageSpec::Split(s) => s.key_params(node),
            StageSpec::StainNormalise(s) => s.key_params(exp),
            StageSpec::Pretrain(p) => p.key_params(exp, node),
            StageSpec::Finetune(t) | StageSpec::LinearEval(t) | StageSpec::Evaluate(t) => t.key_params(exp, node),
            StageSpec::Table(t) => t.key_params(),
        };
        if !node.matrix.is_empty() {
            let m =
                node.matrix.iter().map(|(k, v)| (k.clone(), crate::plan::key::toml_to_json(&v.to_toml()))).collect();
            params.insert("matrix".into(), Value::Object(m));
        }
        let _ = decl;
        params
    }

    /// Runs the node; on success returns stage metrics for the manifest.
    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        match self {
            StageSpec::Source(_) => Err(StageFailure("a source is not executed".into())),
            StageSpec::Command(c) => c.execute(ctx),
            StageSpec::Download(d) => d.execute(ctx),
            StageSpec::Patchify(p) => p.execute(ctx),
            StageSpec::Synthetic(s) => s.execute(ctx),
            StageSpec::Split(s) => s.execute(ctx),
            StageSpec::StainNormalise(s) => s.execute(ctx),
            StageSpec::Pretrain(p) => p.execute(ctx),
            StageSpec::Finetune(t) => train::execute_finetune(t, ctx, false),
            StageSpec::LinearEval(t) => train::execute_finetune(t, ctx, true),
            StageSpec::Evaluate(t) => train::execute_evaluate(t, ctx),
            StageSpec::Table(t) => t.execute(ctx),
        }
    }
}
