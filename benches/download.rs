//! Download throughput and memory figures (prints them; not a pass/fail test).
//!
//! `cargo bench --bench download` (size: MPCS_BENCH_MB, default 256). Figures:
//! - HTTP over loopback from a local std::net server streaming a file, pinned sha256 and pinned blake3;
//! - file:// copy with sha256;
//! - fetch + unpack of a .tar.gz of incompressible "images" (like PNGs);
//! - peak resident memory of the whole process (server included), to show the body is streamed, not buffered.

use mpcs::download::{fetch, Digest, DigestAlgo, FetchOptions};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

fn noise_file(path: &Path, bytes: u64, seed: u64) {
    let mut out = std::io::BufWriter::new(File::create(path).unwrap());
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
}

fn hash_file(path: &Path, algo: DigestAlgo) -> String {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    match algo {
        DigestAlgo::Sha256 => {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break format!("{:x}", h.finalize());
                }
                h.update(&buf[..n]);
            }
        }
        DigestAlgo::Blake3 => {
            let mut h = blake3::Hasher::new();
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break h.finalize().to_hex().to_string();
                }
                h.update(&buf[..n]);
            }
        }
    }
}

/// Serve `file` to `conns` connections (200, Content-Length, streamed from disk), then stop.
fn serve(file: PathBuf, conns: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(conns) {
            let Ok(stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let mut out = stream;
            let len = fs::metadata(&file).unwrap().len();
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: \"b\"\r\nConnection: close\r\n\r\n");
            if out.write_all(head.as_bytes()).is_err() {
                continue;
            }
            let _ = std::io::copy(&mut File::open(&file).unwrap(), &mut out);
        }
    });
    format!("http://{addr}/blob.bin")
}

fn peak_rss_mb() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn timed(label: &str, mb: f64, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    let s = t.elapsed().as_secs_f64();
    println!("{label:<44} {s:>7.2} s  {:>8.1} MB/s", mb / s);
}

fn main() {
    let mb: u64 = std::env::var("MPCS_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let src = root.join("blob.bin");
    noise_file(&src, mb << 20, 1);
    let quiet = |_: u64, _: Option<u64>| {};
    println!("download bench: {mb} MiB body; peak RSS after setup {:.1} MB", peak_rss_mb().unwrap_or(f64::NAN));

    for algo in [DigestAlgo::Sha256, DigestAlgo::Blake3] {
        let url = serve(src.clone(), 1);
        let mut opts = FetchOptions::new(url);
        opts.digest = Some(Digest::parse(algo, &hash_file(&src, algo)).unwrap());
        let out = root.join(format!("out-http-{}", algo.name()));
        timed(&format!("http loopback, pinned {}", algo.name()), mb as f64, || {
            fetch(&opts, &out, &root.join("scratch"), &quiet).unwrap();
        });
        fs::remove_dir_all(&out).unwrap();
    }
    println!("peak RSS after HTTP downloads: {:.1} MB", peak_rss_mb().unwrap_or(f64::NAN));

    let opts = FetchOptions::new(format!("file://{}", src.display()));
    let out = root.join("out-file");
    timed("file:// copy, sha256", mb as f64, || {
        fetch(&opts, &out, &root.join("scratch"), &quiet).unwrap();
    });
    fs::remove_dir_all(&out).unwrap();
    fs::remove_file(&src).unwrap();

    // A BreakHis-like archive: many ~200 KB incompressible files in class/magnification folders.
    let files = ((mb << 20) / (200 << 10)).max(1);
    let tgz = root.join("BreaKHis_v1.tar.gz");
    {
        let enc = flate2::write::GzEncoder::new(File::create(&tgz).unwrap(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(enc);
        let one = root.join("one.png");
        for i in 0..files {
            noise_file(&one, 200 << 10, i + 7);
            let mag = ["40X", "100X", "200X", "400X"][(i % 4) as usize];
            tar.append_path_with_name(&one, format!("BreaKHis_v1/benign/{mag}/img{i:05}.png")).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }
    let opts = FetchOptions::new(format!("file://{}", tgz.display()));
    let out = root.join("out-tgz");
    let tgz_mb = fs::metadata(&tgz).unwrap().len() as f64 / (1 << 20) as f64;
    timed(&format!("file:// .tar.gz fetch+unpack, {files} files"), tgz_mb, || {
        let got = fetch(&opts, &out, &root.join("scratch"), &quiet).unwrap();
        assert_eq!(got.files.len() as u64, files);
    });
    println!("peak RSS at end: {:.1} MB", peak_rss_mb().unwrap_or(f64::NAN));
}
