//! The one resolver: node → identity (a source's content digest, or an action key) → cache state. `mpcs run`
//! walks it as nodes become ready; `graph`, `--why`, `--dry-run`, `show`, `gc` and `report` walk it over the
//! whole DAG at once ([`assess`]) without running anything.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use super::project::Project;
use crate::cache::journal::{Journal, Record, Status};
use crate::cache::{Cache, EntryHead};
use crate::error::Result;
use crate::plan::key::Action;
use crate::remote::Remote;

/// What is known about one node.
pub enum Resolution {
    /// A source, fingerprinted in place: its content digest is its identity.
    Source { path: PathBuf, digest: String },
    /// Every input is known: the node's key, and its entry's head (output digest, stat) if the cache has one.
    Known { key: String, cached: Option<EntryHead> },
    /// An input's output is not known yet (it will run first).
    Blocked,
}

/// The key of a source in journals and listings: a prefix of its content digest.
pub fn source_key(digest: &str) -> String {
    digest[..32.min(digest.len())].to_string()
}

pub struct Resolver<'a> {
    pub project: &'a Project,
    pub cache: &'a Cache,
    /// The journal's latest record of every node of this experiment.
    pub last: HashMap<String, Record>,
}

impl<'a> Resolver<'a> {
    pub fn new(project: &'a Project, cache: &'a Cache) -> Result<Resolver<'a>> {
        let last = Journal::open(cache, &project.exp.name, &project.exp.path).load()?;
        Ok(Resolver { project, cache, last })
    }

    /// Resolves node `i` given the output digests known so far.
    pub fn resolve(&self, i: usize, digests: &[Option<String>]) -> Result<Resolution> {
        let p = self.project;
        if let Some(src) = p.source_of(i) {
            let (path, digest) = src.fingerprint(&p.exp, &p.exp.stages[p.plan.nodes[i].stage], self.cache)?;
            return Ok(Resolution::Source { path, digest });
        }
        let Some(key) = p.key(i, digests) else { return Ok(Resolution::Blocked) };
        let cached = self.cache.lookup_head(&key)?;
        Ok(Resolution::Known { key, cached })
    }

    /// Whether a source's digest differs from the one recorded at its last run.
    pub fn source_changed(&self, i: usize, digest: &str) -> bool {
        self.last.get(&self.project.plan.nodes[i].id).and_then(|r| r.digest.as_deref()) != Some(digest)
    }

    /// Whether node `i` failed last time with this very key.
    pub fn failed_last_time(&self, i: usize, key: &str) -> bool {
        self.last.get(&self.project.plan.nodes[i].id).is_some_and(|r| r.status == Status::Failed && r.key == key)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Its entry is in the cache (a source: unchanged since last run).
    Cached,
    /// It would execute (a source: it changed).
    WillRun,
    /// An upstream node will run first, so its key is not known yet.
    Blocked,
    /// It failed last time with this very key and would run again.
    Failed,
    /// A source whose path does not exist (yet): the graph still shows what depends on it; a run stops.
    Missing,
    /// Not in this cache, but in the remote cache: a run pulls it instead of running it.
    Remote,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Cached => "cached",
            State::WillRun => "will-run",
            State::Blocked => "blocked",
            State::Failed => "failed",
            State::Missing => "missing",
            State::Remote => "remote",
        }
    }
}

pub struct NodeStatus {
    pub state: State,
    pub key: Option<String>,
    pub digest: Option<String>,
    /// A cluster job of a live run computing this node: (job id, "queued" or "running").
    pub job: Option<(String, &'static str)>,
    /// For a `remote` node: the bytes a pull would fetch.
    pub remote_bytes: Option<u64>,
}

impl NodeStatus {
    fn new(state: State, key: Option<String>, digest: Option<String>) -> NodeStatus {
        NodeStatus { state, key, digest, job: None, remote_bytes: None }
    }
}

pub struct Assessment {
    pub nodes: Vec<NodeStatus>,
    pub last: HashMap<String, Record>,
    pub source_paths: HashMap<usize, PathBuf>,
    /// Every output digest known without running anything (by node index).
    digests: Vec<Option<String>>,
}

impl Assessment {
    /// Node `i`'s action, when its inputs are known (built on demand: a DAG's worth of them is memory).
    pub fn action(&self, project: &Project, i: usize) -> Option<Action> {
        match self.nodes[i].state {
            State::Blocked | State::Missing => None,
            _ => project.action(i, &self.digests),
        }
    }
}

/// Every node's state, without running anything.
pub fn assess(project: &Project, cache: &Cache) -> Result<Assessment> {
    assess_with(project, cache, None)
}

/// [`assess`], with the entries a remote cache has counted as `remote`. Their records are fetched for the output
/// digests their consumers' keys need: a DAG level at a time, each level's records in parallel.
pub fn assess_with(project: &Project, cache: &Cache, remote: Option<&Remote>) -> Result<Assessment> {
    let resolver = Resolver::new(project, cache)?;
    let plan = &project.plan;
    let n = plan.nodes.len();
    let mut digests: Vec<Option<String>> = vec![None; n];
    let mut nodes: Vec<Option<NodeStatus>> = (0..n).map(|_| None).collect();
    let mut source_paths = HashMap::new();
    // A node's level is one more than its deepest input's: a level's keys depend on earlier levels only.
    let mut level = vec![0usize; n];
    for &i in &plan.order {
        level[i] = plan.nodes[i].inputs.iter().map(|&j| level[j] + 1).max().unwrap_or(0);
    }
    let mut levels: Vec<Vec<usize>> = vec![Vec::new(); level.iter().max().map_or(0, |m| m + 1)];
    for &i in &plan.order {
        levels[level[i]].push(i);
    }
    for nodes_of_level in &levels {
        for &i in nodes_of_level {
            let missing = project.source_of(i).is_some_and(|s| {
                let decl = &project.exp.stages[plan.nodes[i].stage];
                s.resolve(&project.exp, decl).is_err()
            });
            nodes[i] = Some(if missing {
                NodeStatus::new(State::Missing, None, None)
            } else {
                status_of(&resolver, i, &mut digests, &mut source_paths)?
            });
        }
        let Some(remote) = remote.filter(|r| r.mode.reads()) else { continue };
        // This level's misses that the remote has: their records, all at once.
        let asked: Vec<(usize, String)> = nodes_of_level
            .iter()
            .filter_map(|&i| {
                let st = nodes[i].as_ref()?;
                let key = st.key.as_ref().filter(|_| matches!(st.state, State::WillRun | State::Failed))?;
                (project.source_of(i).is_none() && remote.has(key)).then(|| (i, key.clone()))
            })
            .collect();
        let keys: Vec<&str> = asked.iter().map(|(_, k)| k.as_str()).collect();
        for ((i, key), record) in asked.iter().zip(remote.records(&keys)) {
            let Some(record) = record.ok().flatten().filter(|rec| rec.manifest.key == *key) else { continue };
            let digest = record.manifest.output_digest.clone();
            digests[*i] = Some(digest.clone());
            let mut st = NodeStatus::new(State::Remote, Some(key.clone()), Some(digest));
            st.remote_bytes = Some(record.blobs().values().sum());
            nodes[*i] = Some(st);
        }
    }
    let mut nodes: Vec<NodeStatus> = nodes.into_iter().flatten().collect();
    // Nodes that a live run has handed to a cluster: shown with their job (one squeue, only if any is recorded).
    let pending: Vec<&str> = nodes
        .iter()
        .filter(|n| matches!(n.state, State::WillRun | State::Failed))
        .filter_map(|n| n.key.as_deref())
        .filter(|_| cache.root().join(crate::cache::FORMAT_DIR).join("slurm").join("keys").is_dir())
        .collect();
    let jobs = super::slurm::live_jobs(cache, &pending);
    for n in nodes.iter_mut() {
        n.job = n.key.as_ref().and_then(|k| jobs.get(k).cloned());
    }
    Ok(Assessment { nodes, last: resolver.last, source_paths, digests })
}

fn status_of(
    r: &Resolver<'_>,
    i: usize,
    digests: &mut [Option<String>],
    source_paths: &mut HashMap<usize, PathBuf>,
) -> Result<NodeStatus> {
    Ok(match r.resolve(i, digests)? {
        Resolution::Source { path, digest } => {
            source_paths.insert(i, path);
            digests[i] = Some(digest.clone());
            let state = if r.source_changed(i, &digest) { State::WillRun } else { State::Cached };
            NodeStatus::new(state, Some(source_key(&digest)), Some(digest))
        }
        Resolution::Blocked => NodeStatus::new(State::Blocked, None, None),
        Resolution::Known { key, cached: Some(head), .. } => {
            let digest = head.output_digest;
            digests[i] = Some(digest.clone());
            NodeStatus::new(State::Cached, Some(key), Some(digest))
        }
        Resolution::Known { key, cached: None, .. } => {
            let state = if r.failed_last_time(i, &key) { State::Failed } else { State::WillRun };
            NodeStatus::new(state, Some(key), None)
        }
    })
}
