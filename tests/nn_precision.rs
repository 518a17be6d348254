//! Mixed precision (`mpcs::nn::precision`): under bf16 autocast the convolutions and linear layers
//! compute on bf16-rounded operands, everything they hand on is f32, and a training step follows
//! the f32 one within bf16's precision.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mpcs::nn::conv::conv2d;
use mpcs::nn::{autocast, trainable_vars, Arch, Dilation, Precision, ResNet};

#[path = "common/detinit.rs"]
mod detinit;
use detinit::{det_init, det_values};

/// Deterministic values of `shape` (uniform, scaled by the fan-in as `det_init` does), named by `name`.
fn tensor(name: &str, shape: &[usize]) -> Tensor {
    Tensor::from_vec(det_values(name, shape), shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
}

/// Rounds to the nearest bf16 and back: what the layer sees of an f32 operand under autocast.
fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn autocast_convolution_computes_on_bf16_operands_and_returns_f32() {
    let x = tensor("x", &[2, 8, 9, 9]);
    let w = tensor("w", &[6, 8, 3, 3]);
    let f32_out = conv2d(&x, &w, 1, 1, 1).unwrap();
    let bf16_out = autocast(Precision::Bf16, || conv2d(&x, &w, 1, 1, 1).unwrap());
    assert_eq!(bf16_out.dtype(), DType::F32, "autocast hands f32 on to BatchNorm");
    assert_eq!(bf16_out.dims(), f32_out.dims());
    // The reference: the f32 convolution of the bf16-rounded operands, its result rounded to bf16
    // once more — what a GPU's bf16 convolution computes (bf16 operands, f32 accumulation, bf16
    // output). On the CPU mpcs emulates exactly that; on a GPU the accumulation order differs.
    let reference = bf16_rounded(&conv2d(&bf16_rounded(&x), &bf16_rounded(&w), 1, 1, 1).unwrap());
    let scale = max_abs(&f32_out);
    let vs_reference = max_abs_diff(&bf16_out, &reference) / scale;
    let vs_f32 = max_abs_diff(&bf16_out, &f32_out) / scale;
    println!("bf16 conv: max rel diff {vs_reference:.2e} vs rounded-operand reference, {vs_f32:.2e} vs f32");
    // Within a couple of bf16 ulps (2^-8 relative) of the reference, and visibly not the f32 result
    // (f32 vs f32 would agree to ~1e-7): the bf16 path really ran.
    assert!(vs_reference <= 1.6e-2, "bf16 conv strays {vs_reference:.2e} from the rounded-operand reference");
    assert!(vs_f32 > 1e-4, "the autocast convolution matches f32 to {vs_f32:.2e}: it did not run in bf16");
    // Outside the scope everything is f32 again, bit for bit.
    assert_eq!(max_abs_diff(&conv2d(&x, &w, 1, 1, 1).unwrap(), &f32_out), 0.0);
}

/// One training step of ResNet-18 with a 10-class head at 64×64, batch 8, cross-entropy (a
/// fine-tuning step): loss and gradients from the same weights and batch.
fn train_step(precision: Precision) -> (f32, Vec<(String, Tensor)>) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ResNet::new(Arch::ResNet18, vb, Some(10), Dilation::None).unwrap();
    det_init(&varmap);
    let x = tensor("images", &[8, 3, 64, 64]);
    let labels = Tensor::from_vec((0..8u32).collect::<Vec<_>>(), 8, &Device::Cpu).unwrap();
    let logits = autocast(precision, || model.forward_t(&x, true).unwrap());
    assert_eq!(logits.dtype(), DType::F32);
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    assert_eq!(loss.dtype(), DType::F32, "the loss stays f32");
    let grads = loss.backward().unwrap();
    // Every trainable variable (BatchNorm buffers excluded), by name.
    let trainable: Vec<Var> = trainable_vars(&varmap, "");
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<(String, Tensor)> = data
        .iter()
        .filter(|(_, v)| trainable.iter().any(|t| t.as_tensor().id() == v.as_tensor().id()))
        .map(|(name, v)| {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).clone();
            (name.clone(), g)
        })
        .collect();
    assert_eq!(out.len(), trainable.len());
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.to_scalar::<f32>().unwrap(), out)
}

#[test]
fn bf16_training_step_follows_the_f32_one() {
    let (loss32, g32) = train_step(Precision::F32);
    let (loss16, g16) = train_step(Precision::Bf16);
    let rel = ((loss16 - loss32) / loss32).abs();
    println!("loss f32 {loss32:.6}, bf16 {loss16:.6} (rel {rel:.2e})");
    assert!(rel < 2e-2, "bf16 loss {loss16} is {rel:.2e} from f32 {loss32}");
    assert!(loss16 != loss32, "identical losses: the bf16 step did not run in bf16");
    assert_eq!(g32.len(), g16.len());
    // Every gradient reaches its f32 variable in f32, and points the same way as f32's: cosine over
    // all parameters together, and per weight tensor.
    let (mut dot, mut n32, mut n16) = (0.0f64, 0.0f64, 0.0f64);
    let mut worst = (1.0f64, String::new());
    let mut fc_cos = 0.0f64;
    for ((name, a), (_, b)) in g32.iter().zip(&g16) {
        assert_eq!(b.dtype(), DType::F32, "{name}: gradient not f32");
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let d: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let (na, nb): (f64, f64) =
            (a.iter().map(|x| (*x as f64).powi(2)).sum(), b.iter().map(|x| (*x as f64).powi(2)).sum());
        dot += d;
        n32 += na;
        n16 += nb;
        if name.ends_with("weight") && a.len() > 64 && na > 0.0 {
            let cos = d / (na.sqrt() * nb.sqrt());
            if name == "fc.weight" {
                fc_cos = cos;
            }
            if cos < worst.0 {
                worst = (cos, name.clone());
            }
        }
    }
    let cos = dot / (n32.sqrt() * n16.sqrt());
    println!("gradient cosine bf16 vs f32: all {cos:.5}, worst weight {:.5} ({})", worst.0, worst.1);
    // bf16 keeps 8 significant bits, and every layer the gradient passes back through rounds it
    // again (the convolutions' outputs and input gradients): the agreement falls smoothly with
    // depth, measured 0.9997 at fc, 0.97-0.98 in layer4, 0.93 at conv1, 0.945 over all. PyTorch's
    // own autocast on the same kind of step lands as far from its f32 one (loss 8.3e-4, cosine
    // 0.939: scripts/nn/bf16_autocast_reference.py). A wrong cast, a missing gradient path or
    // f16-like overflow would fall far below these bounds. (ResNet-50 is not used here: at random
    // initialisation on 8 images its bf16 gradient direction is not reproducible, cosine 0.18 in
    // PyTorch.)
    assert!(cos > 0.9, "gradients under bf16 diverge from f32: cosine {cos:.5}");
    assert!(worst.0 > 0.88, "{}: gradient cosine {:.5}", worst.1, worst.0);
    assert!(fc_cos > 0.995, "fc.weight, one rounding from the loss: gradient cosine {fc_cos:.5}");
}

#[test]
fn precision_names_parse_and_unknown_ones_are_refused() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("F32".parse::<Precision>().unwrap(), Precision::F32);
    let err = "fp16".parse::<Precision>().unwrap_err();
    assert!(err.contains("fp16") && err.contains("bf16"), "{err}");
    assert_eq!(Precision::default(), Precision::F32, "the paper's precision is the default");
}
