//! Issue 13: entries are checked before a node reads them and after it ran (no result computed from damaged
//! bytes, no input silently changed by its consumer), and what a node starts dies with it.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

/// `a` copies the source; `b` and `c` read `a`. `b` appends to its input when `tamper = "yes"`.
const CHAIN: &str = r#"[experiment]
name = "integrity"

[stage.raw]
kind = "source"
path = "data"

[stage.a]
kind = "command"
from = "raw"
run = ["sh", "-c", "echo a >> exec.log; cat {in}/x.txt > {out}/a.txt"]

[stage.b]
kind = "command"
from = "a"
params = { n = 1, tamper = "no" }
run = ["sh", "-c", "if [ {tamper} = yes ]; then echo TAMPERED >> {in}/a.txt; fi; cat {in}/a.txt > {out}/b.txt; echo {n} >> {out}/b.txt"]

[stage.c]
kind = "command"
from = "a"
params = { n = 1 }
run = ["sh", "-c", "sleep 0.3; cat {in}/a.txt > {out}/c.txt; echo {n} >> {out}/c.txt"]
"#;

fn chain() -> Project {
    let p = Project::new();
    p.write("data/x.txt", "alpha\n");
    p.write("chain.toml", CHAIN);
    p
}

/// The output folder of node `id`'s entry, from `mpcs show`.
fn entry_out(p: &Project, id: &str) -> std::path::PathBuf {
    let out = p.mpcs(&["show", id, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = v["key"].as_str().unwrap_or_else(|| panic!("no key in {v}"));
    p.path(&format!("cache/v2/entries/{}/{key}/out", &key[..2]))
}

fn read(p: &std::path::Path) -> String {
    fs::read_to_string(p).unwrap()
}

/// Issue 13 S1: truncating a file of an entry, or deleting its whole `out/`, left the node `cached` and its
/// consumers computed from the damaged bytes. Now a consumer checks its inputs first and the damaged entry is
/// computed again.
#[test]
fn a_damaged_entry_is_computed_again_before_a_consumer_reads_it() {
    let p = chain();
    p.run_ok("chain.toml", &[]);
    let a_out = entry_out(&p, "a");
    assert_eq!(
        fs::metadata(a_out.join("a.txt")).unwrap().permissions().mode() & 0o222,
        0,
        "published files are read-only"
    );

    // Truncated (same inode; permissions restored so only the content differs).
    fs::set_permissions(a_out.join("a.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(a_out.join("a.txt"), "").unwrap();
    let out = p.run_raw("chain.toml", &["--set", "stage.b.params.n=2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the cache entry of `a` is damaged (out/a.txt is 0 bytes, 6 when it was stored)"),
        "{stderr}"
    );
    let s = parse_summary(&out);
    assert!(s.executed.contains("a") && s.executed.contains("b"), "{s:?}");
    assert_eq!(read(&entry_out(&p, "b").join("b.txt")), "alpha\n2\n", "b computed from the recomputed a");

    // The whole output folder gone.
    fs::remove_dir_all(entry_out(&p, "a")).unwrap();
    let s = p.run_ok("chain.toml", &["--set", "stage.c.params.n=3"]);
    assert!(s.executed.contains("a") && s.executed.contains("c"), "{s:?}");
    assert_eq!(read(&entry_out(&p, "c").join("c.txt")), "alpha\n3\n");

    // A file added to an entry is damage too.
    let a_out = entry_out(&p, "a");
    fs::write(a_out.join("extra.txt"), "x").unwrap();
    let out = p.run_raw("chain.toml", &["--set", "stage.c.params.n=4"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("out/extra.txt was added after it was stored"));
    assert!(parse_summary(&out).executed.contains("a"));

    // Touching a file (new mtime, same bytes) is not damage: the files are re-hashed once and found intact.
    let f = entry_out(&p, "a").join("a.txt");
    fs::File::options().write(true).open(&f).unwrap().set_modified(std::time::SystemTime::now()).unwrap();
    let s = p.run_ok("chain.toml", &["--set", "stage.c.params.n=5"]);
    assert!(s.cached.contains("a") && s.executed.contains("c"), "{s:?}");
}

/// Issue 13 S2: a consumer could append to `{in}/a.txt`; a sibling then cached the tampered data. Now the
/// consumer fails, the damaged entry is removed, and nothing computed from it is kept.
#[test]
fn a_node_that_writes_into_its_input_fails_and_the_input_is_recomputed() {
    let p = chain();
    p.run_ok("chain.toml", &[]);
    let out = p.run_raw("chain.toml", &["--set", "stage.b.params.tamper=\"yes\"", "--set", "stage.b.params.n=2", "-k"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let s = parse_summary(&out);
    assert_eq!(s.failed, set(&["b"]), "{stderr}");
    if unsafe { libc::geteuid() } == 0 {
        // Root writes through the read-only bit: the check after the node ran catches it.
        assert!(stderr.contains("its input `a` changed while it ran"), "{stderr}");
        assert!(stderr.contains("must not write into its inputs"), "{stderr}");
    } else {
        assert!(stderr.contains("Permission denied"), "{stderr}");
    }
    // The next run has an intact `a` whatever happened, and computes from the original bytes.
    let s = p.run_ok("chain.toml", &["--set", "stage.b.params.n=3", "--set", "stage.c.params.n=3"]);
    assert!(s.executed.contains("b") && s.executed.contains("c"), "{s:?}");
    assert_eq!(read(&entry_out(&p, "b").join("b.txt")), "alpha\n3\n");
    assert_eq!(read(&entry_out(&p, "c").join("c.txt")), "alpha\n3\n");
}

/// Whether process `pid` is gone (or a zombie nobody reaped, which runs nothing).
fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (bounded) until `path` holds a pid.
fn pid_in(path: &std::path::Path) -> i32 {
    for _ in 0..200 {
        if let Some(pid) = fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()) {
            return pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("{} never held a pid", path.display());
}

fn wait_gone(pid: i32) -> bool {
    (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(25));
        gone(pid)
    })
}

/// Issue 13 F4: after `kill -9` of mpcs during `sh -c "sleep 21; ..."`, `sh` died but `sleep` was re-parented
/// to init and kept running. Now every process of the node's group dies with mpcs.
#[test]
fn what_a_node_started_dies_with_mpcs_even_after_kill_9() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.slow]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"-c\", \"sleep 21 & echo $! > sleep.pid; wait; echo done > {out}/f\"]\n";
    p.write("k.toml", exp);
    let mut child = p.cmd(&["run", "k.toml", "--plain"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let sleep = pid_in(&p.path("sleep.pid"));
    assert!(!gone(sleep));
    child.kill().unwrap(); // SIGKILL: nothing in mpcs runs after it
    child.wait().unwrap();
    let dead = wait_gone(sleep);
    if !dead {
        // SAFETY: do not leave the test's own sleep behind.
        unsafe { libc::kill(sleep, libc::SIGKILL) };
    }
    assert!(dead, "the node's `sleep` outlived mpcs");
}

/// A node's processes end with the node: what a command leaves running in the background is killed when the
/// command exits (it would otherwise hold the node's log open and use the machine after the node is "done").
#[test]
fn a_background_process_does_not_outlive_its_node() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.quick]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"-c\", \"sleep 21 & echo $! > sleep.pid; echo done > {out}/f\"]\n";
    p.write("b.toml", exp);
    let s = p.run_ok("b.toml", &[]);
    assert!(s.executed.contains("quick"));
    let sleep = pid_in(&p.path("sleep.pid"));
    let dead = wait_gone(sleep);
    if !dead {
        // SAFETY: do not leave the test's own sleep behind.
        unsafe { libc::kill(sleep, libc::SIGKILL) };
    }
    assert!(dead, "the background `sleep` outlived its node");
}

/// Issue 13 B9: a run waiting for another run's lock printed nothing. Now it says which node it waits for and
/// on whom, then uses the other run's entry.
#[test]
fn a_run_waiting_for_another_says_for_what_and_on_whom() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.slow]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"-c\", \"echo $$ > started; sleep 1.5; echo done > {out}/f\"]\n";
    p.write("w.toml", exp);
    let first = p.cmd(&["run", "w.toml", "--plain"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    pid_in(&p.path("started"));
    let second = p.run_raw("w.toml", &[]);
    let mut first = first;
    assert!(first.wait().unwrap().success());
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let stderr = String::from_utf8_lossy(&second.stderr);
    let expected = format!("waiting for `slow`: another mpcs run (process {} on this machine)", first.id());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(parse_summary(&second).cached.contains("slow"), "the other run's entry is used");
}

/// Issue 13: two checkouts with the same experiment name shared one journal, so `--why` in one compared with
/// the other's last run. The journal is keyed by the experiment file too.
#[test]
fn two_checkouts_of_one_experiment_keep_their_own_history() {
    let p = Project::new();
    let exp = "[experiment]\nname = \"twin\"\n\n[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.b]\n\
               kind = \"command\"\nfrom = \"raw\"\nparams = { x = 1 }\nrun = [\"sh\", \"-c\", \"echo {x} > {out}/f\"]\n";
    for checkout in ["one", "two"] {
        p.write(&format!("{checkout}/data/x.txt"), "x");
        p.write(&format!("{checkout}/exp.toml"), exp);
    }
    p.run_ok("one/exp.toml", &["--cache", "cache"]);
    p.run_ok("two/exp.toml", &["--cache", "cache", "--set", "stage.b.params.x=2"]);
    let why = p.mpcs(&["graph", "one/exp.toml", "--cache", "cache", "--why", "b", "--set", "stage.b.params.x=5"]);
    let why = String::from_utf8_lossy(&why.stdout);
    assert!(why.contains("params.x: 1 → 5"), "compared with this checkout's last run (x = 1): {why}");
}

/// Issue 13 S8: editing the script named in `run` reran nothing. A file of the experiment's folder that `run`
/// names (directly or inside `sh -c "..."`) is now part of the key; what a command reads without naming it is
/// the documented limitation (declare it as a source).
#[test]
fn editing_the_script_named_in_run_reruns_its_node() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("prep.sh", "echo one > \"$1/f\"\n");
    p.write("tools/post.sh", "echo post one\n");
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.prep]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"prep.sh\", \"{out}\"]\n\n[stage.post]\nkind = \"command\"\nfrom = \"prep\"\n\
               run = [\"sh\", \"-c\", \"sh tools/post.sh > {out}/g; cat {in}/f >> {out}/g\"]\n";
    p.write("s.toml", exp);
    p.run_ok("s.toml", &[]);
    assert!(p.run_ok("s.toml", &[]).executed.is_empty());
    p.write("tools/post.sh", "echo post two\n");
    let s = p.run_ok("s.toml", &[]);
    assert_eq!(s.executed, set(&["post"]), "the script inside `sh -c` is keyed");
    p.write("prep.sh", "echo two > \"$1/f\"\n");
    let why = p.mpcs(&["graph", "s.toml", "--why", "prep"]);
    assert!(
        String::from_utf8_lossy(&why.stdout).contains("scripts.prep.sh"),
        "{}",
        String::from_utf8_lossy(&why.stdout)
    );
    let s = p.run_ok("s.toml", &[]);
    assert_eq!(s.executed, set(&["prep", "post"]));
}

/// Issue 13 D2: `gc` after an upstream edit deleted every blocked downstream entry, including ones early cut-off
/// would have reused. Now a blocked node's last entry is kept, and `gc -n` lists what it would remove.
#[test]
fn gc_after_an_upstream_edit_keeps_what_early_cut_off_reuses() {
    let p = Project::new();
    p.write("data/x.txt", "one line\n");
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.count]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"-c\", \"wc -l < {in}/x.txt > {out}/n\"]\n\n[stage.report]\nkind = \"command\"\n\
               from = \"count\"\nrun = [\"sh\", \"-c\", \"echo report >> exec.log; cat {in}/n > {out}/r\"]\n";
    p.write("g.toml", exp);
    p.run_ok("g.toml", &[]);
    // Same number of lines: `count` reruns with the same output, so `report` need not.
    p.write("data/x.txt", "another line\n");
    let dry = p.mpcs(&["gc", "g.toml", "-n"]);
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.contains("would remove 1 entries"), "{dry}");
    assert!(dry.lines().any(|l| l.starts_with("would remove ") && l.contains("  count (")), "{dry}");
    assert!(dry.contains("kept 1 entries of blocked nodes"), "{dry}");
    let out = p.mpcs(&["gc", "g.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = p.run_ok("g.toml", &[]);
    assert!(s.executed.contains("count"), "{s:?}");
    assert!(s.cached.contains("report"), "the kept entry is reused: {s:?}");
    assert_eq!(fs::read_to_string(p.path("exec.log")).unwrap(), "report\n");
}

/// A tmpfs of `size` mounted at `dir` for the test's lifetime (None where this machine does not allow it).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        fs::create_dir_all(dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Issue 13 B7: "No space left on device" named no path (and a command on a full disk often exits 1 with an
/// empty log). Now the failure names the full cache filesystem and what to do.
#[test]
fn a_full_disk_names_the_cache_and_what_to_do() {
    let p = Project::new();
    let Some(_disk) = SmallDisk::mount(&p.path("small"), "1m") else {
        eprintln!("skipped: this machine does not let the test mount a small tmpfs (needs root)");
        return;
    };
    p.write("data/x.txt", "x");
    let exp = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.big]\nkind = \"command\"\nfrom = \"raw\"\n\
               run = [\"sh\", \"-c\", \"head -c 4000000 /dev/zero > {out}/big\"]\n";
    p.write("full.toml", exp);
    let out = p.run_raw("full.toml", &["--cache", "small/cache"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cache = p.path("small/cache").canonicalize().unwrap();
    // The command could not even write its error into its log (on the same full disk): mpcs looks at the disk.
    assert!(stderr.contains(&format!("the filesystem holding the cache ({}) is full", cache.display())), "{stderr}");
}

/// `gc` removes the job files of finished Slurm runs, and keeps a run's folder while a key record names it (a job
/// of a submitter that died, still queued: a later run adopts it and needs its files).
#[test]
fn gc_removes_the_folders_of_finished_slurm_runs_only() {
    let p = chain();
    p.run_ok("chain.toml", &[]);
    for run in ["6560aa00001", "6560aa00002"] {
        p.write(&format!("cache/v2/slurm/{run}/k.job.json"), "{}");
    }
    p.write("cache/v2/slurm/keys/0123456789abcdef0123456789abcdef", "77_1 mpcs-6560aa00002 /x/array-1_1.out\n");
    let out = p.mpcs(&["gc", "chain.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed the job files of 1 finished Slurm runs"));
    assert!(!p.path("cache/v2/slurm/6560aa00001").exists());
    assert!(p.path("cache/v2/slurm/6560aa00002/k.job.json").exists(), "a live job's run is kept");
}
