//! What each CLI subcommand does, as library functions returning an exit code. `main.rs` only parses
//! arguments and maps errors to exit codes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::journal::{Journal, Record};
use crate::cache::{maintenance, Cache};
use crate::error::{did_you_mean, exit, Error, Result};
use crate::exec::devices::{self, DeviceSpec};
use crate::exec::progress::Reporter;
use crate::exec::{self, Project, RunOptions};
use crate::lineage::{self, State};
use crate::plan::Plan;
use crate::remote::{Remote, RemoteSpec};

/// The remote a command uses: `--remote`/`MPCS_REMOTE` as given, else the profile's `[cache] remote` (for `run`),
/// else the experiment's, with the mode and fallback of the command line.
pub fn remote_spec(given: Option<&RemoteSpec>, project: &Project) -> Option<RemoteSpec> {
    remote_spec_with(given, None, project)
}

fn remote_spec_with(given: Option<&RemoteSpec>, profile: Option<String>, project: &Project) -> Option<RemoteSpec> {
    let configured = profile.or_else(|| project.exp.remote.clone());
    match (given, configured) {
        (Some(g), _) if !g.url.is_empty() => Some(g.clone()),
        (Some(g), Some(url)) => Some(RemoteSpec { url, ..g.clone() }),
        (None, Some(url)) => Some(RemoteSpec { url, mode: crate::remote::Mode::ReadWrite, fallback: false }),
        _ => None,
    }
}

/// `[cache] remote` of a profile file (the profile's other tables are read by the executor that uses them).
fn profile_remote(profile: Option<&Path>) -> Result<Option<String>> {
    let Some(path) = profile else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read the profile", path, e))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| Error::user(format!("profile {}: {e}", path.display())))?;
    match table.get("cache").map(|c| c.get("remote")) {
        None => Ok(None),
        Some(Some(toml::Value::String(url))) => Ok(Some(url.clone())),
        Some(_) => Err(Error::user(format!(
            "profile {}: [cache] has one key, remote = \"s3://bucket/prefix\"",
            path.display()
        ))),
    }
}

/// Loads, validates and expands an experiment with the built-in stage kinds.
pub fn load(path: &Path, sets: &[String]) -> Result<Project> {
    Project::load(path, sets, crate::stages::builtin())
}

pub struct RunArgs<'a> {
    pub experiment: &'a Path,
    pub sets: &'a [String],
    pub jobs: usize,
    pub devices: DeviceSpec,
    pub keep_going: bool,
    pub dry_run: bool,
    pub json: bool,
    /// `--executor` (None: the experiment's `[executor] kind`, else local) and `--profile`.
    pub executor: Option<&'a str>,
    pub profile: Option<&'a Path>,
    /// `--remote` (None: the experiment's `[cache] remote`, else none).
    pub remote: Option<&'a RemoteSpec>,
}

/// `cache_dir` is opened only once the experiment is valid, so a bad file leaves no trace.
pub fn run(args: &RunArgs<'_>, cache_dir: &Path, reporter: &dyn Reporter, cancel: &Arc<AtomicBool>) -> Result<i32> {
    let t0 = Instant::now();
    let project = load(args.experiment, args.sets)?;
    let gpus = devices::discover(&args.devices)?;
    let cache = &Cache::open(cache_dir)?;
    let remote = Remote::connect(remote_spec_with(args.remote, profile_remote(args.profile)?, &project).as_ref())?;
    if args.dry_run {
        return dry_run(&project, cache, remote.as_deref(), &gpus, args.json);
    }
    let opts = RunOptions {
        remote,
        jobs: args.jobs,
        gpus,
        keep_going: args.keep_going,
        grace: Duration::from_secs(5),
        executor: exec::slurm::choose_executor(args.executor, args.profile, project.exp.executor.as_ref(), args.sets)?,
    };
    let summary = exec::run(&project, cache, &opts, reporter, cancel)?;
    let (exp, plan) = (&project.exp, &project.plan);
    let secs = t0.elapsed().as_secs_f64();
    for f in &summary.failed {
        eprintln!("FAILED {}: {}", f.node, f.message);
        if let Some(log) = &f.log {
            eprintln!("  log: {}", log.display());
        }
    }
    let pulled = if opts.remote.is_some() { format!(", {} pulled", summary.pulled.len()) } else { String::new() };
    eprintln!(
        "{}: {} nodes — {} executed, {} cached{pulled}, {} failed, {} skipped in {secs:.2} s{}",
        exp.name,
        plan.nodes.len(),
        summary.executed.len(),
        summary.cached.len(),
        summary.failed.len(),
        summary.skipped.len(),
        if summary.interrupted { " (interrupted)" } else { "" }
    );
    if let Some(calls) = summary.executor.as_object() {
        let shown: Vec<String> = calls.iter().map(|(k, v)| format!("{v} {k}")).collect();
        tracing::info!("executor: {}", shown.join(", "));
    }
    // The results people came for: every table the run produced (or found cached), with its path.
    if !args.json {
        for (i, node) in plan.nodes.iter().enumerate() {
            let (Some(out), "table") = (&summary.outputs[i], exp.stages[node.stage].kind.as_str()) else { continue };
            let md = out.join("table.md");
            if let Ok(text) = std::fs::read_to_string(&md) {
                println!("\n{text}\ntable of `{}`: {} (also .csv, .tex, .json)", node.id, md.display());
            }
        }
    }
    if args.json {
        let failed: Vec<&str> = summary.failed.iter().map(|f| f.node.as_str()).collect();
        println!(
            "{}",
            serde_json::json!({
                "executed": summary.executed,
                "cached": summary.cached,
                "failed": failed,
                "skipped": summary.skipped,
                "pulled": summary.pulled,
                "executor": summary.executor,
                "remote": summary.remote,
            })
        );
    }
    Ok(if summary.interrupted {
        exit::INTERRUPTED
    } else if summary.failed.is_empty() {
        exit::OK
    } else {
        exit::NODE_FAILED
    })
}

/// The job file of this element of a Slurm job array: line `$SLURM_ARRAY_TASK_ID` (from 0) of `list`.
pub fn array_element(list: &Path) -> Result<PathBuf> {
    let id: usize = std::env::var("SLURM_ARRAY_TASK_ID")
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::user("--array needs SLURM_ARRAY_TASK_ID (it runs as an element of a Slurm job array)"))?;
    let text = std::fs::read_to_string(list).map_err(|e| Error::io("cannot read the job list", list, e))?;
    text.lines()
        .nth(id)
        .map(PathBuf::from)
        .ok_or_else(|| Error::env(format!("{} has no line {id} for this array element", list.display())))
}

/// `mpcs worker JOB`: runs one node of a submitted job on this (compute) node and publishes its entry; a failure
/// is written beside the job file for the submitter. Refuses to run a node whose key changed since submission.
///
/// `time_up` is raised by Slurm's warning ahead of the job's time limit (SIGUSR1): the worker then stops the node
/// and requeues its own job, which resumes from the node's checkpoints (at most `time_limit_requeues` times).
pub fn worker(job_file: &Path, cancel: &Arc<AtomicBool>, time_up: &AtomicBool) -> Result<i32> {
    use crate::exec::slurm::{JobFile, JobResult};
    use crate::exec::worker::{Job, NodeOutcome, WorkerEnv};
    let bytes = std::fs::read(job_file).map_err(|e| Error::io("cannot read the job file", job_file, e))?;
    let jf: JobFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::env(format!("job file {} does not parse: {e}", job_file.display())))?;
    let result_path = job_file.with_file_name(format!("{}.result.json", jf.key));
    let write_result = |r: &JobResult| -> Result<()> {
        let bytes = serde_json::to_vec(r).map_err(|e| Error::internal(e.to_string()))?;
        crate::fsutil::write_atomic(&result_path, &bytes).map_err(|e| Error::io("cannot write", &result_path, e))
    };
    let fail = |message: String| -> Result<i32> {
        eprintln!("{message}");
        write_result(&JobResult::Failed { message, log: None })?;
        Ok(exit::NODE_FAILED)
    };
    // A requeued job runs again: what its last attempt said no longer holds.
    let _ = std::fs::remove_file(&result_path);
    let cache = Cache::open(&jf.cache)?;
    let project = match load(&jf.experiment, &jf.sets) {
        Ok(p) => p,
        Err(e) => return fail(format!("the experiment no longer loads on the compute node: {}", e.message)),
    };
    let Some(index) = project.plan.nodes.iter().position(|n| n.id == jf.node) else {
        return fail(format!(
            "node `{}` is no longer in {}: the file changed since submission; run again",
            jf.node,
            jf.experiment.display()
        ));
    };
    let mut digests = vec![None; project.plan.nodes.len()];
    for (&j, (_, digest)) in project.plan.nodes[index].inputs.iter().zip(&jf.action.inputs) {
        digests[j] = Some(digest.clone());
    }
    let key = project.key(index, &digests);
    if key.as_deref() != Some(jf.key.as_str()) {
        return fail(format!(
            "the experiment changed since this job was submitted (node `{}` now has key {}, not {}): nothing was \
             run; run again",
            jf.node,
            key.as_deref().unwrap_or("unknown"),
            jf.key
        ));
    }
    let gpus: Vec<String> = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let device = exec::DeviceAssignment { gpus, gpus_managed: true };
    let processes = exec::process::ProcessRegistry::default();
    let reporter = exec::progress::Console::new(true);
    // A SIGTERM (scancel, preemption) stops the node's processes: politely, then by force. So does the warning
    // ahead of the time limit, while the job may still requeue itself.
    let restarts: u32 = std::env::var("SLURM_RESTART_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let requeue = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let over = || done.load(Ordering::Relaxed);
    let watch = || {
        while !cancel.load(Ordering::Relaxed) {
            if over() {
                return;
            }
            if time_up.swap(false, Ordering::Relaxed) {
                if restarts < jf.time_limit_requeues {
                    eprintln!(
                        "mpcs worker: the job's time limit is near: stopping node `{}` and requeueing the job (requeue \
                         {} of at most {}); it resumes from the node's checkpoints",
                        jf.node,
                        restarts + 1,
                        jf.time_limit_requeues
                    );
                    requeue.store(true, Ordering::Relaxed);
                    cancel.store(true, Ordering::Relaxed);
                    break;
                }
                eprintln!(
                    "mpcs worker: the job's time limit is near, and it was requeued {restarts} times already \
                     (time_limit_requeues): node `{}` runs on until Slurm stops it",
                    jf.node
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        processes.signal_all(libc::SIGTERM);
        for _ in 0..100 {
            if over() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        processes.signal_all(libc::SIGKILL);
    };
    let env = WorkerEnv {
        project: &project,
        cache: &cache,
        cancel,
        processes: &processes,
        reporter: &reporter,
        job_output: Some(&jf.output),
    };
    let job = Job { index, key: jf.key.clone(), action: jf.action, inputs: jf.inputs, gpus: jf.gpus };
    let outcome = std::thread::scope(|scope| {
        let watcher = std::thread::Builder::new().spawn_scoped(scope, watch);
        let outcome = crate::runtime::with_cpu_threads(jf.cpus, || env.run(job, device));
        done.store(true, Ordering::Relaxed);
        drop(watcher);
        outcome
    })?;
    if requeue.load(Ordering::Relaxed) && !matches!(outcome, NodeOutcome::Done { .. }) {
        // Cancelled tells the submitter to ask Slurm, which will list the job as requeued. Written first: the
        // requeue ends this process (SIGTERM).
        write_result(&JobResult::Cancelled)?;
        let job_id = std::env::var("SLURM_JOB_ID").unwrap_or_default();
        let requeued = std::process::Command::new("scontrol").args(["requeue", &job_id]).output();
        return match requeued {
            Ok(out) if out.status.success() => Ok(exit::INTERRUPTED),
            Ok(out) => fail(format!(
                "the job's time limit was near and `scontrol requeue {job_id}` failed: {}; raise the stage's `time`",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => fail(format!("the job's time limit was near and scontrol cannot run: {e}")),
        };
    }
    match outcome {
        NodeOutcome::Done { .. } => Ok(exit::OK),
        NodeOutcome::Failed { message, log } => {
            // Slurm signals every process of a cancelled job, so the command may die of the signal before this
            // worker hears of it: a node killed by a signal counts as cancelled if the worker's own signal follows.
            if message.contains("killed by signal") {
                std::thread::sleep(Duration::from_millis(500));
            }
            if cancel.load(Ordering::Relaxed) {
                write_result(&JobResult::Cancelled)?;
                return Ok(exit::INTERRUPTED);
            }
            write_result(&JobResult::Failed { message, log })?;
            Ok(exit::NODE_FAILED)
        }
        NodeOutcome::InputDamaged { input, reason } => {
            write_result(&JobResult::InputDamaged { input, reason })?;
            Ok(exit::NODE_FAILED)
        }
        NodeOutcome::Cancelled => {
            write_result(&JobResult::Cancelled)?;
            Ok(exit::INTERRUPTED)
        }
    }
}

fn dry_run(project: &Project, cache: &Cache, remote: Option<&Remote>, gpus: &[String], json: bool) -> Result<i32> {
    let (exp, plan) = (&project.exp, &project.plan);
    let a = lineage::assess_with(project, cache, remote)?;
    let mut would = Vec::new();
    let mut cached = Vec::new();
    let mut pull = Vec::new();
    for &i in &plan.order {
        let node = &plan.nodes[i];
        let decl = &exp.stages[node.stage];
        match a.nodes[i].state {
            State::Cached => {
                cached.push(node.id.clone());
                continue;
            }
            State::Remote => {
                pull.push(serde_json::json!({"id": node.id, "bytes": a.nodes[i].remote_bytes.unwrap_or(0)}));
                continue;
            }
            _ => {}
        }
        let device = if decl.gpus == 0 {
            "cpu".to_string()
        } else if gpus.is_empty() {
            format!("cpu (wants {} gpu, none found)", decl.gpus)
        } else {
            format!("gpu×{}", decl.gpus)
        };
        let reason = lineage::short_reason(project, &a, i);
        would.push(
            serde_json::json!({"id": node.id, "state": a.nodes[i].state.as_str(), "device": device, "reason": reason}),
        );
    }
    if json {
        println!("{}", serde_json::json!({"would_run": would, "would_pull": pull, "cached": cached}));
    } else {
        for p in &pull {
            let size = crate::remote::human_bytes(p["bytes"].as_u64().unwrap_or(0));
            println!("would pull {:<44} from the remote ({size})", p["id"].as_str().unwrap_or(""));
        }
        for w in &would {
            println!(
                "would run  {:<44} on {:<10} {}",
                w["id"].as_str().unwrap_or(""),
                w["device"].as_str().unwrap_or(""),
                w["reason"].as_str().unwrap_or("")
            );
        }
        let pulled = if remote.is_some() { format!(", {} would be pulled", pull.len()) } else { String::new() };
        println!(
            "{}: {} nodes — {} would run{pulled}, {} cached (dry run: nothing was executed)",
            exp.name,
            plan.nodes.len(),
            would.len(),
            cached.len()
        );
    }
    Ok(exit::OK)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Mermaid,
    Json,
}

pub fn graph(
    experiment: &Path,
    sets: &[String],
    format: GraphFormat,
    why: Option<&str>,
    cache_dir: &Path,
    remote: Option<&RemoteSpec>,
) -> Result<i32> {
    let project = load(experiment, sets)?;
    let cache = &Cache::open(cache_dir)?;
    let remote = Remote::connect(remote_spec(remote, &project).as_ref())?;
    let a = lineage::assess_with(&project, cache, remote.as_deref())?;
    if let Some(node) = why {
        let i = find_node(&project.plan, node)?;
        print!("{}", lineage::why(&project, &a, cache, i));
        return Ok(exit::OK);
    }
    let out = match format {
        GraphFormat::Text => lineage::render_text(&project, &a),
        GraphFormat::Dot => lineage::render_dot(&project, &a),
        GraphFormat::Mermaid => lineage::render_mermaid(&project, &a),
        GraphFormat::Json => lineage::render_json(&project, &a) + "\n",
    };
    print!("{out}");
    Ok(exit::OK)
}

fn find_node(plan: &Plan, id: &str) -> Result<usize> {
    plan.find(id).ok_or_else(|| {
        let hint = did_you_mean(id, plan.ids()).map(|s| format!(" Did you mean `{s}`?")).unwrap_or_default();
        Error::user(format!("no node `{id}` in this experiment.{hint} `mpcs graph EXP` lists the nodes."))
    })
}

/// `mpcs show NODE|KEY`: an entry's manifest and where its files and log are.
/// `mpcs report EXP`: the results page (see `crate::results`).
pub fn report(
    experiment: &Path,
    sets: &[String],
    out: Option<PathBuf>,
    cams: usize,
    tsne_points: usize,
    cache: &Cache,
) -> Result<i32> {
    let project = load(experiment, sets)?;
    let out_dir = out.unwrap_or_else(|| crate::results::default_out_dir(&project.exp));
    let opts = crate::results::ReportOptions { out_dir, cams, tsne_points };
    let path = crate::results::write_report(&project, cache, &opts)?;
    println!("report: {}", path.display());
    Ok(exit::OK)
}

pub fn show(
    target: &str,
    experiment: Option<&Path>,
    sets: &[String],
    json: bool,
    cache: &Cache,
    remote: Option<&RemoteSpec>,
) -> Result<i32> {
    let mut failure: Option<Record> = None;
    let key = if let Some(exp_path) = experiment {
        let project = load(exp_path, sets)?;
        let i = find_node(&project.plan, target)?;
        let remote = Remote::connect(remote_spec(remote, &project).as_ref())?;
        let a = lineage::assess_with(&project, cache, remote.as_deref())?;
        if let (State::Remote, Some(key), Some(remote)) = (a.nodes[i].state, &a.nodes[i].key, &remote) {
            let record = remote.record(key).map_err(|why| Error::env(format!("{}: {why}", remote.url())))?;
            let m = record.ok_or_else(|| Error::env(format!("the record of {key} left {}", remote.url())))?.manifest;
            let stage = &project.exp.stages[project.plan.nodes[i].stage].name;
            let exp = exp_path.display();
            let note = format!("on {}, not in this cache: `mpcs pull {exp} --only {stage}` fetches it", remote.url());
            return print_entry(&m, None, json, Some(note));
        }
        match (&a.nodes[i].state, &a.nodes[i].key) {
            (State::Cached, Some(k)) if project.source_of(i).is_none() => k.clone(),
            _ => match a.last.get(&project.plan.nodes[i].id) {
                Some(r) => {
                    failure = Some(r.clone());
                    r.key.clone()
                }
                None => return Err(Error::user(format!("node `{target}` has no entry yet: run the experiment first"))),
            },
        }
    } else {
        let by_prefix = cache.keys_with_prefix(target)?;
        match by_prefix.len() {
            1 => by_prefix[0].clone(),
            n if n > 1 => {
                return Err(Error::user(format!("key prefix `{target}` is ambiguous ({n} entries); give more digits")))
            }
            _ => match latest_record_of(cache, target)? {
                Some(r) => {
                    failure = Some(r.clone());
                    r.key
                }
                None => {
                    return Err(Error::user(format!(
                        "`{target}` is neither a cache key nor a node recorded in any experiment's journal; \
                         give a node id as in `mpcs graph EXP` (with --exp EXP) or a key prefix"
                    )))
                }
            },
        }
    };
    let Some(m) = cache.lookup(&key)? else {
        if let Some(r) = failure {
            println!("node {}: last run {:?}, key {}", r.node, r.status, r.key);
            if let Some(e) = &r.error {
                println!("error: {e}");
            }
            if let Some(l) = &r.log {
                println!("log: {l}");
            }
            println!("(no cache entry for this key: it failed, or was removed by gc)");
            return Ok(exit::OK);
        }
        return Err(Error::user(format!("no cache entry {key}")));
    };
    print_entry(&m, Some(&cache.entry_dir(&key)), json, None)
}

/// An entry's manifest: where its files are (`dir`, in this cache), or where it is instead (`elsewhere`).
fn print_entry(m: &crate::cache::Manifest, dir: Option<&Path>, json: bool, elsewhere: Option<String>) -> Result<i32> {
    if json {
        // The manifest plus where its files are.
        let mut v = serde_json::to_value(m).map_err(|e| Error::internal(e.to_string()))?;
        v["path"] = dir.map(|d| serde_json::Value::String(d.join("out").display().to_string())).unwrap_or_default();
        if let Some(note) = &elsewhere {
            v["where"] = serde_json::Value::String(note.clone());
        }
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| Error::internal(e.to_string()))?);
        return Ok(exit::OK);
    }
    println!("entry      {}", m.key);
    println!("node       {} (experiment {})", m.node, m.experiment);
    println!("kind       {} v{}", m.action.kind, m.action.version);
    println!("params     {}", serde_json::to_string(&m.action.params).unwrap_or_default());
    for (id, d) in &m.action.inputs {
        println!("input      {id} {}", &d[..d.len().min(16)]);
    }
    println!(
        "output     {} ({} files, {} bytes)",
        &m.output_digest[..16],
        m.files.len(),
        m.files.iter().map(|f| f.size).sum::<u64>()
    );
    println!("made       {:.2} s on {} ({}), mpcs {}, seed {}", m.duration_s, m.host, m.device, m.tool_version, m.seed);
    if let Some(dir) = dir {
        println!("files      {}", dir.join("out").display());
        println!("log        {}", dir.join("log.txt").display());
        println!("manifest   {}", dir.join("manifest.json").display());
    }
    if let Some(note) = elsewhere {
        println!("where      {note}");
    }
    if !m.metrics.is_null() {
        println!("metrics    {}", m.metrics);
    }
    Ok(exit::OK)
}

/// The newest journal record of `node` across every experiment in the cache.
fn latest_record_of(cache: &Cache, node: &str) -> Result<Option<Record>> {
    let normalised: String = node.chars().filter(|c| !c.is_whitespace()).collect();
    let mut best: Option<Record> = None;
    let Ok(rd) = std::fs::read_dir(cache.journal_dir()) else {
        return Ok(None);
    };
    for e in rd.flatten() {
        if e.path().extension().is_none_or(|x| x != "jsonl") {
            continue;
        }
        if let Some(r) = Journal::at(&e.path()).load()?.remove(&normalised) {
            if best.as_ref().is_none_or(|b| r.time_unix > b.time_unix) {
                best = Some(r);
            }
        }
    }
    Ok(best)
}

pub fn gc(experiments: &[PathBuf], sets: &[String], dry_run: bool, cache: &Cache) -> Result<i32> {
    if experiments.is_empty() {
        return Err(Error::user(
            "gc needs the experiments whose entries to keep: mpcs gc experiments/a.toml experiments/b.toml",
        ));
    }
    let mut keep = HashSet::new();
    let mut kept_blocked = 0usize;
    for path in experiments {
        let project = load(path, sets)?;
        let a = lineage::assess(&project, cache)?;
        for (i, st) in a.nodes.iter().enumerate() {
            if project.source_of(i).is_some() {
                continue;
            }
            if let Some(k) = &st.key {
                keep.insert(k.clone());
            } else if st.state == State::Blocked {
                // Its key is unknown only until its inputs rerun; if they reproduce their bytes (early cut-off),
                // the next run reuses its last entry: keep that one.
                let id = &project.plan.nodes[i].id;
                if let Some(r) = a.last.get(id).filter(|r| r.status == crate::cache::journal::Status::Ok) {
                    kept_blocked += usize::from(keep.insert(r.key.clone()));
                }
            }
        }
    }
    // Entries a live run just made (or is about to read) are reachable only from that run's view: never remove
    // anything while a run uses the cache.
    let _no_run = match (dry_run, cache.try_exclude_runs()?) {
        (false, None) => {
            return Err(Error::env(
                "an `mpcs run` is using this cache right now, and gc would remove entries it may need; \
                 run gc when it has finished (gc -n lists what would go)",
            ))
        }
        (_, lock) => lock,
    };
    let r = maintenance::gc(cache, &keep, dry_run)?;
    println!(
        "{} {} entries ({:.1} MB), kept {}{}",
        if dry_run { "would remove" } else { "removed" },
        r.removed.len(),
        r.bytes_freed as f64 / 1e6,
        r.kept,
        if r.busy > 0 { format!(", {} busy (in use by a running mpcs) left alone", r.busy) } else { String::new() }
    );
    let slurm_runs = if dry_run { 0 } else { exec::slurm::remove_finished_runs(cache) };
    if slurm_runs > 0 {
        println!("removed the job files of {slurm_runs} finished Slurm runs");
    }
    if kept_blocked > 0 {
        println!(
            "kept {kept_blocked} entries of blocked nodes (their last runs: if the nodes upstream reproduce their \
             outputs, the next run reuses them)"
        );
    }
    if dry_run {
        for key in &r.removed {
            println!("would remove {}", describe_entry(cache, key));
        }
    }
    for old in &r.old_formats {
        println!(
            "{} {old}/ of an older cache format (this mpcs never reads it)",
            if dry_run { "would remove" } else { "removed" }
        );
    }
    Ok(exit::OK)
}

/// `<key prefix>  <node> (<experiment>, <size>)` for listings.
fn describe_entry(cache: &Cache, key: &str) -> String {
    match cache.lookup(key) {
        Ok(Some(m)) => {
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            format!("{}  {} ({}, {:.1} MB)", &key[..12], m.node, m.experiment, bytes as f64 / 1e6)
        }
        _ => format!("{}  (unreadable manifest)", &key[..12.min(key.len())]),
    }
}

pub fn verify(remove: bool, cache: &Cache) -> Result<i32> {
    let r = maintenance::verify(cache, remove)?;
    for (key, problem) in &r.corrupt {
        println!("CORRUPT {key}: {problem}");
    }
    println!(
        "checked {} entries: {} corrupt{}",
        r.checked,
        r.corrupt.len(),
        if remove { format!(", {} removed (they will be recomputed)", r.removed) } else { String::new() }
    );
    if r.corrupt.is_empty() {
        Ok(exit::OK)
    } else {
        if !remove {
            println!("run `mpcs verify --remove` to delete them so the next run recomputes them");
        }
        Ok(exit::ENVIRONMENT)
    }
}

/// `mpcs synth`: a synthetic dataset in a real layout.
pub fn synth(dataset: &str, out: &Path, seed: u64, patients: Option<usize>, size: Option<&str>) -> Result<i32> {
    use crate::data::{synth, DataError};
    let user = |e: DataError| match e {
        DataError::Usage(_) | DataError::NotFound { .. } => Error::user(e.to_string()),
        other => Error::env(other.to_string()),
    };
    let kind: crate::data::Dataset = dataset.parse().map_err(user)?;
    let size = size.map(synth::parse_size).transpose().map_err(user)?;
    let t0 = Instant::now();
    let summary = synth::generate(kind, out, seed, patients, size).map_err(user)?;
    println!(
        "wrote {} synthetic {} images ({}x{}, {} patients, {} regions at all magnifications) to {} in {:.1} s",
        summary.images,
        summary.kind,
        summary.width,
        summary.height,
        summary.patients,
        summary.regions_all_magnifications,
        summary.root.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(exit::OK)
}

/// `mpcs init-weights`: seeded weights of an encoder with a `classes`-way head, saved by torchvision's names.
pub fn init_weights(arch: &str, out: &Path, classes: usize, seed: u64) -> Result<i32> {
    let arch: crate::nn::Arch = arch.parse().map_err(|e: crate::nn::NnError| Error::user(e.to_string()))?;
    if classes == 0 {
        return Err(Error::user("init-weights: --classes must be at least 1"));
    }
    if out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(Error::user(format!("init-weights: {} must end in .safetensors", out.display())));
    }
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu);
    crate::nn::Encoder::new(arch, vb, Some(classes), crate::nn::Dilation::None)
        .map_err(|e| Error::internal(e.to_string()))?;
    crate::train::seeded_init(&varmap, seed).map_err(|e| Error::internal(e.to_string()))?;
    crate::nn::weights::save(&varmap, out)
        .map_err(|e| Error::env(format!("init-weights: cannot write {}: {e}", out.display())))?;
    println!("wrote seeded {arch} weights ({classes}-class head, seed {seed}) to {}", out.display());
    Ok(exit::OK)
}

/// `mpcs stain`: normalise single images to a target.
pub fn stain(method: &str, target: Option<&Path>, inputs: &[PathBuf], out: &Path) -> Result<i32> {
    use crate::stain::{normalise_files, Method, Normaliser, StainError};
    let classify = |e: StainError| match e {
        StainError::Read { .. } | StainError::Write { .. } => Error::env(e.to_string()),
        other => Error::user(other.to_string()),
    };
    let method: Method = method.parse().map_err(classify)?;
    let norm = match (target, method) {
        (Some(t), m) => Normaliser::fit_file(m, t).map_err(classify)?,
        (None, Method::Reinhard) => Normaliser::bach_reinhard(),
        (None, Method::Macenko) => Normaliser::Macenko(crate::stain::macenko::Macenko::torchstain_default()),
        (None, m) => return Err(Error::user(format!("--method {m} needs --target IMAGE"))),
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io("cannot create", out, e))?;
    let t0 = Instant::now();
    let counts = normalise_files(&norm, inputs, out).map_err(classify)?;
    println!(
        "normalised {} image(s) with {method} into {} in {:.2} s{}",
        counts.images,
        out.display(),
        t0.elapsed().as_secs_f64(),
        if counts.passed_through > 0 {
            format!(" ({} with almost no tissue passed through unchanged)", counts.passed_through)
        } else {
            String::new()
        }
    );
    Ok(exit::OK)
}

/// Options shared by `mpcs predict`, `embed` and `cam`.
#[derive(clap::Args, Debug, Clone)]
pub struct InferArgs {
    /// resnet18, resnet34, resnet50, resnet101, resnet152 or efficientnet_b2 (default: what the weights look like)
    #[arg(long)]
    pub arch: Option<String>,
    /// torchvision checkpoint (.pth / .safetensors) or an mpcs model.safetensors / backbone.safetensors
    #[arg(long)]
    pub weights: PathBuf,
    /// Resize every image to SIZE x SIZE (bilinear) first; default: keep each image's size
    #[arg(long)]
    pub size: Option<usize>,
    /// Input scaling after /255: none (as MPCS trains) or imagenet (torchvision mean/std)
    #[arg(long, default_value = "none")]
    pub normalize: String,
    /// 8 or 16 for a dilated ResNet (the BACH / breast-cell encoder), as the model was trained
    #[arg(long)]
    pub output_stride: Option<usize>,
}

impl InferArgs {
    fn dilation(&self) -> Result<crate::nn::Dilation> {
        match self.output_stride {
            None => Ok(crate::nn::Dilation::None),
            Some(os) => crate::nn::Dilation::from_output_stride(os).map_err(|e| Error::user(e.to_string())),
        }
    }

    fn resolve(&self) -> Result<(crate::nn::Arch, crate::infer::InputOptions)> {
        use crate::loader::Normalize;
        let normalize = match self.normalize.as_str() {
            "none" => Normalize::None,
            "imagenet" => Normalize::ImageNet,
            other => return Err(Error::user(format!("--normalize {other}: choose none or imagenet"))),
        };
        if self.size == Some(0) {
            return Err(Error::user("--size must be at least 1"));
        }
        let arch = match &self.arch {
            Some(a) => a.parse().map_err(|e: crate::nn::NnError| Error::user(e.to_string()))?,
            None => {
                let names = crate::nn::weights::read_tensors(&self.weights).map_err(infer_error)?;
                crate::nn::weights::detect_arch(names.keys().map(String::as_str)).ok_or_else(|| {
                    Error::user(format!(
                        "{}: cannot tell which encoder these weights are for (neither ResNet nor EfficientNet names); pass --arch",
                        self.weights.display()
                    ))
                })?
            }
        };
        Ok((arch, crate::infer::InputOptions { size: self.size, normalize }))
    }
}

fn infer_error(e: impl Into<crate::infer::InferError>) -> Error {
    let e = e.into();
    if e.is_user() {
        Error::user(e.to_string())
    } else {
        Error::env(e.to_string())
    }
}

/// `mpcs predict`: raw model outputs per image as CSV.
pub fn predict(args: &InferArgs, images: &Path, out: &Path, classes: Option<usize>, batch: usize) -> Result<i32> {
    let (arch, input) = args.resolve()?;
    let mut opts = crate::infer::PredictOptions::new(arch, args.weights.clone(), images.into(), out.into());
    opts.input = input;
    opts.dilation = args.dilation()?;
    opts.classes = classes;
    opts.batch_size = batch;
    let t0 = Instant::now();
    crate::infer::predict(&opts).map_err(infer_error)?;
    println!("wrote {} ({arch}) in {:.1} s", out.display(), t0.elapsed().as_secs_f64());
    Ok(exit::OK)
}

/// `mpcs embed`: pooled encoder features per image as safetensors.
pub fn embed(args: &InferArgs, images: &Path, out: &Path, batch: usize) -> Result<i32> {
    let (arch, input) = args.resolve()?;
    let mut opts = crate::infer::EmbedOptions::new(arch, args.weights.clone(), images.into(), out.into());
    opts.input = input;
    opts.dilation = args.dilation()?;
    opts.batch_size = batch;
    let t0 = Instant::now();
    let (_, n, d) = crate::infer::embed(&opts).map_err(infer_error)?;
    println!("wrote {n} x {d} features ({arch}) to {} in {:.1} s", out.display(), t0.elapsed().as_secs_f64());
    Ok(exit::OK)
}

/// `mpcs cam`: Grad-CAM overlays, one PNG per image.
pub fn cam(
    args: &InferArgs,
    images: &[PathBuf],
    out: &Path,
    class: Option<usize>,
    layer: Option<String>,
    alpha: f32,
) -> Result<i32> {
    let (arch, input) = args.resolve()?;
    let mut opts = crate::infer::CamOptions::new(arch, args.weights.clone(), images.to_vec(), out.into());
    opts.input = input;
    opts.dilation = args.dilation()?;
    opts.class = class;
    opts.layer = layer;
    opts.alpha = alpha;
    for (png, cam) in crate::infer::cam_files(&opts).map_err(infer_error)? {
        println!("{} (class {}, {} map {}×{})", png.display(), cam.class, cam.layer, cam.fh, cam.fw);
    }
    Ok(exit::OK)
}
/// `mpcs bench train`: training-step throughput on synthetic input (see [`crate::bench`]); the last
/// stdout line is `images_per_s=<number>`.
pub fn bench(
    arch: &str,
    size: usize,
    batch: usize,
    steps: usize,
    threads: Option<usize>,
    device: &str,
    precision: &str,
) -> Result<i32> {
    use crate::bench::{train_bench, BenchError, TrainBenchOptions};
    let arch = arch.parse().map_err(|e: crate::nn::NnError| Error::user(e.to_string()))?;
    let precision = precision.parse().map_err(|e: String| Error::user(format!("bench: --precision: {e}")))?;
    let device = crate::doctor::open_device(device).map_err(|e| Error::user(format!("bench: {e}")))?;
    let opts = TrainBenchOptions { arch, size, batch, steps, warmup: 1, threads, device, precision };
    let mut out = std::io::stdout().lock();
    match train_bench(&opts, &mut out) {
        Ok(_) => Ok(exit::OK),
        // `mpcs bench train | head -3`: the reader left; stop quietly.
        Err(BenchError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(exit::OK),
        Err(e @ BenchError::Options(_)) => Err(Error::user(e.to_string())),
        Err(e) => Err(Error::internal(e.to_string())),
    }
}

/// `mpcs bench loader`: the loader's images/s at `size` with `threads` workers (default: every core).
pub fn bench_loader(size: usize, batch: usize, batches: usize, threads: Option<usize>) -> Result<i32> {
    use crate::bench::{loader_bench, BenchError, LoaderBenchOptions};
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = LoaderBenchOptions { size, batch, threads, batches };
    match loader_bench(&opts, &mut std::io::stdout().lock()) {
        Ok(_) => Ok(exit::OK),
        Err(BenchError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(exit::OK),
        Err(e @ BenchError::Options(_)) => Err(Error::user(e.to_string())),
        Err(e) => Err(Error::internal(e.to_string())),
    }
}

/// `mpcs doctor`: exit 0 when every check passes, 1 on a mismatch.
pub fn doctor(device: String, archs: &[String], size: usize, batch: usize, seed: u64) -> Result<i32> {
    let archs = archs
        .iter()
        .map(|a| a.parse().map_err(|e: crate::nn::NnError| Error::user(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    if batch < 2 || size < 32 {
        return Err(Error::user("doctor: --batch must be at least 2 (BatchNorm) and --size at least 32"));
    }
    // A device that cannot be named or opened is the command line's fault (exit 2), a failing step the machine's.
    crate::doctor::open_device(&device).map_err(|e| Error::user(format!("doctor: {e}")))?;
    let opts = crate::doctor::DoctorOptions { device, archs, size, batch, seed };
    let ok =
        crate::doctor::run(&opts, &mut std::io::stdout().lock()).map_err(|e| Error::env(format!("doctor: {e:#}")))?;
    Ok(if ok { exit::OK } else { exit::NODE_FAILED })
}

/// The remote a push, pull or gc uses; an error when none is configured.
fn open_remote(spec: &RemoteSpec, project: &Project) -> Result<std::sync::Arc<Remote>> {
    let spec = remote_spec(Some(spec), project).ok_or_else(|| {
        Error::user(format!(
            "no remote cache: pass --remote s3://bucket/prefix, set {}, or add [cache] remote to {}",
            crate::remote::REMOTE_ENV,
            project.exp.path.display()
        ))
    })?;
    Remote::connect(Some(&spec))?.ok_or_else(|| Error::env("the remote cache cannot be used (see the warning above)"))
}

/// `mpcs push EXP`: every entry of the experiment in the local cache that the remote lacks.
pub fn push(experiment: &Path, sets: &[String], spec: &RemoteSpec, cache: &Cache) -> Result<i32> {
    let project = load(experiment, sets)?;
    if !spec.mode.writes() {
        return Err(Error::user("push writes to the remote: drop --remote-mode read"));
    }
    let remote = open_remote(spec, &project)?;
    let a = lineage::assess(&project, cache)?;
    let (mut pushed, mut already, mut blobs, mut bytes, mut not_pushed) = (0, 0, 0, 0u64, Vec::new());
    for (i, st) in a.nodes.iter().enumerate() {
        let (State::Cached, Some(key), None) = (st.state, &st.key, project.source_of(i)) else { continue };
        let id = &project.plan.nodes[i].id;
        match remote.push(cache, key)? {
            crate::remote::Push::Pushed { blobs: b, bytes: n } => {
                pushed += 1;
                blobs += b;
                bytes += n;
            }
            crate::remote::Push::AlreadyThere => already += 1,
            crate::remote::Push::Skipped(why) => not_pushed.push(format!("{id}: {why}")),
        }
    }
    remote.release_push_lock();
    println!(
        "pushed {pushed} entries to {} ({blobs} new blobs, {}); {already} were there already{}",
        remote.url(),
        crate::remote::human_bytes(bytes),
        if not_pushed.is_empty() { String::new() } else { format!("; {} not pushed:", not_pushed.len()) }
    );
    for why in &not_pushed {
        println!("  {why}");
    }
    tracing::debug!("remote requests: {}", remote.stats.json());
    Ok(if not_pushed.is_empty() { exit::OK } else { exit::ENVIRONMENT })
}

/// `mpcs pull EXP [--only STAGES]`: the experiment's entries the remote has and this cache lacks.
pub fn pull(experiment: &Path, sets: &[String], only: &[String], spec: &RemoteSpec, cache: &Cache) -> Result<i32> {
    let project = load(experiment, sets)?;
    if !spec.mode.reads() {
        return Err(Error::user("pull reads from the remote: drop --remote-mode write"));
    }
    for stage in only {
        if project.exp.stage(stage).is_none() {
            let names = project.exp.stages.iter().map(|s| s.name.as_str());
            let hint = did_you_mean(stage, names).map(|s| format!(" Did you mean `{s}`?")).unwrap_or_default();
            return Err(Error::user(format!("--only {stage}: the experiment has no stage `{stage}`.{hint}")));
        }
    }
    let remote = open_remote(spec, &project)?;
    let a = lineage::assess_with(&project, cache, Some(&remote))?;
    let t0 = Instant::now();
    let (mut pulled, mut bytes, mut unusable) = (0, 0u64, Vec::new());
    let mut elsewhere = 0;
    let mut wanted: Vec<usize> = Vec::new();
    for (i, st) in a.nodes.iter().enumerate() {
        let stage = &project.exp.stages[project.plan.nodes[i].stage].name;
        if !only.is_empty() && !only.contains(stage) {
            continue;
        }
        match st.state {
            State::Remote => wanted.push(i),
            State::WillRun | State::Failed | State::Blocked if project.source_of(i).is_none() => elsewhere += 1,
            _ => {}
        }
    }
    let keys: Vec<&str> = wanted.iter().filter_map(|&i| a.nodes[i].key.as_deref()).collect();
    for (&i, result) in wanted.iter().zip(remote.pull_many(cache, &keys)) {
        let id = &project.plan.nodes[i].id;
        match result? {
            crate::remote::Pull::Pulled(_) => {
                pulled += 1;
                bytes += a.nodes[i].remote_bytes.unwrap_or(0);
            }
            crate::remote::Pull::Busy => unusable.push(format!("{id}: another mpcs here holds it")),
            crate::remote::Pull::Absent => unusable.push(format!("{id}: gone from the remote")),
            crate::remote::Pull::Unusable(why) => unusable.push(format!("{id}: {why}")),
        }
    }
    println!(
        "pulled {pulled} entries from {} ({} in {:.2} s); {elsewhere} nodes are on neither cache (a run computes them){}",
        remote.url(),
        crate::remote::human_bytes(bytes),
        t0.elapsed().as_secs_f64(),
        if unusable.is_empty() { String::new() } else { format!("; {} could not be pulled:", unusable.len()) }
    );
    for why in &unusable {
        println!("  {why}");
    }
    tracing::debug!("remote requests: {}", remote.stats.json());
    Ok(if unusable.is_empty() { exit::OK } else { exit::ENVIRONMENT })
}

/// `mpcs gc --remote EXP...`: removes the remote's records that none of the experiments reaches, then the blobs
/// no remaining record refers to.
pub fn gc_remote(
    experiments: &[PathBuf],
    sets: &[String],
    dry_run: bool,
    spec: &RemoteSpec,
    cache: &Cache,
) -> Result<i32> {
    let projects = experiments.iter().map(|p| load(p, sets)).collect::<Result<Vec<_>>>()?;
    let first =
        projects.first().ok_or_else(|| Error::user("gc --remote needs the experiments whose entries to keep"))?;
    let remote = open_remote(spec, first)?;
    let mut keep = HashSet::new();
    for project in &projects {
        let a = lineage::assess_with(project, cache, Some(&remote))?;
        for (i, st) in a.nodes.iter().enumerate() {
            if project.source_of(i).is_some() {
                continue;
            }
            if let Some(k) = &st.key {
                keep.insert(k.clone());
            } else if let Some(r) = a.last.get(&project.plan.nodes[i].id) {
                // Blocked: keep its last entry, as local gc does (its inputs may reproduce their outputs).
                keep.insert(r.key.clone());
            }
        }
    }
    let r = remote.gc(&keep, dry_run)?;
    println!(
        "{} {} records and {} blobs ({}) from {}; kept {} records",
        if dry_run { "would remove" } else { "removed" },
        r.records_removed,
        r.blobs_removed,
        crate::remote::human_bytes(r.bytes_freed),
        remote.url(),
        r.records_kept
    );
    Ok(exit::OK)
}
