//! Reinhard et al. (2001) colour transfer: per-channel standardisation of the source to the target's
//! mean and standard deviation, in two colour spaces:
//!
//! * [`Reinhard`]: Ruderman lαβ on 0..255 RGB, as HistomicsTK's
//!   `color_normalization.reinhard(im, target_mu, target_sigma)`; the paper's BACH preprocessing uses
//!   it with [`ChannelStats::BACH`].
//! * [`ReinhardLab`]: CIE LAB, as torchstain's `NumpyReinhardNormalizer` (method=None).
//!
//! The peers have no tissue test; here a tile with less than `min_tissue_fraction` of pixels under
//! staintools' luminosity threshold (0.8), or with a constant channel, passes through unchanged.

use image::RgbImage;

use super::color::{srgb_linear_table, xyz2rgb, Luminosity, Ruderman, SrgbQuantiser, RGB2LMS, RGB2XYZ, WHITE};
use super::simd::{self, LabConsts, Moments, Planes, Px, V};
use super::stats::Mat3;
use super::{Method, Normalised, StainError, DEFAULT_MIN_TISSUE_FRACTION};

/// Luminosity threshold of the tissue test (staintools' default).
pub const TISSUE_LUMINOSITY: f64 = 0.8;

/// Below these standard deviations a target channel counts as constant (see `check_target_stats`): uniform up to
/// about one pixel in ten thousand one 8-bit level off. Stained tissue varies 100 to 1000 times more (the paper's
/// BACH target has lαβ std (0.61, 0.11, 0.029); the H&E fixtures have at least 0.008 in lαβ and 6 in LAB).
const FLAT_LAB_RUDERMAN: f64 = 1e-4;
const FLAT_LAB_CIE: f64 = 1e-2;

/// Per-channel mean and (population) standard deviation in the method's colour space.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChannelStats {
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ChannelStats {
    /// The paper's BACH target in HistomicsTK's lαβ (METHOD.md).
    pub const BACH: ChannelStats =
        ChannelStats { mean: [8.74108109, -0.12440419, 0.0444982], std: [0.6135447, 0.10989545, 0.0286032] };

    fn validate(&self) -> Result<(), StainError> {
        let ok = self.mean.iter().chain(&self.std).all(|v| v.is_finite()) && self.std.iter().all(|&s| s >= 0.0);
        if ok {
            Ok(())
        } else {
            Err(StainError::InvalidParams(format!("Reinhard target needs finite means and std >= 0, got {self:?}")))
        }
    }
}

/// Fraction-of-tissue check shared by both variants: (found, needed). With `stop_early` the count
/// stops once `needed` is reached (a tissue image is decided after a few rows).
fn tissue_count(img: &RgbImage, min_fraction: f64, stop_early: bool) -> (usize, usize) {
    let lum = Luminosity::new(TISSUE_LUMINOSITY);
    let total = (img.width() * img.height()) as usize;
    let needed = ((min_fraction * total as f64).ceil() as usize).max(1);
    let mut found = 0;
    for rows in img.as_raw().chunks(3 * 4096) {
        found += rows.chunks_exact(3).filter(|p| lum.is_tissue([p[0], p[1], p[2]])).count();
        if stop_early && found >= needed {
            break;
        }
    }
    (found, needed)
}

fn check_target(img: &RgbImage, min_fraction: f64, what: &str) -> Result<(), StainError> {
    let (found, needed) = tissue_count(img, min_fraction, false);
    if found < needed {
        return Err(StainError::TargetNoTissue {
            what: what.to_string(),
            test: "luminosity < 0.8",
            found,
            total: (img.width() * img.height()) as usize,
            needed,
        });
    }
    Ok(())
}

/// Runs `f` on the image's channel planes and a per-thread buffer of one entry per 8-pixel block:
/// a fresh multi-megabyte allocation per image costs more in page faults than the colour
/// arithmetic. Large buffers are released afterwards. The block buffer's contents on entry are
/// stale; the kernels overwrite every block.
fn with_blocks<R>(raw: &[u8], f: impl FnOnce(Px<'_>, &mut [[V; 3]]) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<(Planes, Vec<[V; 3]>)> = std::cell::RefCell::new(Default::default());
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        let (planes, buf) = &mut *b;
        planes.fill(simd::level(), raw);
        let blocks = simd::blocks(raw.len() / 3);
        if buf.len() != blocks {
            buf.clear();
            buf.resize(blocks, [[0.0; simd::W]; 3]);
        }
        let r = f(planes.px(), buf);
        if buf.len() > (1 << 20) / simd::W {
            *b = Default::default();
        }
        r
    })
}

fn stats(m: &Moments) -> ChannelStats {
    let (mean, std) = m.mean_std();
    ChannelStats { mean, std }
}

/// A colour space's name and its channels' names, for messages.
type Space = (&'static str, [&'static str; 3]);
const RUDERMAN: Space = ("lαβ", ["l", "α", "β"]);
const CIE_LAB: Space = ("LAB", ["L", "a", "b"]);

/// Refuses a target whose statistics cannot be transferred: non-finite values, or a channel that does not vary.
/// Standardising to a target std of 0 maps every pixel of that channel to the target's mean, so a uniform target
/// (solid black, one pixel, flat pink) would turn every image into one flat colour, and a grey target every image
/// grey: silent garbage where Macenko and Vahadane refuse. `flat` is the std below which a channel counts as
/// constant in the method's space.
fn check_target_stats(
    stats: &ChannelStats,
    method: Method,
    (space, names): Space,
    flat: f64,
    what: &str,
) -> Result<(), StainError> {
    let degenerate = |detail: String| StainError::TargetDegenerate { what: what.to_string(), method, detail };
    if stats.mean.iter().chain(&stats.std).any(|v| !v.is_finite()) {
        return Err(degenerate(format!("non-finite {space} statistics {stats:?}")));
    }
    let constant: Vec<&str> = (0..3).filter(|&c| stats.std[c] < flat).map(|c| names[c]).collect();
    let std = stats.std.map(|s| format!("{s:.1e}")).join(", ");
    match constant.len() {
        0 => Ok(()),
        3 => Err(degenerate(format!(
            "the image is uniform (one flat colour: {space} standard deviation {std}), so every normalised image \
             would come out as that one colour"
        ))),
        n => Err(degenerate(format!(
            "its {} {} not vary ({space} standard deviation {std}), so every normalised image would get one \
             constant value there (a grey target makes grey images)",
            constant.join(" and "),
            if n == 1 { "channel does" } else { "channels do" }
        ))),
    }
}

/// `(x - μs) / σs · σt + μt` folded into `x · gain + shift`.
fn affine(src: &ChannelStats, t: &ChannelStats) -> ([f64; 3], [f64; 3]) {
    let gain: [f64; 3] = std::array::from_fn(|c| t.std[c] / src.std[c]);
    let shift = std::array::from_fn(|c| t.mean[c] - src.mean[c] * gain[c]);
    (gain, shift)
}

/// Source statistics too flat to standardise (a constant channel would divide by zero).
fn degenerate(s: &ChannelStats) -> bool {
    s.std.iter().any(|&x| x.is_nan() || x <= 1e-9) || s.mean.iter().any(|m| !m.is_finite())
}

// ---------------------------------------------------------------- Ruderman lαβ (HistomicsTK)

/// Reinhard in Ruderman lαβ (HistomicsTK).
#[derive(Debug, Clone)]
pub struct Reinhard {
    target: ChannelStats,
    /// Below this tissue fraction a tile passes through.
    pub min_tissue_fraction: f64,
    space: Ruderman,
}

impl Reinhard {
    pub fn from_stats(target: ChannelStats) -> Result<Self, StainError> {
        target.validate()?;
        Ok(Reinhard { target, min_tissue_fraction: DEFAULT_MIN_TISSUE_FRACTION, space: Ruderman::default() })
    }

    /// The paper's BACH preprocessing.
    pub fn bach() -> Self {
        Self::from_stats(ChannelStats::BACH).expect("BACH stats are valid")
    }

    /// HistomicsTK `lab_mean_std` of the target.
    pub fn fit(target: &RgbImage) -> Result<Self, StainError> {
        Self::fit_named(target, "target image")
    }

    pub(crate) fn fit_named(target: &RgbImage, what: &str) -> Result<Self, StainError> {
        check_target(target, DEFAULT_MIN_TISSUE_FRACTION, what)?;
        let stats = Self::stats_of(target);
        check_target_stats(&stats, Method::Reinhard, RUDERMAN, FLAT_LAB_RUDERMAN, what)?;
        Self::from_stats(stats)
    }

    /// HistomicsTK `lab_mean_std`: mean and std of an image in lαβ.
    pub fn stats_of(img: &RgbImage) -> ChannelStats {
        let space = Ruderman::default();
        with_blocks(img.as_raw(), |px, lab| {
            stats(&simd::lab_beta_forward(simd::level(), px, &RGB2LMS, &space.lms2lab, lab))
        })
    }

    pub fn target(&self) -> ChannelStats {
        self.target
    }

    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        let (found, needed) = tissue_count(img, self.min_tissue_fraction, true);
        if found < needed {
            return Normalised::pass(img);
        }
        let raw = img.as_raw();
        let level = simd::level();
        with_blocks(raw, |px, lab| {
            let src = stats(&simd::lab_beta_forward(level, px, &RGB2LMS, &self.space.lms2lab, lab));
            if degenerate(&src) {
                return Normalised::pass(img);
            }
            let (gain, shift) = affine(&src, &self.target);
            let mut out = vec![0u8; raw.len()];
            simd::lab_beta_inverse(level, lab, gain, shift, &self.space.lab2lms, &self.space.lms2rgb, &mut out);
            Normalised::done(RgbImage::from_raw(img.width(), img.height(), out).expect("same size"))
        })
    }
}

// ---------------------------------------------------------------- CIE LAB (torchstain)

/// Reinhard in CIE LAB (torchstain numpy). Statistics are of L (0..100), a, b.
#[derive(Debug, Clone)]
pub struct ReinhardLab {
    target: ChannelStats,
    /// Below this tissue fraction a tile passes through.
    pub min_tissue_fraction: f64,
    lin: Box<[f64; 256]>,
    xyz2rgb: Mat3,
    quant: std::sync::Arc<SrgbQuantiser>,
}

impl ReinhardLab {
    pub fn from_stats(target: ChannelStats) -> Result<Self, StainError> {
        target.validate()?;
        Ok(ReinhardLab {
            target,
            min_tissue_fraction: DEFAULT_MIN_TISSUE_FRACTION,
            lin: Box::new(srgb_linear_table()),
            xyz2rgb: xyz2rgb(),
            quant: std::sync::Arc::new(SrgbQuantiser::new()),
        })
    }

    pub fn fit(target: &RgbImage) -> Result<Self, StainError> {
        Self::fit_named(target, "target image")
    }

    pub(crate) fn fit_named(target: &RgbImage, what: &str) -> Result<Self, StainError> {
        check_target(target, DEFAULT_MIN_TISSUE_FRACTION, what)?;
        let lin = srgb_linear_table();
        let k = LabConsts { lin: &lin, rgb2xyz: &RGB2XYZ, white: WHITE };
        let stats = with_blocks(target.as_raw(), |px, lab| stats(&simd::lab_forward(simd::level(), px, &k, lab)));
        check_target_stats(&stats, Method::ReinhardLab, CIE_LAB, FLAT_LAB_CIE, what)?;
        Self::from_stats(stats)
    }

    pub fn target(&self) -> ChannelStats {
        self.target
    }

    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        let (found, needed) = tissue_count(img, self.min_tissue_fraction, true);
        if found < needed {
            return Normalised::pass(img);
        }
        let raw = img.as_raw();
        let level = simd::level();
        let k = LabConsts { lin: &self.lin, rgb2xyz: &RGB2XYZ, white: WHITE };
        with_blocks(raw, |px, lab| {
            let src = stats(&simd::lab_forward(level, px, &k, lab));
            if degenerate(&src) {
                return Normalised::pass(img);
            }
            let (gain, shift) = affine(&src, &self.target);
            let mut out = vec![0u8; raw.len()];
            simd::lab_inverse(level, lab, gain, shift, &self.xyz2rgb, WHITE, &self.quant, &mut out);
            Normalised::done(RgbImage::from_raw(img.width(), img.height(), out).expect("same size"))
        })
    }
}
