//! Macenko et al. (ISBI 2009) stain normalisation, with the semantics of torchstain 1.4.1's numpy
//! backend (`NumpyMacenkoNormalizer`): OD = -ln((I+1)/Io); tissue = pixels with OD ≥ beta in all
//! three channels; the plane of the two largest eigenvectors of their covariance; stain vectors at
//! the alpha / 100-alpha percentiles of the angle; concentrations by least squares over ALL pixels;
//! 99th-percentile scaling; output `Io·exp(-HERef·C)` clipped at 255 and truncated to u8.

use image::RgbImage;

use super::color::od_table_torchstain;
use super::simd::{self, Level, Planes, Px, V, W};
use super::stats::{eigh3, lerp, Mat3, TailSelect};
use super::{Method, Normalised, StainError, StainTarget, DEFAULT_MIN_TISSUE_FRACTION};

/// Macenko parameters (torchstain defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MacenkoParams {
    /// Transmitted light intensity (torchstain: 240).
    pub io: f64,
    /// Percentile for the extreme angles (torchstain: 1).
    pub alpha: f64,
    /// OD threshold for tissue pixels (torchstain: 0.15).
    pub beta: f64,
    /// Fewer tissue pixels than this fraction: pass through (tile) or error (target).
    pub min_tissue_fraction: f64,
}

impl Default for MacenkoParams {
    fn default() -> Self {
        MacenkoParams { io: 240.0, alpha: 1.0, beta: 0.15, min_tissue_fraction: DEFAULT_MIN_TISSUE_FRACTION }
    }
}

impl MacenkoParams {
    fn validate(&self) -> Result<(), StainError> {
        let ok = self.io.is_finite()
            && self.io > 0.0
            && (0.0..50.0).contains(&self.alpha)
            && self.beta.is_finite()
            && (0.0..=1.0).contains(&self.min_tissue_fraction);
        if ok {
            Ok(())
        } else {
            Err(StainError::InvalidParams(format!(
                "Macenko needs io > 0, 0 <= alpha < 50, finite beta and 0 <= min_tissue_fraction <= 1; got {self:?}"
            )))
        }
    }
}

/// torchstain's `HERef` default (as stain rows) and `maxCRef`.
pub const TORCHSTAIN_DEFAULT_TARGET: StainTarget =
    StainTarget { stains: [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], max_conc: [1.9705, 1.0308] };

/// A fitted Macenko normaliser.
#[derive(Debug, Clone)]
pub struct Macenko {
    params: MacenkoParams,
    target: StainTarget,
}

/// What Macenko extracts from one image.
#[derive(Debug, Clone)]
pub struct MacenkoEstimate {
    /// Stain matrix, hematoxylin first, as torchstain's `HE` (columns) transposed to rows.
    pub stains: [[f64; 3]; 2],
    /// 99th-percentile concentrations.
    pub max_conc: [f64; 2],
    /// The least-squares operator: `conc[s] = Σ_c pinv[s][c] · OD[c]`.
    pub pinv: [[f64; 3]; 2],
}

/// Why an image yields no estimate.
#[derive(Debug, Clone)]
pub enum NoEstimate {
    TooLittleTissue { found: usize, total: usize, needed: usize },
    Degenerate(String),
}

impl Macenko {
    /// torchstain's defaults without fitting (`HERef`, `maxCRef` built into `NumpyMacenkoNormalizer`).
    pub fn torchstain_default() -> Self {
        Macenko { params: MacenkoParams::default(), target: TORCHSTAIN_DEFAULT_TARGET }
    }

    pub fn from_target(target: StainTarget, params: MacenkoParams) -> Result<Self, StainError> {
        params.validate()?;
        target.validate()?;
        Ok(Macenko { params, target })
    }

    /// Fits on a target image. Errors when it has too little tissue or degenerate stains.
    pub fn fit(target: &RgbImage, params: MacenkoParams) -> Result<Self, StainError> {
        Self::fit_named(target, params, "target image")
    }

    pub(crate) fn fit_named(target: &RgbImage, params: MacenkoParams, what: &str) -> Result<Self, StainError> {
        params.validate()?;
        match estimate(target, &params) {
            Ok(e) => Self::from_target(StainTarget { stains: e.stains, max_conc: e.max_conc }, params),
            Err(NoEstimate::TooLittleTissue { found, total, needed }) => Err(StainError::TargetNoTissue {
                what: what.to_string(),
                test: "optical density >= beta",
                found,
                total,
                needed,
            }),
            Err(NoEstimate::Degenerate(detail)) => {
                Err(StainError::TargetDegenerate { what: what.to_string(), method: Method::Macenko, detail })
            }
        }
    }

    pub fn target(&self) -> StainTarget {
        self.target
    }

    pub fn params(&self) -> MacenkoParams {
        self.params
    }

    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        let Ok(est) = estimate(img, &self.params) else {
            return Normalised::pass(img);
        };
        // C2 = C / (maxC / maxCRef); out_ch = Io · exp(-Σ_s HERef[ch][s] · C2[s]). C is linear in
        // the per-channel OD, so out_ch = Io · Π_j exp(-A[ch][j] · OD(v_j)): 9 tables of 256
        // replace three exp per pixel.
        let scale = [self.target.max_conc[0] / est.max_conc[0], self.target.max_conc[1] / est.max_conc[1]];
        let io = self.params.io;
        let s = &self.target.stains;
        let od = od_table_torchstain(io);
        // tab[j][v][ch] = exp(-A[ch][j] · OD(v)), with io folded into the red-byte table:
        // (io · t0) · t1 · t2 in the order of the scalar formula
        let a: [[f64; 3]; 3] = std::array::from_fn(|ch| {
            std::array::from_fn(|j| s[0][ch] * est.pinv[0][j] * scale[0] + s[1][ch] * est.pinv[1][j] * scale[1])
        });
        let mut tab = [[[0.0f64; 4]; 256]; 3];
        for j in 0..3 {
            for v in 0..256 {
                for ch in 0..3 {
                    let t = (-a[ch][j] * od[v]).exp();
                    tab[j][v][ch] = if j == 0 { io * t } else { t };
                }
            }
        }
        let raw = img.as_raw();
        let mut out = vec![0u8; raw.len()];
        // one pixel's three table rows per vector (the compiler's own wide builds gather across
        // pixels instead, 3x slower on Zen 4: 2.3 ms AVX-512, 1.2 AVX2, 0.8 baseline)
        simd::od_output_rows(simd::level(), raw, &tab, &mut out);
        let image = RgbImage::from_raw(img.width(), img.height(), out).expect("same size");
        Normalised::done(image)
    }
}

/// Reusable per-thread buffers: nothing is allocated per pixel, and a fresh buffer per image would
/// cost page faults. Buffers larger than `KEEP` elements are released after use.
#[derive(Default)]
struct Scratch {
    /// The image's channel planes, and those of the sample.
    planes: Planes,
    sample_planes: Planes,
    /// Values of one chunk of pixels, two streams.
    chunk: [Vec<V>; 2],
    /// The pixels of the sample that sets the tail thresholds.
    sample_raw: Vec<u8>,
    sample: [Vec<f64>; 2],
    /// Kept tail values of up to two order statistics.
    kept: [Vec<f64>; 2],
}

const KEEP: usize = 4 << 20;
/// Pixels per chunk of a streaming pass (its values stay in the L1/L2 cache).
const CHUNK: usize = 4096;
/// About this many pixels sample the tails.
const SAMPLE: usize = 8192;

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Order statistics of two percentiles `qs[k]` of value streams `streams[k]` (0 or 1) that `fill`
/// computes from a run of pixels (NaN: not part of the population, whose size is `n`), without
/// storing the streams: thresholds from a sample of pixels, one pass keeping the tails, and a
/// second pass keeping everything for a tail the sample misjudged.
fn tail_order_stats(
    raw: &[u8],
    n: usize,
    streams: [usize; 2],
    qs: [f64; 2],
    s: &mut Scratch,
    fill: impl Fn(Px<'_>, &mut [V], &mut [V]),
) -> [(f64, f64, f64); 2] {
    let pixels = raw.len() / 3;
    let stride = (pixels / SAMPLE).max(1);
    s.sample_raw.clear();
    for p in raw.chunks_exact(3).step_by(stride) {
        s.sample_raw.extend_from_slice(p);
    }
    s.sample_planes.fill(simd::level(), &s.sample_raw);
    let sample = s.sample_planes.px();
    let [c0, c1] = &mut s.chunk;
    for c in [&mut *c0, &mut *c1] {
        c.resize(simd::blocks(CHUNK).max(sample.blocks()), [0.0; W]);
    }
    let nb = sample.blocks();
    fill(sample, &mut c0[..nb], &mut c1[..nb]);
    for k in 0..2 {
        let src = if k == 0 { &*c0 } else { &*c1 };
        s.sample[k].clear();
        s.sample[k].extend(src.as_flattened()[..sample.pixels].iter().copied().filter(|x| !x.is_nan()));
    }
    let mut tails: [TailSelect; 2] = std::array::from_fn(|k| {
        let mut sample = s.sample[streams[k]].clone();
        TailSelect::new(qs[k], &mut sample, std::mem::take(&mut s.kept[k]))
    });
    let all = s.planes.px();
    let mut pass = |tails: &mut [TailSelect; 2], todo: [bool; 2]| {
        for start in (0..all.blocks()).step_by(CHUNK / W) {
            let run = all.range(start, start + CHUNK / W);
            let nb = run.blocks();
            fill(run, &mut c0[..nb], &mut c1[..nb]);
            for k in 0..2 {
                if todo[k] {
                    let src = if streams[k] == 0 { &c0[..nb] } else { &c1[..nb] };
                    tails[k].offer_slice(&src.as_flattened()[..run.pixels]);
                }
            }
        }
    };
    pass(&mut tails, [true, true]);
    let mut out = [(f64::NAN, f64::NAN, 0.0); 2];
    let mut redo = [false; 2];
    for k in 0..2 {
        match tails[k].finish(n, qs[k]) {
            Some(r) => out[k] = r,
            None => redo[k] = true,
        }
    }
    if redo.iter().any(|&r| r) {
        for k in 0..2 {
            if redo[k] {
                tails[k] = TailSelect::all(qs[k], std::mem::take(&mut tails[k].kept));
            }
        }
        pass(&mut tails, redo);
        for k in 0..2 {
            if redo[k] {
                out[k] = tails[k].finish(n, qs[k]).expect("every value kept");
            }
        }
    }
    for (k, t) in tails.into_iter().enumerate() {
        s.kept[k] = t.kept;
    }
    out
}

/// A key with the same order as `atan2(y, x)` on (-π, π] but no trigonometry: the "diamond
/// angle". Only the few order statistics a percentile needs are turned back into angles.
#[inline(always)]
pub(crate) fn pseudo_angle(y: f64, x: f64) -> f64 {
    let s = x.abs() + y.abs();
    if s == 0.0 {
        return 0.0; // atan2(0, 0) = 0
    }
    let r = x / s;
    if y >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

/// The angle of a [`pseudo_angle`] key.
fn angle_of(p: f64) -> f64 {
    if p >= 0.0 {
        let r = 1.0 - p;
        (1.0 - r.abs()).atan2(r)
    } else {
        let r = p + 1.0;
        (-(1.0 - r.abs())).atan2(r)
    }
}

/// Estimates stain vectors and 99th-percentile concentrations (torchstain's `__compute_matrices`).
pub fn estimate(img: &RgbImage, params: &MacenkoParams) -> Result<MacenkoEstimate, NoEstimate> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let r = estimate_with(img, params, &mut s);
        if s.kept.iter().chain(&s.sample).any(|v| v.capacity() > KEEP) || s.planes.capacity() > KEEP {
            *s = Scratch::default();
        }
        r
    })
}

fn estimate_with(img: &RgbImage, params: &MacenkoParams, scratch: &mut Scratch) -> Result<MacenkoEstimate, NoEstimate> {
    let level = simd::level();
    let od = od_table_torchstain(params.io);
    let raw = img.as_raw();
    let total = raw.len() / 3;
    let needed = ((params.min_tissue_fraction * total as f64).ceil() as usize).max(3);
    scratch.planes.fill(level, raw);
    // tissue pixels (ODhat): no channel with OD < beta. OD falls as the byte rises, so that is
    // every byte <= tmax, a test on the bytes themselves.
    let tmax = od.iter().take_while(|&&v| v >= params.beta || v.is_nan()).count() as i32 - 1;
    debug_assert!(od.iter().skip((tmax + 1) as usize).all(|&v| v < params.beta));
    let tissue = |p: &[u8]| p.iter().all(|&v| v as i32 <= tmax);

    // np.cov(ODhat.T): sample covariance (ddof = 1), one pass of moments about a tissue pixel's OD
    let shift =
        raw.chunks_exact(3).find(|p| tissue(p)).map_or([0.0; 3], |p| [p[0], p[1], p[2]].map(|v| od[v as usize]));
    let m = simd::od_moments(level, scratch.planes.px(), &od, tmax, shift);
    let count = m.count;
    if count < needed {
        return Err(NoEstimate::TooLittleTissue { found: count, total, needed });
    }
    let n = count as f64;
    let s1: [f64; 3] = std::array::from_fn(|c| m.s1[c].iter().sum());
    let s2: [f64; 6] = std::array::from_fn(|k| m.s2[k].iter().sum());
    let mut cov: Mat3 = [[0.0; 3]; 3];
    for (k, (i, j)) in [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)].into_iter().enumerate() {
        cov[i][j] = (s2[k] - s1[i] * s1[j] / n) / (n - 1.0);
        cov[j][i] = cov[i][j];
    }
    let (_, vecs) = eigh3(&cov);
    // eigvecs[:, 1:3]: the middle and the largest eigenvector
    let e1 = [vecs[0][1], vecs[1][1], vecs[2][1]];
    let e2 = [vecs[0][2], vecs[1][2], vecs[2][2]];
    let dot = |a: &[f64; 3], b: &[f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];

    // phi = arctan2(That[:, 1], That[:, 0]); its alpha / 100-alpha percentiles
    let [lo, hi] = tail_order_stats(raw, count, [0, 0], [params.alpha, 100.0 - params.alpha], scratch, |px, a, _| {
        simd::od_angle_keys(level, px, &od, e1, e2, tmax, a)
    });
    let min_phi = lerp(angle_of(lo.0), angle_of(lo.1), lo.2);
    let max_phi = lerp(angle_of(hi.0), angle_of(hi.1), hi.2);
    let along = |a: f64| -> [f64; 3] { std::array::from_fn(|c| e1[c] * a.cos() + e2[c] * a.sin()) };
    let v_min = along(min_phi);
    let v_max = along(max_phi);
    // hematoxylin first: the vector with the larger red OD
    let stains = if v_min[0] > v_max[0] { [v_min, v_max] } else { [v_max, v_min] };
    if stains.iter().flatten().any(|v| !v.is_finite()) {
        return Err(NoEstimate::Degenerate("non-finite stain vectors".to_string()));
    }

    // least squares C = (HEᵀHE)⁻¹ HEᵀ Y for a 3×2 HE; tabulated per channel value
    let g = [
        [dot(&stains[0], &stains[0]), dot(&stains[0], &stains[1])],
        [dot(&stains[1], &stains[0]), dot(&stains[1], &stains[1])],
    ];
    let det = g[0][0] * g[1][1] - g[0][1] * g[1][0];
    if det.abs() < 1e-10 * (g[0][0] * g[1][1]).max(f64::MIN_POSITIVE) {
        return Err(NoEstimate::Degenerate("the two stain vectors are parallel".to_string()));
    }
    let gi = [[g[1][1] / det, -g[0][1] / det], [-g[1][0] / det, g[0][0] / det]];
    let pinv: [[f64; 3]; 2] =
        std::array::from_fn(|s| std::array::from_fn(|c| gi[s][0] * stains[0][c] + gi[s][1] * stains[1][c]));
    // the 99th percentile of each concentration over ALL pixels
    let [c0, c1] = tail_order_stats(raw, total, [0, 1], [99.0, 99.0], scratch, |px, a, b| {
        // at most AVX2: its AVX-512 build gathers slower on Zen 4 (0.6 ms against 0.3)
        simd::od_linear2(level.min(Level::Avx2), px, &od, pinv[0], pinv[1], a, b)
    });
    let m0 = lerp(c0.0, c0.1, c0.2);
    let m1 = lerp(c1.0, c1.1, c1.2);
    if !(m0.is_finite() && m1.is_finite() && m0 > 1e-9 && m1 > 1e-9) {
        return Err(NoEstimate::Degenerate(format!("99th-percentile concentrations are not positive ({m0}, {m1})")));
    }
    Ok(MacenkoEstimate { stains, max_conc: [m0, m1], pinv })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_angle_orders_like_atan2_and_inverts() {
        // deterministic points on a spiral through all four quadrants, plus the axes
        let mut pts: Vec<(f64, f64)> = (0..2000)
            .map(|i| {
                let a = -3.1 + i as f64 * 0.0031;
                let r = 0.1 + (i % 17) as f64;
                (r * a.sin(), r * a.cos())
            })
            .collect();
        pts.extend([(0.0, 1.0), (1.0, 0.0), (0.0, -1.0), (-1.0, 0.0), (0.0, 0.0)]);
        for &(y, x) in &pts {
            let k = pseudo_angle(y, x);
            assert!((angle_of(k) - y.atan2(x)).abs() < 1e-12, "({y}, {x})");
        }
        for w in pts.windows(2) {
            let (a, b) = (w[0].0.atan2(w[0].1), w[1].0.atan2(w[1].1));
            let (ka, kb) = (pseudo_angle(w[0].0, w[0].1), pseudo_angle(w[1].0, w[1].1));
            assert_eq!(a.total_cmp(&b), ka.total_cmp(&kb), "{w:?}");
        }
    }
}
