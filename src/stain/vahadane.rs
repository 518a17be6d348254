//! Vahadane et al. (IEEE TMI 2016) structure-preserving stain normalisation, following staintools
//! 2.1.2 (`VahadaneStainExtractor` + `StainNormalizer`):
//!
//! 1. tissue = pixels whose OpenCV 8-bit luminosity / 255 < 0.8;
//! 2. OD = max(-ln(I/255), 1e-6) of the tissue pixels;
//! 3. sparse non-negative dictionary learning with two atoms: minimise
//!    Σᵢ ½‖xᵢ − D αᵢ‖² + λ‖αᵢ‖₁ over αᵢ ≥ 0, D ≥ 0, ‖dⱼ‖ ≤ 1 (spams `trainDL`, mode 2, λ = 0.1).
//!    staintools calls spams' stochastic online solver; here the same objective is minimised by
//!    deterministic batch alternation: an exact two-variable non-negative lasso per pixel, then
//!    block-coordinate dictionary updates (Mairal et al. 2010, Algorithm 2);
//! 4. rows ordered hematoxylin first (larger red OD) and normalised;
//! 5. concentrations of all pixels by non-negative lasso (λ = 0.01), 99th-percentile scaling,
//!    output `255·exp(−C·S_target)` truncated to u8.

use image::RgbImage;
use rayon::prelude::*;

use super::color::{od_table_staintools, Luminosity};
use super::stats::percentile;
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
        let mut out = Vec::with_capacity(conc.len() * 3);
        for a in &conc {
            let (c0, c1) = (a[0] * scale[0], a[1] * scale[1]);
            for ch in 0..3 {
                let v = 255.0 * (-(c0 * s[0][ch] + c1 * s[1][ch])).exp();
                out.push(v.min(255.0) as u8);
            }
        }
        Normalised::done(RgbImage::from_raw(img.width(), img.height(), out).expect("same size"))
    }
}

/// The staintools stain matrix of an image: rows H, E, unit norm.
pub fn stain_matrix(img: &RgbImage, params: &VahadaneParams) -> Result<[[f64; 3]; 2], NoEstimate> {
    let lum = Luminosity::new(params.luminosity_threshold);
    let od = od_table_staintools();
    let x: Vec<[f64; 3]> = img.pixels().filter(|p| lum.is_tissue(p.0)).map(|p| p.0.map(|v| od[v as usize])).collect();
    let total = (img.width() * img.height()) as usize;
    let needed = ((params.min_tissue_fraction * total as f64).ceil() as usize).max(2);
    if x.len() < needed {
        return Err(NoEstimate::TooLittleTissue { found: x.len(), total, needed });
    }
    let mut d = learn_dictionary(&x, params.regulariser, params.max_iter)?;
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
    let mut col: Vec<f64> = conc.iter().map(|a| a[0]).collect();
    let m0 = percentile(&mut col, 99.0);
    col.iter_mut().zip(&conc).for_each(|(c, a)| *c = a[1]);
    let m1 = percentile(&mut col, 99.0);
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
fn learn_dictionary(x: &[[f64; 3]], lambda: f64, max_iter: usize) -> Result<[[f64; 3]; 2], NoEstimate> {
    let mut d = initial_atoms(x)?;
    let mut prev = f64::INFINITY;
    for _ in 0..max_iter {
        let gram = Gram::new(&d);
        // sparse coding, then the sufficient statistics A = Σ ααᵀ, B = Σ x αᵀ
        let (a, b, obj) = x
            .par_chunks(4096)
            .map(|chunk| {
                let mut a = [[0.0; 2]; 2];
                let mut b = [[0.0; 3]; 2];
                let mut obj = 0.0;
                for xi in chunk {
                    let al = gram.lasso(&d, xi, lambda);
                    for j in 0..2 {
                        for k in 0..2 {
                            a[j][k] += al[j] * al[k];
                        }
                        for c in 0..3 {
                            b[j][c] += xi[c] * al[j];
                        }
                    }
                    let r: [f64; 3] = std::array::from_fn(|c| xi[c] - d[0][c] * al[0] - d[1][c] * al[1]);
                    obj += 0.5 * dot(&r, &r) + lambda * (al[0] + al[1]);
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
/// principal axis of the unit OD directions (a Macenko-like pair of extremes).
fn initial_atoms(x: &[[f64; 3]]) -> Result<[[f64; 3]; 2], NoEstimate> {
    let u: Vec<[f64; 3]> = x
        .iter()
        .map(|v| {
            let n = norm(v);
            v.map(|c| c / n)
        })
        .collect();
    let n = u.len() as f64;
    let mut mean = [0.0; 3];
    u.iter().for_each(|v| (0..3).for_each(|c| mean[c] += v[c] / n));
    let mut cov = [[0.0; 3]; 3];
    for v in &u {
        for i in 0..3 {
            for j in 0..3 {
                cov[i][j] += (v[i] - mean[i]) * (v[j] - mean[j]) / n;
            }
        }
    }
    let (_, vecs) = super::stats::eigh3(&cov);
    let axis = [vecs[0][2], vecs[1][2], vecs[2][2]];
    let mut proj: Vec<f64> = u.iter().map(|v| dot(v, &axis)).collect();
    let lo = percentile(&mut proj, 5.0);
    let hi = percentile(&mut proj, 95.0);
    let mut ends = [[0.0; 3]; 2];
    let mut counts = [0usize; 2];
    for v in &u {
        let p = dot(v, &axis);
        let side = if p <= lo {
            0
        } else if p >= hi {
            1
        } else {
            continue;
        };
        counts[side] += 1;
        (0..3).for_each(|c| ends[side][c] += v[c]);
    }
    for (e, &k) in ends.iter_mut().zip(&counts) {
        let nn = norm(e);
        if k == 0 || nn.is_nan() || nn <= 0.0 {
            return Err(NoEstimate::Degenerate("tissue OD has no spread to separate two stains".to_string()));
        }
        *e = e.map(|c| c / nn);
    }
    Ok(ends)
}
