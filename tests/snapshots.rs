//! Whole-output snapshots of what a person reads: error diagnostics, `mpcs graph` text, `graph --why`, the dry run
//! and the run summary (issue 12). The other tests check these with `contains`, which a broken layout still passes;
//! here the complete output is compared with the reviewed `.snap` files in tests/snapshots/.
//!
//! What varies between runs is normalised first (see [`normalise`]): the temporary project directory, cache keys
//! and digests, timings, the host name and the pid in staging directory names.
//!
//! Updating after an intended change: `INSTA_UPDATE=always cargo test --test snapshots`, then read every changed
//! `.snap` file (`git diff tests/snapshots/`) before committing it. In CI (`CI=true`) insta writes nothing and a
//! mismatch fails.

mod common;
use common::*;

use regex::Regex;

/// Runs `mpcs ARGS` in `p` and returns (exit code, transcript): the command line followed by its stdout and stderr
/// (each only when not empty), normalised.
fn transcript(p: &Project, args: &[&str]) -> (i32, String) {
    let out = p.cmd(args).env_remove("MPCS_LOG").output().expect("run mpcs");
    let code = out.status.code().unwrap_or(-1);
    let mut text = format!("$ mpcs {}\n[exit {code}]\n", args.join(" "));
    for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        if !bytes.is_empty() {
            text.push_str(&format!("--- {name}\n{}", String::from_utf8_lossy(bytes)));
            if !text.ends_with('\n') {
                text.push_str("[no newline at end]\n");
            }
        }
    }
    (code, normalise(p, &text))
}

/// Replaces what varies from run to run: the project directory with `[TMP]`, runs of 12 or more hex digits (cache
/// keys, digests) with `[HEX]`, the pid and counter of a staging directory with `[PID].[N]`, timings with `[T] s`,
/// and the host name of a cache entry's maker with `[HOST]`.
fn normalise(p: &Project, text: &str) -> String {
    let mut text = text.to_string();
    let dir = p.dir.path();
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    for d in [canonical, dir.to_path_buf()] {
        text = text.replace(&d.display().to_string(), "[TMP]");
    }
    let rules = [
        (r"\b[0-9a-f]{12,}\b", "[HEX]"),
        (r"\[HEX\]\.\d+\.\d+\b", "[HEX].[PID].[N]"),
        (r"\b\d+\.\d+ s\b", "[T] s"),
        (r"(?m)^(\s*made by node .* on )\S+( \()", "${1}[HOST]${2}"),
    ];
    for (re, with) in rules {
        text = Regex::new(re).unwrap().replace_all(&text, with).into_owned();
    }
    text
}

// ---------------------------------------------------------------------------------------------------------------
// Error diagnostics (the experiments of tests/runner_errors.rs)

/// `mpcs run bad.toml ARGS` on the experiment `text`: asserts exit code `code` and that nothing reached stdout,
/// and returns the normalised transcript.
fn run_bad(text: &str, args: &[&str], code: i32) -> String {
    let p = Project::new();
    p.write("data/x.txt", "x");
    p.write("bad.toml", text);
    let mut all = vec!["run", "bad.toml", "--plain", "--jobs", "1"];
    all.extend_from_slice(args);
    let (got, out) = transcript(&p, &all);
    assert_eq!(got, code, "{out}");
    assert!(!out.contains("--- stdout"), "errors go to stderr: {out}");
    out
}

#[test]
fn error_malformed_toml() {
    insta::assert_snapshot!("error_malformed_toml", run_bad("[stage.a\nkind = \"source\"\n", &[], 2));
}

#[test]
fn error_unknown_key_did_you_mean() {
    let text =
        format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\nparms = {{ lr = 1 }}\n");
    insta::assert_snapshot!("error_unknown_key_did_you_mean", run_bad(&text, &[], 2));
}

#[test]
fn error_unknown_stage_kind() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"comand\"\nfrom = \"raw\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_unknown_stage_kind", run_bad(&text, &[], 2));
}

#[test]
fn error_unknown_placeholder() {
    let text = format!(
        "{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nparams = {{ lr = 1 }}\nrun = [\"echo\", \"{{lrr}}\", \"{{out}}\"]\n"
    );
    insta::assert_snapshot!("error_unknown_placeholder", run_bad(&text, &[], 2));
}

#[test]
fn error_reference_to_no_stage() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"rwa\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_reference_to_no_stage", run_bad(&text, &[], 2));
}

#[test]
fn error_reference_selects_by_unknown_matrix_key() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ fold = [0, 1] }}\nrun = [\"true\"]\n\n[stage.c]\nkind = \"command\"\nfrom = \"b[flod=0]\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_reference_selects_by_unknown_matrix_key", run_bad(&text, &[], 2));
}

#[test]
fn error_reference_matches_nothing() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nmatrix = {{ fold = [0, 1] }}\nrun = [\"true\"]\n\n[stage.c]\nkind = \"command\"\nfrom = \"b[fold=7]\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_reference_matches_nothing", run_bad(&text, &[], 2));
}

#[test]
fn error_stage_cycle() {
    let text = format!("{GOOD_HEAD}\n[stage.a]\nkind = \"command\"\nfrom = [\"raw\", \"b\"]\nrun = [\"true\"]\n\n[stage.b]\nkind = \"command\"\nfrom = \"a\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_stage_cycle", run_bad(&text, &[], 2));
}

#[test]
fn error_wrong_type_of_command_key() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = \"echo hi\"\n");
    insta::assert_snapshot!("error_wrong_type_of_command_key", run_bad(&text, &[], 2));
}

#[test]
fn error_wrong_value_of_finetune_key() {
    let text = format!(
        "{GOOD_HEAD}\n[stage.ft]\nkind = \"finetune\"\nfrom = \"raw\"\nmatrix = {{ fold = [0] }}\nobjective = \"ternary\"\n"
    );
    insta::assert_snapshot!("error_wrong_value_of_finetune_key", run_bad(&text, &[], 2));
}

#[test]
fn error_missing_source_path() {
    let text = "[stage.raw]\nkind = \"source\"\npath = \"no/such/dir\"\n\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\n";
    insta::assert_snapshot!("error_missing_source_path", run_bad(text, &[], 2));
}

#[test]
fn error_bad_set_value() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_bad_set_value", run_bad(&text, &["--set", "stage.b.gpus=lots"], 2));
}

#[test]
fn error_bad_set_syntax() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"true\"]\n");
    insta::assert_snapshot!("error_bad_set_syntax", run_bad(&text, &["--set", "nonsense"], 2));
}

#[test]
fn error_command_exits_non_zero() {
    let text = format!("{GOOD_HEAD}\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo doing {{node}}; echo oops >&2; exit 3\"]\n\n[stage.c]\nkind = \"command\"\nfrom = \"b\"\nrun = [\"sh\", \"-c\", \"echo > {{out}}/x\"]\n");
    insta::assert_snapshot!("error_command_exits_non_zero", run_bad(&text, &[], 1));
}

// ---------------------------------------------------------------------------------------------------------------
// A small command DAG: a source, a 3-node matrix stage, a fan-in stage.

const DAG: &str = r#"[experiment]
name = "small"

[stage.raw]
kind = "source"
path = "data"

[stage.square]
kind = "command"
from = "raw"
matrix = { x = [1, 2, 3] }
params = { scale = 1 }
run = ["sh", "-c", "echo $(( {x} * {x} * {scale} )) > {out}/y.txt"]

[stage.total]
kind = "command"
from = "square"
run = ["sh", "-c", "for d in {in}; do cat $d/y.txt; done > {out}/all.txt"]
"#;

fn small_dag() -> Project {
    let p = Project::new();
    p.write("data/a.txt", "alpha\n");
    p.write("dag.toml", DAG);
    p
}

/// A successful `mpcs ARGS`: asserts exit 0 and returns the transcript.
fn ok(p: &Project, args: &[&str]) -> String {
    let (code, out) = transcript(p, args);
    assert_eq!(code, 0, "{out}");
    out
}

/// Runs the DAG to completion (one job, so the log lines come in a fixed order) and returns the transcript.
fn run_dag(p: &Project) -> String {
    ok(p, &["run", "dag.toml", "--plain", "--jobs", "1", "--devices", "cpu"])
}

/// The last line of a transcript: the run summary.
fn last_line(text: &str) -> &str {
    text.trim_end().lines().last().unwrap()
}

#[test]
fn graph_text_before_and_after_a_run_and_after_an_edit() {
    let p = small_dag();
    insta::assert_snapshot!("graph_before_run", ok(&p, &["graph", "dag.toml"]));
    run_dag(&p);
    insta::assert_snapshot!("graph_after_run", ok(&p, &["graph", "dag.toml"]));
    p.write("dag.toml", &DAG.replace("scale = 1", "scale = 2"));
    insta::assert_snapshot!("graph_after_param_edit", ok(&p, &["graph", "dag.toml"]));
    p.write("data/a.txt", "beta\n");
    insta::assert_snapshot!("graph_after_param_edit_and_source_change", ok(&p, &["graph", "dag.toml"]));
}

#[test]
fn why_never_run() {
    let p = small_dag();
    insta::assert_snapshot!("why_never_run_matrix_node", ok(&p, &["graph", "dag.toml", "--why", "square[x=2]"]));
    insta::assert_snapshot!("why_never_run_fan_in", ok(&p, &["graph", "dag.toml", "--why", "total"]));
}

#[test]
fn why_cached() {
    let p = small_dag();
    run_dag(&p);
    insta::assert_snapshot!("why_cached", ok(&p, &["graph", "dag.toml", "--why", "square[x=2]"]));
}

#[test]
fn why_changed_parameter_and_blocked_root_cause() {
    let p = small_dag();
    run_dag(&p);
    p.write("dag.toml", &DAG.replace("scale = 1", "scale = 2"));
    insta::assert_snapshot!("why_changed_parameter", ok(&p, &["graph", "dag.toml", "--why", "square[x=2]"]));
    insta::assert_snapshot!("why_blocked_with_root_cause", ok(&p, &["graph", "dag.toml", "--why", "total"]));
}

#[test]
fn why_changed_source() {
    let p = small_dag();
    run_dag(&p);
    p.write("data/a.txt", "beta\n");
    insta::assert_snapshot!("why_changed_source", ok(&p, &["graph", "dag.toml", "--why", "raw"]));
    insta::assert_snapshot!("why_input_changed", ok(&p, &["graph", "dag.toml", "--why", "square[x=1]"]));
}

#[test]
fn why_unknown_node() {
    let p = small_dag();
    let (code, out) = transcript(&p, &["graph", "dag.toml", "--why", "square[x=9]"]);
    assert_eq!(code, 2, "{out}");
    insta::assert_snapshot!("why_unknown_node", out);
}

#[test]
fn dry_run_text() {
    let p = small_dag();
    insta::assert_snapshot!("dry_run_before_any_run", ok(&p, &["run", "dag.toml", "--dry-run", "--devices", "cpu"]));
    assert!(p.entries().is_empty(), "a dry run executes nothing");
    run_dag(&p);
    let entries = p.entries();
    p.write("dag.toml", &DAG.replace("[1, 2, 3]", "[1, 2, 3, 4]"));
    insta::assert_snapshot!(
        "dry_run_after_adding_a_matrix_value",
        ok(&p, &["run", "dag.toml", "--dry-run", "--devices", "cpu"])
    );
    assert_eq!(p.entries(), entries, "a dry run executes nothing");
}

#[test]
fn run_summary_cold_and_cached() {
    let p = small_dag();
    let cold = run_dag(&p);
    assert_eq!(last_line(&cold), "small: 5 nodes — 5 executed, 0 cached, 0 failed, 0 skipped in [T] s");
    insta::assert_snapshot!("run_cold", cold);
    let cached = run_dag(&p);
    assert_eq!(last_line(&cached), "small: 5 nodes — 0 executed, 5 cached, 0 failed, 0 skipped in [T] s");
    insta::assert_snapshot!("run_cached", cached);
    p.write("dag.toml", &DAG.replace("[1, 2, 3]", "[1, 2, 3, 4]"));
    insta::assert_snapshot!("run_after_adding_a_matrix_value", run_dag(&p));
}
