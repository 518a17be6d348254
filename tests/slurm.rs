//! The Slurm executor against a real one-node Slurm (Debian's slurmctld, slurmd and munge, started by
//! `scripts/slurm/cluster.sh` in a temp folder and stopped when the test ends, even when it fails). One test runs
//! every scenario in turn on one cluster. Skipped, saying so, where Slurm is not installed or not root.

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    /// A cluster in its own temp folder; `accounting` adds MariaDB + slurmdbd (sacct answers) and makes squeue
    /// forget ended jobs within seconds (MinJobAge = 2).
    fn start(accounting: bool) -> Option<Cluster> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/cluster.sh");
        let name = if accounting { "acct" } else { "plain" };
        let dir = std::env::temp_dir().join(format!("mpcs-slurm-test-{name}-{}", std::process::id()));
        // Ports of this test process, so two test runs on one machine (or a developer's cluster) do not meet.
        let port = 20000 + 8 * (std::process::id() % 5000) + if accounting { 4 } else { 0 };
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg("start").arg(&dir);
        for (i, var) in ["CTLD", "D", "DBD", "DB"].iter().enumerate() {
            cmd.env(format!("MPCS_SLURM_{var}_PORT"), (port + i as u32).to_string());
        }
        if accounting {
            cmd.env("MPCS_SLURM_ACCOUNTING", "1").env("MPCS_SLURM_MIN_JOB_AGE", "2");
        }
        let out = cmd.output().ok()?;
        if !out.status.success() {
            let _ = Command::new("bash").arg(&script).arg("stop").arg(&dir).status();
            let why = String::from_utf8_lossy(&out.stderr);
            // Status 2: the packages are missing (a machine without Slurm); any other failure is a failure.
            assert_eq!(out.status.code(), Some(2), "the {name} Slurm cluster did not start: {why}");
            eprintln!("skipped: no Slurm cluster ({name}): {}", why.trim());
            return None;
        }
        Some(Cluster { dir })
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    fn squeue(&self, args: &[&str]) -> String {
        let out = Command::new("squeue").env("SLURM_CONF", self.conf()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Queued or running jobs of the runs on `p`'s cache (the time-limit scenario's jobs share the cluster).
    fn live_jobs(&self, p: &Project) -> usize {
        let runs: Vec<String> = fs::read_dir(p.path("cache/v2/slurm"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "keys")
            .map(|n| format!("mpcs-{n}"))
            .collect();
        if runs.is_empty() {
            return 0;
        }
        self.squeue(&["-h", "-t", "pending,running", "-o", "%i", "--name", &runs.join(",")]).split_whitespace().count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/cluster.sh");
        let _ = Command::new("bash").arg(&script).arg("stop").arg(&self.dir).status();
    }
}

/// A profile that polls quickly (the defaults are kind to a real slurmctld: 5 s backing off to 120 s).
const PROFILE: &str = "[slurm]\npoll_min_s = 0.5\npoll_max_s = 2\n";

fn slurm_cmd(p: &Project, c: &Cluster, exp: &str, extra: &[&str]) -> Command {
    let mut args = vec!["run", exp, "--executor", "slurm", "--profile", "profile.toml", "--json", "--plain"];
    args.extend_from_slice(extra);
    let mut cmd = p.cmd(&args);
    cmd.env("SLURM_CONF", c.conf());
    cmd
}

fn executor_counts(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
    v["executor"].clone()
}

#[test]
fn slurm_executor_on_a_real_cluster() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: starting Slurm's daemons needs root");
        return;
    }
    let Some(cluster) = Cluster::start(false) else { return };
    // The time and memory limits take a minute or two of Slurm's time, and so does the accounting scenario (on a
    // second cluster, with slurmdbd): they run beside the other scenarios.
    let limits = LimitRuns::start(&cluster);
    let accounting = Cluster::start(true).map(|c| {
        let run = AccountedRun::start(&c);
        (c, run)
    });
    two_hundred_nodes_run_once_then_nothing_is_submitted(&cluster);
    gpu_nodes_never_share_a_device(&cluster);
    a_cancelled_job_fails_only_its_node_with_the_reason(&cluster);
    a_failed_array_element_fails_only_its_node(&cluster);
    ctrl_c_cancels_every_job_and_publishes_nothing(&cluster);
    a_second_run_adopts_the_first_runs_jobs(&cluster);
    a_requeued_training_node_resumes_from_its_checkpoint(&cluster);
    a_reduced_quickstart_gives_the_local_executors_table(&cluster);
    limits.check();
    if let Some((_cluster, run)) = accounting {
        run.check();
    }
}

fn two_hundred_nodes_run_once_then_nothing_is_submitted(c: &Cluster) {
    let p = Project::new();
    p.write("data/raw/a.txt", "alpha\n");
    p.write("paper.toml", &paper_dag("a", "", ""));
    p.write("profile.toml", PROFILE);
    let t0 = Instant::now();
    let out = slurm_cmd(&p, c, "paper.toml", &[]).output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = parse_summary(&out);
    assert_eq!(s.executed.len(), 200, "{s:?}");
    let counts = exec_counts(&p);
    assert_eq!(counts.len(), 199, "every command node ran");
    assert!(counts.values().all(|&n| n == 1), "each node exactly once: {counts:?}");
    let ended = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let ex = executor_counts(&out);
    // Nodes of one stage that become ready together go as one job array.
    let sbatch = ex["sbatch"].as_u64().unwrap();
    assert!(sbatch < 100, "wide stages are submitted as arrays: {ex}");
    // From the last job's end (its entry's publication) to mpcs exiting.
    let table = p.mpcs(&["show", "table", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
    let published = m["started_unix"].as_f64().unwrap() + m["duration_s"].as_f64().unwrap();
    // The same DAG on the local executor, in a fresh cache, for comparison.
    let t1 = Instant::now();
    let local = p.mpcs(&["run", "paper.toml", "--cache", "cache-local", "--json", "--plain"]);
    assert!(local.status.success());
    eprintln!(
        "200 nodes under Slurm in {secs:.1} s ({ex}), last job's end to exit {:.2} s; local executor {:.1} s",
        ended - published,
        t1.elapsed().as_secs_f64()
    );
    let table_of = |cache: &str| {
        let out = p.mpcs(&["--cache", cache, "show", "table", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["output_digest"].as_str().unwrap().to_string()
    };
    assert_eq!(table_of("cache"), table_of("cache-local"), "the same table as the local executor");
    // A no-op rerun submits nothing.
    let out = slurm_cmd(&p, c, "paper.toml", &[]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(parse_summary(&out).executed.len(), 0);
    assert_eq!(executor_counts(&out)["sbatch"], 0);
    assert_eq!(executor_counts(&out)["squeue"], 0, "nothing to ask Slurm");
    // gc removes the finished run's job files (the no-op run wrote none).
    let gc = p.mpcs(&["gc", "paper.toml"]);
    assert!(String::from_utf8_lossy(&gc.stdout).contains("removed the job files of 1 finished Slurm runs"));
    let left: Vec<_> = fs::read_dir(p.path("cache/v2/slurm")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, ["keys"], "every job of the run ended, so its key records went too");
}

fn gpu_nodes_never_share_a_device(c: &Cluster) {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("profile.toml", PROFILE);
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.train]\nkind = \"command\"\nfrom = \"raw\"\n\
               matrix = { i = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }\ngpus = 1\n\
               run = [\"sh\", \"-c\", \"s=$(date +%s.%N); sleep 0.4; echo $s $(date +%s.%N) $CUDA_VISIBLE_DEVICES $SLURM_CPUS_PER_TASK > {out}/use; cat {out}/use >> uses.log\"]\n\n\
               [stage.both]\nkind = \"command\"\nfrom = \"raw\"\ngpus = 2\nrun = [\"sh\", \"-c\", \"echo $CUDA_VISIBLE_DEVICES $SLURM_CPUS_PER_TASK > {out}/use\"]\n";
    // This experiment says where it runs itself: no --executor, no profile.
    let exp = format!(
        "{exp}\n[executor]\nkind = \"slurm\"\n\n[executor.slurm]\npoll_min_s = 0.5\npoll_max_s = 2\n\n\
         [executor.slurm.kind.command]\ncpus = 2\n\n[executor.slurm.stage.both]\ncpus = 3\n"
    );
    p.write("g.toml", &exp);
    let mut run = p.cmd(&["run", "g.toml", "--json", "--plain"]);
    let out = run.env("SLURM_CONF", c.conf()).output().unwrap();
    assert_eq!(executor_counts(&out)["sbatch"], 2, "[executor] kind = \"slurm\" is obeyed; one array per stage");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let uses: Vec<(f64, f64, String)> = fs::read_to_string(p.path("uses.log"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f[3], "2", "the kind's cpus: {l}");
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].to_string())
        })
        .collect();
    assert_eq!(uses.len(), 12);
    assert!(uses.iter().all(|u| u.2.len() == 1 && u.2.parse::<u32>().is_ok()), "one GPU each: {uses:?}");
    for (i, a) in uses.iter().enumerate() {
        for b in &uses[i + 1..] {
            let overlap = a.0 < b.1 && b.0 < a.1;
            assert!(!(overlap && a.2 == b.2), "two nodes on GPU {} at once: {a:?} {b:?}", a.2);
        }
    }
    let both = p.mpcs(&["show", "both", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&both.stdout).unwrap();
    let key = v["key"].as_str().unwrap();
    let used = fs::read_to_string(p.path(&format!("cache/v2/entries/{}/{key}/out/use", &key[..2]))).unwrap();
    let (devices, cpus) = used.trim().split_once(' ').unwrap();
    let ids: Vec<&str> = devices.split(',').collect();
    assert!(ids.len() == 2 && ids[0] != ids[1], "gpus = 2 is one task with two GPUs: {used}");
    assert_eq!(cpus, "3", "the stage's own cpus over its kind's");
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn a_cancelled_job_fails_only_its_node_with_the_reason(c: &Cluster) {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("profile.toml", PROFILE);
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.slow]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"-c\", \"echo $SLURM_JOB_ID > slow.started; sleep 60 && echo > {out}/f\"]\n\n[stage.quick]\n\
               kind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"sleep 1; echo > {out}/f\"]\n";
    p.write("c.toml", exp);
    let child = slurm_cmd(&p, c, "c.toml", &["-k"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    eventually("the slow job to start", || fs::read_to_string(p.path("slow.started")).is_ok_and(|t| t.ends_with('\n')));
    let job = fs::read_to_string(p.path("slow.started")).unwrap();
    let status = Command::new("scancel").env("SLURM_CONF", c.conf()).arg(job.trim()).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let s = parse_summary(&out);
    assert_eq!(s.failed, set(&["slow"]), "{stderr}");
    assert!(s.executed.contains("quick"), "{s:?}");
    assert!(stderr.contains("FAILED slow: ") && stderr.contains("CANCELLED"), "the reason is Slurm's state: {stderr}");
}

fn ctrl_c_cancels_every_job_and_publishes_nothing(c: &Cluster) {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("profile.toml", PROFILE);
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.slow]\nkind = \"command\"\nfrom = \"raw\"\n\
               matrix = { i = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20] }\n\
               run = [\"sh\", \"-c\", \"touch started.{i}; sleep 60; echo > {out}/f\"]\n";
    p.write("i.toml", exp);
    let child = slurm_cmd(&p, c, "i.toml", &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    eventually("a job to start", || p.path("started.1").exists() || p.path("started.2").exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    // Batched: one scancel for the queued jobs, one (SIGTERM to the workers) for the running ones, and at most one
    // more for all that still run after the grace period (a job caught between PENDING and RUNNING matches
    // neither state filter; on a loaded CI machine this happened) — never one per job (there are 20).
    let scancels = executor_counts(&out)["scancel"].as_u64().unwrap();
    assert!((2..=3).contains(&scancels), "{}", executor_counts(&out));
    eventually("every job to leave the queue", || c.live_jobs(&p) == 0);
    assert!(p.entries().is_empty(), "nothing published");
}

fn a_second_run_adopts_the_first_runs_jobs(c: &Cluster) {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("profile.toml", PROFILE);
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.slow]\nkind = \"command\"\nfrom = \"raw\"\n\
               matrix = { i = [1, 2, 3] }\nrun = [\"sh\", \"-c\", \"echo {node} >> exec.log; sleep 3; echo > {out}/f\"]\n";
    p.write("a.toml", exp);
    let mut first = slurm_cmd(&p, c, "a.toml", &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    eventually("the first run's jobs to be queued", || c.live_jobs(&p) == 3);
    // The first submitter dies; its jobs stay in the queue, and `graph` shows them with their job ids.
    first.kill().unwrap();
    first.wait().unwrap();
    let mut graph = p.cmd(&["graph", "a.toml", "--format", "json"]);
    let graph = graph.env("SLURM_CONF", c.conf()).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&graph.stdout).unwrap();
    for n in v["nodes"].as_array().unwrap().iter().filter(|n| n["stage"] == "slow") {
        assert!(n["state"] == "queued" || n["state"] == "running", "{n}");
        // A job id, or an array element's (`123_4`).
        let job = n["job"].as_str().unwrap_or_default();
        assert!(!job.is_empty() && job.split('_').all(|part| part.parse::<u64>().is_ok()), "{n}");
    }
    let out = slurm_cmd(&p, c, "a.toml", &[]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ex = executor_counts(&out);
    assert_eq!(ex["adopted"], 3, "{ex}");
    assert_eq!(ex["sbatch"], 0, "{ex}");
    let counts = exec_counts(&p);
    assert!(counts.values().all(|&n| n == 1) && counts.len() == 3, "each node once: {counts:?}");
}

/// A tiny pretraining of 8 epochs on synthetic BreakHis, checkpointing every epoch.
const PRETRAINING: &str = r#"
[stage.pretrain]
kind = "pretrain"
from = ["folds", "data"]
matrix = { fold = [0], pair = ["OP"] }
size = 16
batch_size = 4
epochs = 8
lr = 0.0003
projector_hidden = 32
buckets = [2, 4, 100]
"#;

fn epochs_checkpointed(p: &Project) -> Option<u64> {
    for e in fs::read_dir(p.path("cache/v2/scratch")).ok()?.flatten() {
        if let Ok(text) = fs::read(e.path().join("state.json")) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
                return v["epochs_done"].as_u64();
            }
        }
    }
    None
}

/// Preemption: `scontrol requeue` stops the job (SIGTERM to its worker) and queues it again; the rerun resumes from
/// the checkpoint in the shared scratch area and the run ends as if nothing happened.
fn a_requeued_training_node_resumes_from_its_checkpoint(c: &Cluster) {
    let p = Project::new();
    p.write("profile.toml", PROFILE);
    p.write("tiny.toml", &format!("{}{PRETRAINING}", tiny_training_head("tiny")));
    let child = slurm_cmd(&p, c, "tiny.toml", &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    eventually("two epochs checkpointed", || epochs_checkpointed(&p).is_some_and(|n| n >= 2));
    let stopped_after = epochs_checkpointed(&p).unwrap();
    let job = fs::read_dir(p.path("cache/v2/slurm/keys")).unwrap().flatten().find_map(|e| {
        let record = fs::read_to_string(e.path()).unwrap();
        Some(record.split(' ').next()?.to_string())
    });
    let job = job.unwrap_or_default();
    assert_eq!(c.squeue(&["-h", "-j", &job, "-o", "%T"]).trim(), "RUNNING", "the pretraining's job {job}");
    let scontrol = |args: &[&str]| Command::new("scontrol").env("SLURM_CONF", c.conf()).args(args).status().unwrap();
    assert!(scontrol(&["requeue", &job]).success());
    // A requeued job waits for its begin time; let it start at once.
    eventually("the job to be queued again", || c.squeue(&["-h", "-j", &job, "-o", "%T"]).trim() == "PENDING");
    scontrol(&["update", &format!("JobId={job}"), "StartTime=now"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(parse_summary(&out).executed.contains("pretrain[fold=0,pair=OP]"));
    let show = p.mpcs(&["show", "pretrain[fold=0,pair=OP]", "--exp", "tiny.toml", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let resumed = m["metrics"]["resumed_after"].as_u64().expect("the requeued job resumed");
    assert!(resumed >= stopped_after.min(7), "resumed after {resumed}, the checkpoint had {stopped_after}");
    assert_eq!(m["metrics"]["epochs"], 8);
    assert_eq!(executor_counts(&out)["sbatch"], 3, "data, folds, pretrain: the requeue submitted nothing");
}

/// The README's quickstart, reduced to seconds (as tests/quickstart.rs does), gives the same table under Slurm as
/// on the local executor: the same bytes, since results do not depend on thread counts.
fn a_reduced_quickstart_gives_the_local_executors_table(c: &Cluster) {
    let p = Project::new();
    p.write("profile.toml", PROFILE);
    let exp = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.toml");
    let exp = exp.to_str().unwrap();
    let reduced = one_fold_quickstart_sets();
    let args: Vec<&str> = reduced.iter().map(String::as_str).collect();
    let out = slurm_cmd(&p, c, exp, &args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let local = p.mpcs(&[&["run", exp, "--cache", "cache-local", "--json", "--plain"][..], &args].concat());
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let table = |cache: &str| {
        let mut a = vec!["--cache", cache, "show", "table", "--exp", exp, "--json"];
        a.extend_from_slice(&args);
        let out = p.mpcs(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let dir = PathBuf::from(v["path"].as_str().unwrap());
        fs::read_to_string(dir.join("table.md")).unwrap()
    };
    assert_eq!(table("cache"), table("cache-local"), "the same table under Slurm as locally");
}

fn a_failed_array_element_fails_only_its_node(c: &Cluster) {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("profile.toml", PROFILE);
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.wide]\nkind = \"command\"\nfrom = \"raw\"\n\
               matrix = { i = [1, 2, 3, 4, 5, 6] }\n\
               run = [\"sh\", \"-c\", \"test {i} != 3 || exit 9; echo {i} > {out}/f\"]\n";
    p.write("w.toml", exp);
    let out = slurm_cmd(&p, c, "w.toml", &["-k"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let s = parse_summary(&out);
    assert_eq!(s.failed, set(&["wide[i=3]"]), "{stderr}");
    assert_eq!(s.executed.len(), 6, "the source and the other five elements: {s:?}");
    assert_eq!(executor_counts(&out)["sbatch"], 1, "one array for the six nodes");
    assert!(stderr.contains("exited with status 9"), "{stderr}");
}

/// Two runs that meet Slurm's limits, started at the beginning and checked at the end: a node whose job nears its
/// time limit requeues itself and resumes from its scratch folder; a node that overruns its time limit without
/// that, or its memory limit, fails with the reason, what to change, and the job's output as its failure log.
struct LimitRuns {
    requeue: (Project, std::process::Child),
    limits: (Project, std::process::Child),
}

impl LimitRuns {
    fn start(c: &Cluster) -> LimitRuns {
        let requeue = Project::new();
        requeue.write("data/x.txt", "x");
        // Slurm signals when the time left is under signal_before_s + 30 s (its check runs every 30 s): with a
        // 1-minute limit the warning comes 25-55 s into the job.
        requeue.write("profile.toml", &format!("{PROFILE}signal_before_s = 5\ntime = \"1\"\n"));
        let exp =
            "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.long]\nkind = \"command\"\nfrom = \"raw\"\n\
                   run = [\"sh\", \"-c\", \"if [ -f $MPCS_SCRATCH/half ]; then echo resumed after $SLURM_RESTART_COUNT \
                   requeue > {out}/f; else echo first half; touch $MPCS_SCRATCH/half; sleep 200; fi\"]\n";
        requeue.write("r.toml", exp);
        let child =
            slurm_cmd(&requeue, c, "r.toml", &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let limits = Project::new();
        limits.write("data/x.txt", "x");
        limits.write(
            "profile.toml",
            &format!(
                "{PROFILE}signal_before_s = 0\n[slurm.stage.too_slow]\ntime = \"1\"\n[slurm.stage.too_big]\nmem = \"100M\"\n"
            ),
        );
        let exp = r#"
[stage.raw]
kind = "source"
path = "data"

[stage.too_slow]
kind = "command"
from = "raw"
run = ["sh", "-c", "echo working; sleep 300"]

[stage.too_big]
kind = "command"
from = "raw"
run = ["bash", "-c", "echo loading; a=$(yes 0123456789 | head -c 300M); sleep 10; echo > {out}/f"]
"#;
        limits.write("l.toml", exp);
        let child2 =
            slurm_cmd(&limits, c, "l.toml", &["-k"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        LimitRuns { requeue: (requeue, child), limits: (limits, child2) }
    }

    fn check(self) {
        let (p, child) = self.requeue;
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(executor_counts(&out)["sbatch"], 1, "the job requeued itself: {}", executor_counts(&out));
        let show = p.mpcs(&["show", "long", "--exp", "r.toml", "--json"]);
        let out_dir =
            PathBuf::from(serde_json::from_slice::<serde_json::Value>(&show.stdout).unwrap()["path"].as_str().unwrap());
        assert_eq!(fs::read_to_string(out_dir.join("f")).unwrap(), "resumed after 1 requeue\n");
        // The entry's log ends with the job's own output: both attempts and the worker's notice.
        let log = fs::read_to_string(out_dir.with_file_name("log.txt")).unwrap();
        assert!(log.contains("output of the job running this node"), "{log}");
        assert!(log.contains("time limit is near: stopping node `long` and requeueing the job (requeue 1 of"), "{log}");

        let (p, child) = self.limits;
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(parse_summary(&out).failed, set(&["too_slow", "too_big"]), "{stderr}");
        assert!(
            stderr.contains("ended TIMEOUT") && stderr.contains("raise `time` for this stage ([slurm.stage.too_slow])"),
            "{stderr}"
        );
        assert!(
            stderr.contains("more memory than its limit; raise `mem` for this stage ([slurm.stage.too_big]"),
            "{stderr}"
        );
        // Each failure's log is the job's output, Slurm's own words included; nothing of theirs was published.
        let logs: Vec<String> = fs::read_dir(p.path("cache/v2/failed"))
            .unwrap()
            .flatten()
            .map(|e| fs::read_to_string(e.path().join("log.txt")).unwrap())
            .collect();
        assert_eq!(logs.len(), 2);
        assert!(logs.iter().any(|l| l.contains("DUE TO TIME LIMIT") && l.contains("working")), "{logs:?}");
        // Killed outright, its worker could not keep the command's log: it is taken from the staging folder.
        assert!(logs.iter().any(|l| l.contains("exceeded memory limit") && l.starts_with("loading\n")), "{logs:?}");
        assert!(p.entries().is_empty(), "nothing of theirs was published");
    }
}

/// With accounting, a job that died without a word after squeue forgot it (MinJobAge) still fails its node with
/// Slurm's state and exit code, from one `sacct`: here a job killed for memory, asked about only after 20 s.
struct AccountedRun(Project, std::process::Child);

impl AccountedRun {
    fn start(c: &Cluster) -> AccountedRun {
        let p = Project::new();
        p.write("data/x.txt", "x");
        p.write("profile.toml", "[slurm]\npoll_min_s = 20\npoll_max_s = 20\nmem = \"100M\"\n");
        let exp = r#"
[stage.raw]
kind = "source"
path = "data"

[stage.too_big]
kind = "command"
from = "raw"
run = ["bash", "-c", "a=$(yes 0123456789 | head -c 300M); sleep 10; echo > {out}/f"]
"#;
        p.write("m.toml", exp);
        let child = slurm_cmd(&p, c, "m.toml", &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        AccountedRun(p, child)
    }

    fn check(self) {
        let out = self.1.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let ex = executor_counts(&out);
        assert_eq!((ex["squeue"].as_u64(), ex["sacct"].as_u64()), (Some(1), Some(1)), "{ex}");
        // squeue no longer listed the job: state and exit code (killed by signal 9) are sacct's.
        assert!(
            stderr.contains("ended FAILED (exit code 0:9) without publishing the entry: it used more memory"),
            "{stderr}"
        );
        let failed = fs::read_dir(self.0.path("cache/v2/failed")).unwrap().flatten().next().unwrap();
        let log = fs::read_to_string(failed.path().join("log.txt")).unwrap();
        assert!(log.contains("exceeded memory limit"), "the job's output is the node's failure log: {log}");
    }
}
