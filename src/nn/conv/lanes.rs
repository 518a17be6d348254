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
//!
//! With AVX-512 one 16-image tile is a single 512-bit register, so a one-position call would
//! have 6 accumulators where the 256-bit kernel has 12. A stride-1 convolution instead takes up to
//! four adjacent output positions of a row in one call: their input lanes are adjacent in the
//! transposed input (the next column) and their outputs adjacent in the transposed output, so the
//! four tiles are one 64-row operand and the kernel keeps 24 accumulators. Every lane still gets
//! the same fused multiply-adds in the same order, so both kernel families give bit-identical
//! results (tested). For a strided convolution the transposed input stores each row's columns by
//! phase (even, then odd for stride 2) so that the same holds there.

use std::ops::Range;

use rayon::prelude::*;

use super::{with_scratch, Epilogue, Geometry};
use crate::nn::cpu::{par_chunks, zeros};

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

/// The micro-kernels a lane convolution calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// gemm's 256-bit FMA kernels: one output position per call.
    Avx2,
    /// gemm's 512-bit kernels for runs of up to four consecutive positions, the 256-bit ones for
    /// single positions.
    Avx512,
}

impl Kernels {
    /// Whether this CPU can run these kernels.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                Kernels::Avx2 => fma,
                Kernels::Avx512 => fma && is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Adjacent output positions one call may take.
    fn max_run(self) -> usize {
        match self {
            Kernels::Avx2 => 1,
            Kernels::Avx512 => 4,
        }
    }
}

/// The kernels the lane path runs on this CPU (checked once), None where it cannot run
/// (no AVX2+FMA) or `MPCS_NN_LANES=0` turns it off (the benchmarks' comparison with im2col +
/// GEMM); `MPCS_NN_LANES=avx2` keeps it on 256-bit kernels where the CPU has AVX-512.
pub fn kernels() -> Option<Kernels> {
    static CHOSEN: std::sync::OnceLock<Option<Kernels>> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let candidates: &[Kernels] = match std::env::var("MPCS_NN_LANES").as_deref() {
            Ok("0") => &[],
            Ok("avx2") => &[Kernels::Avx2],
            _ => &[Kernels::Avx512, Kernels::Avx2],
        };
        candidates.iter().copied().find(|k| k.supported())
    })
}

/// Whether a convolution takes this path: a spatial kernel (a 1×1 convolution has no padding to
/// skip) on a small input map (8×8 or less: where padding is a large share of the taps, and the
/// transposed input of 16 images stays in L2), enough input channels for each micro-kernel call
/// to amortise its tile's loads and stores, and enough images to fill most lanes. Measured per
/// layer against im2col + GEMM in notes/speed.md.
pub(super) fn suits(g: &Geometry) -> bool {
    kernels().is_some() && g.kh * g.kw > 1 && g.h * g.w <= 64 && g.c >= 16 && g.n >= 8
}

/// The micro-kernel for `run` adjacent positions of m images (m ≤ 16; all 16 lanes when run > 1)
/// × n ≤ 6 channels: 256-bit for one position, 512-bit (run 16-lane registers) for more.
#[cfg(target_arch = "x86_64")]
fn kernel(run: usize, m: usize, n: usize) -> MicroKernel {
    if run == 1 {
        gemm_f32::microkernel::fma::f32::UKR[m.div_ceil(8) - 1][n - 1]
    } else {
        gemm_f32::microkernel::avx512f::f32::UKR[run - 1][n - 1]
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn kernel(_run: usize, _m: usize, _n: usize) -> MicroKernel {
    unreachable!("lane convolution used without checking `kernels()`")
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
    let kernels = kernels().expect("lane convolution used without checking `suits`");
    forward_packed(g, x, &PackedWeights::new(g, wt), threads, post, kernels)
}

/// The input gradient dx (n, c, h, w) of a stride-1 convolution from dy (n, o, oh, ow), when the
/// lane path suits it: it is itself a stride-1 convolution of dy, with the kernel transposed
/// (input and output channels swapped) and flipped, and padding d·(k − 1) − pad. None otherwise
/// (strided, non-square or over-padded kernels, or large maps), for im2col's GEMM + col2im.
pub(super) fn input_grad(g: &Geometry, dy: &[f32], wt: &[f32], threads: usize) -> Option<Vec<f32>> {
    input_grad_with(g, dy, wt, threads, kernels()?)
}

/// [`input_grad`] on the given kernels.
fn input_grad_with(g: &Geometry, dy: &[f32], wt: &[f32], threads: usize, kernels: Kernels) -> Option<Vec<f32>> {
    let reach = g.dilation * (g.kh - 1);
    if g.stride != 1 || g.kh != g.kw || g.padding > reach {
        return None;
    }
    let gt = Geometry::new(&[g.n, g.o, g.oh, g.ow], &[g.c, g.o, g.kh, g.kw], 1, reach - g.padding, g.dilation).ok()?;
    if !suits(&gt) || (gt.oh, gt.ow) != (g.h, g.w) {
        return None;
    }
    Some(forward_packed(&gt, dy, &PackedWeights::transposed_flipped(g, wt), threads, None, kernels))
}

/// [`forward`] with the weight already packed.
fn forward_packed(
    g: &Geometry,
    x: &[f32],
    w: &PackedWeights,
    threads: usize,
    post: Option<Epilogue>,
    kernels: Kernels,
) -> Vec<f32> {
    let p = g.p();
    let mut y = zeros(g.n * g.o * p);
    with_scratch(g.c * channel_stride(g), g.o * p * LANES, |xt, yt| {
        for first in (0..g.n).step_by(LANES) {
            let images = first..(first + LANES).min(g.n);
            transpose_in(g, x, images.clone(), xt);
            let group = Group { g, w, xt, lanes: images.len(), max_run: kernels.max_run() };
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

/// Where input column ix lies within its row of the transposed input. With stride s the columns
/// are stored by phase (ix mod s: the even ones first, then the odd ones for stride 2), so the
/// columns that consecutive output positions read for one tap are adjacent and several positions
/// fit one micro-kernel call. The identity for stride 1.
fn column_slot(g: &Geometry, ix: usize) -> usize {
    let (s, phase) = (g.stride, ix % g.stride);
    phase * (g.w / s) + phase.min(g.w % s) + ix / s
}

/// xt[ci, (iy, column_slot(ix)), lane] = x[first + lane, ci, iy, ix]; lanes past the last image
/// are zero.
fn transpose_in(g: &Geometry, x: &[f32], images: Range<usize>, xt: &mut [f32]) {
    let (plane, stride) = (g.h * g.w, channel_stride(g));
    // The slot of each input position, for strided convolutions.
    let slots: Vec<usize> =
        if g.stride == 1 { Vec::new() } else { (0..plane).map(|i| i - i % g.w + column_slot(g, i % g.w)).collect() };
    par_chunks(&mut xt[..g.c * stride], stride, |ci, channel| {
        for l in 0..LANES {
            if l < images.len() {
                let src = &x[((images.start + l) * g.c + ci) * plane..][..plane];
                if slots.is_empty() {
                    for (d, &v) in channel[l..].iter_mut().step_by(LANES).zip(src) {
                        *d = v;
                    }
                } else {
                    for (&slot, &v) in slots.iter().zip(src) {
                        channel[slot * LANES + l] = v;
                    }
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
    /// Consecutive output positions one micro-kernel call may take.
    max_run: usize,
}

/// Consecutive output positions `first..first + len` that one micro-kernel call serves for a tap:
/// inside the map for each, reading consecutive input positions, overwriting their tiles (status
/// 0, the positions' first valid tap) or adding to them (1).
#[derive(Clone, Copy)]
struct Run {
    first: usize,
    len: usize,
    status: u8,
}

impl Group<'_> {
    /// The transposed output yt[(ch, pos), lane] of the channels of weight panels `panels`, every
    /// position.
    fn tiles(&self, panels: Range<usize>, yt: OutPtr) {
        let g = self.g;
        let p = g.p();
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
                    // Runs of consecutive positions where this tap is inside, reads consecutive
                    // input positions (stride 1; across a row's end only where the output is as
                    // wide as the input) and that agree on overwriting (their first valid tap) or
                    // adding.
                    // A run always ends at the previous position: one where the tap is outside ends it.
                    let mut run: Option<Run> = None;
                    for (pos, &((ki0, ki1), (kj0, kj1))) in taps.iter().enumerate() {
                        let inside = (ki0..ki1).contains(&ki) && (kj0..kj1).contains(&kj);
                        // The first valid tap of a position overwrites its tile; later ones add.
                        let status = u8::from((ki, kj) != (ki0, kj0));
                        if let Some(r) = run.as_mut().filter(|r| {
                            inside
                                && r.status == status
                                && r.len < self.max_run
                                && self.input_pos(pos, ki, kj) == self.input_pos(r.first, ki, kj) + r.len
                        }) {
                            r.len += 1;
                            continue;
                        }
                        if let Some(r) = run.take() {
                            self.call(j, n, (ki, kj), rhs, r, yt);
                        }
                        if inside {
                            run = Some(Run { first: pos, len: 1, status });
                        }
                    }
                    if let Some(r) = run {
                        self.call(j, n, (ki, kj), rhs, r, yt);
                    }
                }
            }
        }
    }

    /// The input position (iy·w + column slot) in the transposed input that tap (ki, kj) of output
    /// position `pos` reads (the tap inside the map).
    fn input_pos(&self, pos: usize, ki: usize, kj: usize) -> usize {
        let g = self.g;
        let (oy, ox) = (pos / g.ow, pos % g.ow);
        let iy = oy * g.stride + ki * g.dilation - g.padding;
        let ix = ox * g.stride + kj * g.dilation - g.padding;
        iy * g.w + column_slot(g, ix)
    }

    /// Tap (ki, kj) of weight panel j (its n channels at `rhs`) for the positions of `run`.
    fn call(&self, j: usize, n: usize, (ki, kj): (usize, usize), rhs: *const f32, run: Run, yt: OutPtr) {
        let Run { first, len, status } = run;
        let g = self.g;
        let p = g.p();
        let lhs = self.xt[self.input_pos(first, ki, kj) * LANES..].as_ptr();
        // One position: its images. Several: all 16 lanes of each (lanes past the group's
        // images hold zeros in, and give unread zeros out).
        let m = if len == 1 { self.lanes } else { len * LANES };
        // SAFETY: the kernel reads m lanes at lhs + ci·channel_stride for ci < c, inside xt: the
        // len input positions read are inside the map (the tap is inside for each output
        // position, and they are consecutive); n values at rhs + ci·taps·NR for ci < c (inside panel j);
        // and writes m lanes × n channels of these positions' tiles in yt (channels j·NR.. < o,
        // positions first..first + len < p). Threads own disjoint channels.
        unsafe {
            kernel(len, m, n)(
                m,
                n,
                g.c,
                yt.0.add((j * NR * p + first) * LANES),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) from a fixed xorshift sequence.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `f(y index, x index, weight index)` for every product of the convolution: each output
    /// (image, channel, row, column), input channel and kernel tap inside the image.
    fn for_each_product(g: &Geometry, mut f: impl FnMut(usize, usize, usize)) {
        for b in 0..g.n {
            for oc in 0..g.o {
                for (oy, ox) in (0..g.oh).flat_map(|oy| (0..g.ow).map(move |ox| (oy, ox))) {
                    let yi = ((b * g.o + oc) * g.oh + oy) * g.ow + ox;
                    for ci in 0..g.c {
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                let iy = (oy * g.stride + ki * g.dilation) as isize - g.padding as isize;
                                let ix = (ox * g.stride + kj * g.dilation) as isize - g.padding as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                    let xi = ((b * g.c + ci) * g.h + iy as usize) * g.w + ix as usize;
                                    f(yi, xi, ((oc * g.c + ci) * g.kh + ki) * g.kw + kj);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Direct convolution in f64: y (n, o, oh, ow).
    fn direct_forward(g: &Geometry, x: &[f32], wt: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; g.n * g.o * g.p()];
        for_each_product(g, |yi, xi, wi| y[yi] += x[xi] as f64 * wt[wi] as f64);
        y
    }

    /// Direct input gradient in f64: dx (n, c, h, w) of sum(y · dy).
    fn direct_input_grad(g: &Geometry, dy: &[f32], wt: &[f32]) -> Vec<f64> {
        let mut dx = vec![0f64; g.n * g.c * g.h * g.w];
        for_each_product(g, |yi, xi, wi| dx[xi] += dy[yi] as f64 * wt[wi] as f64);
        dx
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        let err = got.iter().zip(want).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        assert!(err / scale < 1e-5, "{what}: relative error {}", err / scale);
    }

    /// Geometries on the lane path: (n, c, h, w, o, k, stride, padding, dilation).
    const CASES: &[[usize; 9]] = &[
        [16, 16, 8, 8, 19, 3, 1, 1, 1], // runs of four on 8 columns; 19 channels: a 1-channel panel
        [21, 20, 4, 4, 17, 3, 1, 1, 1], // a full group and one of 5 images (runs over unused lanes)
        [9, 16, 7, 5, 16, 3, 1, 1, 1],  // odd rows: runs of 4 and 1 per row, 9 lanes
        [9, 16, 7, 5, 6, 3, 2, 1, 1],   // stride 2: one position per call
        [12, 17, 6, 6, 16, 3, 1, 2, 2], // dilation 2
        [8, 16, 2, 2, 16, 3, 1, 1, 1],  // 2×2 map: the first tap differs between the two columns
        [8, 16, 2, 2, 5, 3, 1, 3, 1],   // positions with no tap inside
        [8, 16, 8, 8, 16, 3, 1, 0, 1],  // no padding: 6 of 8 columns, runs must stop at a row's end
        [16, 16, 8, 8, 24, 3, 2, 1, 1], // stride 2 on columns stored by phase: runs of four
        [9, 16, 7, 7, 16, 3, 3, 1, 1],  // stride 3, an odd map: phases of 3, 2 and 2 columns
        [10, 24, 5, 5, 18, 5, 1, 2, 1], // 5×5 kernel
    ];

    /// Every kernel family this CPU has gives the direct convolution's values and input gradient,
    /// and the 512-bit runs give exactly the 256-bit path's bits.
    #[test]
    fn kernel_families_match_direct_convolution_and_each_other() {
        let families: Vec<Kernels> = [Kernels::Avx2, Kernels::Avx512].into_iter().filter(|k| k.supported()).collect();
        for missing in [Kernels::Avx2, Kernels::Avx512].iter().filter(|k| !families.contains(k)) {
            eprintln!("skipped: lane convolutions on {missing:?} (this CPU lacks the instructions)");
        }
        for (i, &[n, c, h, w, o, k, stride, pad, dil]) in CASES.iter().enumerate() {
            let g = Geometry::new(&[n, c, h, w], &[o, c, k, k], stride, pad, dil).unwrap();
            assert!(g.h * g.w <= 64 && g.c >= 16 && g.n >= 8, "case {i} is not on the lane path");
            let x = values(n * c * h * w, 2 * i as u64);
            let wt = values(o * c * k * k, 2 * i as u64 + 1);
            let dy = values(g.n * g.o * g.p(), 7 + i as u64);
            let want_y = direct_forward(&g, &x, &wt);
            let want_dx = direct_input_grad(&g, &dy, &wt);
            let mut first: Option<(Vec<f32>, Option<Vec<f32>>)> = None;
            for &kernels in &families {
                for threads in [1, 2] {
                    let what = format!("case {i} {kernels:?} {threads} threads");
                    let y = forward_packed(&g, &x, &PackedWeights::new(&g, &wt), threads, None, kernels);
                    assert_close(&y, &want_y, &format!("{what}: forward"));
                    let dx = input_grad_with(&g, &dy, &wt, threads, kernels);
                    if let Some(dx) = &dx {
                        assert_close(dx, &want_dx, &format!("{what}: input gradient"));
                    }
                    assert_eq!(
                        dx.is_some(),
                        stride == 1 && pad <= dil * (k - 1) && o >= 16,
                        "{what}: input gradient path"
                    );
                    match &first {
                        None => first = Some((y, dx)),
                        Some((y0, dx0)) => {
                            assert!(y0.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: forward bits");
                            assert_eq!(
                                dx0.as_ref().map(|d| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
                                dx.as_ref().map(|d| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
                                "{what}: input-gradient bits"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn column_slots_are_a_permutation_with_each_phase_in_order() {
        for (w, stride) in [(8, 1), (8, 2), (7, 2), (5, 3), (7, 3), (2, 2), (1, 2)] {
            let g = Geometry::new(&[1, 1, 1, w], &[1, 1, 1, 1], stride, 0, 1).unwrap();
            let slots: Vec<usize> = (0..w).map(|ix| column_slot(&g, ix)).collect();
            let mut sorted = slots.clone();
            sorted.sort();
            assert_eq!(sorted, (0..w).collect::<Vec<_>>(), "w {w} stride {stride}: {slots:?}");
            for ix in 0..w.saturating_sub(stride) {
                assert_eq!(slots[ix + stride], slots[ix] + 1, "w {w} stride {stride}: {slots:?}");
            }
        }
    }

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
