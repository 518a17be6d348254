//! Lineage: the state of every node against the cache (`mpcs graph`, `mpcs run --dry-run`), and why a node
//! would rerun (`mpcs graph --why NODE`), compared with the journal's record of its last run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::cache::journal::Status;
use crate::cache::Cache;
pub use crate::exec::resolve::{assess, assess_with, Assessment, NodeStatus, State};
use crate::exec::Project;
use crate::plan::key::Action;

/// One line: why a node is in its state (for listings and dry runs).
pub fn short_reason(p: &Project, a: &Assessment, i: usize) -> String {
    let (exp, plan) = (&p.exp, &p.plan);
    let node = &plan.nodes[i];
    let st = &a.nodes[i];
    match st.state {
        State::Cached => "cached".into(),
        State::Remote => format!("on the remote: pull {}", crate::remote::human_bytes(st.remote_bytes.unwrap_or(0))),
        State::Blocked => {
            let ups: Vec<&str> = node
                .inputs
                .iter()
                .filter(|&&j| !matches!(a.nodes[j].state, State::Cached | State::Remote))
                .map(|&j| plan.nodes[j].id.as_str())
                .take(3)
                .collect();
            format!("after {}", ups.join(", "))
        }
        State::Failed => "failed last time".into(),
        State::Missing => {
            let name = &exp.stages[node.stage].name;
            format!("source path does not exist; point it at the data with --set stage.{name}.path=DIR")
        }
        State::WillRun => {
            if p.source_of(i).is_some() {
                return if a.last.contains_key(&node.id) { "source changed".into() } else { "new source".into() };
            }
            match (a.last.get(&node.id), &a.action(p, i)) {
                (Some(r), Some(cur)) => {
                    let diffs = action_diff(&r.action, cur);
                    if diffs.is_empty() {
                        "entry missing from the cache".into()
                    } else {
                        diffs.join("; ")
                    }
                }
                _ => "never run".into(),
            }
        }
    }
}

/// A full explanation of a node's state: what differs from its last recorded run.
pub fn why(p: &Project, a: &Assessment, cache: &Cache, i: usize) -> String {
    let (exp, plan) = (&p.exp, &p.plan);
    let node = &plan.nodes[i];
    let decl = &exp.stages[node.stage];
    let st = &a.nodes[i];
    let mut out = String::new();
    let _ = writeln!(out, "{} ({}): {}", node.id, decl.kind, st.state.as_str());
    let last = a.last.get(&node.id);

    if let Some(src) = p.source_of(i) {
        let _ = writeln!(
            out,
            "  source {}",
            a.source_paths.get(&i).map(|p| p.display().to_string()).unwrap_or_else(|| src.path.get_ref().clone())
        );
        match (last.and_then(|r| r.digest.as_deref()), st.digest.as_deref()) {
            (Some(old), Some(new)) if old == new => {
                let _ = writeln!(out, "  content unchanged since the last run (digest {})", short(new));
            }
            (Some(old), Some(new)) => {
                let _ = writeln!(out, "  content changed: digest {} → {}", short(old), short(new));
            }
            _ => {
                let _ = writeln!(out, "  not fingerprinted in a run of `{}` before", exp.name);
            }
        }
        return out;
    }

    match st.state {
        State::Missing | State::Remote => {
            let _ = writeln!(out, "  {}", short_reason(p, a, i));
        }
        State::Blocked => {
            let _ = writeln!(out, "  its key is not known yet: these inputs will run first and may change:");
            for &j in &node.inputs {
                if !matches!(a.nodes[j].state, State::Cached | State::Remote) {
                    let _ = writeln!(
                        out,
                        "    {} ({}): {}",
                        plan.nodes[j].id,
                        a.nodes[j].state.as_str(),
                        short_reason(p, a, j)
                    );
                }
            }
            let roots = root_causes(p, a, i);
            if !roots.is_empty() {
                let _ = writeln!(out, "  root cause(s) upstream:");
                for r in roots {
                    let _ = writeln!(out, "    {}: {}", plan.nodes[r].id, short_reason(p, a, r));
                }
            }
            let _ = writeln!(out, "  (if an upstream node reproduces identical output, this node stays cached)");
        }
        State::Cached => {
            let key = st.key.clone().unwrap_or_default();
            let _ = writeln!(out, "  cached as entry {key}: nothing would run");
            if let Ok(Some(m)) = cache.lookup(&key) {
                let _ = writeln!(
                    out,
                    "  made by node {} of `{}` in {:.2} s on {} ({})",
                    m.node, m.experiment, m.duration_s, m.host, m.device
                );
            }
            if let (Some(r), Some(cur)) = (last, &a.action(p, i)) {
                if r.key != key {
                    let diffs = action_diff(&r.action, cur);
                    let _ = writeln!(out, "  differs from the last recorded run (now restored from the cache):");
                    for d in diffs {
                        let _ = writeln!(out, "    {d}");
                    }
                }
            }
        }
        State::WillRun | State::Failed => {
            let action = a.action(p, i);
            let cur = action.as_ref();
            match (last, cur) {
                (None, _) => {
                    let _ = writeln!(
                        out,
                        "  never run before in experiment `{}` (no entry with its key {} in the cache)",
                        exp.name,
                        st.key.as_deref().unwrap_or("?")
                    );
                }
                (Some(r), Some(cur)) => {
                    let diffs = action_diff(&r.action, cur);
                    if diffs.is_empty() {
                        if r.status == Status::Failed {
                            let _ = writeln!(
                                out,
                                "  same action as last time, which failed: {}",
                                r.error.as_deref().unwrap_or("").lines().next().unwrap_or("")
                            );
                            if let Some(log) = &r.log {
                                let _ = writeln!(out, "  log of that attempt: {log}");
                            }
                        } else {
                            let _ = writeln!(out, "  same action as its last run (key {}), but that entry is no longer in this cache (removed by `mpcs gc`, or another --cache)", r.key);
                        }
                    } else {
                        let _ = writeln!(
                            out,
                            "  differs from its last run (key {} → {}):",
                            r.key,
                            st.key.as_deref().unwrap_or("?")
                        );
                        for d in diffs {
                            let _ = writeln!(out, "    {d}");
                        }
                    }
                }
                (Some(_), None) => {}
            }
        }
    }
    out
}

/// The nearest upstream nodes that will run although all their own inputs are settled.
fn root_causes(p: &Project, a: &Assessment, i: usize) -> Vec<usize> {
    let plan = &p.plan;
    let mut roots = Vec::new();
    let mut seen = vec![false; plan.nodes.len()];
    let mut stack: Vec<usize> = plan.nodes[i].inputs.clone();
    while let Some(j) = stack.pop() {
        if std::mem::replace(&mut seen[j], true) {
            continue;
        }
        match a.nodes[j].state {
            State::Cached | State::Remote => {}
            State::Blocked => stack.extend(plan.nodes[j].inputs.iter().copied()),
            State::WillRun | State::Failed | State::Missing => roots.push(j),
        }
    }
    roots.sort();
    roots.truncate(10);
    roots
}

/// Human-readable differences between two actions of one node.
pub fn action_diff(old: &Action, new: &Action) -> Vec<String> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(format!("kind: {} → {}", old.kind, new.kind));
    }
    if old.version != new.version {
        out.push(format!(
            "stage version of `{}`: {} → {} (mpcs changed what this kind does)",
            new.kind, old.version, new.version
        ));
    }
    let flat_old = flatten(&old.params);
    let flat_new = flatten(&new.params);
    // A value the experiment does not write changed because mpcs's default for it did.
    let default = |k: &str| {
        let top = k.split('.').next().unwrap_or(k);
        if new.defaults.iter().any(|d| d == top) {
            " (default)"
        } else {
            ""
        }
    };
    for (k, v) in &flat_old {
        match flat_new.get(k) {
            None => out.push(format!("{k}: {} → (removed)", show(v))),
            Some(nv) if nv != v => out.push(format!("{k}: {} → {}{}", show(v), show(nv), default(k))),
            _ => {}
        }
    }
    for (k, v) in &flat_new {
        if !flat_old.contains_key(k) {
            out.push(format!("{k}: (unset) → {}{}", show(v), default(k)));
        }
    }
    let old_in: BTreeMap<&str, &str> = old.inputs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let new_in: BTreeMap<&str, &str> = new.inputs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    for (id, d) in &new_in {
        match old_in.get(id) {
            None => out.push(format!("new input {id}")),
            Some(od) if od != d => out.push(format!("input {id} changed: {} → {}", short(od), short(d))),
            _ => {}
        }
    }
    for id in old_in.keys() {
        if !new_in.contains_key(id) {
            out.push(format!("input {id} removed"));
        }
    }
    out
}

fn flatten(params: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    fn go(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    go(&format!("{prefix}.{k}"), x, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in params {
        go(k, v, &mut out);
    }
    out
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn short(digest: &str) -> String {
    format!("{}…", &digest[..digest.len().min(12)])
}

/// `mpcs graph --format json`: `{"nodes":[{"id","kind","state","key","deps":[ids]}]}`.
pub fn render_json(p: &Project, a: &Assessment) -> String {
    let (exp, plan) = (&p.exp, &p.plan);
    let nodes: Vec<Value> = plan
        .order
        .iter()
        .map(|&i| {
            let n = &plan.nodes[i];
            let decl = &exp.stages[n.stage];
            let mut v = serde_json::json!({
                "id": n.id,
                "stage": decl.name,
                "kind": decl.kind,
                "state": a.nodes[i].job.as_ref().map_or(a.nodes[i].state.as_str(), |j| j.1),
                "key": a.nodes[i].key,
                "gpus": decl.gpus,
                "deps": n.inputs.iter().map(|&j| plan.nodes[j].id.clone()).collect::<Vec<_>>(),
            });
            if let Some((job, _)) = &a.nodes[i].job {
                v["job"] = Value::String(job.clone());
            }
            v
        })
        .collect();
    serde_json::json!({ "experiment": exp.name, "nodes": nodes }).to_string()
}

/// `mpcs graph` as text: stages in order, each node with its state and reason.
pub fn render_text(p: &Project, a: &Assessment) -> String {
    let (exp, plan) = (&p.exp, &p.plan);
    let mut out = String::new();
    let count = |s: State| a.nodes.iter().filter(|n| n.state == s).count();
    let _ = writeln!(
        out,
        "{}{} — {} nodes: {} cached, {} will run, {} blocked, {} failed last time",
        exp.name,
        exp.title.as_deref().map(|t| format!(" ({t})")).unwrap_or_default(),
        plan.nodes.len(),
        count(State::Cached),
        count(State::WillRun),
        count(State::Blocked),
        count(State::Failed)
    );
    if count(State::Remote) > 0 {
        let bytes: u64 = a.nodes.iter().filter_map(|n| n.remote_bytes).sum();
        let size = crate::remote::human_bytes(bytes);
        let _ = writeln!(out, "{} on the remote cache, not here ({size} to pull)", count(State::Remote));
    }
    for (si, stage) in exp.stages.iter().enumerate() {
        let from: Vec<&str> = stage.refs.iter().map(|r| r.text.as_str()).collect();
        let _ = writeln!(
            out,
            "\n{} ({}{}){}",
            stage.name,
            stage.kind,
            if stage.gpus > 0 { format!(", gpus={}", stage.gpus) } else { String::new() },
            if from.is_empty() { String::new() } else { format!(" ← {}", from.join(", ")) }
        );
        for &i in plan.order.iter().filter(|&&i| plan.nodes[i].stage == si) {
            let st = &a.nodes[i];
            let mark = match st.state {
                State::Cached => "✓",
                State::WillRun => "▶",
                State::Blocked => "·",
                State::Failed => "✗",
                State::Missing => "?",
                State::Remote => "☁",
            };
            let (shown, detail) = match (&st.job, st.state) {
                (Some((job, live)), _) => (*live, format!("Slurm job {job}")),
                (None, State::Cached) => ("cached", st.key.as_deref().map(|k| k[..12].to_string()).unwrap_or_default()),
                (None, state) => (state.as_str(), short_reason(p, a, i)),
            };
            let _ = writeln!(out, "  {mark} {:<44} {shown:<9} {detail}", plan.nodes[i].id);
        }
    }
    out
}

fn color(s: State) -> &'static str {
    match s {
        State::Cached => "palegreen",
        State::WillRun => "gold",
        State::Blocked => "lightgrey",
        State::Failed => "salmon",
        State::Missing => "orange",
        State::Remote => "lightblue",
    }
}

pub fn render_dot(p: &Project, a: &Assessment) -> String {
    let (exp, plan) = (&p.exp, &p.plan);
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=filled, fontname=\"monospace\"];\n",
        exp.name
    );
    for &i in &plan.order {
        let n = &plan.nodes[i];
        let _ = writeln!(
            out,
            "  \"{}\" [fillcolor={}, tooltip=\"{}\"];",
            n.id,
            color(a.nodes[i].state),
            a.nodes[i].state.as_str()
        );
    }
    for &i in &plan.order {
        for &j in &plan.nodes[i].inputs {
            let _ = writeln!(out, "  \"{}\" -> \"{}\";", plan.nodes[j].id, plan.nodes[i].id);
        }
    }
    out.push_str("}\n");
    out
}

pub fn render_mermaid(p: &Project, a: &Assessment) -> String {
    let plan = &p.plan;
    let mut out = String::from("flowchart LR\n");
    for s in [State::Cached, State::WillRun, State::Blocked, State::Failed, State::Remote] {
        let _ = writeln!(out, "  classDef {} fill:{};", s.as_str().replace('-', "_"), color(s));
    }
    for &i in &plan.order {
        let n = &plan.nodes[i];
        let _ =
            writeln!(out, "  n{i}[\"{}\"]:::{}", n.id.replace('"', "'"), a.nodes[i].state.as_str().replace('-', "_"));
    }
    for &i in &plan.order {
        for &j in &plan.nodes[i].inputs {
            let _ = writeln!(out, "  n{j} --> n{i}");
        }
    }
    out
}
