//! Stain normalisation of H&E images: Macenko, Reinhard (Ruderman lαβ as HistomicsTK, and CIE LAB as
//! torchstain) and Vahadane.
//!
//! Each normaliser is fitted once (on a target image, or from stored target parameters) and then
//! normalises many images; it is `Send + Sync`, so the file- and folder-level helpers in [`files`]
//! run images in parallel with rayon. A tile with almost no tissue is passed through unchanged and
//! flagged ([`Normalised::passed_through`]); a target with almost no tissue is an error.
//!
//! Parity references (see `scripts/stain/` and `tests/stain_parity.rs`): torchstain 1.4.1's numpy
//! backend (Macenko, Reinhard LAB), HistomicsTK 1.4.0 (Reinhard lαβ), staintools 2.1.2 (Vahadane).

// Colour and 3×3 matrix code indexes small fixed-size arrays by channel; index loops read better.
#![allow(clippy::needless_range_loop)]

pub mod color;
pub mod files;
pub mod macenko;
pub mod reinhard;
pub mod simd;
pub mod stats;
pub mod vahadane;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use files::{
    load_rgb, normalise_dir, normalise_dir_with, normalise_files, output_relpath, save_png_atomic, Counts,
};
pub use image::RgbImage;
pub use macenko::{Macenko, MacenkoParams};
pub use reinhard::{ChannelStats, Reinhard, ReinhardLab};
pub use vahadane::{Vahadane, VahadaneParams};

/// Below this fraction of tissue pixels a tile is passed through unchanged (and a target is refused).
pub const DEFAULT_MIN_TISSUE_FRACTION: f64 = 0.01;

/// Errors of the stain module. Messages name the file or value at fault and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StainError {
    #[error("{}: cannot read file: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: not a PNG, JPEG or TIFF image (unrecognised header); remove it or convert it", path.display())]
    NotImage { path: PathBuf },
    #[error("{}: cannot decode {format} ({bytes} bytes on disk): {detail}; the file is probably truncated or corrupt, re-download or remove it", path.display())]
    Decode { path: PathBuf, format: String, bytes: u64, detail: String },
    #[error("{}: cannot write output: {detail}; check the output folder is writable and has space", path.display())]
    Write { path: PathBuf, detail: String },
    #[error("{what}: target has almost no tissue ({found} of {total} pixels pass the {test} test, need at least {needed}); choose a target image with stained tissue")]
    TargetNoTissue { what: String, test: &'static str, found: usize, total: usize, needed: usize },
    #[error("{what}: target is degenerate for {method}: {detail}; choose another target image")]
    TargetDegenerate { what: String, method: Method, detail: String },
    #[error("invalid stain parameters: {0}")]
    InvalidParams(String),
    #[error("unknown stain method {0:?}; expected one of macenko, reinhard, reinhard-lab, vahadane")]
    UnknownMethod(String),
    #[error("inputs {} and {} would both be written to {}; rename one of them", first.display(), second.display(), out.display())]
    OutputCollision { first: PathBuf, second: PathBuf, out: PathBuf },
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
}

/// The normalisation methods, named as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Macenko et al. 2009, torchstain numpy semantics.
    Macenko,
    /// Reinhard in Ruderman lαβ, HistomicsTK semantics (the paper's BACH preprocessing).
    Reinhard,
    /// Reinhard in CIE LAB, torchstain numpy semantics.
    ReinhardLab,
    /// Vahadane et al. 2016, staintools semantics.
    Vahadane,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Macenko, Method::Reinhard, Method::ReinhardLab, Method::Vahadane];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Macenko => "macenko",
            Method::Reinhard => "reinhard",
            Method::ReinhardLab => "reinhard-lab",
            Method::Vahadane => "vahadane",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = StainError;
    fn from_str(s: &str) -> Result<Self, StainError> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| StainError::UnknownMethod(s.to_string()))
    }
}

/// Target stain parameters for the optical-density methods (Macenko, Vahadane).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StainTarget {
    /// Unit stain vectors in OD-RGB space, hematoxylin first: `stains[s][channel]`.
    /// (torchstain's `HERef` is the transpose of this.)
    pub stains: [[f64; 3]; 2],
    /// 99th-percentile concentration of each stain (torchstain's `maxCRef`).
    pub max_conc: [f64; 2],
}

impl StainTarget {
    /// Checks that the values can be used without producing NaN.
    pub fn validate(&self) -> Result<(), StainError> {
        let finite = self.stains.iter().flatten().all(|v| v.is_finite()) && self.max_conc.iter().all(|v| v.is_finite());
        if !finite {
            return Err(StainError::InvalidParams(format!("stain target has non-finite values: {self:?}")));
        }
        if self.max_conc.iter().any(|&c| c <= 0.0) {
            return Err(StainError::InvalidParams(format!(
                "stain target max_conc must be > 0, got {:?}",
                self.max_conc
            )));
        }
        Ok(())
    }
}

/// What a normaliser needs to be rebuilt without the target image (e.g. stored in an experiment file).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum TargetParams {
    Macenko(StainTarget),
    Reinhard(ChannelStats),
    ReinhardLab(ChannelStats),
    Vahadane(StainTarget),
}

impl TargetParams {
    pub fn method(&self) -> Method {
        match self {
            TargetParams::Macenko(_) => Method::Macenko,
            TargetParams::Reinhard(_) => Method::Reinhard,
            TargetParams::ReinhardLab(_) => Method::ReinhardLab,
            TargetParams::Vahadane(_) => Method::Vahadane,
        }
    }
}

/// The result of normalising one image.
#[derive(Debug, Clone)]
pub struct Normalised {
    pub image: RgbImage,
    /// True when the image had too little tissue (or degenerate statistics) and was copied unchanged.
    pub passed_through: bool,
}

impl Normalised {
    pub(crate) fn pass(img: &RgbImage) -> Self {
        Normalised { image: img.clone(), passed_through: true }
    }
    pub(crate) fn done(image: RgbImage) -> Self {
        Normalised { image, passed_through: false }
    }
}

/// A fitted normaliser of any method; this is what the CLI and the stage adapter hold.
#[derive(Debug, Clone)]
pub enum Normaliser {
    Macenko(Macenko),
    Reinhard(Reinhard),
    ReinhardLab(ReinhardLab),
    Vahadane(Vahadane),
}

impl Normaliser {
    /// Fits `method` on a target image with the method's default parameters.
    pub fn fit(method: Method, target: &RgbImage) -> Result<Self, StainError> {
        Self::fit_named(method, target, "target image")
    }

    /// Loads and fits on a target file (errors name the file).
    pub fn fit_file(method: Method, path: &Path) -> Result<Self, StainError> {
        let img = load_rgb(path)?;
        Self::fit_named(method, &img, &path.display().to_string())
    }

    fn fit_named(method: Method, target: &RgbImage, what: &str) -> Result<Self, StainError> {
        Ok(match method {
            Method::Macenko => Normaliser::Macenko(Macenko::fit_named(target, MacenkoParams::default(), what)?),
            Method::Reinhard => Normaliser::Reinhard(Reinhard::fit_named(target, what)?),
            Method::ReinhardLab => Normaliser::ReinhardLab(ReinhardLab::fit_named(target, what)?),
            Method::Vahadane => Normaliser::Vahadane(Vahadane::fit_named(target, VahadaneParams::default(), what)?),
        })
    }

    /// Builds a normaliser from stored target parameters (default method parameters otherwise).
    pub fn from_target(target: TargetParams) -> Result<Self, StainError> {
        Ok(match target {
            TargetParams::Macenko(t) => Normaliser::Macenko(Macenko::from_target(t, MacenkoParams::default())?),
            TargetParams::Reinhard(s) => Normaliser::Reinhard(Reinhard::from_stats(s)?),
            TargetParams::ReinhardLab(s) => Normaliser::ReinhardLab(ReinhardLab::from_stats(s)?),
            TargetParams::Vahadane(t) => Normaliser::Vahadane(Vahadane::from_target(t, VahadaneParams::default())?),
        })
    }

    /// The paper's BACH preprocessing: HistomicsTK Reinhard to [`ChannelStats::BACH`].
    pub fn bach_reinhard() -> Self {
        Normaliser::Reinhard(Reinhard::bach())
    }

    pub fn method(&self) -> Method {
        self.target().method()
    }

    /// The fitted target, e.g. to record it or to fold it into a cache key.
    pub fn target(&self) -> TargetParams {
        match self {
            Normaliser::Macenko(n) => TargetParams::Macenko(n.target()),
            Normaliser::Reinhard(n) => TargetParams::Reinhard(n.target()),
            Normaliser::ReinhardLab(n) => TargetParams::ReinhardLab(n.target()),
            Normaliser::Vahadane(n) => TargetParams::Vahadane(n.target()),
        }
    }

    /// Normalises one image. Never fails: tissue-free or degenerate images pass through, flagged.
    pub fn normalise(&self, img: &RgbImage) -> Normalised {
        match self {
            Normaliser::Macenko(n) => n.normalise(img),
            Normaliser::Reinhard(n) => n.normalise(img),
            Normaliser::ReinhardLab(n) => n.normalise(img),
            Normaliser::Vahadane(n) => n.normalise(img),
        }
    }
}
