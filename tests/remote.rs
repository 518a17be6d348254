//! The remote cache against a real S3 server: `rclone serve s3` (SigV4 checked) on 127.0.0.1, started by
//! `scripts/s3/server.sh` in a temp folder and stopped when each test ends, even when it fails. Everything goes
//! through the `mpcs` binary. Skipped, saying so, where rclone is not installed (`scripts/s3/server.sh install`).

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3/server.sh")
}

/// One S3 server in its own temp folder; its objects are files under `data/<bucket>/`.
struct S3 {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl S3 {
    fn start() -> Option<S3> {
        let dir = tempfile::tempdir().unwrap();
        let mut s3 = S3 { dir, env: BTreeMap::new() };
        s3.env = s3.launch(&[])?;
        Some(s3)
    }

    /// Starts the server (with `vars` for the script); its client environment, or None where rclone is missing.
    fn launch(&self, vars: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(self.dir.path())
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "the S3 server did not start: {why}");
            eprintln!("skipped: no S3 server: {}", why.trim());
            return None;
        }
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(env)
    }

    /// Starts it again on the same port with the same keys (after it was killed).
    fn restart(&self) {
        let port = self.env["AWS_ENDPOINT_URL"].rsplit(':').next().unwrap().to_string();
        let vars = [
            ("MPCS_S3_PORT", port.as_str()),
            ("MPCS_S3_KEY", self.env["AWS_ACCESS_KEY_ID"].as_str()),
            ("MPCS_S3_SECRET", self.env["AWS_SECRET_ACCESS_KEY"].as_str()),
        ];
        self.launch(&vars).expect("restart");
    }

    /// The files (objects) under `rel` of bucket `mpcs`.
    fn objects(&self, rel: &str) -> Vec<PathBuf> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path(), out)
                } else {
                    out.push(e.path())
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir.path().join("data/mpcs").join(rel), &mut out);
        out.sort();
        out
    }

    fn object(&self, rel: &str) -> PathBuf {
        self.dir.path().join("data/mpcs").join(rel)
    }

    /// `mpcs ARGS` in `p` against this server.
    fn mpcs(&self, p: &Project, args: &[&str]) -> Output {
        self.cmd(p, args).output().unwrap()
    }

    fn cmd(&self, p: &Project, args: &[&str]) -> Command {
        let mut c = p.cmd(args);
        c.envs(&self.env).env_remove("MPCS_REMOTE").env_remove("AWS_PROFILE");
        c
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path()).status();
    }
}

/// The summary of `mpcs run --json` (its last stdout line), asserting the run succeeded.
fn summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn names(v: &serde_json::Value) -> Vec<String> {
    let mut n: Vec<String> = v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    n.sort();
    n
}

fn run(s3: &S3, p: &Project, exp: &str, cache: &str, remote: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", exp, "--cache", cache, "--remote", remote, "--json", "--plain", "--jobs", "2"];
    args.extend_from_slice(extra);
    s3.mpcs(p, &args)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn paper_project() -> Project {
    let p = Project::new();
    p.write("data/raw/a.txt", "alpha\n");
    p.write("paper.toml", &paper_dag("a", "", ""));
    p
}

#[test]
fn a_fresh_cache_pulls_the_whole_dag_runs_nothing_and_a_tampered_blob_reruns_its_node() {
    let Some(s3) = S3::start() else { return };
    let p = paper_project();
    let remote = "s3://mpcs/lab/paper";

    // Cache A computes the 200 nodes and pushes the 199 that are not sources.
    let a = summary(&run(&s3, &p, "paper.toml", "cache-a", remote, &[]));
    assert_eq!(a["executed"].as_array().unwrap().len(), 200);
    assert_eq!(a["remote"]["pushed"], 199, "{}", a["remote"]);
    assert_eq!(a["remote"]["not_pushed"], 0);
    assert_eq!(s3.objects("lab/paper/ac").len(), 199, "one record per entry");
    let blobs = s3.objects("lab/paper/cas").len();
    assert!(blobs < 2 * 199, "identical files are stored once: {blobs} blobs for 199 entries");
    assert!(s3.objects("lab/paper/locks").is_empty(), "the push lock is gone after the run");

    // A fresh cache B sees them as remote, would pull them, and pulls them: nothing but the source is executed.
    let graph = s3.mpcs(&p, &["graph", "paper.toml", "--cache", "cache-b", "--remote", remote, "--format", "json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&graph.stdout).unwrap();
    let remote_nodes = nodes["nodes"].as_array().unwrap().iter().filter(|n| n["state"] == "remote").count();
    assert_eq!(remote_nodes, 199, "{}", stderr(&graph));
    let dry = s3.mpcs(&p, &["run", "paper.toml", "-n", "--cache", "cache-b", "--remote", remote]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("1 would run, 199 would be pulled"), "{dry:?}");
    let b = summary(&run(&s3, &p, "paper.toml", "cache-b", remote, &[]));
    assert_eq!(names(&b["executed"]), ["raw"], "only the source is fingerprinted");
    assert_eq!(b["pulled"].as_array().unwrap().len(), 199);
    let requests = &b["remote"]["requests"];
    assert_eq!(requests["list"], 1, "{requests}");
    assert_eq!(requests["put"], 0, "a pull writes nothing: {requests}");
    assert!(requests["get"].as_u64().unwrap() <= 3 * 199, "a record and its blobs per entry: {requests}");
    for node in ["table", "linear_table"] {
        let file = |cache: &str| {
            let out = p.mpcs(&["--cache", cache, "show", node, "--exp", "paper.toml", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let dir = PathBuf::from(v["path"].as_str().unwrap());
            fs::read_dir(&dir).unwrap().map(|e| fs::read(e.unwrap().path()).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(file("cache-a"), file("cache-b"), "{node}: byte-identical outputs");
    }
    assert!(p.mpcs(&["--cache", "cache-b", "verify"]).status.success(), "pulled entries verify");

    // Without running anything: `show` reads a remote-only node's record, `pull --only` fetches one stage.
    let show = s3.mpcs(&p, &["--cache", "cache-e", "show", "table", "--exp", "paper.toml", "--remote", remote]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success() && text.contains("on s3://mpcs/lab/paper, not in this cache"), "{show:?}");
    let pull = s3.mpcs(&p, &["--cache", "cache-e", "pull", "paper.toml", "--only", "table", "--remote", remote]);
    assert!(String::from_utf8_lossy(&pull.stdout).starts_with("pulled 1 entries"), "{pull:?}");
    let states = s3.mpcs(&p, &["graph", "paper.toml", "--cache", "cache-e", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&states.stdout).unwrap();
    let table = v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "table").unwrap().clone();
    assert_eq!(table["state"], "blocked", "without the remote, its inputs are unknown here: {table}");
    let bad = s3.mpcs(&p, &["--cache", "cache-e", "pull", "paper.toml", "--only", "tabel", "--remote", remote]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("Did you mean `table`?"), "{}", stderr(&bad));

    // A no-op run with the remote costs one listing and nothing else.
    let again = summary(&run(&s3, &p, "paper.toml", "cache-b", remote, &[]));
    assert_eq!(again["cached"].as_array().unwrap().len(), 200);
    let r = &again["remote"]["requests"];
    assert_eq!(
        (r["list"].as_u64(), r["get"].as_u64(), r["head"].as_u64(), r["put"].as_u64()),
        (Some(1), Some(0), Some(0), Some(0)),
        "{r}"
    );

    // Tamper with the blob of `table`'s output (same size, other bytes): a fresh cache reruns `table` alone,
    // saying why, pulls the rest, and its push repairs the blob for the next reader.
    let show = p.mpcs(&["--cache", "cache-a", "show", "table", "--exp", "paper.toml", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let digest = m["manifest"]["files"][0]["blake3"].as_str().or(m["files"][0]["blake3"].as_str()).unwrap().to_string();
    let blob = s3.object(&format!("lab/paper/cas/{}/{digest}", &digest[..2]));
    let good = fs::read(&blob).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 0x20;
    fs::write(&blob, &bad).unwrap();
    let c = run(&s3, &p, "paper.toml", "cache-c", remote, &[]);
    let sc = summary(&c);
    assert_eq!(names(&sc["executed"]), ["raw", "table"], "{}", stderr(&c));
    assert_eq!(sc["pulled"].as_array().unwrap().len(), 198);
    assert!(stderr(&c).contains("remote entry of `table` cannot be used"), "{}", stderr(&c));
    assert!(stderr(&c).contains("do not match its digest"), "{}", stderr(&c));
    assert_eq!(fs::read(&blob).unwrap(), good, "the rerun's push rewrote the damaged blob");
    let d = summary(&run(&s3, &p, "paper.toml", "cache-d", remote, &[]));
    assert_eq!(names(&d["executed"]), ["raw"]);
}

#[test]
fn the_reduced_quickstart_comes_back_from_the_remote_byte_identical() {
    let Some(s3) = S3::start() else { return };
    let p = Project::new();
    let exp = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.toml");
    let exp = exp.to_str().unwrap();
    let reduced = one_fold_quickstart_sets();
    let sets: Vec<&str> = reduced.iter().map(String::as_str).collect();
    let remote = "s3://mpcs/quickstart";
    let a = summary(&run(&s3, &p, exp, "cache-a", remote, &sets));
    let computed = a["executed"].as_array().unwrap().len();
    assert_eq!(a["remote"]["pushed"].as_u64().unwrap() as usize, computed, "{}", a["remote"]);

    // The laptop: read-only, pulls every entry, trains nothing, and gets the same table, byte for byte.
    let b = summary(&run(&s3, &p, exp, "cache-b", remote, &[&["--remote-mode", "read"][..], &sets].concat()));
    assert!(b["executed"].as_array().unwrap().is_empty(), "{}", b["executed"]);
    assert_eq!(b["pulled"].as_array().unwrap().len(), computed);
    assert_eq!(b["remote"]["requests"]["put"], 0, "read mode writes nothing: {}", b["remote"]);
    let table = |cache: &str| {
        let out = p.mpcs(&[&["--cache", cache, "show", "table", "--exp", exp, "--json"][..], &sets].concat());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let dir = PathBuf::from(v["path"].as_str().unwrap());
        ["table.md", "table.csv", "table.json"].map(|f| fs::read(dir.join(f)).unwrap())
    };
    assert_eq!(table("cache-a"), table("cache-b"));
}

#[test]
fn two_caches_pushing_the_same_keys_at_once_leave_one_valid_record_per_key() {
    let Some(s3) = S3::start() else { return };
    let p = paper_project();
    let remote = "s3://mpcs/race";
    let spawn = |cache: &str| {
        let mut args =
            vec!["run", "paper.toml", "--cache", cache, "--remote", remote, "--json", "--plain", "--jobs", "2"];
        args.push("--quiet");
        s3.cmd(&p, &args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let (one, two) = (spawn("cache-1"), spawn("cache-2"));
    let (one, two) = (one.wait_with_output().unwrap(), two.wait_with_output().unwrap());
    let (one, two) = (summary(&one), summary(&two));
    let pushes = |s: &serde_json::Value| {
        s["remote"]["pushed"].as_u64().unwrap() + s["remote"]["already_there"].as_u64().unwrap()
    };
    assert_eq!(pushes(&one), 199, "{}", one["remote"]);
    assert_eq!(pushes(&two), 199, "{}", two["remote"]);
    assert_eq!(s3.objects("race/ac").len(), 199, "one record per key");
    // Every record is whole and its blobs are there: a third cache pulls all of them, with no complaint.
    let out = run(&s3, &p, "paper.toml", "cache-3", remote, &[]);
    let three = summary(&out);
    assert_eq!(three["pulled"].as_array().unwrap().len(), 199);
    assert!(!stderr(&out).contains("cannot be used"), "{}", stderr(&out));
}

/// A TCP proxy to `target` that kills the server (`kill`) once `limit` bytes have gone towards it: a crash in
/// the middle of an upload, at a known point.
fn crashing_proxy(target: String, limit: u64, kill: impl Fn() + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let kill = Arc::new(kill);
    std::thread::spawn(move || {
        for client in listener.incoming().take(64).flatten() {
            let Ok(server) = TcpStream::connect(&target) else { continue };
            let (sent, killed, kill) = (sent.clone(), killed.clone(), kill.clone());
            let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit
                        && !killed.swap(true, Ordering::SeqCst)
                    {
                        kill();
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_server_killed_mid_upload_leaves_no_record_and_a_later_push_completes_it() {
    let Some(s3) = S3::start() else { return };
    let p = Project::new();
    // 64 MB of incompressible bytes, and a second small file.
    p.write(
        "big.toml",
        "[experiment]\nname = \"big\"\n\n[stage.big]\nkind = \"command\"\n\
         run = [\"sh\", \"-c\", \"head -c 64000000 /dev/urandom > {out}/big.bin; echo small > {out}/small.txt\"]\n",
    );
    let endpoint = s3.env["AWS_ENDPOINT_URL"].trim_start_matches("http://").to_string();
    let pid: i32 = fs::read_to_string(s3.dir.path().join("rclone.pid")).unwrap().trim().parse().unwrap();
    let proxy = crashing_proxy(endpoint, 20_000_000, move || unsafe {
        libc::kill(pid, libc::SIGKILL);
    });
    let out = s3
        .cmd(&p, &["run", "big.toml", "--remote", "s3://mpcs/crash", "--json", "--plain"])
        .env("AWS_ENDPOINT_URL", &proxy)
        .output()
        .unwrap();
    let s = summary(&out);
    assert_eq!(names(&s["executed"]), ["big"], "the node's own result stands");
    assert_eq!(s["remote"]["pushed"], 0, "{}", s["remote"]);
    assert_eq!(s["remote"]["not_pushed"], 1);
    assert!(stderr(&out).contains("not pushed to s3://mpcs/crash: big:"), "{}", stderr(&out));

    s3.restart();
    assert!(s3.objects("crash/ac").is_empty(), "no record without all its blobs");
    let push = s3.mpcs(&p, &["push", "big.toml", "--remote", "s3://mpcs/crash"]);
    assert!(push.status.success(), "{}", stderr(&push));
    assert!(String::from_utf8_lossy(&push.stdout).starts_with("pushed 1 entries"), "{push:?}");
    let fresh = summary(&run(&s3, &p, "big.toml", "cache-fresh", "s3://mpcs/crash", &[]));
    assert_eq!(names(&fresh["pulled"]), ["big"]);
    assert!(p.mpcs(&["--cache", "cache-fresh", "verify"]).status.success());
}

#[test]
fn refused_credentials_and_a_dead_endpoint_are_one_clear_error_or_with_fallback_one_warning() {
    let Some(s3) = S3::start() else { return };
    let p = paper_project();
    let t0 = Instant::now();
    let wrong = s3
        .cmd(&p, &["run", "paper.toml", "--remote", "s3://mpcs/x", "--plain"])
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(3), "{}", stderr(&wrong));
    assert!(stderr(&wrong).contains("refused the credentials"), "{}", stderr(&wrong));
    assert!(!stderr(&wrong).contains("not-the-secret"), "the secret is never printed");
    assert!(!p.path("cache/v2/entries").exists() || p.entries().is_empty(), "nothing ran");

    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = |extra: &[&str]| {
        let mut args = vec!["run", "paper.toml", "--remote", "s3://mpcs/x", "--plain", "--jobs", "2"];
        args.extend_from_slice(extra);
        s3.cmd(&p, &args).env("AWS_ENDPOINT_URL", format!("http://{dead}")).output().unwrap()
    };
    let out = down(&[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the remote s3://mpcs/x"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--remote-fallback"), "it says what else to do");
    let out = down(&["--remote-fallback"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("warning:").count(), 2, "one warning (two lines): {}", stderr(&out));
    let no_bucket = s3.mpcs(&p, &["run", "paper.toml", "--remote", "s3://no-such-bucket/x", "--plain"]);
    assert_eq!(no_bucket.status.code(), Some(3));
    assert!(stderr(&no_bucket).contains("does not exist"), "{}", stderr(&no_bucket));
    let bad_url = s3.mpcs(&p, &["run", "paper.toml", "--remote", "http://mpcs/x"]);
    assert_eq!(bad_url.status.code(), Some(2), "{}", stderr(&bad_url));
    assert!(t0.elapsed() < Duration::from_secs(120), "bounded retries");
}

#[test]
fn gc_remote_keeps_what_the_given_experiments_reach_and_waits_for_pushes() {
    let Some(s3) = S3::start() else { return };
    let p = Project::new();
    let exp = |name: &str, word: &str| {
        format!(
            "[experiment]\nname = \"{name}\"\n\n[cache]\nremote = \"s3://mpcs/gc\"\n\n[stage.make]\nkind = \"command\"\n\
             run = [\"sh\", \"-c\", \"echo {word} > {{out}}/own.txt; echo shared > {{out}}/shared.txt\"]\n\n\
             [stage.use]\nkind = \"command\"\nfrom = \"make\"\nrun = [\"sh\", \"-c\", \"cat {{in}}/own.txt > {{out}}/copy.txt\"]\n"
        )
    };
    p.write("x.toml", &exp("x", "ex"));
    p.write("y.toml", &exp("y", "why"));
    let remote = "s3://mpcs/gc";
    summary(&run(&s3, &p, "x.toml", "cache", remote, &[]));
    summary(&run(&s3, &p, "y.toml", "cache", remote, &[]));
    assert_eq!(s3.objects("gc/ac").len(), 4);
    let blobs_before = s3.objects("gc/cas").len();

    // While a run pushes (its lock is fresh: z's first node is pushed while its second one sleeps), gc removes
    // nothing; once that run has ended, it goes ahead.
    p.write(
        "z.toml",
        "[experiment]\nname = \"z\"\n\n[stage.first]\nkind = \"command\"\nrun = [\"sh\", \"-c\", \"echo z > {out}/z.txt\"]\n\n\
         [stage.slow]\nkind = \"command\"\nfrom = \"first\"\nrun = [\"sh\", \"-c\", \"sleep 4; cp {in}/z.txt {out}/\"]\n",
    );
    let mut pushing = s3.cmd(&p, &["run", "z.toml", "--cache", "cache-z", "--remote", remote, "--quiet"]);
    let pushing = pushing.stdout(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while s3.objects("gc/locks").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the run took no push lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    // `--remote` without an address: the experiment's `[cache] remote`.
    let busy = s3.mpcs(&p, &["gc", "x.toml", "--remote"]);
    assert_eq!(busy.status.code(), Some(3), "{}", stderr(&busy));
    assert!(stderr(&busy).contains("a push at work"), "{}", stderr(&busy));
    assert!(s3.objects("gc/ac").len() >= 4, "nothing removed");
    assert!(pushing.wait_with_output().unwrap().status.success());
    assert!(s3.objects("gc/locks").is_empty(), "the run's lock is gone with it");
    assert_eq!(s3.objects("gc/ac").len(), 6);

    let dry = s3.mpcs(&p, &["gc", "x.toml", "--remote", "-n"]);
    assert!(String::from_utf8_lossy(&dry.stdout).starts_with("would remove 4 records"), "{dry:?}");
    assert_eq!(s3.objects("gc/ac").len(), 6, "a dry run removes nothing");
    let gc = s3.mpcs(&p, &["gc", "x.toml", "--remote", remote]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert_eq!(s3.objects("gc/ac").len(), 2, "{}", String::from_utf8_lossy(&gc.stdout));
    let blobs_after = s3.objects("gc/cas").len();
    assert!(blobs_after < blobs_before, "y's own blobs went: {blobs_before} → {blobs_after}");
    // x comes back whole from the remote (its blobs, the shared one included, are all there); y would run.
    let x = summary(&run(&s3, &p, "x.toml", "cache-fresh", remote, &[]));
    assert_eq!(names(&x["pulled"]), ["make", "use"]);
    let y = s3.mpcs(&p, &["run", "y.toml", "--cache", "cache-fresh", "--remote-mode", "read", "--json", "--plain"]);
    let y = summary(&y);
    assert_eq!(y["remote"]["url"], remote, "the experiment's [cache] remote");
    // A profile's [cache] remote wins over the experiment's, and the flag over both.
    p.write("prof.toml", "[cache]\nremote = \"s3://mpcs/other\"\n");
    let with_profile = |extra: &[&str]| {
        let mut args = vec!["run", "x.toml", "--profile", "prof.toml", "--json", "--plain"];
        args.extend_from_slice(extra);
        summary(&s3.mpcs(&p, &args))["remote"]["url"].clone()
    };
    assert_eq!(with_profile(&[]), "s3://mpcs/other");
    assert_eq!(with_profile(&["--remote", "s3://mpcs/gc"]), "s3://mpcs/gc");
    assert_eq!(names(&y["executed"]), ["make", "use"]);
}
