//! EfficientNet-b2 against `efficientnet_pytorch` 0.7.1 (the paper's Eff-net b2 encoder): golden files made
//! once by scripts/nn/make_golden_efficientnet.py on the real crops of tests/fixtures/infer, with det_init
//! weights; and its CPU kernels (depthwise convolution with asymmetric padding, swish) against candle's
//! composed ops, values and both gradients.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mpcs::nn::conv::{depthwise_conv2d, depthwise_conv2d_candle, Padding};
use mpcs::nn::efficientnet::{static_same_padding, Variant, B2};
use mpcs::nn::swish::swish;
use mpcs::nn::weights::{detect_arch, read_tensors};
use mpcs::nn::{load_into, load_into_with, save, Arch, Dilation, EfficientNet, Encoder, LoadOptions};

type R<T> = anyhow::Result<T>;

#[path = "common/detinit.rs"]
mod detinit;
use detinit::det_init;

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nn").join(name)
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden_path("efficientnet_b2.safetensors"), &Device::Cpu).expect("golden file")
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
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-30)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let e = rel_err(a, b);
    println!("{what}: max rel err {e:.3e}");
    assert!(e <= tol, "{what}: max relative error {e:.3e} > {tol:.1e}");
}

/// The golden model: 5 classes, no head dropout and no drop-connect (a deterministic train step).
fn model() -> (VarMap, EfficientNet) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let v = Variant { dropout: 0.0, drop_connect: 0.0, ..B2 };
    let m = EfficientNet::new(v, vb, Some(5)).unwrap();
    det_init(&varmap);
    (varmap, m)
}

fn var(varmap: &VarMap, name: &str) -> Var {
    varmap.data().lock().unwrap()[name].clone()
}

#[test]
fn eval_logits_match_efficientnet_pytorch_at_sizes_other_than_260() -> R<()> {
    let g = golden();
    let (_vm, m) = model();
    // 128×128 and 96×112: the static padding was computed for 260 and is not the "same" padding of
    // these sizes (a 5×5 stride-2 layer pads 2/2 where 28 px would need 1/2).
    assert_close("eval logits 128", &m.forward_t(&g["x128"], false)?, &g["logits_eval128"], 1e-4);
    assert_close("eval features 128", &m.features_t(&g["x128"], false)?, &g["features_eval128"], 1e-4);
    assert_close("eval logits 96x112", &m.forward_t(&g["x_rect"], false)?, &g["logits_eval_rect"], 1e-4);
    // The same through inference (no graph recorded: the BatchNorms folded into the 1×1 convolutions).
    let y = mpcs::nn::no_grad(|| m.forward_t(&g["x128"], false).map_err(anyhow::Error::from))?;
    assert_close("no-grad eval logits 128", &y, &g["logits_eval128"], 1e-4);
    Ok(())
}

#[test]
fn one_train_step_matches_efficientnet_pytorch() -> R<()> {
    let g = golden();
    let (vm, m) = model();
    let x = Var::from_tensor(&g["x128"])?;
    let y = m.forward_t(x.as_tensor(), true)?;
    assert_close("train logits", &y, &g["logits_train128"], 1e-4);
    let grads = (y * &g["upstream"])?.sum_all()?.backward()?;
    assert_close("grad x", grads.get(x.as_tensor()).unwrap(), &g["grad.x"], 1e-4);
    let mut checked = 0;
    for (k, want) in g.iter().filter(|(k, _)| k.starts_with("grad.") && *k != "grad.x") {
        let name = &k["grad.".len()..];
        let got = grads.get(var(&vm, name).as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let got = if got.dim(0)? != want.dim(0)? { got.narrow(0, 0, want.dim(0)?)? } else { got.clone() };
        assert_close(k, &got, want, 1e-4);
        checked += 1;
    }
    assert_eq!(checked, 15);
    for (k, want) in g.iter().filter(|(k, _)| k.starts_with("state.")) {
        assert_close(k, var(&vm, &k["state.".len()..]).as_tensor(), want, 1e-5);
    }
    assert_eq!(var(&vm, "_bn1.num_batches_tracked").as_tensor().to_scalar::<i64>()?, 1);
    Ok(())
}

#[test]
fn saved_weights_have_exactly_the_reference_state_dict() -> R<()> {
    // efficientnet_pytorch's `load_state_dict(strict=True)` accepts a file with exactly these names and
    // shapes (the list was written by the reference itself).
    let text = std::fs::read_to_string(golden_path("efficientnet_b2_state_dict.json"))?;
    let want: BTreeMap<String, Vec<usize>> = serde_json::from_str(&text)?;
    let (vm, _m) = model();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("b2.safetensors");
    save(&vm, &path)?;
    let saved = read_tensors(&path)?;
    let got: BTreeMap<String, Vec<usize>> = saved.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let only_here: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let only_there: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(only_here.is_empty() && only_there.is_empty(), "extra {only_here:?}, missing {only_there:?}");
    assert_eq!(got, want);
    assert_eq!(saved["_bn0.num_batches_tracked"].dtype(), DType::I64);
    assert_eq!(detect_arch(saved.keys().map(String::as_str)), Some(Arch::EfficientNetB2));
    // And it loads back strictly into a fresh model, bit for bit.
    let (vm2, _m2) = model();
    for v in vm2.all_vars() {
        v.set(&v.zeros_like()?)?;
    }
    load_into(&vm2, &path, false)?;
    let w = var(&vm2, "_blocks.7._depthwise_conv.weight");
    assert_eq!(rel_err(w.as_tensor(), &saved["_blocks.7._depthwise_conv.weight"]), 0.0);
    Ok(())
}

#[test]
fn pth_and_safetensors_parts_load_by_name() -> R<()> {
    for file in ["efficientnet_b2_part.pth", "efficientnet_b2_part_legacy.pth", "efficientnet_b2_part.safetensors"] {
        let path = golden_path(file);
        let tensors = read_tensors(&path)?;
        assert_eq!(tensors.len(), 22, "{file}");
        assert_eq!(detect_arch(tensors.keys().map(String::as_str)), Some(Arch::EfficientNetB2));
        let (vm, _m) = model();
        let opts = LoadOptions { strict: false, ..LoadOptions::default() };
        let report = load_into_with(&vm, &path, &opts)?;
        assert_eq!(report.loaded.len(), 22, "{file}");
        for name in ["_conv_stem.weight", "_blocks.0._se_reduce.bias", "_blocks.0._bn1.running_var"] {
            assert_eq!(rel_err(var(&vm, name).as_tensor(), &tensors[name]), 0.0, "{file}: {name}");
        }
        // A strict load into a ResNet is refused with a hint naming the encoder these weights are for.
        let rn = VarMap::new();
        let _ =
            Encoder::new(Arch::ResNet18, VarBuilder::from_varmap(&rn, DType::F32, &Device::Cpu), None, Dilation::None)?;
        let err = load_into(&rn, &path, true).unwrap_err().to_string();
        assert!(err.contains("efficientnet_b2"), "{err}");
    }
    Ok(())
}

#[test]
fn efficientnet_has_no_dilated_form_and_rejects_bad_input() {
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu);
    let err = Encoder::new(Arch::EfficientNetB2, vb, None, Dilation::OutputStride8).unwrap_err().to_string();
    assert!(err.contains("efficientnet_b2"), "{err}");
    let (_vm, m) = model();
    let err = m.forward_t(&Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap(), false).unwrap_err();
    assert!(err.to_string().contains("(N, 3, H, W)"), "{err}");
    assert_eq!("EfficientNet-B2".parse::<Arch>().unwrap(), Arch::EfficientNetB2);
    assert_eq!(Arch::EfficientNetB2.feature_dim(), 1408);
}

// ---- the kernels against candle's ops ----

/// Largest |a - b| relative to the largest |b| (at least 1).
fn rel_err_unit(a: &Tensor, b: &Tensor) -> R<f32> {
    assert_eq!(a.dims(), b.dims());
    for t in [a, b] {
        assert!(t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite(), "non-finite values");
    }
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0))
}

#[test]
fn depthwise_convolution_matches_candle_values_and_both_gradients() -> R<()> {
    let dev = Device::Cpu;
    let pad = |t, b, l, r| Padding { top: t, bottom: b, left: l, right: r };
    // (n, c, h, w, k, stride, padding): EfficientNet's static pads (0/1, 1/1, 2/2, 1/2), odd and
    // rectangular maps, 1×1 maps, kernels wider than a tiny map (b2's 5×5 layers at a 32 px input, where some
    // taps read only padding), a batch larger than one parallel task.
    let cases = [
        (2, 3, 13, 11, 3, 1, pad(1, 1, 1, 1)),
        (2, 4, 16, 16, 3, 2, pad(0, 1, 0, 1)),
        (3, 5, 17, 14, 5, 2, pad(2, 2, 2, 2)),
        (2, 3, 28, 28, 5, 2, pad(1, 2, 1, 2)),
        (2, 6, 9, 7, 5, 1, pad(2, 2, 2, 2)),
        (4, 8, 1, 1, 3, 1, pad(1, 1, 1, 1)),
        (2, 4, 1, 1, 5, 1, pad(2, 2, 2, 2)),
        (2, 4, 2, 2, 5, 2, pad(1, 2, 1, 2)),
        (2, 3, 1, 1, 5, 2, pad(2, 2, 2, 2)),
        (2, 3, 7, 9, 3, 3, pad(0, 2, 1, 0)),
        (16, 40, 24, 24, 3, 1, pad(1, 1, 1, 1)),
    ];
    for (i, &(n, c, h, w, k, s, p)) in cases.iter().enumerate() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)?)?;
        let wt = Var::from_tensor(&Tensor::randn(0f32, 0.5, (c, 1, k, k), &dev)?)?;
        let fast = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), s, p)?;
        let reference = depthwise_conv2d_candle(x.as_tensor(), wt.as_tensor(), s, p)?;
        assert!(rel_err_unit(&fast, &reference)? < 1e-5, "case {i}: values");
        let up = Tensor::randn(0f32, 1.0, fast.dims(), &dev)?;
        let gf = (&fast * &up)?.sum_all()?.backward()?;
        let gr = (&reference * &up)?.sum_all()?.backward()?;
        for (what, v) in [("input", &x), ("weight", &wt)] {
            let e = rel_err_unit(gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap())?;
            assert!(e < 1e-5, "case {i}: {what} gradient, rel err {e:.2e}");
        }
        // The convolution is linear in each argument, so its gradients are adjoints:
        // <dx, v> = <up, conv(v, w)> and <dw, u> = <up, conv(x, u)> for any v, u (an identity that
        // holds whatever candle computes).
        let dot =
            |a: &Tensor, b: &Tensor| -> R<f64> { Ok((a * b)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        let v = Tensor::randn(0f32, 1.0, x.dims(), &dev)?;
        let u = Tensor::randn(0f32, 1.0, wt.dims(), &dev)?;
        let pairs = [
            (dot(gf.get(x.as_tensor()).unwrap(), &v)?, dot(&up, &depthwise_conv2d(&v, wt.as_tensor(), s, p)?)?),
            (dot(gf.get(wt.as_tensor()).unwrap(), &u)?, dot(&up, &depthwise_conv2d(x.as_tensor(), &u, s, p)?)?),
        ];
        for (a, b) in pairs {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "case {i}: adjoint {a} vs {b}");
        }
    }
    // Shapes that do not fit are errors, not panics.
    let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev)?;
    assert!(depthwise_conv2d(&x, &Tensor::zeros((3, 1, 3, 3), DType::F32, &dev)?, 1, Padding::uniform(1)).is_err());
    assert!(depthwise_conv2d(&x, &Tensor::zeros((4, 1, 9, 9), DType::F32, &dev)?, 1, Padding::default()).is_err());
    Ok(())
}

#[test]
fn swish_matches_candle_silu_and_its_gradient() -> R<()> {
    let x = Var::from_tensor(&(Tensor::randn(0f32, 4.0, (3, 5, 7, 9), &Device::Cpu)?))?;
    let fast = swish(x.as_tensor())?;
    let reference = x.as_tensor().silu()?;
    assert!(rel_err_unit(&fast, &reference)? < 1e-6);
    let up = Tensor::randn(0f32, 1.0, fast.dims(), &Device::Cpu)?;
    let gf = (&fast * &up)?.sum_all()?.backward()?;
    let gr = (&reference * &up)?.sum_all()?.backward()?;
    assert!(rel_err_unit(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap())? < 1e-5);
    Ok(())
}

#[test]
fn static_padding_follows_the_construction_size_not_the_input() {
    // What `Conv2dStaticSamePadding` computes for b2's 5×5 stride-2 layer at 65 px (260 / 4) — and what
    // dynamic "same" padding would give the 32 px map a 128 px input has there.
    assert_eq!(static_same_padding(65, 5, 2), Padding::uniform(2));
    assert_eq!(static_same_padding(32, 5, 2), Padding { top: 1, bottom: 2, left: 1, right: 2 });
}
