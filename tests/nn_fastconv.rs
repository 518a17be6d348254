//! Parity of the CPU fast paths in `mpcs::nn` (im2col + GEMM convolution, max pooling with
//! argmax backward) against candle's own composed ops: values and gradients (input and weight)
//! on random inputs with odd sizes, strides, padding, dilation 2 and 4, 1×1 and 7×7 kernels.

use candle_core::{Device, Tensor, Var};
use mpcs::nn::conv::{conv2d, conv2d_candle};

type R<T> = anyhow::Result<T>;

/// Largest |a - b| relative to the largest |b| (1 when b is all zeros).
fn rel_err(a: &Tensor, b: &Tensor) -> R<f32> {
    assert_eq!(a.dims(), b.dims());
    // max_all skips NaN: a NaN on either side would otherwise read as agreement.
    for t in [a, b] {
        assert!(t.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite(), "non-finite values");
    }
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(diff / scale)
}

#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
}

#[allow(clippy::too_many_arguments)]
const fn case(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
) -> Case {
    Case { n, c, h, w, o, k, stride, pad, dil }
}

const CASES: &[Case] = &[
    case(2, 3, 13, 11, 5, 3, 1, 1, 1),  // 3×3, odd sizes
    case(3, 4, 17, 15, 6, 3, 2, 1, 1),  // stride 2
    case(2, 5, 19, 19, 4, 3, 1, 2, 2),  // dilation 2 (torchvision's dilated ResNet)
    case(2, 3, 23, 21, 4, 3, 1, 4, 4),  // dilation 4
    case(2, 3, 29, 27, 8, 7, 2, 3, 1),  // the 7×7 stride-2 stem
    case(3, 8, 9, 7, 5, 1, 1, 0, 1),    // pointwise: no im2col
    case(3, 8, 9, 7, 5, 1, 2, 0, 1),    // 1×1 stride 2 (downsample)
    case(2, 3, 6, 5, 4, 3, 1, 0, 1),    // no padding
    case(33, 6, 3, 3, 5, 3, 1, 1, 1),   // tiny maps: several images per GEMM, with a remainder
    case(30, 6, 3, 3, 5, 1, 1, 0, 1),   // pointwise, chunked, remainder of one image
    case(30, 6, 4, 4, 5, 3, 2, 1, 1),   // stride 2 to a 2×2 map, chunked
    case(2, 4, 5, 5, 3, 3, 3, 2, 2),    // stride 3 with dilation 2
    case(7, 3, 17, 16, 5, 3, 1, 1, 1),  // one image per GEMM, 7 images: uneven parts of the batch
    case(9, 16, 16, 16, 6, 1, 1, 0, 1), // pointwise, one image per GEMM, several parts
    case(5, 4, 1, 1, 3, 3, 1, 1, 1),    // same-size 3×3 on a 1×1 map: only the centre tap is inside
    case(3, 2, 2, 5, 3, 3, 1, 1, 1),    // same-size on a wide 2×5 map
    case(2, 3, 2, 3, 4, 3, 1, 2, 2),    // dilation 2 on a map smaller than the dilated kernel
    // The batch-in-lanes path (maps of 8×8 or less, 16+ channels, 8+ images), and for stride 1
    // with 16+ output channels its input gradient too:
    case(16, 16, 8, 8, 19, 3, 1, 1, 1), // 16 full lanes; 19 channels: panels of 6, 6, 6 and 1
    case(21, 20, 4, 4, 17, 3, 1, 1, 1), // a group of 16 and one of 5 (the 8-lane kernel)
    case(9, 16, 7, 5, 6, 3, 2, 1, 1),   // stride 2 on an odd map, 9 lanes
    case(12, 17, 6, 6, 16, 3, 1, 2, 2), // dilation 2
    case(8, 16, 2, 2, 16, 3, 1, 1, 1),  // 2×2 map: 4 of 9 taps inside per position
    case(8, 16, 2, 2, 5, 3, 1, 3, 1),   // padding past the kernel's reach: positions with no tap inside
    case(10, 24, 5, 5, 18, 5, 1, 2, 1), // 5×5 kernel
];

#[test]
fn conv2d_forward_matches_candle() -> R<()> {
    let dev = Device::Cpu;
    for c in CASES {
        let x = Tensor::randn(0f32, 1f32, (c.n, c.c, c.h, c.w), &dev)?;
        let w = Tensor::randn(0f32, 1f32, (c.o, c.c, c.k, c.k), &dev)?;
        let fast = conv2d(&x, &w, c.stride, c.pad, c.dil)?;
        let reference = conv2d_candle(&x, &w, c.stride, c.pad, c.dil)?;
        let e = rel_err(&fast, &reference)?;
        assert!(e < 1e-5, "{c:?}: forward relative error {e}");
    }
    Ok(())
}

/// Gradients of sum(conv(x, w) * r) for a random r, through both implementations.
#[test]
fn conv2d_gradients_match_candle() -> R<()> {
    let dev = Device::Cpu;
    for c in CASES {
        let x0 = Tensor::randn(0f32, 1f32, (c.n, c.c, c.h, c.w), &dev)?;
        let w0 = Tensor::randn(0f32, 1f32, (c.o, c.c, c.k, c.k), &dev)?;
        let run = |fast: bool| -> R<(Tensor, Tensor, Tensor)> {
            let x = Var::from_tensor(&x0)?;
            let w = Var::from_tensor(&w0)?;
            let y = if fast {
                conv2d(x.as_tensor(), w.as_tensor(), c.stride, c.pad, c.dil)?
            } else {
                conv2d_candle(x.as_tensor(), w.as_tensor(), c.stride, c.pad, c.dil)?
            };
            Ok((x.as_tensor().clone(), w.as_tensor().clone(), y))
        };
        let (xf, wf, yf) = run(true)?;
        let (xr, wr, yr) = run(false)?;
        let r = Tensor::randn(0f32, 1f32, yf.dims(), &dev)?;
        let gf = (yf * &r)?.sum_all()?.backward()?;
        let gr = (yr * &r)?.sum_all()?.backward()?;
        let e = rel_err(gf.get(&xf).expect("fast dx"), gr.get(&xr).expect("candle dx"))?;
        assert!(e < 1e-5, "{c:?}: input-gradient relative error {e}");
        let e = rel_err(gf.get(&wf).expect("fast dw"), gr.get(&wr).expect("candle dw"))?;
        assert!(e < 1e-5, "{c:?}: weight-gradient relative error {e}");
    }
    Ok(())
}

#[test]
fn conv2d_input_without_gradient_still_gives_weight_gradient() -> R<()> {
    // The stem's input (the image batch) tracks no gradient: the fast path skips its input
    // gradient but must still give the weight's.
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1f32, (2, 3, 21, 19), &dev)?;
    let w = Var::randn(0f32, 1f32, (6, 3, 7, 7), &dev)?;
    let yf = conv2d(&x, w.as_tensor(), 2, 3, 1)?;
    let yr = conv2d_candle(&x, w.as_tensor(), 2, 3, 1)?;
    let r = Tensor::randn(0f32, 1f32, yf.dims(), &dev)?;
    let gf = (yf * &r)?.sum_all()?.backward()?;
    let gr = (yr * &r)?.sum_all()?.backward()?;
    assert!(gf.get(&x).is_none());
    let e = rel_err(gf.get(w.as_tensor()).expect("fast dw"), gr.get(w.as_tensor()).expect("candle dw"))?;
    assert!(e < 1e-5, "weight-gradient relative error {e}");
    Ok(())
}

#[test]
fn conv2d_accepts_non_contiguous_input_and_rejects_bad_shapes() -> R<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1f32, (2, 3, 9, 11), &dev)?.transpose(2, 3)?; // (2, 3, 11, 9), strided
    let w = Tensor::randn(0f32, 1f32, (4, 3, 3, 3), &dev)?;
    let e = rel_err(&conv2d(&x, &w, 1, 1, 1)?, &conv2d_candle(&x.contiguous()?, &w, 1, 1, 1)?)?;
    assert!(e < 1e-5, "strided input: relative error {e}");
    // Channel mismatch and a kernel larger than the padded input are errors, not panics.
    let w_bad = Tensor::randn(0f32, 1f32, (4, 5, 3, 3), &dev)?;
    assert!(conv2d(&x, &w_bad, 1, 1, 1).is_err());
    let w_big = Tensor::randn(0f32, 1f32, (4, 3, 15, 15), &dev)?;
    assert!(conv2d(&x, &w_big, 1, 0, 1).is_err());
    Ok(())
}

// ---- max pool, ReLU, BatchNorm: fused CPU ops against candle's composed ops ----

use candle_core::DType;
use candle_nn::{VarBuilder, VarMap};
use mpcs::nn::pool::{max_pool2d_composed, max_pool2d_padded};
use mpcs::nn::relu::{add_relu, relu};
use mpcs::nn::BatchNorm;

#[test]
fn max_pool_values_and_gradients_match_composed() -> R<()> {
    let dev = Device::Cpu;
    // (shape, kernel, stride, padding): the stem's 3/2/1 on odd and even sizes, and others.
    let cases = [((2, 3, 9, 11), 3, 2, 1), ((2, 2, 8, 8), 3, 2, 1), ((1, 4, 7, 6), 2, 2, 0), ((2, 3, 10, 9), 3, 1, 1)];
    for (shape, k, s, p) in cases {
        // Random values have no ties, so both tie rules give the same gradient.
        let x = Var::randn(0f32, 1f32, shape, &dev)?;
        let yf = max_pool2d_padded(x.as_tensor(), k, s, p)?;
        let yr = max_pool2d_composed(x.as_tensor(), k, s, p)?;
        assert_eq!(rel_err(&yf, &yr)?, 0.0, "{shape:?} k{k} s{s} p{p}: values");
        let r = Tensor::randn(0f32, 1f32, yf.dims(), &dev)?;
        let gf = (yf * &r)?.sum_all()?.backward()?;
        let gr = (yr * &r)?.sum_all()?.backward()?;
        let e = rel_err(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap())?;
        assert!(e < 1e-6, "{shape:?} k{k} s{s} p{p}: gradient relative error {e}");
    }
    // Ties (a constant input): PyTorch's rule, the whole gradient to the first maximum.
    let x = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F32, &dev)?)?;
    let g = max_pool2d_padded(x.as_tensor(), 2, 2, 0)?.sum_all()?.backward()?;
    let gx = g.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
    let expected = [1., 0., 1., 0., 0., 0., 0., 0., 1., 0., 1., 0., 0., 0., 0., 0.];
    assert_eq!(gx, expected);
    Ok(())
}

#[test]
fn relu_values_and_gradient_match_candle() -> R<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1f32, (3, 4, 5, 7), &dev)?;
    let yf = relu(x.as_tensor())?;
    let yr = x.as_tensor().relu()?;
    assert_eq!(rel_err(&yf, &yr)?, 0.0);
    let r = Tensor::randn(0f32, 1f32, yf.dims(), &dev)?;
    let gf = (yf * &r)?.sum_all()?.backward()?;
    let gr = (yr * &r)?.sum_all()?.backward()?;
    assert_eq!(rel_err(gf.get(x.as_tensor()).unwrap(), gr.get(x.as_tensor()).unwrap())?, 0.0);
    Ok(())
}

#[test]
fn batchnorm_train_fused_matches_composed() -> R<()> {
    let dev = Device::Cpu;
    for (shape, with_relu) in [
        (vec![4usize, 5, 7, 3], false),
        (vec![6, 5], false),
        (vec![2, 5, 1, 1], false),
        (vec![4, 5, 7, 3], true),
        (vec![6, 5], true),
    ] {
        let x0 = if shape == [2, 5, 1, 1] {
            // Two values per channel: the exact input gradient is 0 and the computed one is
            // rounding noise times 1/std, so the two values must not be close (random ones were,
            // now and then, and the test failed by chance).
            let v = [0.3f32, -1.2, 2.0, 0.5, -0.7, 2.9, 1.4, -1.1, 3.3, 1.8];
            Tensor::from_slice(&v, shape.as_slice(), &dev)?
        } else {
            (Tensor::randn(0f32, 2f32, shape.as_slice(), &dev)? + 0.7)?
        };
        let r = Tensor::randn(0f32, 1f32, shape.as_slice(), &dev)?;
        let (w0, b0) = (Tensor::randn(0f32, 1f32, 5, &dev)?, Tensor::randn(0f32, 1f32, 5, &dev)?);
        let run = |fused: bool| -> R<(Tensor, Vec<Tensor>, Tensor, Tensor)> {
            let vm = VarMap::new();
            let bn = BatchNorm::new(5, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
            // Non-trivial affine parameters.
            for (name, var) in vm.data().lock().unwrap().iter() {
                match name.as_str() {
                    "weight" => var.set(&w0)?,
                    "bias" => var.set(&b0)?,
                    _ => {}
                }
            }
            let x = Var::from_tensor(&x0)?;
            let y = match (fused, with_relu) {
                (true, false) => bn.forward_train(x.as_tensor())?,
                (true, true) => bn.forward_relu_t(x.as_tensor(), true)?,
                (false, false) => bn.forward_train_composed(x.as_tensor())?,
                (false, true) => bn.forward_train_composed(x.as_tensor())?.relu()?,
            };
            let g = (&y * &r)?.sum_all()?.backward()?;
            let data = vm.data().lock().unwrap();
            let grads = vec![
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(data["weight"].as_tensor()).unwrap().clone(),
                g.get(data["bias"].as_tensor()).unwrap().clone(),
            ];
            Ok((y, grads, bn.running_mean().clone(), bn.running_var().clone()))
        };
        let (yf, gf, mf, vf) = run(true)?;
        let (yr, gr, mr, vr) = run(false)?;
        let e = rel_err(&yf, &yr)?;
        assert!(e < 1e-5, "{shape:?} relu {with_relu}: values, relative error {e}");
        for (name, (a, b)) in ["x", "weight", "bias"].iter().zip(gf.iter().zip(&gr)) {
            let e = rel_err(a, b)?;
            assert!(e < 1e-4, "{shape:?} relu {with_relu}: gradient of {name}, relative error {e}");
        }
        assert!(rel_err(&mf, &mr)? < 1e-6 && rel_err(&vf, &vr)? < 1e-6, "{shape:?}: running statistics");
    }
    Ok(())
}

#[test]
fn add_relu_matches_candle() -> R<()> {
    let dev = Device::Cpu;
    let a = Var::randn(0f32, 1f32, (2, 3, 5, 4), &dev)?;
    let b = Var::randn(0f32, 1f32, (2, 3, 5, 4), &dev)?;
    let yf = add_relu(a.as_tensor(), b.as_tensor())?;
    let yr = (a.as_tensor() + b.as_tensor())?.relu()?;
    assert_eq!(rel_err(&yf, &yr)?, 0.0);
    let r = Tensor::randn(0f32, 1f32, yf.dims(), &dev)?;
    let gf = (yf * &r)?.sum_all()?.backward()?;
    let gr = (yr * &r)?.sum_all()?.backward()?;
    for v in [&a, &b] {
        assert_eq!(rel_err(gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap())?, 0.0);
    }
    Ok(())
}

#[test]
fn train_bench_reports_images_per_s_on_its_last_line() -> R<()> {
    use mpcs::bench::{train_bench, TrainBenchOptions};
    let opts = TrainBenchOptions { size: 32, batch: 2, steps: 2, ..Default::default() };
    let mut out = Vec::new();
    let ips = train_bench(&opts, &mut out)?;
    let text = String::from_utf8(out)?;
    let last = text.lines().last().unwrap();
    let value: f64 = last.strip_prefix("images_per_s=").expect("last line is images_per_s=<n>").parse()?;
    assert!(ips.is_finite() && ips > 0.0 && (value - ips).abs() <= 0.01 * ips, "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("step ")).count(), 2, "{text}");
    // The first line names the CPU and the kernel family, so a figure can be read beside others'.
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("cpu: ") && first.contains("; kernels: "), "{first}");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo.lines().find(|l| l.starts_with("model name")) {
        assert!(first.contains(model.split(':').nth(1).unwrap().trim()), "{first}");
    }
    // The lane convolutions take the widest kernels the CPU has, and the line says which.
    use mpcs::nn::conv::{lane_kernels, LaneKernels};
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("MPCS_NN_LANES").is_none() {
        let want = if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            Some(LaneKernels::Avx512)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some(LaneKernels::Avx2)
        } else {
            None
        };
        assert_eq!(lane_kernels(), want);
    }
    let family = match lane_kernels() {
        Some(LaneKernels::Avx512) => "lane convolutions AVX-512",
        Some(LaneKernels::Avx2) => "lane convolutions AVX2+FMA",
        None => "lane convolutions off",
    };
    assert!(first.contains(family), "{first}");
    // Bad options are errors that say what to change.
    let bad = TrainBenchOptions { batch: 1, ..opts };
    let err = train_bench(&bad, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("--batch"), "{err}");
    Ok(())
}

#[test]
fn batchnorm_eval_fused_matches_composed_ops() -> R<()> {
    // Eval mode (running statistics): the fused op against the same formula in candle ops,
    // values and gradients for x, weight and bias, with and without the ReLU.
    let dev = Device::Cpu;
    let shape = (3usize, 4usize, 5usize, 6usize);
    let x0 = Tensor::randn(0f32, 1f32, shape, &dev)?;
    let r = Tensor::randn(0f32, 1f32, shape, &dev)?;
    let (rm, rv) = (Tensor::randn(0f32, 1f32, 4, &dev)?, (Tensor::rand(0f32, 1f32, 4, &dev)? + 0.5)?);
    let (w0, b0) = (Tensor::randn(0f32, 1f32, 4, &dev)?, Tensor::randn(0f32, 1f32, 4, &dev)?);
    for with_relu in [false, true] {
        let vm = VarMap::new();
        let bn = BatchNorm::new(4, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        {
            let data = vm.data().lock().unwrap();
            data["weight"].set(&w0)?;
            data["bias"].set(&b0)?;
            data["running_mean"].set(&rm)?;
            data["running_var"].set(&rv)?;
        }
        let x = Var::from_tensor(&x0)?;
        let data = vm.data().lock().unwrap();
        let (w, b) = (data["weight"].as_tensor(), data["bias"].as_tensor());
        let yf = if with_relu { bn.forward_relu_t(x.as_tensor(), false)? } else { bn.forward_eval(x.as_tensor())? };
        let cs = (1usize, 4usize, 1usize, 1usize);
        let scale = (w / (&rv + 1e-5)?.sqrt()?)?;
        let yr = x
            .as_tensor()
            .broadcast_sub(&rm.reshape(cs)?)?
            .broadcast_mul(&scale.reshape(cs)?)?
            .broadcast_add(&b.reshape(cs)?)?;
        let yr = if with_relu { yr.relu()? } else { yr };
        let e = rel_err(&yf, &yr)?;
        assert!(e < 1e-5, "relu {with_relu}: values, relative error {e}");
        let gf = (yf * &r)?.sum_all()?.backward()?;
        let gr = (yr * &r)?.sum_all()?.backward()?;
        for (name, t) in [("x", x.as_tensor()), ("weight", w), ("bias", b)] {
            let e = rel_err(gf.get(t).unwrap(), gr.get(t).unwrap())?;
            assert!(e < 1e-4, "relu {with_relu}: gradient of {name}, relative error {e}");
        }
    }
    Ok(())
}

#[test]
fn empty_inputs_are_not_a_panic() -> R<()> {
    // Zero-sized batches or planes take candle's ops (or give errors), never a panic.
    let dev = Device::Cpu;
    let x = Tensor::zeros((0, 3, 8, 8), DType::F32, &dev)?;
    let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &dev)?;
    let _ = conv2d(&x, &w, 1, 1, 1);
    let _ = max_pool2d_padded(&Tensor::zeros((1, 2, 0, 4), DType::F32, &dev)?, 2, 2, 1);
    let _ = relu(&Tensor::zeros((0, 2), DType::F32, &dev)?)?;
    let vm = VarMap::new();
    let bn = BatchNorm::new(2, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let empty = Tensor::zeros((1, 2, 0, 3), DType::F32, &dev)?;
    let _ = bn.forward_eval(&empty);
    assert!(bn.forward_train(&empty).is_err());
    Ok(())
}

/// Loss, input gradient and weight gradient of sum(conv(x, w) * r), as raw f32 values.
fn conv_step(c: &Case, x0: &Tensor, w0: &Tensor, r: &Tensor) -> R<Vec<Vec<f32>>> {
    let x = Var::from_tensor(x0)?;
    let w = Var::from_tensor(w0)?;
    let y = conv2d(x.as_tensor(), w.as_tensor(), c.stride, c.pad, c.dil)?;
    let g = (&y * r)?.sum_all()?.backward()?;
    let flat = |t: &Tensor| -> R<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    Ok(vec![flat(&y)?, flat(g.get(x.as_tensor()).expect("dx"))?, flat(g.get(w.as_tensor()).expect("dw"))?])
}

/// The batch is shared between threads in parts, but how it is split into GEMMs and how partial
/// weight gradients are summed depend on the shapes only: results are bit-identical under 1, 2
/// and 3 threads (so `--jobs` or a machine's core count never changes a cached result).
#[test]
fn conv2d_results_do_not_depend_on_the_thread_count() -> R<()> {
    let dev = Device::Cpu;
    for c in CASES {
        let x = Tensor::randn(0f32, 1f32, (c.n, c.c, c.h, c.w), &dev)?;
        let w = Tensor::randn(0f32, 1f32, (c.o, c.c, c.k, c.k), &dev)?;
        let y_dims = conv2d(&x, &w, c.stride, c.pad, c.dil)?.dims().to_vec();
        let r = Tensor::randn(0f32, 1f32, y_dims, &dev)?;
        let run = |threads: usize| -> R<Vec<Vec<f32>>> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
            pool.install(|| conv_step(c, &x, &w, &r))
        };
        let one = run(1)?;
        for threads in [2, 3] {
            let many = run(threads)?;
            for (what, (a, b)) in ["output", "input gradient", "weight gradient"].iter().zip(one.iter().zip(&many)) {
                let same = a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{c:?}: {what} differs between 1 and {threads} threads");
            }
        }
    }
    Ok(())
}

/// A whole ResNet-18 training step (every fast kernel: convolution parts, BatchNorm statistics
/// and backward, max-pool, ReLU, add+ReLU, plus candle's own ops) gives bit-identical loss,
/// gradients and BatchNorm running statistics under 1 and 2 threads.
#[test]
fn resnet_training_step_does_not_depend_on_the_thread_count() -> R<()> {
    use candle_nn::{VarBuilder, VarMap};
    use mpcs::nn::{Arch, Dilation, ResNet};
    let dev = Device::Cpu;
    // 8 images: the 8×8 and smaller stages take the batch-in-lanes convolution.
    let x = Tensor::randn(0f32, 1f32, (8, 3, 64, 64), &dev)?;
    let labels = Tensor::new(&[0u32, 1, 2, 3, 4, 0, 1, 2], &dev)?;
    let init = {
        let varmap = VarMap::new();
        ResNet::new(
            Arch::ResNet18,
            VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev),
            Some(5),
            Dilation::None,
        )?;
        let mut data =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().copy())).collect::<Vec<_>>();
        data.sort_by(|a, b| a.0.cmp(&b.0));
        data.into_iter().map(|(k, t)| Ok((k, t?))).collect::<R<Vec<_>>>()?
    };
    let run = |threads: usize| -> R<Vec<(String, Vec<f32>)>> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| {
            let varmap = VarMap::new();
            let model = ResNet::new(
                Arch::ResNet18,
                VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev),
                Some(5),
                Dilation::None,
            )?;
            for (name, t) in &init {
                varmap.data().lock().unwrap()[name].set(t)?;
            }
            let loss = candle_nn::loss::cross_entropy(&model.forward_t(&x, true)?, &labels)?;
            let grads = loss.backward()?;
            let mut out = vec![("loss".to_string(), vec![loss.to_scalar::<f32>()?])];
            let vars = varmap.data().lock().unwrap();
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            for name in names {
                let v = &vars[name];
                out.push((
                    format!("{name} value"),
                    v.as_tensor().flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?,
                ));
                if let Some(g) = grads.get(v.as_tensor()) {
                    out.push((format!("{name} gradient"), g.flatten_all()?.to_vec1()?));
                }
            }
            Ok(out)
        })
    };
    let (one, two) = (run(1)?, run(2)?);
    assert!(one.len() > 100, "expected the values and gradients of every variable, got {}", one.len());
    for ((name, a), (_, b)) in one.iter().zip(&two) {
        assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs between 1 and 2 threads");
    }
    Ok(())
}

/// Inference under `no_grad` (where each convolution applies its BatchNorm, and the last one of
/// a block the residual add + ReLU, as it writes its output) gives the same features bit for bit
/// as the unfused evaluation-mode forward, for basic and bottleneck blocks and the dilated
/// ResNet; it records no graph (so activations are freed layer by layer), and gradient recording
/// comes back afterwards, also after a panic.
#[test]
fn no_grad_inference_matches_and_records_no_graph() -> R<()> {
    use candle_nn::{VarBuilder, VarMap};
    use mpcs::nn::{grad_enabled, no_grad, Arch, Dilation, ResNet};
    let dev = Device::Cpu;
    for (arch, dilation, size) in
        [(Arch::ResNet18, Dilation::None, 40), (Arch::ResNet50, Dilation::from_output_stride(8)?, 24)]
    {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
        let model = ResNet::new(arch, vb, Some(3), dilation)?;
        // Non-trivial running statistics and affine parameters, so the folded BatchNorm matters.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.ends_with("running_var") || name.ends_with("weight") && name.contains("bn") {
                var.set(&(Tensor::rand(0.5f32, 1.5f32, var.shape(), &dev)?))?;
            } else if name.ends_with("running_mean") || name.ends_with("bias") && name.contains("bn") {
                var.set(&(Tensor::randn(0f32, 0.2f32, var.shape(), &dev)?))?;
            }
        }
        // 9 images: the small maps take the batch-in-lanes path, with 7 lanes unused.
        let x = Tensor::randn(0f32, 1f32, (9, 3, size, size), &dev)?;
        let tracked = model.features_t(&x, false)?;
        assert!(tracked.track_op(), "a plain eval forward records the graph (the weights are variables)");
        let free = no_grad(|| model.features_t(&x, false).map_err(anyhow::Error::from))?;
        assert!(!free.track_op(), "no_grad must not record a graph");
        let (a, b) = (tracked.flatten_all()?.to_vec1::<f32>()?, free.flatten_all()?.to_vec1::<f32>()?);
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()), "{arch:?}: no_grad changed the features");
        assert!(a.iter().any(|&v| v != 0.0), "{arch:?}: all features are zero; the comparison says nothing");
    }
    assert!(grad_enabled());
    let caught = std::panic::catch_unwind(|| no_grad(|| panic!("inside no_grad")));
    assert!(caught.is_err());
    assert!(grad_enabled(), "gradient recording not restored after a panic");
    Ok(())
}
