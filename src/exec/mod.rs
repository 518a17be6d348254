//! The scheduler: runs a plan against the cache.
//!
//! A node becomes ready when all its inputs have output digests; then its action key is computed and looked up.
//! A hit is `cached` at once; a miss waits in the ready set, highest priority (longest remaining path) first,
//! until a job slot and the GPU slots it declares are free, and then runs on its own thread: it takes the key's
//! lock (so two `mpcs run`s on one cache compute each entry once), looks again, executes into a staging
//! directory and publishes the entry atomically. A failure fails its descendants only; without `keep_going` no
//! new node starts after the first failure. Ctrl-C stops launching, terminates running commands (SIGTERM, then
//! SIGKILL after a grace period) and publishes nothing half-done.

pub mod devices;
pub mod progress;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cache::journal::{now_unix, Journal, Record, Status};
use crate::cache::{hostname, Cache, Manifest};
use crate::error::{Error, Result};
use crate::experiment::Experiment;
use crate::plan::key::Action;
use crate::plan::{action_for, Plan};
use crate::stages::{DeviceAssignment, ExecContext, InputDir, StageFailure};
use progress::{Event, Outcome, Reporter};

pub struct RunOptions {
    /// Nodes running at once.
    pub jobs: usize,
    /// GPU slots (ids); empty = none.
    pub gpus: Vec<String>,
    pub keep_going: bool,
    /// Seconds between SIGTERM and SIGKILL when interrupted.
    pub grace: Duration,
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
    pub failed: Vec<Failure>,
    pub skipped: Vec<String>,
    pub interrupted: bool,
    /// Output directory of every node that has one after the run (by node index).
    #[serde(skip)]
    pub outputs: Vec<Option<PathBuf>>,
}

/// Child processes of running command nodes, so an interrupt can end their process groups.
#[derive(Default)]
pub struct ProcessRegistry {
    next: AtomicU64,
    pids: Mutex<HashMap<u64, i32>>,
}

impl ProcessRegistry {
    pub fn register(&self, pid: i32) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.pids.lock() {
            p.insert(token, pid);
        }
        token
    }
    pub fn unregister(&self, token: u64) {
        if let Ok(mut p) = self.pids.lock() {
            p.remove(&token);
        }
    }
    /// Sends `signal` to the process group of every registered child.
    pub fn signal_all(&self, signal: i32) {
        if let Ok(p) = self.pids.lock() {
            for &pid in p.values() {
                // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
                unsafe {
                    libc::kill(-pid, signal);
                }
            }
        }
    }
}

enum NodeResult {
    /// `executed` is false when another run published the entry while we waited for the key's lock.
    Done {
        manifest: Box<Manifest>,
        executed: bool,
    },
    Failed {
        message: String,
        log: Option<PathBuf>,
    },
    Cancelled,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Waiting,
    Ready,
    Running,
    Done,
    Failed,
    Skipped,
}

/// Runs every node of `plan` that is not cached.
pub fn run(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    opts: &RunOptions,
    reporter: &dyn Reporter,
    cancel: &Arc<AtomicBool>,
) -> Result<RunSummary> {
    let n = plan.nodes.len();
    let mut pool = devices::Pool::new(opts.gpus.clone());
    let mut gpu_nodes = 0usize;
    for stage in &exp.stages {
        devices::check_demand(stage.gpus, &pool, &stage.name)?;
    }
    for node in &plan.nodes {
        if exp.stages[node.stage].gpus > 0 {
            gpu_nodes += 1;
        }
    }
    if gpu_nodes > 0 && pool.is_empty() {
        reporter.event(Event::Notice(&format!(
            "no GPU found: the {gpu_nodes} GPU node(s) will run on the CPU (--devices LIST hands out GPUs)"
        )));
    }

    cache.sweep_stale_staging();
    let journal = Journal::open(cache, &exp.name);
    let last = journal.load()?;
    let mut last_flush = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    let mut summary = RunSummary { outputs: vec![None; n], ..Default::default() };
    let mut digest: Vec<Option<String>> = vec![None; n];
    let mut keys: Vec<Option<(String, Action)>> = vec![None; n];
    let mut state = vec![St::Waiting; n];
    let mut waiting_on: Vec<usize> = plan.nodes.iter().map(|nd| nd.inputs.len()).collect();

    // Sources first: fingerprinted in place (a missing path is an input error before anything runs).
    for &i in &plan.order {
        let node = &plan.nodes[i];
        let decl = &exp.stages[node.stage];
        if let Some(src) = decl.spec.as_source() {
            let last_digest = last.get(&node.id).and_then(|r| r.digest.as_deref());
            let (path, digest_now, changed) = src.fingerprint(exp, decl, cache, last_digest)?;
            if changed {
                let action = Action {
                    kind: "source".into(),
                    version: decl.spec.version(),
                    params: Default::default(),
                    inputs: vec![],
                };
                records.push(Record {
                    node: node.id.clone(),
                    status: Status::Ok,
                    key: digest_now[..32].to_string(),
                    action,
                    digest: Some(digest_now.clone()),
                    time_unix: now_unix(),
                    log: None,
                    error: None,
                });
                summary.executed.push(node.id.clone());
            } else {
                summary.cached.push(node.id.clone());
            }
            digest[i] = Some(digest_now);
            summary.outputs[i] = Some(path);
            state[i] = St::Done;
        }
    }
    reporter.event(Event::Planned { total: n, cached: 0 });

    let processes = ProcessRegistry::default();
    let mut ready: Vec<usize> = Vec::new();
    let mut newly: Vec<usize> = Vec::new();
    for &i in &plan.order {
        if state[i] == St::Done {
            for &c in &plan.children[i] {
                waiting_on[c] -= 1;
            }
        }
    }
    for &i in &plan.order {
        if state[i] == St::Waiting && waiting_on[i] == 0 {
            newly.push(i);
        }
    }

    let gpus_managed = !pool.is_empty();
    let mut stop = false;
    let mut cancel_seen: Option<Instant> = None;
    let mut killed = false;
    let mut running = 0usize;
    let mut held_slots: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut started_at: HashMap<usize, Instant> = HashMap::new();

    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = mpsc::channel::<(usize, Result<NodeResult>)>();
        loop {
            // Resolve nodes whose inputs are all known: a cache hit completes at once and may make more ready.
            while let Some(i) = newly.pop() {
                let action = action_for(exp, plan, i, &digest).ok_or_else(|| {
                    Error::internal(format!("node {} became ready with an unknown input", plan.nodes[i].id))
                })?;
                let key = action.key();
                if let Some(m) = cache.lookup(&key)? {
                    note_record(
                        &mut records,
                        &last,
                        &plan.nodes[i].id,
                        &key,
                        &action,
                        Status::Ok,
                        Some(&m.output_digest),
                        None,
                        None,
                    );
                    digest[i] = Some(m.output_digest);
                    summary.outputs[i] = Some(cache.entry_out(&key));
                    state[i] = St::Done;
                    summary.cached.push(plan.nodes[i].id.clone());
                    reporter.event(Event::Finished { node: &plan.nodes[i].id, outcome: Outcome::Cached, seconds: 0.0 });
                    for &c in &plan.children[i] {
                        waiting_on[c] -= 1;
                        if waiting_on[c] == 0 && state[c] == St::Waiting {
                            newly.push(c);
                        }
                    }
                } else {
                    state[i] = St::Ready;
                    ready.push(i);
                }
                keys[i] = Some((key, action));
            }

            if cancel.load(Ordering::Relaxed) && cancel_seen.is_none() {
                cancel_seen = Some(Instant::now());
                stop = true;
                summary.interrupted = true;
                reporter.event(Event::Notice("interrupted: stopping running nodes; nothing half-done is published"));
                processes.signal_all(libc::SIGTERM);
            }
            if let Some(t) = cancel_seen {
                if !killed && t.elapsed() >= opts.grace {
                    processes.signal_all(libc::SIGKILL);
                    killed = true;
                }
            }

            // Launch: highest priority first, skipping nodes whose GPU slots are busy.
            if !stop {
                ready.sort_by_key(|&i| (std::cmp::Reverse(plan.priority[i]), i));
                let mut k = 0;
                while k < ready.len() && running < opts.jobs.max(1) {
                    let i = ready[k];
                    let want = exp.stages[plan.nodes[i].stage].gpus as usize;
                    let slots = if want == 0 || pool.is_empty() { Some(Vec::new()) } else { pool.take(want) };
                    let Some(slots) = slots else {
                        k += 1;
                        continue;
                    };
                    ready.remove(k);
                    let device = DeviceAssignment { gpus: pool.ids_of(&slots), gpus_managed };
                    held_slots.insert(i, slots);
                    state[i] = St::Running;
                    running += 1;
                    started_at.insert(i, Instant::now());
                    let (key, action) = keys[i].clone().ok_or_else(|| Error::internal("ready node without key"))?;
                    let inputs: Vec<InputDir> = plan.nodes[i]
                        .inputs
                        .iter()
                        .map(|&j| InputDir {
                            node: plan.nodes[j].id.clone(),
                            stage: exp.stages[plan.nodes[j].stage].name.clone(),
                            matrix: plan.nodes[j].matrix.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
                            path: summary.outputs[j].clone().unwrap_or_default(),
                        })
                        .collect();
                    let tx = tx.clone();
                    let processes = &processes;
                    // With RAYON_NUM_THREADS set, every node gets that many, as before.
                    let pool = rayon::current_num_threads();
                    let threads = if std::env::var_os("RAYON_NUM_THREADS").is_some() {
                        pool
                    } else {
                        cpu_share(pool, opts.jobs, running, ready.len())
                    };
                    scope.spawn(move || {
                        let r = crate::runtime::with_cpu_threads(threads, || {
                            execute_node(exp, plan, cache, i, key, action, inputs, device, cancel, processes, reporter)
                        });
                        let _ = tx.send((i, r));
                    });
                }
            }

            if running == 0 {
                break;
            }
            let (i, result) = match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            running -= 1;
            if let Some(slots) = held_slots.remove(&i) {
                pool.give_back(&slots);
            }
            let seconds = started_at.remove(&i).map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
            let id = plan.nodes[i].id.clone();
            let (key, action) = keys[i].clone().ok_or_else(|| Error::internal("finished node without key"))?;
            match result? {
                NodeResult::Done { manifest: m, executed } => {
                    note_record(
                        &mut records,
                        &last,
                        &id,
                        &key,
                        &action,
                        Status::Ok,
                        Some(&m.output_digest),
                        None,
                        None,
                    );
                    digest[i] = Some(m.output_digest.clone());
                    summary.outputs[i] = Some(cache.entry_out(&key));
                    state[i] = St::Done;
                    let outcome = if executed { Outcome::Executed } else { Outcome::Cached };
                    if executed {
                        summary.executed.push(id.clone());
                    } else {
                        summary.cached.push(id.clone());
                    }
                    reporter.event(Event::Finished { node: &id, outcome, seconds });
                }
                NodeResult::Failed { message, log } => {
                    note_record(
                        &mut records,
                        &last,
                        &id,
                        &key,
                        &action,
                        Status::Failed,
                        None,
                        log.as_ref(),
                        Some(&message),
                    );
                    state[i] = St::Failed;
                    summary.failed.push(Failure { node: id.clone(), message, log });
                    reporter.event(Event::Finished { node: &id, outcome: Outcome::Failed, seconds });
                    if !opts.keep_going {
                        stop = true;
                    }
                    skip_descendants(plan, i, &mut state, &mut summary, reporter);
                }
                NodeResult::Cancelled => {
                    state[i] = St::Skipped;
                    summary.skipped.push(id.clone());
                    reporter.event(Event::Finished { node: &id, outcome: Outcome::Skipped, seconds });
                }
            }
            if state[i] == St::Done {
                for &c in &plan.children[i] {
                    waiting_on[c] -= 1;
                    if waiting_on[c] == 0 && state[c] == St::Waiting {
                        newly.push(c);
                    }
                }
            }
            // Flush journal records every so often (they are advice for `--why`; entries are the truth, so a crash
            // that loses the last few records loses nothing that matters).
            if records.len() >= 64 || last_flush.elapsed() >= Duration::from_millis(500) {
                journal.append(&records)?;
                records.clear();
                last_flush = Instant::now();
            }
        }
        Ok(())
    })?;
    journal.append(&records)?;

    for &i in &plan.order {
        if matches!(state[i], St::Waiting | St::Ready) {
            summary.skipped.push(plan.nodes[i].id.clone());
        }
    }
    Ok(summary)
}

fn skip_descendants(plan: &Plan, i: usize, state: &mut [St], summary: &mut RunSummary, reporter: &dyn Reporter) {
    let mut stack = plan.children[i].clone();
    while let Some(c) = stack.pop() {
        if matches!(state[c], St::Waiting | St::Ready) {
            state[c] = St::Skipped;
            summary.skipped.push(plan.nodes[c].id.clone());
            reporter.event(Event::Finished { node: &plan.nodes[c].id, outcome: Outcome::Skipped, seconds: 0.0 });
            stack.extend(plan.children[c].iter().copied());
        }
    }
}

/// Adds a journal record when the node's recorded state changes (new key or new status).
#[allow(clippy::too_many_arguments)]
fn note_record(
    records: &mut Vec<Record>,
    last: &HashMap<String, Record>,
    id: &str,
    key: &str,
    action: &Action,
    status: Status,
    digest: Option<&String>,
    log: Option<&PathBuf>,
    error: Option<&String>,
) {
    if status == Status::Ok && last.get(id).is_some_and(|r| r.key == key && r.status == Status::Ok) {
        return;
    }
    records.push(Record {
        node: id.to_string(),
        status,
        key: key.to_string(),
        action: action.clone(),
        digest: digest.cloned(),
        time_unix: now_unix(),
        log: log.map(|p| p.to_string_lossy().into_owned()),
        error: error.cloned(),
    });
}

/// CPU threads for a node launched now: the `cores` shared between the nodes that will run at
/// once (`running`, this one included, plus those still waiting, at most `jobs`). A share fixed
/// at launch: a node that started beside others keeps its share after they finish.
fn cpu_share(cores: usize, jobs: usize, running: usize, waiting: usize) -> usize {
    let at_once = (running + waiting).clamp(1, jobs.max(1));
    (cores / at_once).max(1)
}

#[allow(clippy::too_many_arguments)]
fn execute_node(
    exp: &Experiment,
    plan: &Plan,
    cache: &Cache,
    i: usize,
    key: String,
    action: Action,
    inputs: Vec<InputDir>,
    device: DeviceAssignment,
    cancel: &Arc<AtomicBool>,
    processes: &ProcessRegistry,
    reporter: &dyn Reporter,
) -> Result<NodeResult> {
    let node = &plan.nodes[i];
    let decl = &exp.stages[node.stage];
    // Poll the lock so an interrupt is noticed while another run holds it.
    let lock = loop {
        if let Some(l) = cache.try_lock(&key)? {
            break l;
        }
        if cancel.load(Ordering::Relaxed) {
            return Ok(NodeResult::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(m) = cache.lookup(&key)? {
        return Ok(NodeResult::Done { manifest: Box::new(m), executed: false });
    }
    if cancel.load(Ordering::Relaxed) {
        return Ok(NodeResult::Cancelled);
    }
    let staging = cache.begin(&key, &lock)?;
    let label = device.label();
    reporter.event(Event::Started { node: &node.id, device: &label });
    let started_unix = now_unix();
    let t0 = Instant::now();
    let progress = |done: u64, total: Option<u64>, message: &str| {
        reporter.event(Event::Progress { node: &node.id, done, total, message });
    };
    let ctx = ExecContext {
        exp,
        decl,
        node,
        out: &staging.out,
        log: &staging.log,
        scratch: cache.scratch_dir(&key),
        inputs,
        device,
        cancel,
        processes,
        progress: &progress,
        notice: &|msg: &str| reporter.event(Event::Notice(msg)),
    };
    match decl.spec.execute(&ctx) {
        Ok(metrics) => {
            if cancel.load(Ordering::Relaxed) {
                let _ = cache.discard(staging, &key);
                return Ok(NodeResult::Cancelled);
            }
            let manifest = Manifest {
                format: 0,
                key: key.clone(),
                node: node.id.clone(),
                experiment: exp.name.clone(),
                action,
                output_digest: String::new(),
                files: Vec::new(),
                started_unix,
                duration_s: t0.elapsed().as_secs_f64(),
                device: label,
                host: hostname(),
                tool_version: env!("CARGO_PKG_VERSION").to_string(),
                seed: node.seed,
                metrics,
            };
            let published = cache.publish(staging, manifest, &lock)?;
            // The scratch area (checkpoints) is only needed until the entry exists.
            let _ = std::fs::remove_dir_all(cache.scratch_dir(&key));
            Ok(NodeResult::Done { manifest: Box::new(published), executed: true })
        }
        Err(StageFailure(message)) => {
            let log = cache.discard(staging, &key);
            if cancel.load(Ordering::Relaxed) {
                return Ok(NodeResult::Cancelled);
            }
            Ok(NodeResult::Failed { message, log: Some(log) })
        }
    }
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
