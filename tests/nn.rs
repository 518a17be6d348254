//! Parity tests of `mpcs::nn` against PyTorch/torchvision golden files (tests/golden/nn, made
//! once by scripts/nn/make_golden.py). Model weights come from `det_init`, which reproduces
//! scripts/nn/detinit.py bit for bit, so no weight files need to be stored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mpcs::nn::pool::max_pool2d_padded;
use mpcs::nn::weights::{detect_arch, read_tensors};
use mpcs::nn::{
    load_into, load_into_with, mpcs_loss, nt_xent_symmetric, save, trainable_vars, Arch, BatchNorm, Dilation, Head,
    LoadOptions, NnError, Projector, ResNet,
};

type R<T> = anyhow::Result<T>;

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nn").join(name)
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden_path(name), &Device::Cpu).expect("golden file")
}

#[path = "common/detinit.rs"]
mod detinit;
use detinit::{det_init, det_values};

fn var(varmap: &VarMap, name: &str) -> Var {
    varmap.data().lock().unwrap()[name].clone()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    // max_all skips NaN: a NaN on either side would otherwise read as agreement.
    for t in [&a, &b] {
        assert!(t.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().is_finite(), "non-finite values");
    }
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-30)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let e = rel_err(a, b);
    println!("{what}: max rel err {e:.3e}");
    assert!(e <= tol, "{what}: max relative error {e:.3e} > {tol:.1e}");
}

fn model(arch: Arch, classes: Option<usize>, dilation: Dilation) -> (VarMap, ResNet) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let m = ResNet::new(arch, vb, classes, dilation).unwrap();
    det_init(&varmap);
    (varmap, m)
}

// ---- ResNet ----

#[test]
fn resnet18_eval_logits_match_torchvision() {
    let g = golden("resnet18.safetensors");
    let (_vm, m) = model(Arch::ResNet18, Some(10), Dilation::None);
    let y = m.forward_t(&g["x"], false).unwrap();
    assert_close("resnet18 eval logits", &y, &g["logits_eval"], 1e-4);
}

#[test]
fn resnet18_train_step_matches_torchvision() -> R<()> {
    let g = golden("resnet18.safetensors");
    let (vm, m) = model(Arch::ResNet18, Some(10), Dilation::None);
    let x = Var::from_tensor(&g["x"])?;
    let y = m.forward_t(x.as_tensor(), true)?;
    assert_close("resnet18 train logits", &y, &g["logits_train"], 1e-4);
    let grads = (y * &g["upstream"])?.sum_all()?.backward()?;
    assert_close("grad x", grads.get(x.as_tensor()).unwrap(), &g["grad.x"], 1e-4);
    for (k, v) in g.iter().filter(|(k, _)| k.starts_with("grad") && *k != "grad.x") {
        let (name, first8) = match k.strip_prefix("grad8.") {
            Some(n) => (n, true),
            None => (&k["grad.".len()..], false),
        };
        let got = grads.get(var(&vm, name).as_tensor()).expect(name);
        let got = if first8 { got.narrow(0, 0, 8)? } else { got.clone() };
        assert_close(k, &got, v, 1e-4);
    }
    for (k, v) in g.iter().filter(|(k, _)| k.starts_with("state.")) {
        assert_close(k, var(&vm, &k["state.".len()..]).as_tensor(), v, 1e-5);
    }
    let n = var(&vm, "bn1.num_batches_tracked");
    assert_eq!(n.as_tensor().to_scalar::<i64>()?, 1);
    Ok(())
}

#[test]
fn resnet50_eval_logits_and_features_match_torchvision() {
    let g = golden("resnet50.safetensors");
    let (_vm, m) = model(Arch::ResNet50, Some(10), Dilation::None);
    let y = m.forward_t(&g["x"], false).unwrap();
    assert_close("resnet50 eval logits", &y, &g["logits_eval"], 1e-4);
    let f = m.features_t(&g["x"], false).unwrap();
    assert_eq!(f.dims(), [2, 2048]);
    assert_close("resnet50 features", &f, &g["features_eval"], 1e-4);
}

#[test]
fn dilated_resnet50_features_match_torchvision() {
    let g = golden("resnet50_dilated.safetensors");
    for (os, d) in [(16, Dilation::OutputStride16), (8, Dilation::OutputStride8)] {
        let (_vm, m) = model(Arch::ResNet50, None, d);
        let map = m.feature_map_t(&g["x"], false).unwrap();
        assert_eq!(map.dims(), [2, 2048, 64 / os, 64 / os]);
        let first = map.narrow(1, 0, 16).unwrap();
        assert_close(&format!("os{os} map"), &first, &g[&format!("os{os}.map_eval_first16")], 1e-4);
        let f = m.forward_t(&g["x"], false).unwrap();
        assert_close(&format!("os{os} eval"), &f, &g[&format!("os{os}.features_eval")], 1e-4);
        let f = m.forward_t(&g["x"], true).unwrap();
        // Train-mode BatchNorm over 2×4×4 values per channel amplifies float32 rounding.
        assert_close(&format!("os{os} train"), &f, &g[&format!("os{os}.features_train")], 5e-4);
    }
}

#[test]
fn arch_names_and_dilation_rules() {
    assert_eq!(Arch::from_str("resnet50").unwrap(), Arch::ResNet50);
    assert_eq!(Arch::from_str("ResNet-18").unwrap(), Arch::ResNet18);
    let e = Arch::from_str("resnet51").unwrap_err().to_string();
    assert!(e.contains("resnet51") && e.contains("resnet152"), "{e}");
    assert_eq!(Dilation::from_output_stride(8).unwrap(), Dilation::OutputStride8);
    assert!(Dilation::from_output_stride(4).is_err());
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let e = ResNet::new(Arch::ResNet18, vb, None, Dilation::OutputStride8).unwrap_err();
    assert!(matches!(e, NnError::DilationUnsupported { .. }), "{e}");
}

#[test]
fn torchvision_names_and_trainable_vars() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    ResNet::new(Arch::ResNet18, vb, Some(1000), Dilation::None).unwrap();
    // torchvision resnet18: 62 parameters, 122 state-dict entries, 11,689,512 parameters.
    assert_eq!(vm.data().lock().unwrap().len(), 122);
    let tv = trainable_vars(&vm, "");
    assert_eq!(tv.len(), 62);
    assert_eq!(tv.iter().map(|v| v.elem_count()).sum::<usize>(), 11_689_512);
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    for n in ["layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "fc.bias"] {
        assert!(names.iter().any(|k| k == n), "{n}");
    }
    assert_eq!(detect_arch(names.iter().map(String::as_str)), Some(Arch::ResNet18));
    for arch in [Arch::ResNet34, Arch::ResNet50, Arch::ResNet101, Arch::ResNet152] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        ResNet::new(arch, vb, None, Dilation::None).unwrap();
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert_eq!(detect_arch(names.iter().map(String::as_str)), Some(arch));
    }
}

// ---- layers ----

#[test]
fn maxpool_3x3_s2_p1_and_gradient_match_torch() -> R<()> {
    let g = golden("maxpool.safetensors");
    for s in [9, 8] {
        let x = Var::from_tensor(&g[&format!("s{s}.x")])?;
        let y = max_pool2d_padded(x.as_tensor(), 3, 2, 1)?;
        assert_close(&format!("maxpool {s} y"), &y, &g[&format!("s{s}.y")], 0.0);
        let grads = (y * &g[&format!("s{s}.upstream")])?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).unwrap();
        assert_close(&format!("maxpool {s} grad"), gx, &g[&format!("s{s}.grad.x")], 1e-6);
    }
    Ok(())
}

#[test]
fn batchnorm_train_mode_matches_torch() -> R<()> {
    let g = golden("batchnorm.safetensors");
    for tag in ["bn2d", "bn1d"] {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let bn = BatchNorm::new(5, vb)?;
        det_init(&vm);
        let x = Var::from_tensor(&g[&format!("{tag}.x")])?;
        let y = bn.forward_train(x.as_tensor())?;
        assert_close(&format!("{tag} y"), &y, &g[&format!("{tag}.y")], 1e-5);
        let grads = (y * &g[&format!("{tag}.upstream")])?.sum_all()?.backward()?;
        assert_close(&format!("{tag} grad x"), grads.get(x.as_tensor()).unwrap(), &g[&format!("{tag}.grad.x")], 1e-5);
        for p in ["weight", "bias"] {
            let got = grads.get(var(&vm, p).as_tensor()).unwrap();
            assert_close(&format!("{tag} grad {p}"), got, &g[&format!("{tag}.grad.{p}")], 1e-5);
        }
        assert_close(&format!("{tag} running_mean"), bn.running_mean(), &g[&format!("{tag}.running_mean")], 1e-6);
        assert_close(&format!("{tag} running_var"), bn.running_var(), &g[&format!("{tag}.running_var")], 1e-6);
        let y = bn.forward_eval(x.as_tensor())?;
        assert_close(&format!("{tag} eval after"), &y, &g[&format!("{tag}.y_eval_after")], 1e-5);
    }
    Ok(())
}

#[test]
fn projector_matches_torch_in_eval_and_train() -> R<()> {
    let g = golden("projector.safetensors");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let p = Projector::new(vb, 2048, 1024, 128)?;
    det_init(&vm);
    let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names.len(), 10, "{names:?}"); // 0.weight, 1.{5}, 3.weight, 4.{3}
    let z = p.forward_t(&g["h"], false)?;
    assert_close("projector eval", &z, &g["z_eval"], 1e-5);
    let h = Var::from_tensor(&g["h"])?;
    let z = p.forward_t(h.as_tensor(), true)?;
    assert_close("projector train", &z, &g["z_train"], 1e-4);
    let norms = z.sqr()?.sum(1)?;
    assert_close("unit norm", &norms, &Tensor::ones(6, DType::F32, &Device::Cpu)?, 1e-5);
    let grads = (z * &g["upstream"])?.sum_all()?.backward()?;
    assert_close("projector grad h", grads.get(h.as_tensor()).unwrap(), &g["grad.h"], 1e-3);
    for n in ["0.weight", "3.weight"] {
        let got = grads.get(var(&vm, n).as_tensor()).unwrap().narrow(0, 0, 8)?;
        assert_close(&format!("projector grad {n}"), &got, &g[&format!("grad8.{n}")], 1e-3);
    }
    let got = grads.get(var(&vm, "1.weight").as_tensor()).unwrap();
    assert_close("projector grad 1.weight", got, &g["grad.1.weight"], 1e-3);
    for n in ["1.running_mean", "1.running_var", "4.running_mean", "4.running_var"] {
        assert_close(n, var(&vm, n).as_tensor(), &g[&format!("state.{n}")], 1e-5);
    }
    Ok(())
}

#[test]
fn head_matches_torch_and_dropout_scales() -> R<()> {
    let g = golden("head.safetensors");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let head = Head::new(vb.pp("fc"), 2048, 3, 0.3)?;
    det_init_strip(&vm, "fc.");
    let h = Var::from_tensor(&g["h"])?;
    let y = head.forward_t(h.as_tensor(), false)?;
    assert_close("head eval", &y, &g["y_eval"], 1e-5);
    let grads = (y * &g["upstream"])?.sum_all()?.backward()?;
    assert_close("head grad h", grads.get(h.as_tensor()).unwrap(), &g["grad.h"], 1e-5);
    assert_close("head grad w", grads.get(var(&vm, "fc.weight").as_tensor()).unwrap(), &g["grad.weight"], 1e-5);
    assert_close("head grad b", grads.get(var(&vm, "fc.bias").as_tensor()).unwrap(), &g["grad.bias"], 1e-5);

    // Train mode: each input is dropped with probability p, the rest scaled by 1/(1-p). An
    // identity-like probe: feature k only reaches output 0 through weight 1.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let head = Head::new(vb, 1, 1, 0.3)?;
    var(&vm, "weight").set(&Tensor::ones((1, 1), DType::F32, &Device::Cpu)?)?;
    var(&vm, "bias").set(&Tensor::zeros(1, DType::F32, &Device::Cpu)?)?;
    let ones = Tensor::ones((20000, 1), DType::F32, &Device::Cpu)?;
    let y: Vec<f32> = head.forward_t(&ones, true)?.flatten_all()?.to_vec1()?;
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / y.len() as f64;
    assert!((kept - 0.7).abs() < 0.02, "kept fraction {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    assert!(Head::new(VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu), 4, 2, 1.0).is_err());
    Ok(())
}

/// det_init as if the variables were named without `prefix` (the golden head's Linear was
/// initialised standalone in PyTorch, i.e. with no prefix).
fn det_init_strip(varmap: &VarMap, prefix: &str) {
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let n = name.strip_prefix(prefix).unwrap_or(name);
        let v = det_values(n, var.dims());
        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}

// ---- losses ----

#[test]
fn losses_match_torch_in_f64_and_f32() -> R<()> {
    let g = golden("loss.safetensors");
    for (tag, dtype, tol) in
        [("mpcs", DType::F64, 1e-10), ("sym", DType::F64, 1e-10), ("mpcs", DType::F32, 1e-5), ("sym", DType::F32, 1e-5)]
    {
        let f = Var::from_tensor(&g["f"].to_dtype(dtype)?)?;
        let loss = if tag == "mpcs" { mpcs_loss(f.as_tensor(), 0.1)? } else { nt_xent_symmetric(f.as_tensor(), 0.1)? };
        let want = g[&format!("{tag}.loss")].to_vec1::<f64>()?[0];
        let got = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        println!("{tag} {dtype:?}: loss {got} vs {want}, abs err {:.3e}", (got - want).abs());
        assert!((got - want).abs() <= tol, "{tag} {dtype:?}: loss {got} vs {want}");
        let grads = loss.backward()?;
        let gf = grads.get(f.as_tensor()).unwrap().to_dtype(DType::F64)?;
        let gw = &g[&format!("{tag}.grad")];
        let diff = (&gf - gw)?.abs()?.max_all()?.to_scalar::<f64>()?;
        println!("{tag} {dtype:?}: grad max abs err {diff:.3e}");
        assert!(diff <= tol, "{tag} {dtype:?}: grad error {diff:.3e}");
    }
    let bad = Tensor::zeros((4, 3, 8), DType::F32, &Device::Cpu)?;
    assert!(mpcs_loss(&bad, 0.1).is_err());
    assert!(nt_xent_symmetric(&Tensor::zeros((4, 2, 8), DType::F32, &Device::Cpu)?, 0.0).is_err());
    Ok(())
}

// ---- weights ----

fn bits(t: &Tensor) -> Vec<u8> {
    match t.dtype() {
        DType::F32 => t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

#[test]
fn pth_roundtrip_through_model_to_safetensors() -> R<()> {
    let pth = golden_path("resnet18_part.pth");
    let file = read_tensors(&pth)?;
    assert_eq!(file["bn1.num_batches_tracked"].to_scalar::<i64>()?, 3);
    assert_eq!(file["fc.weight"].dims(), [10, 512]);

    let (vm, m) = model(Arch::ResNet18, Some(10), Dilation::None);
    // Strict loading refuses a partial state dict and names what is missing.
    let e = load_into(&vm, &pth, false).unwrap_err().to_string();
    assert!(e.contains("lacks") && e.contains("layer2."), "{e}");
    let opts = LoadOptions { strict: false, ..LoadOptions::default() };
    let report = load_into_with(&vm, &pth, &opts)?;
    assert_eq!(report.loaded.len(), file.len());
    assert!(report.unexpected.is_empty());
    assert!(report
        .missing
        .iter()
        .all(|n| n.starts_with("layer2") || n.starts_with("layer3") || n.starts_with("layer4")));

    let g = golden("resnet18_part.safetensors");
    let y = m.forward_t(&g["x"], false)?;
    assert_close("logits after .pth load", &y, &g["logits_eval"], 1e-4);

    let dir = tempfile::tempdir()?;
    let out = match std::env::var_os("MPCS_NN_EXPORT_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            PathBuf::from(d).join("resnet18_from_pth.safetensors")
        }
        None => dir.path().join("resnet18_from_pth.safetensors"),
    };
    save(&vm, &out)?;
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary file left behind: {leftovers:?}");
    let saved = read_tensors(&out)?;
    assert_eq!(saved.len(), 122, "a full torchvision state dict");
    for (name, t) in &file {
        assert_eq!(saved[name].dtype(), t.dtype(), "{name}");
        assert_eq!(saved[name].dims(), t.dims(), "{name}");
        assert!(bits(&saved[name]) == bits(t), "{name} differs after .pth → model → safetensors");
    }
    // And the saved file loads back strictly into a fresh model with the same logits.
    let (vm2, m2) = model(Arch::ResNet18, Some(10), Dilation::None);
    load_into(&vm2, &out, false)?;
    assert_close("logits after reload", &m2.forward_t(&g["x"], false)?, &g["logits_eval"], 1e-4);
    Ok(())
}

#[test]
fn load_errors_name_the_tensor_and_the_architecture() -> R<()> {
    let dir = tempfile::tempdir()?;
    // resnet50 weights into a resnet18.
    let r50 = dir.path().join("r50.safetensors");
    {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        ResNet::new(Arch::ResNet50, vb, Some(1000), Dilation::None)?;
        save(&vm, &r50)?;
    }
    let (vm18, _) = model(Arch::ResNet18, Some(1000), Dilation::None);
    let before = bits(var(&vm18, "conv1.weight").as_tensor());
    let e = load_into(&vm18, &r50, false).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(matches!(e, NnError::ShapeMismatch { .. }));
    // Names are checked in sorted order, so the classifier is the first to differ.
    assert!(
        msg.contains("r50.safetensors: tensor 'fc.weight'")
            && msg.contains("[1000, 2048]")
            && msg.contains("[1000, 512]"),
        "{msg}"
    );
    assert!(msg.contains("resnet50 weights; use --arch resnet50"), "{msg}");
    assert!(bits(var(&vm18, "conv1.weight").as_tensor()) == before, "a failed load must change nothing");

    // resnet50 weights (1000 classes) into a resnet50 with a 2-class head.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    ResNet::new(Arch::ResNet50, vb, Some(2), Dilation::None)?;
    let msg = load_into(&vm, &r50, false).unwrap_err().to_string();
    assert!(msg.contains("fc.bias") && msg.contains("[1000]") && msg.contains("ignore_fc"), "{msg}");
    let report = load_into(&vm, &r50, true)?;
    assert_eq!(report.ignored, vec!["fc.bias".to_string(), "fc.weight".to_string()]);

    // Into a feature extractor (no fc): strict unless the checkpoint's fc is ignored.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    ResNet::new(Arch::ResNet50, vb.pp("encoder"), None, Dilation::OutputStride8)?;
    let opts = LoadOptions { prefix: "encoder.".into(), ..LoadOptions::default() };
    let msg = load_into_with(&vm, &r50, &opts).unwrap_err().to_string();
    assert!(msg.contains("fc.weight") && msg.contains("ignore_fc"), "{msg}");
    let opts = LoadOptions { ignore_fc: true, ..opts };
    assert_eq!(load_into_with(&vm, &r50, &opts)?.loaded.len(), 318);

    // Not a weights file at all.
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"hello")?;
    let msg = load_into(&vm18, &junk, false).unwrap_err().to_string();
    assert!(msg.contains("junk.pth"), "{msg}");
    Ok(())
}
