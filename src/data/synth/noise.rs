//! Band-limited value noise over continuous tissue coordinates (micrometres).
//!
//! A field is defined once in world units and sampled at any scale; octaves whose wavelength is
//! below the sampling resolution are replaced by their mean, so a 40X view is the low-pass version
//! of the 400X view of the same place rather than an aliased one.

use super::rng::{hash_cell, unit};

#[inline]
fn fade(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// Value noise in [0, 1) on the integer lattice, smoothly interpolated.
/// floor() without a libm call (the baseline x86-64 target has no SSE4.1 `roundsd`).
#[inline]
fn floor_i(x: f64) -> i64 {
    let i = x as i64;
    if (i as f64) > x {
        i - 1
    } else {
        i
    }
}

#[inline]
pub(crate) fn value(seed: u64, x: f64, y: f64) -> f32 {
    let (ix, iy) = (floor_i(x), floor_i(y));
    let (xf, yf) = (ix as f64, iy as f64);
    let tx = fade((x - xf) as f32);
    let ty = fade((y - yf) as f32);
    let v00 = unit(hash_cell(seed, ix, iy));
    let v10 = unit(hash_cell(seed, ix + 1, iy));
    let v01 = unit(hash_cell(seed, ix, iy + 1));
    let v11 = unit(hash_cell(seed, ix + 1, iy + 1));
    let a = v00 + (v10 - v00) * tx;
    let b = v01 + (v11 - v01) * tx;
    a + (b - a) * ty
}

/// Fractal sum of `octaves` value-noise layers, the first with `wavelength` µm, each next one
/// half as long. Layers shorter than `min_wavelength` fade to their mean 0.5 (band limit).
/// The result lies in [0, 1] with mean 0.5.
pub(crate) fn fbm(seed: u64, x: f64, y: f64, wavelength: f64, octaves: u32, min_wavelength: f64) -> f32 {
    let mut sum = 0.0f32;
    let mut norm = 0.0f32;
    let mut amp = 1.0f32;
    let mut wl = wavelength;
    for o in 0..octaves {
        // Weight 0 at wl <= min, 1 at wl >= 2 min.
        let w = ((wl / min_wavelength.max(1e-9) - 1.0).clamp(0.0, 1.0)) as f32;
        let v = if w > 0.0 {
            let s = seed.wrapping_add(o as u64 * 0x1000_0001);
            0.5 + (value(s, x / wl + o as f64 * 17.3, y / wl - o as f64 * 5.1) - 0.5) * w
        } else {
            0.5
        };
        sum += amp * v;
        norm += amp;
        amp *= 0.5;
        wl *= 0.5;
    }
    sum / norm
}

#[inline]
pub(crate) fn smoothstep(lo: f32, hi: f32, x: f32) -> f32 {
    let t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// The fbm level above which roughly `fraction` of the plane lies (fbm is close to normal
/// with mean 0.5; this linear fit of its quantiles is good enough for coverage targets).
pub(crate) fn threshold_for(fraction: f32) -> f32 {
    0.5 + (0.5 - fraction.clamp(0.0, 1.0)) * 0.36
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fbm_is_band_limited() {
        // Below the band limit every octave is replaced by its mean: a constant 0.5.
        for i in 0..50 {
            let x = i as f64 * 13.7;
            assert_eq!(fbm(5, x, -x, 10.0, 4, 1e6), 0.5);
        }
        // Above it the field varies and stays in [0, 1].
        let vals: Vec<f32> = (0..2000).map(|i| fbm(5, i as f64 * 7.3, i as f64 * 3.1, 50.0, 4, 0.0)).collect();
        assert!(vals.iter().all(|v| (0.0..=1.0).contains(v)));
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn threshold_gives_roughly_the_asked_coverage() {
        for frac in [0.2f32, 0.5, 0.8] {
            let t = threshold_for(frac);
            let n = 20_000;
            let above = (0..n)
                .filter(|i| {
                    let (x, y) = ((i % 141) as f64 * 37.0, (i / 141) as f64 * 37.0);
                    fbm(11, x, y, 160.0, 4, 0.0) > t
                })
                .count() as f32
                / n as f32;
            assert!((above - frac).abs() < 0.15, "asked {frac}, got {above}");
        }
    }

    #[test]
    fn floor_matches_std_for_negative_and_positive() {
        for x in [-2.5, -1.0, -0.1, 0.0, 0.1, 1.0, 2.9, 1e6 + 0.5] {
            assert_eq!(floor_i(x), x.floor() as i64, "{x}");
        }
    }
}
