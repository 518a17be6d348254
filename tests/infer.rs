//! `mpcs predict` / `embed` / `cam` through the real binary on committed fixture images, checked against
//! PyTorch (tests/golden/infer, made once by scripts/infer/make_golden.py) and against the library's own
//! forward pass. Weights come from `det_init`, a copy of scripts/nn/detinit.py (bit-for-bit the same values on
//! both sides), saved by the test, so no weight file is committed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mpcs::infer::{self, InputOptions};
use mpcs::loader::Normalize;
use mpcs::nn::{save, Arch, Dilation, Encoder};

type R<T> = anyhow::Result<T>;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/infer");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/infer")
}

fn golden() -> HashMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/infer/golden.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).expect("golden file")
}

#[path = "common/detinit.rs"]
mod detinit;
use detinit::det_values;

/// Saves a det_init `arch` with `classes` outputs (None: encoder only) to `path`.
fn save_weights(arch: Arch, classes: Option<usize>, path: &Path) -> R<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    Encoder::new(arch, vb, classes, Dilation::None)?;
    {
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            if var.dtype() == DType::F32 {
                var.set(&Tensor::from_vec(det_values(name, var.dims()), var.dims(), &Device::Cpu)?)?;
            }
        }
    }
    save(&varmap, path)?;
    Ok(())
}

fn mpcs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mpcs")).args(args).output().expect("run mpcs")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "mpcs failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<(String, Vec<f32>)>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .map(|l| {
            let mut f = l.split(',');
            let name = f.next().unwrap().to_string();
            (name, f.map(|v| v.parse().unwrap()).collect())
        })
        .collect();
    (header, rows)
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // f32::max drops NaN, so a NaN anywhere would otherwise read as a perfect match.
    assert!(a.iter().chain(b).all(|v| v.is_finite()), "non-finite values in a comparison");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    weights: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let weights = root.join("model.safetensors");
    save_weights(Arch::ResNet18, Some(3), &weights).unwrap();
    Setup { _dir: dir, root, weights }
}

#[test]
fn predict_matches_pytorch_on_mixed_sizes() -> R<()> {
    let s = setup();
    let csv = s.root.join("out/preds.csv");
    let out = mpcs(&[
        "predict",
        "--arch",
        "resnet18",
        "--weights",
        s.weights.to_str().unwrap(),
        "--images",
        FIX,
        "--out",
        csv.to_str().unwrap(),
        "--normalize",
        "imagenet",
        "--classes",
        "3",
    ]);
    ok(&out);
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, ["file", "out_0", "out_1", "out_2"]);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["a.png", "b.png", "sub/c.png"], "sorted, relative, recursive");
    let g = golden();
    for (name, row) in &rows {
        let key = name.rsplit('/').next().unwrap().trim_end_matches(".png");
        let want = g[&format!("logits.{key}")].to_vec1::<f32>()?;
        let err = max_rel(row, &want);
        println!("{name}: {row:?} vs torch {want:?}: rel err {err:.2e}");
        assert!(err < 1e-4, "{name}: {row:?} vs {want:?}");
    }
    // --arch may be left out: it is read off the weights.
    let csv2 = s.root.join("preds2.csv");
    let args = ["predict", "--weights", s.weights.to_str().unwrap(), "--images", FIX];
    ok(&mpcs(&[&args[..], &["--out", csv2.to_str().unwrap(), "--normalize", "imagenet"]].concat()));
    assert_eq!(std::fs::read(&csv)?, std::fs::read(&csv2)?);
    Ok(())
}

#[test]
fn predict_and_embed_match_the_library_forward_with_resize() -> R<()> {
    let s = setup();
    let csv = s.root.join("preds.csv");
    let feats = s.root.join("feats.safetensors");
    let common = ["--weights", s.weights.to_str().unwrap(), "--images", FIX, "--size", "64"];
    ok(&mpcs(&[&["predict"][..], &common, &["--out", csv.to_str().unwrap()]].concat()));
    ok(&mpcs(&[&["embed"][..], &common, &["--out", feats.to_str().unwrap(), "--batch", "2"]].concat()));

    let model = infer::load_model(Arch::ResNet18, &s.weights, &Device::Cpu)?;
    assert_eq!(model.outputs, 3);
    let input = InputOptions { size: Some(64), normalize: Normalize::None };
    let files = infer::list_images(&fixtures())?;
    let images: Vec<_> = files.iter().map(|(_, p)| infer::images::load_image(p, &input).unwrap()).collect();
    assert!(images.iter().all(|i| (i.width, i.height) == (64, 64)));
    let x = infer::image_tensor(&images, Normalize::None, &Device::Cpu)?;
    let logits = model.logits(&x)?.to_vec2::<f32>()?;
    let pooled = model.features(&x)?.to_vec2::<f32>()?;

    let (_, rows) = read_csv(&csv);
    assert_eq!(rows.len(), 3);
    for ((name, row), want) in rows.iter().zip(&logits) {
        assert!(max_rel(row, want) < 1e-5, "{name}: {row:?} vs library {want:?}");
    }
    let (names, features) = infer::read_embeddings(&feats)?;
    assert_eq!(names, ["a.png", "b.png", "sub/c.png"]);
    assert_eq!(features.len(), 3);
    for (got, want) in features.iter().zip(&pooled) {
        assert_eq!(got.len(), 512);
        assert!(max_rel(got, want) < 1e-5, "embedding differs from the library's pooled features");
    }
    Ok(())
}

#[test]
fn grad_cam_matches_pytorch_hooks() -> R<()> {
    let s = setup();
    let model = infer::load_model(Arch::ResNet18, &s.weights, &Device::Cpu)?;
    let g = golden();
    let input = InputOptions { size: None, normalize: Normalize::ImageNet };
    for (file, key) in [("a.png", "a"), ("b.png", "b"), ("sub/c.png", "c")] {
        let img = infer::images::load_image(&fixtures().join(file), &input)?;
        let x = infer::image_tensor(std::slice::from_ref(&img), Normalize::ImageNet, &Device::Cpu)?;
        // The last stage (what the automatic choice takes at 128 px) and an earlier one (what it takes at
        // 32 px), both against PyTorch forward hooks on the same module.
        for (layer, prefix) in [("layer4", "cam"), ("layer2", "cam2")] {
            let cam = infer::grad_cam(&model, &x, Some(0), Some(layer))?;
            assert_eq!((cam.class, cam.layer.as_str()), (0, layer));
            let raw_want = &g[&format!("{prefix}_raw.{key}")];
            assert_eq!((cam.fh, cam.fw), raw_want.dims2()?, "{file} {layer}: feature map size");
            let w_err = max_rel(&cam.weights, &g[&format!("{prefix}_weights.{key}")].to_vec1::<f32>()?);
            let raw_err = max_rel(&cam.raw, &raw_want.flatten_all()?.to_vec1::<f32>()?);
            let map_want = &g[&format!("{prefix}_map.{key}")];
            assert_eq!((cam.height, cam.width), map_want.dims2()?);
            let map_err = max_rel(&cam.map, &map_want.flatten_all()?.to_vec1::<f32>()?);
            println!("{file} {layer}: weights {w_err:.2e}, raw {raw_err:.2e}, map {map_err:.2e}");
            assert!(w_err < 1e-4 && raw_err < 1e-4 && map_err < 1e-3, "{file} {layer}");
            assert!(cam.raw.iter().any(|&v| v > 0.0), "{file} {layer}: a map with evidence");
            assert!(cam.map.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        // Without a class, the top logit is explained.
        let top = infer::grad_cam(&model, &x, None, Some("layer4"))?;
        let best = top.logits.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(top.logits[top.class], best);
    }
    Ok(())
}

#[test]
fn grad_cam_picks_a_layer_with_spatial_extent() -> R<()> {
    // ResNet-18 maps at 32 px: layer1 8×8, layer2 4×4, layer3 2×2, layer4 1×1 (nothing to locate); at 128 px
    // layer4 is 4×4. The automatic choice is the deepest with at least 4×4 cells (layer1 at 16 px); an 8 px input
    // has none (layer1 is 2×2), so the largest map, layer1's, is used.
    let s = setup();
    let model = infer::load_model(Arch::ResNet18, &s.weights, &Device::Cpu)?;
    let cases = [(128, "layer4", 4), (96, "layer3", 6), (32, "layer2", 4), (16, "layer1", 4), (8, "layer1", 2)];
    for (size, layer, side) in cases {
        let input = InputOptions { size: Some(size), normalize: Normalize::ImageNet };
        let img = infer::images::load_image(&fixtures().join("a.png"), &input)?;
        let x = infer::image_tensor(std::slice::from_ref(&img), Normalize::ImageNet, &Device::Cpu)?;
        let cam = infer::grad_cam(&model, &x, None, None)?;
        assert_eq!((cam.layer.as_str(), cam.fh, cam.fw), (layer, side, side), "{size} px");
        // The logits do not depend on where the backward pass starts.
        let whole = infer::grad_cam(&model, &x, None, Some("layer4"))?;
        assert!(max_rel(&cam.logits, &whole.logits) < 1e-5, "{size} px: logits");
    }
    let x = infer::image_tensor(
        std::slice::from_ref(&infer::images::load_image(&fixtures().join("a.png"), &Default::default())?),
        Normalize::ImageNet,
        &Device::Cpu,
    )?;
    let err = infer::grad_cam(&model, &x, None, Some("layer5")).unwrap_err().to_string();
    assert!(err.contains("no layer 'layer5'") && err.contains("layer1, layer2, layer3, layer4"), "{err}");
    Ok(())
}

#[test]
fn cam_cli_writes_overlays() -> R<()> {
    let s = setup();
    let out_dir = s.root.join("cams");
    let a = fixtures().join("a.png");
    let c = fixtures().join("sub/c.png");
    let out = mpcs(&[
        "cam",
        "--weights",
        s.weights.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--class",
        "2",
        a.to_str().unwrap(),
        c.to_str().unwrap(),
    ]);
    ok(&out);
    // Which layer each map comes from is said: c (112×96) has a 3×4 layer4 map, so layer3 is explained.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("a.cam.png (class 2, layer4 map 4×4)"), "{stdout}");
    assert!(stdout.contains("c.cam.png (class 2, layer3 map 6×7)"), "{stdout}");
    for (name, src) in [("a.cam.png", &a), ("c.cam.png", &c)] {
        let png = image::open(out_dir.join(name))?.to_rgb8();
        let orig = image::open(src)?.to_rgb8();
        assert_eq!(png.dimensions(), orig.dimensions(), "{name}: overlay at input size");
        let changed = png.pixels().zip(orig.pixels()).filter(|(p, q)| p != q).count();
        assert!(changed > png.len() / 3 / 2, "{name}: the heat map is drawn over the image");
    }
    // Keep the overlays for a person to look at when asked (MPCS_INFER_KEEP=dir).
    if let Some(keep) = std::env::var_os("MPCS_INFER_KEEP") {
        std::fs::create_dir_all(&keep)?;
        for name in ["a.cam.png", "c.cam.png"] {
            std::fs::copy(out_dir.join(name), Path::new(&keep).join(name))?;
        }
    }
    // Out-of-range class: a user error.
    let bad = mpcs(&[
        "cam",
        "--weights",
        s.weights.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--class",
        "7",
        a.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("class 7 is out of range"));
    Ok(())
}

#[test]
fn grad_cam_peaks_where_the_evidence_is() -> R<()> {
    // A red square in the bottom-right corner of a grey image. Class 0's fc row is set to d = A(square cell) −
    // mean A(other cells) over the 512 channels of the last feature map A, so its logit grows with exactly the
    // evidence that sits in the square; Grad-CAM's channel weights are then ∝ d and the map must peak there
    // (Σ d_c A_c is larger in the square by |d|²). Catches transposed or flipped maps and wrong upsampling.
    let (side, sq) = (128usize, 32usize);
    let mut img = mpcs::loader::Rgb8::new(side, side);
    for y in 0..side {
        for x in 0..side {
            let i = (y * side + x) * 3;
            let px = if x >= side - sq && y >= side - sq { [220, 30, 40] } else { [128, 128, 128] };
            img.data[i..i + 3].copy_from_slice(&px);
        }
    }
    let x = infer::image_tensor(std::slice::from_ref(&img), Normalize::ImageNet, &Device::Cpu)?;

    let dir = tempfile::tempdir()?;
    let weights = dir.path().join("m.safetensors");
    save_weights(Arch::ResNet18, Some(3), &weights)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = mpcs::nn::ResNet::new(Arch::ResNet18, vb, Some(3), Dilation::None)?;
    mpcs::nn::load_into(&varmap, &weights, false)?;
    let a = net.feature_map_t(&x, false)?.squeeze(0)?; // (512, 4, 4): the square is cell (3, 3)
    let (c, h, w) = a.dims3()?;
    let a = a.reshape((c, h * w))?.to_vec2::<f32>()?;
    let d: Vec<f32> =
        a.iter().map(|ch| ch[h * w - 1] - ch[..h * w - 1].iter().sum::<f32>() / (h * w - 1) as f32).collect();
    let fc = varmap.data().lock().unwrap()["fc.weight"].clone();
    let mut rows = fc.as_tensor().to_vec2::<f32>()?;
    rows[0] = d;
    fc.set(&Tensor::new(rows, &Device::Cpu)?)?;
    save(&varmap, &weights)?;

    let model = infer::load_model(Arch::ResNet18, &weights, &Device::Cpu)?;
    let cam = infer::grad_cam(&model, &x, Some(0), None)?;
    assert_eq!(cam.layer, "layer4");
    let peak = cam.map.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    let (py, px) = (peak / side, peak % side);
    let (mut inside, mut outside) = ((0f32, 0usize), (0f32, 0usize));
    for (i, &v) in cam.map.iter().enumerate() {
        let t = if i % side >= side - sq && i / side >= side - sq { &mut inside } else { &mut outside };
        t.0 += v;
        t.1 += 1;
    }
    let (mi, mo) = (inside.0 / inside.1 as f32, outside.0 / outside.1 as f32);
    println!("peak at ({px}, {py}); mean map in the square {mi:.3}, elsewhere {mo:.3}");
    assert!(px >= side - sq && py >= side - sq, "peak ({px}, {py}) outside the square");
    assert!(mi > 3.0 * mo, "square {mi} vs rest {mo}");
    Ok(())
}

#[test]
fn clear_errors_for_bad_inputs() -> R<()> {
    let s = setup();
    let w = s.weights.to_str().unwrap();
    let out = s.root.join("p.csv");
    let o = out.to_str().unwrap();
    let run = |images: &Path, extra: &[&str]| {
        let r =
            mpcs(&[&["predict", "--weights", w, "--images", images.to_str().unwrap(), "--out", o][..], extra].concat());
        (r.status.code(), String::from_utf8_lossy(&r.stderr).into_owned())
    };

    let (code, msg) = run(&s.root.join("nope"), &[]);
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("no such folder"), "{msg}");

    let empty = s.root.join("empty");
    std::fs::create_dir_all(empty.join("deeper"))?;
    std::fs::write(empty.join("notes.txt"), "x")?;
    #[cfg(unix)]
    std::os::unix::fs::symlink(&empty, empty.join("deeper/loop"))?; // a loop is walked once
    let (code, msg) = run(&empty, &[]);
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("no images found"), "{msg}");

    let broken = s.root.join("broken");
    std::fs::create_dir_all(&broken)?;
    std::fs::copy(fixtures().join("a.png"), broken.join("good.png"))?;
    let bytes = std::fs::read(fixtures().join("b.png"))?;
    std::fs::write(broken.join("cut.png"), &bytes[..bytes.len() / 2])?;
    let (code, msg) = run(&broken, &[]);
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("cut.png") && msg.contains("cannot decode"), "{msg}");
    assert!(!out.exists(), "no half-written CSV");

    let (code, msg) = run(&fixtures(), &["--arch", "resnet34"]);
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("look like resnet18") && msg.contains("--arch resnet18"), "{msg}");

    let (code, msg) = run(&fixtures(), &["--classes", "5"]);
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("3 outputs"), "{msg}");

    let encoder = s.root.join("encoder.safetensors");
    save_weights(Arch::ResNet18, None, &encoder)?;
    let r = mpcs(&["predict", "--weights", encoder.to_str().unwrap(), "--images", FIX, "--out", o]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("mpcs embed"));
    Ok(())
}

#[test]
fn predict_reads_tiff_and_jpeg() -> R<()> {
    // Other formats decode too (BreakHis is PNG, UCSB TIFF, BACH TIFF, many others JPEG).
    let s = setup();
    let dir = s.root.join("formats");
    std::fs::create_dir_all(&dir)?;
    let tif =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/ucsb_breast/ytma10_010704_benign1_ccd.tif");
    std::fs::copy(&tif, dir.join("x.TIF"))?;
    image::open(fixtures().join("a.png"))?.to_rgb8().save(dir.join("y.jpg"))?;
    let csv = s.root.join("f.csv");
    let args = ["predict", "--weights", s.weights.to_str().unwrap(), "--images", dir.to_str().unwrap()];
    ok(&mpcs(&[&args[..], &["--out", csv.to_str().unwrap(), "--size", "32"]].concat()));
    let (_, rows) = read_csv(&csv);
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["x.TIF", "y.jpg"]);
    assert!(rows.iter().all(|r| r.1.len() == 3 && r.1.iter().all(|v| v.is_finite())));
    Ok(())
}

/// `--output-stride` builds the dilated ResNet the BACH / breast-cell models were trained as: same weights,
/// different outputs; a stride the dilated ResNet does not have is a usage error.
#[test]
fn output_stride_selects_the_dilated_network() -> R<()> {
    let dir = tempfile::tempdir()?;
    let w = dir.path().join("r50.safetensors");
    save_weights(Arch::ResNet50, Some(4), &w)?;
    let run = |extra: &[&str], out: &str| {
        let out = dir.path().join(out);
        let mut args = vec!["predict", "--weights", w.to_str().unwrap(), "--images", FIX, "--size", "32"];
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        (mpcs(&args), out)
    };
    let (plain, plain_csv) = run(&[], "plain.csv");
    let (dilated, dilated_csv) = run(&["--output-stride", "8"], "dilated.csv");
    assert!(plain.status.success() && dilated.status.success(), "{}", String::from_utf8_lossy(&dilated.stderr));
    let (a, b) = (std::fs::read_to_string(plain_csv)?, std::fs::read_to_string(dilated_csv)?);
    assert_eq!(a.lines().count(), b.lines().count());
    assert_ne!(a, b, "dilation must change what the network computes");
    let (bad, _) = run(&["--output-stride", "5"], "bad.csv");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains('5'));
    Ok(())
}

/// EfficientNet-b2 weights in efficientnet_pytorch's layout go through `predict`, `embed` and `cam` with
/// the architecture read off the weights (its forward pass is checked against efficientnet_pytorch in
/// tests/nn_efficientnet.rs). Grad-CAM is checked in closed form: in eval mode the logit is
/// `_fc(mean_hw(A))`, so ∂y_k/∂A_c(i,j) = W[k,c] / (h·w) everywhere, the channel weights are W[k,·]/(h·w),
/// and the raw map is ReLU(Σ_c w_c A_c) on the head activations A (1408 channels).
#[test]
fn efficientnet_b2_through_predict_embed_and_cam() -> R<()> {
    let dir = tempfile::tempdir()?;
    let w = dir.path().join("b2.safetensors");
    save_weights(Arch::EfficientNetB2, Some(2), &w)?;
    let csv = dir.path().join("preds.csv");
    let feats = dir.path().join("feats.safetensors");
    let common = ["--weights", w.to_str().unwrap(), "--images", FIX, "--size", "96"];
    ok(&mpcs(&[&["predict"][..], &common, &["--out", csv.to_str().unwrap()]].concat()));
    ok(&mpcs(&[&["embed"][..], &common, &["--arch", "efficientnet-b2", "--out", feats.to_str().unwrap()]].concat()));

    let model = infer::load_model(Arch::EfficientNetB2, &w, &Device::Cpu)?;
    assert_eq!(model.outputs, 2);
    let input = InputOptions { size: Some(96), normalize: Normalize::None };
    let files = infer::list_images(&fixtures())?;
    let images: Vec<_> = files.iter().map(|(_, p)| infer::images::load_image(p, &input).unwrap()).collect();
    let x = infer::image_tensor(&images, Normalize::None, &Device::Cpu)?;
    let logits = model.logits(&x)?.to_vec2::<f32>()?;
    let (header, rows) = read_csv(&csv);
    assert_eq!(header, ["file", "out_0", "out_1"]);
    for ((name, row), want) in rows.iter().zip(&logits) {
        assert!(max_rel(row, want) < 1e-5, "{name}: {row:?} vs library {want:?}");
    }
    let (_, features) = infer::read_embeddings(&feats)?;
    assert!(features.iter().all(|f| f.len() == 1408), "b2 features are 1408 wide");

    // Grad-CAM against its closed form, on one image at 96 px (a 3×3 head map).
    let x0 = infer::image_tensor(&images[..1], Normalize::None, &Device::Cpu)?;
    let cam = infer::grad_cam(&model, &x0, Some(1), None)?;
    assert_eq!(cam.layer, "head");
    assert_eq!((cam.fh, cam.fw), (3, 3), "EfficientNet downsamples 32×");
    let fc_w = mpcs::nn::weights::read_tensors(&w)?["_fc.weight"].to_vec2::<f32>()?;
    let hw = (cam.fh * cam.fw) as f32;
    let want_w: Vec<f32> = fc_w[1].iter().map(|v| v / hw).collect();
    assert!(max_rel(&cam.weights, &want_w) < 1e-5, "channel weights are W[class]/(h·w)");
    let a = mpcs::nn::no_grad(|| model.net.feature_map_t(&x0, false).map_err(anyhow::Error::from))?
        .squeeze(0)?
        .flatten_from(1)?
        .to_vec2::<f32>()?;
    let want_raw: Vec<f32> =
        (0..cam.fh * cam.fw).map(|p| a.iter().zip(&want_w).map(|(ch, wc)| ch[p] * wc).sum::<f32>().max(0.0)).collect();
    assert!(max_rel(&cam.raw, &want_raw) < 1e-4, "{:?} vs {want_raw:?}", cam.raw);

    let out_dir = dir.path().join("cams");
    let a_png = fixtures().join("a.png");
    ok(&mpcs(&["cam", "--weights", w.to_str().unwrap(), "--out", out_dir.to_str().unwrap(), a_png.to_str().unwrap()]));
    assert!(out_dir.join("a.cam.png").is_file());

    // ResNet weights under --arch efficientnet_b2: refused with the architecture they look like.
    let r18 = dir.path().join("r18.safetensors");
    save_weights(Arch::ResNet18, Some(2), &r18)?;
    let bad = mpcs(&[
        "predict",
        "--arch",
        "efficientnet_b2",
        "--weights",
        r18.to_str().unwrap(),
        "--images",
        FIX,
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--arch resnet18"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    Ok(())
}
