//! The Slurm executor: each node that must run becomes one `sbatch` job running `mpcs worker JOBFILE` on a
//! compute node, which executes the node with [`WorkerEnv::run`] and publishes into the shared cache.
//!
//! **Completion is read from the cache, not from Slurm.** A job is done when its entry's manifest exists (read
//! with open(2), which NFS's close-to-open consistency makes current), and a node that failed says so in a
//! result file beside its job file; both are checked every 200 ms by stat(2), which costs slurmctld nothing.
//! Slurm is asked only about jobs that *died* without a word (scancel, time or memory limit, a lost node): one
//! `squeue` per round for the whole run (its jobs share one name), backing off from `poll_min` to `poll_max`
//! while nothing changes. So there is no latency-wait knob, and no accounting is needed; where the cluster has
//! it, one `sacct` for the jobs that died in a round adds exit codes and covers jobs squeue forgot.
//!
//! Near its time limit a job's worker gets SIGUSR1 (`--signal`), stops its node and requeues its own job, which
//! resumes from the node's checkpoints.
//!
//! A second `mpcs run` on the same cache adopts jobs still queued or running for the keys it needs (a record per
//! key names the job), instead of submitting them again. Ctrl-C cancels every job of the run with one `scancel`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::executor::{Executor, Finished, Launch};
use super::kind::InputDir;
use super::project::Project;
use super::worker::{Job, NodeOutcome};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::plan::key::Action;

/// How jobs are submitted: the `[slurm]` table of a profile file (`--profile`), with per-stage overrides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub qos: Option<String>,
    /// `--time` of every job (e.g. "2:00:00").
    #[serde(default)]
    pub time: Option<String>,
    /// `--mem` of every job (e.g. "16G").
    #[serde(default)]
    pub mem: Option<String>,
    /// `--cpus-per-task`: the node's CPU share (its thread count).
    #[serde(default = "one")]
    pub cpus: usize,
    /// More `sbatch` arguments, as written.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// The `mpcs` binary as the compute nodes see it (default: this one, which needs a shared filesystem).
    #[serde(default)]
    pub mpcs: Option<PathBuf>,
    /// Jobs in the queue at once.
    #[serde(default = "max_jobs")]
    pub max_jobs: usize,
    /// Seconds before a job's time limit at which Slurm warns its worker (`--signal=B:USR1@N`; 0: no warning).
    /// The worker then stops the node (its checkpoints stay in the node's scratch area) and requeues the job,
    /// which resumes from them: a 1000-epoch pretraining runs on through any number of time-limited jobs.
    #[serde(default = "signal_before")]
    pub signal_before_s: u32,
    /// How often one node's job may requeue itself that way; after that it runs until Slurm stops it (TIMEOUT),
    /// so a node that cannot make progress within the time limit fails instead of looping.
    #[serde(default = "time_limit_requeues")]
    pub time_limit_requeues: u32,
    /// Seconds between two `squeue` queries, backing off from the first to the second while nothing changes.
    #[serde(default = "poll_min")]
    pub poll_min_s: f64,
    #[serde(default = "poll_max")]
    pub poll_max_s: f64,
    /// Overrides by stage kind (`[slurm.kind.finetune]`) and, over those, by stage name (`[slurm.stage.NAME]`):
    /// partition, time, mem, cpus, sbatch_args.
    #[serde(default)]
    pub kind: BTreeMap<String, StageResources>,
    #[serde(default)]
    pub stage: BTreeMap<String, StageResources>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageResources {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub mem: Option<String>,
    pub cpus: Option<usize>,
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

fn one() -> usize {
    1
}
fn max_jobs() -> usize {
    1000
}
fn signal_before() -> u32 {
    300
}
fn time_limit_requeues() -> u32 {
    5
}
fn poll_min() -> f64 {
    5.0
}
fn poll_max() -> f64 {
    120.0
}

impl Default for SlurmOptions {
    fn default() -> Self {
        toml::from_str("").expect("the defaults parse")
    }
}

impl SlurmOptions {
    /// The settings of a run: the experiment's `[executor.slurm]` table, with the `[slurm]` table of a profile
    /// file (kept per cluster) over it, key by key (per-stage tables merged too).
    pub fn resolve(experiment: Option<&toml::Table>, profile: Option<&Path>) -> Result<SlurmOptions> {
        let mut merged =
            experiment.and_then(|t| t.get("slurm")).and_then(|v| v.as_table()).cloned().unwrap_or_default();
        if let Some(path) = profile {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read the profile", path, e))?;
            let mut table: toml::Table =
                toml::from_str(&text).map_err(|e| Error::user(format!("profile {}: {e}", path.display())))?;
            if let Some(extra) = table.keys().find(|k| *k != "slurm" && *k != "cache") {
                return Err(Error::user(format!(
                    "profile {}: unknown table or key `{extra}`; a profile holds a [slurm] and a [cache] table",
                    path.display()
                )));
            }
            if let Some(toml::Value::Table(over)) = table.remove("slurm") {
                merge(&mut merged, over);
            }
        }
        toml::Value::Table(merged).try_into().map_err(|e| {
            Error::user(format!("the Slurm settings ([executor.slurm] of the experiment, [slurm] of the profile): {e}"))
        })
    }
}

/// `over` written onto `base`: tables merge key by key, other values replace.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Where a run executes: `--executor` first, then the experiment's `[executor] kind`, then this machine.
pub fn choose_executor(
    flag: Option<&str>,
    profile: Option<&Path>,
    experiment: Option<&toml::Table>,
    sets: &[String],
) -> Result<super::ExecutorChoice> {
    let written = experiment.and_then(|t| t.get("kind")).and_then(|v| v.as_str());
    if let Some(extra) = experiment.and_then(|t| t.keys().find(|k| *k != "kind" && *k != "slurm")) {
        return Err(Error::user(format!(
            "[executor] has an unknown key `{extra}`: it takes `kind` and an [executor.slurm] table"
        )));
    }
    match flag.or(written).unwrap_or("local") {
        "local" => Ok(super::ExecutorChoice::Local),
        "slurm" => Ok(super::ExecutorChoice::Slurm {
            options: Box::new(SlurmOptions::resolve(experiment, profile)?),
            sets: sets.to_vec(),
        }),
        other => Err(Error::user(format!("unknown executor `{other}` in [executor] kind: use \"local\" or \"slurm\""))),
    }
}

/// What a job needs to run one node on a compute node: written by the submitter, read by `mpcs worker`.
#[derive(Serialize, Deserialize)]
pub struct JobFile {
    /// Absolute path of the experiment file and the `--set` overrides the submitter used.
    pub experiment: PathBuf,
    pub sets: Vec<String>,
    /// Absolute path of the cache root.
    pub cache: PathBuf,
    pub node: String,
    pub key: String,
    pub action: Action,
    pub inputs: Vec<InputDir>,
    pub gpus: u32,
    pub cpus: usize,
    /// The job's own output file (Slurm writes it; appended to the node's log).
    pub output: PathBuf,
    /// How often the job may requeue itself when its time limit is near (`time_limit_requeues`).
    pub time_limit_requeues: u32,
}

/// How a node ended on the compute node, when it did not publish an entry (written beside the job file).
#[derive(Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum JobResult {
    Failed { message: String, log: Option<PathBuf> },
    InputDamaged { input: usize, reason: String },
    Cancelled,
}

/// Counts of scheduler calls, for `-v` and the `--json` summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SlurmStats {
    pub sbatch: u64,
    pub squeue: u64,
    /// Asked only about jobs that died without a word, and not again once the cluster proved to have no accounting.
    pub sacct: u64,
    pub scancel: u64,
    pub adopted: u64,
}

/// `cache/v2/slurm/keys/<key>`: the job computing a key, so a later run can adopt it while it is queued or
/// running (and `graph` can show it). One line: `<job id> <job name> <job output file>`; removed when the job ends.
#[derive(Clone, Debug)]
pub struct KeyRecord {
    pub job_id: String,
    /// The job name, `mpcs-<run>`: the run's folder is `slurm/<run>/`.
    pub name: String,
    pub out: PathBuf,
}

impl KeyRecord {
    pub fn path(cache: &Cache, key: &str) -> PathBuf {
        Self::dir(cache).join(key)
    }

    pub fn dir(cache: &Cache) -> PathBuf {
        cache.root().join(crate::cache::FORMAT_DIR).join("slurm").join("keys")
    }

    pub fn read(path: &Path) -> Option<KeyRecord> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut parts = text.trim_end().splitn(3, ' ');
        let (job_id, name) = (parts.next()?.to_string(), parts.next()?.to_string());
        Some(KeyRecord { job_id, name, out: PathBuf::from(parts.next().unwrap_or("")) })
    }

    fn write(&self, cache: &Cache, key: &str) {
        let _ = std::fs::create_dir_all(Self::dir(cache));
        let line = format!("{} {} {}\n", self.job_id, self.name, self.out.display());
        // Best effort: without it a later run resubmits instead of adopting.
        let _ = crate::fsutil::write_atomic(&Self::path(cache, key), line.as_bytes());
    }

    /// The run's folder name (`<run>` of `mpcs-<run>`).
    pub fn run(&self) -> &str {
        self.name.trim_start_matches("mpcs-")
    }
}

/// How a job ended, as Slurm tells it.
#[derive(Clone)]
struct JobEnd {
    state: String,
    reason: String,
    /// `code:signal`, where accounting knows it.
    exit_code: Option<String>,
}

struct Submitted {
    index: usize,
    key: String,
    job_id: String,
    /// The job's name (the run that submitted it).
    name: String,
    result: PathBuf,
    out: PathBuf,
}

pub struct SlurmExecutor<'a> {
    project: &'a Project,
    cache: &'a Cache,
    opts: SlurmOptions,
    experiment: PathBuf,
    sets: Vec<String>,
    /// This run's folder for job files, scripts and job output: `<cache>/v2/slurm/<run>/`.
    dir: PathBuf,
    name: String,
    running: Vec<Submitted>,
    /// Jobs handed over in this scheduling round, submitted together (as arrays) when the scheduler waits.
    to_submit: Vec<Job>,
    /// Job arrays submitted so far (names their list and script files).
    arrays: usize,
    finished: VecDeque<Finished>,
    /// Live jobs of earlier runs by key (from their key records and one squeue at start).
    adoptable: HashMap<String, KeyRecord>,
    next_query: Instant,
    interval: Duration,
    cancelled: bool,
    /// `sacct` failed once: the cluster keeps no accounting (or slurmdbd is down).
    no_accounting: bool,
    pub stats: SlurmStats,
}

impl<'a> SlurmExecutor<'a> {
    /// An executor for `project`, loaded with the overrides `sets` (the compute nodes load it the same way).
    pub fn new(
        project: &'a Project,
        sets: &[String],
        cache: &'a Cache,
        opts: SlurmOptions,
    ) -> Result<SlurmExecutor<'a>> {
        // A run's id: its jobs' name and folder. Seconds and process id make it unique on one cache.
        let secs = crate::cache::journal::now_unix() as u64;
        let run = format!("{secs:x}{:05x}", std::process::id() & 0xfffff);
        let experiment = &project.exp.path;
        // Created with the first job: a run that submits nothing leaves nothing.
        let dir = cache.root().join(crate::cache::FORMAT_DIR).join("slurm").join(&run);
        let experiment = experiment.canonicalize().map_err(|e| Error::io("cannot resolve", experiment, e))?;
        let mut ex = SlurmExecutor {
            project,
            cache,
            experiment,
            sets: sets.to_vec(),
            dir,
            name: format!("mpcs-{run}"),
            running: Vec::new(),
            to_submit: Vec::new(),
            arrays: 0,
            finished: VecDeque::new(),
            adoptable: HashMap::new(),
            next_query: Instant::now(),
            interval: Duration::ZERO,
            cancelled: false,
            no_accounting: false,
            stats: SlurmStats::default(),
            opts,
        };
        ex.interval = ex.poll_min();
        ex.next_query = Instant::now() + ex.interval;
        ex.find_adoptable()?;
        Ok(ex)
    }

    /// Jobs that earlier runs submitted and that are still queued or running, by key: one `squeue` for all.
    fn find_adoptable(&mut self) -> Result<()> {
        let Ok(rd) = std::fs::read_dir(KeyRecord::dir(self.cache)) else { return Ok(()) };
        let records: Vec<(String, KeyRecord)> = rd
            .flatten()
            .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), KeyRecord::read(&e.path())?)))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        let names: HashSet<&str> = records.iter().map(|(_, r)| r.name.as_str()).collect();
        let states = self.squeue(&names.into_iter().collect::<Vec<_>>())?;
        for (key, record) in records {
            if states.get(&record.job_id).is_some_and(|(state, _)| alive(state)) {
                self.adoptable.insert(key, record);
            }
        }
        Ok(())
    }

    /// One `squeue`, counted.
    fn squeue(&mut self, names: &[&str]) -> Result<HashMap<String, (String, String)>> {
        self.stats.squeue += 1;
        squeue_states(names)
    }

    /// `poll_min_s` as a duration (at least 0.1 s).
    fn poll_min(&self) -> Duration {
        Duration::from_secs_f64(self.opts.poll_min_s.max(0.1))
    }

    /// `poll_max_s` as a duration (at least `poll_min`).
    fn poll_max(&self) -> Duration {
        Duration::from_secs_f64(self.opts.poll_max_s.max(self.opts.poll_min_s).max(0.1))
    }

    /// Submits jobs of one stage (same resources): one job, or one job array whose elements run and fail
    /// independently (element i runs the i-th job file of a list). On failure, the message for every job.
    fn submit(&mut self, jobs: Vec<Job>) -> std::result::Result<Vec<Submitted>, (Vec<usize>, String)> {
        let indices: Vec<usize> = jobs.iter().map(|j| j.index).collect();
        let fail = |what: String| (indices.clone(), what);
        let node = &self.project.plan.nodes[jobs[0].index];
        let decl = &self.project.exp.stages[node.stage];
        let res = self.resources(&decl.kind, &decl.name);
        let cpus = res.cpus.unwrap_or(self.opts.cpus).max(1);
        let gpus = jobs[0].gpus;
        std::fs::create_dir_all(&self.dir).map_err(|e| fail(format!("cannot create {}: {e}", self.dir.display())))?;
        let mpcs = match &self.opts.mpcs {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| fail(format!("cannot find the mpcs binary: {e}")))?,
        };
        // One job, or an array whose element i runs the i-th job file of a list; each writes its own output.
        let array = jobs.len() > 1;
        let (script, out_pattern, outs) = if array {
            self.arrays += 1;
            let n = self.arrays;
            let outs = (0..jobs.len()).map(|i| self.dir.join(format!("array-{n}_{i}.out"))).collect();
            (self.dir.join(format!("array-{n}.sh")), self.dir.join(format!("array-{n}_%a.out")), outs)
        } else {
            let out = self.dir.join(format!("{}.out", jobs[0].key));
            (self.dir.join(format!("{}.sh", jobs[0].key)), out.clone(), vec![out])
        };
        let mut keys = Vec::new();
        let mut job_files = Vec::new();
        for (job, output) in jobs.into_iter().zip(&outs) {
            let key = job.key.clone();
            let job_file = self.dir.join(format!("{key}.job.json"));
            let file = JobFile {
                experiment: self.experiment.clone(),
                sets: self.sets.clone(),
                cache: self.cache.root().to_path_buf(),
                node: self.project.plan.nodes[job.index].id.clone(),
                key: key.clone(),
                action: job.action,
                inputs: job.inputs,
                gpus: job.gpus,
                cpus,
                output: output.clone(),
                time_limit_requeues: self.opts.time_limit_requeues,
            };
            let bytes =
                serde_json::to_vec_pretty(&file).map_err(|e| fail(format!("cannot write the job file: {e}")))?;
            crate::fsutil::write_atomic(&job_file, &bytes)
                .map_err(|e| fail(format!("cannot write {}: {e}", job_file.display())))?;
            keys.push(key);
            job_files.push(job_file);
        }
        let worker_args = if array {
            let list = script.with_extension("list");
            let lines: String = job_files.iter().map(|f| format!("{}\n", f.display())).collect();
            std::fs::write(&list, lines).map_err(|e| fail(format!("cannot write {}: {e}", list.display())))?;
            format!("--array {}", shell_quote(&list))
        } else {
            shell_quote(&job_files[0])
        };
        let text = format!("#!/bin/sh\nexec {} worker {worker_args}\n", shell_quote(&mpcs));
        std::fs::write(&script, text).map_err(|e| fail(format!("cannot write {}: {e}", script.display())))?;
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", self.name))
            .arg(format!("--output={}", out_pattern.display()))
            .arg("--open-mode=append")
            .arg(format!("--chdir={}", self.dir.display()))
            .arg(format!("--cpus-per-task={cpus}"))
            .arg("--requeue");
        if self.opts.signal_before_s > 0 {
            // To the batch shell only (`B:`): the worker, which execs there, stops the node and requeues the job.
            cmd.arg(format!("--signal=B:USR1@{}", self.opts.signal_before_s));
        }
        if array {
            cmd.arg(format!("--array=0-{}", job_files.len() - 1));
        }
        if gpus > 0 {
            cmd.arg(format!("--gres=gpu:{gpus}"));
        }
        let pick = |stage: &Option<String>, all: &Option<String>| stage.clone().or_else(|| all.clone());
        for (flag, value) in [
            ("--partition", pick(&res.partition, &self.opts.partition)),
            ("--account", self.opts.account.clone()),
            ("--qos", self.opts.qos.clone()),
            ("--time", pick(&res.time, &self.opts.time)),
            ("--mem", pick(&res.mem, &self.opts.mem)),
        ] {
            if let Some(v) = value {
                cmd.arg(format!("{flag}={v}"));
            }
        }
        cmd.args(&self.opts.sbatch_args).args(&res.sbatch_args).arg(&script);
        self.stats.sbatch += 1;
        let output = cmd.output().map_err(|e| fail(format!("cannot run sbatch: {e}")))?;
        if !output.status.success() {
            return Err(fail(format!("sbatch refused the job: {}", String::from_utf8_lossy(&output.stderr).trim())));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let job_id = stdout.trim().split(';').next().unwrap_or("").to_string();
        let mut submitted = Vec::new();
        for (pos, ((index, key), out)) in indices.iter().zip(keys).zip(outs).enumerate() {
            let id = if array { format!("{job_id}_{pos}") } else { job_id.clone() };
            KeyRecord { job_id: id.clone(), name: self.name.clone(), out: out.clone() }.write(self.cache, &key);
            submitted.push(Submitted {
                index: *index,
                result: self.dir.join(format!("{key}.result.json")),
                key,
                job_id: id,
                name: self.name.clone(),
                out,
            });
        }
        Ok(submitted)
    }

    /// A stage's resources: its kind's overrides, then its own over them.
    fn resources(&self, kind: &str, stage: &str) -> StageResources {
        let (k, s) = (self.opts.kind.get(kind).cloned().unwrap_or_default(), self.opts.stage.get(stage));
        let Some(s) = s.cloned() else { return k };
        StageResources {
            partition: s.partition.or(k.partition),
            time: s.time.or(k.time),
            mem: s.mem.or(k.mem),
            cpus: s.cpus.or(k.cpus),
            sbatch_args: [k.sbatch_args, s.sbatch_args].concat(),
        }
    }

    /// Submits the jobs handed over since the last round: the nodes of one stage (and GPU count) as one array.
    fn flush(&mut self) {
        let mut groups: BTreeMap<(usize, u32), Vec<Job>> = BTreeMap::new();
        for job in std::mem::take(&mut self.to_submit) {
            let stage = self.project.plan.nodes[job.index].stage;
            groups.entry((stage, job.gpus)).or_default().push(job);
        }
        for (_, jobs) in groups {
            match self.submit(jobs) {
                Ok(s) => self.running.extend(s),
                Err((indices, message)) => {
                    for index in indices {
                        let failed = NodeOutcome::Failed { message: message.clone(), log: None };
                        self.finished.push_back((index, Ok(failed)));
                    }
                }
            }
        }
    }

    /// Moves jobs whose entry or result file exists to `finished`. Returns whether any did.
    fn collect_from_files(&mut self) -> bool {
        let before = self.running.len();
        let mut still = Vec::with_capacity(before);
        for s in std::mem::take(&mut self.running) {
            match self.outcome_from_files(&s) {
                Some(outcome) => self.finish(s, outcome),
                None => still.push(s),
            }
        }
        self.running = still;
        self.running.len() != before
    }

    fn outcome_from_files(&self, s: &Submitted) -> Option<Result<NodeOutcome>> {
        if let Ok(Some(manifest)) = self.cache.lookup(&s.key) {
            return Some(Ok(NodeOutcome::Done { manifest: Box::new(manifest), executed: true }));
        }
        let text = std::fs::read(&s.result).ok()?;
        let result: JobResult = serde_json::from_slice(&text).ok()?;
        Some(Ok(match result {
            JobResult::Failed { message, log } => {
                NodeOutcome::Failed { message: format!("{message} (Slurm job {})", s.job_id), log }
            }
            JobResult::InputDamaged { input, reason } => NodeOutcome::InputDamaged { input, reason },
            // A job stopped by a signal may be requeued (preemption): only Slurm can say whether it ended.
            JobResult::Cancelled => return None,
        }))
    }

    fn finish(&mut self, s: Submitted, outcome: Result<NodeOutcome>) {
        let record = KeyRecord::path(self.cache, &s.key);
        if KeyRecord::read(&record).is_some_and(|r| r.job_id == s.job_id) {
            let _ = std::fs::remove_file(record);
        }
        self.finished.push_back((s.index, outcome));
    }

    /// One `squeue` for every job of this run (and the runs it adopted from): a job Slurm reports ended (or no
    /// longer lists) without an entry or a result file failed, with Slurm's state and the end of its output.
    fn query(&mut self) -> Result<bool> {
        let mut names: Vec<String> = self.running.iter().map(|s| s.name.clone()).collect();
        names.sort();
        names.dedup();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let states = self.squeue(&refs)?;
        let mut changed = false;
        let mut still = Vec::new();
        let mut dead = Vec::new();
        for s in std::mem::take(&mut self.running) {
            let state = states.get(&s.job_id).cloned();
            if state.as_ref().is_some_and(|(st, _)| alive(st)) {
                still.push(s);
                continue;
            }
            changed = true;
            // Ended: its files say how, unless it died without a word.
            if let Some(outcome) = self.outcome_from_files(&s) {
                self.finish(s, outcome);
                continue;
            }
            let stopped_by_us =
                self.cancelled && (state.as_ref().is_some_and(|(st, _)| st == "CANCELLED") || s.result.exists());
            if stopped_by_us {
                self.finish(s, Ok(NodeOutcome::Cancelled));
            } else {
                dead.push((s, state));
            }
        }
        self.running = still;
        if !dead.is_empty() {
            // Died without a word: accounting, where the cluster has it, adds the exit code, and knows the jobs
            // squeue has forgotten (MinJobAge).
            let ids: Vec<&str> = dead.iter().map(|(s, _)| s.job_id.as_str()).collect();
            let accounted = self.sacct(&ids);
            for (s, listed) in dead {
                let end = match (accounted.get(&s.job_id), listed) {
                    (Some(end), _) => end.clone(),
                    (None, Some((state, reason))) => JobEnd { state, reason, exit_code: None },
                    (None, None) => JobEnd {
                        state: "ENDED".into(),
                        reason: "Slurm no longer lists it, and has no accounting (sacct) to ask".into(),
                        exit_code: None,
                    },
                };
                let outcome = self.died(&s, &end);
                self.finish(s, Ok(outcome));
            }
        }
        Ok(changed)
    }

    /// How the given jobs ended, from one `sacct` (with a time limit: a dead slurmdbd must not hang the run).
    /// Empty where the cluster has no accounting, which is then not asked again.
    fn sacct(&mut self, ids: &[&str]) -> HashMap<String, JobEnd> {
        if self.no_accounting {
            return HashMap::new();
        }
        self.stats.sacct += 1;
        let out = Command::new("timeout")
            .args(["20", "sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Reason", "-j"])
            .arg(ids.join(","))
            .output();
        let out = match out {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                // "Slurm accounting storage is disabled", or slurmdbd down (timeout's status 124).
                tracing::info!(
                    "sacct: {} (status {:?})",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    out.status.code()
                );
                self.no_accounting = true;
                return HashMap::new();
            }
            Err(e) => {
                tracing::info!("cannot run sacct: {e}");
                self.no_accounting = true;
                return HashMap::new();
            }
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut parts = l.split('|');
                let id = parts.next()?.trim().to_string();
                // "CANCELLED by 0" names who cancelled: the state is its first word.
                let state = parts.next()?.split_whitespace().next()?.to_string();
                let exit_code = parts.next().map(|c| c.trim().to_string());
                let reason = parts.next().unwrap_or("").trim().to_string();
                Some((id, JobEnd { state, reason, exit_code }))
            })
            .collect()
    }

    /// The failure of a job that ended (Slurm state `state`) without a word from its worker: its message names
    /// the job, Slurm's state and reason, what to change, and the end of the job's output, which is kept as the
    /// node's failure log.
    fn died(&self, s: &Submitted, end: &JobEnd) -> NodeOutcome {
        let (state, reason) = (end.state.as_str(), end.reason.as_str());
        let output = std::fs::read_to_string(&s.out).unwrap_or_default();
        let stage = &self.project.exp.stages[self.project.plan.nodes[s.index].stage].name;
        // Without cgroups, slurmstepd's own memory check kills the step and Slurm says only FAILED.
        let out_of_memory = state == "OUT_OF_MEMORY" || output.contains("exceeded memory limit");
        let hint = if out_of_memory {
            format!(
                ": it used more memory than its limit; raise `mem` for this stage ([slurm.stage.{stage}] in the \
                 profile, or [slurm.kind.KIND])"
            )
        } else {
            match state {
                "TIMEOUT" => format!(
                    ": it reached its time limit; raise `time` for this stage ([slurm.stage.{stage}]); a training node \
                     requeues itself ahead of the limit and resumes from its checkpoints (signal_before_s, \
                     time_limit_requeues)"
                ),
                "CANCELLED" => ": it was cancelled outside this run (scancel, or an administrator)".into(),
                "NODE_FAIL" | "BOOT_FAIL" => ": the compute node failed; run again (a training node resumes)".into(),
                "PREEMPTED" => ": it was preempted and not requeued; run again (a training node resumes)".into(),
                _ => String::new(),
            }
        };
        let mut why: Vec<String> = Vec::new();
        if !reason.is_empty() && reason != "None" {
            why.push(reason.to_string());
        }
        // `code:signal`, as sacct writes it.
        if let Some(code) = end.exit_code.as_deref().filter(|c| *c != "0:0") {
            why.push(format!("exit code {code}"));
        }
        let why = if why.is_empty() { String::new() } else { format!(" ({})", why.join(", ")) };
        // The failure log: what the node wrote before it was stopped (its worker keeps it when a signal stops it;
        // a worker killed outright leaves it in its staging folder; one older than the job file is an earlier
        // attempt's), then the job's own output.
        let log = self.cache.failed_log(&s.key);
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let submitted = modified(&s.result.with_file_name(format!("{}.job.json", s.key)));
        let this_attempt = |p: &Path| matches!((modified(p), submitted), (Some(t), Some(j)) if t >= j);
        if !this_attempt(&log) {
            let _ = log.parent().map(std::fs::create_dir_all);
            let staged =
                self.cache.staging_logs(&s.key).into_iter().filter(|p| this_attempt(p)).max_by_key(|p| modified(p));
            let _ = std::fs::write(&log, staged.and_then(|p| std::fs::read(p).ok()).unwrap_or_default());
        }
        super::worker::append_job_output(&log, &s.out);
        let log = if log.exists() { log } else { s.out.clone() };
        NodeOutcome::Failed {
            message: format!(
                "Slurm job {} ended {state}{why} without publishing the entry{hint}{}",
                s.job_id,
                super::worker::log_tail(&s.out)
            ),
            log: Some(log),
        }
    }
}

/// For `gc`, while no `mpcs run` uses the cache: removes the folders of Slurm runs (`slurm/<run>/`: job files,
/// scripts, job output) that no key record names, i.e. whose jobs have all ended (a live job of a dead submitter
/// keeps its record, and its run's files, for a later run to adopt). Returns how many went.
pub fn remove_finished_runs(cache: &Cache) -> usize {
    let dir = cache.root().join(crate::cache::FORMAT_DIR).join("slurm");
    let Ok(rd) = std::fs::read_dir(&dir) else { return 0 };
    let named: HashSet<String> = std::fs::read_dir(KeyRecord::dir(cache))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| KeyRecord::read(&e.path()).map(|r| r.run().to_string()))
        .collect();
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "keys" && e.path().is_dir() && !named.contains(&name) && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The jobs of the named runs (array elements one by one, ended ones while Slurm keeps them): job id →
/// (state, reason).
fn squeue_states(names: &[&str]) -> Result<HashMap<String, (String, String)>> {
    let out = Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "-o", "%i|%T|%r", "--name"])
        .arg(names.join(","))
        .output()
        .map_err(|e| Error::env(format!("cannot run squeue: {e}; is Slurm's client (slurm-client) installed?")))?;
    if !out.status.success() {
        return Err(Error::env(format!(
            "squeue failed: {}; is slurmctld reachable (SLURM_CONF)?",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('|');
            let id = parts.next()?.trim().to_string();
            let state = parts.next()?.trim().to_string();
            let reason = parts.next().unwrap_or("").trim().to_string();
            Some((id, (state, reason)))
        })
        .collect())
}

/// Jobs of live runs (queued or running) for the given keys, from their key records and one `squeue`: key →
/// (job id, "queued" or "running"). Empty where no record names a key or Slurm cannot be asked.
pub fn live_jobs(cache: &Cache, keys: &[&str]) -> HashMap<String, (String, &'static str)> {
    let records: Vec<(String, KeyRecord)> =
        keys.iter().filter_map(|k| Some((k.to_string(), KeyRecord::read(&KeyRecord::path(cache, k))?))).collect();
    if records.is_empty() {
        return HashMap::new();
    }
    let mut names: Vec<&str> = records.iter().map(|(_, r)| r.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let Ok(states) = squeue_states(&names) else { return HashMap::new() };
    records
        .into_iter()
        .filter_map(|(key, record)| {
            let shown = match states.get(&record.job_id)?.0.as_str() {
                "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "SUSPENDED" => "queued",
                state if alive(state) => "running",
                _ => return None,
            };
            Some((key, (record.job_id, shown)))
        })
        .collect()
}

/// Whether a job in Slurm state `state` may still run (or run again).
fn alive(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SUSPENDED"
            | "STOPPED"
            | "SIGNALING"
            | "STAGE_OUT"
            | "RESV_DEL_HOLD"
    )
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

impl Executor for SlurmExecutor<'_> {
    fn try_launch(&mut self, job: Job, _waiting: usize) -> Launch {
        if self.running.len() + self.to_submit.len() >= self.opts.max_jobs {
            return Launch::Full(job);
        }
        if let Some(record) = self.adoptable.remove(&job.key) {
            self.stats.adopted += 1;
            let dir = self.cache.root().join(crate::cache::FORMAT_DIR).join("slurm").join(record.run());
            self.running.push(Submitted {
                index: job.index,
                result: dir.join(format!("{}.result.json", job.key)),
                out: record.out,
                key: job.key,
                job_id: record.job_id,
                name: record.name,
            });
            return Launch::Started;
        }
        // Submitted at the next `wait`, with the other nodes of its stage that became ready in this round.
        self.to_submit.push(job);
        Launch::Started
    }

    fn busy(&self) -> bool {
        !self.running.is_empty() || !self.finished.is_empty() || !self.to_submit.is_empty()
    }

    fn wait(&mut self, timeout: Duration) -> Option<Finished> {
        let deadline = Instant::now() + timeout;
        loop {
            // Hand back every node that ended in this round before submitting: the nodes they make ready then go
            // together, one array per stage.
            if let Some(f) = self.finished.pop_front() {
                return Some(f);
            }
            self.flush();
            if self.collect_from_files() {
                continue;
            }
            if Instant::now() >= self.next_query && !self.running.is_empty() {
                self.interval = match self.query() {
                    Ok(true) => self.poll_min(),
                    Ok(false) => (self.interval * 2).min(self.poll_max()),
                    Err(e) => {
                        tracing::warn!("{}", e.message);
                        self.poll_max()
                    }
                };
                self.next_query = Instant::now() + self.interval;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(200)));
        }
    }

    fn interrupt(&mut self, force: bool) {
        for job in std::mem::take(&mut self.to_submit) {
            self.finished.push_back((job.index, Ok(NodeOutcome::Cancelled)));
        }
        if self.running.is_empty() {
            return;
        }
        self.cancelled = true;
        let ids: Vec<&str> = self.running.iter().map(|s| s.job_id.as_str()).collect();
        // First, queued jobs go, and running ones get SIGTERM in their worker only (`--batch`): the worker
        // stops its node and publishes nothing, where a signal reaching the command's processes first could
        // let a shell script go on to "succeed". After the grace period, whatever still runs is cancelled.
        let calls: Vec<Vec<&str>> = if force {
            vec![ids.clone()]
        } else {
            vec![
                [&["--state=PENDING"][..], &ids].concat(),
                [&["--batch", "--signal=TERM", "--state=RUNNING"][..], &ids].concat(),
            ]
        };
        for args in calls {
            self.stats.scancel += 1;
            if let Err(e) = Command::new("scancel").args(&args).stderr(std::process::Stdio::null()).status() {
                tracing::warn!("cannot run scancel: {e}");
            }
        }
        // See the cancelled jobs end soon.
        self.interval = self.poll_min().min(Duration::from_secs(1));
        self.next_query = Instant::now() + self.interval;
    }

    fn report(&self) -> serde_json::Value {
        serde_json::to_value(&self.stats).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_overrides_the_experiment_key_by_key() {
        let exp: toml::Table = toml::from_str(
            "kind = \"slurm\"\n[slurm]\ntime = \"1:00:00\"\ncpus = 4\n[slurm.stage.pretrain]\ntime = \"2-00:00:00\"\n",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("cluster.toml");
        std::fs::write(&profile, "[slurm]\npartition = \"gpu\"\ncpus = 8\n[slurm.stage.pretrain]\nmem = \"8G\"\n")
            .unwrap();
        let o = SlurmOptions::resolve(Some(&exp), Some(&profile)).unwrap();
        assert_eq!(o.time.as_deref(), Some("1:00:00"));
        assert_eq!(o.partition.as_deref(), Some("gpu"));
        assert_eq!(o.cpus, 8, "the profile wins");
        let pretrain = &o.stage["pretrain"];
        assert_eq!((pretrain.time.as_deref(), pretrain.mem.as_deref()), (Some("2-00:00:00"), Some("8G")));
        assert_eq!((o.poll_min_s, o.poll_max_s, o.max_jobs), (5.0, 120.0, 1000), "defaults");

        std::fs::write(&profile, "[slurm]\npartiton = \"gpu\"\n").unwrap();
        let e = SlurmOptions::resolve(None, Some(&profile)).unwrap_err();
        assert!(e.message.contains("unknown field `partiton`"), "{}", e.message);
        assert!(matches!(
            choose_executor(None, None, Some(&exp), &[]).unwrap(),
            super::super::ExecutorChoice::Slurm { .. }
        ));
        assert!(matches!(
            choose_executor(Some("local"), None, Some(&exp), &[]).unwrap(),
            super::super::ExecutorChoice::Local
        ));
    }
}
