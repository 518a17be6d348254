//! Results a person can read: PNG plots, t-SNE maps and a self-contained HTML report.
