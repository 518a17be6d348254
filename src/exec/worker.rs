//! Executes one node in this process and publishes its entry: take the key's lock (so two `mpcs run`s on one
//! cache compute each entry once), look again, execute into a staging directory, publish atomically. Whatever
//! executor runs a node — a thread here, a job on another machine — ends in this function, and reports back
//! through the cache entry it publishes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::kind::{DeviceAssignment, ExecContext, InputDir, StageFailure};
use super::process::ProcessRegistry;
use super::progress::{Event, Reporter};
use super::project::Project;
use crate::cache::journal::now_unix;
use crate::cache::{hostname, Cache, EntryCheck, FileLock, Manifest, Staging};
use crate::error::{Error, Result};
use crate::plan::key::Action;

/// One node to execute: everything a worker needs besides the project and the cache.
pub struct Job {
    pub index: usize,
    pub key: String,
    pub action: Action,
    pub inputs: Vec<InputDir>,
    /// GPU slots the node holds while it runs.
    pub gpus: u32,
}

/// How a node's execution ended.
pub enum NodeOutcome {
    /// `executed` is false when another run published the entry while we waited for the key's lock.
    Done {
        manifest: Box<Manifest>,
        executed: bool,
    },
    Failed {
        message: String,
        log: Option<PathBuf>,
    },
    /// Input number `input` is a cache entry that no longer holds what its manifest lists (`reason`); it has been
    /// removed, and the node must wait for it to be computed again.
    InputDamaged {
        input: usize,
        reason: String,
    },
    Cancelled,
}

/// What a worker shares with the rest of the run.
pub struct WorkerEnv<'a> {
    pub project: &'a Project,
    pub cache: &'a Cache,
    pub cancel: &'a Arc<AtomicBool>,
    pub processes: &'a ProcessRegistry,
    pub reporter: &'a dyn Reporter,
    /// Output of the process this node runs in when something else captures it (a Slurm job's output file):
    /// appended to the node's log before the entry (or the failure) is stored, so `log.txt` tells everything.
    pub job_output: Option<&'a Path>,
}

impl WorkerEnv<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Runs `job` on `device` and publishes its entry.
    pub fn run(&self, job: Job, device: DeviceAssignment) -> Result<NodeOutcome> {
        let Some(lock) = self.acquire(&job)? else { return Ok(NodeOutcome::Cancelled) };
        if let Some(m) = self.cache.lookup(&job.key)? {
            return Ok(NodeOutcome::Done { manifest: Box::new(m), executed: false });
        }
        if self.cancelled() {
            return Ok(NodeOutcome::Cancelled);
        }
        // Never compute from damaged bytes: an input entry that changed since it was stored counts as missing.
        let mut inputs = job.inputs.clone();
        if let Err((input, reason)) = self.check_inputs(&mut inputs) {
            return Ok(NodeOutcome::InputDamaged { input, reason });
        }
        let staging = self.cache.begin(&job.key, &lock)?;
        let label = device.label();
        let node = &self.project.plan.nodes[job.index];
        self.reporter.event(Event::Started { node: &node.id, device: &label });
        let (started_unix, t0) = (now_unix(), Instant::now());
        let result = self.execute(&job, &inputs, &staging, device);
        if self.cancelled() {
            self.cache.discard(staging, &job.key);
            return Ok(NodeOutcome::Cancelled);
        }
        // The stage's own failure, a source that changed under it, or an output that cannot be stored: each
        // fails this node, keeping its log.
        let checked = result.map_err(|StageFailure(message)| message).and_then(|metrics| {
            self.sources_unchanged(&job)?;
            self.inputs_untouched(&job, &mut inputs)?;
            Ok((metrics, self.cache.staged_files(&staging)?))
        });
        let (metrics, files) = match checked {
            Ok(done) => done,
            Err(message) => {
                let message = self.with_disk_full_hint(message);
                self.append_job_output(&staging.log);
                let log = self.cache.discard(staging, &job.key);
                return Ok(NodeOutcome::Failed { message, log: Some(log) });
            }
        };
        let manifest = Manifest {
            format: 0,
            key: job.key.clone(),
            node: node.id.clone(),
            experiment: self.project.exp.name.clone(),
            action: job.action,
            output_digest: String::new(),
            files,
            started_unix,
            duration_s: t0.elapsed().as_secs_f64(),
            device: label,
            host: hostname(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            seed: node.seed,
            metrics,
            stat: String::new(),
        };
        self.append_job_output(&staging.log);
        let published = self.cache.publish(staging, manifest, &lock)?;
        // The scratch area (checkpoints) is only needed until the entry exists.
        let _ = std::fs::remove_dir_all(self.cache.scratch_dir(&job.key));
        Ok(NodeOutcome::Done { manifest: Box::new(published), executed: true })
    }

    /// Appends the job's own output (see `job_output`) to the node's log.
    fn append_job_output(&self, log: &Path) {
        if let Some(path) = self.job_output {
            append_job_output(log, path);
        }
    }

    /// A failure for lack of space says which filesystem is full and what to do (the error itself may name a
    /// file deep inside the cache, or, from a command's log, nothing at all).
    fn with_disk_full_hint(&self, message: String) -> String {
        let says_so = message.contains("No space left on device") || message.contains("Disk quota exceeded");
        // A command on a full disk often cannot even write its error into its log: look at the filesystem.
        if !says_so && free_bytes(self.cache.root()).is_none_or(|free| free >= 1 << 20) {
            return message;
        }
        format!(
            "{message}\n    the filesystem holding the cache ({}) is full: free space there (`mpcs gc EXP...` removes \
             entries no given experiment uses) or move the cache with --cache DIR / MPCS_CACHE",
            self.cache.root().display()
        )
    }

    /// Bazel's "file modified during build": a source the node read must still have the content its key was
    /// computed from, or the entry would be stored under a fingerprint that does not describe its input.
    fn sources_unchanged(&self, job: &Job) -> Result<(), String> {
        for (input, (_, digest)) in job.inputs.iter().zip(&job.action.inputs) {
            if input.kind != super::source::NAME {
                continue;
            }
            let now = crate::cache::fingerprint::fingerprint_source(&input.path, &self.cache.stat_dir())
                .map(|f| f.digest)
                .unwrap_or_default();
            if &now != digest {
                return Err(format!(
                    "source `{}` ({}) changed while this node ran, so its output may mix old and new content; \
                     nothing was stored: run again",
                    input.stage,
                    input.path.display()
                ));
            }
        }
        Ok(())
    }

    /// Checks every input entry against its stat record (and, where that differs, its manifest), refreshing
    /// `inputs`' stat records. Err: the position of a damaged input and what is wrong; its entry is removed.
    fn check_inputs(&self, inputs: &mut [InputDir]) -> Result<(), (usize, String)> {
        for (pos, input) in inputs.iter_mut().enumerate() {
            let Some(entry) = &mut input.entry else { continue };
            match self.cache.check_entry(&entry.key, &entry.stat) {
                EntryCheck::Intact(stat) => entry.stat = stat,
                EntryCheck::Damaged(reason) => {
                    // Removal fails only on a read-only cache: then the entry stays, and the node is not run on it.
                    let removed = self.cache.remove_entry(&entry.key);
                    let reason = match removed {
                        Ok(()) => reason,
                        Err(e) => format!("{reason}; {}", e.message),
                    };
                    return Err((pos, reason));
                }
            }
        }
        Ok(())
    }

    /// A node must not write into its inputs (a sibling would then read, and cache, the tampered data). Checked
    /// after it ran, since permissions do not stop root: a change fails the node and removes the damaged entry.
    fn inputs_untouched(&self, job: &Job, inputs: &mut [InputDir]) -> Result<(), String> {
        self.check_inputs(inputs).map_err(|(pos, reason)| {
            let node = &job.inputs[pos].node;
            format!(
                "its input `{node}` changed while it ran ({reason}); a node must not write into its inputs (write \
                 to {{out}}, copying what it needs): nothing was stored, and the damaged entry of `{node}` was \
                 removed, so the next run computes it again"
            )
        })
    }

    /// Waits for the key's lock, polling so that an interrupt is noticed while another run holds it, and saying
    /// once what it waits for (a silent wait looks like a hang).
    fn acquire(&self, job: &Job) -> Result<Option<FileLock>> {
        let mut said = false;
        loop {
            if let Some(l) = self.cache.try_lock(&job.key)? {
                return Ok(Some(l));
            }
            if self.cancelled() {
                return Ok(None);
            }
            if !said {
                said = true;
                let who = match self.cache.writer_of(&job.key) {
                    Some(pid) => format!("another mpcs run (process {pid} on this machine)"),
                    None => "another mpcs run".to_string(),
                };
                let id = &self.project.plan.nodes[job.index].id;
                let msg = format!(
                    "waiting for `{id}`: {who} is computing the same entry ({}); this run uses it when it is done",
                    &job.key[..12]
                );
                self.reporter.event(Event::Notice(&msg));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn execute(
        &self,
        job: &Job,
        inputs: &[InputDir],
        staging: &Staging,
        device: DeviceAssignment,
    ) -> Result<serde_json::Value, StageFailure> {
        let p = self.project;
        let node = &p.plan.nodes[job.index];
        let kind = p.kind(job.index).ok_or_else(|| {
            StageFailure(Error::internal(format!("node `{}` has no executable kind", node.id)).message)
        })?;
        let progress = |done: u64, total: Option<u64>, message: &str| {
            self.reporter.event(Event::Progress { node: &node.id, done, total, message });
        };
        let notice = |msg: &str| self.reporter.event(Event::Notice(msg));
        let ctx = ExecContext {
            exp: &p.exp,
            node,
            out: &staging.out,
            log: &staging.log,
            scratch: self.cache.scratch_dir(&job.key),
            inputs: inputs.to_vec(),
            device,
            cancel: self.cancel,
            processes: self.processes,
            progress: &progress,
            notice: &notice,
        };
        let fields = job.action.params.iter().chain(&job.action.locations);
        let config = serde_json::Value::Object(fields.map(|(k, v)| (k.clone(), v.clone())).collect());
        kind.execute(&config, &ctx)
    }
}

/// Appends the output file of the job that ran a node (`job_output`) to the node's log, under a heading naming it.
pub fn append_job_output(log: &Path, job_output: &Path) {
    let Ok(text) = std::fs::read(job_output) else { return };
    let Ok(mut file) = std::fs::OpenOptions::new().append(true).create(true).open(log) else { return };
    let heading = format!("\n--- output of the job running this node ({}) ---\n", job_output.display());
    let _ = file.write_all(heading.as_bytes()).and_then(|_| file.write_all(&text));
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into `st`, and `c` is a valid NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// The last lines of a log, indented, for failure messages.
pub fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(15);
    let mut out = String::from("\n    --- last lines of its log ---");
    for l in &lines[start..] {
        out.push_str("\n    ");
        out.push_str(l);
    }
    out
}
