//! Stain-normalisation throughput on a 700×460 BreakHis image (fit once, normalise many).
//!
//! `cargo bench --bench stain` prints images/s per method, single-threaded (wall and thread CPU
//! time per image) and with rayon over images. Vahadane's fit itself uses rayon, so its
//! "single-thread" row is one image at a time rather than one thread. Compare with `python scripts/stain/bench_torchstain.py` (torchstain numpy on the same
//! image and target).

use std::path::Path;
use std::time::Instant;

use mpcs::stain::{load_rgb, Method, Normaliser, RgbImage};
use rayon::prelude::*;

fn main() {
    let fix = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stain");
    let img = load_rgb(&fix.join("bh_f_full.png")).expect("bench image");
    let target = load_rgb(&fix.join("ts_target.png")).expect("target image");
    assert_eq!((img.width(), img.height()), (700, 460));
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only METHOD` times one method (for profiling)
    let only: Option<Method> =
        args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(|m| m.parse().expect("method name"));
    println!(
        "stain bench: {}x{} image, target ts_target.png, rayon threads {}",
        img.width(),
        img.height(),
        rayon::current_num_threads()
    );
    for method in [Method::Macenko, Method::Reinhard, Method::ReinhardLab, Method::Vahadane] {
        if only.is_some_and(|o| o != method) {
            continue;
        }
        let norm = Normaliser::fit(method, &target).expect("fit");
        let n = match (method, quick) {
            (Method::Vahadane, _) => 4,
            (_, true) => 10,
            _ => 60,
        };
        bench(method, &norm, &img, n);
    }
}

/// CPU time of the calling thread: on a shared, loaded machine it is a steadier measure than wall
/// time (compare with Python's `time.thread_time()` in bench_torchstain.py).
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn bench(method: Method, norm: &Normaliser, img: &RgbImage, n: usize) {
    // warm-up
    assert!(!norm.normalise(img).passed_through);
    let t = Instant::now();
    let cpu = thread_cpu_s();
    for _ in 0..n {
        std::hint::black_box(norm.normalise(std::hint::black_box(img)));
    }
    let cpu_ms = (thread_cpu_s() - cpu) * 1000.0 / n as f64;
    let single = n as f64 / t.elapsed().as_secs_f64();
    let imgs: Vec<&RgbImage> = (0..n).map(|_| img).collect();
    let t = Instant::now();
    imgs.par_iter().for_each(|i| {
        std::hint::black_box(norm.normalise(i));
    });
    let par = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "{:<13} {:>8.1} images/s single-thread ({:>7.2} ms/image wall, {:>7.2} ms/image thread CPU), {:>8.1} images/s rayon",
        method.as_str(),
        single,
        1000.0 / single,
        cpu_ms,
        par
    );
}
