//! Geometric transforms with OpenCV's conventions, as albumentations 2.0.8 calls them:
//! - flip: `cv2.flip(img, d)`, d = 0 flips rows (vertical), 1 columns (horizontal), -1 both
//!   (albumentations 1.x `Flip` drew d uniformly from {-1, 0, 1});
//! - rotate: `cv2.warpAffine` with the matrix of `create_affine_transformation_matrix` about the
//!   centre `(w/2 - 0.5, h/2 - 0.5)`, bilinear; a positive angle turns the content
//!   counter-clockwise on screen, as `cv2.getRotationMatrix2D`;
//! - translate: albumentations `Affine(translate_percent)` shifts by `int(t * size)` whole pixels
//!   (`_get_translate_params`), bilinear with a constant 0 border by default;
//! - resize: `cv2.resize(INTER_LINEAR)`: half-pixel centres, edge-clamped, no antialiasing, fixed point;
//! - crop: a plain window copy.
//!
//! OpenCV warps in fixed point (positions quantised to 1/32 pixel); `warp` uses f32, so rotated
//! results can differ by a grey level here and there (the parity tests bound it).

use super::image::Rgb8;

/// How pixels outside the source are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Border {
    /// Zeros (`cv2.BORDER_CONSTANT`, value 0).
    Constant,
    /// Mirror without repeating the edge pixel: `gfedcb|abcdefgh|gfedcba` (`cv2.BORDER_REFLECT_101`).
    Reflect101,
}

/// The flip codes of `cv2.flip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlipCode {
    /// d = 0: upside down (rows reversed).
    Vertical,
    /// d = 1: mirrored left-right (columns reversed).
    Horizontal,
    /// d = -1: both.
    Both,
}

impl FlipCode {
    /// From the OpenCV integer code.
    pub fn from_cv(d: i32) -> FlipCode {
        match d {
            0 => FlipCode::Vertical,
            d if d > 0 => FlipCode::Horizontal,
            _ => FlipCode::Both,
        }
    }
}

pub fn flip(img: &Rgb8, code: FlipCode) -> Rgb8 {
    let (w, h) = (img.width, img.height);
    let mut out = Rgb8::new(w, h);
    let flip_x = matches!(code, FlipCode::Horizontal | FlipCode::Both);
    let flip_y = matches!(code, FlipCode::Vertical | FlipCode::Both);
    for y in 0..h {
        let sy = if flip_y { h - 1 - y } else { y };
        let src = &img.data[sy * w * 3..(sy + 1) * w * 3];
        let dst = &mut out.data[y * w * 3..(y + 1) * w * 3];
        if flip_x {
            for x in 0..w {
                dst[x * 3..x * 3 + 3].copy_from_slice(&src[(w - 1 - x) * 3..(w - x) * 3]);
            }
        } else {
            dst.copy_from_slice(src);
        }
    }
    out
}

/// Index `i` mapped into [0, n) by the border rule; `None` for a constant border outside.
fn border_index(i: i64, n: usize, border: Border) -> Option<usize> {
    let n = n as i64;
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    match border {
        Border::Constant => None,
        Border::Reflect101 => {
            if n == 1 {
                return Some(0);
            }
            let period = 2 * (n - 1);
            let mut j = i.rem_euclid(period);
            if j >= n {
                j = period - j;
            }
            Some(j as usize)
        }
    }
}

/// A 2×3 affine map from destination to source coordinates: `src = A · (x, y, 1)`.
pub type InverseMap = [[f64; 3]; 2];

/// Bilinear warp: each destination pixel samples the source at `map(x, y)`.
pub fn warp(img: &Rgb8, map: &InverseMap, out_w: usize, out_h: usize, border: Border) -> Rgb8 {
    let mut out = Rgb8::new(out_w, out_h);
    let (w, h) = (img.width, img.height);
    for y in 0..out_h {
        for x in 0..out_w {
            let sx = map[0][0] * x as f64 + map[0][1] * y as f64 + map[0][2];
            let sy = map[1][0] * x as f64 + map[1][1] * y as f64 + map[1][2];
            let x0 = sx.floor();
            let y0 = sy.floor();
            let fx = (sx - x0) as f32;
            let fy = (sy - y0) as f32;
            let (x0, y0) = (x0 as i64, y0 as i64);
            let o = (y * out_w + x) * 3;
            if x0 >= 0 && y0 >= 0 && x0 + 1 < w as i64 && y0 + 1 < h as i64 {
                // Inside: all four taps, in the same order (and so the same rounding) as below.
                let i = (y0 as usize * w + x0 as usize) * 3;
                let (w00, w01, w10, w11) = ((1.0 - fx) * (1.0 - fy), fx * (1.0 - fy), (1.0 - fx) * fy, fx * fy);
                // Adding a zero-weight term changes nothing, so no skips are needed here.
                let top = &img.data[i..i + 6];
                let bottom = &img.data[i + w * 3..i + w * 3 + 6];
                for c in 0..3 {
                    let a = w00 * top[c] as f32
                        + w01 * top[c + 3] as f32
                        + w10 * bottom[c] as f32
                        + w11 * bottom[c + 3] as f32;
                    out.data[o + c] = a.round().clamp(0.0, 255.0) as u8;
                }
                continue;
            }
            let mut acc = [0f32; 3];
            for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
                if wy == 0.0 {
                    continue;
                }
                let Some(yy) = border_index(y0 + dy, h, border) else { continue };
                for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
                    if wx == 0.0 {
                        continue;
                    }
                    let Some(xx) = border_index(x0 + dx, w, border) else { continue };
                    let i = (yy * w + xx) * 3;
                    let wgt = wx * wy;
                    for (a, &v) in acc.iter_mut().zip(&img.data[i..i + 3]) {
                        *a += wgt * v as f32;
                    }
                }
            }
            for (d, a) in out.data[o..o + 3].iter_mut().zip(acc) {
                *d = a.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Rotation by `angle` degrees about the image centre, same size.
pub fn rotate(img: &Rgb8, angle: f64, border: Border) -> Rgb8 {
    let (cx, cy) = (img.width as f64 / 2.0 - 0.5, img.height as f64 / 2.0 - 0.5);
    let a = (angle.rem_euclid(360.0)).to_radians();
    let (s, c) = a.sin_cos();
    // Forward: p' = C + R (p - C), R = [[c, s], [-s, c]]; inverse: p = C + Rᵀ (p' - C).
    let map = [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]];
    warp(img, &map, img.width, img.height, border)
}

/// Shift by whole pixels (`dx` right, `dy` down).
pub fn translate(img: &Rgb8, dx: i64, dy: i64, border: Border) -> Rgb8 {
    if dx == 0 && dy == 0 {
        return img.clone();
    }
    // A whole-pixel shift samples exactly on pixels: a copy with the border rule, no blending.
    let (w, h) = (img.width, img.height);
    let mut out = Rgb8::new(w, h);
    for y in 0..h {
        let Some(sy) = border_index(y as i64 - dy, h, border) else { continue };
        for x in 0..w {
            if let Some(sx) = border_index(x as i64 - dx, w, border) {
                let (o, i) = ((y * w + x) * 3, (sy * w + sx) * 3);
                out.data[o..o + 3].copy_from_slice(&img.data[i..i + 3]);
            }
        }
    }
    out
}

/// Per output coordinate: the two source indices and their 11-bit fixed-point weights, as
/// `cv2.resize` INTER_LINEAR computes them (`resize.cpp`: `fx = (dx + 0.5) * scale - 0.5`,
/// clamped at the edges, each weight `saturate_cast<short>(w * 2048)`).
fn linear_taps(out: usize, src: usize) -> Vec<(usize, usize, i32, i32)> {
    let scale = src as f64 / out as f64;
    (0..out)
        .map(|i| {
            let s = ((i as f64 + 0.5) * scale - 0.5) as f32;
            let mut i0 = s.floor() as i64;
            let mut f = s - i0 as f32;
            if i0 < 0 {
                i0 = 0;
                f = 0.0;
            }
            if i0 >= src as i64 - 1 {
                i0 = src as i64 - 1;
                f = 0.0;
            }
            let i0 = i0 as usize;
            let w0 = ((1.0 - f) * 2048.0).round() as i32;
            let w1 = (f * 2048.0).round() as i32;
            (i0, (i0 + 1).min(src - 1), w0, w1)
        })
        .collect()
}

/// Bilinear resize like `cv2.resize(..., INTER_LINEAR)` on u8, in OpenCV's fixed point: a
/// horizontal pass to integers scaled by 2048, then the vertical pass of its SIMD kernel
/// (`VResizeLinearVec_32s8u`): `((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2`.
pub fn resize(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    if out_w == img.width && out_h == img.height {
        return img.clone();
    }
    let xs = linear_taps(out_w, img.width);
    let ys = linear_taps(out_h, img.height);
    let w = img.width;
    let mut rows = vec![0i32; img.height * out_w * 3];
    for y in 0..img.height {
        let src = &img.data[y * w * 3..(y + 1) * w * 3];
        let dst = &mut rows[y * out_w * 3..(y + 1) * out_w * 3];
        for (x, &(a, b, w0, w1)) in xs.iter().enumerate() {
            for c in 0..3 {
                dst[x * 3 + c] = src[a * 3 + c] as i32 * w0 + src[b * 3 + c] as i32 * w1;
            }
        }
    }
    let mut out = Rgb8::new(out_w, out_h);
    let row = out_w * 3;
    for (y, &(a, b, w0, w1)) in ys.iter().enumerate() {
        let (ra, rb) = (&rows[a * row..(a + 1) * row], &rows[b * row..(b + 1) * row]);
        for (o, (&va, &vb)) in out.data[y * row..(y + 1) * row].iter_mut().zip(ra.iter().zip(rb)) {
            let v = (((w0 * (va >> 4)) >> 16) + ((w1 * (vb >> 4)) >> 16) + 2) >> 2;
            *o = v.clamp(0, 255) as u8;
        }
    }
    out
}

/// The `w`×`h` window at (x, y); the caller keeps it inside the image.
pub fn crop(img: &Rgb8, x: usize, y: usize, w: usize, h: usize) -> Rgb8 {
    let mut out = Rgb8::new(w, h);
    for r in 0..h {
        let s = ((y + r) * img.width + x) * 3;
        out.data[r * w * 3..(r + 1) * w * 3].copy_from_slice(&img.data[s..s + w * 3]);
    }
    out
}
