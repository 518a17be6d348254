//! Data benchmarks: synthetic images/s (BreakHis 700×460 PNG, all threads and one thread) and
//! reader scan time (with and without full decoding) on a generated set.
//! Run: `cargo bench --bench data` (prints figures; no harness).

use std::time::Instant;

use mpcs::data::synth::{generate_with, SynthOptions};
use mpcs::data::{breakhis, scan, Dataset};

/// CPU seconds used by this process so far (user + system), to report throughput per core
/// independently of how busy the machine is.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() {
    let tmp = std::env::temp_dir().join(format!("mpcs-data-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let threads = rayon::current_num_threads();
    println!("rayon threads: {threads}");

    let mut opts = SynthOptions::new(Dataset::BreakHis, 1);
    opts.patients = Some(16);
    let out = tmp.join("breakhis");
    let t = Instant::now();
    let c = cpu_seconds();
    let s = generate_with(&opts, &out).expect("generate");
    let dt = t.elapsed().as_secs_f64();
    let dc = cpu_seconds() - c;
    println!(
        "synth breakhis 700x460: {} images in {:.2} s = {:.1} images/s ({} threads; {:.1} images per CPU-second), {:.1} MB, {:.0} KB/image",
        s.images,
        dt,
        s.images as f64 / dt,
        threads,
        s.images as f64 / dc,
        s.bytes as f64 / 1e6,
        s.bytes as f64 / 1e3 / s.images as f64
    );

    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut one = SynthOptions::new(Dataset::BreakHis, 2);
    one.patients = Some(4);
    let out1 = tmp.join("breakhis-1t");
    let t = Instant::now();
    let s1 = pool.install(|| generate_with(&one, &out1)).expect("generate");
    let dt = t.elapsed().as_secs_f64();
    println!(
        "synth breakhis 700x460, 1 thread: {} images in {:.2} s = {:.1} images/s",
        s1.images,
        dt,
        s1.images as f64 / dt
    );

    for (kind, n) in [(Dataset::Bach, 1), (Dataset::BreastCell, 2)] {
        let mut o = SynthOptions::new(kind, 3);
        o.patients = Some(n);
        let dir = tmp.join(kind.name());
        let t = Instant::now();
        let s = generate_with(&o, &dir).expect("generate");
        let dt = t.elapsed().as_secs_f64();
        println!(
            "synth {kind} {}x{}: {} images in {:.2} s = {:.2} images/s",
            s.width,
            s.height,
            s.images,
            dt,
            s.images as f64 / dt
        );
    }

    for verify in [false, true] {
        let t = Instant::now();
        let recs = scan(Dataset::BreakHis, &out, verify).expect("scan");
        let dt = t.elapsed().as_secs_f64();
        let regions = breakhis::regions_at_all_magnifications(&recs);
        println!(
            "scan breakhis (verify_images={verify}): {} images, {} regions in {:.3} s = {:.0} images/s",
            recs.len(),
            regions.len(),
            dt,
            recs.len() as f64 / dt
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
