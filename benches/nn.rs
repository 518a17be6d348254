//! ResNet-18 throughput on CPU, one thread: forward only (eval) and forward + backward (train),
//! 64×64 images, batch 16. Run: `cargo bench --bench nn`. Peer figure: scripts/nn/bench_torch.py.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mpcs::nn::{Arch, Dilation, ResNet};

const BATCH: usize = 16;
const SIZE: usize = 64;
const ITERS: usize = 5;

fn time(label: &str, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    f()?; // warm-up
    let t = Instant::now();
    for _ in 0..ITERS {
        f()?;
    }
    let s = t.elapsed().as_secs_f64() / ITERS as f64;
    println!("{label}: {:.1} images/s ({:.1} ms per batch of {BATCH})", BATCH as f64 / s, s * 1e3);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // candle's CPU kernels size their thread pools from RAYON_NUM_THREADS; pin to one thread
    // (before any pool exists) unless the caller chose otherwise.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    println!("candle ResNet-18, {SIZE}x{SIZE}, batch {BATCH}, {} thread(s)", candle_core::utils::get_num_threads());
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = ResNet::new(Arch::ResNet18, vb, Some(10), Dilation::None)?;
    let x = Tensor::randn(0f32, 1f32, (BATCH, 3, SIZE, SIZE), &dev)?;
    let labels = Tensor::from_vec((0..BATCH as u32).map(|i| i % 10).collect::<Vec<_>>(), BATCH, &dev)?;

    time("forward (eval)", || {
        let y = model.forward_t(&x, false)?;
        y.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    time("forward (train mode: batch statistics, graph kept)", || {
        let y = model.forward_t(&x, true)?;
        candle_nn::loss::cross_entropy(&y, &labels)?.to_scalar::<f32>()?;
        Ok(())
    })?;
    time("forward+backward (train)", || {
        let y = model.forward_t(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&y, &labels)?;
        let grads = loss.backward()?;
        std::hint::black_box(grads);
        Ok(())
    })?;
    Ok(())
}
