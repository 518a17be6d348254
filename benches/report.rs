//! Exact t-SNE wall time (1000 iterations, perplexity 30, 50-d Gaussian clusters) and plot/HTML rendering
//! time. Run: `cargo bench --bench report`. Peer figure: scripts/report/bench_sklearn.py (sklearn exact).

use std::time::Instant;

use mpcs::report::{confusion_png, loss_curve_png, tsne_with, write_report, Figure, Report, Section, TsneConfig};

fn clusters(n: usize, d: usize) -> Vec<Vec<f32>> {
    let mut rng = mpcs::split::SplitMix64::new(1);
    (0..n)
        .map(|i| {
            (0..d)
                .map(|k| {
                    let u = (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32;
                    u * 2.0 - 1.0 + if k == i % 5 { 6.0 } else { 0.0 }
                })
                .collect()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    println!("threads: {}", rayon::current_num_threads());
    for n in [250, 500, 1000] {
        let x = clusters(n, 50);
        let t = Instant::now();
        let r = tsne_with(&x, &TsneConfig::new(30.0, 1000, 0))?;
        println!(
            "t-SNE exact n={n}: {:.2} s (final KL {:.3})",
            t.elapsed().as_secs_f64(),
            r.kl.last().map(|k| k.1).unwrap_or(f64::NAN)
        );
    }
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let series: Vec<(f64, f64)> = (1..=100).map(|e| (e as f64, 1.0 / e as f64)).collect();
    loss_curve_png(&[("train".into(), series.clone()), ("val".into(), series)], &dir.path().join("l.png"))?;
    let names: Vec<String> = (0..8).map(|i| format!("class {i}")).collect();
    let m: Vec<Vec<usize>> = (0..8).map(|i| (0..8).map(|j| if i == j { 50 } else { i + j }).collect()).collect();
    confusion_png(&m, &names, &dir.path().join("c.png"))?;
    println!("loss curve + 8-class confusion PNGs: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let fig = Figure::from_file(&dir.path().join("l.png"), "loss")?;
    let report = Report {
        title: "bench".into(),
        sections: vec![Section { heading: "s".into(), images: vec![fig; 20], ..Default::default() }],
        ..Default::default()
    };
    write_report(&report, &dir.path().join("r.html"))?;
    println!("HTML report with 20 figures: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
