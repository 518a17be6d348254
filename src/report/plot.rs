//! PNG charts: line charts (loss per epoch), confusion matrices (counts in cells) and labelled scatter maps
//! (t-SNE). Drawn by plotters into an RGB buffer with the embedded font, encoded as PNG by `image`.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::error::{write_atomic, ReportError, Result};

/// One named line: (x, y) points, e.g. ("val loss", [(1, 0.69), (2, 0.51), ...]).
pub type Series = (String, Vec<(f64, f64)>);

const FONT: &[u8] = include_bytes!("fonts/DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";

/// matplotlib's tab10 palette: distinguishable, colour-blind friendlier than pure RGB.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known to parse; a failure here is a build defect caught by the tests.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn draw_err<E: std::fmt::Display>(e: E) -> ReportError {
    ReportError::Draw(e.to_string())
}

/// Draws with `f` on a white `w`×`h` canvas and writes the PNG to `path`.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    f: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        f(&root)?;
        root.present().map_err(draw_err)?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &buf,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(draw_err)?;
    write_atomic(path, &png)
}

/// (min, max) of the values, widened when they coincide so the axis has a span.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        return None;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.05 };
    Some((lo - pad, hi + pad))
}

/// Train/validation loss per epoch (any number of series; non-finite points are left out).
pub fn loss_curve_png(series: &[Series], path: &Path) -> Result<()> {
    line_chart_png(series, "Loss per epoch", "epoch", "loss", path)
}

/// A line chart with a legend.
pub fn line_chart_png(series: &[Series], title: &str, x_label: &str, y_label: &str, path: &Path) -> Result<()> {
    let finite: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, pts)| (n.as_str(), pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()))
        .collect();
    let all = || finite.iter().flat_map(|(_, p)| p.iter());
    let (Some((x0, x1)), Some((y0, y1))) = (span(all().map(|p| p.0)), span(all().map(|p| p.1))) else {
        return Err(ReportError::Input(format!("'{title}': no finite points to plot")));
    };
    render(path, (800, 500), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FAMILY, 30))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(84)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style((FAMILY, 18))
            .axis_desc_style((FAMILY, 20))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        for (i, (name, pts)) in finite.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(draw_err)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
            if pts.len() <= 60 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(draw_err)?;
            }
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 18))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_err)
    })
}

/// A confusion matrix (`matrix[true][predicted]` counts): cells shaded by the share of their row (recall per
/// class), the count written in each cell.
pub fn confusion_png(matrix: &[Vec<usize>], class_names: &[String], path: &Path) -> Result<()> {
    let k = matrix.len();
    if k == 0 || matrix.iter().any(|r| r.len() != k) {
        return Err(ReportError::Input("confusion matrix must be square and non-empty".into()));
    }
    if class_names.len() != k {
        return Err(ReportError::Input(format!("{} class names for a {k}×{k} confusion matrix", class_names.len())));
    }
    let cell = (400 / k as u32).clamp(40, 110);
    let label_w = 30 + 11 * class_names.iter().map(|n| n.chars().count()).max().unwrap_or(1).min(24) as u32;
    let (left, top) = (label_w + 30, 50u32);
    let bottom = 24 + 11 * class_names.iter().map(|n| n.chars().count()).max().unwrap_or(1).min(24) as u32;
    // The picture is at least as wide as its title (a 2-class matrix is narrower than the title at 20 px:
    // the title was cut at both ends). About 0.6 em per character in the embedded font, plus margins.
    const TITLE: &str = "rows: true class, columns: predicted";
    let title_w = 12 * TITLE.chars().count() as u32 + 40;
    let (w, h) = ((left + cell * k as u32 + 40).max(title_w), top + cell * k as u32 + bottom);
    render(path, (w, h), |root| {
        let text = |s: &str, size: u32, x: i32, y: i32, h: HPos| {
            let style = TextStyle::from((FAMILY, size).into_font()).pos(Pos::new(h, VPos::Center));
            root.draw(&Text::new(s.to_string(), (x, y), style)).map_err(draw_err)
        };
        text(TITLE, 20, (w / 2) as i32, 20, HPos::Center)?;
        for (t, row) in matrix.iter().enumerate() {
            let total: usize = row.iter().sum();
            for (p, &count) in row.iter().enumerate() {
                let share = if total > 0 { count as f64 / total as f64 } else { 0.0 };
                // White → blue ramp (matplotlib "Blues"-like).
                let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * share).round() as u8;
                let fill = RGBColor(mix(247, 8), mix(251, 48), mix(255, 107));
                let (x0, y0) = ((left + p as u32 * cell) as i32, (top + t as u32 * cell) as i32);
                root.draw(&Rectangle::new([(x0, y0), (x0 + cell as i32, y0 + cell as i32)], fill.filled()))
                    .map_err(draw_err)?;
                root.draw(&Rectangle::new([(x0, y0), (x0 + cell as i32, y0 + cell as i32)], WHITE.stroke_width(1)))
                    .map_err(draw_err)?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                let style = TextStyle::from((FAMILY, (cell / 3).clamp(14, 28)).into_font())
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                root.draw(&Text::new(count.to_string(), (x0 + cell as i32 / 2, y0 + cell as i32 / 2), style))
                    .map_err(draw_err)?;
            }
        }
        for (i, name) in class_names.iter().enumerate() {
            let name: String = name.chars().take(24).collect();
            let mid = (i as u32 * cell + cell / 2) as i32;
            text(&name, 18, left as i32 - 8, top as i32 + mid, HPos::Right)?;
            // Column names written downwards so long names fit.
            let style = TextStyle::from((FAMILY, 18).into_font().transform(FontTransform::Rotate90))
                .pos(Pos::new(HPos::Left, VPos::Center));
            root.draw(&Text::new(name, (left as i32 + mid, (top + k as u32 * cell + 8) as i32), style))
                .map_err(draw_err)?;
        }
        Ok(())
    })
}

/// A scatter map (e.g. t-SNE): point i drawn in the colour of `labels[i]`, with `legend[label]` as its name.
pub fn scatter_png(points: &[[f32; 2]], labels: &[usize], legend: &[String], path: &Path) -> Result<()> {
    if points.len() != labels.len() {
        return Err(ReportError::Input(format!("{} points but {} labels", points.len(), labels.len())));
    }
    if let Some(&l) = labels.iter().find(|&&l| l >= legend.len()) {
        return Err(ReportError::Input(format!("label {l} has no legend entry ({} given)", legend.len())));
    }
    let (Some((x0, x1)), Some((y0, y1))) = (
        span(points.iter().map(|p| p[0] as f64).filter(|v| v.is_finite())),
        span(points.iter().map(|p| p[1] as f64).filter(|v| v.is_finite())),
    ) else {
        return Err(ReportError::Input("no finite points to plot".into()));
    };
    // Room above the points for the legend (t-SNE coordinates carry no meaning of their own).
    let y1 = y1 + (y1 - y0) * 0.06 * (legend.len() as f64 + 1.0);
    render(path, (700, 600), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .label_style((FAMILY, 16))
            .light_line_style(RGBColor(240, 240, 240))
            .draw()
            .map_err(draw_err)?;
        for (class, name) in legend.iter().enumerate() {
            let color = PALETTE[class % PALETTE.len()];
            let pts: Vec<(f64, f64)> = points
                .iter()
                .zip(labels)
                .filter(|(p, &l)| l == class && p[0].is_finite() && p[1].is_finite())
                .map(|(p, _)| (p[0] as f64, p[1] as f64))
                .collect();
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.mix(0.8).filled())))
                .map_err(draw_err)?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        }
        chart
            .configure_series_labels()
            .label_font((FAMILY, 18))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(draw_err)
    })
}
