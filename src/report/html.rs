//! One self-contained HTML report: inline CSS, PNG figures as base64 data URIs, no scripts and no external
//! requests, so the file can be mailed, archived or opened offline and always shows the same thing.
//!
//! ```text
//! let report = Report {
//!     title: "MPCS on BreakHis".into(),
//!     intro: "Five folds, 40X…400X.".into(),
//!     sections: vec![Section {
//!         heading: "Accuracy".into(),
//!         text: "Image-level accuracy (%), mean ± std over folds.".into(),
//!         tables: vec![Table::new("By magnification", ["method", "40X"], vec![vec!["MPCS".into(), "91.2 ± 3.1 (paper 93.0, −1.8)".into()]])],
//!         images: vec![Figure::from_file(Path::new("loss.png"), "Loss per epoch, fold 0")?],
//!     }],
//!     made: Provenance { experiment: "experiments/paper.toml".into(), keys: vec![("finetune[fold=0]".into(), "3fa1…".into())], notes: vec![] },
//! };
//! write_report(&report, Path::new("report.html"))?;
//! ```

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;

use super::error::{write_atomic, ReportError, Result};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub title: String,
    /// Text under the title (paragraphs separated by blank lines); may be empty.
    pub intro: String,
    pub sections: Vec<Section>,
    /// The "how this was made" block at the end.
    pub made: Provenance,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Section {
    pub heading: String,
    /// Plain text; blank lines separate paragraphs. Shown before the tables.
    pub text: String,
    pub tables: Vec<Table>,
    /// Shown after the tables, in a grid.
    pub images: Vec<Figure>,
}

/// A table of strings. Cells that start like a number ("91.2 ± 3.1 (paper 93.0, −1.8)", "-0.3", "12") are
/// right-aligned in tabular figures so columns of numbers line up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    /// Shown above the table; may be empty.
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(caption: &str, header: impl IntoIterator<Item = S>, rows: Vec<Vec<String>>) -> Table {
        Table { caption: caption.into(), header: header.into_iter().map(Into::into).collect(), rows }
    }
}

/// A table cell "mean ± std" of `values` (e.g. accuracies over folds, in %), with the paper's figure and our
/// difference when given: "91.2 ± 3.1 (paper 93.0, −1.8)". std is the sample standard deviation (n − 1, as
/// pandas and most papers report it; 0 for one value). Non-finite values are left out; none left gives "–".
pub fn mean_std_cell(values: &[f64], paper: Option<f64>, decimals: usize) -> String {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "–".into();
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() > 1 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    // A typographic minus, so "−1.8" does not break across lines and reads as a difference.
    let signed = |x: f64| {
        let s = format!("{:+.*}", decimals, x);
        s.replacen('-', "−", 1)
    };
    let mut cell = format!("{mean:.decimals$} ± {std:.decimals$}");
    if let Some(p) = paper.filter(|p| p.is_finite()) {
        cell.push_str(&format!(" (paper {p:.decimals$}, {})", signed(mean - p)));
    }
    cell
}

/// A PNG image with its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub caption: String,
    pub png: Vec<u8>,
}

impl Figure {
    pub fn from_png(png: Vec<u8>, caption: &str) -> Figure {
        Figure { caption: caption.into(), png }
    }

    /// Reads a PNG file (e.g. one written by `report::plot`).
    pub fn from_file(path: &Path, caption: &str) -> Result<Figure> {
        let png = std::fs::read(path).map_err(ReportError::io(path))?;
        if !png.starts_with(PNG_MAGIC) {
            return Err(ReportError::Input(format!("{}: not a PNG file; figures must be PNG", path.display())));
        }
        Ok(Figure::from_png(png, caption))
    }
}

/// Where the numbers come from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    /// The experiment file (or its name).
    pub experiment: String,
    /// (node, cache key) pairs of the entries the report was built from.
    pub keys: Vec<(String, String)>,
    /// Free lines (command line, mpcs version, date, machine, ...).
    pub notes: Vec<String>,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

const CSS: &str = r#"
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --head: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px clamp(12px, 3vw, 32px) 48px; }
h1 { font-size: 28px; margin: 0 0 6px; }
h2 { font-size: 21px; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
p { margin: 8px 0; max-width: 80ch; }
.intro { color: var(--muted); }
nav { margin: 14px 0 0; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
.table-wrap { overflow-x: auto; margin: 14px 0 18px; }
table { border-collapse: collapse; font-size: 14px; min-width: 40%; }
caption { text-align: left; font-weight: 600; padding: 0 0 6px; }
th, td { padding: 5px 10px; border: 1px solid var(--line); vertical-align: top; }
th:first-child, td:first-child { white-space: nowrap; }
td .sub { display: block; font-size: 12px; color: var(--muted); }
th { background: var(--head); text-align: left; font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(460px, 100%), 1fr)); gap: 18px;
  margin: 14px 0; align-items: start; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 6px; }
.made { margin-top: 40px; padding: 12px 16px; background: var(--head); border: 1px solid var(--line);
  border-radius: 6px; font-size: 13px; }
.made h2 { font-size: 15px; margin: 0 0 6px; border: 0; padding: 0; }
.made code { font: 12px/1.4 "DejaVu Sans Mono", Menlo, Consolas, monospace; }
.made td, .made th { border: 0; padding: 2px 12px 2px 0; background: none; }
"#;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn paragraphs(html: &mut String, text: &str, class: &str) {
    for p in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let class = if class.is_empty() { String::new() } else { format!(" class=\"{class}\"") };
        let _ = writeln!(html, "<p{class}>{}</p>", esc(p).replace('\n', "<br>"));
    }
}

/// True when a cell reads as a number (optionally signed, with a unit or a "± …" after it).
fn numeric(cell: &str) -> bool {
    let t = cell.trim_start_matches(['-', '+', '−', ' ']);
    t.starts_with(|c: char| c.is_ascii_digit())
        || (t.starts_with('.') && t[1..].starts_with(|c: char| c.is_ascii_digit()))
}

fn slug(i: usize, heading: &str) -> String {
    let s: String =
        heading.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    format!("s{i}-{}", s.trim_matches('-'))
}

/// The report as one HTML document.
pub fn render_html(report: &Report) -> Result<String> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{}</h1>\n",
        esc(&report.title),
        esc(&report.title)
    );
    paragraphs(&mut h, &report.intro, "intro");
    if report.sections.len() > 2 {
        h.push_str("<nav>");
        for (i, s) in report.sections.iter().enumerate() {
            let _ = write!(h, "<a href=\"#{}\">{}</a>", slug(i, &s.heading), esc(&s.heading));
        }
        h.push_str("</nav>\n");
    }
    for (i, s) in report.sections.iter().enumerate() {
        let _ = writeln!(h, "<section id=\"{}\">\n<h2>{}</h2>", slug(i, &s.heading), esc(&s.heading));
        paragraphs(&mut h, &s.text, "");
        for t in &s.tables {
            table(&mut h, t, &s.heading)?;
        }
        if !s.images.is_empty() {
            h.push_str("<div class=\"grid\">\n");
            for f in &s.images {
                if !f.png.starts_with(PNG_MAGIC) {
                    return Err(ReportError::Input(format!(
                        "section '{}': figure '{}' is not PNG data",
                        s.heading, f.caption
                    )));
                }
                let b64 = base64::engine::general_purpose::STANDARD.encode(&f.png);
                let _ = writeln!(
                    h,
                    "<figure><img alt=\"{}\" src=\"data:image/png;base64,{b64}\"><figcaption>{}</figcaption></figure>",
                    esc(&f.caption),
                    esc(&f.caption)
                );
            }
            h.push_str("</div>\n");
        }
        h.push_str("</section>\n");
    }
    let m = &report.made;
    h.push_str("<div class=\"made\">\n<h2>How this was made</h2>\n");
    if !m.experiment.is_empty() {
        let _ = writeln!(h, "<p>Experiment: <code>{}</code></p>", esc(&m.experiment));
    }
    if !m.keys.is_empty() {
        h.push_str("<table><thead><tr><th>node</th><th>cache key</th></tr></thead><tbody>\n");
        for (node, key) in &m.keys {
            let _ = writeln!(h, "<tr><td><code>{}</code></td><td><code>{}</code></td></tr>", esc(node), esc(key));
        }
        h.push_str("</tbody></table>\n");
    }
    for n in &m.notes {
        let _ = writeln!(h, "<p>{}</p>", esc(n));
    }
    let _ = writeln!(h, "<p>Written by mpcs {}.</p>\n</div>", env!("CARGO_PKG_VERSION"));
    h.push_str("</main>\n</body>\n</html>\n");
    Ok(h)
}

fn table(h: &mut String, t: &Table, section: &str) -> Result<()> {
    if let Some((i, r)) = t.rows.iter().enumerate().find(|(_, r)| r.len() != t.header.len()) {
        return Err(ReportError::Input(format!(
            "section '{section}', table '{}': row {i} has {} cells but the header has {}",
            t.caption,
            r.len(),
            t.header.len()
        )));
    }
    h.push_str("<div class=\"table-wrap\"><table>\n");
    if !t.caption.is_empty() {
        let _ = writeln!(h, "<caption>{}</caption>", esc(&t.caption));
    }
    h.push_str("<thead><tr>");
    for c in &t.header {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for r in &t.rows {
        h.push_str("<tr>");
        for c in r {
            // A cell's first line is its value; further lines (e.g. the paper's value) are set smaller beneath.
            let mut lines = c.split('\n');
            let first = lines.next().unwrap_or("");
            let class = if numeric(first) { " class=\"num\"" } else { "" };
            let _ = write!(h, "<td{class}>{}", esc(first));
            for line in lines {
                let _ = write!(h, "<span class=\"sub\">{}</span>", esc(line));
            }
            h.push_str("</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody></table></div>\n");
    Ok(())
}

/// Writes the report to `path` (atomically: never a half-written file).
pub fn write_report(report: &Report, path: &Path) -> Result<()> {
    write_atomic(path, render_html(report)?.as_bytes())
}
