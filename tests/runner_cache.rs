//! The runner's caching contract on a 200-node, paper-shaped DAG of command stages.

mod common;
use common::*;

fn setup(p: &Project) {
    p.write("data/raw/a.txt", "alpha\n");
    p.write("paper.toml", &paper_dag("a", "", ""));
}

#[test]
fn two_hundred_nodes_rerun_exactly_what_changed() {
    let p = Project::new();
    setup(&p);
    // A large source file, to check that touching it re-hashes instead of rerunning.
    let big = p.path("data/raw/big.bin");
    std::fs::write(&big, vec![42u8; 24 << 20]).unwrap();
    make_old(&big);

    let first = p.run_ok("paper.toml", &[]);
    assert_eq!(first.executed.len(), 200, "first run executes every node");
    assert!(first.cached.is_empty() && first.failed.is_empty() && first.skipped.is_empty());
    assert!(exec_counts(&p).values().all(|&c| c == 1));

    let second = p.run_ok("paper.toml", &[]);
    assert!(second.executed.is_empty(), "unchanged rerun executes nothing: {:?}", second.executed);
    assert_eq!(second.cached.len(), 200);

    // One fine-tune node's learning rate changes: that node, its evaluation and the table rerun.
    let vary = r#"vary = [{ when = { fold = 0, magnification = "40X", init = "FP" }, params = { lr = 0.01 } }]"#;
    p.write("paper.toml", &paper_dag("a", vary, ""));
    let third = p.run_ok("paper.toml", &[]);
    assert_eq!(
        third.executed,
        set(&["finetune[fold=0,magnification=40X,init=FP]", "evaluate[fold=0,magnification=40X,init=FP]", "table"])
    );
    assert_eq!(third.cached.len(), 197);

    // Back to the earlier value: every entry is still in the cache, nothing executes.
    p.write("paper.toml", &paper_dag("a", "", ""));
    let fourth = p.run_ok("paper.toml", &[]);
    assert!(fourth.executed.is_empty(), "going back executes nothing: {:?}", fourth.executed);

    // The same change on the command line instead of in the file.
    let fifth = p.run_ok("paper.toml", &["--set", "stage.finetune.params.lr=0.0025"]);
    assert_eq!(fifth.executed.iter().filter(|n| n.starts_with("finetune[")).count(), 80);
    assert_eq!(fifth.executed.iter().filter(|n| n.starts_with("evaluate[")).count(), 80);
    assert!(fifth.executed.contains("table") && !fifth.executed.contains("linear_table"));

    // An upstream change that reproduces identical bytes: `prepare` reruns, nothing downstream does.
    p.write("paper.toml", &paper_dag("b", "", ""));
    let sixth = p.run_ok("paper.toml", &[]);
    assert_eq!(sixth.executed, set(&["prepare"]), "early cut-off");

    // Touching the large source without changing its bytes executes nothing.
    let f = std::fs::File::options().write(true).open(&big).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    let seventh = p.run_ok("paper.toml", &[]);
    assert!(seventh.executed.is_empty(), "touch executes nothing: {:?}", seventh.executed);

    // Changing the source's bytes reruns everything downstream of it.
    p.write("data/raw/a.txt", "beta\n");
    let eighth = p.run_ok("paper.toml", &[]);
    assert_eq!(eighth.executed.len(), 200);
}

#[test]
fn graph_states_and_why_explain_a_rerun() {
    let p = Project::new();
    setup(&p);
    p.run_ok("paper.toml", &[]);
    let vary = r#"vary = [{ when = { fold = 1, magnification = "200X", init = "OP" }, params = { lr = 0.05 } }]"#;
    p.write("paper.toml", &paper_dag("a", vary, ""));

    let states = p.states("paper.toml");
    assert_eq!(states.len(), 200);
    assert_eq!(states["finetune[fold=1,magnification=200X,init=OP]"], "will-run");
    assert_eq!(states["evaluate[fold=1,magnification=200X,init=OP]"], "blocked");
    assert_eq!(states["table"], "blocked");
    assert_eq!(states.values().filter(|s| *s == "cached").count(), 197);

    let out = p.mpcs(&["graph", "paper.toml", "--why", "finetune[fold=1, magnification=200X, init=OP]"]);
    let why = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(why.contains("params.lr: 0.001 → 0.05"), "{why}");

    let out = p.mpcs(&["graph", "paper.toml", "--why", "table"]);
    let why = String::from_utf8_lossy(&out.stdout);
    assert!(why.contains("evaluate[fold=1,magnification=200X,init=OP]"), "{why}");
    assert!(why.contains("params.lr: 0.001 → 0.05"), "root cause is named: {why}");

    // A stage-version-free change of the source is explained too.
    p.write("data/raw/a.txt", "gamma\n");
    let out = p.mpcs(&["graph", "paper.toml", "--why", "raw"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("content changed"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Other renderings.
    for (fmt, needle) in [("dot", "digraph"), ("mermaid", "flowchart"), ("text", "will-run")] {
        let out = p.mpcs(&["graph", "paper.toml", "--format", fmt]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(needle), "{fmt}");
    }

    // Dry run says what would run, where, and does not run it.
    let before = exec_counts(&p);
    let out = p.mpcs(&["run", "paper.toml", "--dry-run", "--devices", "cpu"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("would run  raw"), "{text}");
    assert!(text.contains("cpu (wants 1 gpu, none found)"), "{text}");
    assert_eq!(before, exec_counts(&p), "dry run executed nothing");
}

#[test]
fn graph_json_lists_nodes_with_dependencies() {
    let p = Project::new();
    setup(&p);
    let out = p.mpcs(&["graph", "paper.toml", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 200);
    let find = |id: &str| nodes.iter().find(|n| n["id"] == id).unwrap_or_else(|| panic!("{id}"));
    let ft = find("finetune[fold=2,magnification=100X,init=RP]");
    assert_eq!(ft["deps"], serde_json::json!(["folds[fold=2]", "pretrain[fold=2,pair=RP]"]));
    let ft_in = find("finetune[fold=2,magnification=100X,init=imagenet]");
    assert_eq!(ft_in["deps"], serde_json::json!(["folds[fold=2]"]), "optional reference matches nothing");
    assert_eq!(find("table")["deps"].as_array().unwrap().len(), 80);
    assert_eq!(find("raw")["state"], "will-run");
    assert_eq!(find("stain")["state"], "blocked");
    assert!(find("stain")["key"].is_null());
}

#[test]
fn show_gc_and_verify() {
    let p = Project::new();
    setup(&p);
    p.run_ok("paper.toml", &[]);
    let out = p.mpcs(&["show", "table"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("node       table (experiment paper)"), "{text}");
    let out_dir = text.lines().find(|l| l.starts_with("files")).unwrap().split_whitespace().nth(1).unwrap().to_string();
    assert!(std::path::Path::new(&out_dir).join("table.md").exists());

    // Key prefix lookup.
    let key = text.lines().next().unwrap().split_whitespace().nth(1).unwrap().to_string();
    let out = p.mpcs(&["show", &key[..8], "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["node"], "table");

    let verify = p.mpcs(&["verify"]);
    assert!(verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stdout).contains("checked 199 entries: 0 corrupt"));

    // Corrupt one entry's file: verify finds it and exits non-zero; --remove deletes it; the run recomputes it.
    std::fs::write(std::path::Path::new(&out_dir).join("table.md"), "tampered").unwrap();
    let verify = p.mpcs(&["verify"]);
    assert_eq!(verify.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&verify.stdout).contains(&format!("CORRUPT {key}: file table.md changed")));
    assert!(p.mpcs(&["verify", "--remove"]).status.code() == Some(3));
    assert!(p.mpcs(&["verify"]).status.success());
    assert_eq!(p.run_ok("paper.toml", &[]).executed, set(&["table"]));

    // gc keeps what the experiment reaches and drops the rest.
    p.run_ok("paper.toml", &["--set", "stage.finetune.params.lr=0.5"]);
    let before = p.entries().len();
    assert_eq!(before, 199 + 161);
    let dry = p.mpcs(&["gc", "paper.toml", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("would remove 161 entries"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(p.entries().len(), before);
    let gc = p.mpcs(&["gc", "paper.toml"]);
    assert!(gc.status.success());
    assert_eq!(p.entries().len(), 199);
    assert!(p.run_ok("paper.toml", &[]).executed.is_empty(), "gc kept every reachable entry");

    // Entries of the previous cache format are never read (their keys hash unresolved parameters); gc drops them.
    p.write("cache/v1/entries/ab/ab0123/out/x.txt", "old");
    let dry = p.mpcs(&["gc", "paper.toml", "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would remove v1/ of an older cache format"));
    assert!(p.path("cache/v1").exists(), "a dry run removes nothing");
    assert!(p.mpcs(&["gc", "paper.toml"]).status.success());
    assert!(!p.path("cache/v1").exists() && p.entries().len() == 199);
}

/// Issue 13 S4 and S5: everything mpcs hands a command is in its key. Two stages with the same `run` that
/// writes `{node}` get their own entries, and a script reading MPCS_SEED reruns when the experiment seed changes.
#[test]
fn what_a_command_sees_is_keyed() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let stage = |name: &str| {
        format!("[stage.{name}]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo {{node}} > {{out}}/f.txt\"]\n\n")
    };
    let text = format!(
        "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n{}{}[stage.seeded]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo $MPCS_SEED > {{out}}/s.txt\"]\n",
        stage("alpha"),
        stage("beta")
    );
    p.write("k.toml", &text);
    let first = p.run_ok("k.toml", &[]);
    assert_eq!(first.executed, set(&["raw", "alpha", "beta", "seeded"]));
    let read = |node: &str| {
        let shown = p.mpcs(&["show", node, "--exp", "k.toml", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
        let dir = std::path::PathBuf::from(v["path"].as_str().unwrap());
        std::fs::read_to_string(dir.join(if node == "seeded" { "s.txt" } else { "f.txt" })).unwrap()
    };
    assert_eq!(read("alpha"), "alpha\n");
    assert_eq!(read("beta"), "beta\n", "beta is not served alpha's entry");
    let before = read("seeded");
    let reseeded = p.run_ok("k.toml", &["--set", "experiment.seed=12345"]);
    assert!(reseeded.executed.contains("seeded"), "a new experiment seed reruns a command that reads MPCS_SEED");
    assert_ne!(before, read_with_seed(&p));
}

fn read_with_seed(p: &Project) -> String {
    let shown = p.mpcs(&["show", "seeded", "--exp", "k.toml", "--set", "experiment.seed=12345", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    std::fs::read_to_string(std::path::PathBuf::from(v["path"].as_str().unwrap()).join("s.txt")).unwrap()
}

/// Issue 13 B4: a journal line torn by a crash used to glue the next record onto itself, so `--why` compared
/// with an older run.
#[test]
fn a_torn_journal_line_does_not_swallow_the_next_record() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let text = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nparams = { x = 1 }\nrun = [\"sh\", \"-c\", \"echo {x} > {out}/f\"]\n";
    p.write("j.toml", text);
    p.run_ok("j.toml", &[]);
    p.run_ok("j.toml", &["--set", "stage.b.params.x=2"]);
    // A crash in the middle of the last append: its line loses its end.
    let journal = std::fs::read_dir(p.path("cache/v2/journal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|f| f.file_name().unwrap().to_string_lossy().starts_with("j-") && f.extension().unwrap() == "jsonl")
        .expect("the experiment's journal");
    let bytes = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, &bytes[..bytes.len() - 5]).unwrap();
    p.run_ok("j.toml", &["--set", "stage.b.params.x=3"]);
    let why = p.mpcs(&["graph", "j.toml", "--why", "b", "--set", "stage.b.params.x=4"]);
    let why = String::from_utf8_lossy(&why.stdout);
    assert!(why.contains("params.x: 3 → 4"), "compared with the last run (x = 3): {why}");
}

/// Issue 13 S10: a source that contains the cache (`path = "."`) used to change on every run and never converge.
#[test]
fn a_source_holding_the_cache_converges() {
    let p = Project::new();
    p.write("x.txt", "x");
    let text = "[stage.raw]\nkind = \"source\"\npath = \".\"\n\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"cat {in}/x.txt > {out}/f\"]\n";
    p.write("here.toml", text);
    assert_eq!(p.run_ok("here.toml", &[]).executed, set(&["raw", "b"]));
    let again = p.run_ok("here.toml", &[]);
    assert!(again.executed.is_empty(), "nothing changed but the cache inside the source: {again:?}");
    p.write("x.txt", "y");
    assert_eq!(p.run_ok("here.toml", &[]).executed, set(&["raw", "b"]), "a real edit still counts");
}

/// Issue 13 D1: `gc` during a run used to delete the entry that run had just made, failing its next node.
#[test]
fn gc_removes_nothing_while_a_run_uses_the_cache() {
    let p = Project::new();
    p.write("data/x.txt", "x");
    let head = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n";
    let slow = format!("{head}\n[stage.a]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo a > {{out}}/f\"]\n\n[stage.b]\nkind = \"command\"\nfrom = \"a\"\nrun = [\"sh\", \"-c\", \"sleep 1.5; cat {{in}}/f > {{out}}/f\"]\n");
    p.write("slow.toml", &slow);
    p.write(
        "other.toml",
        &format!(
            "{head}\n[stage.z]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"echo z > {{out}}/f\"]\n"
        ),
    );
    let child = p
        .cmd(&["run", "slow.toml", "--json", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let gc = p.mpcs(&["gc", "other.toml"]);
    assert_eq!(gc.status.code(), Some(3), "{}", String::from_utf8_lossy(&gc.stderr));
    assert!(String::from_utf8_lossy(&gc.stderr).contains("is using this cache right now"));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the run was not disturbed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(p.entries().len(), 2);
    assert!(p.mpcs(&["gc", "other.toml"]).status.success(), "once the run ended, gc works");
    assert!(p.entries().is_empty());
}

/// Issue 13: `verify` with no cache used to create the cache folder.
#[test]
fn verify_without_a_cache_creates_none() {
    let p = Project::new();
    let out = p.mpcs(&["verify"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to verify"));
    assert!(!p.path("cache").exists());
}

/// Issue 13 S3: a source edited while a consumer ran used to store the output under the old fingerprint, so
/// after reverting the source the wrong output was served.
#[test]
fn a_source_edited_while_a_node_runs_stores_nothing() {
    let p = Project::new();
    p.write("data/x.txt", "old");
    let text = "[stage.raw]\nkind = \"source\"\npath = \"data\"\n\n[stage.b]\nkind = \"command\"\nfrom = \"raw\"\nrun = [\"sh\", \"-c\", \"sleep 1; cat {in}/x.txt > {out}/f\"]\n";
    p.write("s.toml", text);
    let child = p
        .cmd(&["run", "s.toml", "--json", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    p.write("data/x.txt", "new");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed while this node ran"));
    assert!(p.entries().is_empty(), "nothing stored under the old fingerprint");
    // Reverting the source and running again computes from the reverted content.
    p.write("data/x.txt", "old");
    assert!(p.run_ok("s.toml", &[]).executed.contains("b"));
}
