//! Stain module behaviour that has no peer reference: pass-through of tissue-free tiles, refusal
//! of tissue-free targets, stored-parameter round trips, and the file- and folder-level API.

use std::path::{Path, PathBuf};

use mpcs::stain::{
    load_rgb, normalise_dir, normalise_dir_with, normalise_files, output_relpath, save_png_atomic, ChannelStats,
    Counts, Method, Normaliser, RgbImage, StainError, StainTarget, TargetParams,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stain").join(name)
}

fn white(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]))
}

/// A near-white tile with a few faint specks: almost no tissue.
fn almost_blank() -> RgbImage {
    let mut img = RgbImage::from_pixel(64, 64, image::Rgb([236, 234, 238]));
    for i in 0..5 {
        img.put_pixel(i * 7, i * 3, image::Rgb([120, 60, 140]));
    }
    img
}

fn target() -> RgbImage {
    load_rgb(&fixture("ts_target.png")).unwrap()
}

#[test]
fn tissue_free_tiles_pass_through_unchanged_for_every_method() {
    let tgt = target();
    for method in Method::ALL {
        let norm = Normaliser::fit(method, &tgt).unwrap();
        for tile in [white(32, 32), almost_blank(), RgbImage::new(16, 16)] {
            let out = norm.normalise(&tile);
            // black (all-zero) tiles are tissue by OD but have a degenerate colour distribution
            assert!(out.passed_through, "{method}: tile not passed through");
            assert_eq!(out.image, tile, "{method}: pass-through changed pixels");
        }
    }
}

#[test]
fn all_background_target_is_a_clear_error() {
    for method in Method::ALL {
        let err = Normaliser::fit(method, &white(40, 30)).unwrap_err();
        assert!(matches!(err, StainError::TargetNoTissue { .. }), "{method}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("almost no tissue") && msg.contains("0 of 1200"), "{msg}");
    }
}

#[test]
fn tissue_tiles_are_changed_and_never_nan() {
    let tgt = target();
    let src = load_rgb(&fixture("henorm2.png")).unwrap();
    for method in Method::ALL {
        let norm = Normaliser::fit(method, &tgt).unwrap();
        let out = norm.normalise(&src);
        assert!(!out.passed_through, "{method}");
        let changed = out.image.as_raw().iter().zip(src.as_raw()).filter(|(a, b)| a != b).count();
        assert!(changed > src.as_raw().len() / 2, "{method}: only {changed} values changed");
    }
}

#[test]
fn stored_target_parameters_rebuild_the_same_normaliser() {
    let tgt = target();
    let src = load_rgb(&fixture("bh_pt.png")).unwrap();
    for method in Method::ALL {
        let fitted = Normaliser::fit(method, &tgt).unwrap();
        let json = serde_json::to_string(&fitted.target()).unwrap();
        assert!(json.contains(&format!("\"method\":\"{}\"", method.as_str())), "{json}");
        let params: TargetParams = serde_json::from_str(&json).unwrap();
        let rebuilt = Normaliser::from_target(params).unwrap();
        assert_eq!(rebuilt.method(), method);
        assert_eq!(rebuilt.normalise(&src).image, fitted.normalise(&src).image, "{method}");
    }
}

#[test]
fn invalid_stored_parameters_are_rejected() {
    let bad = TargetParams::Macenko(StainTarget { stains: [[0.5, 0.7, 0.4], [0.2, 0.8, 0.5]], max_conc: [0.0, 1.0] });
    assert!(matches!(Normaliser::from_target(bad), Err(StainError::InvalidParams(_))));
    let bad = TargetParams::Reinhard(ChannelStats { mean: [f64::NAN, 0.0, 0.0], std: [1.0, 1.0, 1.0] });
    assert!(Normaliser::from_target(bad).is_err());
}

#[test]
fn method_names_parse() {
    for m in Method::ALL {
        assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
    }
    assert_eq!("Reinhard-LAB".parse::<Method>().unwrap(), Method::ReinhardLab);
    let err = "ruifrok".parse::<Method>().unwrap_err().to_string();
    assert!(err.contains("ruifrok") && err.contains("reinhard-lab"), "{err}");
}

#[test]
fn bach_preset_is_the_papers_values() {
    let TargetParams::Reinhard(s) = Normaliser::bach_reinhard().target() else { panic!("not Reinhard") };
    assert_eq!(s.mean, [8.74108109, -0.12440419, 0.0444982]);
    assert_eq!(s.std, [0.6135447, 0.10989545, 0.0286032]);
}

#[test]
fn truncated_and_non_image_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("bh_pt.png")).unwrap();
    let cut = dir.path().join("cut.png");
    std::fs::write(&cut, &full[..full.len() / 3]).unwrap();
    let err = load_rgb(&cut).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StainError::Decode { .. }), "{msg}");
    assert!(msg.contains("cut.png") && msg.contains("PNG") && msg.contains("truncated"), "{msg}");

    let txt = dir.path().join("notes.png");
    std::fs::write(&txt, b"hello, not an image").unwrap();
    let err = load_rgb(&txt).unwrap_err();
    assert!(matches!(err, StainError::NotImage { .. }), "{err}");

    let err = load_rgb(&dir.path().join("missing.png")).unwrap_err();
    assert!(matches!(err, StainError::Read { .. }) && err.to_string().contains("missing.png"));
}

#[test]
fn rgba_and_grey_inputs_load_as_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let rgba = image::RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 7]));
    let p = dir.path().join("a.png");
    rgba.save(&p).unwrap();
    let img = load_rgb(&p).unwrap();
    assert_eq!(img.get_pixel(2, 1).0, [10, 20, 30]);
    let grey = image::GrayImage::from_pixel(2, 2, image::Luma([99]));
    let p = dir.path().join("g.tif");
    grey.save(&p).unwrap();
    assert_eq!(load_rgb(&p).unwrap().get_pixel(0, 0).0, [99, 99, 99]);
}

#[test]
fn normalise_files_keeps_stems_and_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // a JPEG input gets a .png output with the same stem
    let jpg = dir.path().join("slide 1.jpg");
    load_rgb(&fixture("bh_dc.png")).unwrap().save(&jpg).unwrap();
    let blank = dir.path().join("blank.png");
    white(20, 20).save(&blank).unwrap();
    let inputs = vec![fixture("ts_source.png"), jpg, blank];
    let norm = Normaliser::fit_file(Method::Macenko, &fixture("ts_target.png")).unwrap();
    let counts = normalise_files(&norm, &inputs, &out).unwrap();
    assert_eq!(counts, Counts { images: 3, passed_through: 1 });
    let mut names: Vec<_> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["blank.png", "slide 1.png", "ts_source.png"]);
    assert_eq!(load_rgb(&out.join("blank.png")).unwrap(), white(20, 20));
    let direct = norm.normalise(&load_rgb(&fixture("ts_source.png")).unwrap());
    assert_eq!(load_rgb(&out.join("ts_source.png")).unwrap(), direct.image);
}

#[test]
fn normalise_files_refuses_stem_collisions_and_reports_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    std::fs::copy(fixture("bh_pt.png"), a.join("bh_pt.png")).unwrap();
    let norm = Normaliser::bach_reinhard();
    let out = dir.path().join("out");
    let err = normalise_files(&norm, &[fixture("bh_pt.png"), a.join("bh_pt.png")], &out).unwrap_err();
    assert!(matches!(err, StainError::OutputCollision { .. }), "{err}");
    assert!(!out.exists(), "nothing may be written on a collision");

    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n broken").unwrap();
    let err = normalise_files(&norm, &[fixture("bh_pt.png"), bad], &out).unwrap_err();
    assert!(err.to_string().contains("bad.png"), "{err}");
    // no temporary files are left behind
    for e in std::fs::read_dir(&out).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.contains("tmp"), "{name}");
    }
}

#[test]
fn normalise_dir_preserves_layout() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let deep = input.join("benign/SOB/40X");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(input.join("malignant")).unwrap();
    std::fs::copy(fixture("bh_pt.png"), deep.join("x.png")).unwrap();
    load_rgb(&fixture("bh_dc.png")).unwrap().save(input.join("malignant/y.tif")).unwrap();
    white(8, 8).save(deep.join("white.PNG")).unwrap();
    std::fs::write(input.join("README.txt"), "not an image").unwrap();
    let out = dir.path().join("out");
    let norm = Normaliser::fit(Method::ReinhardLab, &target()).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let counts =
        normalise_dir_with(&norm, &input, &out, &|p, pass| seen.lock().unwrap().push((p.to_path_buf(), pass))).unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.contains(&(deep.join("white.PNG"), true)), "{seen:?}");
    assert_eq!(counts, Counts { images: 3, passed_through: 1 });
    for rel in ["benign/SOB/40X/x.png", "benign/SOB/40X/white.png", "malignant/y.png"] {
        assert!(out.join(rel).is_file(), "{rel} missing");
    }
    assert!(!out.join("README.txt").exists());
    assert_eq!(output_relpath(Path::new("a/b.tiff")), Path::new("a/b.png"));

    let err = normalise_dir(&norm, &input.join("nope"), &out).unwrap_err();
    assert!(matches!(err, StainError::NotADirectory { .. }));
}

#[test]
fn save_png_atomic_creates_parents() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a/b/c.png");
    save_png_atomic(&white(4, 4), &p).unwrap();
    assert_eq!(load_rgb(&p).unwrap(), white(4, 4));
    assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
}
