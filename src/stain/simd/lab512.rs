//! The Reinhard colour spaces (CIE LAB, Ruderman lαβ) forward and inverse on AVX-512 registers,
//! written with intrinsics.
//!
//! The compiler's AVX-512 build of the plain `[f64; 8]` kernels ([`super::lab_forward_lanes`])
//! runs mostly on 256-bit registers with stack spills (perf annotate on an Emerald Rapids Xeon),
//! and both Reinhards spent 95 % of their time in their two kernels. Here one block of 8 pixels is one
//! `__m512d` per channel from the table gather to the moments.
//!
//! Every operation is the one the plain kernel performs, in the same order, with no fused
//! multiply-add, so the results are bit-identical to the baseline build (`levels_agree` checks it
//! wherever the CPU has AVX-512).

use std::arch::x86_64::*;

use super::{LabConsts, Moments, Px, V, W};
use crate::stain::color::SrgbQuantiser;

/// Lane-wise helpers. `#[inline]` plus the same features as the kernels: LLVM inlines them.
macro_rules! avx512_fn {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[inline]
        #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
        fn $name($($arg: $ty),*) -> $ret $body
    };
}

avx512_fn! {
    fn splat(x: f64) -> __m512d {
        _mm512_set1_pd(x)
    }
}

avx512_fn! {
    /// `m · v` in the plain kernel's order: `(m0·v0 + m1·v1) + m2·v2`.
    fn mat(m: &[[f64; 3]; 3], v: &[__m512d; 3]) -> [__m512d; 3] {
        let row = |r: &[f64; 3]| {
            _mm512_add_pd(
                _mm512_add_pd(_mm512_mul_pd(splat(r[0]), v[0]), _mm512_mul_pd(splat(r[1]), v[1])),
                _mm512_mul_pd(splat(r[2]), v[2]),
            )
        };
        [row(&m[0]), row(&m[1]), row(&m[2])]
    }
}

avx512_fn! {
    /// [`super::cbrt8`], lane for lane.
    fn cbrt(x: __m512d) -> __m512d {
        // high word / 3 by a 32×32→64 multiply
        let hi = _mm512_srli_epi64::<32>(_mm512_castpd_si512(x));
        let third = _mm512_srli_epi64::<33>(_mm512_mul_epu32(hi, _mm512_set1_epi64(0xAAAA_AAAB)));
        let y = _mm512_castsi512_pd(_mm512_slli_epi64::<32>(_mm512_sub_epi64(_mm512_set1_epi64(0x553E_F100), third)));
        let one = splat(1.0);
        let u = _mm512_sub_pd(one, _mm512_mul_pd(x, _mm512_mul_pd(_mm512_mul_pd(y, y), y)));
        let p = _mm512_add_pd(splat(14.0 / 81.0), _mm512_mul_pd(u, splat(35.0 / 243.0)));
        let p = _mm512_add_pd(splat(2.0 / 9.0), _mm512_mul_pd(u, p));
        let p = _mm512_add_pd(splat(1.0 / 3.0), _mm512_mul_pd(u, p));
        let y = _mm512_add_pd(y, _mm512_mul_pd(y, _mm512_mul_pd(u, p)));
        let u = _mm512_sub_pd(one, _mm512_mul_pd(x, _mm512_mul_pd(_mm512_mul_pd(y, y), y)));
        let p = _mm512_add_pd(splat(1.0 / 3.0), _mm512_mul_pd(u, splat(2.0 / 9.0)));
        let y = _mm512_add_pd(y, _mm512_mul_pd(y, _mm512_mul_pd(u, p)));
        _mm512_mul_pd(x, _mm512_mul_pd(y, y))
    }
}

avx512_fn! {
    /// The 8 bytes of `c` widened to 32-bit indices.
    fn indices(c: &[u8; W]) -> __m256i {
        // SAFETY: `c` holds 8 bytes (an unaligned 64-bit load).
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(c.as_ptr().cast()) })
    }
}

avx512_fn! {
    fn load(v: &V) -> __m512d {
        // SAFETY: `v` holds 8 f64 (an unaligned load).
        unsafe { _mm512_loadu_pd(v.as_ptr()) }
    }
}

avx512_fn! {
    fn store(v: __m512d, to: &mut V) -> () {
        // SAFETY: `to` holds 8 f64 (an unaligned store).
        unsafe { _mm512_storeu_pd(to.as_mut_ptr(), v) }
    }
}

/// [`super::lab_forward`] on AVX-512.
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
pub(super) fn lab_forward(p: Px<'_>, k: &LabConsts, out: &mut [[V; 3]]) -> Moments {
    let inv_white = k.white.map(|w| splat(1.0 / w));
    let mut sums = Sums::new(p.pixels);
    for (b, o) in out.iter_mut().enumerate() {
        let (px, valid) = p.block(b);
        // SAFETY: the indices are bytes and the table has 256 entries.
        let lin = px.map(|c| unsafe { _mm512_i32gather_pd::<8>(indices(c), k.lin.as_ptr()) });
        let xyz = mat(k.rgb2xyz, &lin);
        let f: [__m512d; 3] = std::array::from_fn(|c| {
            let t = _mm512_mul_pd(xyz[c], inv_white[c]);
            // the cube-root lane must not see 0 (max gives its second operand for a NaN, as f64::max)
            let g = cbrt(_mm512_max_pd(t, splat(1e-300)));
            let linear = _mm512_add_pd(_mm512_mul_pd(splat(7.787), t), splat(16.0 / 116.0));
            _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(t, splat(0.008856)), linear, g)
        });
        let lab = [
            _mm512_sub_pd(_mm512_mul_pd(splat(116.0), f[1]), splat(16.0)),
            _mm512_mul_pd(splat(500.0), _mm512_sub_pd(f[0], f[1])),
            _mm512_mul_pd(splat(200.0), _mm512_sub_pd(f[1], f[2])),
        ];
        for c in 0..3 {
            store(lab[c], &mut o[c]);
        }
        sums.add(b, o, &lab, valid);
    }
    sums.finish()
}

avx512_fn! {
    /// [`super::finv`], lane for lane.
    fn finv(t: __m512d) -> __m512d {
        let cube = _mm512_mul_pd(_mm512_mul_pd(t, t), t);
        let linear = _mm512_mul_pd(_mm512_sub_pd(t, splat(16.0 / 116.0)), splat(1.0 / 7.787));
        _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(t, splat(0.2068966)), linear, cube)
    }
}

avx512_fn! {
    /// [`SrgbQuantiser::quantise`], lane for lane, with two gathers; the low 8 bytes of the result
    /// hold the 8 values.
    fn quantise(lin: __m512d, thresholds: &[f64; 256], start: &[u8]) -> __m128i {
        // if lin > 0 { lin.min(1.0) } else { 0.0 }: NaN gives 0 (the mask is false)
        let x = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_GT_OQ>(lin, splat(0.0)), _mm512_min_pd(lin, splat(1.0)));
        let bucket = _mm512_cvttpd_epi32(_mm512_mul_pd(x, splat(SrgbQuantiser::BUCKETS as f64)));
        // SAFETY: bucket <= BUCKETS and `start` has 3 bytes of padding after entry BUCKETS, so the
        // 4-byte loads stay inside it; the low byte is the entry.
        let k = _mm256_and_si256(
            unsafe { _mm256_i32gather_epi32::<1>(start.as_ptr().cast(), bucket) },
            _mm256_set1_epi32(0xFF),
        );
        // SAFETY: k <= 255 indexes the 256 thresholds.
        let t = unsafe { _mm512_i32gather_pd::<8>(k, thresholds.as_ptr()) };
        let above = _mm512_cmp_pd_mask::<_CMP_LE_OQ>(t, x);
        _mm256_cvtepi32_epi8(_mm256_mask_add_epi32(k, above, k, _mm256_set1_epi32(1)))
    }
}

/// [`super::lab_inverse`] on AVX-512.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
pub(super) fn lab_inverse(
    lab: &[[V; 3]],
    gain: [f64; 3],
    shift: [f64; 3],
    xyz2rgb: &[[f64; 3]; 3],
    white: [f64; 3],
    quant: &SrgbQuantiser,
    out: &mut [u8],
) {
    let pixels = out.len() / 3;
    let (thresholds, start) = quant.tables();
    assert!(start.len() >= SrgbQuantiser::BUCKETS + 4, "the gathers read 4 bytes from each bucket");
    let (gain, shift, white) = (gain.map(|x| splat(x)), shift.map(|x| splat(x)), white.map(|x| splat(x)));
    for (b, v) in lab.iter().enumerate() {
        let l: [__m512d; 3] = std::array::from_fn(|c| _mm512_add_pd(_mm512_mul_pd(load(&v[c]), gain[c]), shift[c]));
        let y = _mm512_mul_pd(_mm512_add_pd(l[0], splat(16.0)), splat(1.0 / 116.0));
        let x = _mm512_add_pd(_mm512_mul_pd(l[1], splat(1.0 / 500.0)), y);
        let z = _mm512_sub_pd(y, _mm512_mul_pd(l[2], splat(1.0 / 200.0)));
        let xyz =
            [_mm512_mul_pd(finv(x), white[0]), _mm512_mul_pd(finv(y), white[1]), _mm512_mul_pd(finv(z), white[2])];
        let rgb = mat(xyz2rgb, &xyz);
        let mut q = [[0u8; W]; 3];
        for c in 0..3 {
            // SAFETY: q[c] holds 8 bytes (an unaligned 64-bit store).
            unsafe { _mm_storel_epi64(q[c].as_mut_ptr().cast(), quantise(rgb[c], thresholds, start)) };
        }
        super::store_rgb(&q, (pixels - W * b).min(W), &mut out[3 * W * b..]);
    }
}

avx512_fn! {
    /// [`super::exp8`], lane for lane.
    fn exp(x: __m512d) -> __m512d {
        const LOG2E: f64 = std::f64::consts::LOG2_E;
        const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
        const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
        const MAGIC: f64 = 6755399441055744.0;
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
        // f64::clamp keeps NaN: max/min return their second operand (x) for a NaN
        let x = _mm512_min_pd(splat(709.0), _mm512_max_pd(splat(-708.0), x));
        let t = _mm512_add_pd(_mm512_mul_pd(x, splat(LOG2E)), splat(MAGIC));
        let n = _mm512_sub_pd(t, splat(MAGIC));
        let nb = _mm512_sub_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(MAGIC.to_bits() as i64));
        let r = _mm512_sub_pd(_mm512_sub_pd(x, _mm512_mul_pd(n, splat(LN2_HI))), _mm512_mul_pd(n, splat(LN2_LO)));
        let mut p = splat(C[0]);
        for c in &C[1..] {
            p = _mm512_add_pd(_mm512_mul_pd(p, r), splat(*c));
        }
        let one = splat(1.0);
        let p = _mm512_add_pd(_mm512_mul_pd(_mm512_add_pd(_mm512_mul_pd(p, r), one), r), one);
        let two_n = _mm512_slli_epi64::<52>(_mm512_add_epi64(nb, _mm512_set1_epi64(1023)));
        _mm512_mul_pd(p, _mm512_castsi512_pd(two_n))
    }
}

avx512_fn! {
    /// [`super::ln8`], lane for lane.
    fn ln(x: __m512d) -> __m512d {
        const SQRT_HALF_BITS: u64 = 0x3FE6_A09E_667F_3BCD;
        const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
        const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
        const TWO52: f64 = 4503599627370496.0;
        const C: [f64; 9] =
            [1.0 / 19.0, 1.0 / 17.0, 1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0];
        let ix = _mm512_add_epi64(_mm512_castpd_si512(x), _mm512_set1_epi64((0x3FF0_0000_0000_0000 - SQRT_HALF_BITS) as i64));
        let kb = _mm512_srli_epi64::<52>(ix);
        let mantissa = _mm512_and_si512(ix, _mm512_set1_epi64(0x000F_FFFF_FFFF_FFFF));
        let m = _mm512_castsi512_pd(_mm512_add_epi64(mantissa, _mm512_set1_epi64(SQRT_HALF_BITS as i64)));
        let k = _mm512_sub_pd(
            _mm512_castsi512_pd(_mm512_or_si512(kb, _mm512_set1_epi64(TWO52.to_bits() as i64))),
            splat(TWO52 + 1023.0),
        );
        let one = splat(1.0);
        let s = _mm512_div_pd(_mm512_sub_pd(m, one), _mm512_add_pd(m, one));
        let z = _mm512_mul_pd(s, s);
        let mut p = splat(C[0]);
        for c in &C[1..] {
            p = _mm512_add_pd(_mm512_mul_pd(p, z), splat(*c));
        }
        let two_s = _mm512_mul_pd(splat(2.0), s);
        let lnm = _mm512_add_pd(two_s, _mm512_mul_pd(two_s, _mm512_mul_pd(z, p)));
        _mm512_add_pd(_mm512_mul_pd(k, splat(LN2_HI)), _mm512_add_pd(_mm512_mul_pd(k, splat(LN2_LO)), lnm))
    }
}

avx512_fn! {
    /// `v` with each lane equal to `from` replaced by `to`.
    fn replace(v: __m512d, from: f64, to: f64) -> __m512d {
        _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_EQ_OQ>(v, splat(from)), v, splat(to))
    }
}

/// Moments of the blocks a kernel produces, kept in registers ([`Moments::add`], lane for lane).
struct Sums {
    m: Moments,
    shift: [__m512d; 3],
    s1: [__m512d; 3],
    s2: [__m512d; 3],
}

impl Sums {
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    fn new(pixels: usize) -> Self {
        let zero = splat(0.0);
        Sums { m: Moments::new(pixels, [0.0; 3]), shift: [zero; 3], s1: [zero; 3], s2: [zero; 3] }
    }

    /// Adds block `b` (already stored in `o`) with `valid` real pixels.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    fn add(&mut self, b: usize, o: &[V; 3], v: &[__m512d; 3], valid: usize) {
        if b == 0 {
            self.m.shift = super::first_shift(o);
            self.shift = self.m.shift.map(|s| splat(s));
        }
        // padding lanes weigh 0, as in `Moments::add`
        let w = _mm512_maskz_mov_pd(((1u32 << valid) - 1) as u8, splat(1.0));
        for c in 0..3 {
            let d = _mm512_sub_pd(v[c], self.shift[c]);
            let d = if valid == W { d } else { _mm512_mul_pd(d, w) };
            self.s1[c] = _mm512_add_pd(self.s1[c], d);
            self.s2[c] = _mm512_add_pd(self.s2[c], _mm512_mul_pd(d, d));
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
    fn finish(mut self) -> Moments {
        for c in 0..3 {
            store(self.s1[c], &mut self.m.s1[c]);
            store(self.s2[c], &mut self.m.s2[c]);
        }
        self.m
    }
}

/// [`super::lab_beta_forward`] on AVX-512.
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
pub(super) fn lab_beta_forward(
    p: Px<'_>,
    rgb2lms: &[[f64; 3]; 3],
    lms2lab: &[[f64; 3]; 3],
    out: &mut [[V; 3]],
) -> Moments {
    let mut sums = Sums::new(p.pixels);
    for (b, o) in out.iter_mut().enumerate() {
        let (px, valid) = p.block(b);
        let rgb = px.map(|c| _mm512_cvtepi32_pd(indices(c)));
        let lms = mat(rgb2lms, &rgb).map(|v| ln(replace(v, 0.0, f64::EPSILON)));
        let lab = mat(lms2lab, &lms);
        for c in 0..3 {
            store(lab[c], &mut o[c]);
        }
        sums.add(b, o, &lab, valid);
    }
    sums.finish()
}

/// [`super::lab_beta_inverse`] on AVX-512.
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
pub(super) fn lab_beta_inverse(
    lab: &[[V; 3]],
    gain: [f64; 3],
    shift: [f64; 3],
    lab2lms: &[[f64; 3]; 3],
    lms2rgb: &[[f64; 3]; 3],
    out: &mut [u8],
) {
    let pixels = out.len() / 3;
    let (gain, shift) = (gain.map(|x| splat(x)), shift.map(|x| splat(x)));
    for (b, v) in lab.iter().enumerate() {
        let l: [__m512d; 3] = std::array::from_fn(|c| _mm512_add_pd(_mm512_mul_pd(load(&v[c]), gain[c]), shift[c]));
        let lms = mat(lab2lms, &l).map(|v| replace(exp(v), f64::EPSILON, 0.0));
        let rgb = mat(lms2rgb, &lms);
        let mut q = [[0u8; W]; 3];
        for c in 0..3 {
            // NaN gives 0, then clamp to 0..=255 and truncate
            let x = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_ORD_Q>(rgb[c], rgb[c]), rgb[c]);
            let x = _mm512_min_pd(_mm512_max_pd(x, splat(0.0)), splat(255.0));
            // SAFETY: q[c] holds 8 bytes (an unaligned 64-bit store).
            unsafe { _mm_storel_epi64(q[c].as_mut_ptr().cast(), _mm256_cvtepi32_epi8(_mm512_cvttpd_epi32(x))) };
        }
        super::store_rgb(&q, (pixels - W * b).min(W), &mut out[3 * W * b..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stain::simd::Level;

    /// Runs `f` on `xs` 8 at a time and returns its lanes.
    fn lanes(xs: &[f64], f: impl Fn(__m512d) -> __m512d) -> Vec<f64> {
        let mut out = Vec::new();
        for c in xs.chunks(W) {
            let mut v: V = [1.0; W];
            v[..c.len()].copy_from_slice(c);
            let mut r: V = [0.0; W];
            // SAFETY: the callers check that the CPU has AVX-512.
            unsafe { store(f(load(&v)), &mut r) };
            out.extend_from_slice(&r[..c.len()]);
        }
        out
    }

    fn have_avx512(test: &str) -> bool {
        let have = Level::Avx512.available();
        if !have {
            eprintln!("{test}: this CPU lacks AVX-512 (F, DQ, VL), not tested");
        }
        have
    }

    /// Each value, its neighbours one unit in the last place away, and the awkward ones.
    fn around(points: impl IntoIterator<Item = f64>) -> Vec<f64> {
        let mut xs: Vec<f64> = points.into_iter().flat_map(|t| [t.next_down(), t, t.next_up()]).collect();
        xs.extend([0.0, -0.0, -1.0, 1.0, 2.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 1e-300]);
        xs
    }

    #[test]
    fn quantise_lanes_match_the_scalar_quantiser_at_every_threshold() {
        if !have_avx512("quantise_lanes_match_the_scalar_quantiser_at_every_threshold") {
            return;
        }
        let q = SrgbQuantiser::new();
        let (thresholds, start) = q.tables();
        let xs = around(thresholds[..255].iter().copied());
        let got = lanes(&xs, |v| {
            // SAFETY: as in `lanes`.
            let bytes = unsafe { quantise(v, thresholds, start) };
            let mut b = [0u8; 16];
            // SAFETY: 16 bytes.
            unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), bytes) };
            let mut r = [0.0; W];
            for i in 0..W {
                r[i] = b[i] as f64;
            }
            // SAFETY: as in `lanes`.
            unsafe { load(&r) }
        });
        for (x, g) in xs.iter().zip(got) {
            assert_eq!(g, q.quantise(*x) as f64, "quantise({x:e})");
        }
    }

    #[test]
    fn exp_and_ln_lanes_match_the_scalar_forms_at_their_edges() {
        if !have_avx512("exp_and_ln_lanes_match_the_scalar_forms_at_their_edges") {
            return;
        }
        let mut xs = around([-708.0, 709.0, -745.0, 710.0, 0.5, -0.5, 1e-10, 3.0, 100.0]);
        xs.extend((0..400).map(|i| (i as f64 - 200.0) * 0.731));
        // SAFETY: as in `lanes`.
        let got = lanes(&xs, |v| unsafe { exp(v) });
        for (x, g) in xs.iter().zip(&got) {
            let want = super::super::exp(*x);
            assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "exp({x:e}): {g:e} vs {want:e}");
        }
        let mut xs: Vec<f64> = around([
            f64::EPSILON,
            f64::MIN_POSITIVE,
            std::f64::consts::FRAC_1_SQRT_2,
            1.0,
            std::f64::consts::SQRT_2,
            255.0,
        ])
        .into_iter()
        .filter(|x| *x >= f64::MIN_POSITIVE && x.is_finite())
        .collect();
        xs.extend((1..400).map(|i| i as f64 * 0.731));
        // SAFETY: as in `lanes`.
        let got = lanes(&xs, |v| unsafe { ln(v) });
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), super::super::ln(*x).to_bits(), "ln({x:e})");
        }
    }

    #[test]
    fn finv_and_cbrt_lanes_match_the_scalar_forms_at_their_edges() {
        if !have_avx512("finv_and_cbrt_lanes_match_the_scalar_forms_at_their_edges") {
            return;
        }
        let xs = around([0.2068966, 16.0 / 116.0, 0.5, 1.0]);
        // SAFETY: as in `lanes`.
        let got = lanes(&xs, |v| unsafe { finv(v) });
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), super::super::finv(*x).to_bits(), "finv({x:e})");
        }
        let xs: Vec<f64> =
            around([1e-300, 0.008856, 0.3, 1.0, 7.9, 1e10]).into_iter().filter(|x| *x >= 1e-300).collect();
        // SAFETY: as in `lanes`.
        let got = lanes(&xs, |v| unsafe { cbrt(v) });
        for (x, g) in xs.iter().zip(&got) {
            assert_eq!(g.to_bits(), super::super::cbrt(*x).to_bits(), "cbrt({x:e})");
        }
    }
}
