//! The training input pipeline (METHOD.md, "Self-supervised pretraining" and "Fine-tuning"):
//! a decoded image store ([`ImageStore`]), albumentations-compatible augmentations
//! ([`AugmentConfig`]), MPCS magnification pairs ([`PairMode`]), and a prefetching, seeded,
//! thread-count-independent batch loader ([`Loader`]) that yields NCHW f32 buffers.
//! No tensor library here: the trainer wraps [`Batch`] buffers itself.

pub mod augment;
pub mod batch;
pub mod color;
pub mod geometry;
pub mod image;
pub mod pairs;
pub mod rng;
pub mod samples;
pub mod store;

use std::path::{Path, PathBuf};

pub use augment::{AffineCfg, AugmentConfig, ColorJitterCfg, Prob, RotateCfg};
pub use batch::{Batch, EpochIter, Loader, LoaderConfig, Normalize, Sample, Source};
pub use geometry::{Border, FlipCode};
pub use image::Rgb8;
pub use pairs::{sample_pair, PairMode};
pub use rng::Rng;
pub use samples::{image_samples, region_samples};
pub use store::ImageStore;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot decode the image ({reason}); re-download or remove it", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("{failed} of {total} images could not be read:\n  {}", errors.join("\n  "))]
    Sources { failed: usize, total: usize, errors: Vec<String> },
    #[error("{}: damaged image store ({reason}); delete it and it will be rebuilt", path.display())]
    CorruptStore { path: PathBuf, reason: String },
    #[error("{}: image store was built from other images or another size; rebuild it", path.display())]
    StaleStore { path: PathBuf },
    #[error(
        "batch {batch}: {other} comes out {}x{} but {first} comes out {}x{}; \
         add a resize to the augmentation config so all images share one size",
        other_size.0, other_size.1, first_size.0, first_size.1
    )]
    MixedSizes {
        first: String,
        first_size: (usize, usize),
        other: String,
        other_size: (usize, usize),
        batch: usize,
        position: usize,
    },
    #[error("loader configuration: {0}")]
    BadConfig(String),
}

impl LoaderError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> LoaderError {
        LoaderError::Io { path: path.to_path_buf(), source }
    }
}
