//! Results a person can read: PNG plots ([`plot`]: loss curves, confusion matrices, scatter maps), exact
//! t-SNE ([`tsne`]) and one self-contained HTML report ([`html`]) with tables and inlined figures.
//!
//! Plots are drawn with plotters into an RGB buffer and encoded with `image`; text uses a 13 KB subset of
//! DejaVu Sans compiled into the binary (fonts/), so nothing depends on system fonts.

pub mod epoch_log;
pub mod error;
pub mod html;
pub mod plot;
pub mod tsne;

pub use epoch_log::series_from_jsonl;
pub use error::{ReportError, Result};
pub use html::{mean_std_cell, render_html, write_report, Figure, Provenance, Report, Section, Table};
pub use plot::{confusion_png, loss_curve_png, scatter_png, Series};
pub use tsne::{joint_probabilities, tsne, tsne_with, Tsne, TsneConfig};
