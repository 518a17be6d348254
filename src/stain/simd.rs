//! 8-pixel kernels for the per-pixel colour maths of the normalisers, with branch-free `exp`, `ln`
//! and cube root, compiled three times and chosen at run time: AVX-512 (F, DQ, VL), AVX2 + FMA, and
//! the baseline x86-64 (or whatever the target has).
//!
//! The kernels are plain Rust over `[f64; 8]` lanes that LLVM vectorises for the enabled features.
//! Rust never contracts `a * b + c` into a fused multiply-add and every reduction keeps its eight
//! lanes apart until a fixed-order final sum, so all three builds give bit-identical results (the
//! `levels_agree` test checks it on whatever levels the CPU has). Callers pass reusable buffers:
//! nothing is allocated per pixel.
//!
//! Accuracy (tests below): `exp` within 2.2e-16 relative of libm, `ln` within 5e-16 absolute near
//! 1 and 2.3e-16 relative elsewhere, the cube root within 4.5e-16 relative.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod lab512;

/// Pixels per kernel step.
pub const W: usize = 8;
/// One value per pixel of an 8-pixel block.
pub type V = [f64; W];

/// Instruction-set level of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    Avx2,
    Avx512,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

    /// Whether this CPU can run the level.
    pub fn available(self) -> bool {
        match self {
            Level::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                Level::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// The level the normalisers use: the highest this CPU has, or lower when the environment variable
/// `MPCS_STAIN_SIMD` names one (`baseline`, `avx2`, `avx512`; for comparisons).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = Level::ALL.into_iter().rev().find(|l| l.available()).unwrap_or(Level::Baseline);
        match std::env::var("MPCS_STAIN_SIMD").ok().and_then(|v| Level::ALL.into_iter().find(|l| l.name() == v)) {
            Some(l) if l <= best => l,
            _ => best,
        }
    })
}

/// Defines `pub fn name(level: Level, args...)` that runs `body` compiled for `level`.
macro_rules! kernel {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name(level: Level, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match level {
                // SAFETY: a level is only used when `Level::available` found its instructions
                // (`level()` and the tests check it).
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 if Level::Avx512.available() => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 if Level::Avx2.available() => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}

// ---------------------------------------------------------------- lane maths

/// Applies a lane function. A macro, not a closure: a closure is compiled outside the kernel's
/// `#[target_feature]` function when it is not inlined, and runs on the baseline instructions.
macro_rules! lanes {
    ($f:ident($x:expr)) => {{
        let x: V = $x;
        let mut r = [0.0; W];
        for i in 0..W {
            r[i] = $f(x[i]);
        }
        r
    }};
}

/// `x` rounded to an integer as f64 and that integer plus `bias` in the low bits of a u64, for
/// |x| < 2^50: the 1.5·2^52 trick, no float↔int conversion instruction needed.
#[inline(always)]
fn round_bits(x: f64) -> (f64, u64) {
    const MAGIC: f64 = 6755399441055744.0; // 1.5 * 2^52
    let t = x + MAGIC;
    (t - MAGIC, t.to_bits().wrapping_sub(MAGIC.to_bits()))
}

/// e^x. |relative error| <= 2.2e-16 for x in [-708, 709] (clamped outside; NaN gives e^-708).
#[inline(always)]
pub fn exp8(x: V) -> V {
    lanes!(exp1(x))
}

#[inline(always)]
fn exp1(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO (6.93147180369123816490e-01 + 1.90821492927058770002e-10): the high
    // part ends in 21 zero bits, so n·LN2_HI is exact for |n| < 2^11
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    // 1/k! for k = 13..2
    const C: [f64; 12] = [
        1.0 / 6227020800.0,
        1.0 / 479001600.0,
        1.0 / 39916800.0,
        1.0 / 3628800.0,
        1.0 / 362880.0,
        1.0 / 40320.0,
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
    ];
    {
        let x = x.clamp(-708.0, 709.0);
        let (n, nb) = round_bits(x * LOG2E);
        let r = (x - n * LN2_HI) - n * LN2_LO; // |r| <= 0.347
        let mut p = C[0];
        for c in &C[1..] {
            p = p * r + c;
        }
        let p = (p * r + 1.0) * r + 1.0;
        // 2^n from the exponent bits (n in [-1022, 1023])
        p * f64::from_bits(nb.wrapping_add(1023) << 52)
    }
}

/// Natural logarithm of positive normal numbers (callers replace 0 first). |error| <= 5e-16
/// absolute for x near 1, 2.3e-16 relative elsewhere.
#[inline(always)]
pub fn ln8(x: V) -> V {
    lanes!(ln1(x))
}

#[inline(always)]
fn ln1(x: f64) -> f64 {
    const SQRT_HALF_BITS: u64 = 0x3FE6_A09E_667F_3BCD;
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const TWO52: f64 = 4503599627370496.0;
    // 1/(2k+1) for k = 9..1, of atanh's series in z = s²
    const C: [f64; 9] =
        [1.0 / 19.0, 1.0 / 17.0, 1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0];
    {
        // x = m · 2^k with m in [√½, √2)
        let ix = x.to_bits().wrapping_add(0x3FF0_0000_0000_0000 - SQRT_HALF_BITS);
        let kb = ix >> 52; // k + 1023
        let m = f64::from_bits((ix & 0x000F_FFFF_FFFF_FFFF) + SQRT_HALF_BITS);
        let k = f64::from_bits(kb | TWO52.to_bits()) - (TWO52 + 1023.0);
        // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716
        let s = (m - 1.0) / (m + 1.0);
        let z = s * s;
        let mut p = C[0];
        for c in &C[1..] {
            p = p * z + c;
        }
        let lnm = 2.0 * s + 2.0 * s * (z * p);
        k * LN2_HI + (k * LN2_LO + lnm)
    }
}

/// Cube root of positive numbers (>= 1e-300): inverse cube root from a bit-level guess (3.4%),
/// two division-free series steps, then x·y². |relative error| <= 4.5e-16.
#[inline(always)]
pub fn cbrt8(x: V) -> V {
    lanes!(cbrt1(x))
}

#[inline(always)]
fn cbrt1(x: f64) -> f64 {
    {
        // high word / 3 by a 32×32→64 multiply (vectorisable, unlike a 64-bit division)
        let hi = x.to_bits() >> 32;
        let third = (hi * 0xAAAA_AAAB) >> 33;
        let mut y = f64::from_bits((0x553E_F100u64 - third) << 32);
        // (1 - u)^(-1/3) = 1 + u/3 + 2u²/9 + 14u³/81 + 35u⁴/243 + ..., u = 1 - x·y³
        let u = 1.0 - x * (y * y * y);
        y = y + y * (u * (1.0 / 3.0 + u * (2.0 / 9.0 + u * (14.0 / 81.0 + u * (35.0 / 243.0)))));
        let u = 1.0 - x * (y * y * y);
        y = y + y * (u * (1.0 / 3.0 + u * (2.0 / 9.0)));
        x * (y * y)
    }
}

/// Scalar forms of the lane functions (tests, and the few scalar uses).
pub fn exp(x: f64) -> f64 {
    exp8([x; W])[0]
}
pub fn ln(x: f64) -> f64 {
    ln8([x; W])[0]
}
pub fn cbrt(x: f64) -> f64 {
    cbrt8([x; W])[0]
}

// ---------------------------------------------------------------- blocks of pixels

/// The bytes of one block of 8 pixels, channel by channel (in the planes: indexing them loads
/// each byte straight into a vector lane).
pub type Blk<'a> = [&'a [u8; W]; 3];

/// An image's channels as separate byte planes, padded to whole blocks with the last pixel: the
/// kernels load 8 bytes of a channel at once instead of picking them out of interleaved RGB one
/// by one (which, per pass, cost as much as the arithmetic).
#[derive(Debug, Default)]
pub struct Planes {
    pixels: usize,
    c: [Vec<u8>; 3],
}

impl Planes {
    /// Splits interleaved RGB bytes (reusing the buffers).
    pub fn fill(&mut self, level: Level, raw: &[u8]) {
        let pixels = raw.len() / 3;
        let padded = blocks(pixels) * W;
        self.pixels = pixels;
        for c in &mut self.c {
            c.resize(padded, 0);
        }
        let [r, g, b] = &mut self.c;
        deinterleave(level, &raw[..3 * pixels], &mut r[..pixels], &mut g[..pixels], &mut b[..pixels]);
        if pixels > 0 {
            for c in &mut self.c {
                let last = c[pixels - 1];
                c[pixels..].fill(last);
            }
        }
    }

    pub fn px(&self) -> Px<'_> {
        Px { pixels: self.pixels, c: [&self.c[0], &self.c[1], &self.c[2]] }
    }

    /// Bytes held (to release large buffers).
    pub fn capacity(&self) -> usize {
        self.c[0].capacity()
    }
}

/// A view of [`Planes`] (or of a run of its blocks).
#[derive(Debug, Clone, Copy)]
pub struct Px<'a> {
    pub pixels: usize,
    c: [&'a [u8]; 3],
}

impl<'a> Px<'a> {
    pub fn blocks(&self) -> usize {
        blocks(self.pixels)
    }

    /// Blocks `start..end` (clamped to the image).
    pub fn range(&self, start: usize, end: usize) -> Px<'a> {
        let end = end.min(self.blocks());
        let start = start.min(end);
        Px {
            pixels: self.pixels.min(W * end) - (W * start).min(self.pixels),
            c: [0, 1, 2].map(|c| &self.c[c][W * start..W * end]),
        }
    }

    /// Block `b` and how many of its pixels are real (the last block is padded).
    #[inline(always)]
    pub fn block(&self, b: usize) -> (Blk<'a>, usize) {
        let c = self.c;
        let lane = |k: usize| -> &'a [u8; W] { c[k][W * b..W * b + W].try_into().expect("8 bytes") };
        ([lane(0), lane(1), lane(2)], (self.pixels - W * b).min(W))
    }
}

kernel! {
    /// Splits interleaved RGB into three planes.
    pub fn deinterleave(raw: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) {
        let n = r.len().min(g.len()).min(b.len()).min(raw.len() / 3);
        let (raw, r, g, b) = (&raw[..3 * n], &mut r[..n], &mut g[..n], &mut b[..n]);
        for i in 0..n {
            r[i] = raw[3 * i];
            g[i] = raw[3 * i + 1];
            b[i] = raw[3 * i + 2];
        }
    }
}

/// Blocks covering `pixels` pixels.
pub fn blocks(pixels: usize) -> usize {
    pixels.div_ceil(W)
}

/// Per-channel first and second moments about `shift` (8 lanes kept apart, summed in a fixed order).
#[derive(Debug, Clone, Copy)]
pub struct Moments {
    pub n: usize,
    pub shift: [f64; 3],
    pub s1: [V; 3],
    pub s2: [V; 3],
}

impl Moments {
    fn new(n: usize, shift: [f64; 3]) -> Self {
        Moments { n, shift, s1: [[0.0; W]; 3], s2: [[0.0; W]; 3] }
    }

    #[inline(always)]
    fn add(&mut self, v: &[V; 3], valid: usize) {
        for c in 0..3 {
            for i in 0..W {
                let w = if i < valid { 1.0 } else { 0.0 };
                let d = (v[c][i] - self.shift[c]) * w;
                self.s1[c][i] += d;
                self.s2[c][i] += d * d;
            }
        }
    }

    /// Population mean and standard deviation per channel (numpy's `mean`, `std`).
    pub fn mean_std(&self) -> ([f64; 3], [f64; 3]) {
        let n = self.n.max(1) as f64;
        let sum = |v: &V| v.iter().sum::<f64>();
        let m1: [f64; 3] = std::array::from_fn(|c| sum(&self.s1[c]) / n);
        let mean = std::array::from_fn(|c| self.shift[c] + m1[c]);
        let std = std::array::from_fn(|c| (sum(&self.s2[c]) / n - m1[c] * m1[c]).max(0.0).sqrt());
        (mean, std)
    }
}

/// Matrix × 3 lanes.
#[inline(always)]
fn mat_v(m: &[[f64; 3]; 3], v: &[V; 3]) -> [V; 3] {
    let mut r = [[0.0; W]; 3];
    for row in 0..3 {
        for i in 0..W {
            r[row][i] = m[row][0] * v[0][i] + m[row][1] * v[1][i] + m[row][2] * v[2][i];
        }
    }
    r
}

/// Shift for [`Moments`]: the first pixel's value (close enough to the mean that the one-pass
/// variance loses nothing measurable).
#[inline(always)]
fn first_shift(b: &[V; 3]) -> [f64; 3] {
    [b[0][0], b[1][0], b[2][0]]
}

// ---------------------------------------------------------------- CIE LAB (torchstain)

/// Constants of the CIE LAB conversions.
pub struct LabConsts<'a> {
    /// sRGB → linear table of 8-bit values.
    pub lin: &'a [f64; 256],
    pub rgb2xyz: &'a [[f64; 3]; 3],
    pub white: [f64; 3],
}

/// CIE L*a*b* of every pixel of `p` into `out` (one entry per block of 8), as
/// [`super::color::linear_rgb_to_lab`]; returns their moments. On AVX-512 the hand-written
/// kernel of [`lab512`] (same bits), below that the compiler's builds of [`lab_forward_lanes`].
pub fn lab_forward(level: Level, p: Px<'_>, k: &LabConsts, out: &mut [[V; 3]]) -> Moments {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.available() {
        // SAFETY: the CPU has the kernel's instructions (checked above).
        return unsafe { lab512::lab_forward(p, k, out) };
    }
    lab_forward_lanes(level, p, k, out)
}

kernel! {
    /// [`lab_forward`] as plain lanes, compiled for each level.
    pub fn lab_forward_lanes(p: Px<'_>, k: &LabConsts, out: &mut [[V; 3]]) -> Moments {
        let pixels = p.pixels;
        let inv_white = [1.0 / k.white[0], 1.0 / k.white[1], 1.0 / k.white[2]];
        let mut m = Moments::new(pixels, [0.0; 3]);
        for (b, o) in out.iter_mut().enumerate() {
            let (px, valid) = p.block(b);
            let mut lin = [[0.0; W]; 3];
            for i in 0..W {
                for c in 0..3 {
                    lin[c][i] = k.lin[px[c][i] as usize];
                }
            }
            let xyz = mat_v(k.rgb2xyz, &lin);
            let mut f = [[0.0; W]; 3];
            for c in 0..3 {
                let mut t = [0.0; W];
                let mut tc = [0.0; W];
                for i in 0..W {
                    t[i] = xyz[c][i] * inv_white[c];
                    tc[i] = t[i].max(1e-300); // the cube-root lane must not see 0
                }
                let g = cbrt8(tc);
                for i in 0..W {
                    f[c][i] = if t[i] > 0.008856 { g[i] } else { 7.787 * t[i] + 16.0 / 116.0 };
                }
            }
            for i in 0..W {
                o[0][i] = 116.0 * f[1][i] - 16.0;
                o[1][i] = 500.0 * (f[0][i] - f[1][i]);
                o[2][i] = 200.0 * (f[1][i] - f[2][i]);
            }
            if b == 0 {
                m.shift = first_shift(o);
            }
            if valid == W {
                m.add(o, W); // constant: the padding weights fold away
            } else {
                m.add(o, valid);
            }
        }
        m
    }
}

/// Standardised LAB blocks back to linear RGB, as [`super::color::lab_to_linear_rgb`] after
/// `x · gain + shift`; `quant` turns each component into the 8-bit output in `out`. On AVX-512
/// the hand-written kernel of [`lab512`] (same bytes), below that [`lab_inverse_lanes`].
#[allow(clippy::too_many_arguments)]
pub fn lab_inverse(
    level: Level,
    lab: &[[V; 3]],
    gain: [f64; 3],
    shift: [f64; 3],
    xyz2rgb: &[[f64; 3]; 3],
    white: [f64; 3],
    quant: &super::color::SrgbQuantiser,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.available() {
        // SAFETY: the CPU has the kernel's instructions (checked above).
        return unsafe { lab512::lab_inverse(lab, gain, shift, xyz2rgb, white, quant, out) };
    }
    lab_inverse_lanes(level, lab, gain, shift, xyz2rgb, white, quant, out)
}

kernel! {
    /// [`lab_inverse`] as plain lanes, compiled for each level.
    pub fn lab_inverse_lanes(
        lab: &[[V; 3]],
        gain: [f64; 3],
        shift: [f64; 3],
        xyz2rgb: &[[f64; 3]; 3],
        white: [f64; 3],
        quant: &super::color::SrgbQuantiser,
        out: &mut [u8],
    ) {
        let pixels = out.len() / 3;
        for (b, v) in lab.iter().enumerate() {
            let mut xyz = [[0.0; W]; 3];
            for i in 0..W {
                let l = [v[0][i] * gain[0] + shift[0], v[1][i] * gain[1] + shift[1], v[2][i] * gain[2] + shift[2]];
                let y = (l[0] + 16.0) * (1.0 / 116.0);
                let x = l[1] * (1.0 / 500.0) + y;
                let z = y - l[2] * (1.0 / 200.0);
                xyz[0][i] = finv(x) * white[0];
                xyz[1][i] = finv(y) * white[1];
                xyz[2][i] = finv(z) * white[2];
            }
            let rgb = mat_v(xyz2rgb, &xyz);
            let mut q = [[0u8; W]; 3];
            for c in 0..3 {
                for i in 0..W {
                    q[c][i] = quant.quantise(rgb[c][i]);
                }
            }
            store_rgb(&q, (pixels - W * b).min(W), &mut out[3 * W * b..]);
        }
    }
}

#[inline(always)]
fn finv(t: f64) -> f64 {
    if t > 0.2068966 {
        t * t * t
    } else {
        (t - 16.0 / 116.0) * (1.0 / 7.787)
    }
}

#[inline(always)]
fn eps_if_zero(x: f64) -> f64 {
    if x == 0.0 {
        f64::EPSILON
    } else {
        x
    }
}

#[inline(always)]
fn zero_if_eps(e: f64) -> f64 {
    if e == f64::EPSILON {
        0.0
    } else {
        e
    }
}

// ---------------------------------------------------------------- Ruderman lαβ (HistomicsTK)

/// lαβ of every pixel (RGB 0..255, zero LMS replaced by machine epsilon), as
/// [`super::color::Ruderman::rgb_to_lab`]; returns their moments. On AVX-512 the hand-written
/// kernel of [`lab512`] (same bits), below that [`lab_beta_forward_lanes`].
pub fn lab_beta_forward(
    level: Level,
    p: Px<'_>,
    rgb2lms: &[[f64; 3]; 3],
    lms2lab: &[[f64; 3]; 3],
    out: &mut [[V; 3]],
) -> Moments {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.available() {
        // SAFETY: the CPU has the kernel's instructions (checked above).
        return unsafe { lab512::lab_beta_forward(p, rgb2lms, lms2lab, out) };
    }
    lab_beta_forward_lanes(level, p, rgb2lms, lms2lab, out)
}

kernel! {
    /// [`lab_beta_forward`] as plain lanes, compiled for each level.
    pub fn lab_beta_forward_lanes(p: Px<'_>, rgb2lms: &[[f64; 3]; 3], lms2lab: &[[f64; 3]; 3], out: &mut [[V; 3]]) -> Moments {
        let pixels = p.pixels;
        let mut m = Moments::new(pixels, [0.0; 3]);
        for (b, o) in out.iter_mut().enumerate() {
            let (px, valid) = p.block(b);
            let mut rgb = [[0.0; W]; 3];
            for i in 0..W {
                for c in 0..3 {
                    rgb[c][i] = px[c][i] as f64;
                }
            }
            let mut lms = mat_v(rgb2lms, &rgb);
            for c in 0..3 {
                lms[c] = ln8(lanes!(eps_if_zero(lms[c])));
            }
            *o = mat_v(lms2lab, &lms);
            if b == 0 {
                m.shift = first_shift(o);
            }
            if valid == W {
                m.add(o, W); // constant: the padding weights fold away
            } else {
                m.add(o, valid);
            }
        }
        m
    }
}

/// Standardised lαβ blocks back to 8-bit RGB (HistomicsTK `lab_to_rgb`, clip to 0..255,
/// truncate, NaN to 0). On AVX-512 the hand-written kernel of [`lab512`] (same bytes), below
/// that [`lab_beta_inverse_lanes`].
pub fn lab_beta_inverse(
    level: Level,
    lab: &[[V; 3]],
    gain: [f64; 3],
    shift: [f64; 3],
    lab2lms: &[[f64; 3]; 3],
    lms2rgb: &[[f64; 3]; 3],
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.available() {
        // SAFETY: the CPU has the kernel's instructions (checked above).
        return unsafe { lab512::lab_beta_inverse(lab, gain, shift, lab2lms, lms2rgb, out) };
    }
    lab_beta_inverse_lanes(level, lab, gain, shift, lab2lms, lms2rgb, out)
}

kernel! {
    /// [`lab_beta_inverse`] as plain lanes, compiled for each level.
    pub fn lab_beta_inverse_lanes(
        lab: &[[V; 3]],
        gain: [f64; 3],
        shift: [f64; 3],
        lab2lms: &[[f64; 3]; 3],
        lms2rgb: &[[f64; 3]; 3],
        out: &mut [u8],
    ) {
        let pixels = out.len() / 3;
        for (b, v) in lab.iter().enumerate() {
            let mut l = [[0.0; W]; 3];
            for c in 0..3 {
                for i in 0..W {
                    l[c][i] = v[c][i] * gain[c] + shift[c];
                }
            }
            let mut lms = mat_v(lab2lms, &l);
            for c in 0..3 {
                lms[c] = lanes!(zero_if_eps(exp8(lms[c])));
            }
            let rgb = mat_v(lms2rgb, &lms);
            let mut q = [[0u8; W]; 3];
            for c in 0..3 {
                for i in 0..W {
                    let x = rgb[c][i];
                    q[c][i] = if x.is_nan() { 0 } else { x.clamp(0.0, 255.0) as i32 as u8 };
                }
            }
            store_rgb(&q, (pixels - W * b).min(W), &mut out[3 * W * b..]);
        }
    }
}

// ---------------------------------------------------------------- optical density (Macenko)

/// Per-channel optical-density tables: `t[c][v]` for channel `c` and 8-bit value `v`.
pub type OdTables = [[f64; 256]; 3];

/// Tissue lanes of a block: every channel's byte at most `tmax` (-1: none).
#[inline(always)]
fn tissue_lanes(px: &Blk, tmax: i32) -> [bool; W] {
    let mut t = [false; W];
    for i in 0..W {
        t[i] = (px[0][i].max(px[1][i]).max(px[2][i]) as i32) <= tmax;
    }
    t
}

/// Tissue count and moments about `shift` of the tissue pixels' OD (`od[v]` per channel): first
/// moments per channel, second moments in the order 00, 01, 02, 11, 12, 22.
#[derive(Debug, Clone, Copy)]
pub struct OdMoments {
    pub count: usize,
    pub s1: [V; 3],
    pub s2: [V; 6],
}

/// Adds one block to Macenko's OD moments; lanes from `valid` on are padding.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn od_moments_block(
    px: &Blk<'_>,
    valid: usize,
    od: &[f64; 256],
    tmax: i32,
    shift: [f64; 3],
    count: &mut V,
    s1: &mut [V; 3],
    s2: &mut [V; 6],
) {
    let t = tissue_lanes(px, tmax);
    let mut d = [[0.0; W]; 3];
    let mut w = [0.0; W];
    for i in 0..W {
        w[i] = if t[i] && i < valid { 1.0 } else { 0.0 };
        count[i] += w[i];
    }
    for c in 0..3 {
        for i in 0..W {
            d[c][i] = (od[px[c][i] as usize] - shift[c]) * w[i];
        }
    }
    for i in 0..W {
        for c in 0..3 {
            s1[c][i] += d[c][i];
        }
        s2[0][i] += d[0][i] * d[0][i];
        s2[1][i] += d[0][i] * d[1][i];
        s2[2][i] += d[0][i] * d[2][i];
        s2[3][i] += d[1][i] * d[1][i];
        s2[4][i] += d[1][i] * d[2][i];
        s2[5][i] += d[2][i] * d[2][i];
    }
}

kernel! {
    /// [`OdMoments`] of the pixels whose three bytes are all `<= tmax`.
    pub fn od_moments(p: Px<'_>, od: &[f64; 256], tmax: i32, shift: [f64; 3]) -> OdMoments {
        let mut count = [0.0; W];
        let mut s1 = [[0.0; W]; 3];
        let mut s2 = [[0.0; W]; 6];
        let full = p.pixels / W;
        for b in 0..full {
            let (px, _) = p.block(b);
            od_moments_block(&px, W, od, tmax, shift, &mut count, &mut s1, &mut s2);
        }
        if full < p.blocks() {
            let (px, valid) = p.block(full);
            od_moments_block(&px, valid, od, tmax, shift, &mut count, &mut s1, &mut s2);
        }
        OdMoments { count: count.iter().sum::<f64>() as usize, s1, s2 }
    }
}

/// Writes a block's 8-bit channels interleaved (the first `valid` pixels).
#[inline(always)]
fn store_rgb(q: &[[u8; W]; 3], valid: usize, out: &mut [u8]) {
    if valid == W {
        let o: &mut [u8; 3 * W] = (&mut out[..3 * W]).try_into().expect("24 bytes");
        for i in 0..W {
            for c in 0..3 {
                o[3 * i + c] = q[c][i];
            }
        }
    } else {
        for i in 0..valid {
            for c in 0..3 {
                out[3 * i + c] = q[c][i];
            }
        }
    }
}

/// OD of each channel of a block.
#[inline(always)]
fn od3(od: &[f64; 256], px: &Blk<'_>) -> [V; 3] {
    let mut o = [[0.0; W]; 3];
    for c in 0..3 {
        for i in 0..W {
            o[c][i] = od[px[c][i] as usize];
        }
    }
    o
}

/// `Σ_c o[c] · e[c]`, lane by lane, in channel order.
#[inline(always)]
fn dot3(o: &[V; 3], e: [f64; 3]) -> V {
    let mut r = [0.0; W];
    for i in 0..W {
        r[i] = o[0][i] * e[0] + o[1][i] * e[1] + o[2][i] * e[2];
    }
    r
}

kernel! {
    /// Macenko's angle key ([`super::macenko::pseudo_angle`] of the projections of each pixel's
    /// OD on the plane's axes `e1` (x) and `e2` (y)), NaN for pixels that are not tissue; `out`
    /// has one entry per block of `p`.
    pub fn od_angle_keys(p: Px<'_>, od: &[f64; 256], e1: [f64; 3], e2: [f64; 3], tmax: i32, out: &mut [V]) {
        for (b, o) in out.iter_mut().enumerate() {
            let (px, _) = p.block(b);
            let d = od3(od, &px);
            let x = dot3(&d, e1);
            let y = dot3(&d, e2);
            let t = tissue_lanes(&px, tmax);
            for i in 0..W {
                let k = super::macenko::pseudo_angle(y[i], x[i]);
                o[i] = if t[i] { k } else { f64::NAN };
            }
        }
    }
}

kernel! {
    /// Two linear functions `Σ_c a[c] · OD_c` of each pixel's OD, e.g. Macenko's concentrations.
    pub fn od_linear2(p: Px<'_>, od: &[f64; 256], a0: [f64; 3], a1: [f64; 3], out0: &mut [V], out1: &mut [V]) {
        for (b, (o0, o1)) in out0.iter_mut().zip(out1.iter_mut()).enumerate() {
            let (px, _) = p.block(b);
            let d = od3(od, &px);
            *o0 = dot3(&d, a0);
            *o1 = dot3(&d, a1);
        }
    }
}

kernel! {
    /// Macenko's output: channel `ch` = `min(tab[0][r][ch] · tab[1][g][ch] · tab[2][b][ch], 255)`
    /// truncated to u8. One pixel's three channels sit side by side in each table row (the 4th
    /// is padding), so a pixel costs three row loads instead of nine gathers.
    pub fn od_output(raw: &[u8], tab: &[[[f64; 4]; 256]; 3], out: &mut [u8]) {
        for (p, o) in raw.chunks_exact(3).zip(out.chunks_exact_mut(3)) {
            let (a, b, c) = (&tab[0][p[0] as usize], &tab[1][p[1] as usize], &tab[2][p[2] as usize]);
            let mut v = [0.0f64; 4];
            for k in 0..4 {
                v[k] = a[k] * b[k] * c[k];
            }
            // torchstain: Inorm[Inorm > 255] = 255, then astype(uint8) truncates
            // (products of positive factors: 0 <= v; `as i32` converts without the saturating
            // u8 cast's scalar fix-ups, same value)
            for k in 0..3 {
                o[k] = v[k].min(255.0) as i32 as u8;
            }
        }
    }
}

/// [`od_output`] with each pixel's three table rows as one 256-bit vector each (AVX2 and up): three
/// loads, two multiplies, a minimum and a truncation per pixel. The compiler's own AVX2 and
/// AVX-512 builds of `od_output` vectorise across pixels with gathers, slower than its baseline
/// build on Zen 4 and on the Xeon (Macenko 4.1–4.4 ms against 3.7). The same operations in the same
/// order as `od_output`, so the same bytes (tested).
pub fn od_output_rows(level: Level, raw: &[u8], tab: &[[[f64; 4]; 256]; 3], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && Level::Avx2.available() {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { od_output_avx2(raw, tab, out) };
    }
    od_output(Level::Baseline, raw, tab, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn od_output_avx2(raw: &[u8], tab: &[[[f64; 4]; 256]; 3], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let max = _mm256_set1_pd(255.0);
    // The low byte of each 32-bit lane, in order, into the low 4 bytes.
    let low_bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (p, o) in raw.chunks_exact(3).zip(out.chunks_exact_mut(3)) {
        let (a, b, c) = (&tab[0][p[0] as usize], &tab[1][p[1] as usize], &tab[2][p[2] as usize]);
        // SAFETY: each row is 4 f64 (an unaligned 256-bit load).
        let (a, b, c) =
            unsafe { (_mm256_loadu_pd(a.as_ptr()), _mm256_loadu_pd(b.as_ptr()), _mm256_loadu_pd(c.as_ptr())) };
        // (a·b)·c as in `od_output`; min(v, 255) gives 255 for a NaN v (0 · inf), as f64::min does.
        let v = _mm256_min_pd(_mm256_mul_pd(_mm256_mul_pd(a, b), c), max);
        // Truncation toward zero, as `as i32`; 0 <= v <= 255, so the low byte is the value.
        let q = _mm_shuffle_epi8(_mm256_cvttpd_epi32(v), low_bytes);
        let bytes = (_mm_cvtsi128_si32(q) as u32).to_le_bytes();
        o.copy_from_slice(&bytes[..3]);
    }
}

kernel! {
    /// Vahadane's output: channel `ch` = `min(255 · exp(-(c0·scale0·s[0][ch] + c1·scale1·s[1][ch])), 255)`
    /// truncated to u8, for concentrations `conc` of each pixel.
    pub fn conc_output(conc: &[[f64; 2]], scale: [f64; 2], s: &[[f64; 3]; 2], out: &mut [u8]) {
        for (blk, o) in conc.chunks(W).zip(out.chunks_mut(3 * W)) {
            let mut od = [[0.0; W]; 3];
            for (i, a) in blk.iter().enumerate() {
                let (c0, c1) = (a[0] * scale[0], a[1] * scale[1]);
                for ch in 0..3 {
                    od[ch][i] = -(c0 * s[0][ch] + c1 * s[1][ch]);
                }
            }
            let mut rgb = [[0.0; W]; 3];
            for ch in 0..3 {
                rgb[ch] = exp8(od[ch]);
            }
            for i in 0..blk.len() {
                for ch in 0..3 {
                    o[3 * i + ch] = (255.0 * rgb[ch][i]).min(255.0) as i32 as u8; // exp > 0
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xs() -> Vec<f64> {
        // a deterministic spread: a fine grid near 1 and a geometric sweep
        let mut v: Vec<f64> = (0..20_000).map(|i| 1.0 + (i as f64 - 10_000.0) * 1e-6).collect();
        let mut x = 1e-300;
        while x < 1e300 {
            v.push(x);
            x *= 1.0137;
        }
        v
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst: f64 = 0.0;
        for i in 0..198_000 {
            let x = -700.0 + i as f64 * 0.00705; // up to 695.9
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        eprintln!("exp: worst relative error {worst:e}");
        assert!(worst <= 2.3e-16, "exp worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn ln_is_accurate() {
        let (mut near1, mut rel): (f64, f64) = (0.0, 0.0);
        for x in xs() {
            let (a, b) = (ln(x), x.ln());
            if (0.5..2.0).contains(&x) {
                near1 = near1.max((a - b).abs());
            } else {
                rel = rel.max(((a - b) / b).abs());
            }
        }
        eprintln!("ln: worst absolute error near 1 {near1:e}, relative elsewhere {rel:e}");
        // measured 3.5e-16 near 1: a bound at the measured value is too tight
        assert!(near1 <= 5e-16, "ln worst absolute error near 1 {near1:e}");
        assert!(rel <= 2.5e-16, "ln worst relative error {rel:e}");
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn cbrt_is_accurate() {
        let mut worst: f64 = 0.0;
        for x in xs() {
            let (a, b) = (cbrt(x), x.cbrt());
            worst = worst.max(((a - b) / b).abs());
        }
        eprintln!("cbrt: worst relative error {worst:e}");
        assert!(worst <= 5e-16, "cbrt worst relative error {worst:e}");
    }

    fn test_image(pixels: usize) -> Vec<u8> {
        // every byte value, in many combinations, including black and white pixels
        let mut raw: Vec<u8> = (0..pixels * 3).map(|i| ((i * 7919 + i / 3 * 31) % 256) as u8).collect();
        raw[..3].copy_from_slice(&[0, 0, 0]);
        raw[3..6].copy_from_slice(&[255, 255, 255]);
        raw
    }

    #[test]
    fn od_output_rows_gives_od_outputs_bytes() {
        // Tables with ordinary factors, 0, huge values (products past 255) and inf (0 · inf is NaN).
        let mut tab = [[[0.0f64; 4]; 256]; 3];
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        for (j, t) in tab.iter_mut().enumerate() {
            for (v, row) in t.iter_mut().enumerate() {
                for (ch, x) in row.iter_mut().enumerate() {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    *x = match (v + ch + j) % 53 {
                        0 => 0.0,
                        1 => f64::INFINITY,
                        2 => 1e300,
                        _ => (s >> 11) as f64 / (1u64 << 53) as f64 * if j == 0 { 300.0 } else { 1.2 },
                    };
                }
            }
        }
        // Rows 1..: factors whose product truncates differently as (a·b)·c and as a·(b·c), so
        // that the order of the multiplications shows in the bytes.
        let mut order_rows = 0;
        'search: for n in 3..2000u32 {
            for k in 1..255u32 {
                let (a, b, c) = (k as f64, 1.0 / n as f64, n as f64);
                if ((a * b) * c) as i32 != (a * (b * c)) as i32 {
                    order_rows += 1;
                    tab[0][order_rows] = [a; 4];
                    tab[1][order_rows] = [b; 4];
                    tab[2][order_rows] = [c; 4];
                    if order_rows == 8 {
                        break 'search;
                    }
                }
            }
        }
        assert_eq!(order_rows, 8, "no order-sensitive products found");
        // Row 0: 0 in the red table and inf in the green one: a NaN product, which gives 255.
        tab[0][0] = [0.0; 4];
        tab[1][0] = [f64::INFINITY; 4];
        let mut raw: Vec<u8> = (0..3 * 70_001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for v in 0..=order_rows as u8 {
            raw.extend([v, v, v]);
        }
        let mut want = vec![0u8; raw.len()];
        od_output(Level::Baseline, &raw, &tab, &mut want);
        for level in Level::ALL {
            if !level.available() {
                eprintln!("skipped: od_output_rows at {level:?} (this CPU lacks it)");
                continue;
            }
            let mut got = vec![7u8; raw.len()];
            od_output_rows(level, &raw, &tab, &mut got);
            assert!(
                got == want,
                "{level:?}: first difference at byte {:?}",
                got.iter().zip(&want).position(|(a, b)| a != b)
            );
        }
        assert!(want.contains(&255) && want.contains(&0), "the table must reach both ends");
        assert_eq!(want[want.len() - 3 * (order_rows + 1)..][..3], [255; 3], "0 · inf clamps to 255");
    }

    #[test]
    fn levels_agree() {
        let levels: Vec<Level> = Level::ALL.into_iter().filter(|l| l.available()).collect();
        for l in Level::ALL.into_iter().filter(|l| !l.available()) {
            eprintln!("levels_agree: this CPU lacks {}, not tested", l.name());
        }
        let raw = test_image(3001); // not a multiple of 8
        let lin = super::super::color::srgb_linear_table();
        let k = LabConsts { lin: &lin, rgb2xyz: &super::super::color::RGB2XYZ, white: [0.95047, 1.0, 1.08883] };
        let quant = super::super::color::SrgbQuantiser::new();
        let xyz2rgb = super::super::color::xyz2rgb();
        let rud = super::super::color::Ruderman::default();
        let run = |level: Level| {
            let mut planes = Planes::default();
            planes.fill(level, &raw);
            let mut lab = vec![[[0.0; W]; 3]; blocks(3001)];
            let m = lab_forward(level, planes.px(), &k, &mut lab);
            let mut out = vec![0u8; raw.len()];
            lab_inverse(level, &lab, [1.1, 0.9, 1.2], [-3.0, 1.0, 2.0], &xyz2rgb, k.white, &quant, &mut out);
            let mut lb = vec![[[0.0; W]; 3]; blocks(3001)];
            let mb = lab_beta_forward(level, planes.px(), &super::super::color::RGB2LMS, &rud.lms2lab, &mut lb);
            let mut out_b = vec![0u8; raw.len()];
            lab_beta_inverse(level, &lb, [1.1, 0.9, 1.2], [0.3, -0.1, 0.05], &rud.lab2lms, &rud.lms2rgb, &mut out_b);
            let bits = |v: &[[V; 3]]| v.iter().flatten().flatten().map(|x| x.to_bits()).collect::<Vec<u64>>();
            let xs: Vec<f64> = (0..4000).map(|i| (i as f64 - 2000.0) * 0.37).collect();
            let maths: Vec<u64> = xs
                .chunks(W)
                .flat_map(|c| {
                    let v: V = std::array::from_fn(|i| c[i]);
                    let p: V = std::array::from_fn(|i| v[i].abs() + 1e-3);
                    [exp8(v), ln8(p), cbrt8(p)]
                })
                .flatten()
                .map(f64::to_bits)
                .collect();
            (bits(&lab), format!("{:?}{:?}", m.mean_std(), mb.mean_std()), out, bits(&lb), out_b, maths)
        };
        let base = run(Level::Baseline);
        for &l in &levels[1..] {
            assert!(run(l) == base, "{} differs from baseline", l.name());
        }
    }

    #[test]
    fn kernels_match_scalar_conversions() {
        let raw = test_image(3001);
        let lin = super::super::color::srgb_linear_table();
        let k = LabConsts { lin: &lin, rgb2xyz: &super::super::color::RGB2XYZ, white: [0.95047, 1.0, 1.08883] };
        let mut planes = Planes::default();
        planes.fill(level(), &raw);
        let mut lab = vec![[[0.0; W]; 3]; blocks(3001)];
        lab_forward(level(), planes.px(), &k, &mut lab);
        let rud = super::super::color::Ruderman::default();
        let mut lb = vec![[[0.0; W]; 3]; blocks(3001)];
        lab_beta_forward(level(), planes.px(), &super::super::color::RGB2LMS, &rud.lms2lab, &mut lb);
        let (mut e_lab, mut e_beta): (f64, f64) = (0.0, 0.0);
        for (p, px) in raw.chunks_exact(3).enumerate() {
            // torchstain's formulas with libm's cube root
            let xyz = super::super::stats::mul_vec(
                &super::super::color::RGB2XYZ,
                [px[0], px[1], px[2]].map(|v| lin[v as usize]),
            );
            let f: [f64; 3] = std::array::from_fn(|c| {
                let t = xyz[c] * (1.0 / k.white[c]);
                if t > 0.008856 {
                    t.cbrt()
                } else {
                    7.787 * t + 16.0 / 116.0
                }
            });
            let want = [116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])];
            let want_b = rud.rgb_to_lab([px[0], px[1], px[2]].map(f64::from));
            for c in 0..3 {
                e_lab = e_lab.max((lab[p / W][c][p % W] - want[c]).abs());
                e_beta = e_beta.max((lb[p / W][c][p % W] - want_b[c]).abs());
            }
        }
        // a = 500·(f0 - f1): 500 times a few units in the last place of f ~ 1 (measured 1.7e-13)
        assert!(e_lab <= 3e-13, "LAB {e_lab:e}");
        eprintln!("kernels vs libm-based conversions: LAB {e_lab:e}, lαβ {e_beta:e}");
        assert!(e_beta <= 5e-15, "lαβ {e_beta:e}");
    }
}
