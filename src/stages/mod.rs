//! The built-in stage kinds, one file each, every one a [`StageKind`](crate::exec::StageKind). Adding a kind:
//! a file here with its spec, config and the trait, and one line in [`builtin`].

pub mod command;
pub mod download;
pub mod origin;
pub mod patchify;
pub mod pretrain;
pub mod split;
pub mod stain;
pub mod synthetic;
pub mod table;
pub mod train;

use std::path::Path;

use crate::error::Error;
use crate::exec::{ExecContext, Registry, StageFailure};
use crate::experiment::{Experiment, StageDecl};

/// Every built-in kind (the engine adds `source`).
pub fn builtin() -> Registry {
    Registry::default()
        .with::<command::Command>()
        .with::<download::Download>()
        .with::<synthetic::Synthetic>()
        .with::<stain::StainNormalise>()
        .with::<patchify::Patchify>()
        .with::<split::Split>()
        .with::<pretrain::Pretrain>()
        .with::<train::Finetune>()
        .with::<train::LinearEval>()
        .with::<train::Evaluate>()
        .with::<table::Table>()
}

/// An error about stage `decl`, pointing at its name in the file.
pub(crate) fn stage_error(exp: &Experiment, decl: &StageDecl, message: impl std::fmt::Display) -> Error {
    exp.source.error(decl.span.clone(), format!("stage `{}`: {message}", decl.name), None)
}

/// The single input directory of a node, or a failure naming the stage kind that needs exactly one.
pub fn single_input<'a>(ctx: &'a ExecContext<'_>, kind: &str) -> Result<&'a Path, StageFailure> {
    match ctx.inputs.as_slice() {
        [one] => Ok(&one.path),
        other => Err(StageFailure(format!(
            "a `{kind}` node takes exactly one input, but `{}` has {}; narrow `from` with a selector",
            ctx.node.id,
            other.len()
        ))),
    }
}

/// Appends a line to the node's log (built-in stages log what they did, like commands do).
pub fn log_line(ctx: &ExecContext<'_>, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(ctx.log) {
        let _ = writeln!(f, "{line}");
    }
}

/// Writes one of a node's output files.
pub(crate) fn write_output(ctx: &ExecContext<'_>, name: &str, text: impl AsRef<[u8]>) -> Result<(), StageFailure> {
    let path = ctx.out.join(name);
    std::fs::write(&path, text).map_err(|e| StageFailure(format!("cannot write {}: {e}", path.display())))
}

/// Deserialises a value through its `FromStr` (names with aliases, such as datasets and architectures), so
/// a bad word is reported at its place in the file with the parser's own message.
pub(crate) fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}
