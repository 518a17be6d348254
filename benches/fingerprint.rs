//! Source fingerprinting: cold hashing throughput (GB/s) and the warm re-check of an unchanged folder of
//! 8,000 files through the stat cache. `cargo bench --bench fingerprint`.

use std::time::Instant;

use mpcs::cache::fingerprint::fingerprint_source;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let stat = dir.path().join("stat");

    // 8,000 files of 128 KiB (1 GiB), spread over 80 folders like a dataset.
    let data = dir.path().join("data");
    let mut x: u64 = 1;
    let block: Vec<u8> = (0..128 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for d in 0..80 {
        let sub = data.join(format!("patient_{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..100 {
            let mut b = block.clone();
            b[0] = d as u8;
            b[1] = f as u8;
            std::fs::write(sub.join(format!("img_{f:03}.png")), b).unwrap();
        }
    }
    // Make the files old so the stat cache trusts them.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for e in walk(&data) {
        std::fs::File::options().write(true).open(&e).unwrap().set_modified(old).unwrap();
    }
    // Drop the page cache is not possible unprivileged here; "cold" means no stat cache (every byte hashed).
    let t = Instant::now();
    let fp = fingerprint_source(&data, &stat).unwrap();
    let cold = t.elapsed().as_secs_f64();
    println!("{:<52} {:>10}", "measurement", "value");
    println!(
        "{:<52} {:>10.3} s",
        format!("cold fingerprint, {} files, {:.2} GB", fp.files, fp.bytes as f64 / 1e9),
        cold
    );
    println!("{:<52} {:>10.2} GB/s", "cold hashing throughput", fp.hashed_bytes as f64 / 1e9 / cold);
    let mut warm = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let again = fingerprint_source(&data, &stat).unwrap();
        warm.push(t.elapsed().as_secs_f64());
        assert_eq!(again.digest, fp.digest);
        assert_eq!(again.hashed_bytes, 0);
    }
    warm.sort_by(f64::total_cmp);
    println!("{:<52} {:>10.1} ms", "warm re-check of 8,000 unchanged files (median of 5)", warm[2] * 1e3);
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
