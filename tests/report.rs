//! `mpcs::report`: exact t-SNE against closed forms and scikit-learn (tests/golden/report, made once by
//! scripts/report/make_golden.py), PNG plots (decodable, right size, text actually drawn), the HTML report
//! (self-contained, escaped), and a headless-Chromium screenshot of a sample report (skipped without chromium).

use std::path::{Path, PathBuf};

use candle_core::Device;
use mpcs::report::html::{render_html, Provenance};
use mpcs::report::tsne::conditional_probabilities;
use mpcs::report::{
    confusion_png, joint_probabilities, loss_curve_png, mean_std_cell, scatter_png, series_from_jsonl, tsne, tsne_with,
    write_report, Figure, Report, Section, Table, TsneConfig,
};

type R<T> = anyhow::Result<T>;

/// Deterministic standard normals (SplitMix64 + Box-Muller).
fn normals(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = mpcs::split::SplitMix64::new(seed);
    let mut u = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (a, b) = (u(), u());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect()
}

/// `k` Gaussian clusters of `per` points in `d` dimensions, centres 10 apart along distinct axes.
fn clusters(k: usize, per: usize, d: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
    let noise = normals(seed, k * per * d);
    let mut x = Vec::new();
    let mut labels = Vec::new();
    for c in 0..k {
        for i in 0..per {
            let mut row: Vec<f32> = noise[(c * per + i) * d..(c * per + i + 1) * d].to_vec();
            row[c] += 10.0;
            x.push(row);
            labels.push(c);
        }
    }
    (x, labels)
}

#[test]
fn conditional_p_has_the_asked_perplexity() -> R<()> {
    let (x, _) = clusters(3, 30, 20, 1);
    for perplexity in [5.0, 30.0] {
        let p = conditional_probabilities(&x, perplexity)?;
        let n = x.len();
        for i in 0..n {
            let row = &p[i * n..(i + 1) * n];
            assert_eq!(row[i], 0.0);
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "row {i} sums to {sum}");
            // Closed form: perplexity = exp(H), H = −Σ p ln p (nats), which the bisection matches to 1e-5.
            let h: f64 = -row.iter().filter(|&&v| v > 0.0).map(|&v| v * v.ln()).sum::<f64>();
            assert!((h.exp() / perplexity - 1.0).abs() < 1e-4, "row {i}: perplexity {} vs {perplexity}", h.exp());
        }
    }
    Ok(())
}

#[test]
fn joint_p_matches_sklearn() -> R<()> {
    let g = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/report/tsne_p.safetensors"),
        &Device::Cpu,
    )?;
    let x: Vec<Vec<f32>> = g["x"].to_vec2::<f32>()?;
    let want: Vec<f64> = g["p"].flatten_all()?.to_vec1::<f64>()?;
    let got = joint_probabilities(&x, 10.0)?;
    assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    let max = want.iter().cloned().fold(0.0, f64::max);
    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / max;
    println!("joint P vs sklearn: max rel err {err:.2e}");
    // sklearn runs the bisection on float32 distances; we use f64.
    assert!(err < 1e-4, "{err}");

    // Loose check of the whole optimisation against sklearn's exact TSNE (different random start).
    let t = tsne_with(&x, &TsneConfig::new(10.0, 1000, 0))?;
    let ours = t.kl.last().unwrap().1;
    let theirs = g["kl"].to_vec1::<f64>()?[0];
    println!("final KL: ours {ours:.4}, sklearn {theirs:.4}");
    assert!(ours < theirs * 1.5 + 0.05, "ours {ours} vs sklearn {theirs}");
    Ok(())
}

#[test]
fn tsne_separates_clusters_lowers_kl_and_is_seeded() -> R<()> {
    let (x, labels) = clusters(4, 40, 50, 7);
    let t = tsne_with(&x, &TsneConfig::new(20.0, 600, 3))?;
    // KL (with true P) falls after the exaggeration phase.
    let after: Vec<f64> = t.kl.iter().filter(|(i, _)| *i >= 250).map(|p| p.1).collect();
    println!("KL trace {:?}", t.kl);
    assert!(after.last().unwrap() < &(after[0] * 0.9), "KL did not decrease: {after:?}");
    assert!(after.windows(2).filter(|w| w[1] > w[0] * 1.01).count() == 0, "KL went up: {after:?}");
    // Nearest neighbour in 2-d has the same label.
    let p = &t.points;
    let agree = (0..p.len())
        .filter(|&i| {
            let nn = (0..p.len())
                .filter(|&j| j != i)
                .min_by(|&a, &b| {
                    let d = |j: usize| (p[i][0] - p[j][0]).powi(2) + (p[i][1] - p[j][1]).powi(2);
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            labels[nn] == labels[i]
        })
        .count() as f64
        / p.len() as f64;
    println!("nearest-neighbour label agreement {agree}");
    assert!(agree >= 0.95);
    // Seeded: same seed → same map; another seed → another map.
    let again = tsne(&x, 20.0, 600, 3)?;
    assert_eq!(again, t.points);
    let other = tsne(&x, 20.0, 600, 4)?;
    assert_ne!(other, t.points);
    // Bad input is refused with a message.
    assert!(tsne(&x[..5], 30.0, 600, 0).unwrap_err().to_string().contains("perplexity"));
    let mut nan = x.clone();
    nan[3][2] = f32::NAN;
    assert!(tsne(&nan, 20.0, 600, 0).unwrap_err().to_string().contains("point 3"));
    Ok(())
}

/// Decodes a PNG and returns (width, height, number of distinct colours, number of dark pixels in `rows`).
fn png_stats(path: &Path, rows: std::ops::Range<u32>) -> (u32, u32, usize, usize) {
    let img = image::open(path).unwrap().to_rgb8();
    let mut colours = std::collections::HashSet::new();
    let mut dark = 0;
    for (_, y, p) in img.enumerate_pixels() {
        colours.insert(p.0);
        if rows.contains(&y) && p.0.iter().all(|&c| c < 100) {
            dark += 1;
        }
    }
    (img.width(), img.height(), colours.len(), dark)
}

fn sample_plots(dir: &Path) -> R<(PathBuf, PathBuf, PathBuf)> {
    let loss = dir.join("loss.png");
    let train: Vec<(f64, f64)> = (1..=30).map(|e| (e as f64, 0.7 * (-(e as f64) / 8.0).exp() + 0.05)).collect();
    let val: Vec<(f64, f64)> = (1..=30).map(|e| (e as f64, 0.6 * (-(e as f64) / 10.0).exp() + 0.12)).collect();
    loss_curve_png(&[("train".into(), train), ("val".into(), val)], &loss)?;
    let confusion = dir.join("confusion.png");
    let names: Vec<String> =
        ["adenosis", "fibroadenoma", "ductal carcinoma", "lobular carcinoma"].map(String::from).into();
    confusion_png(&[vec![40, 3, 1, 0], vec![2, 51, 0, 1], vec![0, 1, 88, 9], vec![1, 0, 12, 30]], &names, &confusion)?;
    let scatter = dir.join("tsne.png");
    let (x, labels) = clusters(3, 30, 20, 2);
    let pts = tsne(&x, 15.0, 400, 0)?;
    scatter_png(&pts, &labels, &["benign".into(), "malignant".into(), "normal".into()], &scatter)?;
    Ok((loss, confusion, scatter))
}

#[test]
fn plots_are_pngs_with_text() -> R<()> {
    let dir = tempfile::tempdir()?;
    let (loss, confusion, scatter) = sample_plots(dir.path())?;
    let (w, h, colours, title_ink) = png_stats(&loss, 0..40);
    assert_eq!((w, h), (800, 500));
    assert!(colours > 10, "lines and anti-aliased text: {colours} colours");
    assert!(title_ink > 50, "the title is drawn (embedded font works): {title_ink} dark pixels");
    let (_, ch, colours, heading_ink) = png_stats(&confusion, 0..40);
    assert!(colours > 5 && heading_ink > 50 && ch > 300);
    let (w, h, colours, _) = png_stats(&scatter, 0..600);
    assert_eq!((w, h), (700, 600));
    assert!(colours > 5);
    // A 2-class matrix (BreakHis) is narrower than its title would be: the picture widens so that the title keeps
    // clear of both edges (it was cut at both ends).
    let two = dir.path().join("two.png");
    confusion_png(&[vec![30, 4], vec![2, 40]], &["benign".into(), "malignant".into()], &two)?;
    let img = image::open(&two)?.to_rgb8();
    let dark = |x: u32| (0..40).any(|y| img.get_pixel(x, y).0.iter().all(|&c| c < 128));
    let inked: Vec<u32> = (0..img.width()).filter(|&x| dark(x)).collect();
    let (first, last) = (inked[0], *inked.last().unwrap());
    assert!(first >= 8 && last + 8 < img.width(), "title from x = {first} to {last} in a {} px picture", img.width());
    // Errors are messages, not panics.
    assert!(confusion_png(&[vec![1, 2]], &["a".into()], &dir.path().join("x.png")).is_err());
    assert!(scatter_png(&[[0.0, 0.0]], &[3], &["a".into()], &dir.path().join("x.png")).is_err());
    assert!(loss_curve_png(&[("nan".into(), vec![(1.0, f64::NAN)])], &dir.path().join("x.png")).is_err());
    assert!(!dir.path().join("x.png").exists());
    Ok(())
}

fn sample_report(dir: &Path) -> R<Report> {
    let (loss, confusion, scatter) = sample_plots(dir)?;
    let cam = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/infer/a.png");
    Ok(Report {
        title: "MPCS on BreakHis — sample report".into(),
        intro: "Image-level accuracy (%) over 5 folds, mean ± std, with the paper's figure and our difference.\n\n\
                Everything below comes from the cache; see the end for the keys."
            .into(),
        sections: vec![
            Section {
                heading: "Accuracy by magnification".into(),
                text: "Binary benign/malignant, ImageNet-initialised ResNet-50.".into(),
                tables: vec![Table::new(
                    "Test accuracy (%)",
                    ["method", "40X", "100X", "200X", "400X"],
                    vec![
                        vec![
                            "MPCS ordered pair".into(),
                            "91.2 ± 3.1 (paper 93.0, −1.8)".into(),
                            "92.0 ± 2.2 (paper 92.8, −0.8)".into(),
                            "94.1 ± 1.9\npaper 94.3, −0.2".into(),
                            "90.5 ± 2.7 (paper 91.7, −1.2)".into(),
                        ],
                        vec![
                            "ImageNet only".into(),
                            "88.0 ± 2.9".into(),
                            "89.1 ± 3.3".into(),
                            "90.0 ± 2.0".into(),
                            "87.4 ± 3.8".into(),
                        ],
                    ],
                )],
                images: vec![
                    Figure::from_file(&loss, "Loss per epoch, fold 0 (40X)")?,
                    Figure::from_file(&confusion, "Confusion matrix, fold 0, subtypes")?,
                ],
            },
            Section {
                heading: "Representations".into(),
                text: "t-SNE of pooled encoder features (perplexity 15) and a Grad-CAM example.".into(),
                tables: vec![],
                images: vec![
                    Figure::from_file(&scatter, "t-SNE of test features")?,
                    Figure::from_file(&cam, "Input patch <a.png> & its heat map")?,
                ],
            },
            Section { heading: "Notes".into(), text: "Nothing else.".into(), tables: vec![], images: vec![] },
        ],
        made: Provenance {
            experiment: "experiments/paper.toml".into(),
            keys: vec![
                ("finetune[fold=0,mag=40X]".into(), "3fa1c0de9b2e4f71a0c3d5e6f7a8b9c0".into()),
                ("evaluate[fold=0,mag=40X]".into(), "8b9c03fa1c0de9b2e4f71a0c3d5e6f7a".into()),
            ],
            notes: vec!["mpcs report experiments/paper.toml".into()],
        },
    })
}

#[test]
fn html_is_self_contained_and_escaped() -> R<()> {
    let dir = tempfile::tempdir()?;
    let mut report = sample_report(dir.path())?;
    report.sections[2].text = "<script>alert(1)</script> & more".into();
    let html = render_html(&report)?;
    assert_eq!(html.matches("data:image/png;base64,").count(), 4);
    assert!(!html.contains("http://") && !html.contains("https://"), "no external requests");
    assert!(!html.contains("<script"), "text is escaped");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"));
    assert!(html.contains("<td class=\"num\">91.2 ± 3.1 (paper 93.0, −1.8)</td>"));
    // A second line in a cell is set beneath the value, smaller.
    assert!(html.contains("<td class=\"num\">94.1 ± 1.9<span class=\"sub\">paper 94.3, −0.2</span></td>"), "{html}");
    assert!(html.contains("<td>MPCS ordered pair</td>"));
    assert!(html.contains("3fa1c0de9b2e4f71a0c3d5e6f7a8b9c0") && html.contains("How this was made"));
    // A ragged table is refused, naming it.
    report.sections[0].tables[0].rows[1].pop();
    let err = render_html(&report).unwrap_err().to_string();
    assert!(err.contains("Test accuracy (%)") && err.contains("row 1 has 4 cells"), "{err}");
    Ok(())
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

#[test]
fn report_renders_in_headless_chromium() -> R<()> {
    let Some(chromium) = find_chromium() else {
        println!("SKIPPED: no chromium binary on PATH (apt-get install chromium to run this test)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let html = dir.path().join("report.html");
    write_report(&sample_report(dir.path())?, &html)?;
    let shot = dir.path().join("shot.png");
    let out = std::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", dir.path().join("profile").display()),
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600",
            &format!("file://{}", html.display()),
        ])
        .output()?;
    assert!(shot.exists(), "no screenshot; chromium said:\n{}", String::from_utf8_lossy(&out.stderr));
    let img = image::open(&shot)?.to_rgb8();
    assert_eq!(img.dimensions(), (1200, 1600));
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 50, "the page is not blank: {} colours", colours.len());
    // Keep the report, its plots and the screenshot for a person to look at when asked (MPCS_REPORT_KEEP=dir).
    if let Some(keep) = std::env::var_os("MPCS_REPORT_KEEP") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep)?;
        for f in ["shot.png", "report.html", "loss.png", "confusion.png", "tsne.png"] {
            std::fs::copy(dir.path().join(f), keep.join(f))?;
        }
    }
    Ok(())
}

#[test]
fn mean_std_cells() {
    // Sample std of [90, 92, 94] is 2.
    assert_eq!(mean_std_cell(&[90.0, 92.0, 94.0], Some(93.0), 1), "92.0 ± 2.0 (paper 93.0, −1.0)");
    assert_eq!(mean_std_cell(&[95.0], Some(93.0), 1), "95.0 ± 0.0 (paper 93.0, +2.0)");
    assert_eq!(mean_std_cell(&[0.5, f64::NAN, 0.7], None, 3), "0.600 ± 0.141");
    assert_eq!(mean_std_cell(&[], Some(1.0), 1), "–");
}

#[test]
fn epoch_logs_become_series() -> R<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("metrics.jsonl");
    std::fs::write(
        &log,
        "{\"epoch\":1,\"train_loss\":0.7,\"val_loss\":0.6}\n{\"epoch\":2,\"train_loss\":0.5,\"val_loss\":null}\n",
    )?;
    let s = series_from_jsonl(&log, &["train_loss", "val_loss"])?;
    assert_eq!(s[0], ("train_loss".to_string(), vec![(1.0, 0.7), (2.0, 0.5)]));
    assert_eq!(s[1], ("val_loss".to_string(), vec![(1.0, 0.6)]));
    loss_curve_png(&s, &dir.path().join("l.png"))?;
    std::fs::write(&log, "{\"epoch\":1}\nnot json\n")?;
    let err = series_from_jsonl(&log, &["loss"]).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl:2"), "{err}");
    Ok(())
}
