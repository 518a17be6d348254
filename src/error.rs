//! Error classes and the exit codes they map to.
//!
//! Errors are classed the way Bazel/Buck2 do it: the class says whose problem it is (the user's input, the
//! environment, or a bug in mpcs) and picks the process exit code, so scripts can tell them apart.

use std::fmt;

/// Exit codes of the `mpcs` binary (documented in the README).
pub mod exit {
    /// Everything asked for succeeded.
    pub const OK: i32 = 0;
    /// The run finished but at least one node failed (its descendants were skipped).
    pub const NODE_FAILED: i32 = 1;
    /// The experiment file or the command line is wrong: fix the input.
    pub const USER: i32 = 2;
    /// The environment is wrong: a missing path, a full disk, a permission, a corrupt cache entry.
    pub const ENVIRONMENT: i32 = 3;
    /// A bug in mpcs.
    pub const INTERNAL: i32 = 4;
    /// Interrupted by Ctrl-C / SIGTERM: nothing half-done was published.
    pub const INTERRUPTED: i32 = 130;
}

/// Whose problem an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    User,
    Environment,
    Internal,
}

/// An error with a class. The message is complete and says what to do; `Display` prints it as is.
#[derive(Debug)]
pub struct Error {
    pub class: Class,
    pub message: String,
}

impl Error {
    pub fn user(message: impl Into<String>) -> Self {
        Error { class: Class::User, message: message.into() }
    }
    pub fn env(message: impl Into<String>) -> Self {
        Error { class: Class::Environment, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error { class: Class::Internal, message: message.into() }
    }
    /// An I/O error on `path`, classed as environment.
    pub fn io(what: &str, path: &std::path::Path, err: std::io::Error) -> Self {
        Error::env(format!("{what} {}: {err}", path.display()))
    }
    pub fn exit_code(&self) -> i32 {
        match self.class {
            Class::User => exit::USER,
            Class::Environment => exit::ENVIRONMENT,
            Class::Internal => exit::INTERNAL,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The closest candidate to `word` by edit distance, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(word, c);
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let (d, c) = best?;
    // Allow roughly one edit per three characters, at least one.
    (d <= (word.chars().count().max(c.chars().count()) / 3).max(1)).then_some(c)
}

/// Edit distance counting a swap of two neighbours as one edit (typos like `rwa` for `raw`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        assert_eq!(did_you_mean("comand", ["source", "command"]), Some("command"));
        assert_eq!(did_you_mean("lrr", ["lr", "epochs"]), Some("lr"));
        assert_eq!(did_you_mean("rwa", ["raw", "b"]), Some("raw"));
        assert_eq!(did_you_mean("zzzzzz", ["source", "command"]), None);
    }
}
