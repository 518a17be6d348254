//! Crash safety (kill -9 at several moments) and two runs sharing one cache.

mod common;
use common::*;
use std::time::Duration;

fn small_dag(sleep: &str) -> String {
    format!(
        r#"[experiment]
name = "crash"

[stage.raw]
kind = "source"
path = "data"

[stage.folds]
kind = "command"
from = "raw"
matrix = {{ fold = [0, 1, 2, 3] }}
run = ["sh", "-c", "echo {{node}} >> exec.log; sleep {sleep}; echo {{fold}} > {{out}}/a.txt; sleep {sleep}; cat {{in}}/x.txt >> {{out}}/a.txt"]

[stage.train]
kind = "command"
from = "folds"
matrix = {{ fold = [0, 1, 2, 3], lr = [1, 2, 3, 4, 5] }}
run = ["sh", "-c", "echo {{node}} >> exec.log; sleep {sleep}; echo {{lr}} > {{out}}/m.txt; sleep {sleep}; cat {{in}}/a.txt >> {{out}}/m.txt"]

[stage.table]
kind = "command"
from = "train"
run = ["sh", "-c", "echo {{node}} >> exec.log; for d in {{in}}; do cat $d/m.txt; done > {{out}}/t.txt"]
"#
    )
}

#[test]
fn kill_9_at_random_moments_then_rerun_completes_without_repeating_work() {
    let p = Project::new();
    p.write("data/x.txt", "x\n");
    p.write("crash.toml", &small_dag("0.03"));
    // A fixed pseudo-random sequence of kill moments (ms), so a failure can be reproduced.
    let mut state: u64 = 0x2545F4914F6CDD1D;
    let mut kills = 0;
    for _ in 0..6 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = 60 + state % 400;
        let cached_before: std::collections::BTreeSet<String> =
            p.states("crash.toml").into_iter().filter(|(_, s)| s == "cached").map(|(id, _)| id).collect();
        let log_before = std::fs::read_to_string(p.path("exec.log")).unwrap_or_default().lines().count();
        let mut child = p.cmd(&["run", "crash.toml", "--jobs", "2", "--quiet"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            kills += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(80)); // let orphaned `sleep`s notice nothing and exit

        let started: Vec<String> = std::fs::read_to_string(p.path("exec.log"))
            .unwrap_or_default()
            .lines()
            .skip(log_before)
            .map(String::from)
            .collect();
        for id in &started {
            assert!(!cached_before.contains(id), "{id} was complete before the run yet executed again");
        }
        let verify = p.mpcs(&["verify"]);
        assert!(
            verify.status.success(),
            "verify after kill -9 at {delay} ms: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
    assert!(kills >= 3, "the runs were killed mid-way ({kills} times)");
    let cached_before: std::collections::BTreeSet<String> =
        p.states("crash.toml").into_iter().filter(|(_, s)| s == "cached").map(|(id, _)| id).collect();
    let last = p.run_ok("crash.toml", &[]);
    assert!(last.failed.is_empty());
    assert_eq!(last.executed.len() + last.cached.len(), 26);
    assert!(last.executed.is_disjoint(&cached_before), "no completed node executed again");
    // No debris: every staging directory of a killed run was cleaned when its key was taken again.
    let tmp: Vec<_> = std::fs::read_dir(p.path("cache/v2/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "stale staging dirs: {tmp:?}");
    assert!(p.mpcs(&["verify"]).status.success());
    assert!(p.run_ok("crash.toml", &[]).executed.is_empty());
}

#[test]
fn two_runs_on_one_cache_execute_each_node_once() {
    let p = Project::new();
    p.write("data/x.txt", "x\n");
    p.write("crash.toml", &small_dag("0.01"));
    let a = p
        .cmd(&["run", "crash.toml", "--jobs", "2", "--json", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = p
        .cmd(&["run", "crash.toml", "--jobs", "2", "--json", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let a = a.wait_with_output().unwrap();
    let b = b.wait_with_output().unwrap();
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let (sa, sb) = (parse_summary(&a), parse_summary(&b));
    let counts = exec_counts(&p);
    assert_eq!(counts.len(), 25, "every command node ran: {counts:?}");
    assert!(counts.values().all(|&c| c == 1), "each node executed exactly once in total: {counts:?}");
    let ran_a: std::collections::BTreeSet<_> = sa.executed.iter().filter(|n| *n != "raw").cloned().collect();
    let ran_b: std::collections::BTreeSet<_> = sb.executed.iter().filter(|n| *n != "raw").cloned().collect();
    assert!(ran_a.is_disjoint(&ran_b));
    assert_eq!(ran_a.len() + ran_b.len(), 25);
    assert_eq!(sa.executed.len() + sa.cached.len(), 26);
    assert_eq!(sb.executed.len() + sb.cached.len(), 26);
}

#[test]
fn interrupt_stops_cleanly_and_publishes_nothing_half_done() {
    let p = Project::new();
    p.write("data/x.txt", "x\n");
    p.write("crash.toml", &small_dag("0.5"));
    let child = p
        .cmd(&["run", "crash.toml", "--jobs", "2", "--json", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let s = parse_summary(&out);
    assert!(s.executed.iter().all(|n| n == "raw"), "nothing finished in 0.4 s: {:?}", s.executed);
    assert!(p.entries().is_empty(), "nothing half-done was published");
    assert!(std::fs::read_dir(p.path("cache/v2/tmp")).unwrap().next().is_none(), "staging cleaned");
    // The nodes that were running are reported as interrupted, not as victims of a failure (issue 13 B6).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(interrupted)") && !err.contains("upstream node failed"), "{err}");
}
