//! The forward convolution of small feature maps, and the input gradient of the stride-1 ones,
//! with the batch in the vector lanes.
//!
//! Why: im2col + GEMM multiplies the zero padding too. On a 4×4 map a 3×3 kernel reaches outside
//! the image for 31 % of its taps, on a 2×2 map for 56 % (ResNet-18 at 64×64 has 8×8, 4×4 and 2×2
//! stages); and it copies every input value nine times into the column matrix first. Here the
//! input of (up to) 16 images is transposed once so that one (channel, row, column) holds the 16
//! images side by side. A tile of the output is then one output position × 16 images × 6 output
//! channels, and every kernel tap is one call of gemm's f32 micro-kernel that reads the 16 lanes
//! straight from the transposed input (k = input channels, a constant stride) without packing it.
//! Taps that fall into the padding for a position are skipped: the same position is outside for
//! every image of the tile.
//!
//! Each output is the sum over its valid taps in (ki, kj) order of a sum over input channels in
//! order: the same additions whatever the thread count, so results are bit-identical under any
//! number of threads. Only on x86-64 with AVX2 and FMA (gemm's own kernels there).

use std::ops::Range;

use rayon::prelude::*;

use super::{with_scratch, Epilogue, Geometry};
use crate::nn::cpu::par_chunks;

/// Images per tile: the micro-kernel's two 8-lane registers.
const LANES: usize = 16;
/// Output channels per tile: the micro-kernel's broadcast width.
const NR: usize = 6;

/// gemm's f32 micro-kernel signature (gemm_common::microkernel::MicroKernelFn<f32>): sizes m, n, k;
/// dst, lhs, rhs; dst column and row strides, lhs column stride, rhs row and column strides;
/// alpha, beta, alpha status (0: overwrite, 1: add); three conjugation flags; a prefetch hint.
type MicroKernel = unsafe fn(
    usize,
    usize,
    usize,
    *mut f32,
    *const f32,
    *const f32,
    isize,
    isize,
    isize,
    isize,
    isize,
    f32,
    f32,
    u8,
    bool,
    bool,
    bool,
    *const f32,
);

/// Whether this CPU can run the lane path (x86-64 with AVX2 and FMA, checked once), unless
/// `MPCS_NN_LANES=0` turns it off (the benchmarks' comparison with im2col + GEMM).
fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let wanted = std::env::var("MPCS_NN_LANES").map_or(true, |v| v != "0");
        #[cfg(target_arch = "x86_64")]
        let cpu = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        wanted && cpu
    })
}

/// Whether a convolution takes this path: a spatial kernel (a 1×1 convolution has no padding to
/// skip) on a small input map (8×8 or less: where padding is a large share of the taps, and the
/// transposed input of 16 images stays in L2), enough input channels for each micro-kernel call
/// to amortise its tile's loads and stores, and enough images to fill most lanes. Measured per
/// layer against im2col + GEMM in notes/speed.md.
pub(super) fn suits(g: &Geometry) -> bool {
    available() && g.kh * g.kw > 1 && g.h * g.w <= 64 && g.c >= 16 && g.n >= 8
}

/// The micro-kernel for an m × n tile (m ≤ 16 images, n ≤ 6 channels).
#[cfg(target_arch = "x86_64")]
fn kernel(m: usize, n: usize) -> MicroKernel {
    gemm_f32::microkernel::fma::f32::UKR[m.div_ceil(8) - 1][n - 1]
}

#[cfg(not(target_arch = "x86_64"))]
fn kernel(_m: usize, _n: usize) -> MicroKernel {
    unreachable!("lane convolution used without checking `available()`")
}

/// Kernel taps `lo..hi` (along one axis) whose input index `out·stride − pad + tap·dilation`
/// lies inside `0..size`.
fn tap_range(out: usize, stride: usize, pad: usize, dilation: usize, taps: usize, size: usize) -> (usize, usize) {
    let start = out * stride; // input index of tap 0, plus the padding
    let lo = pad.saturating_sub(start).div_ceil(dilation).min(taps);
    let hi = if start < size + pad { ((size + pad - 1 - start) / dilation + 1).min(taps) } else { 0 };
    (lo, hi.max(lo))
}

/// The weight (o, c·kh·kw) as panels of NR output channels, as gemm packs a GEMM's right operand:
/// panel j holds, for each row k = (ci, tap) of the weight, the NR values w[j·NR + r, k] (zero
/// past the last channel). One tap's values for consecutive input channels are then `taps·NR`
/// apart: the micro-kernel's right operand for k = c, row stride taps·NR.
struct PackedWeights {
    data: Vec<f32>,
    depth: usize,
}

impl PackedWeights {
    fn new(g: &Geometry, wt: &[f32]) -> Self {
        let depth = g.ckk();
        let mut data = vec![0f32; g.o.div_ceil(NR) * depth * NR];
        par_chunks(&mut data, depth * NR, |j, panel| {
            let rows = &wt[j * NR * depth..(((j + 1) * NR).min(g.o)) * depth];
            if rows.len() == NR * depth {
                // Six rows read side by side, the panel written in order.
                let rows: [&[f32]; NR] = std::array::from_fn(|r| &rows[r * depth..(r + 1) * depth]);
                for (k, out) in panel.chunks_exact_mut(NR).enumerate() {
                    for (o, row) in out.iter_mut().zip(&rows) {
                        *o = row[k];
                    }
                }
            } else {
                for (r, row) in rows.chunks_exact(depth).enumerate() {
                    for (o, &v) in panel[r..].iter_mut().step_by(NR).zip(row) {
                        *o = v;
                    }
                }
            }
        });
        Self { data, depth }
    }

    /// The weight of the input gradient of a stride-1 convolution (see [`input_grad`]): rows are
    /// the original input channels, row ci holding, for each (output channel, tap), the value of
    /// the kernel flipped in both axes: w'[ci, (oc, t)] = w[oc, ci, taps − 1 − t].
    fn transposed_flipped(g: &Geometry, wt: &[f32]) -> Self {
        let taps = g.kh * g.kw;
        let depth = g.o * taps;
        let mut data = vec![0f32; g.c.div_ceil(NR) * depth * NR];
        par_chunks(&mut data, depth * NR, |j, panel| {
            let rows = NR.min(g.c - j * NR);
            for (oc, out) in panel.chunks_exact_mut(taps * NR).enumerate() {
                // The NR input channels' kernels of output channel oc: one contiguous block.
                let block = &wt[(oc * g.c + j * NR) * taps..][..rows * taps];
                match (<&[f32; 9 * NR]>::try_from(block), <&mut [f32; 9 * NR]>::try_from(&mut *out)) {
                    // Full panels of 3×3 kernels (nearly all of them) with fixed sizes: the
                    // compiler unrolls the transposition without bounds checks (512→512 on 2×2:
                    // input gradient 4.8–7.1 ms with the general loop below, 2.6–4.1 with this).
                    (Ok(block), Ok(out)) if taps == 9 => flip_transpose_3x3(block, out),
                    _ => {
                        for (t, out) in out.chunks_exact_mut(NR).enumerate() {
                            for (r, o) in out[..rows].iter_mut().enumerate() {
                                *o = block[r * taps + taps - 1 - t];
                            }
                        }
                    }
                }
            }
        });
        Self { data, depth }
    }

    /// Panel j from weight row `k0` (= tap for channel 0) on.
    fn panel(&self, j: usize, k0: usize) -> *const f32 {
        self.data[(j * self.depth + k0) * NR..].as_ptr()
    }
}

/// out[t·NR + r] = block[r·9 + 8 − t]: NR 3×3 kernels, flipped and transposed.
fn flip_transpose_3x3(block: &[f32; 9 * NR], out: &mut [f32; 9 * NR]) {
    for t in 0..9 {
        for r in 0..NR {
            out[t * NR + r] = block[r * 9 + 8 - t];
        }
    }
}

/// The transposed output shared by the threads of one group: each writes its own channels.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint channel ranges of the buffer (see `Group::tiles`), which
// outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// y (n, o, oh, ow) from x (n, c, h, w) and weight (o, c·kh·kw), with the epilogue applied.
pub(super) fn forward(g: &Geometry, x: &[f32], wt: &[f32], threads: usize, post: Option<Epilogue>) -> Vec<f32> {
    forward_packed(g, x, &PackedWeights::new(g, wt), threads, post)
}

/// The input gradient dx (n, c, h, w) of a stride-1 convolution from dy (n, o, oh, ow), when the
/// lane path suits it: it is itself a stride-1 convolution of dy, with the kernel transposed
/// (input and output channels swapped) and flipped, and padding d·(k − 1) − pad. None otherwise
/// (strided, non-square or over-padded kernels, or large maps), for im2col's GEMM + col2im.
pub(super) fn input_grad(g: &Geometry, dy: &[f32], wt: &[f32], threads: usize) -> Option<Vec<f32>> {
    let reach = g.dilation * (g.kh - 1);
    if g.stride != 1 || g.kh != g.kw || g.padding > reach || !available() {
        return None;
    }
    let gt = Geometry::new(&[g.n, g.o, g.oh, g.ow], &[g.c, g.o, g.kh, g.kw], 1, reach - g.padding, g.dilation).ok()?;
    if !suits(&gt) || (gt.oh, gt.ow) != (g.h, g.w) {
        return None;
    }
    Some(forward_packed(&gt, dy, &PackedWeights::transposed_flipped(g, wt), threads, None))
}

/// [`forward`] with the weight already packed.
fn forward_packed(g: &Geometry, x: &[f32], w: &PackedWeights, threads: usize, post: Option<Epilogue>) -> Vec<f32> {
    let p = g.p();
    let mut y = vec![0f32; g.n * g.o * p];
    with_scratch(g.c * channel_stride(g), g.o * p * LANES, |xt, yt| {
        for first in (0..g.n).step_by(LANES) {
            let images = first..(first + LANES).min(g.n);
            transpose_in(g, x, images.clone(), xt);
            let group = Group { g, w, xt, lanes: images.len() };
            let out = OutPtr(yt.as_mut_ptr());
            // Threads share the output channels: each then reads only its part of the weights
            // (a 3×3 512→512 layer has 9 MB of them, more than a core's L2).
            let panels = g.o.div_ceil(NR);
            let parts = threads.clamp(1, panels);
            if parts == 1 {
                group.tiles(0..panels, out);
            } else {
                (0..parts).into_par_iter().for_each(|t| group.tiles(t * panels / parts..(t + 1) * panels / parts, out));
            }
            let dst = &mut y[first * g.o * p..images.end * g.o * p];
            transpose_out(g, yt, first, dst, post);
        }
    });
    y
}

/// Values per input channel in the transposed input: h·w positions of 16 lanes, plus one unused
/// cache line. Without it a 8×8 map's channels lie exactly 4 KB apart, and the micro-kernel's
/// loads for consecutive channels all fall into one L1 set and evict each other.
fn channel_stride(g: &Geometry) -> usize {
    (g.h * g.w + 1) * LANES
}

/// xt[ci, (iy, ix), lane] = x[first + lane, ci, iy, ix]; lanes past the last image are zero.
fn transpose_in(g: &Geometry, x: &[f32], images: Range<usize>, xt: &mut [f32]) {
    let (plane, stride) = (g.h * g.w, channel_stride(g));
    par_chunks(&mut xt[..g.c * stride], stride, |ci, channel| {
        for l in 0..LANES {
            if l < images.len() {
                let src = &x[((images.start + l) * g.c + ci) * plane..][..plane];
                for (d, &v) in channel[l..].iter_mut().step_by(LANES).zip(src) {
                    *d = v;
                }
            } else {
                channel[l..plane * LANES].iter_mut().step_by(LANES).for_each(|d| *d = 0.0);
            }
        }
    });
}

/// dst[lane, ch, pos] = yt[(ch, pos), lane] for the group's images (`dst` holds them, the first
/// being image `first` of the batch), then the epilogue, one image at a time.
fn transpose_out(g: &Geometry, yt: &[f32], first: usize, dst: &mut [f32], post: Option<Epilogue>) {
    let len = g.o * g.p();
    par_chunks(dst, len, |lane, image| {
        for (d, &v) in image.iter_mut().zip(yt[lane..].iter().step_by(LANES)) {
            *d = v;
        }
        if let Some(post) = post {
            post.apply(image, first + lane, 1, g.o, g.p());
        }
    });
}

/// One group of up to 16 images with its transposed input.
struct Group<'a> {
    g: &'a Geometry,
    w: &'a PackedWeights,
    xt: &'a [f32],
    lanes: usize,
}

impl Group<'_> {
    /// The transposed output yt[(ch, pos), lane] of the channels of weight panels `panels`, every
    /// position.
    fn tiles(&self, panels: Range<usize>, yt: OutPtr) {
        let g = self.g;
        let (p, m) = (g.p(), self.lanes);
        // The taps inside the image, (rows, columns) of the kernel, for each output position.
        let taps: Vec<_> = (0..p)
            .map(|pos| {
                let (oy, ox) = (pos / g.ow, pos % g.ow);
                (
                    tap_range(oy, g.stride, g.padding, g.dilation, g.kh, g.h),
                    tap_range(ox, g.stride, g.padding, g.dilation, g.kw, g.w),
                )
            })
            .collect();
        for j in panels {
            let n = NR.min(g.o - j * NR);
            let k = kernel(m, n);
            // Positions whose every tap is in the padding (only with padding ≥ the kernel's reach).
            for (pos, &((ki0, ki1), (kj0, kj1))) in taps.iter().enumerate() {
                if ki0 == ki1 || kj0 == kj1 {
                    for r in 0..n {
                        // SAFETY: inside yt (channel j·NR + r < o, pos < p, LANES values).
                        unsafe { std::ptr::write_bytes(yt.0.add(((j * NR + r) * p + pos) * LANES), 0, LANES) };
                    }
                }
            }
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let rhs = self.w.panel(j, ki * g.kw + kj);
                    for (pos, &((ki0, ki1), (kj0, kj1))) in taps.iter().enumerate() {
                        if !(ki0..ki1).contains(&ki) || !(kj0..kj1).contains(&kj) {
                            continue;
                        }
                        let (oy, ox) = (pos / g.ow, pos % g.ow);
                        let iy = oy * g.stride + ki * g.dilation - g.padding;
                        let ix = ox * g.stride + kj * g.dilation - g.padding;
                        let lhs = self.xt[(iy * g.w + ix) * LANES..].as_ptr();
                        // The first valid tap of a position overwrites its tile; later ones add.
                        let status = if (ki, kj) == (ki0, kj0) { 0 } else { 1 };
                        // SAFETY: the kernel reads m ≤ 16 lanes at lhs + ci·channel_stride for ci < c
                        // (inside xt: (iy, ix) is inside the map), n values at rhs + ci·taps·NR
                        // for ci < c (inside panel j), and writes m lanes × n channels of this position's tile in yt
                        // (channels j·NR.. < o); threads own disjoint channels.
                        unsafe {
                            k(
                                m,
                                n,
                                g.c,
                                yt.0.add((j * NR * p + pos) * LANES),
                                lhs,
                                rhs,
                                (p * LANES) as isize,
                                1,
                                channel_stride(g) as isize,
                                (g.kh * g.kw * NR) as isize,
                                1,
                                1.0,
                                1.0,
                                status,
                                false,
                                false,
                                false,
                                std::ptr::null(),
                            )
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_range_matches_brute_force() {
        for (stride, pad, dil, taps, size) in
            [(1, 1, 1, 3, 4), (2, 1, 1, 3, 8), (1, 2, 2, 3, 5), (2, 3, 1, 7, 9), (1, 0, 1, 1, 3)]
        {
            let span = dil * (taps - 1) + 1;
            let outs = (size + 2 * pad - span) / stride + 1;
            for out in 0..outs {
                let valid: Vec<usize> = (0..taps)
                    .filter(|&t| {
                        let i = (out * stride + t * dil) as isize - pad as isize;
                        i >= 0 && i < size as isize
                    })
                    .collect();
                let (lo, hi) = tap_range(out, stride, pad, dil, taps, size);
                assert_eq!((lo..hi).collect::<Vec<_>>(), valid, "out {out} stride {stride} pad {pad} dil {dil}");
            }
        }
    }
}
