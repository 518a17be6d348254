//! Progress events. The scheduler emits them through [`Reporter`]; the CLI renders them (a live bar per
//! running node and an overall bar on a terminal, plain `tracing` lines otherwise).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Executed,
    Cached,
    Failed,
    /// Not run because an upstream node failed.
    Skipped,
    /// Stopped or never started because the run was interrupted (Ctrl-C).
    Interrupted,
    /// Fetched from the remote cache instead of run.
    Pulled,
}

pub enum Event<'a> {
    /// Once the sources are fingerprinted: how many nodes the run has.
    Planned {
        total: usize,
    },
    Started {
        node: &'a str,
        device: &'a str,
    },
    Progress {
        node: &'a str,
        done: u64,
        total: Option<u64>,
        message: &'a str,
    },
    Finished {
        node: &'a str,
        outcome: Outcome,
        seconds: f64,
    },
    Notice(&'a str),
}

pub trait Reporter: Sync {
    fn event(&self, event: Event<'_>);
}

/// Reports nothing (tests, `--json` with `--quiet`).
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _: Event<'_>) {}
}

/// Renders events on stderr.
pub struct Console {
    bars: Option<Bars>,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    running: Mutex<HashMap<String, ProgressBar>>,
    /// executed, cached, failed, skipped, interrupted, pulled so far
    counts: Mutex<[usize; 6]>,
}

impl Console {
    /// Live bars when stderr is a terminal (and `plain` is false), log lines otherwise.
    pub fn new(plain: bool) -> Console {
        use std::io::IsTerminal;
        if plain || !std::io::stderr().is_terminal() {
            return Console { bars: None };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{prefix:>8.bold} [{bar:30}] {pos}/{len} nodes {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        overall.set_prefix("mpcs");
        Console { bars: Some(Bars { multi, overall, running: Mutex::new(HashMap::new()), counts: Mutex::new([0; 6]) }) }
    }
}

impl Reporter for Console {
    fn event(&self, event: Event<'_>) {
        let Some(b) = &self.bars else {
            match event {
                Event::Planned { total } => tracing::info!("{total} nodes"),
                Event::Started { node, device } => tracing::info!("start  {node} on {device}"),
                Event::Progress { .. } => {}
                Event::Finished { node, outcome, seconds } => match outcome {
                    Outcome::Executed => tracing::info!("done   {node} ({seconds:.2} s)"),
                    Outcome::Cached => tracing::debug!("cached {node}"),
                    Outcome::Failed => tracing::error!("FAILED {node} ({seconds:.2} s)"),
                    Outcome::Skipped => tracing::warn!("skip   {node} (an upstream node failed)"),
                    Outcome::Interrupted => tracing::warn!("stop   {node} (interrupted)"),
                    Outcome::Pulled => tracing::info!("pulled {node} from the remote cache ({seconds:.2} s)"),
                },
                Event::Notice(msg) => tracing::warn!("{msg}"),
            }
            return;
        };
        match event {
            Event::Planned { total } => {
                b.overall.set_length(total as u64);
            }
            Event::Started { node, device } => {
                let bar = b.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("  {spinner} {prefix} {elapsed:>4} {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(format!("{node} [{device}]"));
                bar.enable_steady_tick(Duration::from_millis(120));
                if let Ok(mut r) = b.running.lock() {
                    r.insert(node.to_string(), bar);
                }
            }
            Event::Progress { node, done, total, message } => {
                if let Ok(r) = b.running.lock() {
                    if let Some(bar) = r.get(node) {
                        let pos = match total {
                            Some(t) => format!("{done}/{t} "),
                            None => String::new(),
                        };
                        bar.set_message(format!("{pos}{message}"));
                    }
                }
            }
            Event::Finished { node, outcome, seconds } => {
                if let Ok(mut r) = b.running.lock() {
                    if let Some(bar) = r.remove(node) {
                        bar.finish_and_clear();
                        b.multi.remove(&bar);
                    }
                }
                if outcome == Outcome::Failed {
                    let _ = b.multi.println(format!("FAILED {node} ({seconds:.1} s)"));
                }
                b.overall.inc(1);
                if let Ok(mut c) = b.counts.lock() {
                    c[outcome as usize] += 1;
                    let failed = if c[2] > 0 { format!(", {} failed, {} skipped", c[2], c[3]) } else { String::new() };
                    let pulled = if c[5] > 0 { format!(", {} pulled", c[5]) } else { String::new() };
                    b.overall.set_message(format!("{} run, {} cached{pulled}{failed}", c[0], c[1]));
                }
            }
            Event::Notice(msg) => {
                let _ = b.multi.println(format!("note: {msg}"));
            }
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(b) = &self.bars {
            b.overall.finish_and_clear();
        }
    }
}
