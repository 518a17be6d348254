//! Download stage tests against a real HTTP/1.1 server on 127.0.0.1 (std::net, started per test, stops by itself),
//! plus file:// URLs and hand-built hostile archives.

use mpcs::download::{fetch, ArchiveKind, Digest, DownloadError, FetchOptions, PART_NAME, SIDECAR_NAME};
use sha2::Digest as _;
use std::cell::RefCell;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server: one response per connection (Connection: close), Range/If-Range support, a mode that cuts
// the body half-way, a 302 redirect path. Bounded: at most 32 connections and 30 s, and it stops when dropped.

struct Cfg {
    status: u16,
    body: Vec<u8>,
    etag: Option<String>,
    honor_range: bool,
    /// Answer Range requests with 206 even when If-Range no longer matches (a broken server).
    ignore_if_range: bool,
    /// The next this-many body responses are cut after half of their body.
    cut_next: usize,
}

#[derive(Clone, Debug)]
struct Req {
    path: String,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

struct Server {
    addr: SocketAddr,
    cfg: Arc<Mutex<Cfg>>,
    log: Arc<Mutex<Vec<Req>>>,
    /// Body bytes actually sent by each cut response.
    cut_sent: Arc<Mutex<Vec<usize>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Server {
    fn start(body: Vec<u8>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let server = Server {
            addr: listener.local_addr().unwrap(),
            cfg: Arc::new(Mutex::new(Cfg {
                status: 200,
                body,
                etag: Some("\"v1\"".into()),
                honor_range: true,
                ignore_if_range: false,
                cut_next: 0,
            })),
            log: Arc::default(),
            cut_sent: Arc::default(),
            stop: Arc::default(),
        };
        let (cfg, log, cut_sent, stop) =
            (server.cfg.clone(), server.log.clone(), server.cut_sent.clone(), server.stop.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut served = 0;
            while served < 32 && Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        let _ = handle(stream, &cfg, &log, &cut_sent);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    fn set(&self, f: impl FnOnce(&mut Cfg)) {
        f(&mut self.cfg.lock().unwrap());
    }
}

fn handle(
    stream: TcpStream,
    cfg: &Mutex<Cfg>,
    log: &Mutex<Vec<Req>>,
    cut_sent: &Mutex<Vec<usize>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = Vec::new();
    for _ in 0..100 {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let req = Req { path, headers };
    log.lock().unwrap().push(req.clone());
    let mut out = stream;

    if req.path.starts_with("/redirect") {
        let target = req.path.replacen("/redirect", "", 1);
        let head =
            format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return out.write_all(head.as_bytes());
    }

    let mut cfg = cfg.lock().unwrap();
    if cfg.status != 200 {
        let body = b"nope";
        let head =
            format!("HTTP/1.1 {} Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", cfg.status, body.len());
        out.write_all(head.as_bytes())?;
        return out.write_all(body);
    }
    let len = cfg.body.len();
    let mut head = String::new();
    let mut start = 0;
    let range = req
        .header("Range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let if_range_ok = match (req.header("If-Range"), &cfg.etag) {
        _ if cfg.ignore_if_range => true,
        (None, _) => true,
        (Some(v), Some(e)) => v == e,
        (Some(_), None) => false,
    };
    match range {
        Some(n) if cfg.honor_range && if_range_ok && n >= len => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return out.write_all(head.as_bytes());
        }
        Some(n) if cfg.honor_range && if_range_ok => {
            start = n;
            head.push_str("HTTP/1.1 206 Partial Content\r\n");
            head.push_str(&format!("Content-Range: bytes {n}-{}/{len}\r\n", len - 1));
        }
        _ => head.push_str("HTTP/1.1 200 OK\r\n"),
    }
    if let Some(e) = &cfg.etag {
        head.push_str(&format!("ETag: {e}\r\n"));
    }
    if cfg.honor_range {
        head.push_str("Accept-Ranges: bytes\r\n");
    }
    let cut = cfg.cut_next > 0;
    if cut {
        cfg.cut_next -= 1;
    }
    let slice = &cfg.body[start..];
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", slice.len()));
    out.write_all(head.as_bytes())?;
    if cut {
        let half = slice.len() / 2;
        out.write_all(&slice[..half])?;
        out.flush()?;
        cut_sent.lock().unwrap().push(half);
        // Dropping the stream closes the connection with the body unfinished.
        return Ok(());
    }
    out.write_all(slice)
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

/// Deterministic incompressible bytes (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compare a file with the expected bytes without dumping megabytes on failure.
fn assert_same(path: &Path, expected: &[u8]) {
    let got = fs::read(path).unwrap();
    assert!(
        got == expected,
        "{}: {} bytes (sha256 {}) but expected {} bytes (sha256 {})",
        path.display(),
        got.len(),
        sha256_hex(&got),
        expected.len(),
        sha256_hex(expected)
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(bytes))
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    out: PathBuf,
    scratch: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::create_dir_all(root.join("cache")).unwrap();
        Dirs { out: root.join("cache/out"), scratch: root.join("scratch"), root, _tmp: tmp }
    }

    fn part(&self) -> PathBuf {
        self.scratch.join(PART_NAME)
    }

    fn sidecar(&self) -> PathBuf {
        self.scratch.join(SIDECAR_NAME)
    }

    /// After a failure: no output, no staging directory beside it, no partial download.
    fn assert_nothing_kept(&self) {
        assert!(!self.out.exists(), "output directory was left behind");
        let left: Vec<_> = fs::read_dir(self.root.join("cache")).unwrap().collect();
        assert!(left.is_empty(), "staging left in the output parent: {left:?}");
        assert!(!self.part().exists(), "partial download kept");
        assert!(!self.sidecar().exists(), "sidecar kept");
    }
}

fn quick(url: String) -> FetchOptions {
    let mut o = FetchOptions::new(url);
    o.retries = 0;
    o.retry_delay = Duration::from_millis(10);
    o.read_timeout = Duration::from_secs(10);
    o.connect_timeout = Duration::from_secs(5);
    o
}

fn no_progress(_: u64, _: Option<u64>) {}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

// ---------------------------------------------------------------------------------------------------------------
// Transfers.

#[test]
fn full_transfer_with_pinned_digest_and_progress() {
    let body = noise(700_000, 1);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let mut opts = quick(server.url("/data/blob.bin"));
    opts.digest = Some(Digest::sha256(&sha256_hex(&body).to_uppercase()).unwrap());
    let seen = RefCell::new(Vec::new());
    let progress = |done: u64, total: Option<u64>| seen.borrow_mut().push((done, total));
    let got = fetch(&opts, &d.out, &d.scratch, &progress).unwrap();

    assert_eq!(got.files, vec![PathBuf::from("blob.bin")]);
    assert_same(&d.out.join("blob.bin"), &body);
    assert_eq!(got.bytes, body.len() as u64);
    assert_eq!(got.digest.hex, sha256_hex(&body));
    assert!(got.pinned && got.pin_hint().is_none());
    assert_eq!(got.resumed_from, 0);
    assert_eq!(got.unpacked, None);
    assert!(!d.part().exists() && !d.sidecar().exists());

    let seen = seen.into_inner();
    assert_eq!(seen.last(), Some(&(body.len() as u64, Some(body.len() as u64))));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "progress went backwards");

    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].header("User-Agent").unwrap().starts_with("mpcs/"));
    assert!(reqs[0].header("Range").is_none());
}

#[test]
fn unpinned_download_reports_sha256_to_pin() {
    let body = noise(10_000, 2);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let got = fetch(&quick(server.url("/x.bin")), &d.out, &d.scratch, &no_progress).unwrap();
    assert!(!got.pinned);
    assert_eq!(got.pin_hint().unwrap(), format!("add sha256 = \"{}\" to pin it", sha256_hex(&body)));
}

#[test]
fn cut_transfer_resumes_with_range_request() {
    let body = noise(600_001, 3);
    let server = Server::start(body.clone());
    server.set(|c| c.cut_next = 1);
    let d = Dirs::new();
    let mut opts = quick(server.url("/blob.bin"));
    opts.digest = Some(Digest::sha256(&sha256_hex(&body)).unwrap());

    // First run: the connection dies half-way, no retries allowed -> error, partial kept for the next run.
    let err = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(matches!(err, DownloadError::Network { .. }), "{err}");
    assert!(err.to_string().contains("kept and resumed"), "{err}");
    let half = server.cut_sent.lock().unwrap()[0] as u64;
    assert!(half > 0 && half < body.len() as u64);
    assert_eq!(fs::metadata(d.part()).unwrap().len(), half);
    assert!(d.sidecar().exists());
    assert!(!d.out.exists());

    // Second run continues from the partial length.
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("Range"), Some(format!("bytes={half}-").as_str()));
    assert_eq!(reqs[1].header("If-Range"), Some("\"v1\""));
    assert_eq!(got.resumed_from, half);
    assert_eq!(got.bytes, body.len() as u64);
    assert_same(&d.out.join("blob.bin"), &body);
    assert!(!d.part().exists() && !d.sidecar().exists());
}

#[test]
fn cut_transfer_is_retried_within_one_call() {
    let body = noise(400_000, 4);
    let server = Server::start(body.clone());
    server.set(|c| c.cut_next = 2);
    let d = Dirs::new();
    let mut opts = quick(server.url("/blob.bin"));
    opts.retries = 3;
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    assert_same(&d.out.join("blob.bin"), &body);
    assert_eq!(got.digest.hex, sha256_hex(&body));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    let cuts = server.cut_sent.lock().unwrap().clone();
    assert_eq!(reqs[1].header("Range"), Some(format!("bytes={}-", cuts[0]).as_str()));
    assert_eq!(reqs[2].header("Range"), Some(format!("bytes={}-", cuts[0] + cuts[1]).as_str()));
}

#[test]
fn cancel_keeps_partial_and_rerun_resumes() {
    let body = noise(2_000_000, 17);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let mut opts = quick(server.url("/blob.bin"));
    let flag = Arc::new(AtomicBool::new(false));
    opts.cancel = Some(flag.clone());
    // Cancel from the progress callback once some bytes are in, as a SIGINT handler would.
    let cancel_early = |done: u64, _: Option<u64>| {
        if done > 0 {
            flag.store(true, Ordering::SeqCst);
        }
    };
    let err = fetch(&opts, &d.out, &d.scratch, &cancel_early).unwrap_err();
    assert!(matches!(err, DownloadError::Cancelled { .. }), "{err}");
    let kept = fs::metadata(d.part()).unwrap().len();
    assert!(kept > 0 && kept < body.len() as u64, "kept {kept}");
    assert!(!d.out.exists());

    flag.store(false, Ordering::SeqCst);
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.resumed_from, kept);
    assert_eq!(server.requests()[1].header("Range"), Some(format!("bytes={kept}-").as_str()));
    assert_same(&d.out.join("blob.bin"), &body);
}

#[test]
fn retries_are_bounded() {
    let server = Server::start(noise(100_000, 5));
    server.set(|c| c.cut_next = 100);
    let d = Dirs::new();
    let mut opts = quick(server.url("/blob.bin"));
    opts.retries = 2;
    let err = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    match err {
        DownloadError::Network { attempts, .. } => assert_eq!(attempts, 3),
        other => panic!("{other}"),
    }
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn server_ignoring_range_restarts_from_zero() {
    let body = noise(500_000, 6);
    let server = Server::start(body.clone());
    server.set(|c| {
        c.cut_next = 1;
        c.honor_range = false;
    });
    let d = Dirs::new();
    let opts = quick(server.url("/blob.bin"));
    fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(d.part().exists());

    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    let reqs = server.requests();
    assert!(reqs[1].header("Range").is_some(), "the client should have asked to resume");
    assert_eq!(got.resumed_from, 0, "a 200 answer must restart, not append");
    assert_same(&d.out.join("blob.bin"), &body);
}

#[test]
fn changed_remote_file_is_not_spliced() {
    let old = noise(300_000, 7);
    let new = noise(320_000, 8);
    let server = Server::start(old);
    server.set(|c| c.cut_next = 1);
    let d = Dirs::new();
    let opts = quick(server.url("/blob.bin"));
    fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();

    server.set(|c| {
        c.body = new.clone();
        c.etag = Some("\"v2\"".into());
    });
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(server.requests()[1].header("If-Range"), Some("\"v1\""));
    assert_eq!(got.resumed_from, 0);
    assert_same(&d.out.join("blob.bin"), &new);
}

#[test]
fn changed_remote_file_is_not_spliced_even_if_server_ignores_if_range() {
    let old = noise(300_000, 15);
    let new = noise(300_000, 16);
    let server = Server::start(old);
    server.set(|c| c.cut_next = 1);
    let d = Dirs::new();
    let opts = quick(server.url("/blob.bin"));
    fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();

    server.set(|c| {
        c.body = new.clone();
        c.etag = Some("\"v2\"".into());
        c.ignore_if_range = true;
    });
    // The 206 carries ETag v2: the client drops its v1 bytes and restarts from zero (third request, no Range).
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    assert!(reqs[1].header("Range").is_some());
    assert!(reqs[2].header("Range").is_none());
    assert_eq!(got.resumed_from, 0);
    assert_same(&d.out.join("blob.bin"), &new);
}

#[test]
fn complete_partial_answered_416_is_finished_without_refetch() {
    // A crash after the last byte but before the move: the part file is whole, the server answers 416.
    let body = noise(50_000, 9);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let url = server.url("/blob.bin");
    fs::create_dir_all(&d.scratch).unwrap();
    fs::write(d.part(), &body).unwrap();
    let sidecar = serde_json::json!({
        "url": url, "etag": "\"v1\"", "last_modified": null, "total": body.len(), "bytes": body.len()
    });
    fs::write(d.sidecar(), sidecar.to_string()).unwrap();
    let got = fetch(&quick(url), &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(server.requests().len(), 1);
    assert_eq!(got.digest.hex, sha256_hex(&body));
    assert_same(&d.out.join("blob.bin"), &body);
}

#[test]
fn wrong_digest_is_an_error_that_keeps_nothing() {
    let body = noise(200_000, 10);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let mut opts = quick(server.url("/blob.bin"));
    let wrong = "0".repeat(64);
    opts.digest = Some(Digest::sha256(&wrong).unwrap());
    let err = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(&wrong) && msg.contains(&sha256_hex(&body)), "{msg}");
    d.assert_nothing_kept();
}

#[test]
fn blake3_pin_is_checked() {
    let body = noise(100_000, 11);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let mut opts = quick(server.url("/blob.bin"));
    opts.digest = Some(Digest::blake3(blake3::hash(&body).to_hex().as_str()).unwrap());
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.digest.algo.name(), "blake3");

    let d = Dirs::new();
    opts.digest = Some(Digest::blake3(&"ab".repeat(32)).unwrap());
    let err = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(err.to_string().contains("blake3 mismatch"), "{err}");
    d.assert_nothing_kept();
}

#[test]
fn known_answer_digests() {
    // Published test vectors for "abc" (FIPS 180-2 for sha256; the BLAKE3 reference implementation).
    let d = Dirs::new();
    let src = d.root.join("abc.txt");
    fs::write(&src, b"abc").unwrap();
    let mut opts = quick(file_url(&src));
    opts.digest = Some(Digest::sha256("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad").unwrap());
    fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    let out2 = d.root.join("cache/out2");
    opts.digest = Some(Digest::blake3("6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85").unwrap());
    fetch(&opts, &out2, &d.scratch, &no_progress).unwrap();
}

#[test]
fn bad_pinned_digest_text_is_rejected() {
    assert!(Digest::sha256("abc").is_err());
    assert!(Digest::sha256(&"g".repeat(64)).is_err());
}

#[test]
fn zero_byte_download_is_an_error() {
    let server = Server::start(Vec::new());
    let d = Dirs::new();
    let err = fetch(&quick(server.url("/empty.bin")), &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(matches!(err, DownloadError::Empty { .. }), "{err}");
    d.assert_nothing_kept();
}

#[test]
fn not_found_names_status_and_url_without_retrying() {
    let server = Server::start(b"x".to_vec());
    server.set(|c| c.status = 404);
    let d = Dirs::new();
    let mut opts = quick(server.url("/missing.tar.gz"));
    opts.retries = 3;
    let err = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::Http { status: 404, .. }), "{msg}");
    assert!(msg.contains("404") && msg.contains("/missing.tar.gz"), "{msg}");
    assert_eq!(server.requests().len(), 1);
    assert!(!d.out.exists());
}

#[test]
fn redirects_are_followed() {
    let body = noise(20_000, 12);
    let server = Server::start(body.clone());
    let d = Dirs::new();
    let mut opts = quick(server.url("/redirect/real.bin"));
    opts.filename = Some("named.bin".into());
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.files, vec![PathBuf::from("named.bin")]);
    assert_same(&d.out.join("named.bin"), &body);
    let reqs = server.requests();
    assert_eq!(reqs[1].path, "/real.bin");
}

#[test]
fn connection_refused_is_a_network_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = Dirs::new();
    let mut opts = quick(format!("http://127.0.0.1:{port}/x.bin"));
    opts.retries = 1;
    let err = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(matches!(err, DownloadError::Network { attempts: 2, .. }), "{err}");
}

#[test]
fn unsupported_scheme_and_nonempty_output_are_refused() {
    let d = Dirs::new();
    let err = fetch(&quick("ftp://example.org/x".into()), &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(matches!(err, DownloadError::BadUrl { .. }), "{err}");

    fs::create_dir_all(&d.out).unwrap();
    fs::write(d.out.join("old"), b"x").unwrap();
    let src = d.root.join("a.bin");
    fs::write(&src, b"data").unwrap();
    let err = fetch(&quick(file_url(&src)), &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(matches!(err, DownloadError::OutputNotEmpty { .. }), "{err}");
    assert_eq!(fs::read(d.out.join("old")).unwrap(), b"x");
}

#[test]
fn file_url_plain_file() {
    let d = Dirs::new();
    let dir = d.root.join("src dir");
    fs::create_dir_all(&dir).unwrap();
    let body = noise(3_000_000, 13);
    fs::write(dir.join("slide 1.svs"), &body).unwrap();
    let url = format!("file://{}/slide%201.svs", dir.display()).replace(' ', "%20");
    let got = fetch(&quick(url), &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.files, vec![PathBuf::from("slide 1.svs")]);
    assert_same(&d.out.join("slide 1.svs"), &body);
    assert_eq!(got.digest.hex, sha256_hex(&body));

    let d2 = Dirs::new();
    let err = fetch(&quick(file_url(&d2.root.join("nope"))), &d2.out, &d2.scratch, &no_progress).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Archives.

/// A tar header with raw name/link bytes, so hostile names the tar crate would refuse to write can be built.
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, link: &[u8]) -> tar::Header {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

enum E<'a> {
    File(&'a [u8], &'a [u8]),
    Dir(&'a [u8]),
    Sym(&'a [u8], &'a [u8]),
    Hard(&'a [u8], &'a [u8]),
}

fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::File(n, data) => {
                b.append(&raw_header(n, tar::EntryType::Regular, data.len() as u64, b""), *data).unwrap()
            }
            E::Dir(n) => b.append(&raw_header(n, tar::EntryType::Directory, 0, b""), &[][..]).unwrap(),
            E::Sym(n, t) => b.append(&raw_header(n, tar::EntryType::Symlink, 0, t), &[][..]).unwrap(),
            E::Hard(n, t) => b.append(&raw_header(n, tar::EntryType::Link, 0, t), &[][..]).unwrap(),
        }
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    g.write_all(bytes).unwrap();
    g.finish().unwrap()
}

/// Fetch `archive` (stored as `name`) via file:// into a fresh out dir and expect an unsafe-entry refusal that
/// leaves nothing behind anywhere.
fn assert_refused(name: &str, archive: &[u8], needle: &str) {
    let d = Dirs::new();
    // Nest the output deep enough that `../evil` from it or its staging dir lands inside the temp root.
    let src = d.root.join(name);
    fs::write(&src, archive).unwrap();
    let before = list_tree(&d.root);
    let err = fetch(&quick(file_url(&src)), &d.out, &d.scratch, &no_progress).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DownloadError::UnsafeEntry { .. }), "{name}: {msg}");
    assert!(msg.contains(needle), "{name}: `{needle}` not in: {msg}");
    d.assert_nothing_kept();
    let mut after = list_tree(&d.root);
    after.retain(|p| !p.starts_with("scratch"));
    let mut before = before;
    before.retain(|p| !p.starts_with("scratch"));
    assert_eq!(before, after, "{name}: something was written outside");
}

fn list_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn tar_with_parent_dir_entry_is_refused() {
    let t = tar_bytes(&[E::File(b"ok.txt", b"fine"), E::File(b"../evil", b"gotcha")]);
    assert_refused("bad.tar", &t, "`..`");
    assert_refused("bad.tar.gz", &gzip(&t), "`..`");
    let t = tar_bytes(&[E::File(b"a/../../evil", b"gotcha")]);
    assert_refused("bad2.tar", &t, "`..`");
}

#[test]
fn tar_with_absolute_path_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("abs_evil");
    let t = tar_bytes(&[E::File(target.to_str().unwrap().as_bytes(), b"gotcha")]);
    assert_refused("abs.tar", &t, "absolute");
    assert!(!target.exists());
}

#[test]
fn tar_with_symlinks_leaving_the_tree_is_refused() {
    let t = tar_bytes(&[E::Sym(b"etc", b"/etc"), E::File(b"etc/evil_passwd", b"x")]);
    assert_refused("sym_abs.tar", &t, "absolute path /etc");
    let t = tar_bytes(&[E::Dir(b"a/"), E::Sym(b"a/up", b"../../outside")]);
    assert_refused("sym_rel.tar", &t, "points outside");
    // Each link looks inside on its own; the chain leaves the tree. Only the final real resolution catches it.
    let t = tar_bytes(&[E::Dir(b"x/"), E::Sym(b"x/d", b".."), E::Sym(b"e", b"x/d/../..")]);
    assert_refused("sym_chain.tar", &t, "outside");
    // A file written through an in-tree symlink that points up.
    let t = tar_bytes(&[E::Dir(b"x/"), E::Sym(b"x/d", b".."), E::Sym(b"x/d/l", b"../y")]);
    assert_refused("sym_through.tar", &t, "through a symlink");
    let t = tar_bytes(&[E::Hard(b"pw", b"../../../../etc/passwd")]);
    assert_refused("hard.tar", &t, "outside");
    let t = tar_bytes(&[E::Hard(b"pw", b"/etc/passwd")]);
    assert_refused("hard_abs.tar", &t, "outside");
}

#[test]
fn zip_with_parent_dir_or_absolute_entry_is_refused() {
    use zip::write::SimpleFileOptions;
    let build = |name: &str| {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        z.start_file("ok.txt", SimpleFileOptions::default()).unwrap();
        z.write_all(b"fine").unwrap();
        z.start_file(name, SimpleFileOptions::default()).unwrap();
        z.write_all(b"gotcha").unwrap();
        z.finish().unwrap().into_inner()
    };
    assert_refused("bad.zip", &build("../evil"), "`..`");
    assert_refused("bad2.zip", &build("sub/../../evil"), "`..`");
    assert_refused("bad3.zip", &build("..\\evil"), "`..`");
    assert_refused("abs.zip", &build("/tmp/mpcs_zip_abs_evil"), "absolute");

    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    z.add_symlink("etc", "/etc", SimpleFileOptions::default()).unwrap();
    let bytes = z.finish().unwrap().into_inner();
    assert_refused("sym.zip", &bytes, "absolute path /etc");
}

#[test]
fn corrupt_archive_is_a_clear_error() {
    let d = Dirs::new();
    let src = d.root.join("broken.tar.gz");
    let mut bytes = gzip(&tar_bytes(&[E::File(b"a.txt", &noise(50_000, 14))]));
    bytes.truncate(bytes.len() / 2);
    fs::write(&src, &bytes).unwrap();
    let err = fetch(&quick(file_url(&src)), &d.out, &d.scratch, &no_progress).unwrap_err();
    assert!(matches!(err, DownloadError::BadArchive { .. }), "{err}");
    d.assert_nothing_kept();
}

fn good_tree_tar() -> Vec<u8> {
    tar_bytes(&[
        E::Dir(b"BreaKHis_v1/"),
        E::Dir(b"BreaKHis_v1/benign/40X/"),
        E::File(b"BreaKHis_v1/benign/40X/a.png", b"png-a"),
        E::File(b"BreaKHis_v1/malignant/100X/b.png", b"png-b"),
        E::File(b"./README", b"readme"),
        E::Sym(b"BreaKHis_v1/latest", b"benign/40X/a.png"),
        E::Hard(b"BreaKHis_v1/copy.png", b"BreaKHis_v1/malignant/100X/b.png"),
    ])
}

fn assert_good_tree(out: &Path, files: &[PathBuf]) {
    let expect: Vec<PathBuf> = [
        "BreaKHis_v1/benign/40X/a.png",
        "BreaKHis_v1/copy.png",
        "BreaKHis_v1/latest",
        "BreaKHis_v1/malignant/100X/b.png",
        "README",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(files, expect);
    assert_eq!(fs::read(out.join("BreaKHis_v1/benign/40X/a.png")).unwrap(), b"png-a");
    assert_eq!(fs::read(out.join("BreaKHis_v1/malignant/100X/b.png")).unwrap(), b"png-b");
    assert_eq!(fs::read(out.join("BreaKHis_v1/copy.png")).unwrap(), b"png-b");
    assert_eq!(fs::read(out.join("README")).unwrap(), b"readme");
    assert_eq!(fs::read_link(out.join("BreaKHis_v1/latest")).unwrap(), PathBuf::from("benign/40X/a.png"));
    assert_eq!(fs::read(out.join("BreaKHis_v1/latest")).unwrap(), b"png-a");
}

#[test]
fn good_tar_gz_over_http_is_unpacked() {
    let archive = gzip(&good_tree_tar());
    let server = Server::start(archive.clone());
    let d = Dirs::new();
    let mut opts = quick(server.url("/dl/BreaKHis_v1.tar.gz?raw=1"));
    opts.digest = Some(Digest::sha256(&sha256_hex(&archive)).unwrap());
    let got = fetch(&opts, &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.unpacked, Some(ArchiveKind::TarGz));
    assert_eq!(got.bytes, archive.len() as u64);
    assert_good_tree(&d.out, &got.files);
    assert!(!d.part().exists());
    // Only the output directory in its parent: the staging directory was renamed, not left.
    assert_eq!(fs::read_dir(d.root.join("cache")).unwrap().count(), 1);
}

#[test]
fn good_tar_and_zip_by_file_url() {
    let d = Dirs::new();
    let src = d.root.join("tree.tar");
    fs::write(&src, good_tree_tar()).unwrap();
    let got = fetch(&quick(file_url(&src)), &d.out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.unpacked, Some(ArchiveKind::Tar));
    assert_good_tree(&d.out, &got.files);

    use zip::write::SimpleFileOptions;
    let deflated = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    z.add_directory("BreaKHis_v1/", stored).unwrap();
    z.start_file("BreaKHis_v1/benign/40X/a.png", deflated).unwrap();
    z.write_all(b"png-a").unwrap();
    z.start_file("BreaKHis_v1/malignant/100X/b.png", stored).unwrap();
    z.write_all(b"png-b").unwrap();
    z.start_file("BreaKHis_v1/copy.png", deflated).unwrap();
    z.write_all(b"png-b").unwrap();
    z.start_file("README", deflated).unwrap();
    z.write_all(b"readme").unwrap();
    z.add_symlink("BreaKHis_v1/latest", "benign/40X/a.png", stored).unwrap();
    let zip_bytes = z.finish().unwrap().into_inner();
    let src = d.root.join("tree.zip");
    fs::write(&src, &zip_bytes).unwrap();
    let out = d.root.join("cache/zipped");
    let got = fetch(&quick(file_url(&src)), &out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.unpacked, Some(ArchiveKind::Zip));
    assert_good_tree(&out, &got.files);

    // unpack = false keeps the archive as one file.
    let out = d.root.join("cache/kept");
    let mut opts = quick(file_url(&src));
    opts.unpack = Some(false);
    let got = fetch(&opts, &out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.files, vec![PathBuf::from("tree.zip")]);
    assert_same(&out.join("tree.zip"), &zip_bytes);

    // unpack = true on a name without an archive extension: recognised by its magic bytes.
    let src = d.root.join("download");
    fs::write(&src, gzip(&good_tree_tar())).unwrap();
    let out = d.root.join("cache/sniffed");
    let mut opts = quick(file_url(&src));
    opts.unpack = Some(true);
    let got = fetch(&opts, &out, &d.scratch, &no_progress).unwrap();
    assert_eq!(got.unpacked, Some(ArchiveKind::TarGz));
    assert_good_tree(&out, &got.files);
}
