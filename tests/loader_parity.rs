//! Parity with albumentations 2.0.8 / OpenCV: each transform with FIXED parameters on a real
//! BreakHis image (tests/fixtures/loader/breakhis_small.png) against the golden PNGs made by
//! scripts/loader/make_goldens.py (tests/golden/loader/manifest.json lists them and their
//! parameters).
//!
//! Bounds, all far inside the brief's (mean |diff| <= 1 grey level; rotate mean <= 2 ignoring a
//! 2-pixel frame): bit-exact (max 0) for brightness, contrast, flips, integer translation and
//! crop; resize mean <= 0.01, max 1 (OpenCV fixed point reproduced); saturation mean <= 0.05 and
//! hue mean <= 0.15, max 1 (OpenCV's SIMD/scalar split rounds some pixels differently); the
//! four-step jitter mean <= 0.2, max 3 (a one-level difference early is scaled by later steps);
//! rotate mean <= 0.3, max 4, ignoring a 2-pixel frame (OpenCV 4.x quantises sample positions to
//! 1/32 pixel; measured 0.18; against OpenCV 5.0's float warp it was 0.0001).

use std::path::Path;

use mpcs::loader::color::{self, Jitter};
use mpcs::loader::geometry::{self, Border, FlipCode};
use mpcs::loader::Rgb8;

fn load_png(path: &Path) -> Rgb8 {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    Rgb8::from_raw(img.width() as usize, img.height() as usize, img.into_raw()).unwrap()
}

/// (mean, max) absolute difference over pixels at least `frame` pixels from the edge.
fn diff(a: &Rgb8, b: &Rgb8, frame: usize) -> (f64, u8) {
    assert_eq!((a.width, a.height), (b.width, b.height), "sizes differ");
    let (mut sum, mut n, mut max) = (0u64, 0u64, 0u8);
    for y in frame..a.height - frame {
        for x in frame..a.width - frame {
            let (p, q) = (a.px(x, y), b.px(x, y));
            for c in 0..3 {
                let d = p[c].abs_diff(q[c]);
                sum += d as u64;
                n += 1;
                max = max.max(d);
            }
        }
    }
    (sum as f64 / n as f64, max)
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("manifest case lacks {k}: {v}"))
}

#[test]
fn transforms_match_albumentations_goldens() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loader");
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/loader");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden.join("manifest.json")).unwrap()).unwrap();
    let src = load_png(&fixtures.join("breakhis_small.png"));
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "manifest lists {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let op = case["op"].as_str().unwrap();
        let mut img = src.clone();
        // (frame ignored, bound on mean, bound on max)
        let (frame, mean_bound, max_bound) = match op {
            "brightness" => {
                color::brightness(&mut img, f(case, "factor"));
                (0, 0.0, 0)
            }
            "contrast" => {
                color::contrast(&mut img, f(case, "factor"));
                (0, 0.0, 0)
            }
            "saturation" => {
                color::saturation(&mut img, f(case, "factor"));
                (0, 0.05, 1)
            }
            "hue" => {
                color::hue(&mut img, f(case, "factor"));
                (0, 0.15, 1)
            }
            "jitter" => {
                let order: Vec<u8> =
                    case["order"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
                let j = Jitter {
                    brightness: f(case, "brightness"),
                    contrast: f(case, "contrast"),
                    saturation: f(case, "saturation"),
                    hue: f(case, "hue"),
                    order: order.try_into().unwrap(),
                };
                color::jitter(&mut img, &j);
                (0, 0.2, 3)
            }
            "flip" => {
                img = geometry::flip(&img, FlipCode::from_cv(case["code"].as_i64().unwrap() as i32));
                (0, 0.0, 0)
            }
            "rotate" => {
                let border = if case["border"] == "constant" { Border::Constant } else { Border::Reflect101 };
                img = geometry::rotate(&img, f(case, "angle"), border);
                (2, 0.3, 4)
            }
            "translate" => {
                img = geometry::translate(
                    &img,
                    case["dx"].as_i64().unwrap(),
                    case["dy"].as_i64().unwrap(),
                    Border::Constant,
                );
                (0, 0.0, 0)
            }
            "resize" => {
                img = geometry::resize(&img, f(case, "width") as usize, f(case, "height") as usize);
                (0, 0.01, 1)
            }
            "crop" => {
                let g = |k| f(case, k) as usize;
                img = geometry::crop(&img, g("x"), g("y"), g("width"), g("height"));
                (0, 0.0, 0)
            }
            other => panic!("unknown op {other} in manifest"),
        };
        let want = load_png(&golden.join(format!("{name}.png")));
        let (mean, max) = diff(&img, &want, frame);
        eprintln!("{name:>24}: mean |diff| {mean:.4}, max {max}");
        if mean > mean_bound || max > max_bound {
            failures.push(format!("{name}: mean {mean:.4} (bound {mean_bound}), max {max} (bound {max_bound})"));
        }
    }
    assert!(failures.is_empty(), "outside the bounds:\n{}", failures.join("\n"));
}
