//! The engine: runs a project's DAG against the cache.
//!
//! ```text
//! kind.rs      the StageKind trait (spec → resolved config → execute) and the registry of kinds
//! source.rs    the `source` kind, built in: fingerprinted in place, never executed
//! project.rs   an experiment loaded for the engine: specs parsed, DAG built, every node's config resolved
//! resolve.rs   the one resolver: node → identity (content digest or action key) → cache state
//! schedule.rs  the scheduler: ready set, launch, finish, journal
//! executor.rs  the Executor trait and the local executor (threads, device slots, CPU share)
//! worker.rs    executes one node in-process and publishes its entry (what every executor ends in)
//! spawn.rs     starts a command in its own process group, dying with mpcs, without fork's cost
//! devices.rs   GPU discovery and slots;  progress.rs  events and their rendering;  process.rs  child processes
//! ```

pub mod devices;
pub mod executor;
pub mod kind;
pub mod process;
pub mod progress;
pub mod project;
pub mod resolve;
pub mod schedule;
pub mod slurm;
pub mod source;
pub mod spawn;
pub mod worker;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::cache::Cache;
use crate::error::Result;
pub use kind::{DeviceAssignment, ExecContext, InputDir, NodeView, Registry, StageFailure, StageKind};
use progress::{Event, Reporter};
pub use project::Project;

pub struct RunOptions {
    /// Nodes running at once.
    pub jobs: usize,
    /// GPU slots (ids); empty = none.
    pub gpus: Vec<String>,
    pub keep_going: bool,
    /// Seconds between SIGTERM and SIGKILL when interrupted.
    pub grace: Duration,
    /// Where nodes run.
    pub executor: ExecutorChoice,
    /// The remote cache: missing entries it has are pulled instead of run, and what runs is pushed (as its
    /// mode allows).
    pub remote: Option<Arc<crate::remote::Remote>>,
}

/// Where a run's nodes execute.
#[derive(Clone, Debug, Default)]
pub enum ExecutorChoice {
    /// Threads of this process (`--jobs`, `--devices`).
    #[default]
    Local,
    /// One Slurm job per node; the `--set` overrides travel with each job.
    Slurm { options: Box<slurm::SlurmOptions>, sets: Vec<String> },
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub node: String,
    pub message: String,
    pub log: Option<PathBuf>,
}

/// What a run did, node by node. Every node is in exactly one list.
#[derive(Debug, Default, Serialize)]
pub struct RunSummary {
    pub executed: Vec<String>,
    pub cached: Vec<String>,
    /// Fetched from the remote cache instead of run.
    pub pulled: Vec<String>,
    pub failed: Vec<Failure>,
    pub skipped: Vec<String>,
    pub interrupted: bool,
    /// Output directory of every node that has one after the run (by node index).
    #[serde(skip)]
    pub outputs: Vec<Option<PathBuf>>,
    /// What the executor reports (for Slurm: its sbatch/squeue/scancel counts).
    pub executor: serde_json::Value,
    /// What the remote cache did: pushes, and requests made (null without a remote).
    pub remote: serde_json::Value,
}

/// Runs every node of `project` that is not cached, on this machine.
pub fn run(
    project: &Project,
    cache: &Cache,
    opts: &RunOptions,
    reporter: &dyn Reporter,
    cancel: &Arc<AtomicBool>,
) -> Result<RunSummary> {
    let pool = devices::Pool::new(opts.gpus.clone());
    let local = matches!(opts.executor, ExecutorChoice::Local);
    for stage in project.exp.stages.iter().filter(|_| local) {
        devices::check_demand(stage.gpus, &pool, &stage.name)?;
    }
    let gpu_nodes = project.plan.nodes.iter().filter(|n| project.exp.stages[n.stage].gpus > 0).count();
    if local && gpu_nodes > 0 && pool.is_empty() {
        reporter.event(Event::Notice(&format!(
            "no GPU found: the {gpu_nodes} GPU node(s) will run on the CPU (--devices LIST hands out GPUs)"
        )));
    }
    // `gc` removes nothing while this is held: an entry made a moment ago may be the input of the next node.
    let _in_use = cache.hold_for_run()?;
    cache.sweep_stale_staging();
    let pusher = opts
        .remote
        .as_ref()
        .filter(|r| r.mode.writes())
        .map(|r| crate::remote::Pusher::start(Arc::clone(r), cache.clone()));
    let scheduler = schedule::Scheduler::new(resolve::Resolver::new(project, cache)?, opts, reporter, pusher.as_ref());
    let processes = process::ProcessRegistry::default();
    let env = worker::WorkerEnv { project, cache, cancel, processes: &processes, reporter, job_output: None };
    let mut summary = match &opts.executor {
        ExecutorChoice::Local => std::thread::scope(|scope| {
            let mut executor = executor::LocalExecutor::new(scope, &env, opts.jobs, opts.gpus.clone());
            scheduler.run(&mut executor, cancel)
        }),
        ExecutorChoice::Slurm { options, sets } => {
            let mut executor = slurm::SlurmExecutor::new(project, sets, cache, (**options).clone())?;
            scheduler.run(&mut executor, cancel)
        }
    }?;
    if let Some(remote) = &opts.remote {
        let tally = pusher.map(|p| p.finish()).unwrap_or_default();
        for why in &tally.not_pushed {
            reporter.event(Event::Notice(&format!("not pushed to {}: {why}", remote.url())));
        }
        summary.remote = serde_json::json!({
            "url": remote.url(),
            "pulled": summary.pulled.len(),
            "pushed": tally.pushed,
            "already_there": tally.already_there,
            "blobs_uploaded": tally.blobs_uploaded,
            "bytes_uploaded": tally.bytes_uploaded,
            "not_pushed": tally.not_pushed.len(),
            "requests": remote.stats.json(),
        });
    }
    Ok(summary)
}
