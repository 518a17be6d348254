//! Vahadane et al. (IEEE TMI 2016) structure-preserving stain normalisation, following staintools
//! 2.1.2 (`VahadaneStainExtractor` + `StainNormalizer`):
//!
//! 1. tissue = pixels whose OpenCV 8-bit luminosity / 255 < 0.8;
//! 2. OD = max(-ln(I/255), 1e-6) of the tissue pixels;
//! 3. sparse non-negative dictionary learning with two atoms: minimise
//!    Σᵢ ½‖xᵢ − D αᵢ‖² + λ‖αᵢ‖₁ over αᵢ ≥ 0, D ≥ 0, ‖dⱼ‖ ≤ 1 (spams `trainDL`, mode 2, λ = 0.1).
//!    staintools calls spams' stochastic online solver; here the same objective is minimised by
//!    deterministic batch alternation: an exact two-variable non-negative lasso per pixel, then
//!    block-coordinate dictionary updates (Mairal et al. 2010, Algorithm 2). The objective is a
//!    sum over pixels of a function of the pixel's colour, so it runs over the DISTINCT tissue
//!    colours weighted by their pixel counts (a histology image has several times fewer colours
//!    than pixels): the same sums, in another order;
//! 4. rows ordered hematoxylin first (larger red OD) and normalised;
//! 5. concentrations of all pixels by non-negative lasso (λ = 0.01), 99th-percentile scaling,
//!    output `255·exp(−C·S_target)` truncated to u8.

use image::RgbImage;
use rayon::prelude::*;

use super::color::{od_table_staintools, Luminosity};
use super::simd;
use super::stats::{lerp, order_stats, TailSelect};
use super::{Method, Normalised, StainError, StainTarget, DEFAULT_MIN_TISSUE_FRACTION};

/// Vahadane parameters (staintools defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VahadaneParams {
    /// Tissue = luminosity below this (0..1).
    pub luminosity_threshold: f64,
    /// λ of the dictionary learning.
    pub regulariser: f64,
    /// λ of the concentration lasso.
    pub conc_regulariser: f64,
    /// Fewer tissue pixels than this fraction: pass through (tile) or error (target).
    pub min_tissue_fraction: f64,
    /// Outer iterations of the dictionary learning (stops earlier once converged).
    pub max_iter: usize,
}

impl Default for VahadaneParams {
    fn default() -> Self {
        VahadaneParams {
            luminosity_threshold: 0.8,
            regulariser: 0.1,
            conc_regulariser: 0.01,
            min_tissue_fraction: DEFAULT_MIN_TISSUE_FRACTION,
            max_iter: 300,
        }
    }
}

impl VahadaneParams {
    fn validate(&self) -> Result<(), StainError> {
        let ok = (0.0..=1.0).contains(&self.luminosity_threshold)
            && self.regulariser.is_finite()
            && self.regulariser >= 0.0
            && self.conc_regulariser.is_finite()
            && self.conc_regulariser >= 0.0
            && (0.0..=1.0).contains(&self.min_tissue_fraction)
            && self.max_iter > 0;
        if ok {
            Ok(())
        } else {
            Err(StainError::InvalidParams(format!(
                "Vahadane needs thresholds in [0, 1], regularisers >= 0 and max_iter > 0; got {self:?}"
            )))
        }
    }
}

/// A fitted Vahadane normaliser.
#[derive(Debug, Clone)]
pub struct Vahadane {
    params: VahadaneParams,
    target: StainTarget,
}

/// Why an image yields no stain matrix.
#[derive(Debug, Clone)]
pub enum NoEstimate {
    TooLittleTissue { found: usize, total: usize, needed: usize },
    Degenerate(String),
}

impl Vahadane {
    pub fn from_target(target: StainTarget, params: VahadaneParams) -> Result<Self, StainError> {
        params.validate()?;
        target.validate()?;
        Ok(Vahadane { params, target })
    }

    pub fn fit(target: &RgbImage, params: VahadaneParams) -> Result<Self, StainError> {
        Self::fit_named(target, params, "target image")
    }

    pub(crate) fn fit_named(target: &RgbImage, params: VahadaneParams, what: &str) -> Result<Self, StainError> {
        params.validate()?;
        let fail = |e: NoEstimate| match e {
            NoEstimate::TooLittleTissue { found, total, needed } => {
                StainError::TargetNoTissue { what: what.to_string(), test: "luminosity < 0.8", found, total, needed }
            }
            NoEstimate::Degenerate(detail) => {
                StainError::TargetDegenerate { what: what.to_string(), method: Method::Vahadane, detail }
            }
        };
        let stains = stain_matrix(target, &params).map_err(fail)?;
        let (_, max_conc) = concentrations(target, &stains, params.conc_regulariser).map_err(fail)?;
        Self::from_target(StainTarget { stains, max_conc }, params)
    }

    pub fn target(&self) -> StainTarget {
        self.target
    }

    pub fn params(&self) -> VahadaneParams {
        self.params
    }

    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        let Ok(stains) = stain_matrix(img, &self.params) else {
            return Normalised::pass(img);
        };
        let Ok((conc, max_c)) = concentrations(img, &stains, self.params.conc_regulariser) else {
            return Normalised::pass(img);
        };
        let scale = [self.target.max_conc[0] / max_c[0], self.target.max_conc[1] / max_c[1]];
        let s = &self.target.stains;
        let mut out = vec![0u8; conc.len() * 3];
        simd::conc_output(simd::level(), &conc, scale, s, &mut out);
        Normalised::done(RgbImage::from_raw(img.width(), img.height(), out).expect("same size"))
    }
}

/// The staintools stain matrix of an image: rows H, E, unit norm.
pub fn stain_matrix(img: &RgbImage, params: &VahadaneParams) -> Result<[[f64; 3]; 2], NoEstimate> {
    let lum = Luminosity::new(params.luminosity_threshold);
    let od = od_table_staintools();
    let (colours, counts) = distinct_tissue_colours(img, &lum);
    let found: usize = counts.iter().map(|&c| c as usize).sum();
    let total = (img.width() * img.height()) as usize;
    let needed = ((params.min_tissue_fraction * total as f64).ceil() as usize).max(2);
    if found < needed {
        return Err(NoEstimate::TooLittleTissue { found, total, needed });
    }
    let x: Vec<[f64; 3]> =
        colours.iter().map(|&c| [c >> 16, (c >> 8) & 255, c & 255].map(|v| od[v as usize])).collect();
    let w: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let mut d = learn_dictionary(&x, &w, params.regulariser, params.max_iter)?;
    // H first: larger red OD
    if d[0][0] < d[1][0] {
        d.swap(0, 1);
    }
    for row in d.iter_mut() {
        let n = norm(row);
        if !(n > 0.0 && n.is_finite()) {
            return Err(NoEstimate::Degenerate("an empty stain vector".to_string()));
        }
        *row = row.map(|v| v / n);
    }
    Ok(d)
}

/// Non-negative lasso concentrations of every pixel and their 99th percentiles.
pub fn concentrations(
    img: &RgbImage,
    stains: &[[f64; 3]; 2],
    lambda: f64,
) -> Result<(Vec<[f64; 2]>, [f64; 2]), NoEstimate> {
    let od = od_table_staintools();
    let gram = Gram::new(stains);
    // the lasso depends on the colour only: memoising would help little, pixels are cheap
    let conc: Vec<[f64; 2]> = img
        .as_raw()
        .par_chunks_exact(3)
        .map(|p| {
            let x = [od[p[0] as usize], od[p[1] as usize], od[p[2] as usize]];
            gram.lasso(stains, &x, lambda)
        })
        .collect();
    let m0 = tail_percentile(conc.iter().map(|a| a[0]), conc.len(), 99.0);
    let m1 = tail_percentile(conc.iter().map(|a| a[1]), conc.len(), 99.0);
    if !(m0 > 1e-9 && m1 > 1e-9 && m0.is_finite() && m1.is_finite()) {
        return Err(NoEstimate::Degenerate(format!("99th-percentile concentrations are not positive ({m0}, {m1})")));
    }
    Ok((conc, [m0, m1]))
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn norm(a: &[f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

/// Gram matrix of a two-atom dictionary, for the per-pixel lasso.
struct Gram {
    g: [[f64; 2]; 2],
    det: f64,
}

impl Gram {
    fn new(d: &[[f64; 3]; 2]) -> Self {
        let g = [[dot(&d[0], &d[0]), dot(&d[0], &d[1])], [dot(&d[1], &d[0]), dot(&d[1], &d[1])]];
        Gram { det: g[0][0] * g[1][1] - g[0][1] * g[1][0], g }
    }

    /// Exact solution of min_α≥0 ½‖x − Dᵀα‖² + λ(α₀ + α₁) for two atoms: the objective is
    /// convex, so the active set whose stationary point satisfies the KKT conditions is optimal.
    fn lasso(&self, d: &[[f64; 3]; 2], x: &[f64; 3], lambda: f64) -> [f64; 2] {
        let g = &self.g;
        let c = [dot(&d[0], x) - lambda, dot(&d[1], x) - lambda];
        // both atoms active
        if self.det > 1e-12 * g[0][0] * g[1][1] {
            let a0 = (g[1][1] * c[0] - g[0][1] * c[1]) / self.det;
            let a1 = (g[0][0] * c[1] - g[1][0] * c[0]) / self.det;
            if a0 > 0.0 && a1 > 0.0 {
                return [a0, a1];
            }
        }
        // one atom active; the other's gradient must not want to grow
        let a0 = if g[0][0] > 0.0 { c[0] / g[0][0] } else { 0.0 };
        let a1 = if g[1][1] > 0.0 { c[1] / g[1][1] } else { 0.0 };
        let only0 = a0 > 0.0 && c[1] - g[1][0] * a0 <= 0.0;
        let only1 = a1 > 0.0 && c[0] - g[0][1] * a1 <= 0.0;
        match (only0, only1) {
            (true, true) => {
                // only possible with parallel atoms: take the lower objective
                let f0 = -0.5 * g[0][0] * a0 * a0;
                let f1 = -0.5 * g[1][1] * a1 * a1;
                if f0 <= f1 {
                    [a0, 0.0]
                } else {
                    [0.0, a1]
                }
            }
            (true, false) => [a0, 0.0],
            (false, true) => [0.0, a1],
            (false, false) => [0.0, 0.0],
        }
    }
}

/// Batch alternating minimisation of the spams `trainDL` objective (mode 2, positive codes and
/// atoms, ‖dⱼ‖ ≤ 1), started from the two extreme OD directions of the data.
fn learn_dictionary(x: &[[f64; 3]], w: &[f64], lambda: f64, max_iter: usize) -> Result<[[f64; 3]; 2], NoEstimate> {
    let mut d = initial_atoms(x, w)?;
    let mut prev = f64::INFINITY;
    for _ in 0..max_iter {
        let gram = Gram::new(&d);
        // sparse coding, then the sufficient statistics A = Σ ααᵀ, B = Σ x αᵀ
        let (a, b, obj) = x
            .par_chunks(4096)
            .zip(w.par_chunks(4096))
            .map(|(chunk, wc)| {
                let mut a = [[0.0; 2]; 2];
                let mut b = [[0.0; 3]; 2];
                let mut obj = 0.0;
                for (xi, &wi) in chunk.iter().zip(wc) {
                    let al = gram.lasso(&d, xi, lambda);
                    let wal = [wi * al[0], wi * al[1]];
                    for j in 0..2 {
                        for k in 0..2 {
                            a[j][k] += wal[j] * al[k];
                        }
                        for c in 0..3 {
                            b[j][c] += xi[c] * wal[j];
                        }
                    }
                    let r: [f64; 3] = std::array::from_fn(|c| xi[c] - d[0][c] * al[0] - d[1][c] * al[1]);
                    obj += wi * (0.5 * dot(&r, &r) + lambda * (al[0] + al[1]));
                }
                (a, b, obj)
            })
            .reduce(
                || ([[0.0; 2]; 2], [[0.0; 3]; 2], 0.0),
                |(a1, b1, o1), (a2, b2, o2)| {
                    (
                        std::array::from_fn(|j| std::array::from_fn(|k| a1[j][k] + a2[j][k])),
                        std::array::from_fn(|j| std::array::from_fn(|c| b1[j][c] + b2[j][c])),
                        o1 + o2,
                    )
                },
            );
        // dictionary update: a few block-coordinate passes on the quadratic surrogate
        for _ in 0..3 {
            for j in 0..2 {
                if a[j][j] <= 1e-12 {
                    continue; // unused atom: keep it
                }
                let u: [f64; 3] = std::array::from_fn(|c| {
                    let da = d[0][c] * a[0][j] + d[1][c] * a[1][j];
                    (d[j][c] + (b[j][c] - da) / a[j][j]).max(0.0)
                });
                let n = norm(&u).max(1.0);
                d[j] = u.map(|v| v / n);
            }
        }
        if !obj.is_finite() {
            return Err(NoEstimate::Degenerate("dictionary learning diverged".to_string()));
        }
        if (prev - obj).abs() <= 1e-9 * obj.abs().max(1e-12) {
            break;
        }
        prev = obj;
    }
    Ok(d)
}

/// Deterministic start: the mean unit OD direction of the pixels at either end of the first
/// principal axis of the unit OD directions (a Macenko-like pair of extremes). `x` are distinct
/// colours, `w` their pixel counts: every statistic is over pixels.
fn initial_atoms(x: &[[f64; 3]], w: &[f64]) -> Result<[[f64; 3]; 2], NoEstimate> {
    let u: Vec<[f64; 3]> = x
        .iter()
        .map(|v| {
            let n = norm(v);
            v.map(|c| c / n)
        })
        .collect();
    let n: f64 = w.iter().sum();
    let mut mean = [0.0; 3];
    u.iter().zip(w).for_each(|(v, &wi)| (0..3).for_each(|c| mean[c] += wi * v[c] / n));
    let mut cov = [[0.0; 3]; 3];
    for (v, &wi) in u.iter().zip(w) {
        for i in 0..3 {
            for j in 0..3 {
                cov[i][j] += wi * (v[i] - mean[i]) * (v[j] - mean[j]) / n;
            }
        }
    }
    let (_, vecs) = super::stats::eigh3(&cov);
    let axis = [vecs[0][2], vecs[1][2], vecs[2][2]];
    // np.percentile over pixels of the projections: sort the distinct values, walk their counts
    let mut proj: Vec<(f64, f64)> = u.iter().zip(w).map(|(v, &wi)| (dot(v, &axis), wi)).collect();
    proj.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let pixels = n as usize;
    let lo = weighted_percentile(&proj, pixels, 5.0);
    let hi = weighted_percentile(&proj, pixels, 95.0);
    let mut ends = [[0.0; 3]; 2];
    let mut counts = [0.0f64; 2];
    for (v, &wi) in u.iter().zip(w) {
        let p = dot(v, &axis);
        let side = if p <= lo {
            0
        } else if p >= hi {
            1
        } else {
            continue;
        };
        counts[side] += wi;
        (0..3).for_each(|c| ends[side][c] += wi * v[c]);
    }
    for (e, &k) in ends.iter_mut().zip(&counts) {
        let nn = norm(e);
        if k == 0.0 || nn.is_nan() || nn <= 0.0 {
            return Err(NoEstimate::Degenerate("tissue OD has no spread to separate two stains".to_string()));
        }
        *e = e.map(|c| c / nn);
    }
    Ok(ends)
}

/// `np.percentile` (linear) of `pixels` values given as sorted distinct `(value, count)` pairs.
fn weighted_percentile(sorted: &[(f64, f64)], pixels: usize, q: f64) -> f64 {
    if pixels == 0 {
        return f64::NAN;
    }
    let pos = (q / 100.0) * (pixels - 1) as f64;
    let lo = (pos.floor() as usize).min(pixels - 1);
    let t = pos - lo as f64;
    // the value at sorted rank r
    let at = |r: usize| {
        let mut seen = 0usize;
        for &(v, c) in sorted {
            seen += c as usize;
            if r < seen {
                return v;
            }
        }
        sorted.last().map_or(f64::NAN, |p| p.0)
    };
    let a = at(lo);
    if lo + 1 >= pixels || t == 0.0 {
        return a;
    }
    lerp(a, at(lo + 1), t)
}

/// The distinct colours (`r << 16 | g << 8 | b`, ascending) of the tissue pixels and their counts.
fn distinct_tissue_colours(img: &RgbImage, lum: &Luminosity) -> (Vec<u32>, Vec<u32>) {
    let mut codes: Vec<u32> = img
        .as_raw()
        .chunks_exact(3)
        .filter(|p| lum.is_tissue([p[0], p[1], p[2]]))
        .map(|p| (p[0] as u32) << 16 | (p[1] as u32) << 8 | p[2] as u32)
        .collect();
    radix_sort24(&mut codes);
    let mut colours = Vec::new();
    let mut counts: Vec<u32> = Vec::new();
    for &c in &codes {
        if colours.last() == Some(&c) {
            *counts.last_mut().expect("one per colour") += 1;
        } else {
            colours.push(c);
            counts.push(1);
        }
    }
    (colours, counts)
}

/// Sorts 24-bit keys: two counting passes of 12 bits.
fn radix_sort24(v: &mut Vec<u32>) {
    let mut tmp = vec![0u32; v.len()];
    for shift in [0u32, 12] {
        let mut start = vec![0usize; 4097];
        for &x in v.iter() {
            start[((x >> shift) & 4095) as usize + 1] += 1;
        }
        for i in 1..4097 {
            start[i] += start[i - 1];
        }
        for &x in v.iter() {
            let k = ((x >> shift) & 4095) as usize;
            tmp[start[k]] = x;
            start[k] += 1;
        }
        std::mem::swap(v, &mut tmp);
    }
}

/// `np.percentile(values, q)` for q near 100 of `n` values offered twice at most: a tail above a
/// threshold from a sample, or every value when the sample misjudged it.
fn tail_percentile(values: impl Iterator<Item = f64> + Clone, n: usize, q: f64) -> f64 {
    let stride = (n / 8192).max(1);
    let mut sample: Vec<f64> = values.clone().step_by(stride).collect();
    let mut tail = TailSelect::new(q, &mut sample, Vec::new());
    values.clone().for_each(|x| tail.offer(x));
    if let Some((a, b, t)) = tail.finish(n, q) {
        return lerp(a, b, t);
    }
    let mut all: Vec<f64> = values.collect();
    let (a, b, t) = order_stats(&mut all, q);
    lerp(a, b, t)
}
