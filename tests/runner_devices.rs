//! GPU slots: never more nodes on the slots than there are slots, each slot used by one node at a time, and
//! every slot busy while work remains.

mod common;
use common::*;

fn gpu_dag(n: usize) -> String {
    let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!(
        r#"[stage.raw]
kind = "source"
path = "data"

[stage.train]
kind = "command"
from = "raw"
gpus = 1
matrix = {{ i = [{}] }}
run = ["sh", "-c", "echo start {{node}} $CUDA_VISIBLE_DEVICES {{device}} $(date +%s%N) >> dev.log; sleep 0.25; echo end {{node}} $CUDA_VISIBLE_DEVICES {{device}} $(date +%s%N) >> dev.log; echo ok > {{out}}/m"]

[stage.cpu_side]
kind = "command"
from = "raw"
matrix = {{ j = [0, 1, 2] }}
run = ["sh", "-c", "echo cpu {{node}} [$CUDA_VISIBLE_DEVICES] >> cpu.log; echo ok > {{out}}/m"]
"#,
        items.join(", ")
    )
}

#[test]
fn n_slots_bound_and_fill_gpu_nodes() {
    let p = Project::new();
    p.write("data/x", "x");
    p.write("gpu.toml", &gpu_dag(12));
    let s = p.run_ok("gpu.toml", &["--devices", "cuda:0,cuda:1,cuda:2", "--jobs", "8"]);
    assert_eq!(s.executed.len(), 16);

    // (time, +1/-1, device)
    let mut events = Vec::new();
    let mut intervals: std::collections::BTreeMap<String, (u128, u128, String)> = Default::default();
    for line in std::fs::read_to_string(p.path("dev.log")).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (what, node, visible, device, t) = (f[0], f[1], f[2], f[3], f[4].parse::<u128>().unwrap());
        assert_eq!(device, format!("cuda:{visible}"), "{{device}} names the assigned GPU");
        let e = intervals.entry(node.to_string()).or_insert((0, 0, visible.to_string()));
        if what == "start" {
            e.0 = t;
            events.push((t, 1i32, visible.to_string()));
        } else {
            e.1 = t;
            events.push((t, -1, visible.to_string()));
        }
    }
    events.sort();
    let (mut cur, mut max) = (0, 0);
    for (_, d, _) in &events {
        cur += d;
        max = max.max(cur);
    }
    assert!(max <= 3, "never more than 3 GPU nodes at once (saw {max})");
    assert_eq!(max, 3, "all 3 slots are used while work remains");
    let used: std::collections::BTreeSet<&str> = intervals.values().map(|v| v.2.as_str()).collect();
    assert_eq!(used, ["0", "1", "2"].into_iter().collect());
    // One node per device at a time.
    let all: Vec<&(u128, u128, String)> = intervals.values().collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if a.2 == b.2 {
                assert!(a.1 <= b.0 || b.1 <= a.0, "two nodes overlapped on GPU {}", a.2);
            }
        }
    }
    // 12 nodes of 0.25 s on 3 slots: 4 waves, so the slots were kept busy (≤ 6 waves' worth of time).
    let span = intervals.values().map(|v| v.1).max().unwrap() - intervals.values().map(|v| v.0).min().unwrap();
    assert!(span < 6 * 250_000_000, "slots kept busy: {span} ns");
    // CPU nodes are hidden from the GPUs the scheduler hands out.
    let cpu = std::fs::read_to_string(p.path("cpu.log")).unwrap();
    assert!(cpu.lines().all(|l| l.ends_with("[]")), "{cpu}");
}

#[test]
fn without_gpus_gpu_nodes_run_on_cpu_with_one_notice() {
    let p = Project::new();
    p.write("data/x", "x");
    p.write("gpu.toml", &gpu_dag(3));
    let out = p.run_raw("gpu.toml", &["--devices", "cpu"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("will run on the CPU").count(), 1, "{err}");
    let log = std::fs::read_to_string(p.path("dev.log")).unwrap();
    assert!(log.lines().all(|l| l.split_whitespace().nth(2) == Some("cpu")), "{log}");
}

#[test]
fn cuda_visible_devices_is_discovered() {
    let p = Project::new();
    p.write("data/x", "x");
    p.write("gpu.toml", &gpu_dag(4));
    let out = p
        .cmd(&["run", "gpu.toml", "--json", "--plain", "--jobs", "4"])
        .env("CUDA_VISIBLE_DEVICES", "5,7")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(p.path("dev.log")).unwrap();
    let used: std::collections::BTreeSet<&str> = log.lines().map(|l| l.split_whitespace().nth(2).unwrap()).collect();
    assert_eq!(used, ["5", "7"].into_iter().collect());
}

/// `mpcs doctor` without a GPU: candle's own ops (what a GPU runs) agree with the fused CPU kernels on one
/// training step, judged against a float64 truth; a device that cannot be named is the command line's error.
/// Run as a process of its own: the doctor switches the fused kernels off and on for the whole process.
#[test]
fn the_doctor_checks_the_gpu_code_path_on_the_cpu() {
    let p = Project::new();
    let out = p.mpcs(&["doctor", "--arch", "resnet18", "--size", "32", "--batch", "4"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("devices: mpcs built"), "{text}");
    for what in ["loss", "gradients", "BatchNorm stats", "updated weights"] {
        let line = text.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("{what}: {text}"));
        assert!(line.ends_with("ok"), "{line}");
    }
    assert!(text.trim_end().ends_with("doctor: every check passed"), "{text}");
    let bad = p.mpcs(&["doctor", "--device", "gpu0"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use `cpu` or `cuda:N`"));
}
