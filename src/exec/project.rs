//! A loaded experiment ready for the engine: the file parsed and validated, every stage's spec parsed by its
//! kind, the DAG built, and every node's configuration resolved (defaults filled in) — all before anything
//! touches the cache, so a bad file fails with exit code 2 and leaves no trace.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use toml::de::DeValue;
use toml::Spanned;

use super::kind::{Kind, NodeView, Registry, Stage};
use super::source::{self, SourceSpec};
use crate::error::{Error, Result};
use crate::experiment::{BodyParser, Experiment};
use crate::plan::key::{toml_to_json, Action};
use crate::plan::Plan;

/// A stage's parsed spec.
pub enum StageSpec {
    Source(SourceSpec),
    Kind(Box<dyn Stage>),
}

/// A node's parameters as they go into its key: the kind's resolved config, plus the node's matrix values.
pub struct Resolved {
    pub params: BTreeMap<String, Value>,
    /// Config fields that locate files rather than determine the output (not hashed).
    pub locations: BTreeMap<String, Value>,
    /// Parameters that were not written in the experiment (filled in by the kind's defaults).
    pub defaults: Vec<String>,
}

pub struct Project {
    pub exp: Experiment,
    pub plan: Plan,
    /// By stage index.
    pub specs: Vec<StageSpec>,
    /// By node index.
    pub resolved: Vec<Resolved>,
    registry: Registry,
}

struct Parser<'a>(&'a Registry);

impl BodyParser<StageSpec> for Parser<'_> {
    fn kinds(&self) -> Vec<&'static str> {
        self.0.names()
    }
    fn parse(&mut self, kind: &str, body: Spanned<DeValue<'_>>) -> Result<StageSpec, toml::de::Error> {
        use serde::Deserialize;
        if kind == source::NAME {
            return SourceSpec::deserialize(toml::de::ValueDeserializer::from(body)).map(StageSpec::Source);
        }
        match self.0.get(kind) {
            Some(k) => k.parse(body).map(StageSpec::Kind),
            None => Err(serde::de::Error::custom(format!("unknown stage kind `{kind}`"))),
        }
    }
}

impl Project {
    /// Loads `path` with `--set` overrides applied.
    pub fn load(path: &Path, sets: &[String], registry: Registry) -> Result<Project> {
        let (exp, specs) = Experiment::load(path, sets, &mut Parser(&registry))?;
        Self::build(exp, specs, registry)
    }

    /// From experiment text (tests, generated experiments).
    pub fn from_str(path: &Path, text: &str, sets: &[String], registry: Registry) -> Result<Project> {
        let (exp, specs) = Experiment::from_str(path, text, sets, &mut Parser(&registry))?;
        Self::build(exp, specs, registry)
    }

    fn build(exp: Experiment, specs: Vec<StageSpec>, registry: Registry) -> Result<Project> {
        for (decl, spec) in exp.stages.iter().zip(&specs) {
            match spec {
                StageSpec::Source(s) => s.validate(decl, &exp)?,
                StageSpec::Kind(k) => k.validate(decl, &exp)?,
            }
        }
        let plan = Plan::build(&exp)?;
        let resolved = (0..plan.nodes.len())
            .map(|i| resolve_node(&exp, &plan, &specs, &registry, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Project { exp, plan, specs, resolved, registry })
    }

    /// The kind name of node `i`'s stage.
    pub fn kind_of(&self, i: usize) -> &str {
        &self.exp.stages[self.plan.nodes[i].stage].kind
    }

    /// The source spec of node `i`, if it is a source.
    pub fn source_of(&self, i: usize) -> Option<&SourceSpec> {
        match &self.specs[self.plan.nodes[i].stage] {
            StageSpec::Source(s) => Some(s),
            StageSpec::Kind(_) => None,
        }
    }

    /// The registered kind of node `i` (None for a source).
    pub fn kind(&self, i: usize) -> Option<&dyn Kind> {
        self.registry.get(self.kind_of(i))
    }

    fn version(&self, i: usize) -> u32 {
        self.kind(i).map(|k| k.version()).unwrap_or(source::VERSION)
    }

    /// The key of node `i` given its inputs' output digests, or None while one of them is unknown (the same as
    /// `action(i, digests)?.key()`, without copying the node's parameters).
    pub fn key(&self, i: usize, digests: &[Option<String>]) -> Option<String> {
        let node = &self.plan.nodes[i];
        if node.inputs.iter().any(|&j| digests[j].is_none()) {
            return None;
        }
        let inputs = node.inputs.iter().map(|&j| (self.plan.nodes[j].id.as_str(), digests[j].as_deref().unwrap_or("")));
        Some(crate::plan::key::key_of(self.kind_of(i), self.version(i), &self.resolved[i].params, inputs))
    }

    /// The action of node `i` given its inputs' output digests, or None while one of them is unknown.
    pub fn action(&self, i: usize, digests: &[Option<String>]) -> Option<Action> {
        let node = &self.plan.nodes[i];
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for &j in &node.inputs {
            inputs.push((self.plan.nodes[j].id.clone(), digests[j].clone()?));
        }
        let r = &self.resolved[i];
        Some(Action {
            kind: self.kind_of(i).to_string(),
            version: self.version(i),
            params: r.params.clone(),
            inputs,
            defaults: r.defaults.clone(),
            locations: r.locations.clone(),
        })
    }
}

/// Node `i`'s complete parameters: its stage kind's resolved config and its matrix values.
fn resolve_node(exp: &Experiment, plan: &Plan, specs: &[StageSpec], registry: &Registry, i: usize) -> Result<Resolved> {
    let node = &plan.nodes[i];
    let decl = &exp.stages[node.stage];
    let mut params = match &specs[node.stage] {
        // A source's identity is its content digest; the path is not part of any key.
        StageSpec::Source(_) => BTreeMap::new(),
        StageSpec::Kind(stage) => {
            let inputs = node
                .inputs
                .iter()
                .map(|&j| {
                    let s = &exp.stages[plan.nodes[j].stage];
                    (s.name.as_str(), s.kind.as_str())
                })
                .collect();
            let view = NodeView { exp, node, inputs };
            stage.resolve(&view).map_err(|e| {
                exp.source.error(decl.span.clone(), format!("stage `{}`, node `{}`: {e}", decl.name, node.id), None)
            })?
        }
    };
    let unkeyed = registry.get(&decl.kind).map(|k| k.locations()).unwrap_or(&[]);
    let locations = unkeyed.iter().filter_map(|k| params.remove_entry(*k)).collect();
    // Values the file did not write. The node's own seed and id are derived from the node, not defaults.
    let derived = |k: &str| k == "seed" || k == "node";
    let defaults = params
        .keys()
        .filter(|k| !decl.written.iter().any(|w| w == *k) && !decl.has_matrix_key(k) && !derived(k))
        .cloned()
        .collect();
    if !node.matrix.is_empty() {
        let m = node.matrix.iter().map(|(k, v)| (k.clone(), toml_to_json(&v.to_toml()))).collect();
        if params.insert("matrix".into(), Value::Object(m)).is_some() {
            return Err(Error::internal(format!("kind `{}` has a config field named `matrix`", decl.kind)));
        }
    }
    Ok(Resolved { params, locations, defaults })
}
