//! Experiment files: TOML → a typed, validated [`Experiment`].
//!
//! Every stage table has a few keys common to all kinds (`kind`, `from`, `matrix`, `gpus`, `description`), read
//! here; the rest of the table goes, with its spans, to the kind's parser that the caller passes in
//! (`crate::exec::Project` passes the registry's), which rejects unknown keys. All errors point at file, line and column.

mod source;
pub mod template;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use source::SourceText;
use source::{Override, OVERRIDE_TABLE};

use crate::error::{did_you_mean, Error, Result};
use template::Template;

/// Keys every stage may have, whatever its kind.
pub const COMMON_KEYS: &[&str] = &["kind", "from", "matrix", "gpus", "description"];

/// A parsed, validated experiment.
pub struct Experiment {
    /// The experiment file as given on the command line.
    pub path: PathBuf,
    /// Absolute directory of the file: relative paths in the file are relative to it.
    pub dir: PathBuf,
    pub name: String,
    pub title: Option<String>,
    /// Free text from `[experiment] description`.
    pub description: Option<String>,
    /// Experiment seed; every node's seed is derived from it and the node id.
    pub seed: u64,
    pub stages: Vec<StageDecl>,
    pub source: SourceText,
    /// The `[executor]` table, as written: where the experiment runs by default (`kind = "slurm"`) and the
    /// executor's settings (`[executor.slurm]`); the command line and a profile file override it.
    pub executor: Option<toml::Table>,
    /// `[cache] remote`: the remote cache this experiment shares its entries through (`--remote` wins).
    pub remote: Option<String>,
}

/// The `[cache]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheTable {
    remote: Option<String>,
}

/// One `[stage.NAME]` table.
pub struct StageDecl {
    pub name: String,
    /// The stage kind's name (checked against the kinds the caller knows).
    pub kind: String,
    /// The kind's own keys written in the table (for telling written values from defaults).
    pub written: Vec<String>,
    /// Those keys with their values (after `--set`), for checks that look across stages: a training stage checks
    /// its fold against the `folds` of its split; a message follows a file back to a source's `path`.
    pub values: toml::Table,
    pub refs: Vec<Reference>,
    /// Matrix keys in declaration order with their values.
    pub matrix: Vec<(String, Vec<MatrixValue>)>,
    pub gpus: u32,
    pub description: Option<String>,
    /// Span of the stage's name in its table header.
    pub span: Range<usize>,
}

impl StageDecl {
    pub fn matrix_keys(&self) -> impl Iterator<Item = &str> {
        self.matrix.iter().map(|(k, _)| k.as_str())
    }
    pub fn has_matrix_key(&self, key: &str) -> bool {
        self.matrix.iter().any(|(k, _)| k == key)
    }
}

/// A reference in `from`: `stage` or `stage[key=value, key={own_key}]`.
pub struct Reference {
    pub stage: String,
    /// Written with a trailing `?`: may match no node (e.g. fine-tuning from ImageNet has no pretrain input).
    pub optional: bool,
    pub select: Vec<(String, Template)>,
    pub text: String,
    pub span: Range<usize>,
}

/// One value of a matrix axis.
#[derive(Clone, Debug, PartialEq)]
pub enum MatrixValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl MatrixValue {
    pub fn to_toml(&self) -> toml::Value {
        match self {
            MatrixValue::Int(i) => toml::Value::Integer(*i),
            MatrixValue::Float(f) => toml::Value::Float(*f),
            MatrixValue::Bool(b) => toml::Value::Boolean(*b),
            MatrixValue::Str(s) => toml::Value::String(s.clone()),
        }
    }
}

impl fmt::Display for MatrixValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MatrixValue::Int(i) => write!(f, "{i}"),
            MatrixValue::Float(x) => write!(f, "{x}"),
            MatrixValue::Bool(b) => write!(f, "{b}"),
            MatrixValue::Str(s) => f.write_str(s),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: Option<String>,
    title: Option<String>,
    seed: Option<u64>,
    description: Option<String>,
}

impl Experiment {
    /// Reads and validates `path`, applying `--set KEY.PATH=VALUE` overrides first.
    /// `kinds` parses a stage's own keys (everything but the common keys) by kind name; the parsed specs come
    /// back beside the experiment, one per stage.
    pub fn load<S>(path: &Path, sets: &[String], kinds: &mut dyn BodyParser<S>) -> Result<(Experiment, Vec<S>)> {
        let (source, overrides) = SourceText::load(path, sets)?;
        Self::parse(source, overrides, kinds)
    }

    /// Parses experiment text (for tests and generated experiments).
    pub fn from_str<S>(
        path: &Path,
        text: &str,
        sets: &[String],
        kinds: &mut dyn BodyParser<S>,
    ) -> Result<(Experiment, Vec<S>)> {
        let (source, overrides) = SourceText::from_parts(path, text.to_string(), sets)?;
        Self::parse(source, overrides, kinds)
    }

    fn parse<S>(
        source: SourceText,
        overrides: Vec<Override>,
        kinds: &mut dyn BodyParser<S>,
    ) -> Result<(Experiment, Vec<S>)> {
        let text: &str = &source.text;
        let mut root = DeTable::parse(text).map_err(|e| source.toml_error(&e, "(not valid TOML)", &[]))?.into_inner();
        apply_overrides(&mut root, &overrides)?;

        for (key, _) in root.iter() {
            let k: &str = key.get_ref();
            if !["experiment", "stage", "executor", "cache"].contains(&k) {
                let what = "an experiment file has [experiment], [stage.NAME], [executor] and [cache] tables";
                let hint = did_you_mean(k, ["experiment", "stage", "executor", "cache"])
                    .map(|s| format!("did you mean `{s}`? {what}"))
                    .or_else(|| Some(what.into()));
                return Err(source.error(key.span(), format!("unknown top-level key `{k}`"), hint));
            }
        }

        let header = match root.remove("experiment") {
            Some(v) => Header::deserialize(toml::de::ValueDeserializer::from(v))
                .map_err(|e| source.toml_error(&e, "in [experiment]", &[]))?,
            None => Header { name: None, title: None, seed: None, description: None },
        };

        let executor = match root.remove("executor") {
            Some(v) => Some(
                toml::Table::deserialize(toml::de::ValueDeserializer::from(v))
                    .map_err(|e| source.toml_error(&e, "in [executor]", &[]))?,
            ),
            None => None,
        };

        let remote = match root.remove("cache") {
            Some(v) => {
                CacheTable::deserialize(toml::de::ValueDeserializer::from(v))
                    .map_err(|e| {
                        source.toml_error(&e, "in [cache] (it has one key: remote = \"s3://bucket/prefix\")", &[])
                    })?
                    .remote
            }
            None => None,
        };

        let stage_tables = match root.remove("stage") {
            Some(v) => {
                let span = v.span();
                match v.into_inner() {
                    DeValue::Table(t) => t,
                    _ => return Err(source.error(span, "`stage` must be a table of stages: [stage.NAME]", None)),
                }
            }
            None => DeTable::new(),
        };
        if stage_tables.is_empty() {
            return Err(source.error(
                0..0,
                "the experiment declares no stages",
                Some("add at least one [stage.NAME] table with a `kind`".into()),
            ));
        }

        let mut stages = Vec::new();
        let mut specs = Vec::new();
        for (name, value) in stage_tables {
            let (decl, spec) = parse_stage(&source, name, value, kinds)?;
            stages.push(decl);
            specs.push(spec);
        }
        validate_references(&source, &stages)?;
        check_cycles(&source, &stages)?;

        let dir = source.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let dir = dir.canonicalize().map_err(|e| Error::io("cannot resolve the directory of", &source.path, e))?;
        let name = header.name.unwrap_or_else(|| {
            source.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "experiment".into())
        });
        let exp = Experiment {
            path: source.path.clone(),
            dir,
            name,
            title: header.title,
            description: header.description,
            seed: header.seed.unwrap_or(0),
            stages,
            source,
            executor,
            remote,
        };
        Ok((exp, specs))
    }

    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Resolves a path written in the experiment file (relative to the file's directory).
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }
}

fn apply_overrides(root: &mut DeTable<'_>, overrides: &[Override]) -> Result<()> {
    if overrides.is_empty() {
        return Ok(());
    }
    let Some(table) = root.remove(OVERRIDE_TABLE) else {
        return Err(Error::internal("the --set table went missing while parsing"));
    };
    let DeValue::Table(mut values) = table.into_inner() else {
        return Err(Error::internal("the --set table is not a table"));
    };
    for (i, ov) in overrides.iter().enumerate() {
        let value =
            values.remove(format!("v{i}").as_str()).ok_or_else(|| Error::internal("a --set value went missing"))?;
        let mut table: &mut DeTable<'_> = root;
        for (depth, part) in ov.path.iter().enumerate() {
            if depth + 1 == ov.path.len() {
                table.insert(Spanned::new(value.span(), part.clone().into()), value);
                break;
            }
            let entry = table
                .entry(Spanned::new(value.span(), part.clone().into()))
                .or_insert_with(|| Spanned::new(0..0, DeValue::Table(DeTable::new())));
            match entry.get_mut() {
                DeValue::Table(t) => table = t,
                _ => {
                    return Err(Error::user(format!(
                        "--set {}: `{}` is not a table, so `{}` cannot be set inside it",
                        ov.arg,
                        ov.path[..=depth].join("."),
                        ov.path[depth + 1]
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Parses the kind-specific keys of a stage table (the engine's registry).
pub trait BodyParser<S> {
    /// Every kind's name.
    fn kinds(&self) -> Vec<&'static str>;
    /// The spec of a stage of kind `kind` from its own keys.
    fn parse(&mut self, kind: &str, body: Spanned<DeValue<'_>>) -> Result<S, toml::de::Error>;
}

fn parse_stage<S>(
    source: &SourceText,
    name: Spanned<std::borrow::Cow<'_, str>>,
    value: Spanned<DeValue<'_>>,
    parser: &mut dyn BodyParser<S>,
) -> Result<(StageDecl, S)> {
    let kinds = parser.kinds();
    let name_span = name.span();
    let name = name.into_inner().into_owned();
    if !is_identifier(&name) {
        return Err(source.error(name_span, format!("stage name `{name}` must be letters, digits, `_` or `-`"), None));
    }
    let table_span = value.span();
    let mut table = match value.into_inner() {
        DeValue::Table(t) => t,
        _ => return Err(source.error(table_span, format!("stage `{name}` must be a table"), None)),
    };

    let kind = match table.remove("kind") {
        Some(v) => {
            let span = v.span();
            match v.into_inner() {
                DeValue::String(s) => Spanned::new(span, s.into_owned()),
                _ => return Err(source.error(span, format!("`kind` of stage `{name}` must be a string"), None)),
            }
        }
        None => {
            return Err(source.error(
                name_span,
                format!("stage `{name}` has no `kind`"),
                Some(format!("add kind = \"...\"; known kinds: {}", kinds.join(", "))),
            ))
        }
    };
    if !kinds.contains(&kind.get_ref().as_str()) {
        let mut hint = String::new();
        if let Some(s) = did_you_mean(kind.get_ref(), kinds.iter().copied()) {
            hint.push_str(&format!("did you mean `{s}`? "));
        }
        hint.push_str(&format!("known kinds: {}", kinds.join(", ")));
        return Err(source.error(kind.span(), format!("unknown stage kind `{}`", kind.get_ref()), Some(hint)));
    }

    let refs = match table.remove("from") {
        None => Vec::new(),
        Some(v) => parse_refs(source, &name, v)?,
    };
    let matrix = match table.remove("matrix") {
        None => Vec::new(),
        Some(v) => parse_matrix(source, &name, v)?,
    };
    let gpus = match table.remove("gpus") {
        None => 0,
        Some(v) => {
            let span = v.span();
            u32::deserialize(toml::de::ValueDeserializer::from(v)).map_err(|_| {
                source.error(span, format!("`gpus` of stage `{name}` must be a non-negative integer"), None)
            })?
        }
    };
    let description = match table.remove("description") {
        None => None,
        Some(v) => Some(
            String::deserialize(toml::de::ValueDeserializer::from(v))
                .map_err(|e| source.toml_error(&e, &format!("in `description` of stage `{name}`"), &[]))?,
        ),
    };

    let written: Vec<String> = table.keys().map(|k| k.get_ref().to_string()).collect();
    let context = format!("in stage `{name}` (kind `{}`)", kind.get_ref());
    let body = Spanned::new(table_span, DeValue::Table(table));
    // Any TOML table converts; the kind's parser below reports what is wrong with it.
    let values = toml::Table::deserialize(toml::de::ValueDeserializer::from(body.clone())).unwrap_or_default();
    let spec = parser.parse(kind.get_ref(), body).map_err(|e| source.toml_error(&e, &context, COMMON_KEYS))?;
    let decl =
        StageDecl { name, kind: kind.into_inner(), written, values, refs, matrix, gpus, description, span: name_span };
    Ok((decl, spec))
}

fn parse_refs(source: &SourceText, stage: &str, v: Spanned<DeValue<'_>>) -> Result<Vec<Reference>> {
    let span = v.span();
    let items: Vec<Spanned<String>> = match <Spanned<String>>::deserialize(toml::de::ValueDeserializer::from(v.clone()))
    {
        Ok(s) => vec![s],
        Err(_) => Vec::<Spanned<String>>::deserialize(toml::de::ValueDeserializer::from(v)).map_err(|_| {
            source.error(
                span.clone(),
                format!("`from` of stage `{stage}` must be a stage name or a list of them"),
                Some("e.g. from = \"folds\" or from = [\"folds\", \"pretrain[fold={fold}]\"]".into()),
            )
        })?,
    };
    items.into_iter().map(|s| parse_reference(source, s)).collect()
}

/// Parses `name` or `name[key=value, key={own}]`.
fn parse_reference(source: &SourceText, s: Spanned<String>) -> Result<Reference> {
    let span = s.span();
    let text = s.into_inner();
    let bad = |why: &str| {
        source.error(
            span.clone(),
            format!("malformed reference `{text}`: {why}"),
            Some("write `stage` or `stage[key=value, key={matrix_key}]`".into()),
        )
    };
    let trimmed = text.trim();
    let (trimmed, optional) = match trimmed.strip_suffix('?') {
        Some(t) => (t.trim_end(), true),
        None => (trimmed, false),
    };
    let (stage, select) = match trimmed.find('[') {
        None => (trimmed.to_string(), Vec::new()),
        Some(open) => {
            let Some(inner) = trimmed[open + 1..].strip_suffix(']') else {
                return Err(bad("missing `]` at the end"));
            };
            let mut select = Vec::new();
            for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((k, v)) = part.split_once('=') else {
                    return Err(bad(&format!("`{part}` is not key=value")));
                };
                let tpl = Template::parse(v.trim()).map_err(|e| bad(&e))?;
                select.push((k.trim().to_string(), tpl));
            }
            (trimmed[..open].trim().to_string(), select)
        }
    };
    if !is_identifier(&stage) {
        return Err(bad("the stage name must be letters, digits, `_` or `-`"));
    }
    Ok(Reference { stage, optional, select, text, span })
}

fn parse_matrix(source: &SourceText, stage: &str, v: Spanned<DeValue<'_>>) -> Result<Vec<(String, Vec<MatrixValue>)>> {
    let span = v.span();
    let DeValue::Table(t) = v.into_inner() else {
        return Err(source.error(
            span,
            format!("`matrix` of stage `{stage}` must be a table of lists"),
            Some("e.g. matrix = { fold = [0, 1, 2], pair = [\"FP\", \"OP\"] }".into()),
        ));
    };
    let mut out = Vec::new();
    for (key, values) in t {
        let kspan = key.span();
        let key = key.into_inner().into_owned();
        if !is_identifier(&key) || key == "out" || key == "in" || key == "seed" || key == "device" {
            return Err(source.error(
                kspan,
                format!("matrix key `{key}` of stage `{stage}` is not allowed"),
                Some("use letters, digits and `_`; `out`, `in`, `seed` and `device` are reserved".into()),
            ));
        }
        let vspan = values.span();
        let list = Vec::<toml::Value>::deserialize(toml::de::ValueDeserializer::from(values)).map_err(|_| {
            source.error(vspan.clone(), format!("matrix axis `{key}` of stage `{stage}` must be a list"), None)
        })?;
        if list.is_empty() {
            return Err(source.error(vspan, format!("matrix axis `{key}` of stage `{stage}` is empty"), None));
        }
        let mut seen = HashSet::new();
        let mut axis = Vec::new();
        for item in list {
            let mv = match item {
                toml::Value::Integer(i) => MatrixValue::Int(i),
                toml::Value::Float(f) if f.is_finite() => MatrixValue::Float(f),
                toml::Value::Boolean(b) => MatrixValue::Bool(b),
                toml::Value::String(s) if !s.is_empty() && !s.contains([',', '[', ']', '=', '{', '}']) => {
                    MatrixValue::Str(s)
                }
                other => {
                    return Err(source.error(
                        vspan,
                        format!("matrix axis `{key}` of stage `{stage}` has an unusable value {other}"),
                        Some("use integers, finite floats, booleans or non-empty strings without , [ ] = { }".into()),
                    ))
                }
            };
            if !seen.insert(mv.to_string()) {
                return Err(source.error(
                    vspan,
                    format!("matrix axis `{key}` of stage `{stage}` repeats `{mv}`"),
                    None,
                ));
            }
            axis.push(mv);
        }
        out.push((key, axis));
    }
    Ok(out)
}

fn validate_references(source: &SourceText, stages: &[StageDecl]) -> Result<()> {
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    for stage in stages {
        let mut seen = HashSet::new();
        for r in &stage.refs {
            let Some(target) = stages.iter().find(|s| s.name == r.stage) else {
                let hint = match did_you_mean(&r.stage, names.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`? stages: {}", names.join(", ")),
                    None => format!("stages: {}", names.join(", ")),
                };
                return Err(source.error(
                    r.span.clone(),
                    format!("stage `{}` refers to `{}`, which is not a stage of this experiment", stage.name, r.stage),
                    Some(hint),
                ));
            };
            if !seen.insert(r.text.trim().to_string()) {
                return Err(source.error(
                    r.span.clone(),
                    format!("stage `{}` lists `{}` twice in `from`", stage.name, r.text),
                    None,
                ));
            }
            for (key, tpl) in &r.select {
                if !target.has_matrix_key(key) {
                    let keys: Vec<&str> = target.matrix_keys().collect();
                    let hint = if keys.is_empty() {
                        format!("`{}` has no matrix; refer to it as `{}`", target.name, target.name)
                    } else {
                        let mut h = String::new();
                        if let Some(s) = did_you_mean(key, keys.iter().copied()) {
                            h.push_str(&format!("did you mean `{s}`? "));
                        }
                        h.push_str(&format!("its matrix keys: {}", keys.join(", ")));
                        h
                    };
                    return Err(source.error(
                        r.span.clone(),
                        format!(
                            "reference `{}` selects by `{key}`, which is not a matrix key of `{}`",
                            r.text, target.name
                        ),
                        Some(hint),
                    ));
                }
                for name in tpl.placeholders() {
                    if !stage.has_matrix_key(name) {
                        let keys: Vec<&str> = stage.matrix_keys().collect();
                        return Err(source.error(
                            r.span.clone(),
                            format!(
                                "reference `{}` uses `{{{name}}}`, but `{name}` is not a matrix key of stage `{}`",
                                r.text, stage.name
                            ),
                            Some(if keys.is_empty() {
                                format!("stage `{}` has no matrix", stage.name)
                            } else {
                                format!("its matrix keys: {}", keys.join(", "))
                            }),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_cycles(source: &SourceText, stages: &[StageDecl]) -> Result<()> {
    use petgraph::graph::DiGraph;
    let mut g = DiGraph::<usize, ()>::new();
    let idx: Vec<_> = (0..stages.len()).map(|i| g.add_node(i)).collect();
    let by_name: BTreeMap<&str, usize> = stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    for (i, s) in stages.iter().enumerate() {
        for r in &s.refs {
            g.add_edge(idx[by_name[r.stage.as_str()]], idx[i], ());
        }
    }
    for scc in petgraph::algo::tarjan_scc(&g) {
        let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
        if scc.len() > 1 || self_loop {
            let mut members: Vec<usize> = scc.iter().map(|n| g[*n]).collect();
            members.sort();
            // Walk the cycle from its first member so the message reads `a → b → a`.
            let start = members[0];
            let mut path = vec![stages[start].name.as_str()];
            let mut cur = start;
            loop {
                let next = stages
                    .iter()
                    .enumerate()
                    .find(|(j, t)| members.contains(j) && t.refs.iter().any(|r| r.stage == stages[cur].name))
                    .map(|(j, _)| j)
                    .unwrap_or(start);
                path.push(stages[next].name.as_str());
                if next == start || path.len() > members.len() + 1 {
                    break;
                }
                cur = next;
            }
            return Err(source.error(
                stages[start].span.clone(),
                format!("the stages form a cycle: {}", path.join(" → ")),
                Some("a stage cannot depend on itself, directly or through others; remove one `from` entry".into()),
            ));
        }
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
