//! Loader throughput (prints figures; no harness).
//!   cargo bench --bench loader
//! 1. decode-into-store: N PNGs of 700×460 (the BreakHis size; made by upscaling the test
//!    fixture) decoded, optionally resized to 341×341, on 1 and 2 rayon threads.
//! 2. augment + batch: the MPCS pretraining augmentation (ColorJitter, Flip, Rotate, Affine with
//!    the paper's probabilities) on a store already at the output size, batch 16, through the
//!    prefetching loader on 1 and 2 threads; single views and MPCS pairs (two views per sample);
//!    64, 224 and the paper's 341.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use mpcs::loader::geometry;
use mpcs::loader::{AugmentConfig, ImageStore, Loader, LoaderConfig, PairMode, Rgb8, Sample, Source};

fn fixture() -> Rgb8 {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loader/breakhis_small.png");
    let img = image::open(p).expect("fixture").to_rgb8();
    Rgb8::from_raw(img.width() as usize, img.height() as usize, img.into_raw()).unwrap()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

fn main() {
    let n_files = 48;
    let dir = tempfile::tempdir().unwrap();
    let big = geometry::resize(&fixture(), 700, 460);
    let mut paths = Vec::new();
    for i in 0..n_files {
        // Vary the content a little so the PNG encoder cannot collapse the files to one.
        let img = geometry::rotate(&big, i as f64 * 7.0, geometry::Border::Reflect101);
        let p = dir.path().join(format!("img{i:03}.png"));
        image::RgbImage::from_raw(700, 460, img.data).unwrap().save(&p).unwrap();
        paths.push(p);
    }
    println!("decode-into-store, {n_files} PNGs of 700x460:");
    for threads in [1, 2] {
        for resize in [None, Some((341u32, 341u32))] {
            let t = Instant::now();
            let store = pool(threads).install(|| ImageStore::build(&paths, resize).unwrap());
            let s = t.elapsed().as_secs_f64();
            let label = resize.map_or("full size".to_string(), |(w, h)| format!("resized {w}x{h}"));
            println!(
                "  {threads} thread(s), {label:>16}: {:8.1} images/s ({:.1} MB store)",
                n_files as f64 / s,
                store.pixel_bytes() as f64 / 1e6
            );
        }
    }
    let store = ImageStore::build(&paths, Some((341, 341))).unwrap();
    let file = dir.path().join("store.bin");
    store.save(&file).unwrap();
    let t = Instant::now();
    let back = ImageStore::load(&file, Some(store.key())).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "  load saved store (341x341, checksum verified): {:8.1} images/s, {:.0} MB/s",
        back.len() as f64 / s,
        back.pixel_bytes() as f64 / s / 1e6
    );

    per_transform();
    println!("augment + batch (MPCS pretraining augmentation, batch 16):");
    let base = fixture();
    for size in [64usize, 224, 341] {
        let src = geometry::resize(&base, size, size);
        let n = 64;
        let images = (0..n).map(|i| geometry::rotate(&src, i as f64 * 5.0, geometry::Border::Reflect101)).collect();
        let store = Arc::new(ImageStore::from_images((0..n).map(|i| i.to_string()).collect(), images));
        for paired in [false, true] {
            for threads in [1, 2] {
                let samples: Vec<Sample> = if paired {
                    (0..n / 4)
                        .map(|r| Sample {
                            source: Source::Region {
                                images: [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3],
                                mode: PairMode::Ordered,
                            },
                            label: 0,
                        })
                        .collect()
                } else {
                    (0..n).map(|i| Sample { source: Source::Image(i), label: 0 }).collect()
                };
                let mut cfg = LoaderConfig::new(16, 7, AugmentConfig::mpcs_pretrain(size));
                cfg.threads = threads;
                let loader = Loader::new(store.clone(), samples, cfg).unwrap();
                let epochs = match size {
                    64 => 20,
                    224 => 4,
                    _ => 2,
                };
                let t = Instant::now();
                let mut views = 0usize;
                for e in 0..epochs {
                    for b in loader.epoch(e) {
                        let b = b.unwrap();
                        views += b.shape[0] * if b.view2.is_some() { 2 } else { 1 };
                    }
                }
                let s = t.elapsed().as_secs_f64();
                let kind = if paired { "pairs (OP)" } else { "single views" };
                println!("  {size:3}x{size:<3} {kind:>12}, {threads} thread(s): {:8.1} images/s", views as f64 / s);
            }
        }
    }
}

/// Single-thread cost of each transform on one 224×224 image (always applied, p = 1).
fn per_transform() {
    use mpcs::loader::color::{self, Jitter};
    use mpcs::loader::geometry::{Border, FlipCode};
    let img = geometry::resize(&fixture(), 224, 224);
    let big = geometry::resize(&fixture(), 341, 341);
    let reps = 100;
    let time = |name: &str, f: &dyn Fn() -> Rgb8| {
        let t = Instant::now();
        let mut sink = 0usize;
        for _ in 0..reps {
            sink += f().data[0] as usize;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
        println!("  {name:>28}: {us:8.1} us/image{}", if sink == usize::MAX { "!" } else { "" });
    };
    println!("per transform, one 224x224 image, 1 thread:");
    let j = Jitter { brightness: 1.05, contrast: 0.95, saturation: 1.05, hue: 0.05, order: [0, 1, 2, 3] };
    time("brightness", &|| {
        let mut i = img.clone();
        color::brightness(&mut i, 1.05);
        i
    });
    time("saturation", &|| {
        let mut i = img.clone();
        color::saturation(&mut i, 1.05);
        i
    });
    time("hue", &|| {
        let mut i = img.clone();
        color::hue(&mut i, 0.05);
        i
    });
    time("color jitter (all four)", &|| {
        let mut i = img.clone();
        color::jitter(&mut i, &j);
        i
    });
    time("flip (both)", &|| geometry::flip(&img, FlipCode::Both));
    time("rotate 33 deg reflect101", &|| geometry::rotate(&img, 33.0, Border::Reflect101));
    time("translate (11, -7)", &|| geometry::translate(&img, 11, -7, Border::Constant));
    time("resize 341x341 -> 224x224", &|| geometry::resize(&big, 224, 224));
}
