//! Direct access to the f32 data of contiguous CPU tensors, for the fused layers' backward passes
//! (which compute gradients in plain loops instead of chains of tensor ops).

use candle_core::{CpuStorage, Layout, Storage, Tensor};

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
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: only f32 is supported on the CPU fast path") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    }
}

/// Whether the fused CPU kernels apply: f32, on the CPU, not empty (the kernels walk the data in
/// per-plane chunks), fast paths enabled.
pub(crate) fn fast_cpu_f32(t: &Tensor) -> bool {
    super::conv::fast_paths_enabled()
        && t.device().is_cpu()
        && t.dtype() == candle_core::DType::F32
        && t.elem_count() > 0
}

/// Wraps a candle error produced inside `bwd` (which must return candle's error type).
pub(crate) fn internal(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: gradient is not a contiguous f32 CPU tensor"))
}
