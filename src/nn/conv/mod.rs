//! A fast 2-D convolution for f32 tensors on the CPU: im2col + GEMM for the forward pass, GEMM +
//! col2im for the input gradient and im2col + GEMM for the weight gradient.
//!
//! Why: candle 0.11 computes the input gradient of `conv2d` with a direct-loop `conv_transpose2d`
//! that is 4-8× slower than PyTorch, and that single op dominated a ResNet training step on the
//! CPU. Every product here goes through the `gemm` crate (the one candle's matmul uses).
//! 1×1 stride-1 convolutions skip im2col: the input already is the column matrix.
//! On maps of 8×8 or less (x86-64) the forward pass and the stride-1 input gradient instead put
//! the batch in the vector lanes and skip the taps in the zero padding (`conv/lanes.rs`).
//! On other devices or dtypes [`conv2d`] falls back to candle's own `Tensor::conv2d`, so GPU
//! training is unchanged. Only `groups = 1` (all that torchvision's ResNets use).

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;

use super::cpu::{f32_slice, zeros};
use super::error::{NnError, Result};
use super::grad::grad_enabled;

/// Defined beside the other CPU fast-path checks in `nn::cpu` (which every fused layer uses);
/// public here, where the benchmarks look for it.
pub use super::cpu::fast_paths_enabled;

mod depthwise;
mod lanes;

pub use depthwise::{depthwise_conv2d, depthwise_conv2d_candle, pad_for_candle, Padding};
pub use lanes::{kernels as lane_kernels, Kernels as LaneKernels};

/// Convolution geometry for one call: input (n, c, h, w), weight (o, c, kh, kw).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &[usize], k: &[usize], stride: usize, padding: usize, dilation: usize) -> Result<Self> {
        let bad = |msg: String| Err(NnError::InvalidInput(msg));
        if x.len() != 4 || k.len() != 4 {
            return bad(format!("conv2d expects a (N, C, H, W) input and (O, C, KH, KW) weight, got {x:?} and {k:?}"));
        }
        if x[1] != k[1] {
            return bad(format!("conv2d: the input has {} channels but the weight expects {}", x[1], k[1]));
        }
        if stride == 0 || dilation == 0 {
            return bad(format!("conv2d: stride ({stride}) and dilation ({dilation}) must be at least 1"));
        }
        let span = |k: usize| dilation * (k - 1) + 1;
        let (ph, pw) = (x[2] + 2 * padding, x[3] + 2 * padding);
        if k[2] == 0 || k[3] == 0 || ph < span(k[2]) || pw < span(k[3]) {
            return bad(format!(
                "conv2d: kernel {}x{} with dilation {dilation} does not fit the padded input {ph}x{pw}",
                k[2], k[3]
            ));
        }
        Ok(Self {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: k[0],
            kh: k[2],
            kw: k[3],
            stride,
            padding,
            dilation,
            oh: (ph - span(k[2])) / stride + 1,
            ow: (pw - span(k[3])) / stride + 1,
        })
    }

    /// Rows of the column matrix: c * kh * kw.
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image.
    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// A 1×1, stride-1, unpadded convolution: the input image is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Stride 1 with an output as large as the input: see [`Shift`].
    fn same_size(&self) -> bool {
        self.stride == 1 && self.oh == self.h && self.ow == self.w
    }

    /// Images per GEMM: enough that the GEMM's column count (chunk * p) is not tiny (the deep
    /// layers of a 64×64 ResNet have 2×2 maps), one image otherwise (less memory, and the result
    /// lands in place without a scatter).
    fn chunk(&self) -> usize {
        const MIN_COLS: usize = 256;
        MIN_COLS.div_ceil(self.p()).clamp(1, self.n.max(1))
    }
}

/// How a GEMM inside one part of the batch may use threads: the threads the parts leave over.
fn inner_parallelism(threads: usize, parts: usize) -> Parallelism {
    let per_part = threads / parts.max(1);
    if per_part > 1 {
        Parallelism::Rayon(per_part)
    } else {
        Parallelism::None
    }
}

/// Splits images `0..n` into at most `max_parts` contiguous ranges of whole chunks (`g.chunk()`
/// images per GEMM). The chunks depend on the geometry alone, so every GEMM sees the same operands
/// whatever the thread count: only which thread runs it changes.
fn image_parts(g: &Geometry, max_parts: usize) -> Vec<Range<usize>> {
    let chunk = g.chunk();
    let chunks = g.n.div_ceil(chunk);
    let parts = max_parts.clamp(1, chunks.max(1));
    (0..parts).map(|i| (i * chunks / parts * chunk).min(g.n)..((i + 1) * chunks / parts * chunk).min(g.n)).collect()
}

/// The most partial weight gradients one call sums (a fixed number, not the thread count, so the
/// sum's rounding is the same on every machine and under every `--jobs`).
const WEIGHT_GRAD_PARTS: usize = 4;

/// Runs `f(images, out)` for each part of the batch in parallel, `out` being the part's slice of
/// `buf` (`per_image` values per image).
fn for_each_part(
    parts: &[Range<usize>],
    buf: &mut [f32],
    per_image: usize,
    f: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    if let [only] = parts {
        return f(only.clone(), buf);
    }
    // Only reached with several threads (parts ≤ threads).
    let mut slices = Vec::with_capacity(parts.len());
    let mut rest = buf;
    for r in parts {
        let (head, tail) = rest.split_at_mut(r.len() * per_image);
        slices.push((r.clone(), head));
        rest = tail;
    }
    slices.into_par_iter().for_each(|(r, out)| f(r, out));
}

thread_local! {
    /// Per-thread scratch for column matrices and chunk results: reused from call to call, so the
    /// largest temporaries of a step are neither allocated nor zeroed again.
    static COL: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static TMP: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's two scratch buffers of at least `col_len` and `tmp_len` values
/// (contents unspecified). Taken out of the thread-local while in use: a nested call (rayon may run
/// another part on this thread while a GEMM waits) simply gets fresh buffers.
fn with_scratch<R>(col_len: usize, tmp_len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let (mut col, mut tmp) = (COL.take(), TMP.take());
    if col.len() < col_len {
        col.resize(col_len, 0.0);
    }
    if tmp.len() < tmp_len {
        tmp.resize(tmp_len, 0.0);
    }
    let r = f(&mut col[..col_len], &mut tmp[..tmp_len]);
    COL.set(col);
    TMP.set(tmp);
    r
}

/// Row-major matrix view: data, row stride, column stride.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

// A BLAS-style signature: the sizes and the three matrices read best side by side.
#[allow(clippy::too_many_arguments)]
/// dst (m × n, row-major with row stride `dst_rs`) = a (m × k) · b (k × n), or += when `accumulate`.
fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds the raw-pointer GEMM below relies on.
    assert!(k == 0 || (a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs));
    assert!(k == 0 || (b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs));
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the GEMM touches inside the slices; `dst` is
    // borrowed mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Writes the column matrix of images `first..first + count` of `x` into `col`
/// ((c·kh·kw) × (count·p), row-major): col[(ci, ki, kj), (img, oy, ox)] = x[img, ci, iy, ix]
/// with iy = oy·s − pad + ki·d (zero outside the image). With `par`, the channels are shared
/// between threads (for a chunk that has the whole call to itself).
fn im2col(g: &Geometry, x: &[f32], first: usize, count: usize, col: &mut [f32], par: bool) {
    let rows_per_channel = g.kh * g.kw * count * g.p();
    let col = &mut col[..g.c * rows_per_channel];
    if par {
        col.par_chunks_mut(rows_per_channel)
            .enumerate()
            .for_each(|(ci, rows)| im2col_channel(g, x, first, count, ci, rows));
    } else {
        for (ci, rows) in col.chunks_mut(rows_per_channel).enumerate() {
            im2col_channel(g, x, first, count, ci, rows);
        }
    }
}

/// The kh·kw rows of channel `ci` of [`im2col`]'s column matrix.
fn im2col_channel(g: &Geometry, x: &[f32], first: usize, count: usize, ci: usize, rows: &mut [f32]) {
    let (p, cols) = (g.p(), count * g.p());
    let img_len = g.c * g.h * g.w;
    if g.same_size() {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let shift = Shift::new(g, ki, kj);
                let row = ki * g.kw + kj;
                for img in 0..count {
                    let plane = &x[(first + img) * img_len + ci * p..][..p];
                    shift.copy(g, plane, &mut rows[row * cols + img * p..][..p]);
                }
            }
        }
        return;
    }
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            let row = ki * g.kw + kj;
            let dst_row = &mut rows[row * cols..(row + 1) * cols];
            let (ox_lo, ox_hi) = valid_range(g.ow, g.w, g.stride, g.padding, kj * g.dilation);
            for img in 0..count {
                let plane = &x[(first + img) * img_len + ci * g.h * g.w..][..g.h * g.w];
                let dst_img = &mut dst_row[img * p..(img + 1) * p];
                for oy in 0..g.oh {
                    let dst = &mut dst_img[oy * g.ow..(oy + 1) * g.ow];
                    let iy = (oy * g.stride + ki * g.dilation) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.h as isize || ox_lo >= ox_hi {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    dst[..ox_lo].fill(0.0);
                    dst[ox_hi..].fill(0.0);
                    let ix0 = ox_lo * g.stride + kj * g.dilation - g.padding;
                    if g.stride == 1 {
                        dst[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
                    } else {
                        gather_strided(&mut dst[ox_lo..ox_hi], &src[ix0..], g.stride);
                    }
                }
            }
        }
    }
}

/// dst[i] = src[i·stride]. Stride 2 (every strided convolution of a ResNet) as pairs, which
/// the compiler vectorises with shuffles; an index `i·stride` with a run-time stride kept a bounds
/// check and one scalar copy per value.
fn gather_strided(dst: &mut [f32], src: &[f32], stride: usize) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    if stride == 2 {
        let pairs = &src[..2 * (n - 1)];
        for (d, pair) in dst[..n - 1].iter_mut().zip(pairs.chunks_exact(2)) {
            *d = pair[0];
        }
        dst[n - 1] = src[2 * (n - 1)];
    } else {
        for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
            *d = *s;
        }
    }
}

/// dst[i·stride] += src[i], the reverse of [`gather_strided`] (stride 2 as pairs, likewise).
fn scatter_add_strided(dst: &mut [f32], src: &[f32], stride: usize) {
    let n = src.len();
    if n == 0 {
        return;
    }
    if stride == 2 {
        for (pair, s) in dst[..2 * (n - 1)].chunks_exact_mut(2).zip(src) {
            pair[0] += *s;
        }
        dst[2 * (n - 1)] += src[n - 1];
    } else {
        for (d, s) in dst.iter_mut().step_by(stride).zip(src) {
            *d += *s;
        }
    }
}

/// The inverse scatter of [`im2col`]: adds col's entries into dx, whose image 0 is image `first`
/// of the chunk (`count` images).
fn col2im(g: &Geometry, col: &mut [f32], count: usize, dx: &mut [f32]) {
    let (p, cols) = (g.p(), count * g.p());
    let img_len = g.c * g.h * g.w;
    if g.same_size() {
        for ci in 0..g.c {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let shift = Shift::new(g, ki, kj);
                    let row = (ci * g.kh + ki) * g.kw + kj;
                    for img in 0..count {
                        let plane = &mut dx[img * img_len + ci * p..][..p];
                        shift.add_back(g, &mut col[row * cols + img * p..][..p], plane);
                    }
                }
            }
        }
        return;
    }
    for ci in 0..g.c {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (ci * g.kh + ki) * g.kw + kj;
                let src_row = &col[row * cols..(row + 1) * cols];
                let (ox_lo, ox_hi) = valid_range(g.ow, g.w, g.stride, g.padding, kj * g.dilation);
                if ox_lo >= ox_hi {
                    continue;
                }
                for img in 0..count {
                    let plane = &mut dx[img * img_len + ci * g.h * g.w..][..g.h * g.w];
                    let src_img = &src_row[img * p..(img + 1) * p];
                    for oy in 0..g.oh {
                        let iy = (oy * g.stride + ki * g.dilation) as isize - g.padding as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let src = &src_img[oy * g.ow + ox_lo..oy * g.ow + ox_hi];
                        let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        let ix0 = ox_lo * g.stride + kj * g.dilation - g.padding;
                        if g.stride == 1 {
                            for (d, s) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                                *d += *s;
                            }
                        } else {
                            scatter_add_strided(&mut dst[ix0..], src, g.stride);
                        }
                    }
                }
            }
        }
    }
}

/// One kernel tap (ki, kj) of a "same-size" convolution (stride 1, output as large as the input,
/// e.g. every 3×3 convolution with padding 1 and every dilated one with padding = dilation): its
/// column-matrix row is the input plane shifted by `offset` positions, with zeros where the tap
/// falls outside the image. So one contiguous copy replaces a copy per output row (a 16×16 map
/// made 16 `memcpy` calls of 16 values); the values that the flat shift wraps around from the
/// neighbouring row land exactly in the border columns, which are then zeroed.
struct Shift {
    /// Input index − output index: (ki·d − pad)·w + (kj·d − pad).
    offset: isize,
    /// Output rows `rows.0..rows.1` have their input row inside the image.
    rows: (usize, usize),
    /// Output columns `cols.0..cols.1` have their input column inside the image.
    cols: (usize, usize),
}

impl Shift {
    fn new(g: &Geometry, ki: usize, kj: usize) -> Self {
        let dy = (ki * g.dilation) as isize - g.padding as isize;
        let dx = (kj * g.dilation) as isize - g.padding as isize;
        let span = |len: usize, d: isize| {
            ((-d).clamp(0, len as isize) as usize, (len as isize - d).clamp(0, len as isize) as usize)
        };
        let (rows, cols) = (span(g.h, dy), span(g.w, dx));
        Self { offset: dy * g.w as isize + dx, rows, cols: if cols.0 < cols.1 { cols } else { (0, 0) } }
    }

    /// The output positions `a..b` whose flat input index `q + offset` lies inside the plane,
    /// within the output rows that are inside the image.
    fn flat_range(&self, g: &Geometry) -> (usize, usize) {
        let (q0, q1) = (self.rows.0 * g.w, self.rows.1 * g.w);
        let a = (q0 as isize).max(-self.offset) as usize;
        let b = (q1 as isize).min((g.h * g.w) as isize - self.offset).max(a as isize) as usize;
        (a.min(q1), b.min(q1).max(a.min(q1)))
    }

    /// Zeroes the output positions whose input is outside the image: rows above and below, and
    /// the border columns of the rows in between.
    fn zero_outside(&self, g: &Geometry, dst: &mut [f32]) {
        let w = g.w;
        dst[..self.rows.0 * w].fill(0.0);
        dst[self.rows.1 * w..].fill(0.0);
        // Border columns (as many as the padding, usually 1) one strided column at a time: a
        // per-row fill would be a `memset` call for one or two values.
        let inside = &mut dst[self.rows.0 * w..self.rows.1 * w];
        if inside.is_empty() {
            return;
        }
        for col in (0..self.cols.0).chain(self.cols.1..w) {
            for v in inside[col..].iter_mut().step_by(w) {
                *v = 0.0;
            }
        }
    }

    /// dst (one image's row of the column matrix) from the input plane.
    fn copy(&self, g: &Geometry, plane: &[f32], dst: &mut [f32]) {
        let (a, b) = self.flat_range(g);
        if a < b {
            let s = (a as isize + self.offset) as usize;
            dst[a..b].copy_from_slice(&plane[s..s + (b - a)]);
        }
        // Positions of the inside rows not covered by the flat copy are border columns too.
        dst[self.rows.0 * g.w..a.max(self.rows.0 * g.w)].fill(0.0);
        dst[b.min(self.rows.1 * g.w).max(self.rows.0 * g.w)..self.rows.1 * g.w].fill(0.0);
        self.zero_outside(g, dst);
    }

    /// The reverse of [`Shift::copy`]: adds src's entries for inside positions into the plane
    /// (src's border entries are zeroed first, so the flat add brings nothing in from them).
    fn add_back(&self, g: &Geometry, src: &mut [f32], plane: &mut [f32]) {
        self.zero_outside(g, src);
        let (a, b) = self.flat_range(g);
        if a < b {
            let s = (a as isize + self.offset) as usize;
            for (d, v) in plane[s..s + (b - a)].iter_mut().zip(&src[a..b]) {
                *d += *v;
            }
        }
    }
}

/// Output columns `ox_lo..ox_hi` whose input column `ox·s − pad + offset` lies inside `0..w`.
pub(super) fn valid_range(ow: usize, w: usize, stride: usize, padding: usize, offset: usize) -> (usize, usize) {
    // ix >= 0  ⇔  ox·s >= pad − offset
    let lo = padding.saturating_sub(offset).div_ceil(stride);
    // ix <= w − 1  ⇔  ox·s <= w − 1 + pad − offset
    let hi = if w + padding > offset { ((w - 1 + padding - offset) / stride + 1).min(ow) } else { 0 };
    (lo.min(ow), hi.max(lo.min(ow)))
}

/// Copies a (rows × (count·p)) chunk matrix into `count` images of `rows` planes of p values
/// (`out` starts at the chunk's first image), or gathers the reverse.
fn scatter_chunk(rows: usize, p: usize, count: usize, chunk: &[f32], out: &mut [f32]) {
    let cols = count * p;
    for img in 0..count {
        for r in 0..rows {
            out[(img * rows + r) * p..][..p].copy_from_slice(&chunk[r * cols + img * p..][..p]);
        }
    }
}

fn gather_chunk(rows: usize, p: usize, count: usize, src: &[f32], chunk: &mut [f32]) {
    let cols = count * p;
    for img in 0..count {
        for r in 0..rows {
            chunk[r * cols + img * p..][..p].copy_from_slice(&src[(img * rows + r) * p..][..p]);
        }
    }
}

/// Scratch lengths of a part's loop: the column matrix (none for one-image pointwise chunks)
/// and the chunk results of several images.
fn scratch_lens(g: &Geometry) -> (usize, usize) {
    let (p, chunk) = (g.p(), g.chunk());
    let col = if g.pointwise() && chunk == 1 { 0 } else { g.ckk() * chunk * p };
    (col, if chunk > 1 { g.o * chunk * p } else { 0 })
}

/// dy of images `first..first + count` as an (o × count·p) matrix: read in place for one image,
/// gathered into `tmp` for several.
fn dy_chunk<'a>(g: &Geometry, dy: &'a [f32], first: usize, count: usize, tmp: &'a mut [f32]) -> Mat<'a> {
    let p = g.p();
    if count == 1 {
        Mat { data: &dy[first * g.o * p..], rs: p, cs: 1 }
    } else {
        gather_chunk(g.o, p, count, &dy[first * g.o * p..], tmp);
        Mat { data: tmp, rs: count * p, cs: 1 }
    }
}

/// The chunks (first image, image count) of a part of the batch.
fn chunks_of(g: &Geometry, images: Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    let chunk = g.chunk();
    images.clone().step_by(chunk).map(move |first| (first, chunk.min(images.end - first)))
}

/// Forward: y (n, o, oh, ow) from x (n, c, h, w) and weight (o, c·kh·kw).
/// A per-output-channel `y·scale + shift` (then `max(·, 0)` when `relu`) applied to each chunk of
/// a convolution's output right after its GEMM, while it is still in cache: evaluation-mode
/// BatchNorm(+ReLU) fused into the convolution for inference (one pass over the activations and
/// one buffer fewer per layer).
/// With `residual`, a ResNet block's whole tail: `max(y·scale + shift + identity, 0)`.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    /// The block's identity branch, shaped like the whole output.
    residual: Option<&'a [f32]>,
    relu: bool,
}

impl Epilogue<'_> {
    /// Applies to the (o, p) outputs of images `first..first + count`, held in `out`.
    fn apply(&self, out: &mut [f32], first: usize, count: usize, o: usize, p: usize) {
        let len = count * o * p;
        let residual = self.residual.map(|r| &r[first * o * p..][..len]);
        for (i, plane) in out[..len].chunks_exact_mut(p).enumerate() {
            let (a, b) = (self.scale[i % o], self.shift[i % o]);
            match (residual, self.relu) {
                (Some(r), _) => {
                    // The order of the unfused ops (affine, then add + ReLU): the same rounding.
                    for (v, &r) in plane.iter_mut().zip(&r[i * p..(i + 1) * p]) {
                        *v = ((*v * a + b) + r).max(0.0);
                    }
                }
                (None, true) => plane.iter_mut().for_each(|v| *v = (*v * a + b).max(0.0)),
                (None, false) => plane.iter_mut().for_each(|v| *v = *v * a + b),
            }
        }
    }
}

fn forward(g: &Geometry, x: &[f32], wt: &[f32]) -> Vec<f32> {
    forward_with(g, x, wt, None)
}

/// [`forward`], with an epilogue applied to each chunk of the output.
fn forward_with(g: &Geometry, x: &[f32], wt: &[f32], post: Option<Epilogue>) -> Vec<f32> {
    let threads = crate::runtime::cpu_threads();
    if lanes::suits(g) {
        return lanes::forward(g, x, wt, threads, post);
    }
    let per_image = g.o * g.p();
    let mut y = zeros(g.n * per_image);
    let parts = image_parts(g, threads);
    let par = inner_parallelism(threads, parts.len());
    for_each_part(&parts, &mut y, per_image, |images, out| forward_part(g, x, wt, images, out, par, post));
    y
}

/// [`forward`] for the images of one part; `out` holds their outputs.
// The GEMM's operands and the part's range and threads read best side by side.
#[allow(clippy::too_many_arguments)]
fn forward_part(
    g: &Geometry,
    x: &[f32],
    wt: &[f32],
    images: Range<usize>,
    out: &mut [f32],
    par: Parallelism,
    post: Option<Epilogue>,
) {
    let (p, ckk) = (g.p(), g.ckk());
    let wm = Mat { data: wt, rs: ckk, cs: 1 };
    let (col_len, tmp_len) = scratch_lens(g);
    let base = images.start;
    with_scratch(col_len, tmp_len, |col, tmp| {
        for (first, count) in chunks_of(g, images) {
            let cols = count * p;
            let b = if g.pointwise() && count == 1 {
                Mat { data: &x[first * ckk * p..], rs: p, cs: 1 }
            } else if g.pointwise() {
                // Pointwise with several images: the images side by side (c × count·p).
                gather_chunk(g.c, p, count, &x[first * g.c * p..], col);
                Mat { data: col, rs: cols, cs: 1 }
            } else {
                im2col(g, x, first, count, col, !matches!(par, Parallelism::None));
                Mat { data: col, rs: cols, cs: 1 }
            };
            let dst = &mut out[(first - base) * g.o * p..];
            if count == 1 {
                sgemm(g.o, cols, ckk, wm, b, dst, p, false, par);
            } else {
                sgemm(g.o, cols, ckk, wm, b, tmp, cols, false, par);
                scatter_chunk(g.o, p, count, tmp, dst);
            }
            if let Some(post) = post {
                post.apply(dst, first, count, g.o, p);
            }
        }
    });
}

/// Input gradient: dx (n, c, h, w) from dy (n, o, oh, ow) and weight (o, c·kh·kw).
fn input_grad(g: &Geometry, dy: &[f32], wt: &[f32]) -> Vec<f32> {
    let threads = crate::runtime::cpu_threads();
    if let Some(dx) = lanes::input_grad(g, dy, wt, threads) {
        return dx;
    }
    let per_image = g.c * g.h * g.w;
    let mut dx = zeros(g.n * per_image);
    let parts = image_parts(g, threads);
    let par = inner_parallelism(threads, parts.len());
    for_each_part(&parts, &mut dx, per_image, |images, out| input_grad_part(g, dy, wt, images, out, par));
    dx
}

/// [`input_grad`] for the images of one part; `dx` holds their gradients (zero on entry).
fn input_grad_part(g: &Geometry, dy: &[f32], wt: &[f32], images: Range<usize>, dx: &mut [f32], par: Parallelism) {
    let (p, ckk) = (g.p(), g.ckk());
    // Wᵀ: (c·kh·kw) × o through strides, no copy.
    let wtm = Mat { data: wt, rs: 1, cs: ckk };
    let (col_len, tmp_len) = scratch_lens(g);
    let (base, img_len) = (images.start, g.c * g.h * g.w);
    with_scratch(col_len, tmp_len, |col, tmp| {
        for (first, count) in chunks_of(g, images) {
            let cols = count * p;
            let b = dy_chunk(g, dy, first, count, tmp);
            let dst = &mut dx[(first - base) * img_len..];
            if g.pointwise() && count == 1 {
                sgemm(ckk, cols, g.o, wtm, b, dst, p, false, par);
            } else if g.pointwise() {
                sgemm(ckk, cols, g.o, wtm, b, col, cols, false, par);
                scatter_chunk(g.c, p, count, col, dst);
            } else {
                sgemm(ckk, cols, g.o, wtm, b, col, cols, false, par);
                col2im(g, col, count, dst);
            }
        }
    });
}

/// Weight gradient: dw (o, c·kh·kw) = Σ over images of dy_img (o × p) · col_imgᵀ (p × c·kh·kw).
/// Up to [`WEIGHT_GRAD_PARTS`] parts of the batch each sum their own partial gradient in
/// parallel; the partials are then added in order.
fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let len = g.o * g.ckk();
    let threads = crate::runtime::cpu_threads();
    let parts = image_parts(g, WEIGHT_GRAD_PARTS);
    let par = inner_parallelism(threads, parts.len());
    let mut partials = zeros(parts.len() * len);
    let part = |(dw, images): (&mut [f32], &Range<usize>)| weight_grad_part(g, x, dy, images.clone(), dw, par);
    if threads == 1 || parts.len() == 1 {
        partials.chunks_mut(len).zip(&parts).for_each(part);
    } else {
        partials.par_chunks_mut(len).zip(parts.par_iter()).for_each(part);
    }
    let (dw, rest) = partials.split_at_mut(len);
    for partial in rest.chunks_exact(len) {
        for (d, s) in dw.iter_mut().zip(partial) {
            *d += *s;
        }
    }
    partials.truncate(len);
    partials
}

/// The weight gradient of the images of one part, written into `dw`.
fn weight_grad_part(g: &Geometry, x: &[f32], dy: &[f32], images: Range<usize>, dw: &mut [f32], par: Parallelism) {
    let (p, ckk) = (g.p(), g.ckk());
    let (col_len, tmp_len) = scratch_lens(g);
    let start = images.start;
    with_scratch(col_len, tmp_len, |col, tmp| {
        for (first, count) in chunks_of(g, images) {
            let cols = count * p;
            let a = dy_chunk(g, dy, first, count, tmp);
            // colᵀ: (count·p) × (c·kh·kw) through strides.
            let b = if g.pointwise() && count == 1 {
                Mat { data: &x[first * ckk * p..], rs: 1, cs: p }
            } else {
                if g.pointwise() {
                    gather_chunk(g.c, p, count, &x[first * g.c * p..], col);
                } else {
                    im2col(g, x, first, count, col, !matches!(par, Parallelism::None));
                }
                Mat { data: col, rs: 1, cs: cols }
            };
            sgemm(g.o, ckk, cols, a, b, dw, ckk, first > start, par);
        }
    });
}

/// The output gradient handed to a backward op must have the convolution's output shape.
fn check_output_grad(op: &str, dims: &[usize], g: &Geometry) -> candle_core::Result<()> {
    if dims != [g.n, g.o, g.oh, g.ow] {
        candle_core::bail!("{op}: gradient shape {dims:?} does not match the output {:?}", (g.n, g.o, g.oh, g.ow));
    }
    Ok(())
}

fn geometry(x: &[usize], k: &[usize], op: &Conv2dOp) -> candle_core::Result<Geometry> {
    Geometry::new(x, k, op.stride, op.padding, op.dilation).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// The differentiable convolution (x, weight) → y.
#[derive(Clone, Copy, Debug)]
struct Conv2dOp {
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "mpcs-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geometry(l1.dims(), l2.dims(), self)?;
        let y = forward(&g, f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // An input that tracks no gradient (the image batch into the stem) needs no input gradient:
        // skipping it saves the largest col2im of the network.
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &InputGrad { op: *self, x_dims: x.dims4()? })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&dy, &WeightGrad { op: *self, w_dims: w.dims4()? })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// (dy, weight) → dx.
struct InputGrad {
    op: Conv2dOp,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "mpcs-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = self.x_dims;
        let g = geometry(&[n, c, h, w], l2.dims(), &self.op)?;
        check_output_grad(self.name(), l1.dims(), &g)?;
        let dx = input_grad(&g, f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims)))
    }
}

/// (x, dy) → dweight.
struct WeightGrad {
    op: Conv2dOp,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "mpcs-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (o, c, kh, kw) = self.w_dims;
        let g = geometry(l1.dims(), &[o, c, kh, kw], &self.op)?;
        check_output_grad(self.name(), l2.dims(), &g)?;
        let dw = weight_grad(&g, f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        Ok((CpuStorage::F32(dw), Shape::from(self.w_dims)))
    }
}

/// `groups = 1` convolution of x (N, C, H, W) with weight (O, C, KH, KW), no bias, as
/// `torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)`.
/// f32 on the CPU takes the im2col + GEMM path; anything else candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    // Validates the shapes (clear errors instead of candle's) on every path.
    Geometry::new(x.dims(), w.dims(), stride, padding, dilation)?;
    // Under bf16 autocast (`nn::precision`): candle's convolution on bf16 copies, output back in f32.
    super::precision::with_compute_dtype(x, w, |x, w| conv2d_as_is(x, w, stride, padding, dilation))
}

/// [`conv2d`] in the dtype of its arguments.
fn conv2d_as_is(x: &Tensor, w: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    let fast =
        fast_paths_enabled() && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !fast || x.elem_count() == 0 || w.elem_count() == 0 {
        if !grad_enabled() {
            return Ok(x.detach().conv2d(&w.detach(), padding, stride, dilation, 1)?);
        }
        return Ok(x.conv2d(w, padding, stride, dilation, 1)?);
    }
    let op = Conv2dOp { stride, padding, dilation };
    if !grad_enabled() {
        return Ok(x.detach().contiguous()?.apply_op2_no_bwd(&w.detach().contiguous()?, &op)?);
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// `conv2d(x, w)` followed by a per-output-channel `y·scale + shift`, plus `residual` when given,
/// and `max(·, 0)` when `relu` (always with a residual): an evaluation-mode BatchNorm(+ReLU) after
/// a convolution, or a ResNet block's tail. Inside [`crate::nn::no_grad`] on the CPU fast path it
/// is one fused pass (see `Epilogue`) that records no graph; elsewhere the convolution followed by
/// broadcast ops.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_channel_affine(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    scale: &Tensor,
    shift: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let g = Geometry::new(x.dims(), w.dims(), stride, padding, dilation)?;
    let relu = relu || residual.is_some();
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let shapes_ok = scale.dims() == [g.o]
        && shift.dims() == [g.o]
        && residual.is_none_or(|r| r.dims() == [g.n, g.o, g.oh, g.ow] && f32_cpu(r));
    let fast = fast_paths_enabled()
        && [x, w, scale, shift].into_iter().all(f32_cpu)
        && shapes_ok
        && super::precision::cast_to(x).is_none();
    if fast && !grad_enabled() && x.elem_count() > 0 && w.elem_count() > 0 {
        let (x, w) = (x.detach().contiguous()?, w.detach().contiguous()?);
        let (scale, shift) = (scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?);
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        let bad = || NnError::InvalidInput("conv2d: expected contiguous f32 CPU tensors".into());
        let y = super::cpu::with_f32(&x, |xs| {
            super::cpu::with_f32(&w, |ws| {
                let run = |r: Option<&[f32]>| {
                    let post = Epilogue { scale: &scale, shift: &shift, residual: r, relu };
                    forward_with(&g, xs, ws, Some(post))
                };
                match &residual {
                    Some(r) => super::cpu::with_f32(r, |rs| run(Some(rs))),
                    None => Some(run(None)),
                }
            })
        })
        .flatten()
        .flatten()
        .ok_or_else(bad)?;
        return Ok(Tensor::from_vec(y, (g.n, g.o, g.oh, g.ow), x.device())?);
    }
    let y = conv2d(x, w, stride, padding, dilation)?;
    let (scale, shift) = if grad_enabled() { (scale.clone(), shift.clone()) } else { (scale.detach(), shift.detach()) };
    let shape = (1, g.o, 1, 1);
    let y = y.broadcast_mul(&scale.reshape(shape)?)?.broadcast_add(&shift.reshape(shape)?)?;
    let y = match residual {
        Some(r) => (y + r)?,
        None => y,
    };
    Ok(if relu { y.relu()? } else { y })
}

/// candle's own convolution (the reference the fast path is tested against, and the GPU path).
pub fn conv2d_candle(x: &Tensor, w: &Tensor, stride: usize, padding: usize, dilation: usize) -> Result<Tensor> {
    Ok(x.conv2d(w, padding, stride, dilation, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for w in 1..9 {
            for s in 1..4 {
                for pad in 0..4 {
                    for off in 0..7 {
                        let ow = 12;
                        let (lo, hi) = valid_range(ow, w, s, pad, off);
                        for ox in 0..ow {
                            let ix = (ox * s + off) as isize - pad as isize;
                            let inside = ix >= 0 && ix < w as isize;
                            assert_eq!(inside, ox >= lo && ox < hi, "w {w} s {s} pad {pad} off {off} ox {ox}");
                        }
                    }
                }
            }
        }
    }
}
