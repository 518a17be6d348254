//! `mpcs report EXP`: an experiment's results as one self-contained HTML page (`crate::report`), built from its
//! cache entries: the tables (ours beside the paper's), loss curves, confusion matrices, Grad-CAM overlays of
//! test images and a t-SNE map of the learned embeddings coloured by class and by magnification. The pictures
//! are also written as PNG files beside the page.
//!
//! Grad-CAM and t-SNE are computed here, not in a stage: they only read cached models and images, take seconds,
//! and are a view of the results rather than a result (nothing downstream depends on them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::exec::Project;
use crate::experiment::Experiment;
use crate::lineage::{self, Assessment, State};
use crate::loader::Normalize;
use crate::report::{Figure, Provenance, Report, Section, Table};
use crate::stages::pretrain::PretrainStageConfig;
use crate::stages::train::{TrainConfig, DATASET_KINDS};
use crate::train::{expand_patches, read_fold, FoldRow};

pub struct ReportOptions {
    /// Where `report.html` and the PNG files go.
    pub out_dir: PathBuf,
    /// Grad-CAM overlays to draw (balanced over classes).
    pub cams: usize,
    /// Most test images in the t-SNE map.
    pub tsne_points: usize,
}

/// A cached node's output folder.
struct Done {
    index: usize,
    out: PathBuf,
}

fn png_bytes(img: &crate::loader::Rgb8) -> Result<Vec<u8>> {
    let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .ok_or_else(|| Error::internal("image buffer size"))?;
    let mut out = std::io::Cursor::new(Vec::new());
    buf.write_to(&mut out, image::ImageFormat::Png).map_err(|e| Error::internal(format!("PNG encoding: {e}")))?;
    Ok(out.into_inner())
}

fn report_err(e: impl std::fmt::Display) -> Error {
    Error::env(e.to_string())
}

/// The nodes of `stage kind` that agree with the first one on every matrix key except `vary` (one per row of a
/// table, e.g. one per initialisation at fold 0 and the first magnification).
fn one_per(p: &Project, done: &[Done], kind: &str, vary: &str) -> Vec<usize> {
    let plan = &p.plan;
    let of_kind: Vec<&Done> = done.iter().filter(|d| p.kind_of(d.index) == kind).collect();
    let Some(first) = of_kind.first() else { return Vec::new() };
    let fixed: Vec<&(String, crate::experiment::MatrixValue)> =
        plan.nodes[first.index].matrix.iter().filter(|(k, _)| k != vary).collect();
    of_kind
        .iter()
        .filter(|d| fixed.iter().all(|(k, v)| plan.nodes[d.index].matrix_value(k) == Some(v)))
        .map(|d| d.index)
        .collect()
}

/// Builds and writes the report; returns the HTML file's path.
pub fn write_report(p: &Project, cache: &Cache, opts: &ReportOptions) -> Result<PathBuf> {
    let (exp, plan) = (&p.exp, &p.plan);
    let a = lineage::assess(p, cache)?;
    let done: Vec<Done> = plan
        .order
        .iter()
        .filter(|&&i| a.nodes[i].state == State::Cached && p.source_of(i).is_none())
        .filter_map(|&i| a.nodes[i].key.as_ref().map(|k| Done { index: i, out: cache.entry_dir(k).join("out") }))
        .collect();
    let out_of = |i: usize| done.iter().find(|d| d.index == i).map(|d| d.out.clone());
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io("cannot create", &opts.out_dir, e))?;
    let mut sections = Vec::new();
    let mut notes = Vec::new();

    // Tables.
    let mut tables = Vec::new();
    let table_count = done.iter().filter(|d| p.kind_of(d.index) == "table").count();
    for d in done.iter().filter(|d| p.kind_of(d.index) == "table") {
        let text = std::fs::read(d.out.join("table.json")).map_err(|e| Error::io("cannot read", &d.out, e))?;
        let t: serde_json::Value = serde_json::from_slice(&text).map_err(report_err)?;
        let columns: Vec<String> =
            t["columns"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(String::from)).collect();
        let title = t["title"].as_str().unwrap_or("");
        let notes = t["notes"].as_str().unwrap_or("");
        // The paper's layout has ten columns (patient- and image-level); one table per level fits a window.
        for (level, indices) in column_groups(&columns) {
            let mut rows = Vec::new();
            for r in t["rows"].as_array().into_iter().flatten() {
                let mut row = vec![r["label"].as_str().unwrap_or("").to_string()];
                row.extend(indices.iter().map(|&i| cell_text(&r["cells"][i])));
                rows.push(row);
            }
            let mut header = vec!["method".to_string()];
            header.extend(
                indices
                    .iter()
                    .map(|&i| columns[i].strip_prefix(&format!("{level}_")).unwrap_or(&columns[i]).to_string()),
            );
            // The page's heading is the experiment's title, which is usually the table's: name the level instead.
            let caption = match (level.as_str(), table_count > 1) {
                ("", _) => format!("{title} — {notes}"),
                (l, false) => format!("{}{}-level — {notes}", l[..1].to_uppercase(), &l[1..]),
                (l, true) => format!("{title}: {l}-level — {notes}"),
            };
            tables.push(Table::new(&caption, header, rows));
        }
        if let Some(c) = comparison_table(&t["comparison"]) {
            tables.push(c);
        }
    }
    if tables.is_empty() {
        notes.push("No table yet: run the experiment (`mpcs run`) first.".to_string());
    }
    sections.push(Section {
        heading: "Results".into(),
        text: "Mean ± standard deviation over folds (or runs), in percent unless the column says otherwise; beneath \
               each value the paper's and our difference, where the paper reports that method."
            .into(),
        tables,
        images: Vec::new(),
    });

    // Training curves and confusion matrices, one node per initialisation.
    let mut curves = Vec::new();
    for kind in ["pretrain", "finetune", "linear_eval"] {
        let vary = if kind == "pretrain" { "pair" } else { "init" };
        for i in one_per(p, &done, kind, vary) {
            if let Some(out) = out_of(i) {
                if let Ok(f) = Figure::from_file(&out.join("loss_curve.png"), &plan.nodes[i].id) {
                    curves.push(f);
                }
            }
        }
    }
    if !curves.is_empty() {
        sections.push(Section {
            heading: "Training".into(),
            text: "Loss per epoch (pretraining: the MPCS contrastive loss; fine-tuning: training and validation \
                   loss). One run per initialisation; every run's curve is in its cache entry."
                .into(),
            tables: Vec::new(),
            images: curves,
        });
    }
    let mut confusions = Vec::new();
    for i in one_per(p, &done, "evaluate", "init") {
        if let Some(out) = out_of(i) {
            if let Ok(f) = Figure::from_file(&out.join("confusion.png"), &plan.nodes[i].id) {
                confusions.push(f);
            }
        }
    }
    if !confusions.is_empty() {
        sections.push(Section {
            heading: "Confusion matrices".into(),
            text: "Test images of one fold; rows are the true classes, columns the predicted ones.".into(),
            tables: Vec::new(),
            images: confusions,
        });
    }

    // Grad-CAM of a fine-tuned model (an MPCS-initialised one when there is one).
    match grad_cams(p, &a, &done, opts) {
        Ok(Some(s)) => sections.push(s),
        Ok(None) => {}
        Err(e) => notes.push(format!("Grad-CAM skipped: {e}")),
    }
    match tsne_maps(p, &a, &done, opts) {
        Ok(Some(s)) => sections.push(s),
        Ok(None) => {}
        Err(e) => notes.push(format!("t-SNE skipped: {e}")),
    }

    let keys = done.iter().map(|d| (plan.nodes[d.index].id.clone(), a.nodes[d.index].key.clone().unwrap_or_default()));
    let report = Report {
        title: exp.title.clone().unwrap_or_else(|| exp.name.clone()),
        intro: format!(
            "Experiment `{}`: {} of {} nodes are in the cache. Generated by mpcs {} from {}.",
            exp.name,
            done.len(),
            plan.nodes.len(),
            env!("CARGO_PKG_VERSION"),
            exp.path.display()
        ),
        sections,
        made: Provenance { experiment: exp.name.clone(), keys: keys.collect(), notes },
    };
    let path = opts.out_dir.join("report.html");
    crate::report::write_report(&report, &path).map_err(report_err)?;
    Ok(path)
}

/// The table's comparison with its baseline row (`baseline = "random"`), as its own table.
fn comparison_table(c: &serde_json::Value) -> Option<Table> {
    let c: crate::table::Comparison = serde_json::from_value(c.clone()).ok()?;
    let mut header = vec!["method".to_string()];
    header.extend(c.columns.iter().map(|n| format!("Δ {n}")));
    header.push("verdict".into());
    let rows = c
        .rows
        .iter()
        .map(|r| {
            let mut row = vec![r.label.clone()];
            row.extend(r.deltas.iter().map(|d| d.as_ref().map_or("–".to_string(), |d| d.text(2))));
            row.push(r.verdict_text());
            row
        })
        .collect();
    let caption = format!(
        "Against {}: method − {} on the same run, mean ± std over runs; the verdict is on {} (better/worse when a \
         one-sided sign test over the runs gives p < {})",
        c.baseline,
        c.baseline,
        c.columns.first().map(String::as_str).unwrap_or(""),
        crate::table::ALPHA
    );
    Some(Table::new(&caption, header, rows))
}

/// The table's columns by level: `patient_*` and `image_*` (the BreakHis layout) as two groups named by the
/// prefix, in order; any other set of columns as one group named "".
fn column_groups(columns: &[String]) -> Vec<(String, Vec<usize>)> {
    let levels = ["patient", "image"];
    let level_of = |c: &str| levels.iter().find(|l| c.starts_with(&format!("{l}_"))).copied();
    if columns.is_empty() || !columns.iter().all(|c| level_of(c).is_some()) {
        return vec![(String::new(), (0..columns.len()).collect())];
    }
    levels
        .iter()
        .map(|l| (l.to_string(), (0..columns.len()).filter(|&i| level_of(&columns[i]) == Some(l)).collect::<Vec<_>>()))
        .filter(|(_, ix)| !ix.is_empty())
        .collect()
}

/// "mean ± std", with the paper's value and our difference on a second line when there is one.
fn cell_text(c: &serde_json::Value) -> String {
    let (Some(mean), Some(std)) = (c["mean"].as_f64(), c["std"].as_f64()) else { return "–".into() };
    match (c["paper_mean"].as_f64(), c["diff"].as_f64()) {
        (Some(p), Some(d)) => {
            format!("{mean:.2} ± {std:.2}\npaper {p:.2}, {}{:.2}", if d >= 0.0 { "+" } else { "−" }, d.abs())
        }
        _ => format!("{mean:.2} ± {std:.2}"),
    }
}

/// The model, architecture, input size, data root and test rows of a training node.
struct Trained {
    id: String,
    weights: PathBuf,
    arch: crate::nn::Arch,
    dilation: crate::nn::Dilation,
    size: usize,
    rows: Vec<FoldRow>,
    root: PathBuf,
}

/// Finds a training node's data: the dataset and split inputs, the fold's test rows (original patches only).
fn trained(p: &Project, a: &Assessment, done: &[Done], i: usize, weights_file: &str) -> Result<Trained> {
    let (exp, plan) = (&p.exp, &p.plan);
    let node = &plan.nodes[i];
    let out_of = |j: usize| done.iter().find(|d| d.index == j).map(|d| d.out.clone());
    // The node's resolved config, as its key and manifest record it.
    let params = a.action(p, i).map(|act| act.params).unwrap_or_default();
    let config = serde_json::Value::Object(params.into_iter().collect());
    let bad = |e: serde_json::Error| Error::internal(format!("the config of `{}` does not parse: {e}", node.id));
    let (arch, dilation, size, fold, magnification, weights_stage) = match p.kind_of(i) {
        "finetune" | "linear_eval" => {
            let c: TrainConfig = serde_json::from_value(config).map_err(bad)?;
            let dilation = crate::nn::Dilation::from_output_stride(c.model.output_stride).map_err(report_err)?;
            (c.model.arch, dilation, c.model.size, c.model.fold, c.model.magnification, c.weights_stage)
        }
        // Pretraining uses the plain encoder.
        "pretrain" => {
            let c: PretrainStageConfig = serde_json::from_value(config).map_err(bad)?;
            (c.arch, crate::nn::Dilation::None, c.size, c.fold, None, c.weights_stage)
        }
        _ => return Err(Error::internal("not a training node")),
    };
    let mut root = None;
    let mut split = None;
    for &j in &node.inputs {
        let decl = &exp.stages[plan.nodes[j].stage];
        let kind = decl.kind.as_str();
        let path = match p.source_of(j) {
            Some(s) => s.resolve(exp, decl).ok(),
            None => out_of(j),
        };
        if kind == "split" {
            split = path;
        } else if DATASET_KINDS.contains(&kind) && Some(&decl.name) != weights_stage.as_ref() {
            root = path;
        }
    }
    let (Some(root), Some(split)) = (root, split) else {
        return Err(Error::user(format!("`{}` has no cached dataset and split inputs", node.id)));
    };
    let fold_csv = split.join(format!("fold_{fold}.csv"));
    let rows = read_fold(&fold_csv).map_err(report_err)?;
    let tag = magnification.map(|m| format!("{}X", m.trim_end_matches(['x', 'X'])));
    let test: Vec<FoldRow> = rows
        .into_iter()
        .filter(|r| r.portion.starts_with("test"))
        .filter(|r| tag.as_ref().is_none_or(|t| r.magnification.eq_ignore_ascii_case(t)))
        .collect();
    let (test, _) = expand_patches(&root, test, false).map_err(report_err)?;
    let weights = out_of(i).map(|o| o.join(weights_file)).unwrap_or_default();
    Ok(Trained { id: node.id.clone(), weights, arch, dilation, size, rows: test, root })
}

fn grad_cams(p: &Project, a: &Assessment, done: &[Done], opts: &ReportOptions) -> Result<Option<Section>> {
    let plan = &p.plan;
    let finetunes: Vec<usize> = done.iter().map(|d| d.index).filter(|&i| p.kind_of(i) == "finetune").collect();
    let pick = finetunes
        .iter()
        .copied()
        .find(|&i| {
            plan.nodes[i]
                .matrix_value("init")
                .is_some_and(|v| !["random", "imagenet"].contains(&v.to_string().as_str()))
        })
        .or(finetunes.first().copied());
    let (Some(i), true) = (pick, opts.cams > 0) else { return Ok(None) };
    let t = trained(p, a, done, i, crate::stages::train::MODEL_FILE)?;
    let model =
        crate::infer::load_model_with(t.arch, t.dilation, &t.weights, &candle_core::Device::Cpu).map_err(report_err)?;
    // Balanced over classes, the first images of each in file order (deterministic).
    let mut by_class: BTreeMap<u32, Vec<&FoldRow>> = BTreeMap::new();
    for r in &t.rows {
        by_class.entry(r.label).or_default().push(r);
    }
    let per_class = opts.cams.div_ceil(by_class.len().max(1));
    let mut figures = Vec::new();
    let mut explained: Option<(String, usize, usize)> = None;
    for (label, rows) in &by_class {
        for r in rows.iter().take(per_class) {
            let input = crate::infer::InputOptions { size: Some(t.size), normalize: Normalize::None };
            let img = crate::infer::images::load_image(&t.root.join(&r.file), &input).map_err(report_err)?;
            let x = crate::infer::image_tensor(std::slice::from_ref(&img), Normalize::None, &candle_core::Device::Cpu)
                .map_err(report_err)?;
            let cam = crate::infer::grad_cam(&model, &x, None, None).map_err(report_err)?;
            explained.get_or_insert_with(|| (cam.layer.clone(), cam.fh, cam.fw));
            // Shown on the image at its own resolution (the network saw it at `size`), so it can be read.
            let full =
                crate::infer::images::load_image(&t.root.join(&r.file), &Default::default()).map_err(report_err)?;
            let map = crate::infer::cam::upsample_bilinear(&cam.map, cam.height, cam.width, full.height, full.width);
            let over = crate::infer::overlay(&full, &map, 0.4);
            let name = format!("cam_{}.png", figures.len());
            let bytes = png_bytes(&over)?;
            std::fs::write(opts.out_dir.join(&name), &bytes)
                .map_err(|e| Error::io("cannot write", &opts.out_dir, e))?;
            let base = r.file.rsplit('/').next().unwrap_or(&r.file);
            let what = if model.outputs == 1 {
                let p = 1.0 / (1.0 + (-cam.logits[0]).exp());
                format!("P(class 1) = {p:.2}; the map shows the evidence for class 1")
            } else {
                format!("explained: the predicted class {}", cam.class)
            };
            figures.push(Figure::from_png(bytes, &format!("{base}: true {} ({label}); {what}", r.class)));
        }
    }
    let Some((layer, fh, fw)) = explained else { return Ok(None) };
    let last = *model.net.cam_layers().last().unwrap_or(&"");
    let why = if layer == last {
        "its last convolutional feature maps".to_string()
    } else {
        // Say why not the last layer: at small inputs its map is a single cell, which cannot locate anything.
        format!(
            "the `{layer}` feature maps (at this input size `{last}` is too small to locate anything; Grad-CAM \
             takes the deepest layer with at least {min}×{min} cells)",
            min = crate::infer::cam::MIN_CAM_SIDE
        )
    };
    Ok(Some(Section {
        heading: "Where the model looks (Grad-CAM)".into(),
        text: format!(
            "Grad-CAM of `{}` on test images at the network's input size ({size}×{size} px): the gradient of the \
             explained class's logit weights {why}, a {fh}×{fw} map upsampled onto the image; red is where the \
             evidence is.",
            t.id,
            size = t.size
        ),
        tables: Vec::new(),
        images: figures,
    }))
}

fn tsne_maps(p: &Project, a: &Assessment, done: &[Done], opts: &ReportOptions) -> Result<Option<Section>> {
    let kind_of = |i: usize| p.kind_of(i);
    let pick = done
        .iter()
        .find(|d| kind_of(d.index) == "pretrain")
        .map(|d| (d.index, "backbone.safetensors"))
        .or_else(|| done.iter().find(|d| kind_of(d.index) == "finetune").map(|d| (d.index, "model.safetensors")));
    let (Some((i, file)), true) = (pick, opts.tsne_points > 1) else { return Ok(None) };
    let t = trained(p, a, done, i, file)?;
    let model =
        crate::infer::load_model_with(t.arch, t.dilation, &t.weights, &candle_core::Device::Cpu).map_err(report_err)?;
    // Evenly spaced over the test rows, so every class and magnification is represented.
    let step = t.rows.len().div_ceil(opts.tsne_points).max(1);
    let rows: Vec<&FoldRow> = t.rows.iter().step_by(step).collect();
    if rows.len() < 5 {
        return Err(Error::user(format!("only {} test images: too few for a map", rows.len())));
    }
    let input = crate::infer::InputOptions { size: Some(t.size), normalize: Normalize::None };
    let mut features = Vec::new();
    for chunk in rows.chunks(32) {
        let imgs = chunk
            .iter()
            .map(|r| crate::infer::images::load_image(&t.root.join(&r.file), &input))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(report_err)?;
        let x = crate::infer::image_tensor(&imgs, Normalize::None, &candle_core::Device::Cpu).map_err(report_err)?;
        let f = model.features(&x).map_err(report_err)?.to_vec2::<f32>().map_err(report_err)?;
        features.extend(f);
    }
    let perplexity = (rows.len() as f64 / 4.0).clamp(2.0, 30.0);
    let points = crate::report::tsne(&features, perplexity, 1000, 0).map_err(report_err)?;
    let mut images = Vec::new();
    for (what, key) in [("class", 0), ("magnification", 1)] {
        let values: Vec<String> =
            rows.iter().map(|r| if key == 0 { r.class.clone() } else { r.magnification.clone() }).collect();
        let mut legend: Vec<String> = values.clone();
        legend.sort_by_key(|v| (v.trim_end_matches(['X', 'x']).parse::<u32>().unwrap_or(u32::MAX), v.clone()));
        legend.dedup();
        if legend.len() < 2 && key == 1 {
            continue;
        }
        let labels: Vec<usize> = values.iter().map(|v| legend.iter().position(|l| l == v).unwrap_or(0)).collect();
        let path = opts.out_dir.join(format!("tsne_{what}.png"));
        crate::report::scatter_png(&points, &labels, &legend, &path).map_err(report_err)?;
        images.push(
            Figure::from_file(&path, &format!("t-SNE of the embeddings, coloured by {what}")).map_err(report_err)?,
        );
    }
    Ok(Some(Section {
        heading: "Learned representations (t-SNE)".into(),
        text: format!(
            "Pooled encoder features of `{}` for {} test images of its fold, embedded in 2-D with exact t-SNE \
             (perplexity {perplexity:.0}, 1000 iterations, seed 0).",
            t.id,
            rows.len()
        ),
        tables: Vec::new(),
        images,
    }))
}

/// The default place for an experiment's report: `results/<experiment name>/` under the working directory.
pub fn default_out_dir(exp: &Experiment) -> PathBuf {
    Path::new("results").join(&exp.name)
}
