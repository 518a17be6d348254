//! Colour-space conversions used by the normalisers, each written to match its peer library:
//! optical density (torchstain / staintools), CIE LAB (torchstain's numpy `rgb2lab`/`lab2rgb`,
//! OpenCV-style scaling undone), Ruderman lαβ (HistomicsTK `rgb_to_lab`/`lab_to_rgb`), and the
//! OpenCV 8-bit luminosity used by staintools' tissue mask.
//!
//! Per-channel functions of a `u8` are tabulated (256 entries) because the normalisers apply them to
//! every pixel.

use super::stats::{inv, mul_vec, Mat3};

// ---------------------------------------------------------------- optical density

/// torchstain Macenko OD: `-ln((v + 1) / io)` for each 8-bit value.
pub fn od_table_torchstain(io: f64) -> [f64; 256] {
    std::array::from_fn(|v| -((v as f64 + 1.0) / io).ln())
}

/// staintools OD: `max(-ln(v / 255), 1e-6)` with 0 treated as 1.
pub fn od_table_staintools() -> [f64; 256] {
    std::array::from_fn(|v| {
        let v = if v == 0 { 1.0 } else { v as f64 };
        (-(v / 255.0).ln()).max(1e-6)
    })
}

/// RGB from optical density: `io * exp(-od)`.
pub fn od_to_rgb(od: f64, io: f64) -> f64 {
    io * (-od).exp()
}

// ---------------------------------------------------------------- CIE LAB (torchstain numpy)

/// sRGB → XYZ (D65) matrix used by torchstain (`_rgb2xyz`).
pub const RGB2XYZ: Mat3 =
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]];
pub const WHITE: [f64; 3] = [0.95047, 1.0, 1.08883];

/// sRGB gamma expansion of an 8-bit value (v/255), as torchstain's `rgb2lab`.
pub fn srgb_linear_table() -> [f64; 256] {
    std::array::from_fn(|v| {
        let c = (v as f32 / 255.0) as f64; // torchstain scales in float32
        if c > 0.04045 {
            ((c + 0.055) / 1.055).powf(2.4)
        } else {
            c / 12.92
        }
    })
}

/// Cube root of a positive finite number: bit-level first guess (within ~4%) and two Halley
/// steps (cubic convergence: relative error ~1e-13, far below the 8-bit output's resolution). `f64::cbrt` here links a slow software routine that dominated Reinhard LAB.
pub fn cbrt_pos(x: f64) -> f64 {
    // exponent divided by 3 gives a guess within a few per cent
    let mut t = f64::from_bits(x.to_bits() / 3 + 0x2A9F_7893_782D_A1CE);
    for _ in 0..2 {
        let t3 = t * t * t;
        t *= (t3 + 2.0 * x) / (2.0 * t3 + x);
    }
    t
}

fn lab_f(t: f64) -> f64 {
    if t > 0.008856 {
        cbrt_pos(t)
    } else {
        7.787 * t + 16.0 / 116.0
    }
}

/// Linear RGB (from [`srgb_linear_table`]) → CIE L*a*b* (L in 0..100), torchstain formulas.
pub fn linear_rgb_to_lab(rgb: [f64; 3]) -> [f64; 3] {
    let xyz = mul_vec(&RGB2XYZ, rgb);
    let f = [lab_f(xyz[0] * (1.0 / WHITE[0])), lab_f(xyz[1] * (1.0 / WHITE[1])), lab_f(xyz[2] * (1.0 / WHITE[2]))];
    [116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])]
}

/// CIE L*a*b* → linear RGB (not clipped), torchstain's `lab2rgb` before its gamma step.
pub fn lab_to_linear_rgb(lab: [f64; 3], xyz2rgb: &Mat3) -> [f64; 3] {
    let y = (lab[0] + 16.0) * (1.0 / 116.0);
    let x = lab[1] * (1.0 / 500.0) + y;
    let z = y - lab[2] * (1.0 / 200.0);
    let finv = |t: f64| {
        if t > 0.2068966 {
            t * t * t
        } else {
            (t - 16.0 / 116.0) * (1.0 / 7.787)
        }
    };
    let xyz = [finv(x) * WHITE[0], finv(y) * WHITE[1], finv(z) * WHITE[2]];
    mul_vec(xyz2rgb, xyz)
}

/// `inv(RGB2XYZ)`, as torchstain's `_xyz2rgb`.
pub fn xyz2rgb() -> Mat3 {
    inv(&RGB2XYZ).expect("RGB2XYZ is invertible")
}

/// Quantiser for torchstain's final step `(clip(gamma(lin), 0, 1) * 255).astype(uint8)`:
/// `thresholds[k-1]` is the smallest linear value that maps to at least `k`. Searching these
/// replaces a `powf` per channel by a binary search over 255 values.
#[derive(Debug, Clone)]
pub struct SrgbQuantiser {
    /// 255 thresholds and a sentinel (+∞) so that a lookup needs no bounds test.
    thresholds: [f64; 256],
    /// `start[i]`: the quantised value of `i / BUCKETS`, so a lookup is one table read and one
    /// comparison (no bucket holds two thresholds; `new` checks it). Three more bytes follow
    /// entry `BUCKETS` so that a 32-bit gather at any bucket stays inside (the AVX-512 kernel).
    start: Vec<u8>,
}

impl Default for SrgbQuantiser {
    fn default() -> Self {
        Self::new()
    }
}

impl SrgbQuantiser {
    /// Buckets of the `start` table over [0, 1] (a power of two).
    pub const BUCKETS: usize = 8192;

    pub fn new() -> Self {
        let thresholds = std::array::from_fn(|i| {
            if i == 255 {
                return f64::INFINITY;
            }
            let y = (i + 1) as f64 / 255.0;
            // inverse of the gamma compression used by torchstain's lab2rgb
            if y <= 12.92 * 0.0031308 {
                y / 12.92
            } else {
                ((y + 0.055) / 1.055).powf(2.4)
            }
        });
        let mut q = SrgbQuantiser { thresholds, start: Vec::new() };
        // make each threshold agree with the forward formula exactly (no off-by-one at the edges)
        for k in 0..255 {
            let target = (k + 1) as f64;
            let mut t = q.thresholds[k];
            while Self::forward(t) * 255.0 < target {
                t = f64::from_bits(t.to_bits() + 1);
            }
            while t > 0.0 && Self::forward(f64::from_bits(t.to_bits() - 1)) * 255.0 >= target {
                t = f64::from_bits(t.to_bits() - 1);
            }
            q.thresholds[k] = t;
        }
        // every lin >= 1 quantises to 255 (the formula clamps at 1)
        for t in &mut q.thresholds[..255] {
            *t = t.min(1.0);
        }
        q.start = (0..=Self::BUCKETS).map(|i| q.search(i as f64 / Self::BUCKETS as f64)).collect();
        assert!(q.start.windows(2).all(|w| w[1] - w[0] <= 1), "a quantiser bucket holds two thresholds");
        q.start.extend([255; 3]);
        q
    }

    /// The thresholds and the bucket starts (with their 3 bytes of padding), for vector kernels
    /// that look values up as [`Self::quantise`] does.
    pub(crate) fn tables(&self) -> (&[f64; 256], &[u8]) {
        (&self.thresholds, &self.start)
    }

    fn search(&self, lin: f64) -> u8 {
        self.thresholds[..255].partition_point(|&t| t <= lin) as u8
    }

    fn forward(lin: f64) -> f64 {
        let c = if lin > 0.0031308 { 1.055 * lin.powf(1.0 / 2.4) - 0.055 } else { lin * 12.92 };
        c.clamp(0.0, 1.0)
    }

    /// 8-bit value of a linear RGB component (truncating, as numpy's `astype(uint8)`; NaN and
    /// values <= 0 give 0, values >= 1 give 255).
    #[inline(always)]
    pub fn quantise(&self, lin: f64) -> u8 {
        let x = if lin > 0.0 { lin.min(1.0) } else { 0.0 };
        // BUCKETS is a power of two: x · BUCKETS is exact, so bucket i starts at or below x
        let k = self.start[(x * Self::BUCKETS as f64) as usize] as usize;
        (k + (self.thresholds[k] <= x) as usize) as u8
    }
}

// ---------------------------------------------------------------- Ruderman lαβ (HistomicsTK)

/// HistomicsTK `_rgb2lms`.
pub const RGB2LMS: Mat3 = [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]];

/// HistomicsTK `_lms2lab` = diag(1/√3, 1/√6, 1/√2) · [[1,1,1],[1,1,-2],[1,-1,0]].
pub fn lms2lab() -> Mat3 {
    let (a, b, c) = (1.0 / 3f64.powf(0.5), 1.0 / 6f64.powf(0.5), 1.0 / 2f64.powf(0.5));
    [[a, a, a], [b, b, -2.0 * b], [c, -c, 0.0]]
}

/// Forward and inverse matrices for Ruderman lαβ.
#[derive(Debug, Clone)]
pub struct Ruderman {
    pub lms2lab: Mat3,
    pub lab2lms: Mat3,
    pub lms2rgb: Mat3,
}

impl Default for Ruderman {
    fn default() -> Self {
        let lms2lab = lms2lab();
        Ruderman {
            lms2lab,
            lab2lms: inv(&lms2lab).expect("lms2lab is invertible"),
            lms2rgb: inv(&RGB2LMS).expect("rgb2lms is invertible"),
        }
    }
}

impl Ruderman {
    /// RGB in 0..255 → lαβ (HistomicsTK `rgb_to_lab`: zero LMS replaced by machine epsilon).
    pub fn rgb_to_lab(&self, rgb: [f64; 3]) -> [f64; 3] {
        let lms = mul_vec(&RGB2LMS, rgb).map(|x| if x == 0.0 { f64::EPSILON } else { x }.ln());
        mul_vec(&self.lms2lab, lms)
    }

    /// lαβ → RGB in 0..255, not clipped (HistomicsTK `lab_to_rgb`).
    pub fn lab_to_rgb(&self, lab: [f64; 3]) -> [f64; 3] {
        let lms = mul_vec(&self.lab2lms, lab).map(|x| {
            let e = x.exp();
            if e == f64::EPSILON {
                0.0
            } else {
                e
            }
        });
        mul_vec(&self.lms2rgb, lms)
    }
}

// ---------------------------------------------------------------- luminosity (OpenCV 8-bit LAB)

/// staintools' tissue test `cvtColor(RGB2LAB)[..., 0] / 255 < threshold` on 8-bit RGB (OpenCV's
/// L·255/100, rounded). Computed in floating point: OpenCV's fixed-point tables can differ by one
/// level on rare boundary colours. Since L is monotonic in the luminance Y, the test is done as
/// `Y < y_max` without a cube root.
#[derive(Debug, Clone)]
pub struct Luminosity {
    lin: [f64; 256],
    y_max: f64,
}

impl Luminosity {
    pub fn new(threshold: f64) -> Self {
        // L8 / 255 < thr  <=>  round(2.55 L) <= m  <=>  L < (m + 0.5) / 2.55
        let m = (threshold * 255.0).ceil() - 1.0;
        let l_max = (m + 0.5) / 2.55;
        let y_max = if l_max > 8.0 { ((l_max + 16.0) / 116.0).powi(3) } else { l_max / 903.3 };
        Luminosity {
            lin: std::array::from_fn(|v| {
                let c = v as f64 / 255.0;
                if c <= 0.04045 {
                    c / 12.92
                } else {
                    ((c + 0.055) / 1.055).powf(2.4)
                }
            }),
            y_max,
        }
    }

    fn y(&self, p: [u8; 3]) -> f64 {
        0.212671 * self.lin[p[0] as usize] + 0.715160 * self.lin[p[1] as usize] + 0.072169 * self.lin[p[2] as usize]
    }

    /// OpenCV's 8-bit L of an RGB pixel.
    pub fn l8(&self, p: [u8; 3]) -> u8 {
        let y = self.y(p);
        let l = if y > 0.008856 { 116.0 * y.cbrt() - 16.0 } else { 903.3 * y };
        (l * 2.55).round().clamp(0.0, 255.0) as u8
    }

    pub fn is_tissue(&self, p: [u8; 3]) -> bool {
        self.y(p) < self.y_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_roundtrip() {
        let lin = srgb_linear_table();
        let q = SrgbQuantiser::new();
        let m = xyz2rgb();
        for p in [[0u8, 0, 0], [255, 255, 255], [200, 120, 180], [13, 250, 77]] {
            let lab = linear_rgb_to_lab(p.map(|v| lin[v as usize]));
            let back = lab_to_linear_rgb(lab, &m);
            // truncation after a float round trip may land one below
            for c in 0..3 {
                let v = q.quantise(back[c]) as i32;
                assert!((v - p[c] as i32).abs() <= 1, "{p:?} -> {lab:?} -> {back:?}");
            }
        }
        // white is L=100, a=b=0
        let w = linear_rgb_to_lab([1.0, 1.0, 1.0]);
        assert!((w[0] - 100.0).abs() < 1e-3 && w[1].abs() < 1e-2 && w[2].abs() < 1e-2);
    }

    #[test]
    fn quantiser_matches_forward_formula() {
        let q = SrgbQuantiser::new();
        for i in 0..10_000 {
            let lin = i as f64 / 9_999.0 * 1.1 - 0.05;
            let want = (SrgbQuantiser::forward(lin) * 255.0) as u8;
            assert_eq!(q.quantise(lin), want, "lin {lin}");
        }
    }

    #[test]
    fn ruderman_roundtrip() {
        let r = Ruderman::default();
        for p in [[1.0, 2.0, 3.0], [200.0, 120.0, 180.0], [255.0, 255.0, 255.0]] {
            let back = r.lab_to_rgb(r.rgb_to_lab(p));
            for c in 0..3 {
                assert!((back[c] - p[c]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn luminosity_white_and_black() {
        let l = Luminosity::new(0.8);
        assert_eq!(l.l8([255, 255, 255]), 255);
        assert_eq!(l.l8([0, 0, 0]), 0);
        assert!(!l.is_tissue([250, 250, 250]));
        assert!(l.is_tissue([150, 60, 140]));
    }

    #[test]
    fn tissue_test_equals_l8_threshold() {
        for thr in [0.8, 0.5, 0.9] {
            let l = Luminosity::new(thr);
            for r in (0..=255).step_by(3) {
                for g in (0..=255).step_by(5) {
                    for b in (0..=255).step_by(7) {
                        let p = [r as u8, g as u8, b as u8];
                        assert_eq!(l.is_tissue(p), (l.l8(p) as f64 / 255.0) < thr, "{p:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn fast_cbrt_is_accurate() {
        for i in 1..20_000 {
            let x = i as f64 * 1e-4;
            let (a, b) = (cbrt_pos(x), x.cbrt());
            assert!((a - b).abs() <= 1e-12 * b, "{x}: {a} vs {b}");
        }
    }
}
