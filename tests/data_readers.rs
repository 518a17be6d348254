//! Dataset readers on the real fixtures and on hand-made good and bad layouts.

use std::path::{Path, PathBuf};

use mpcs::data::breakhis::{regions_at_all_magnifications, ImageName, PatientDir};
use mpcs::data::breast_cell::CellName;
use mpcs::data::{scan, DataError, Dataset, ImageRecord, ProblemKind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

const BREAST: &str = "BreaKHis_v1/histology_slides/breast";
const F_PATIENT: &str = "benign/SOB/fibroadenoma/SOB_B_F_14-25197";

/// Copies a folder tree (fixtures are read-only in CI; tests mutate copies).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
            let mut perm = std::fs::metadata(&dest).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perm.set_readonly(false);
            std::fs::set_permissions(&dest, perm).unwrap();
        }
    }
}

fn breakhis_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    copy_tree(&fixtures().join("breakhis"), &root);
    (tmp, root)
}

#[test]
fn real_breakhis_fixture_reads_with_labels_and_fields() {
    let root = fixtures().join("breakhis");
    let recs = scan(Dataset::BreakHis, &root, true).unwrap();
    assert_eq!(recs.len(), 6);
    let mut sorted = recs.clone();
    sorted.sort();
    assert_eq!(recs, sorted, "records come back sorted");

    let f40 = recs.iter().find(|r| r.rel_path.ends_with("SOB_B_F-14-25197-40-023.png")).unwrap();
    assert_eq!(f40.rel_path, format!("{BREAST}/{F_PATIENT}/40X/SOB_B_F-14-25197-40-023.png"));
    assert_eq!(f40.dataset, Dataset::BreakHis);
    assert_eq!((f40.label, f40.class_name.as_str()), (0, "benign"));
    assert_eq!(f40.subtype.as_deref(), Some("F"));
    assert_eq!(f40.subtype_label, Some(1));
    assert_eq!(f40.patient.as_deref(), Some("25197"));
    assert_eq!((f40.magnification, f40.seq), (Some(40), Some(23)));
    assert!(f40.path(&root).is_file());

    let a = recs.iter().find(|r| r.subtype.as_deref() == Some("A")).unwrap();
    assert_eq!((a.label, a.subtype_label), (0, Some(0)));
    assert_eq!(a.patient.as_deref(), Some("22549AB"));
    let dc = recs.iter().find(|r| r.subtype.as_deref() == Some("DC")).unwrap();
    assert_eq!((dc.label, dc.class_name.as_str()), (1, "malignant"));
    assert_eq!(dc.subtype_label, Some(4));
    assert_eq!((dc.magnification, dc.seq), (Some(40), Some(10)));

    let mags: Vec<_> =
        recs.iter().filter(|r| r.patient.as_deref() == Some("25197")).map(|r| r.magnification.unwrap()).collect();
    assert_eq!(mags.len(), 4);
    // The real patient's four images carry different sequence numbers (023, 001, 032, 033),
    // so none of them forms a region at all four magnifications.
    assert!(regions_at_all_magnifications(&recs).is_empty());
}

#[test]
fn breakhis_root_may_be_given_at_three_levels() {
    let root = fixtures().join("breakhis");
    let key = |rs: Vec<ImageRecord>| {
        let mut k: Vec<_> = rs
            .into_iter()
            .map(|r| (r.patient, r.magnification, r.seq, r.rel_path.rsplit('/').next().unwrap().to_string()))
            .collect();
        k.sort();
        k
    };
    let top = key(scan(Dataset::BreakHis, &root, false).unwrap());
    let v1 = scan(Dataset::BreakHis, &root.join("BreaKHis_v1"), false).unwrap();
    assert!(v1[0].rel_path.starts_with("histology_slides/breast/"));
    assert_eq!(key(v1), top);
    let breast = scan(Dataset::BreakHis, &root.join(BREAST), false).unwrap();
    assert!(breast[0].rel_path.starts_with("benign/SOB/"));
    assert_eq!(key(breast), top);
}

#[test]
fn regions_need_the_same_sequence_number_at_all_four_magnifications() {
    let (_tmp, root) = breakhis_copy();
    let p = root.join(BREAST).join(F_PATIENT);
    // Give the 100X, 200X and 400X images the 40X image's sequence number 023.
    for (mag, old) in [(100, "001"), (200, "032"), (400, "033")] {
        std::fs::rename(
            p.join(format!("{mag}X/SOB_B_F-14-25197-{mag}-{old}.png")),
            p.join(format!("{mag}X/SOB_B_F-14-25197-{mag}-023.png")),
        )
        .unwrap();
    }
    let recs = scan(Dataset::BreakHis, &root, false).unwrap();
    let regions = regions_at_all_magnifications(&recs);
    assert_eq!(regions.len(), 1);
    let r = &regions[0];
    assert_eq!((r.patient.as_str(), r.subtype.as_str(), r.seq), ("25197", "F", 23));
    assert_eq!((r.label, r.subtype_label), (0, 1));
    for (img, mag) in r.images.iter().zip(["40X", "100X", "200X", "400X"]) {
        assert!(img.contains(&format!("/{mag}/")), "{img} should be at {mag}");
    }
    // Removing one magnification breaks the region.
    std::fs::remove_file(p.join("200X/SOB_B_F-14-25197-200-023.png")).unwrap();
    let recs = scan(Dataset::BreakHis, &root, false).unwrap();
    assert!(regions_at_all_magnifications(&recs).is_empty());
}

#[test]
fn name_parsers_round_trip_and_reject_garbage() {
    let n = ImageName::parse("SOB_M_DC-14-2523-40-010.png").unwrap();
    assert_eq!((n.class_letter, n.subtype.as_str(), n.year.as_str()), ('M', "DC", "14"));
    assert_eq!((n.slide.as_str(), n.magnification, n.seq), ("2523", 40, 10));
    assert_eq!(n.name(), "SOB_M_DC-14-2523-40-010.png");
    let d = PatientDir::parse("SOB_B_A_14-22549AB").unwrap();
    assert_eq!((d.class_letter, d.subtype.as_str(), d.slide.as_str()), ('B', "A", "22549AB"));
    assert_eq!(d.name(), "SOB_B_A_14-22549AB");
    for bad in [
        "SOB_X_DC-14-2523-40-010.png",
        "SOB_M_DC-14-2523-50-010.png",
        "SOB_M_DC-14-2523-40.png",
        "SOB_M_DC-14-2523-40-01a.png",
        "SOB_M_DC-14-2523-40-010.jpg",
    ] {
        assert!(ImageName::parse(bad).is_none(), "{bad}");
    }
    let c = CellName::parse("ytma49_042003_malignant1_ccd.tif").unwrap();
    assert_eq!((c.batch.as_str(), c.label, c.number), ("ytma49_042003", 1, 1));
    assert_eq!(c.name(), "ytma49_042003_malignant1_ccd.tif");
    assert!(CellName::parse("ytma49_042003_normal1_ccd.tif").is_none());
}

#[test]
fn missing_or_wrong_root_says_what_was_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let err = scan(Dataset::BreakHis, &tmp.path().join("nope"), false).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("no such folder"), "{err}");

    std::fs::create_dir_all(tmp.path().join("images/whatever")).unwrap();
    let err = scan(Dataset::BreakHis, tmp.path(), false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::NotFound { .. }), "{msg}");
    assert!(msg.contains("BreaKHis_v1") && msg.contains("benign"), "{msg}");

    let err = scan(Dataset::Bach, tmp.path(), false).unwrap_err();
    assert!(err.to_string().contains("ICIAR2018_BACH_Challenge/Photos"), "{err}");
    let err = scan(Dataset::BreastCell, tmp.path(), false).unwrap_err();
    assert!(err.to_string().contains("_ccd.tif"), "{err}");
}

#[test]
fn every_bad_breakhis_file_is_reported_in_one_error() {
    let (_tmp, root) = breakhis_copy();
    let breast = root.join(BREAST);
    let p = breast.join(F_PATIENT);
    // 1. Truncated PNG: a real file cut in half.
    let trunc = p.join("40X/SOB_B_F-14-25197-40-023.png");
    let bytes = std::fs::read(&trunc).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    // 2. Text with a .png name.
    let text = p.join("40X/SOB_B_F-14-25197-40-099.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    // 3. Zero bytes.
    let zero = p.join("40X/SOB_B_F-14-25197-40-098.png");
    std::fs::write(&zero, b"").unwrap();
    // 4. A 100X image filed under 40X.
    let misfiled = p.join("40X/SOB_B_F-14-25197-100-001.png");
    std::fs::copy(p.join("100X/SOB_B_F-14-25197-100-001.png"), &misfiled).unwrap();
    // 5. An image named for another patient.
    let other = p.join("200X/SOB_B_F-14-99999-200-032.png");
    std::fs::rename(p.join("200X/SOB_B_F-14-25197-200-032.png"), &other).unwrap();
    // 6. An unexpected folder, and 7. a patient folder in the wrong subtype.
    let extra = breast.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    let wrong = breast.join("benign/SOB/adenosis/SOB_B_F_14-11111");
    std::fs::create_dir_all(wrong.join("40X")).unwrap();
    // 8. A non-image file in a magnification folder.
    let notes = p.join("400X/notes.txt");
    std::fs::write(&notes, "x").unwrap();

    let err = scan(Dataset::BreakHis, &root, true).unwrap_err();
    let msg = err.to_string();
    let problems = err.problems();
    let kind_of = |path: &Path| {
        problems
            .iter()
            .find(|p| p.path == path)
            .map(|p| p.kind)
            .unwrap_or_else(|| panic!("no problem reported for {}:\n{msg}", path.display()))
    };
    assert_eq!(kind_of(&trunc), ProblemKind::Truncated);
    assert_eq!(kind_of(&text), ProblemKind::NotAnImage);
    assert_eq!(kind_of(&zero), ProblemKind::ZeroByte);
    assert_eq!(kind_of(&misfiled), ProblemKind::Misnamed);
    assert_eq!(kind_of(&other), ProblemKind::Misnamed);
    assert_eq!(kind_of(&extra), ProblemKind::Unexpected);
    assert_eq!(kind_of(&wrong), ProblemKind::Misnamed);
    assert_eq!(kind_of(&notes), ProblemKind::NotAnImage);
    assert_eq!(problems.len(), 8, "{msg}");
    assert!(msg.contains("8 problem(s)"), "{msg}");
    assert!(msg.contains("truncated PNG (file ends after"), "{msg}");
    assert!(msg.contains("magnification 100X (folder: 40X)"), "{msg}");
    assert!(msg.contains("patient 99999 (folder: 25197)"), "{msg}");
    assert!(msg.contains("re-download"), "{msg}");

    // Without decoding, content problems go unseen; naming and zero-byte ones do not.
    let err = scan(Dataset::BreakHis, &root, false).unwrap_err();
    let kinds: Vec<_> = err.problems().iter().map(|p| p.kind).collect();
    assert!(!kinds.contains(&ProblemKind::Truncated));
    assert_eq!(kinds.iter().filter(|k| **k == ProblemKind::NotAnImage).count(), 1);
    assert!(kinds.contains(&ProblemKind::Misnamed));
    assert!(kinds.contains(&ProblemKind::ZeroByte));
}

#[test]
fn a_long_problem_list_is_capped() {
    let (_tmp, root) = breakhis_copy();
    let dir = root.join(BREAST).join(F_PATIENT).join("40X");
    for i in 0..25 {
        std::fs::write(dir.join(format!("junk{i:02}.png")), b"").unwrap();
    }
    let err = scan(Dataset::BreakHis, &root, false).unwrap_err();
    assert_eq!(err.problems().len(), 25);
    let msg = err.to_string();
    assert!(msg.contains("and 5 more"), "{msg}");
    assert_eq!(msg.matches("\n  - ").count(), 20, "{msg}");
}

#[test]
fn real_breast_cell_fixture_reads_and_root_is_forgiving() {
    let root = fixtures().join("ucsb_breast");
    let recs = scan(Dataset::BreastCell, &root, true).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].rel_path, "ytma10_010704_benign1_ccd.tif");
    assert_eq!((recs[0].label, recs[0].batch.as_deref()), (0, Some("ytma10_010704")));
    assert_eq!((recs[1].label, recs[1].class_name.as_str()), (1, "malignant"));
    assert_eq!(recs[1].batch.as_deref(), Some("ytma49_042003"));
    // The parent folder works too: its only subfolder of UCSB images is found.
    let up = scan(Dataset::BreastCell, &fixtures(), false).unwrap();
    assert_eq!(up[0].rel_path, "ucsb_breast/ytma10_010704_benign1_ccd.tif");
}

#[test]
fn truncated_tiff_and_misnamed_cell_image_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&fixtures().join("ucsb_breast"), tmp.path());
    let t = tmp.path().join("ytma10_010704_benign1_ccd.tif");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&t, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let odd = tmp.path().join("cells_01.tif");
    std::fs::copy(tmp.path().join("ytma49_042003_malignant1_ccd.tif"), &odd).unwrap();
    let err = scan(Dataset::BreastCell, tmp.path(), true).unwrap_err();
    let kinds: Vec<_> = err.problems().iter().map(|p| (p.path.clone(), p.kind)).collect();
    assert!(kinds.contains(&(t.clone(), ProblemKind::Truncated)), "{err}");
    assert!(kinds.contains(&(odd.clone(), ProblemKind::Misnamed)), "{err}");
    assert_eq!(kinds.len(), 2, "{err}");
}

#[test]
fn bach_layout_is_read_forgivingly_and_misfiled_images_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let tif = fixtures().join("ucsb_breast/ytma10_010704_benign1_ccd.tif");
    let photos = tmp.path().join("ICIAR2018_BACH_Challenge/Photos");
    for (folder, name) in [
        ("Benign", "b001.tif"),
        ("Invasive", "iv001.tif"),
        ("in_situ", "is001.tif"),
        ("Normal", "n001.tif"),
        ("Normal", "n002.tif"),
    ] {
        std::fs::create_dir_all(photos.join(folder)).unwrap();
        std::fs::copy(&tif, photos.join(folder).join(name)).unwrap();
    }
    std::fs::write(photos.join("microscopy_ground_truth.csv"), "b001.tif,Benign\n").unwrap();
    for root in [tmp.path().to_path_buf(), photos.clone()] {
        let recs = scan(Dataset::Bach, &root, true).unwrap();
        let got: Vec<_> = recs.iter().map(|r| (r.class_name.as_str(), r.label, r.seq)).collect();
        assert_eq!(
            got,
            [
                ("benign", 0, Some(1)),
                ("invasive", 1, Some(1)),
                ("normal", 3, Some(1)),
                ("normal", 3, Some(2)),
                ("insitu", 2, Some(1)),
            ]
        );
    }
    let misfiled = photos.join("Benign/iv007.tif");
    std::fs::copy(&tif, &misfiled).unwrap();
    std::fs::create_dir_all(photos.join("Unknown")).unwrap();
    let err = scan(Dataset::Bach, tmp.path(), false).unwrap_err();
    let got: Vec<_> = err.problems().iter().map(|p| (p.path.clone(), p.kind)).collect();
    assert_eq!(got, [(misfiled, ProblemKind::Misnamed), (photos.join("Unknown"), ProblemKind::Unexpected)], "{err}");
}

#[test]
fn records_serialise_and_dataset_names_parse() {
    let recs = scan(Dataset::BreakHis, &fixtures().join("breakhis"), false).unwrap();
    let json = serde_json::to_string(&recs).unwrap();
    assert!(json.contains("\"dataset\":\"breakhis\""), "{json}");
    let back: Vec<ImageRecord> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, recs);
    for d in Dataset::ALL {
        assert_eq!(d.name().parse::<Dataset>().unwrap(), d);
    }
    assert!("breakhiss".parse::<Dataset>().is_err());
}
