//! Bad data through the runner: each a clear message, a non-zero exit, nothing half-written in the cache.

mod common;
use common::*;

fn split_exp(path: &str) -> String {
    format!("[stage.raw]\nkind = \"source\"\npath = \"{path}\"\n\n[stage.folds]\nkind = \"split\"\nfrom = \"raw\"\ndataset = \"breakhis\"\nfolds = 2\n")
}

/// Runs `exp.toml`, expects the node `node` to fail with all `needles` in stderr, and nothing published.
fn expect_node_failure(p: &Project, node: &str, needles: &[&str]) {
    let before = p.entries();
    let out = p.run_raw("exp.toml", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("FAILED {node}")), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }
    assert_eq!(before, p.entries(), "nothing was published");
    let tmp: Vec<_> = std::fs::read_dir(p.path("cache/v2/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no staging left: {tmp:?}");
}

fn synth(p: &Project) {
    let out = p.mpcs(&["synth", "breakhis", "--out", "bh", "--seed", "1", "--patients", "8", "--size", "70x46"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn first_png(p: &Project) -> std::path::PathBuf {
    let mut stack = vec![p.path("bh")];
    let mut found = Vec::new();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                found.push(e.path());
            }
        }
    }
    found.sort();
    found.remove(0)
}

#[test]
fn wrong_layout() {
    let p = Project::new();
    p.write("flat/a.png", "not really");
    p.write("exp.toml", &split_exp("flat"));
    expect_node_failure(&p, "folds", &["BreaKHis_v1"]);
}

#[test]
fn truncated_png_is_named() {
    let p = Project::new();
    synth(&p);
    let f = first_png(&p);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    p.write("exp.toml", &split_exp("bh"));
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    expect_node_failure(&p, "folds", &[&name, "runcated"]);
}

#[test]
fn non_image_file_is_named() {
    let p = Project::new();
    synth(&p);
    let f = first_png(&p);
    std::fs::write(&f, "this is a text file").unwrap();
    p.write("exp.toml", &split_exp("bh"));
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    expect_node_failure(&p, "folds", &[&name]);
}

#[test]
fn zero_byte_download() {
    let p = Project::new();
    p.write("empty.bin", "");
    let url = format!("file://{}", p.path("empty.bin").display());
    p.write("exp.toml", &format!("[stage.dl]\nkind = \"download\"\nurl = \"{url}\"\n"));
    expect_node_failure(&p, "dl", &["empty"]);
}

#[test]
fn path_traversal_archive_is_refused() {
    let p = Project::new();
    // A tar whose entry climbs out of the output directory, made with Python's tarfile.
    let script = "import tarfile, io\nt = tarfile.open('evil.tar', 'w')\ndata = b'pwned'\ni = tarfile.TarInfo('../../evil.txt')\ni.size = len(data)\nt.addfile(i, io.BytesIO(data))\nt.close()\n";
    let ok = std::process::Command::new("python3").current_dir(p.dir.path()).args(["-c", script]).status().unwrap();
    assert!(ok.success());
    let url = format!("file://{}", p.path("evil.tar").display());
    p.write("exp.toml", &format!("[stage.dl]\nkind = \"download\"\nurl = \"{url}\"\n"));
    expect_node_failure(&p, "dl", &["evil.txt"]);
    assert!(
        !p.path("evil.txt").exists() && !p.path("cache/evil.txt").exists() && !p.path("cache/v2/evil.txt").exists()
    );
}
