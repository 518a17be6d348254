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

use super::color::{
    lab_to_linear_rgb, linear_rgb_to_lab, linear_rgb_to_lab4, srgb_linear_table, xyz2rgb, Luminosity, Ruderman,
    SrgbQuantiser,
};
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

/// Fraction-of-tissue check shared by both variants; returns (found, needed).
fn tissue_count(img: &RgbImage, min_fraction: f64) -> (usize, usize) {
    let lum = Luminosity::new(TISSUE_LUMINOSITY);
    let found = img.pixels().filter(|p| lum.is_tissue(p.0)).count();
    let total = (img.width() * img.height()) as usize;
    let needed = ((min_fraction * total as f64).ceil() as usize).max(1);
    (found, needed)
}

fn check_target(img: &RgbImage, min_fraction: f64, what: &str) -> Result<(), StainError> {
    let (found, needed) = tissue_count(img, min_fraction);
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

/// Runs `f` on a cleared per-thread pixel buffer: a fresh multi-megabyte allocation per image
/// costs more in page faults than the colour arithmetic. Large buffers are released afterwards.
fn with_buffer<R>(f: impl FnOnce(&mut Vec<[f64; 3]>) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<[f64; 3]>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        let r = f(&mut b);
        if b.capacity() > 4 << 20 {
            *b = Vec::new();
        }
        r
    })
}

/// Mean/std over pixels of a per-pixel 3-vector (two passes, f64).
fn channel_stats(values: &[[f64; 3]]) -> ChannelStats {
    let n = values.len().max(1) as f64;
    let mut mean = [0.0; 3];
    for v in values {
        for c in 0..3 {
            mean[c] += v[c];
        }
    }
    mean = mean.map(|m| m / n);
    let mut var = [0.0; 3];
    for v in values {
        for c in 0..3 {
            var[c] += (v[c] - mean[c]) * (v[c] - mean[c]);
        }
    }
    ChannelStats { mean, std: var.map(|s| (s / n).sqrt()) }
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
        let space = Ruderman::default();
        let stats = channel_stats(&to_lab(&space, target));
        check_target_stats(&stats, Method::Reinhard, RUDERMAN, FLAT_LAB_RUDERMAN, what)?;
        Self::from_stats(stats)
    }

    /// HistomicsTK `lab_mean_std`: mean and std of an image in lαβ.
    pub fn stats_of(img: &RgbImage) -> ChannelStats {
        channel_stats(&to_lab(&Ruderman::default(), img))
    }

    pub fn target(&self) -> ChannelStats {
        self.target
    }

    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        let (found, needed) = tissue_count(img, self.min_tissue_fraction);
        if found < needed {
            return Normalised::pass(img);
        }
        with_buffer(|lab| {
            lab.extend(img.pixels().map(|p| self.space.rgb_to_lab(p.0.map(f64::from))));
            self.transfer(img, lab)
        })
    }

    fn transfer(&self, img: &RgbImage, lab: &[[f64; 3]]) -> Normalised {
        let src = channel_stats(lab);
        if degenerate(&src) {
            return Normalised::pass(img);
        }
        let (gain, shift) = affine(&src, &self.target);
        let mut out = Vec::with_capacity(lab.len() * 3);
        for v in lab {
            let l: [f64; 3] = std::array::from_fn(|c| v[c] * gain[c] + shift[c]);
            // HistomicsTK: clip to [0, 255] then astype(uint8) truncates (NaN -> 0)
            let rgb = self.space.lab_to_rgb(l);
            out.extend(rgb.map(|x| if x.is_nan() { 0 } else { x.clamp(0.0, 255.0) as u8 }));
        }
        Normalised::done(RgbImage::from_raw(img.width(), img.height(), out).expect("same size"))
    }
}

fn to_lab(space: &Ruderman, img: &RgbImage) -> Vec<[f64; 3]> {
    img.pixels().map(|p| space.rgb_to_lab(p.0.map(f64::from))).collect()
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
        let stats = channel_stats(&lab_of(&lin, target));
        check_target_stats(&stats, Method::ReinhardLab, CIE_LAB, FLAT_LAB_CIE, what)?;
        Self::from_stats(stats)
    }

    pub fn target(&self) -> ChannelStats {
        self.target
    }

    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        let (found, needed) = tissue_count(img, self.min_tissue_fraction);
        if found < needed {
            return Normalised::pass(img);
        }
        with_buffer(|lab| {
            let lin = &*self.lin;
            let raw = img.as_raw();
            let mut quads = raw.chunks_exact(12);
            for q in &mut quads {
                let px: [[f64; 3]; 4] = std::array::from_fn(|k| std::array::from_fn(|c| lin[q[3 * k + c] as usize]));
                lab.extend(linear_rgb_to_lab4(&px));
            }
            for p in quads.remainder().chunks_exact(3) {
                lab.push(linear_rgb_to_lab([p[0], p[1], p[2]].map(|v| lin[v as usize])));
            }
            self.transfer(img, lab)
        })
    }

    fn transfer(&self, img: &RgbImage, lab: &[[f64; 3]]) -> Normalised {
        let src = channel_stats(lab);
        if degenerate(&src) {
            return Normalised::pass(img);
        }
        let (gain, shift) = affine(&src, &self.target);
        let mut out = Vec::with_capacity(lab.len() * 3);
        for v in lab {
            let l: [f64; 3] = std::array::from_fn(|c| v[c] * gain[c] + shift[c]);
            let rgb = lab_to_linear_rgb(l, &self.xyz2rgb);
            out.extend(rgb.map(|x| self.quant.quantise(x)));
        }
        Normalised::done(RgbImage::from_raw(img.width(), img.height(), out).expect("same size"))
    }
}

fn lab_of(lin: &[f64; 256], img: &RgbImage) -> Vec<[f64; 3]> {
    img.pixels().map(|p| linear_rgb_to_lab(p.0.map(|v| lin[v as usize]))).collect()
}
