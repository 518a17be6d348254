//! Synthetic datasets: exact layouts read back by the readers, determinism, nested
//! magnifications, and learnable labels.

use std::collections::BTreeMap;
use std::path::Path;

use mpcs::data::breakhis::regions_at_all_magnifications;
use mpcs::data::synth::{generate, generate_with, parse_size, SynthOptions};
use mpcs::data::{scan, DataError, Dataset, ImageRecord};

/// Every file under `dir`, relative path → bytes.
fn tree_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn small(kind: Dataset, seed: u64, patients: usize, size: (u32, u32)) -> SynthOptions {
    SynthOptions { patients: Some(patients), size: Some(size), ..SynthOptions::new(kind, seed) }
}

#[test]
fn breakhis_synth_reads_back_with_every_region_at_four_magnifications() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bh");
    let s = generate(Dataset::BreakHis, &out, 5, None, Some((140, 92))).unwrap();
    assert_eq!(s.patients, 16);
    assert_eq!(s.regions_all_magnifications, 48);
    let recs = scan(Dataset::BreakHis, &out, true).unwrap();
    assert_eq!(recs.len(), s.images);
    assert!(s.images > 16 * 3 * 4, "some partial regions exist");
    let regions = regions_at_all_magnifications(&recs);
    assert_eq!(regions.len(), 48);
    // Balanced: two patients per subtype, 8 benign and 8 malignant.
    let mut per_subtype: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for r in &recs {
        per_subtype.entry(r.subtype.clone().unwrap()).or_default().insert(r.patient.clone().unwrap());
    }
    assert_eq!(per_subtype.len(), 8);
    assert!(per_subtype.values().all(|p| p.len() == 2), "{per_subtype:?}");
    // Images outside full regions exist only at some magnifications.
    let partial: Vec<&ImageRecord> = recs.iter().filter(|r| r.seq == Some(4)).collect();
    assert!(!partial.is_empty());
    for p in ["breast/benign/SOB/adenosis/", "/40X/SOB_B_A-14-"] {
        assert!(recs.iter().any(|r| r.rel_path.contains(p)), "{p}");
    }
    let img = image::open(out.join(&recs[0].rel_path)).unwrap();
    assert_eq!((img.width(), img.height()), (140, 92));
    // The staging folder is gone once the dataset is published.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, [std::ffi::OsString::from("bh")]);
}

#[test]
fn same_seed_same_bytes_whatever_the_threads_other_seed_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = small(Dataset::BreakHis, 11, 2, (120, 80));
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    one.install(|| generate_with(&opts, &tmp.path().join("a"))).unwrap();
    three.install(|| generate_with(&opts, &tmp.path().join("b"))).unwrap();
    let other = SynthOptions { seed: 12, ..opts.clone() };
    generate_with(&other, &tmp.path().join("c")).unwrap();
    let (a, b, c) =
        (tree_bytes(&tmp.path().join("a")), tree_bytes(&tmp.path().join("b")), tree_bytes(&tmp.path().join("c")));
    assert!(!a.is_empty());
    assert_eq!(a, b, "same seed must give identical files");
    // Another seed: the same names (the layout depends only on the counts) with other pixels.
    let common: Vec<_> = a.keys().filter(|k| c.contains_key(*k)).collect();
    assert!(!common.is_empty());
    assert!(common.iter().all(|k| a[*k] != c[*k]));
}

#[test]
fn bach_and_breast_cell_synth_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let bach = tmp.path().join("bach");
    let s = generate(Dataset::Bach, &bach, 3, Some(2), Some((128, 96))).unwrap();
    assert_eq!(s.images, 8);
    assert!(bach.join("ICIAR2018_BACH_Challenge/Photos/InSitu/is002.tif").is_file());
    let recs = scan(Dataset::Bach, &bach, true).unwrap();
    let mut labels: Vec<u32> = recs.iter().map(|r| r.label).collect();
    labels.sort();
    assert_eq!(labels, [0, 0, 1, 1, 2, 2, 3, 3]);

    let cell = tmp.path().join("cell");
    let s = generate(Dataset::BreastCell, &cell, 3, Some(3), None).unwrap();
    assert_eq!((s.images, s.width, s.height), (6, 896, 768));
    let recs = scan(Dataset::BreastCell, &cell, true).unwrap();
    let names: Vec<&str> = recs.iter().map(|r| r.rel_path.as_str()).collect();
    assert_eq!(
        names,
        [
            "ytma10_010704_benign1_ccd.tif",
            "ytma10_010704_benign2_ccd.tif",
            "ytma10_010704_malignant1_ccd.tif",
            "ytma10_010704_malignant2_ccd.tif",
            "ytma49_042003_benign1_ccd.tif",
            "ytma49_042003_malignant1_ccd.tif",
        ]
    );
    let img = image::open(cell.join(names[0])).unwrap();
    assert_eq!((img.width(), img.height()), (896, 768));
    assert_eq!(SynthOptions::default_size(Dataset::Bach), (2048, 1536));
}

#[test]
fn bad_arguments_are_refused_without_writing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let err = generate(Dataset::BreakHis, tmp.path(), 1, Some(1), Some((64, 64))).unwrap_err();
    assert!(matches!(err, DataError::Usage(_)) && err.to_string().contains("not empty"), "{err}");
    let err = generate(Dataset::BreakHis, &tmp.path().join("x"), 1, Some(0), None).unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
    assert!(!tmp.path().join("x").exists());
    assert_eq!(parse_size("700x460").unwrap(), (700, 460));
    assert_eq!(parse_size("64X48").unwrap(), (64, 48));
    for bad in ["700", "x460", "0x10", "700x-1", "99999x10"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

fn gray(img: &image::RgbImage) -> Vec<f64> {
    img.pixels().map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64).collect()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa * sbb).sqrt()
}

/// 400X is the centre of 200X, twice as large: a 2×2 box-downsampled 400X image must match
/// the central crop of the 200X image of the same sequence number, and not another region's.
#[test]
fn magnifications_are_nested_zooms_of_one_field() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bh");
    let (w, h) = (352u32, 232u32);
    generate(Dataset::BreakHis, &out, 21, Some(2), Some((w, h))).unwrap();
    let recs = scan(Dataset::BreakHis, &out, false).unwrap();
    let find = |patient_idx: usize, seq: u32, mag: u32| {
        let mut patients: Vec<_> = recs.iter().filter_map(|r| r.patient.clone()).collect();
        patients.dedup();
        let p = &patients[patient_idx];
        let r = recs
            .iter()
            .find(|r| r.patient.as_ref() == Some(p) && r.seq == Some(seq) && r.magnification == Some(mag))
            .unwrap();
        image::open(out.join(&r.rel_path)).unwrap().to_rgb8()
    };
    for patient in 0..2 {
        let i400 = find(patient, 1, 400);
        let small = image::imageops::resize(&i400, w / 2, h / 2, image::imageops::FilterType::Triangle);
        let crop = |img: &image::RgbImage| image::imageops::crop_imm(img, w / 4, h / 4, w / 2, h / 2).to_image();
        let same = pearson(&gray(&small), &gray(&crop(&find(patient, 1, 200))));
        let other = pearson(&gray(&small), &gray(&crop(&find(patient, 2, 200))));
        eprintln!("patient {patient}: corr(400X, centre of 200X) same region {same:.3}, other {other:.3}");
        assert!(same > 0.9, "patient {patient}: 400X vs centre of 200X correlate {same:.3}");
        assert!(same > other + 0.4, "same region {same:.3}, other region {other:.3}");
    }
}

/// Simple colour features: mean optical density per channel over tissue, fraction of dark
/// (nuclear) pixels, fraction of tissue, spread of brightness.
fn features(img: &image::RgbImage) -> Vec<f64> {
    let n = (img.width() * img.height()) as f64;
    let (mut od, mut tissue, mut dark, mut g, mut g2) = ([0.0f64; 3], 0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for p in img.pixels() {
        let o = [0, 1, 2].map(|c| -((p[c] as f64 + 1.0) / 256.0).ln());
        let y = 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
        g += y;
        g2 += y * y;
        if o.iter().sum::<f64>() > 0.25 {
            tissue += 1.0;
            for c in 0..3 {
                od[c] += o[c];
            }
        }
        if y < 110.0 {
            dark += 1.0;
        }
    }
    let t = tissue.max(1.0);
    let mean = g / n;
    vec![od[0] / t, od[1] / t, od[2] / t, dark / n, tissue / n, (g2 / n - mean * mean).max(0.0).sqrt()]
}

/// Logistic regression by gradient descent on standardised features.
fn fit_logistic(x: &[Vec<f64>], y: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = x[0].len();
    let n = x.len() as f64;
    let mean: Vec<f64> = (0..d).map(|j| x.iter().map(|r| r[j]).sum::<f64>() / n).collect();
    let sd: Vec<f64> =
        (0..d).map(|j| (x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n).sqrt().max(1e-9)).collect();
    let mut w = vec![0.0; d + 1];
    for _ in 0..3000 {
        let mut grad = vec![0.0; d + 1];
        for (r, &t) in x.iter().zip(y) {
            let z: f64 = w[d] + (0..d).map(|j| w[j] * (r[j] - mean[j]) / sd[j]).sum::<f64>();
            let e = 1.0 / (1.0 + (-z).exp()) - t;
            for j in 0..d {
                grad[j] += e * (r[j] - mean[j]) / sd[j];
            }
            grad[d] += e;
        }
        for j in 0..=d {
            w[j] -= 0.5 * (grad[j] / n + if j < d { 0.01 * w[j] } else { 0.0 });
        }
    }
    (w, mean, sd)
}

#[test]
fn labels_are_learnable_across_patients_from_simple_colour_features() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bh");
    generate(Dataset::BreakHis, &out, 2024, Some(16), Some((233, 153))).unwrap();
    let recs = scan(Dataset::BreakHis, &out, false).unwrap();
    let mut patients: Vec<String> = recs.iter().filter_map(|r| r.patient.clone()).collect();
    patients.sort();
    patients.dedup();
    assert_eq!(patients.len(), 16);
    // Patients are assigned round-robin over the 8 subtypes: ids 1-8 hold each subtype once,
    // ids 9-16 once more. Train on the first eight, test on the other eight.
    let is_train = |r: &ImageRecord| {
        let p = r.patient.as_ref().unwrap();
        let num: usize = p.trim_end_matches(char::is_alphabetic)[1..].parse().unwrap();
        num <= 8
    };
    let (mut xtr, mut ytr, mut xte, mut yte) = (vec![], vec![], vec![], vec![]);
    let mut tags = vec![];
    for r in &recs {
        let img = image::open(out.join(&r.rel_path)).unwrap().to_rgb8();
        let f = features(&img);
        assert!(f.iter().all(|v| v.is_finite()));
        if is_train(r) {
            xtr.push(f);
            ytr.push(r.label as f64);
        } else {
            xte.push(f);
            yte.push(r.label as f64);
            tags.push(format!("{}-{}", r.subtype.clone().unwrap(), r.magnification.unwrap()));
        }
    }
    let (w, mean, sd) = fit_logistic(&xtr, &ytr);
    let d = mean.len();
    let mut wrong = BTreeMap::new();
    let correct = xte
        .iter()
        .zip(&yte)
        .zip(&tags)
        .filter(|((r, &t), tag)| {
            let z: f64 = w[d] + (0..d).map(|j| w[j] * (r[j] - mean[j]) / sd[j]).sum::<f64>();
            let ok = (z > 0.0) == (t > 0.5);
            if !ok {
                *wrong.entry(tag.to_string()).or_insert(0) += 1;
            }
            ok
        })
        .count();
    eprintln!("misclassified by subtype-magnification: {wrong:?}");
    let acc = correct as f64 / xte.len() as f64;
    eprintln!("held-out-patient accuracy {acc:.3} on {} images", xte.len());
    assert!(acc >= 0.75, "accuracy on unseen patients {acc:.3}");
}

/// Writes a few generated images to $MPCS_SYNTH_DUMP for looking at by eye.
#[test]
#[ignore]
fn dump_examples() {
    let Some(dir) = std::env::var_os("MPCS_SYNTH_DUMP") else {
        return;
    };
    let dir = Path::new(&dir);
    let _ = std::fs::remove_dir_all(dir);
    generate(Dataset::BreakHis, &dir.join("bh"), 1, Some(8), None).unwrap();
    generate(Dataset::Bach, &dir.join("bach"), 1, Some(1), Some((1024, 768))).unwrap();
    generate(Dataset::BreastCell, &dir.join("cell"), 1, Some(1), None).unwrap();
}
