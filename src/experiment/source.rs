//! The text an experiment was parsed from, and errors that point into it (file, line, column, the offending
//! line with a caret, and a hint).
//!
//! `--set` overrides are appended to the parsed text as an extra table, so their values carry real spans too:
//! a position past the end of the file maps back to the `--set` argument it came from.

use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Name of the table `--set` values are parsed under (removed again before validation).
pub(crate) const OVERRIDE_TABLE: &str = "__mpcs_set__";

pub struct SourceText {
    pub path: PathBuf,
    /// The file's text followed by the `--set` table.
    pub text: String,
    /// Length of the file's own text; positions at or past it belong to `--set` arguments.
    file_len: usize,
    /// (start offset in `text`, the original `--set` argument) for each override.
    overrides: Vec<(usize, String)>,
}

/// One `--set key.path=value` override, its value as TOML text.
pub struct Override {
    pub path: Vec<String>,
    pub arg: String,
}

impl SourceText {
    /// Reads `path` and appends the overrides as `[__mpcs_set__] v0 = <value> ...`.
    pub fn load(path: &Path, sets: &[String]) -> Result<(SourceText, Vec<Override>), Error> {
        let file_text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::user(format!(
                "experiment file {} does not exist; give the path of a .toml experiment (see experiments/)",
                path.display()
            )),
            std::io::ErrorKind::InvalidData => Error::user(format!("{} is not UTF-8 text", path.display())),
            _ => Error::io("cannot read experiment file", path, e),
        })?;
        Self::from_parts(path, file_text, sets)
    }

    pub fn from_parts(path: &Path, file_text: String, sets: &[String]) -> Result<(SourceText, Vec<Override>), Error> {
        let file_len = file_text.len();
        let mut text = file_text;
        let mut overrides = Vec::new();
        let mut parsed = Vec::new();
        if !sets.is_empty() {
            text.push_str(&format!("\n[{OVERRIDE_TABLE}]\n"));
        }
        for (i, arg) in sets.iter().enumerate() {
            let Some((key, value)) = arg.split_once('=') else {
                return Err(Error::user(format!(
                    "--set {arg}: expected KEY.PATH=VALUE, e.g. --set stage.finetune.params.lr=0.01"
                )));
            };
            let path: Vec<String> = key.trim().split('.').map(|s| s.trim().to_string()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(Error::user(format!("--set {arg}: the key path `{key}` has an empty part")));
            }
            // A value that is not valid TOML on its own (a bare path, a word) is taken as a string.
            let value = value.trim();
            let toml_value =
                if toml::de::DeValue::parse(value).is_ok() { value.to_string() } else { toml_string_literal(value) };
            text.push_str(&format!("v{i} = "));
            overrides.push((text.len(), arg.clone()));
            text.push_str(&toml_value);
            text.push('\n');
            parsed.push(Override { path, arg: arg.clone() });
        }
        Ok((SourceText { path: path.to_path_buf(), text, file_len, overrides }, parsed))
    }

    /// An error located at `span`, with an optional hint line.
    pub fn error(&self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) -> Error {
        let message = message.into();
        let mut out = format!("error: {message}\n");
        if span.start >= self.file_len && !self.overrides.is_empty() {
            let arg = self
                .overrides
                .iter()
                .rev()
                .find(|(start, _)| *start <= span.start)
                .map(|(_, a)| a.as_str())
                .unwrap_or(self.overrides[0].1.as_str());
            out.push_str(&format!("  --> command line: --set {arg}\n"));
        } else {
            let start = span.start.min(self.file_len);
            let (line_no, col, line) = line_col(&self.text[..self.file_len], start);
            let width = span.end.saturating_sub(span.start).clamp(1, line.len().saturating_sub(col - 1).max(1));
            let gutter = line_no.to_string().len();
            out.push_str(&format!("  --> {}:{line_no}:{col}\n", self.path.display()));
            out.push_str(&format!("{:gutter$} |\n", ""));
            out.push_str(&format!("{line_no} | {line}\n"));
            out.push_str(&format!("{:gutter$} | {}{}\n", "", " ".repeat(col - 1), "^".repeat(width)));
        }
        if let Some(h) = hint {
            out.push_str(&format!("  = help: {h}\n"));
        }
        Error::user(out.trim_end().to_string())
    }

    /// Converts a toml parse/deserialize error into a located error.
    /// `extra_keys` are valid keys handled outside serde (listed in the hint for an unknown key).
    pub fn toml_error(&self, err: &toml::de::Error, context: &str, extra_keys: &[&str]) -> Error {
        let span = err.span().unwrap_or(0..0);
        let (message, hint) = explain_serde_message(err.message(), context, extra_keys);
        self.error(span, message, hint)
    }
}

/// Turns serde's messages into ours: "unknown field `lrr`, expected one of `a`, `b`" becomes an unknown-key
/// message with a "did you mean" and the valid keys.
fn explain_serde_message(msg: &str, context: &str, extra_keys: &[&str]) -> (String, Option<String>) {
    let msg = msg.trim();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let mut choices: Vec<&str> = extra_keys.to_vec();
            choices.extend(expected.split('`').skip(1).step_by(2));
            let suggestion = crate::error::did_you_mean(field, choices.iter().copied());
            let mut hint = String::new();
            if let Some(s) = suggestion {
                hint.push_str(&format!("did you mean `{s}`? "));
            }
            if !choices.is_empty() {
                hint.push_str(&format!("valid keys: {}", choices.join(", ")));
            }
            return (format!("unknown key `{field}` {context}"), (!hint.is_empty()).then_some(hint));
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        return (format!("missing key `{field}` {context}"), None);
    }
    if msg.starts_with("invalid type") {
        return (format!("wrong type {context}: {msg}"), None);
    }
    // A word that is not one of a kind's choices ("unknown variant `x`, expected `a` or `b`").
    if msg.starts_with("unknown variant") {
        return (format!("wrong value {context}: {msg}"), None);
    }
    (format!("{msg} {context}"), None)
}

fn line_col(text: &str, pos: usize) -> (usize, usize, &str) {
    let before = &text[..pos];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    let col = text[line_start..pos].chars().count() + 1;
    (line_no, col, text[line_start..line_end].trim_end_matches('\r'))
}

/// A TOML basic string literal for `s`.
pub(crate) fn toml_string_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_and_column() {
        let (src, _) = SourceText::from_parts(Path::new("x.toml"), "a = 1\nbb = 2\n".into(), &[]).unwrap();
        let e = src.error(6..8, "bad key", Some("try again".into()));
        assert!(e.message.contains("x.toml:2:1"), "{}", e.message);
        assert!(e.message.contains("2 | bb = 2"), "{}", e.message);
        assert!(e.message.contains("^^"), "{}", e.message);
        assert!(e.message.contains("help: try again"), "{}", e.message);
    }

    #[test]
    fn override_positions_map_to_the_argument() {
        let (src, ov) =
            SourceText::from_parts(Path::new("x.toml"), "a = 1\n".into(), &["stage.s.path=data/raw".into()]).unwrap();
        assert_eq!(ov[0].path, vec!["stage", "s", "path"]);
        assert!(src.text.contains("v0 = \"data/raw\""), "{}", src.text);
        let pos = src.text.find("\"data").unwrap();
        let e = src.error(pos..pos + 3, "bad", None);
        assert!(e.message.contains("--set stage.s.path=data/raw"), "{}", e.message);
    }
}
