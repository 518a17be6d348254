//! Bad input: a clear message naming what is wrong (and where), a non-zero exit code, an untouched cache.

mod common;
use common::*;

/// Runs the experiment `text` and returns (exit code, stderr, project); asserts that nothing was published.
fn run_bad_in(text: &str) -> (i32, String, Project) {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("bad.toml", text);
    let out = p.run_raw("bad.toml", &[]);
    assert!(p.entries().is_empty(), "a failed run published nothing");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned(), p)
}

fn run_bad(text: &str) -> (i32, String) {
    let (code, err, _) = run_bad_in(text);
    (code, err)
}

fn assert_user_error(text: &str, needles: &[&str]) {
    let (code, err) = run_bad(text);
    assert_eq!(code, 2, "user input errors exit with 2: {err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("bad.toml", text);
    let _ = p.run_raw("bad.toml", &[]);
    assert!(!p.path("cache").exists(), "an invalid experiment does not even create the cache");
}

#[test]
fn malformed_toml() {
    assert_user_error("[stage.a\nkind = \"source\"\n", &["not valid TOML", "bad.toml:1:"]);
}

#[test]
fn unknown_stage_kind() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"comand\"\nfrom = \"raw\"\nrun = [\"true\"]\n");
    assert_user_error(&text, &["unknown stage kind `comand`", "did you mean `command`?", "bad.toml:9:8"]);
}

#[test]
fn unknown_key_with_suggestion() {
    let text =
        format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\nparms = {{ lr = 1 }}\n");
    assert_user_error(
        &text,
        &[
            "unknown key `parms` in stage `b` (kind `command`)",
            "did you mean `params`?",
            "bad.toml:12:1",
            "valid keys:",
        ],
    );
}

#[test]
fn wrong_types() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = \"echo hi\"\n");
    assert_user_error(&text, &["wrong type in stage `b`", "bad.toml:11:7"]);
    let text =
        format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\ngpus = \"two\"\nrun = [\"true\"]\n");
    assert_user_error(&text, &["`gpus` of stage `b` must be a non-negative integer", "bad.toml:11:8"]);
}

#[test]
fn dangling_reference() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"rwa\"\nrun = [\"true\"]\n");
    assert_user_error(
        &text,
        &["stage `b` refers to `rwa`, which is not a stage", "did you mean `raw`?", "bad.toml:10:8"],
    );
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ fold = [0, 1] }}\nrun = [\"true\"]\n\n[stage.c]\nkind = \"command\"\nfrom = \"b[flod=0]\"\nrun = [\"true\"]\n");
    assert_user_error(&text, &["selects by `flod`, which is not a matrix key of `b`", "did you mean `fold`?"]);
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ fold = [0, 1] }}\nrun = [\"true\"]\n\n[stage.c]\nkind = \"command\"\nfrom = \"b[fold=7]\"\nrun = [\"true\"]\n");
    assert_user_error(&text, &["matches no node of stage `b` (wanted fold=7)", "fold ∈ {0, 1}"]);
}

#[test]
fn cycle() {
    let text = format!("{GOOD_HEAD}\n[stage.a]\nkind = \"command\"\nfrom = [\"raw\", \"b\"]\nrun = [\"true\"]\n\n[stage.b]\nkind = \"command\"\nfrom = \"a\"\nrun = [\"true\"]\n");
    assert_user_error(&text, &["the stages form a cycle: a → b → a"]);
}

#[test]
fn unknown_placeholder() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nparams = {{ lr = 1 }}\nrun = [\"echo\", \"{{lrr}}\", \"{{out}}\"]\n");
    assert_user_error(&text, &["unknown placeholder `{lrr}`", "did you mean `{lr}`?"]);
}

#[test]
fn missing_source_path() {
    let text = "[stage.raw]\nkind = \"source\"\npath = \"no/such/dir\"\n\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\n";
    let (code, err) = run_bad(text);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no/such/dir does not exist")
            && err.contains("bad.toml:3:8")
            && err.contains("--set stage.raw.path=DIR"),
        "{err}"
    );
}

#[test]
fn bad_set_override() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("bad.toml", &format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\n"));
    let out = p.run_raw("bad.toml", &["--set", "stage.b.gpus=lots"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--> command line: --set stage.b.gpus=lots"), "{err}");
    let out = p.run_raw("bad.toml", &["--set", "nonsense"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected KEY.PATH=VALUE"));
}

#[test]
fn command_exits_non_zero() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo doing {{node}}; echo oops >&2; exit 3\"]\n\n[stage.c]\nkind = \"command\"\nfrom = \"b\"\nrun = [\"sh\", \"-c\", \"echo > {{out}}/x\"]\n");
    let (code, err, _project) = run_bad_in(&text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("FAILED b: command `sh -c echo doing b; echo oops >&2; exit 3` exited with status 3"),
        "{err}"
    );
    assert!(err.contains("    oops"), "the log tail is shown: {err}");
    let log = err.lines().find(|l| l.trim_start().starts_with("log: ")).unwrap().trim_start()[5..].to_string();
    assert!(std::fs::read_to_string(&log).unwrap().contains("doing b\n"), "the captured log is kept");
    assert!(err.contains("1 failed, 1 skipped"), "{err}");
}

#[test]
fn command_produces_no_output() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\n");
    let (code, err) = run_bad(&text);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("succeeded but wrote no file in {out}"), "{err}");
    // Issue 13: an output holding only empty folders used to be published.
    let text = format!(
        "{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"mkdir\", \"-p\", \"{{out}}/a/b\"]\n"
    );
    let (code, err) = run_bad(&text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("succeeded but wrote no file in {out}") && err.contains("empty folders do not count"),
        "{err}"
    );
}

#[test]
fn keep_going_finishes_independent_branches() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("kg.toml", &format!("{GOOD_HEAD}\n[stage.bad]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"false\"]\n\n[stage.after]\nkind = \"command\"\nfrom = \"bad\"\nrun = [\"sh\", \"-c\", \"echo > {{out}}/x\"]\n\n[stage.good]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ i = [1, 2, 3] }}\nrun = [\"sh\", \"-c\", \"sleep 0.1; echo {{i}} > {{out}}/x\"]\n"));
    let out = p.run_raw("kg.toml", &["--keep-going"]);
    assert_eq!(out.status.code(), Some(1));
    let s = parse_summary(&out);
    assert_eq!(s.failed, set(&["bad"]));
    assert_eq!(s.skipped, set(&["after"]));
    assert_eq!(s.executed, set(&["raw", "good[i=1]", "good[i=2]", "good[i=3]"]));
    // A failure is never cached: the next run tries again, and graph says it failed last time.
    assert_eq!(p.states("kg.toml")["bad"], "failed");
}

/// Issue 13 F1: a `run` that renders to no words (an empty list parameter) used to panic a worker thread and
/// leave the run waiting forever; it fails the node with a message saying why.
#[test]
fn a_run_that_renders_to_nothing_fails_the_node_instead_of_hanging() {
    let text = format!(
        "{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nparams = {{ empty = [] }}\nrun = [\"{{empty}}\"]\n"
    );
    let (code, err) = run_bad(&text);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("renders to no program for this node"), "{err}");
}

/// Issue 13 F3: output piped into a reader that stops early (`| head -1`) used to panic with exit 101.
#[test]
fn a_closed_stdout_ends_quietly() {
    use std::io::Read;
    let p = Project::new();
    p.write("data/x.txt", "x");
    // Far more output than a pipe holds (64 KiB), so mpcs is still writing when the reader goes away.
    let values: Vec<String> = (0..3000).map(|i| i.to_string()).collect();
    let matrix = values.join(", ");
    let stage =
        format!("\n[stage.s]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ i = [{matrix}] }}\nrun = [\"true\"]\n");
    p.write("big.toml", &format!("{GOOD_HEAD}{stage}"));
    for args in [&["graph", "big.toml"][..], &["run", "big.toml", "-n"][..]] {
        let mut child =
            p.cmd(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut first = [0u8; 16];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{args:?}: {err}");
    }
}

/// Issue 13 B1 and S7: a dangling link in `{out}` used to abort the whole run (exit 3, no `--json` line), and a
/// link to a file outside the entry was published (its target could change later). Each fails its node only.
#[test]
fn links_in_an_output_that_lead_nowhere_or_outside_fail_that_node_only() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let stage = |name: &str, script: &str| {
        format!("\n[stage.{name}]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo y > {{out}}/f; {script}\"]\n")
    };
    let text = format!(
        "{GOOD_HEAD}{}{}{}",
        stage("dangling", "ln -s /nonexistent/file {out}/link"),
        stage("outside", "ln -s {in}/x.txt {out}/link"),
        stage("inside", "ln -s f {out}/link")
    );
    p.write("links.toml", &text);
    let out = p.run_raw("links.toml", &["--keep-going"]);
    assert_eq!(out.status.code(), Some(1));
    let s = parse_summary(&out);
    assert_eq!(s.failed, set(&["dangling", "outside"]));
    assert_eq!(s.executed, set(&["raw", "inside"]), "a link inside the output is fine");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a symbolic link to /nonexistent/file that leads nowhere"), "{err}");
    assert!(err.contains("outside the node's output"), "{err}");
}

/// Issue 13 F2: a matrix of 10 keys × 10 values used to be expanded until memory ran out; it is counted first.
#[test]
fn a_runaway_matrix_is_refused_before_it_is_built() {
    let axes: Vec<String> = (0..10).map(|k| format!("k{k} = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]")).collect();
    let text = format!(
        "{GOOD_HEAD}\n[stage.s]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ {} }}\nrun = [\"true\"]\n",
        axes.join(", ")
    );
    let t = std::time::Instant::now();
    assert_user_error(&text, &["expands to 10000000001 nodes", "stage `s` alone has 10000000000", "k0 (10) × k1 (10)"]);
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "refused at once, not after expanding");
}

/// Issue 13 B8: a device or a pipe as a source used to fail with "Not a directory".
#[test]
fn a_source_that_is_neither_file_nor_folder_says_what_is_accepted() {
    for path in ["/dev/zero", "fifo"] {
        let text = format!("[stage.raw]\nkind = \"source\"\npath = \"{path}\"\n");
        let p = Project::new();
        p.write("bad.toml", &text);
        assert!(std::process::Command::new("mkfifo").arg(p.path("fifo")).status().unwrap().success());
        let out = p.run_raw("bad.toml", &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("is neither a file nor a folder") && err.contains("a source is a regular file or a folder"),
            "{err}"
        );
    }
}
