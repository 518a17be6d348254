//! The loader: store build/save/load, augmentation sampling, MPCS pair frequencies, batches
//! (shapes, determinism across thread counts, shuffling, drop_last, prefetch), bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mpcs::loader::augment::{draw, AugmentConfig};
use mpcs::loader::{
    sample_pair, ImageStore, Loader, LoaderConfig, LoaderError, Normalize, PairMode, Rgb8, Rng, Sample, Source,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loader/breakhis_small.png")
}

/// A small synthetic image whose pixels depend on `k` (so images are told apart).
fn synthetic(k: usize, w: usize, h: usize) -> Rgb8 {
    let mut img = Rgb8::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            img.data[i] = ((x * 7 + k * 31) % 256) as u8;
            img.data[i + 1] = ((y * 5 + k * 17) % 256) as u8;
            img.data[i + 2] = ((x + y + k * 13) % 256) as u8;
        }
    }
    img
}

fn synthetic_store(n: usize, w: usize, h: usize) -> Arc<ImageStore> {
    let images = (0..n).map(|k| synthetic(k, w, h)).collect();
    Arc::new(ImageStore::from_images((0..n).map(|k| format!("img{k}")).collect(), images))
}

#[test]
fn store_builds_saves_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    std::fs::copy(fixture(), &a).unwrap();
    synthetic_png(&b, 3, 40, 30);
    let paths = vec![a.clone(), b.clone()];
    let store = ImageStore::build(&paths, None).unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(store.size(0), (175, 115));
    assert_eq!(store.size(1), (40, 30));
    assert_eq!(store.image(1), synthetic(3, 40, 30), "PNG round trip is lossless");

    let file = dir.path().join("store.bin");
    store.save(&file).unwrap();
    let back = ImageStore::load(&file, Some(store.key())).unwrap();
    assert_eq!(back, store);

    // A resized store differs in key and size; the old file is stale for it.
    let small = ImageStore::build(&paths, Some((32, 24))).unwrap();
    assert_eq!(small.size(0), (32, 24));
    assert_ne!(small.key(), store.key());
    assert!(matches!(ImageStore::load(&file, Some(small.key())), Err(LoaderError::StaleStore { .. })));
    // load_or_build replaces the stale file.
    let rebuilt = ImageStore::load_or_build(&file, &paths, Some((32, 24))).unwrap();
    assert_eq!(rebuilt, small);
    assert_eq!(ImageStore::load(&file, Some(small.key())).unwrap(), small);
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

fn synthetic_png(path: &Path, k: usize, w: usize, h: usize) {
    let img = synthetic(k, w, h);
    image::RgbImage::from_raw(w as u32, h as u32, img.data).unwrap().save(path).unwrap();
}

#[test]
fn damaged_store_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = synthetic_store(3, 8, 6);
    let file = dir.path().join("s.bin");
    store.save(&file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    // Truncated.
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    assert!(matches!(ImageStore::load(&file, None), Err(LoaderError::CorruptStore { .. })));
    // One pixel byte flipped.
    let mut flipped = bytes.clone();
    let i = bytes.len() - 40;
    flipped[i] ^= 0xff;
    std::fs::write(&file, &flipped).unwrap();
    let err = ImageStore::load(&file, None).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // Not a store at all.
    std::fs::write(&file, b"hello").unwrap();
    assert!(matches!(ImageStore::load(&file, None), Err(LoaderError::CorruptStore { .. })));
}

#[test]
fn unreadable_sources_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.png");
    std::fs::copy(fixture(), &good).unwrap();
    let truncated = dir.path().join("truncated.png");
    let bytes = std::fs::read(fixture()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    let err = ImageStore::build(&[good, truncated, text], None).unwrap_err();
    match &err {
        LoaderError::Sources { failed, total, .. } => assert_eq!((*failed, *total), (2, 3)),
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("truncated.png") && msg.contains("notes.png") && msg.contains("re-download"), "{msg}");
    let missing = ImageStore::build(&[dir.path().join("nope.png")], None).unwrap_err();
    assert!(missing.to_string().contains("nope.png"), "{missing}");
}

#[test]
fn pair_modes_have_the_reference_frequencies() {
    let n = 20_000;
    let mut rng = Rng::new(11);
    for _ in 0..100 {
        assert_eq!(sample_pair(PairMode::Fixed, &mut rng), (2, 3));
    }
    // OP: (40,100) 1/4, (100,200) 1/4, (200,400) 1/2.
    let mut op = std::collections::HashMap::new();
    for _ in 0..n {
        *op.entry(sample_pair(PairMode::Ordered, &mut rng)).or_insert(0usize) += 1;
    }
    assert_eq!(op.len(), 3, "{op:?}");
    for (pair, want) in [((0, 1), 0.25), ((1, 2), 0.25), ((2, 3), 0.5)] {
        let got = op[&pair] as f64 / n as f64;
        assert!((got - want).abs() < 0.02, "OP {pair:?}: {got} vs {want}");
    }
    // RP: 12 ordered pairs of different magnifications, 1/12 each; never the same twice.
    let mut rp = std::collections::HashMap::new();
    for _ in 0..n {
        let (a, b) = sample_pair(PairMode::Random, &mut rng);
        assert_ne!(a, b);
        assert!(a < 4 && b < 4);
        *rp.entry((a, b)).or_insert(0usize) += 1;
    }
    assert_eq!(rp.len(), 12);
    for (pair, c) in &rp {
        let got = *c as f64 / n as f64;
        assert!((got - 1.0 / 12.0).abs() < 0.02, "RP {pair:?}: {got}");
    }
    assert_eq!(PairMode::parse("op"), Some(PairMode::Ordered));
    assert_eq!(PairMode::parse("XP"), None);
}

#[test]
fn augmentation_draws_follow_the_configured_ranges_and_probabilities() {
    let cfg = AugmentConfig::finetune_low(341, 252);
    let n = 20_000;
    let (mut jit, mut flip, mut rot, mut aff) = (0, 0, 0, 0);
    let mut flip_codes = [0usize; 3];
    for i in 0..n {
        let mut rng = Rng::derive(5, 0, i, 3);
        let d = draw(&cfg, 700, 460, &mut rng);
        if let Some(j) = d.jitter {
            jit += 1;
            for v in [j.brightness, j.contrast, j.saturation] {
                assert!((0.9..=1.1).contains(&v), "{v}");
            }
            assert!((-0.1..=0.1).contains(&j.hue));
            let mut o = j.order;
            o.sort();
            assert_eq!(o, [0, 1, 2, 3]);
        }
        if let Some(c) = d.flip {
            flip += 1;
            flip_codes[c as usize] += 1;
        }
        if let Some(a) = d.rotate {
            rot += 1;
            assert!((-90.0..=90.0).contains(&a));
        }
        if let Some((dx, dy)) = d.translate {
            aff += 1;
            assert!(dx.abs() <= 35 && dy.abs() <= 23, "{dx} {dy}");
        }
        let (x, y) = d.crop.expect("random crop always fires");
        assert!(x <= 341 - 252 && y <= 341 - 252);
    }
    for (what, count, p) in [("jitter", jit, 0.3), ("flip", flip, 0.3), ("rotate", rot, 0.3), ("affine", aff, 0.3)] {
        let got = count as f64 / n as f64;
        assert!((got - p).abs() < 0.02, "{what}: {got} vs {p}");
    }
    for c in flip_codes {
        assert!((c as f64 / flip as f64 - 1.0 / 3.0).abs() < 0.03, "{flip_codes:?}");
    }
    let mut bad = AugmentConfig::finetune_low(100, 252);
    assert!(bad.validate().is_err(), "crop larger than resize");
    bad = AugmentConfig::mpcs_pretrain(64);
    bad.rotate.as_mut().unwrap().p = 1.5;
    assert!(bad.validate().is_err());
}

fn region_samples(n_regions: usize, mode: PairMode) -> Vec<Sample> {
    (0..n_regions)
        .map(|r| Sample {
            source: Source::Region { images: [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3], mode },
            label: (r % 2) as u32,
        })
        .collect()
}

#[test]
fn batches_are_deterministic_for_any_thread_count() {
    let store = synthetic_store(40, 48, 32);
    let mut cfg = LoaderConfig::new(4, 99, AugmentConfig::mpcs_pretrain(24));
    let collect = |threads: usize, cfg: &LoaderConfig| {
        let mut c = cfg.clone();
        c.threads = threads;
        let loader = Loader::new(store.clone(), region_samples(10, PairMode::Random), c).unwrap();
        loader.epoch(3).map(|b| b.unwrap()).collect::<Vec<_>>()
    };
    let one = collect(1, &cfg);
    let two = collect(2, &cfg);
    let four = collect(4, &cfg);
    assert_eq!(one, two);
    assert_eq!(one, four);
    assert_eq!(one.len(), 3, "10 samples in batches of 4");
    assert_eq!(one[0].shape, [4, 3, 24, 24]);
    assert_eq!(one[2].shape, [2, 3, 24, 24]);
    for b in &one {
        let v2 = b.view2.as_ref().expect("pairs give two views");
        assert_eq!(b.view1.len(), b.shape.iter().product::<usize>());
        assert_eq!(v2.len(), b.view1.len());
        assert!(b.view1.iter().chain(v2).all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(b.magnifications.len(), b.shape[0]);
        assert!(b.magnifications.iter().all(|(a, c)| a != c));
        assert_ne!(&b.view1, v2);
    }
    // Every sample exactly once per epoch, and a different order in another epoch.
    let mut seen: Vec<usize> = one.iter().flat_map(|b| b.samples.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    let loader = Loader::new(store.clone(), region_samples(10, PairMode::Random), cfg.clone()).unwrap();
    assert_ne!(loader.order(3), loader.order(4));
    assert_eq!(loader.batch(3, 1).unwrap(), one[1], "direct and prefetched batches agree");
    // Another seed changes the draws.
    cfg.seed = 100;
    assert_ne!(collect(1, &cfg), one);
}

#[test]
fn single_views_drop_last_and_normalisation() {
    let store = synthetic_store(7, 20, 10);
    let samples: Vec<Sample> = (0..7).map(|i| Sample { source: Source::Image(i), label: i as u32 }).collect();
    let mut cfg = LoaderConfig::new(3, 1, AugmentConfig::default());
    cfg.shuffle = false;
    cfg.drop_last = true;
    let loader = Loader::new(store.clone(), samples.clone(), cfg.clone()).unwrap();
    assert_eq!(loader.batches_per_epoch(), 2);
    let batches: Vec<_> = loader.epoch(0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 2);
    let b = &batches[1];
    assert!(b.view2.is_none());
    assert_eq!(b.labels, vec![3, 4, 5]);
    assert_eq!(b.shape, [3, 3, 10, 20]);
    // No augmentation: values are the pixels / 255 in CHW order.
    let img = synthetic(3, 20, 10);
    let (x, y) = (7, 4);
    let plane = 200;
    for c in 0..3 {
        let want = img.px(x, y)[c] as f32 / 255.0;
        assert_eq!(b.view1[c * plane + y * 20 + x], want);
    }
    cfg.normalize = Normalize::ImageNet;
    let norm = Loader::new(store, samples, cfg).unwrap().batch(0, 1).unwrap();
    let v = img.px(x, y)[1] as f32 / 255.0;
    assert!((norm.view1[plane + y * 20 + x] - (v - 0.456) / 0.224).abs() < 1e-6);
}

#[test]
fn bad_loader_input_is_an_error_not_a_panic() {
    let store = synthetic_store(3, 20, 10);
    let one = |source| vec![Sample { source, label: 0 }];
    let cfg = LoaderConfig::new(2, 1, AugmentConfig::default());
    let err = Loader::new(store.clone(), one(Source::Image(9)), cfg.clone()).err().unwrap();
    assert!(err.to_string().contains("holds 3 images"), "{err}");
    assert!(Loader::new(store.clone(), vec![], cfg.clone()).is_err());
    let mixed = vec![Sample { source: Source::Image(0), label: 0 }, Sample { source: Source::Pair(0, 1), label: 0 }];
    assert!(Loader::new(store.clone(), mixed, cfg.clone()).is_err());
    let mut zero = cfg.clone();
    zero.batch_size = 0;
    assert!(Loader::new(store, one(Source::Image(0)), zero).is_err());

    // Different sizes in one batch without a resize: a clear error from the iterator.
    let images = vec![synthetic(0, 20, 10), synthetic(1, 21, 10)];
    let store = Arc::new(ImageStore::from_images(vec!["a".into(), "b".into()], images));
    let samples = (0..2).map(|i| Sample { source: Source::Image(i), label: 0 }).collect();
    let loader = Loader::new(store, samples, cfg).unwrap();
    let err = loader.epoch(0).next().unwrap().unwrap_err();
    assert!(matches!(err, LoaderError::MixedSizes { .. }), "{err}");
    assert!(err.to_string().contains("add a resize"), "{err}");
}

#[test]
fn dropping_an_epoch_early_stops_the_producer() {
    let store = synthetic_store(64, 32, 32);
    let samples = (0..64).map(|i| Sample { source: Source::Image(i), label: 0 }).collect();
    let loader = Loader::new(store, samples, LoaderConfig::new(2, 1, AugmentConfig::mpcs_pretrain(32))).unwrap();
    let mut it = loader.epoch(0);
    assert!(it.next().unwrap().is_ok());
    drop(it); // must return (join) rather than hang with a full channel
}

#[test]
fn synthetic_breakhis_regions_through_store_and_loader() {
    use mpcs::data::{breakhis, scan, synth, Dataset};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("breakhis");
    let summary = synth::generate(Dataset::BreakHis, &out, 1, Some(4), Some((70, 46))).unwrap();
    let records = scan(Dataset::BreakHis, &summary.root, false).unwrap();
    let regions = breakhis::regions_at_all_magnifications(&records);
    assert!(!regions.is_empty());
    let (paths, samples) = mpcs::loader::region_samples(&summary.root, &regions, PairMode::Ordered);
    assert_eq!(paths.len(), 4 * regions.len());
    let store = Arc::new(ImageStore::load_or_build(&dir.path().join("store.bin"), &paths, Some((32, 32))).unwrap());
    assert_eq!(store.len(), paths.len());
    let mut cfg = LoaderConfig::new(5, 3, AugmentConfig::mpcs_pretrain(32));
    cfg.threads = 2;
    let loader = Loader::new(store.clone(), samples, cfg).unwrap();
    let mut n = 0;
    for b in loader.epoch(0) {
        let b = b.unwrap();
        for (k, &s) in b.samples.iter().enumerate() {
            let (m1, m2) = b.magnifications[k];
            assert!([(0, 1), (1, 2), (2, 3)].contains(&(m1, m2)), "OP pair {m1},{m2}");
            // Store index 4r+m is region r at magnification m: check through the file names.
            let mag = |m: u8| format!("-{}-", breakhis::MAGNIFICATIONS[m as usize]);
            assert!(store.name(4 * s + m1 as usize).contains(&mag(m1)));
            assert_eq!(b.labels[k], regions[s].label);
        }
        n += b.shape[0];
    }
    assert_eq!(n, regions.len());
    // Fine-tuning samples from the same records.
    let (paths, samples) = mpcs::loader::image_samples(&summary.root, &records, true).unwrap();
    assert_eq!((paths.len(), samples.len()), (records.len(), records.len()));
    assert!(samples.iter().all(|s| s.label < 8));
}

#[test]
fn whole_pixel_translation_equals_the_general_warp() {
    use mpcs::loader::geometry::{self, Border};
    let img = synthetic(5, 23, 17);
    for border in [Border::Constant, Border::Reflect101] {
        for (dx, dy) in [(3i64, -2i64), (-7, 5), (30, 0)] {
            let map = [[1.0, 0.0, -dx as f64], [0.0, 1.0, -dy as f64]];
            assert_eq!(geometry::translate(&img, dx, dy, border), geometry::warp(&img, &map, 23, 17, border));
        }
    }
    // Reflect101 mirrors without repeating the edge: shifting right by 2 puts columns 2, 1 first.
    let shifted = geometry::translate(&img, 2, 0, Border::Reflect101);
    assert_eq!(shifted.px(0, 0), img.px(2, 0));
    assert_eq!(shifted.px(1, 0), img.px(1, 0));
    assert_eq!(shifted.px(2, 0), img.px(0, 0));
}

/// `mpcs bench loader`: both sample kinds reported over the timed batches (the first is untimed), the
/// pairs' rate last; nonsense options refused.
#[test]
fn loader_bench_reports_both_kinds_over_the_timed_batches() {
    use mpcs::bench::{loader_bench, BenchError, LoaderBenchOptions};
    let opts = LoaderBenchOptions { size: 32, batch: 4, threads: 2, batches: 3 };
    let mut out = Vec::new();
    let pairs = loader_bench(&opts, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("cpu: "), "{text}");
    assert!(lines[1].contains("single views, 2 thread(s), 3 batches"), "{text}");
    assert!(lines[2].contains("MPCS pairs (OP), 2 views per sample, 2 thread(s), 3 batches"), "{text}");
    assert_eq!(lines.last().unwrap(), &format!("images_per_s={pairs:.1}"));
    assert!(pairs.is_finite() && pairs > 0.0);
    let bad = LoaderBenchOptions { size: 4, ..opts };
    assert!(matches!(loader_bench(&bad, &mut Vec::new()), Err(BenchError::Options(_))));
}
