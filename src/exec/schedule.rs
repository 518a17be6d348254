//! The scheduler: walks the DAG against the cache and hands the nodes that must run to an [`Executor`].
//!
//! A node becomes ready when all its inputs have output digests; then the resolver computes its key and looks
//! it up. A hit is `cached` at once; a miss waits in the ready set, highest priority (longest remaining path)
//! first, until the executor has room. A failure fails its descendants only; without `keep_going` no new node
//! starts after the first failure. Ctrl-C stops launching, asks the executor to end running nodes (SIGTERM,
//! then SIGKILL after a grace period) and publishes nothing half-done.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::executor::{Executor, Finished, Launch};
use super::kind::{EntryRef, InputDir};
use super::progress::{Event, Outcome, Reporter};
use super::resolve::{source_key, Resolution, Resolver};
use super::worker::{Job, NodeOutcome};
use super::{Failure, RunOptions, RunSummary};
use crate::cache::journal::{Journal, Record, Status};
use crate::cache::EntryHead;
use crate::error::{Error, Result};
use crate::plan::key::Action;
use crate::remote::Pull;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Waiting,
    Ready,
    Running,
    Done,
    Failed,
    Skipped,
}

/// Nodes whose key is known and not cached, by priority (longest remaining path first, then file order).
#[derive(Default)]
struct ReadySet(BinaryHeap<(u32, Reverse<usize>)>);

/// Journal records, written in batches: they are advice for `--why`; entries are the truth, so a crash that
/// loses the last few records loses nothing that matters.
struct JournalWriter {
    journal: Journal,
    pending: Vec<Record>,
    flushed: Instant,
}

impl JournalWriter {
    /// Whether `last` already records node `id` as done with `key`.
    fn is_recorded(&self, last: &HashMap<String, Record>, id: &str, key: &str) -> bool {
        last.get(id).is_some_and(|r| r.key == key && r.status == Status::Ok)
    }

    /// Records a node's state when it differs from its `last` record (a new key or a new status).
    fn note(&mut self, last: &HashMap<String, Record>, record: Record) -> Result<()> {
        if !(record.status == Status::Ok && self.is_recorded(last, &record.node, &record.key)) {
            self.pending.push(record);
        }
        if self.pending.len() >= 64 || self.flushed.elapsed() >= Duration::from_millis(500) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.journal.append(&self.pending)?;
        self.pending.clear();
        self.flushed = Instant::now();
        Ok(())
    }
}

/// One run's bookkeeping.
pub struct Scheduler<'a> {
    resolver: Resolver<'a>,
    opts: &'a RunOptions,
    reporter: &'a dyn Reporter,
    state: Vec<St>,
    digest: Vec<Option<String>>,
    keys: Vec<Option<(String, Action)>>,
    /// The published entry of each done node that is not a source (what its consumers read).
    entries: Vec<Option<EntryRef>>,
    /// How often each node's entry was found damaged and computed again this run (bounded).
    recomputed: Vec<u8>,
    waiting_on: Vec<usize>,
    newly: Vec<usize>,
    ready: ReadySet,
    started: HashMap<usize, Instant>,
    journal: JournalWriter,
    stop: bool,
    /// Where computed entries go when the run has a remote cache it may write.
    pusher: Option<&'a crate::remote::Pusher>,
    pub summary: RunSummary,
}

impl<'a> Scheduler<'a> {
    pub fn new(
        resolver: Resolver<'a>,
        opts: &'a RunOptions,
        reporter: &'a dyn Reporter,
        pusher: Option<&'a crate::remote::Pusher>,
    ) -> Scheduler<'a> {
        let plan = &resolver.project.plan;
        let n = plan.nodes.len();
        let journal = JournalWriter {
            journal: Journal::open(resolver.cache, &resolver.project.exp.name, &resolver.project.exp.path),
            pending: Vec::new(),
            flushed: Instant::now(),
        };
        Scheduler {
            opts,
            reporter,
            state: vec![St::Waiting; n],
            digest: vec![None; n],
            keys: vec![None; n],
            entries: vec![None; n],
            recomputed: vec![0; n],
            waiting_on: plan.nodes.iter().map(|nd| nd.inputs.len()).collect(),
            newly: Vec::new(),
            ready: ReadySet::default(),
            started: HashMap::new(),
            journal,
            stop: false,
            pusher,
            summary: RunSummary { outputs: vec![None; n], ..Default::default() },
            resolver,
        }
    }

    /// Runs every node that is not cached on `executor`.
    pub fn run(mut self, executor: &mut dyn Executor, cancel: &AtomicBool) -> Result<RunSummary> {
        self.settle_sources()?;
        let mut cancelled_at: Option<Instant> = None;
        let mut killed = false;
        loop {
            self.resolve_newly_ready()?;
            if cancel.load(Ordering::Relaxed) && cancelled_at.is_none() {
                cancelled_at = Some(Instant::now());
                self.stop = true;
                self.summary.interrupted = true;
                self.reporter
                    .event(Event::Notice("interrupted: stopping running nodes; nothing half-done is published"));
                executor.interrupt(false);
            }
            if !killed && cancelled_at.is_some_and(|t| t.elapsed() >= self.opts.grace) {
                executor.interrupt(true);
                killed = true;
            }
            if !self.stop {
                self.launch(executor)?;
            }
            if !executor.busy() {
                break;
            }
            if let Some(finished) = executor.wait(Duration::from_millis(100)) {
                self.finish(finished)?;
            }
        }
        self.journal.flush()?;
        self.summary.executor = executor.report();
        let plan = &self.resolver.project.plan;
        for &i in &plan.order {
            if matches!(self.state[i], St::Waiting | St::Ready) {
                self.summary.skipped.push(plan.nodes[i].id.clone());
            }
        }
        Ok(self.summary)
    }

    /// Sources first: fingerprinted in place (a missing path is an input error before anything runs).
    fn settle_sources(&mut self) -> Result<()> {
        let project = self.resolver.project;
        for &i in &project.plan.order {
            if project.source_of(i).is_none() {
                continue;
            }
            let Resolution::Source { path, digest } = self.resolver.resolve(i, &self.digest)? else {
                return Err(Error::internal("a source did not resolve to a digest"));
            };
            let id = project.plan.nodes[i].id.clone();
            if self.resolver.source_changed(i, &digest) {
                let action = project.action(i, &self.digest).ok_or_else(|| Error::internal("source with inputs"))?;
                self.journal.note(&self.resolver.last, Record::ok(&id, source_key(&digest), action, &digest))?;
                self.summary.executed.push(id);
            } else {
                self.summary.cached.push(id);
            }
            self.summary.outputs[i] = Some(path);
            self.complete(i, digest);
        }
        let total = project.plan.nodes.len();
        self.reporter.event(Event::Planned { total });
        // Nodes without inputs (the sources' consumers were queued as the sources completed).
        for &i in &project.plan.order {
            if self.state[i] == St::Waiting && project.plan.nodes[i].inputs.is_empty() {
                self.newly.push(i);
            }
        }
        Ok(())
    }

    /// Marks node `i` done with output `digest` and queues the consumers whose inputs are now all known.
    fn complete(&mut self, i: usize, digest: String) {
        self.digest[i] = Some(digest);
        self.state[i] = St::Done;
        for c in self.resolver.project.plan.consumers(i) {
            // Only waiting consumers count their inputs (one that is done already read this input's old
            // entry, before it was found damaged and computed again).
            if self.state[c] == St::Waiting {
                self.waiting_on[c] -= 1;
                if self.waiting_on[c] == 0 {
                    self.newly.push(c);
                }
            }
        }
    }

    /// Resolves nodes whose inputs are all known: a cache hit completes at once and may make more ready.
    fn resolve_newly_ready(&mut self) -> Result<()> {
        let plan = &self.resolver.project.plan;
        // In waves: every node that became ready is resolved, the misses the remote has are pulled together (in
        // parallel), and the nodes they complete make the next wave.
        while !self.newly.is_empty() {
            let mut wave = Vec::new();
            for i in std::mem::take(&mut self.newly).into_iter().rev() {
                let Resolution::Known { key, cached } = self.resolver.resolve(i, &self.digest)? else {
                    return Err(Error::internal(format!(
                        "node {} became ready with an unknown input",
                        plan.nodes[i].id
                    )));
                };
                wave.push((i, key, cached));
            }
            let mut pulled = self.pull_wave(&wave)?;
            for (n, (i, key, cached)) in wave.into_iter().enumerate() {
                let from_remote = pulled[n].take();
                let is_pulled = from_remote.is_some();
                let cached = cached.or(from_remote);
                let action =
                    || self.resolver.project.action(i, &self.digest).ok_or_else(|| Error::internal("no action"));
                match cached {
                    Some(head) => {
                        let digest = head.output_digest;
                        self.entries[i] = Some(EntryRef { key: key.clone(), stat: head.stat });
                        let id = plan.nodes[i].id.clone();
                        // Only a node whose recorded key changed costs a journal record (and building its action).
                        if !self.journal.is_recorded(&self.resolver.last, &id, &key) {
                            let record = Record::ok(&id, key.clone(), action()?, &digest);
                            self.journal.note(&self.resolver.last, record)?;
                        }
                        self.summary.outputs[i] = Some(self.resolver.cache.entry_out(&key));
                        let outcome = if is_pulled { Outcome::Pulled } else { Outcome::Cached };
                        self.reporter.event(Event::Finished { node: &id, outcome, seconds: 0.0 });
                        if is_pulled { &mut self.summary.pulled } else { &mut self.summary.cached }.push(id);
                        self.complete(i, digest);
                    }
                    None => {
                        let action = action()?;
                        self.state[i] = St::Ready;
                        self.ready.0.push((plan.priority[i], Reverse(i)));
                        self.keys[i] = Some((key, action));
                    }
                }
            }
        }
        Ok(())
    }

    /// The entries of a wave's local misses that the remote cache has, pulled together (a wave of 80
    /// fine-tunes would be 80 round trips one after another otherwise). A damaged or unreachable remote entry is
    /// a notice, and its node runs. Aligned with `wave`; None where nothing was pulled.
    fn pull_wave(&self, wave: &[(usize, String, Option<EntryHead>)]) -> Result<Vec<Option<EntryHead>>> {
        let mut out: Vec<Option<EntryHead>> = (0..wave.len()).map(|_| None).collect();
        let Some(remote) = self.opts.remote.as_deref().filter(|r| r.mode.reads()) else { return Ok(out) };
        let wanted: Vec<usize> = (0..wave.len()).filter(|&n| wave[n].2.is_none() && remote.has(&wave[n].1)).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let keys: Vec<&str> = wanted.iter().map(|&n| wave[n].1.as_str()).collect();
        let results = wanted.iter().copied().zip(remote.pull_many(self.resolver.cache, &keys));
        for (n, result) in results {
            match result? {
                Pull::Pulled(m) => out[n] = Some(EntryHead { output_digest: m.output_digest, stat: m.stat }),
                Pull::Busy | Pull::Absent => {}
                Pull::Unusable(why) => {
                    let id = &self.resolver.project.plan.nodes[wave[n].0].id;
                    let notice = format!("the remote entry of `{id}` cannot be used ({why}): running it here instead");
                    self.reporter.event(Event::Notice(&notice));
                }
            }
        }
        Ok(out)
    }

    /// Hands ready nodes to the executor, highest priority first, until it has no room; a node that does not
    /// fit (its GPU slots are busy) lets lower-priority nodes go ahead.
    fn launch(&mut self, executor: &mut dyn Executor) -> Result<()> {
        let mut passed = Vec::new();
        while let Some((prio, Reverse(i))) = self.ready.0.pop() {
            if self.state[i] != St::Ready {
                continue;
            }
            let job = self.job(i)?;
            match executor.try_launch(job, self.ready.0.len()) {
                Launch::Started => {
                    self.state[i] = St::Running;
                    self.started.insert(i, Instant::now());
                }
                Launch::NotThisOne(job) => {
                    self.keys[i] = Some((job.key, job.action));
                    passed.push((prio, Reverse(i)));
                }
                Launch::Full(job) => {
                    self.keys[i] = Some((job.key, job.action));
                    passed.push((prio, Reverse(i)));
                    break;
                }
            }
        }
        self.ready.0.extend(passed);
        Ok(())
    }

    fn job(&mut self, i: usize) -> Result<Job> {
        let project = self.resolver.project;
        let (key, action) = self.keys[i].take().ok_or_else(|| Error::internal("ready node without key"))?;
        let plan = &project.plan;
        let inputs = plan.nodes[i]
            .inputs
            .iter()
            .map(|&j| {
                let stage = &project.exp.stages[plan.nodes[j].stage];
                InputDir {
                    node: plan.nodes[j].id.clone(),
                    stage: stage.name.clone(),
                    kind: stage.kind.clone(),
                    matrix: plan.nodes[j].matrix.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
                    path: self.summary.outputs[j].clone().unwrap_or_default(),
                    entry: self.entries[j].clone(),
                }
            })
            .collect();
        let gpus = project.exp.stages[plan.nodes[i].stage].gpus;
        Ok(Job { index: i, key, action, inputs, gpus })
    }

    /// Applies a finished job's outcome.
    fn finish(&mut self, (i, result): Finished) -> Result<()> {
        let project = self.resolver.project;
        let seconds = self.started.remove(&i).map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let id = project.plan.nodes[i].id.clone();
        match result? {
            NodeOutcome::Done { manifest: m, executed } => {
                let key = m.key.clone();
                self.journal
                    .note(&self.resolver.last, Record::ok(&id, key.clone(), m.action.clone(), &m.output_digest))?;
                self.summary.outputs[i] = Some(self.resolver.cache.entry_out(&key));
                self.entries[i] = Some(EntryRef { key, stat: m.stat });
                let outcome = if executed { Outcome::Executed } else { Outcome::Cached };
                self.reporter.event(Event::Finished { node: &id, outcome, seconds });
                if let Some(pusher) = self.pusher.filter(|_| executed) {
                    pusher.push(&id, &m.key);
                }
                if executed { &mut self.summary.executed } else { &mut self.summary.cached }.push(id);
                self.complete(i, m.output_digest);
            }
            NodeOutcome::Failed { message, log } => self.fail(i, message, log, seconds)?,
            NodeOutcome::InputDamaged { input, reason } => self.recompute_input(i, input, reason)?,
            NodeOutcome::Cancelled => {
                self.state[i] = St::Skipped;
                self.reporter.event(Event::Finished { node: &id, outcome: Outcome::Interrupted, seconds });
                self.summary.skipped.push(id);
            }
        }
        Ok(())
    }

    /// Node `i` found its input number `input` damaged (and removed it): that input runs again, and `i` and the
    /// input's other consumers that have not started wait for it (their keys may change with its new output).
    fn recompute_input(&mut self, i: usize, input: usize, reason: String) -> Result<()> {
        let project = self.resolver.project;
        let plan = &project.plan;
        let j = plan.nodes[i].inputs[input];
        let entry = self.entries[j].take().ok_or_else(|| Error::internal("a damaged input that is no entry"))?;
        self.recomputed[j] += 1;
        if self.recomputed[j] > 2 {
            let message = format!(
                "its input `{}` was damaged again after being computed anew ({reason}); something keeps changing \
                 the cache entry {}: find it, then run again",
                plan.nodes[j].id,
                self.resolver.cache.entry_dir(&entry.key).display()
            );
            return self.fail(i, message, None, 0.0);
        }
        let notice = format!(
            "the cache entry of `{}` is damaged ({reason}): removed; computing it again before `{}`",
            plan.nodes[j].id, plan.nodes[i].id
        );
        self.reporter.event(Event::Notice(&notice));
        let id = &plan.nodes[j].id;
        self.summary.cached.retain(|x| x != id);
        self.summary.executed.retain(|x| x != id);
        // The input's consumers that have not started wait for it again; `i` itself is one of them.
        self.state[i] = St::Ready;
        for c in plan.consumers(j) {
            if matches!(self.state[c], St::Waiting | St::Ready) {
                self.state[c] = St::Waiting;
                self.keys[c] = None;
                self.waiting_on[c] += 1;
            }
        }
        let action = project.action(j, &self.digest).ok_or_else(|| Error::internal("damaged input without inputs"))?;
        self.digest[j] = None;
        self.summary.outputs[j] = None;
        self.keys[j] = Some((entry.key, action));
        self.state[j] = St::Ready;
        self.ready.0.push((plan.priority[j], Reverse(j)));
        Ok(())
    }

    fn fail(&mut self, i: usize, message: String, log: Option<PathBuf>, seconds: f64) -> Result<()> {
        let project = self.resolver.project;
        let id = project.plan.nodes[i].id.clone();
        let action = project.action(i, &self.digest).ok_or_else(|| Error::internal("failed node without inputs"))?;
        self.journal.note(&self.resolver.last, Record::failed(&id, action, log.as_deref(), &message))?;
        self.state[i] = St::Failed;
        self.reporter.event(Event::Finished { node: &id, outcome: Outcome::Failed, seconds });
        self.summary.failed.push(Failure { node: id, message, log });
        if !self.opts.keep_going {
            self.stop = true;
        }
        self.skip_descendants(i);
        Ok(())
    }

    fn skip_descendants(&mut self, i: usize) {
        let plan = &self.resolver.project.plan;
        let mut stack: Vec<usize> = plan.consumers(i).collect();
        while let Some(c) = stack.pop() {
            if matches!(self.state[c], St::Waiting | St::Ready) {
                self.state[c] = St::Skipped;
                self.summary.skipped.push(plan.nodes[c].id.clone());
                self.reporter.event(Event::Finished {
                    node: &plan.nodes[c].id,
                    outcome: Outcome::Skipped,
                    seconds: 0.0,
                });
                stack.extend(plan.consumers(c));
            }
        }
    }
}
