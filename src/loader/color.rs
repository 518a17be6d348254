//! ColorJitter's four operations on RGB u8 images, following albumentations 2.0.8
//! (`augmentations/pixel/functional.py`, `adjust_*_torchvision`) and the OpenCV / albucore
//! 0.0.24 routines they call, so that results match to within rounding:
//! - brightness: LUT `clip(i * f, 0, 255)` computed in f32, cast to u8 by truncation (albucore `multiply`);
//! - contrast: mean of OpenCV's fixed-point RGB→grey image, then LUT `clip(i * f + mean * (1 - f))`, truncated;
//! - saturation: `cv2.addWeighted(img, f, grey, 1 - f, 0)`, rounded half to even (OpenCV `saturate_cast`);
//! - hue: OpenCV u8 RGB→HSV (H in [0, 180)), H shifted by `LUT (h + 180 f) mod 180` (truncated), HSV→RGB
//!   (OpenCV 4.14 `color_hsv.simd.hpp`).
//!
//! The 1.x releases the paper used compute the same LUTs and call the same OpenCV functions.

use super::image::Rgb8;

/// OpenCV's RGB→grey for u8: fixed point with 14 fractional bits (coefficients 0.299, 0.587, 0.114).
pub fn grey(r: u8, g: u8, b: u8) -> u8 {
    const R: u32 = 4899;
    const G: u32 = 9617;
    const B: u32 = 1868;
    ((r as u32 * R + g as u32 * G + b as u32 * B + (1 << 13)) >> 14) as u8
}

/// Applies a 256-entry table to every channel.
fn apply_lut(img: &mut Rgb8, lut: &[u8; 256]) {
    for v in img.data.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// `clip(i * factor + add)` in f32, truncated to u8 (numpy's float→uint8 cast after `np.clip`).
fn linear_lut(factor: f32, add: f32) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (i, l) in lut.iter_mut().enumerate() {
        *l = (i as f32 * factor + add).clamp(0.0, 255.0) as u8;
    }
    lut
}

pub fn brightness(img: &mut Rgb8, factor: f64) {
    if factor == 1.0 {
        return;
    }
    if factor == 0.0 {
        img.data.fill(0);
        return;
    }
    apply_lut(img, &linear_lut(factor as f32, 0.0));
}

pub fn contrast(img: &mut Rgb8, factor: f64) {
    if factor == 1.0 || img.data.is_empty() {
        return;
    }
    let sum: u64 = img.data.chunks_exact(3).map(|p| grey(p[0], p[1], p[2]) as u64).sum();
    let mean = sum as f64 / img.pixels() as f64;
    if factor == 0.0 {
        img.data.fill((mean + 0.5) as u8);
        return;
    }
    apply_lut(img, &linear_lut(factor as f32, (mean * (1.0 - factor)) as f32));
}

/// OpenCV's `saturate_cast<uchar>(float)`: round half to even, then clamp.
fn saturate_u8(x: f32) -> u8 {
    x.round_ties_even().clamp(0.0, 255.0) as u8
}

pub fn saturation(img: &mut Rgb8, factor: f64) {
    if factor == 1.0 {
        return;
    }
    let (a, b) = (factor as f32, (1.0 - factor) as f32);
    for p in img.data.chunks_exact_mut(3) {
        let g = grey(p[0], p[1], p[2]) as f32;
        for c in p.iter_mut() {
            *c = if factor == 0.0 { g as u8 } else { saturate_u8(*c as f32 * a + g * b) };
        }
    }
}

/// OpenCV's `sdiv_table` and `hdiv_table180`: `saturate_cast<int>((255 << 12) / i)` and
/// `saturate_cast<int>((180 << 12) / (6 i))`, entry 0 = 0. Built once.
fn hsv_tables() -> &'static ([i32; 256], [i32; 256]) {
    static TABLES: std::sync::OnceLock<([i32; 256], [i32; 256])> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let (mut sdiv, mut hdiv) = ([0i32; 256], [0i32; 256]);
        for i in 1..256 {
            sdiv[i] = ((255i64 << 12) as f64 / i as f64).round_ties_even() as i32;
            hdiv[i] = ((180i64 << 12) as f64 / (6.0 * i as f64)).round_ties_even() as i32;
        }
        (sdiv, hdiv)
    })
}

/// OpenCV `RGB2HSV_b` (hue range 180): integer tables with 12 fractional bits.
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    const SHIFT: i32 = 12;
    let (sdiv, hdiv) = hsv_tables();
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let v = r.max(g).max(b);
    let vmin = r.min(g).min(b);
    let diff = v - vmin;
    let s = (diff * sdiv[v as usize] + (1 << (SHIFT - 1))) >> SHIFT;
    let h = if v == r {
        g - b
    } else if v == g {
        b - r + 2 * diff
    } else {
        r - g + 4 * diff
    };
    let mut h = (h * hdiv[diff as usize] + (1 << (SHIFT - 1))) >> SHIFT;
    if h < 0 {
        h += 180;
    }
    (h as u8, s as u8, v as u8)
}

/// OpenCV `HSV2RGB_b` (hue range 180), as its SIMD path (`HSV2RGB_simd`) computes it for the
/// bulk of every row: f32 arithmetic and a final truncation (`v_trunc`) of `x * 255`. OpenCV's
/// scalar tail (the last `width mod lanes` pixels of a row) rounds instead; we do not mimic
/// that platform-dependent split, which costs a grey level on a few pixels.
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let s = s as f32 * (1.0 / 255.0);
    let v = v as f32 * (1.0 / 255.0);
    let h = h as f32 * (6.0 / 180.0);
    let pre = h.trunc();
    let f = h - pre;
    let sector = (pre - (pre * (1.0 / 6.0)).trunc() * 6.0) as i32;
    let tab = [v, v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))];
    // OpenCV's sector table gives (b, g, r) indices into tab.
    const SECTOR: [[usize; 3]; 6] = [[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]];
    let [bi, gi, ri] = SECTOR[sector.clamp(0, 5) as usize];
    let out = |x: f32| (x * 255.0).trunc().clamp(0.0, 255.0) as u8;
    (out(tab[ri]), out(tab[gi]), out(tab[bi]))
}

pub fn hue(img: &mut Rgb8, factor: f64) {
    if factor == 0.0 {
        return;
    }
    let mut lut = [0u8; 256];
    for (i, l) in lut.iter_mut().enumerate() {
        *l = (i as f64 + 180.0 * factor).rem_euclid(180.0) as u8;
    }
    for p in img.data.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        let (r, g, b) = hsv_to_rgb(lut[h as usize], s, v);
        p.copy_from_slice(&[r, g, b]);
    }
}

/// ColorJitter's four factors and the order they are applied in (0 brightness, 1 contrast,
/// 2 saturation, 3 hue), as albumentations draws them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    pub order: [u8; 4],
}

pub fn jitter(img: &mut Rgb8, j: &Jitter) {
    for &op in &j.order {
        match op {
            0 => brightness(img, j.brightness),
            1 => contrast(img, j.contrast),
            2 => saturation(img, j.saturation),
            _ => hue(img, j.hue),
        }
    }
}
