//! `command`: runs a user's program. The argv is a list (no shell unless the user writes one) with placeholders:
//! `{out}` the node's output directory, `{in}` its inputs' directories, `{in.NAME}` those of stage NAME,
//! `{seed}`, `{device}`, `{node}`, and every matrix value and `params` entry by name.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use toml::Spanned;

use crate::error::{did_you_mean, Result};
use crate::exec::spawn::{spawn, wait_group, SpawnRequest};
use crate::exec::worker::log_tail;
use crate::exec::{ExecContext, NodeView, StageFailure, StageKind};
use crate::experiment::template::Template;
use crate::experiment::{Experiment, StageDecl};
use crate::plan::key::toml_to_json;
use crate::plan::Node;

pub struct Command;

impl StageKind for Command {
    type Spec = CommandSpec;
    type Config = CommandConfig;
    const NAME: &'static str = "command";
    const VERSION: u32 = 1;

    fn validate(spec: &CommandSpec, stage: &StageDecl, exp: &Experiment) -> Result<()> {
        spec.validate(stage, exp)
    }

    fn resolve(spec: &CommandSpec, node: &NodeView<'_>) -> Result<CommandConfig, String> {
        let params = spec.params_for(node.node);
        Ok(CommandConfig {
            run: spec.run_words(),
            params: params.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect(),
            env: spec.env.clone(),
            // Everything mpcs hands the command is in its key: `{node}` / MPCS_NODE and `{seed}` / MPCS_SEED
            // reach every command, whether its argv names them or a script reads the environment.
            node: node.node.id.clone(),
            seed: node.node.seed,
            scripts: spec.scripts.get_or_init(|| scripts_named_in(&spec.run_words(), node.exp)).clone(),
        })
    }

    fn execute(config: &CommandConfig, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        config.execute(ctx)
    }
}

/// What a command node runs: its argv templates, its parameters (with `vary` applied), its environment.
#[derive(Serialize, Deserialize)]
pub struct CommandConfig {
    pub run: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The node id and seed, which the command sees (`{node}`, `{seed}`, MPCS_NODE, MPCS_SEED).
    pub node: String,
    pub seed: u64,
    /// Files of the experiment's folder that `run` names (`python train.py`), by the word naming them, with
    /// their content digests: editing the script reruns the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scripts: BTreeMap<String, String>,
}

const BUILTIN_PLACEHOLDERS: &[&str] = &["out", "in", "seed", "device", "node"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The argv; the first word is the program.
    pub run: Spanned<Vec<Spanned<String>>>,
    /// Values for placeholders; part of the action key.
    #[serde(default)]
    pub params: toml::Table,
    /// Extra environment variables (values may use placeholders); part of the action key.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Per-node parameter changes: `vary = [{ when = { fold = 0 }, params = { lr = 0.01 } }]` sets `lr` for the
    /// nodes whose matrix values match `when` (later entries win).
    #[serde(default)]
    pub vary: Vec<Vary>,
    /// The scripts `run` names, found once per stage (every node of a stage runs the same words).
    #[serde(skip)]
    scripts: std::sync::OnceLock<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vary {
    pub when: Spanned<toml::Table>,
    pub params: toml::Table,
}

impl CommandSpec {
    fn run_words(&self) -> Vec<String> {
        self.run.get_ref().iter().map(|w| w.get_ref().clone()).collect()
    }

    pub fn validate(&self, decl: &StageDecl, exp: &Experiment) -> Result<()> {
        let src = &exp.source;
        if self.run.get_ref().is_empty() {
            return Err(src.error(
                self.run.span(),
                format!("`run` of stage `{}` is empty", decl.name),
                Some("give the program and its arguments, e.g. run = [\"python\", \"train.py\", \"{out}\"]".into()),
            ));
        }
        for (k, _) in &self.params {
            if BUILTIN_PLACEHOLDERS.contains(&k.as_str()) || decl.has_matrix_key(k) {
                return Err(src.error(
                    self.run.span(),
                    format!("params key `{k}` of stage `{}` clashes with a placeholder of the same name", decl.name),
                    Some("rename it; out, in, seed, device, node and the matrix keys are taken".into()),
                ));
            }
        }
        for v in &self.vary {
            for (k, val) in v.when.get_ref() {
                if !decl.has_matrix_key(k) {
                    return Err(src.error(
                        v.when.span(),
                        format!("`vary.when` of stage `{}` names `{k}`, which is not a matrix key", decl.name),
                        Some(format!("matrix keys: {}", decl.matrix_keys().collect::<Vec<_>>().join(", "))),
                    ));
                }
                let shown = match val {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let exists = decl.matrix.iter().any(|(mk, vs)| mk == k && vs.iter().any(|x| x.to_string() == shown));
                if !exists {
                    return Err(src.error(
                        v.when.span(),
                        format!(
                            "`vary.when` of stage `{}` selects {k} = {shown}, which is not in its matrix",
                            decl.name
                        ),
                        None,
                    ));
                }
            }
            for k in v.params.keys() {
                if !self.params.contains_key(k) {
                    return Err(src.error(
                        v.when.span(),
                        format!("`vary` of stage `{}` sets `{k}`, which is not in its `params`", decl.name),
                        Some(format!("declare a default first: params = {{ {k} = ... }}")),
                    ));
                }
            }
        }
        let mut valid: Vec<String> = BUILTIN_PLACEHOLDERS.iter().map(|s| s.to_string()).collect();
        valid.extend(decl.refs.iter().map(|r| format!("in.{}", r.stage)));
        valid.extend(decl.matrix_keys().map(String::from));
        valid.extend(self.params.keys().cloned());
        let templates = self.run.get_ref().iter().map(|w| (w.get_ref().as_str(), w.span()));
        let env_span = self.run.span();
        let env_templates = self.env.values().map(|v| (v.as_str(), env_span.clone()));
        for (text, span) in templates.chain(env_templates) {
            let tpl = Template::parse(text).map_err(|e| src.error(span.clone(), e, None))?;
            for name in tpl.placeholders() {
                if !valid.iter().any(|v| v == name) {
                    let mut hint = String::new();
                    if let Some(s) = did_you_mean(name, valid.iter().map(String::as_str)) {
                        hint.push_str(&format!("did you mean `{{{s}}}`? "));
                    }
                    hint.push_str(&format!(
                        "placeholders here: {}",
                        valid.iter().map(|v| format!("{{{v}}}")).collect::<Vec<_>>().join(" ")
                    ));
                    hint.push_str(&format!("; for literal braces (shell ${{var}}, awk) write {{{{{name}}}}}"));
                    return Err(src.error(
                        span.clone(),
                        format!("unknown placeholder `{{{name}}}` in stage `{}`", decl.name),
                        Some(hint),
                    ));
                }
                if name == "in" && decl.refs.is_empty() {
                    return Err(src.error(
                        span.clone(),
                        format!("stage `{}` uses `{{in}}` but has no inputs", decl.name),
                        Some("add `from = [\"other_stage\"]`".into()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `params` with the `vary` entries that match this node applied.
    pub fn params_for(&self, node: &Node) -> toml::Table {
        let mut params = self.params.clone();
        for v in &self.vary {
            let matches = v.when.get_ref().iter().all(|(k, want)| {
                let want = match want {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                node.matrix_value(k).is_some_and(|mv| mv.to_string() == want)
            });
            if matches {
                for (k, val) in &v.params {
                    params.insert(k.clone(), val.clone());
                }
            }
        }
        params
    }
}

impl CommandConfig {
    fn lookup(&self, ctx: &ExecContext<'_>, name: &str) -> Option<Vec<String>> {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        match name {
            "out" => Some(vec![path(ctx.out)]),
            "in" => Some(ctx.inputs.iter().map(|i| path(&i.path)).collect()),
            "seed" => Some(vec![ctx.node.seed.to_string()]),
            "device" => Some(vec![ctx.device.label()]),
            "node" => Some(vec![ctx.node.id.clone()]),
            _ => {
                if let Some(stage) = name.strip_prefix("in.") {
                    return Some(ctx.inputs.iter().filter(|i| i.stage == stage).map(|i| path(&i.path)).collect());
                }
                if let Some(v) = ctx.node.matrix_value(name) {
                    return Some(vec![v.to_string()]);
                }
                self.params.get(name).map(param_words)
            }
        }
    }

    pub fn execute(&self, ctx: &ExecContext<'_>) -> Result<Value, StageFailure> {
        let lookup = |name: &str| self.lookup(ctx, name);
        let mut argv = Vec::new();
        for w in &self.run {
            let tpl = Template::parse(w).map_err(StageFailure)?;
            argv.extend(tpl.render(&lookup).map_err(StageFailure)?);
        }
        if argv.first().is_none_or(|p| p.is_empty()) {
            return Err(StageFailure(format!(
                "`run` = {:?} renders to no program for this node (an empty list parameter, or an optional input \
                 that matched nothing); give `run` a fixed first word, e.g. [\"sh\", \"-c\", \"...\"]",
                self.run
            )));
        }
        let log = std::fs::File::create(ctx.log)
            .map_err(|e| StageFailure(format!("cannot create the log {}: {e}", ctx.log.display())))?;
        // A folder of the node's own that outlives a failed or interrupted attempt (until the entry is published):
        // a long command checkpoints there and resumes when run again, e.g. in a requeued Slurm job.
        std::fs::create_dir_all(&ctx.scratch)
            .map_err(|e| StageFailure(format!("cannot create the scratch folder {}: {e}", ctx.scratch.display())))?;
        let mut env: Vec<(OsString, OsString)> = vec![
            ("MPCS_OUT".into(), ctx.out.into()),
            ("MPCS_SCRATCH".into(), ctx.scratch.as_os_str().into()),
            ("MPCS_NODE".into(), (&ctx.node.id).into()),
            ("MPCS_SEED".into(), ctx.node.seed.to_string().into()),
            ("MPCS_DEVICE".into(), ctx.device.label().into()),
        ];
        if !ctx.device.gpus.is_empty() {
            env.push(("CUDA_VISIBLE_DEVICES".into(), ctx.device.gpus.join(",").into()));
        } else if ctx.device.gpus_managed {
            // A CPU node must not grab a GPU that the scheduler is handing to others.
            env.push(("CUDA_VISIBLE_DEVICES".into(), "".into()));
        }
        for (k, v) in &self.env {
            let tpl = Template::parse(v).map_err(StageFailure)?;
            env.push((k.into(), tpl.render_string(&lookup).map_err(StageFailure)?.into()));
        }
        // Its own process group (Ctrl-C reaches mpcs first, and mpcs ends the whole group), killed if mpcs dies.
        let request = SpawnRequest { argv: &argv, cwd: &ctx.exp.dir, env, log: &log };
        let pid = spawn(&request).map_err(|e| StageFailure(format!("cannot start `{}`: {e}", argv[0])))?;
        let token = ctx.processes.register(pid);
        if ctx.cancelled() {
            ctx.processes.signal_all(libc::SIGTERM);
        }
        let status = wait_group(pid);
        ctx.processes.unregister(token);
        let status = status.map_err(|e| StageFailure(format!("cannot wait for `{}`: {e}", argv[0])))?;
        if ctx.cancelled() {
            return Err(StageFailure("interrupted".into()));
        }
        if !status.success() {
            let how = match (status.code(), status.signal()) {
                (Some(c), _) => format!("exited with status {c}"),
                (None, Some(s)) => format!("was killed by signal {s}"),
                _ => "failed".into(),
            };
            return Err(StageFailure(format!("command `{}` {how}{}", argv.join(" "), log_tail(ctx.log))));
        }
        if !holds_a_file(ctx.out) {
            return Err(StageFailure(format!(
                "command `{}` succeeded but wrote no file in {{out}} ({}; empty folders do not count); a node must \
                 produce output{}",
                argv.join(" "),
                ctx.out.display(),
                log_tail(ctx.log)
            )));
        }
        Ok(Value::Null)
    }
}

/// Files named in `run` that live in the experiment's folder — `python train.py`, `sh -c "bash prep.sh {out}"`,
/// `--config cfg.yaml` — with their content digests. Words are split at spaces and shell punctuation; a piece
/// counts when it names a file inside the folder of at most 1 MiB that is a script or a config (executable, or
/// ending in a script or config extension) and is not the target of a redirection (`>> exec.log` is written by
/// the command, not read). What a command reads without naming it, and data, belong in a `source` stage (see the
/// README, "How caching behaves").
fn scripts_named_in(run: &[String], exp: &Experiment) -> BTreeMap<String, String> {
    const MAX_SCRIPT_BYTES: u64 = 1 << 20;
    const EXTENSIONS: &[&str] = &[
        "py", "sh", "bash", "zsh", "fish", "r", "pl", "rb", "jl", "js", "mjs", "lua", "awk", "sed", "m", "yaml", "yml",
        "json", "cfg", "ini", "conf",
    ];
    let Ok(folder) = exp.dir.canonicalize() else { return BTreeMap::new() };
    let mut found = BTreeMap::new();
    for (piece, redirected) in run.iter().flat_map(|w| shell_pieces(w)) {
        if redirected || piece.starts_with('-') || piece.contains(['{', '$', '*', '?']) {
            continue;
        }
        let path = folder.join(&piece);
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        let inside = path.canonicalize().is_ok_and(|real| real.starts_with(&folder));
        let extension = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        let script = {
            use std::os::unix::fs::PermissionsExt;
            meta.permissions().mode() & 0o111 != 0 || EXTENSIONS.contains(&extension.as_str())
        };
        if inside && script && meta.is_file() && meta.len() <= MAX_SCRIPT_BYTES {
            found.insert(piece, crate::cache::fingerprint::param_file_digest(&path));
        }
    }
    found
}

/// The pieces of a word split at spaces and shell punctuation, each with whether a `>` came just before it.
fn shell_pieces(word: &str) -> Vec<(String, bool)> {
    let mut pieces = Vec::new();
    let (mut current, mut redirected) = (String::new(), false);
    for c in word.chars().chain([' ']) {
        if c.is_whitespace() || ";|&<>()'\"`=,".contains(c) {
            if !current.is_empty() {
                pieces.push((std::mem::take(&mut current), redirected));
                redirected = false;
            }
            redirected |= c == '>';
        } else {
            current.push(c);
        }
    }
    pieces
}

/// Whether a file (or a link) is somewhere under `dir`: an output of empty folders is no output.
fn holds_a_file(dir: &std::path::Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    rd.flatten().any(|e| match e.file_type() {
        Ok(t) if t.is_dir() => holds_a_file(&e.path()),
        Ok(_) => true,
        Err(_) => false,
    })
}

/// A params value as placeholder words: scalars as themselves, lists one word per element.
fn param_words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().flat_map(param_words).collect(),
        other => vec![other.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::shell_pieces;

    #[test]
    fn redirection_targets_are_told_apart_from_arguments() {
        let pieces = shell_pieces("python train.py --cfg=a.yaml >> exec.log 2>err.txt; cat x|tee y");
        let shown: Vec<String> = pieces.iter().map(|(p, r)| format!("{p}{}", if *r { "!" } else { "" })).collect();
        assert_eq!(
            shown,
            ["python", "train.py", "--cfg", "a.yaml", "exec.log!", "2", "err.txt!", "cat", "x", "tee", "y"]
        );
    }
}
