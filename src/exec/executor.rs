//! Executors: how the scheduler's ready nodes get run. The scheduler decides *what* may run (inputs known,
//! not cached, highest priority first); an executor decides *where and when*: it accepts a job when it has
//! room, and reports each job's end. A node's result is its cache entry, so an executor whose nodes run in
//! another process on another machine (a cluster job running `WorkerEnv::run` there) fits the same trait.

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::Scope;
use std::time::Duration;

use super::devices::Pool;
use super::kind::DeviceAssignment;
use super::worker::{Job, NodeOutcome, WorkerEnv};
use crate::error::{Error, Result};

/// A finished job: its node index and how it ended.
pub type Finished = (usize, Result<NodeOutcome>);

/// What became of a job offered to an executor.
pub enum Launch {
    Started,
    /// No room for this job now, but a smaller one (fewer GPUs) may fit.
    NotThisOne(Job),
    /// No room for any job until one ends.
    Full(Job),
}

pub trait Executor {
    /// Starts `job` if there is room for it now. `waiting` is how many other ready nodes wait behind it (for
    /// sharing the machine between the nodes that will run at once).
    fn try_launch(&mut self, job: Job, waiting: usize) -> Launch;
    /// Whether any job is running.
    fn busy(&self) -> bool;
    /// Waits up to `timeout` for a job to end.
    fn wait(&mut self, timeout: Duration) -> Option<Finished>;
    /// Ends running jobs: politely (SIGTERM) first, then by force.
    fn interrupt(&mut self, force: bool);
    /// What the executor did, for the `--json` summary (e.g. how often it asked a cluster scheduler).
    fn report(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Runs nodes on threads of this process: at most `jobs` at once, GPU nodes on free device slots, each node
/// with its share of the CPU cores.
pub struct LocalExecutor<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    env: &'env WorkerEnv<'env>,
    jobs: usize,
    pool: Pool,
    held: HashMap<usize, Vec<usize>>,
    tx: mpsc::Sender<Finished>,
    rx: mpsc::Receiver<Finished>,
}

impl<'scope, 'env> LocalExecutor<'scope, 'env> {
    pub fn new(scope: &'scope Scope<'scope, 'env>, env: &'env WorkerEnv<'env>, jobs: usize, gpus: Vec<String>) -> Self {
        let (tx, rx) = mpsc::channel();
        LocalExecutor { scope, env, jobs: jobs.max(1), pool: Pool::new(gpus), held: HashMap::new(), tx, rx }
    }
}

impl Executor for LocalExecutor<'_, '_> {
    fn try_launch(&mut self, job: Job, waiting: usize) -> Launch {
        if self.held.len() >= self.jobs {
            return Launch::Full(job);
        }
        let slots =
            if job.gpus == 0 || self.pool.is_empty() { Some(Vec::new()) } else { self.pool.take(job.gpus as usize) };
        let Some(slots) = slots else { return Launch::NotThisOne(job) };
        let device = DeviceAssignment { gpus: self.pool.ids_of(&slots), gpus_managed: !self.pool.is_empty() };
        self.held.insert(job.index, slots);
        // With RAYON_NUM_THREADS set, every node gets that many, as before.
        let cores = rayon::current_num_threads();
        let threads = if std::env::var_os("RAYON_NUM_THREADS").is_some() {
            cores
        } else {
            cpu_share(cores, self.jobs, self.held.len(), waiting)
        };
        let (tx, env, index) = (self.tx.clone(), self.env, job.index);
        self.scope.spawn(move || {
            // A panic in a node (a bug) fails that node with the panic's message instead of leaving the
            // scheduler waiting forever for a result that never comes.
            let run =
                std::panic::AssertUnwindSafe(|| crate::runtime::with_cpu_threads(threads, || env.run(job, device)));
            let r = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(Error::internal(format!("a bug in mpcs stopped this node (panic: {what}); please report it")))
            });
            let _ = tx.send((index, r));
        });
        Launch::Started
    }

    fn busy(&self) -> bool {
        !self.held.is_empty()
    }

    fn wait(&mut self, timeout: Duration) -> Option<Finished> {
        let finished = self.rx.recv_timeout(timeout).ok()?;
        if let Some(slots) = self.held.remove(&finished.0) {
            self.pool.give_back(&slots);
        }
        Some(finished)
    }

    fn interrupt(&mut self, force: bool) {
        self.env.processes.signal_all(if force { libc::SIGKILL } else { libc::SIGTERM });
    }
}

/// CPU threads for a node launched now: the `cores` shared between the nodes that will run at
/// once (`running`, this one included, plus those still waiting, at most `jobs`). A share fixed
/// at launch: a node that started beside others keeps its share after they finish.
fn cpu_share(cores: usize, jobs: usize, running: usize, waiting: usize) -> usize {
    let at_once = (running + waiting).clamp(1, jobs.max(1));
    (cores / at_once).max(1)
}

#[cfg(test)]
mod tests {
    use super::cpu_share;

    #[test]
    fn nodes_running_at_once_share_the_cores() {
        assert_eq!(cpu_share(4, 4, 1, 0), 4, "alone: all cores");
        assert_eq!(cpu_share(4, 1, 1, 9), 4, "--jobs 1: all cores");
        assert_eq!(cpu_share(4, 2, 1, 5), 2, "two at once");
        assert_eq!(cpu_share(4, 4, 2, 1), 1, "three at once: 4 / 3 rounded down");
        assert_eq!(cpu_share(4, 8, 8, 0), 1, "never below one thread");
    }
}
