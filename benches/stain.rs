//! Stain-normalisation throughput on a 700×460 BreakHis image (fit once, normalise many), with PNG
//! decoding and encoding timed apart from the maths.
//!
//! `cargo bench --bench stain [-- --quick] [--no-rayon] [--only METHOD|png]` prints, per method:
//!
//! * `1-thread`: normalise one image after another inside a one-thread rayon pool (so Vahadane's
//!   internal parallelism runs on that thread too), as ms/image of wall and thread-CPU time; compare
//!   with the rows of `scripts/stain/bench_torchstain.py` (torchstain numpy, HistomicsTK, staintools
//!   and PIL on the same image and target, one thread);
//! * `rayon`: images/s with rayon over images on the global pool (left out with `--no-rayon`);
//! * `png decode` / `png encode`: the `image` crate's PNG codec on the same image, in memory.
//!
//! `scripts/stain/bench_alternate.sh` runs this bench and the Python script alternately.

use std::io::Cursor;
use std::path::Path;
use std::time::Instant;

use image::{ImageFormat, RgbImage};
use mpcs::stain::{load_rgb, Method, Normaliser};
use rayon::prelude::*;

enum Only {
    All,
    Method(Method),
    Png,
}

fn main() {
    let fix = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stain");
    let img = load_rgb(&fix.join("bh_f_full.png")).expect("bench image");
    let target = load_rgb(&fix.join("ts_target.png")).expect("target image");
    assert_eq!((img.width(), img.height()), (700, 460));
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let no_rayon = args.iter().any(|a| a == "--no-rayon");
    // `--only METHOD` times one method (for profiling); `--only png` the codec alone
    let only = match args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)) {
        None => Only::All,
        Some(p) if p == "png" => Only::Png,
        Some(m) => Only::Method(m.parse().expect("method name or png")),
    };
    // `--dump DIR`: write every method's output for every fixture (to compare two builds), then stop
    if let Some(dir) = args.iter().position(|a| a == "--dump").and_then(|i| args.get(i + 1)) {
        dump(&fix, Path::new(dir), &target);
        return;
    }
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("one-thread pool");
    println!(
        "stain bench: {}x{} image, target ts_target.png, rayon threads {}, cpu {}",
        img.width(),
        img.height(),
        rayon::current_num_threads(),
        cpu_model()
    );
    for method in Method::ALL {
        match only {
            Only::Method(m) if m != method => continue,
            Only::Png => continue,
            _ => {}
        }
        let norm = Normaliser::fit(method, &target).expect("fit");
        let n = match (method, quick) {
            (Method::Vahadane, true) => 3,
            (Method::Vahadane, false) => 10,
            (_, true) => 10,
            _ => 60,
        };
        // warm-up (and the bench image is tissue: it must not pass through)
        assert!(!one.install(|| norm.normalise(&img)).passed_through);
        let (wall, cpu) = one.install(|| {
            time(n, || {
                std::hint::black_box(norm.normalise(std::hint::black_box(&img)));
            })
        });
        println!("rs {:<30} {wall:8.2} ms/image wall {cpu:8.2} ms/image thread-CPU (1-thread pool)", method.as_str());
        if !no_rayon {
            let imgs: Vec<&RgbImage> = (0..n.max(rayon::current_num_threads() * 4)).map(|_| &img).collect();
            let t = Instant::now();
            imgs.par_iter().for_each(|i| {
                std::hint::black_box(norm.normalise(i));
            });
            let par = imgs.len() as f64 / t.elapsed().as_secs_f64();
            println!("rs {:<30} {par:8.1} images/s rayon over images", method.as_str());
        }
    }
    if matches!(only, Only::All | Only::Png) {
        let bytes = std::fs::read(fix.join("bh_f_full.png")).expect("bench image bytes");
        let n = if quick { 10 } else { 60 };
        let decode = || image::load_from_memory_with_format(&bytes, ImageFormat::Png).expect("decode").to_rgb8();
        assert_eq!(decode(), img);
        let (wall, cpu) = one.install(|| {
            time(n, || {
                std::hint::black_box(decode());
            })
        });
        println!("rs {:<30} {wall:8.2} ms/image wall {cpu:8.2} ms/image thread-CPU", "png decode");
        // the same encoder settings as `save_png_atomic`
        let encode = || {
            let mut buf = Cursor::new(Vec::new());
            img.write_to(&mut buf, ImageFormat::Png).expect("encode");
            buf.into_inner().len()
        };
        let (wall, cpu) = one.install(|| {
            time(n, || {
                std::hint::black_box(encode());
            })
        });
        println!("rs {:<30} {wall:8.2} ms/image wall {cpu:8.2} ms/image thread-CPU", "png encode");
        println!("rs png encode size {} bytes (input file {} bytes)", encode(), bytes.len());
    }
}

fn dump(fix: &Path, dir: &Path, target: &RgbImage) {
    std::fs::create_dir_all(dir).expect("dump folder");
    for method in Method::ALL {
        let norm = Normaliser::fit(method, target).expect("fit");
        println!("{method} target {:?}", norm.target());
        for name in ["bh_dc", "bh_f_full", "bh_pt", "henorm1", "henorm2", "ts_source", "ts_target"] {
            let img = load_rgb(&fix.join(format!("{name}.png"))).expect("fixture");
            let out = norm.normalise(&img);
            out.image.save(dir.join(format!("{method}_{name}.png"))).expect("write");
        }
    }
}

/// Runs `f` `n` times on the calling thread: (wall, thread-CPU) milliseconds per call.
fn time(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let t = Instant::now();
    let cpu = thread_cpu_s();
    for _ in 0..n {
        f();
    }
    let cpu_ms = (thread_cpu_s() - cpu) * 1000.0 / n as f64;
    (t.elapsed().as_secs_f64() * 1000.0 / n as f64, cpu_ms)
}

/// CPU time of the calling thread: on a shared, loaded machine it is a steadier measure than wall
/// time (compare with Python's `time.thread_time()` in bench_torchstain.py).
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The CPU's name from /proc/cpuinfo (Linux), so a figure can be read.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
