//! The seam between the engine and the stage kinds.
//!
//! A kind is a [`StageKind`]: a typed spec (what the user writes, parsed by serde with unknown keys rejected and
//! closed sets of words as enums), a `resolve` step that turns the spec and one node into the node's complete
//! `Config` (every default filled in, every combination checked), and `execute`, which reads only that config
//! and the node's context. The engine hashes the *resolved* config into the action key, stores it in the
//! manifest and hands it to `execute` as JSON — so a default that changes in a later mpcs changes the key, an
//! explicitly written default gives the same key as an omitted one, and a node can be executed from its config
//! alone in another process (a worker on another machine).
//!
//! Kinds are registered once ([`Registry::with`]); the engine only ever sees them through the object-safe
//! [`Kind`] and [`Stage`] traits that the registry builds from each `StageKind`.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::de::DeValue;
use toml::Spanned;

use super::process::ProcessRegistry;
use crate::error::Result;
use crate::experiment::{Experiment, MatrixValue, StageDecl};
use crate::plan::Node;

/// A stage kind. Implement it on a unit struct and add it to the registry (`stages::builtin`).
pub trait StageKind: Send + Sync + 'static {
    /// What the user writes in `[stage.NAME]` besides the common keys (`kind`, `from`, `matrix`, ...).
    type Spec: DeserializeOwned + Send + Sync + 'static;
    /// Everything one node does, every default filled in. It is hashed into the key, so it must hold every
    /// value that changes the output and nothing that does not (no paths of the cache, no thread counts).
    type Config: Serialize + DeserializeOwned;
    /// The kind's name in experiment files.
    const NAME: &'static str;
    /// Bumped when the kind's code computes something else from the same config (invalidates its entries).
    const VERSION: u32;
    /// Config fields that say where something is rather than what it is (the path of a file named in the
    /// experiment, whose content digest is another field): recorded and handed to `execute`, not hashed, so
    /// moving a file reruns nothing.
    const LOCATIONS: &'static [&'static str] = &[];

    /// Checks that need the stage's declaration (its inputs, its matrix), reported at the right place.
    fn validate(spec: &Self::Spec, stage: &StageDecl, exp: &Experiment) -> Result<()>;
    /// The complete configuration of one node.
    fn resolve(spec: &Self::Spec, node: &NodeView<'_>) -> Result<Self::Config, String>;
    /// Runs one node; returns stage metrics for the manifest.
    fn execute(config: &Self::Config, ctx: &ExecContext<'_>) -> Result<Value, StageFailure>;
}

/// A kind as the engine sees it (object-safe).
pub trait Kind: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    /// See [`StageKind::LOCATIONS`].
    fn locations(&self) -> &'static [&'static str];
    /// Parses the kind's keys of one stage table.
    fn parse(&self, table: Spanned<DeValue<'_>>) -> Result<Box<dyn Stage>, toml::de::Error>;
    /// Runs a node from its resolved config (as stored in the action).
    fn execute(&self, config: &Value, ctx: &ExecContext<'_>) -> Result<Value, StageFailure>;
}

/// One parsed stage of some kind.
pub trait Stage: Send + Sync {
    fn validate(&self, stage: &StageDecl, exp: &Experiment) -> Result<()>;
    /// The node's resolved config as a JSON object.
    fn resolve(&self, node: &NodeView<'_>) -> Result<BTreeMap<String, Value>, String>;
}

struct Typed<K>(PhantomData<fn() -> K>);
struct TypedStage<K: StageKind>(K::Spec);

impl<K: StageKind> Kind for Typed<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn version(&self) -> u32 {
        K::VERSION
    }
    fn locations(&self) -> &'static [&'static str] {
        K::LOCATIONS
    }
    fn parse(&self, table: Spanned<DeValue<'_>>) -> Result<Box<dyn Stage>, toml::de::Error> {
        let spec = K::Spec::deserialize(toml::de::ValueDeserializer::from(table))?;
        Ok(Box::new(TypedStage::<K>(spec)))
    }
    fn execute(&self, config: &Value, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let config: K::Config = serde_json::from_value(config.clone()).map_err(|e| {
            StageFailure(format!("the recorded config of this `{}` node does not parse ({e}); rerun it", K::NAME))
        })?;
        K::execute(&config, ctx)
    }
}

impl<K: StageKind> Stage for TypedStage<K> {
    fn validate(&self, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        K::validate(&self.0, stage, exp)
    }
    fn resolve(&self, node: &NodeView<'_>) -> Result<BTreeMap<String, Value>, String> {
        let config = K::resolve(&self.0, node)?;
        match serde_json::to_value(config) {
            Ok(Value::Object(m)) => Ok(m.into_iter().collect()),
            Ok(other) => Err(format!("the config of kind `{}` is not a table: {other}", K::NAME)),
            Err(e) => Err(format!("the config of kind `{}` cannot be recorded: {e}", K::NAME)),
        }
    }
}

/// The stage kinds an engine knows, by name.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn Kind>>,
}

impl Registry {
    /// Adds a kind (one line per kind).
    pub fn with<K: StageKind>(mut self) -> Registry {
        self.kinds.push(Box::new(Typed::<K>(PhantomData)));
        self
    }

    pub fn get(&self, name: &str) -> Option<&dyn Kind> {
        self.kinds.iter().find(|k| k.name() == name).map(|k| k.as_ref())
    }

    /// Every kind's name, `source` (built into the engine) first.
    pub fn names(&self) -> Vec<&'static str> {
        std::iter::once(super::source::NAME).chain(self.kinds.iter().map(|k| k.name())).collect()
    }
}

/// What `resolve` may look at: the node, its experiment and the stages of its inputs.
pub struct NodeView<'a> {
    pub exp: &'a Experiment,
    pub node: &'a Node,
    /// (stage name, kind name) of each input, in input order.
    pub inputs: Vec<(&'a str, &'a str)>,
}

impl NodeView<'_> {
    /// The node's matrix value of `key`, as text.
    pub fn matrix(&self, key: &str) -> Option<String> {
        self.node.matrix_value(key).map(MatrixValue::to_string)
    }

    /// Whether some input comes from a stage of one of `kinds`.
    pub fn has_input_of_kind(&self, kinds: &[&str]) -> bool {
        self.inputs.iter().any(|(_, k)| kinds.contains(k))
    }

    /// The content digest of a file named in the experiment (relative to its folder), so that editing the file
    /// changes the key and renaming it does not (hashed once per process and file version).
    pub fn file_digest(&self, written: &str) -> String {
        crate::cache::fingerprint::param_file_digest(&self.exp.resolve_path(written))
    }
}

/// One input of a node as its stage sees it.
#[derive(Clone, Serialize, Deserialize)]
pub struct InputDir {
    pub node: String,
    pub stage: String,
    /// The kind of the input's stage (training stages find their inputs by kind).
    pub kind: String,
    /// The input node's matrix values (key, value as text), e.g. `fold` → `0` (the table stage groups by them).
    pub matrix: Vec<(String, String)>,
    /// The input's output directory (for a source: the source path itself).
    pub path: PathBuf,
    /// The cache entry holding it (None for a source), checked before and after the node reads it.
    pub entry: Option<EntryRef>,
}

/// A published entry as a consumer knows it: its key and the stat record its manifest holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryRef {
    pub key: String,
    pub stat: String,
}

/// The device(s) a node runs on.
#[derive(Clone, Debug, Default)]
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

    /// The name of the node's stage.
    pub fn stage_name(&self) -> &str {
        &self.exp.stages[self.node.stage].name
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
