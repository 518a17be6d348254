//! Direct access to the f32 data of contiguous CPU tensors, for the fused layers' backward passes
//! (which compute gradients in plain loops instead of chains of tensor ops).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Storage, Tensor};
use rayon::prelude::*;

/// Runs `f` on the tensor's contiguous f32 data, or returns None when the tensor is not a
/// contiguous f32 CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => layout.contiguous_offsets().map(|(a, b)| f(&v[a..b])),
        _ => None,
    }
}

/// The contiguous f32 slice of a CPU storage (for `cpu_fwd`), or an error naming the op.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported on the CPU fast path, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    }
}

/// false when the environment sets `MPCS_NN_REFERENCE=1`: every layer then runs through candle's
/// own ops (the "before" column of the benchmarks, and what runs on a GPU), or after
/// [`set_fast_paths`]`(false)`.
pub fn fast_paths_enabled() -> bool {
    use std::sync::atomic::Ordering;
    match FAST_PATHS.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("MPCS_NN_REFERENCE").map_or(true, |v| v.is_empty() || v == "0");
            FAST_PATHS.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
        v => v == ON,
    }
}

/// Turns the CPU fast paths on or off for the whole process (`mpcs doctor` compares both; never while a
/// model is being trained).
pub fn set_fast_paths(on: bool) {
    FAST_PATHS.store(if on { ON } else { OFF }, std::sync::atomic::Ordering::Relaxed);
}

const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static FAST_PATHS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);

/// Whether the fused CPU kernels apply: f32, on the CPU, not empty (the kernels walk the data in
/// per-plane chunks), fast paths enabled.
pub(crate) fn fast_cpu_f32(t: &Tensor) -> bool {
    fast_paths_enabled() && t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.elem_count() > 0
}

/// Wraps a candle error produced inside `bwd` (which must return candle's error type).
pub(crate) fn internal(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: gradient is not a contiguous f32 CPU tensor"))
}

/// Fewest values one parallel task handles: below this, handing work to another thread costs more
/// than it saves (the deep layers of a small ResNet have 2×2 maps).
const MIN_TASK_LEN: usize = 1 << 14;

/// Runs `f(i, chunk)` for each `len`-value chunk of `out` (the last may be shorter), sharing the
/// chunks between rayon's threads. Each chunk is computed the same way whichever thread runs it.
pub(crate) fn par_chunks<T: Send>(out: &mut [T], len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let len = len.max(1);
    if !worth_splitting(out.len()) {
        return out.chunks_mut(len).enumerate().for_each(|(i, chunk)| f(i, chunk));
    }
    let min = MIN_TASK_LEN.div_ceil(len);
    out.par_chunks_mut(len).enumerate().with_min_len(min).for_each(|(i, chunk)| f(i, chunk));
}

/// `f(i)` for `i` in `0..count` (each covering `len` values), in parallel, collected in order, for
/// per-plane partial sums that the caller then adds up in a fixed order.
pub(crate) fn par_map<T: Send>(count: usize, len: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if !worth_splitting(count * len) {
        return (0..count).map(f).collect();
    }
    let min = MIN_TASK_LEN.div_ceil(len.max(1));
    (0..count).into_par_iter().with_min_len(min).map(f).collect()
}

/// Whether `total` values are worth sharing between threads: not with one thread (handing work
/// to rayon's pool still costs a wake-up), nor for less than two tasks' worth.
pub(crate) fn worth_splitting(total: usize) -> bool {
    total >= 2 * MIN_TASK_LEN && crate::runtime::cpu_threads() > 1
}

/// A buffer of `len` zeros, zeroed by rayon's threads in parallel chunks when it is large. Why:
/// `vec![0.0; n]` zeroes on the calling thread (a `memset` whenever the allocator hands back
/// reused memory), and in a 2-thread ResNet-50 training step that serial zeroing of the kernels'
/// output buffers was 5.9 % of all samples, with the other thread waiting (notes/speed.md).
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    par_filled(len, 4 * FLAT_CHUNK, |_, _| {})
}

/// A new buffer of `len` values that `f(i, chunk)` fills, chunk by chunk of `chunk_len` values
/// (the last may be shorter), the chunks shared between rayon's threads as in [`par_chunks`]. The
/// task that fills a chunk zeroes it first: the zeros are still in cache when `f` overwrites them,
/// where [`zeros`] followed by [`par_chunks`] streams the buffer through memory twice.
pub(crate) fn par_filled(len: usize, chunk_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    par_chunks(&mut v.spare_capacity_mut()[..len], chunk_len, |i, chunk| {
        chunk.fill(std::mem::MaybeUninit::new(0.0));
        // SAFETY: every value of the chunk was initialised just above; MaybeUninit<f32> has f32's layout.
        f(i, unsafe { &mut *(chunk as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) })
    });
    // SAFETY: the chunks cover all `len` values, each initialised above.
    unsafe { v.set_len(len) };
    v
}

/// Elements per task of the flat (shape-blind) element-wise kernels.
pub(crate) const FLAT_CHUNK: usize = 1 << 14;

/// `g` where `y > 0`, else 0: the gradient through a ReLU whose output is `y` (PyTorch's
/// convention at 0).
pub(crate) fn relu_grad(y: &[f32], g: &[f32]) -> Vec<f32> {
    par_filled(y.len(), FLAT_CHUNK, |i, out| {
        let at = i * FLAT_CHUNK;
        for ((d, &y), &g) in out.iter_mut().zip(&y[at..]).zip(&g[at..]) {
            *d = if y > 0.0 { g } else { 0.0 };
        }
    })
}

/// `f(a)` for every element, in parallel.
pub(crate) fn par_map_values(a: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    par_filled(a.len(), FLAT_CHUNK, |i, o| {
        for (o, &v) in o.iter_mut().zip(&a[i * FLAT_CHUNK..]) {
            *o = f(v);
        }
    })
}

/// `f(a, b)` for every pair of elements, in parallel.
pub(crate) fn par_zip_values(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    par_filled(a.len(), FLAT_CHUNK, |i, o| {
        let at = i * FLAT_CHUNK;
        for ((o, &x), &y) in o.iter_mut().zip(&a[at..]).zip(&b[at..]) {
            *o = f(x, y);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_zero_at_every_length_even_in_reused_memory() {
        for len in [0, 1, 2 * MIN_TASK_LEN - 1, 2 * MIN_TASK_LEN, 4 * FLAT_CHUNK + 3, 1 << 20] {
            for threads in [1, 2] {
                // Freed non-zero memory of the same size, which the allocator may hand back.
                drop(vec![f32::NAN; len]);
                let z = crate::runtime::with_cpu_threads(threads, || zeros(len));
                assert_eq!(z.len(), len);
                assert!(z.iter().all(|&v| v.to_bits() == 0), "len {len}, {threads} threads: a value is not +0.0");
            }
        }
    }

    #[test]
    fn par_filled_gives_each_chunk_its_values_and_zeros_where_left_alone() {
        for (len, chunk) in [(0, 7), (5, 7), (3 * MIN_TASK_LEN + 11, 1000), (1 << 20, FLAT_CHUNK)] {
            for threads in [1, 2] {
                drop(vec![f32::NAN; len]);
                let v = crate::runtime::with_cpu_threads(threads, || {
                    par_filled(len, chunk, |i, out| {
                        // Every other value: the rest must read as the zeros the chunk started with.
                        for (j, o) in out.iter_mut().enumerate().step_by(2) {
                            *o = (i * chunk + j) as f32;
                        }
                    })
                });
                assert_eq!(v.len(), len);
                for (k, &x) in v.iter().enumerate() {
                    let want = if (k % chunk) % 2 == 0 { k as f32 } else { 0.0 };
                    assert_eq!(x.to_bits(), want.to_bits(), "len {len}, chunk {chunk}, {threads} threads, value {k}");
                }
            }
        }
    }
}
