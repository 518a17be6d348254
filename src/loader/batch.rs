//! The batch loader: per epoch a deterministic shuffle, per sample its own RNG (so results do not
//! depend on the thread count), views augmented in parallel on a private rayon pool, and batches
//! built on a background thread a few ahead of the consumer (bounded channel).
//!
//! Output: NCHW f32 in [0, 1] (or ImageNet-normalised), one buffer per view.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::augment::{self, AugmentConfig};
use super::image::Rgb8;
use super::pairs::{sample_pair, PairMode};
use super::rng::{stream, Rng};
use super::store::ImageStore;
use super::LoaderError;

/// Where one sample's view(s) come from: indices into the [`ImageStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// One view (fine-tuning, evaluation).
    Image(usize),
    /// Two fixed views.
    Pair(usize, usize),
    /// An MPCS region: the images at 40X, 100X, 200X, 400X; the pair is drawn per epoch by `mode`.
    Region { images: [usize; 4], mode: PairMode },
}

impl Source {
    fn is_paired(&self) -> bool {
        !matches!(self, Source::Image(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub source: Source,
    pub label: u32,
}

/// Scaling after [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// [0, 1] as the MPCS pretraining code (`ToTensorV2` after a /255 scale, no mean/std).
    #[default]
    None,
    /// (x - mean) / std with torchvision's ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    ImageNet,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
    /// Worker threads for augmentation; 0 = the CPU threads of the caller
    /// ([`crate::runtime::cpu_threads`]: one per core, or the node's share while several run).
    pub threads: usize,
    /// Batches built ahead of the consumer (bounded channel), at least 1.
    pub prefetch: usize,
    pub normalize: Normalize,
    pub augment: AugmentConfig,
}

impl LoaderConfig {
    pub fn new(batch_size: usize, seed: u64, augment: AugmentConfig) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            seed,
            threads: 0,
            prefetch: 2,
            normalize: Normalize::None,
            augment,
        }
    }
}

/// One batch. `view1` (and `view2` for paired sources) hold `shape` = [N, 3, H, W] f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub epoch: u64,
    pub index: usize,
    pub shape: [usize; 4],
    pub view1: Vec<f32>,
    pub view2: Option<Vec<f32>>,
    pub labels: Vec<u32>,
    /// Positions of the samples in the loader's sample list.
    pub samples: Vec<usize>,
    /// For `Region` sources: the magnification indices (0..4 = 40X..400X) drawn for each view.
    pub magnifications: Vec<(u8, u8)>,
}

struct Inner {
    store: Arc<ImageStore>,
    samples: Vec<Sample>,
    cfg: LoaderConfig,
    paired: bool,
    pool: rayon::ThreadPool,
}

/// Cheap to clone (shared state).
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

impl Loader {
    /// Checks the samples against the store and the configuration, and starts the worker pool.
    pub fn new(store: Arc<ImageStore>, samples: Vec<Sample>, cfg: LoaderConfig) -> Result<Loader, LoaderError> {
        cfg.augment.validate()?;
        if cfg.batch_size == 0 {
            return Err(LoaderError::BadConfig("batch_size must be at least 1".into()));
        }
        if samples.is_empty() {
            return Err(LoaderError::BadConfig("no samples to load; check the split selects any images".into()));
        }
        let paired = samples[0].source.is_paired();
        for (i, s) in samples.iter().enumerate() {
            if s.source.is_paired() != paired {
                return Err(LoaderError::BadConfig(format!(
                    "sample {i} mixes single images and pairs; one loader serves one kind"
                )));
            }
            let idx: Vec<usize> = match s.source {
                Source::Image(a) => vec![a],
                Source::Pair(a, b) => vec![a, b],
                Source::Region { images, .. } => images.to_vec(),
            };
            if let Some(bad) = idx.iter().find(|&&j| j >= store.len()) {
                return Err(LoaderError::BadConfig(format!(
                    "sample {i} refers to image {bad} but the store holds {} images",
                    store.len()
                )));
            }
        }
        let threads = if cfg.threads == 0 { crate::runtime::cpu_threads() } else { cfg.threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("mpcs-loader-{i}"))
            .build()
            .map_err(|e| LoaderError::BadConfig(format!("cannot start {threads} loader threads: {e}")))?;
        Ok(Loader { inner: Arc::new(Inner { store, samples, cfg, paired, pool }) })
    }

    pub fn len_samples(&self) -> usize {
        self.inner.samples.len()
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.inner.samples.len(), self.inner.cfg.batch_size);
        if self.inner.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch` (a seeded permutation, or 0..n without shuffling).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.inner.samples.len()).collect();
        if self.inner.cfg.shuffle {
            Rng::derive(self.inner.cfg.seed, epoch, 0, stream::SHUFFLE).shuffle(&mut order);
        }
        order
    }

    /// The (view 1, view 2) store indices and magnification indices of sample `i` in `epoch`.
    fn views(&self, epoch: u64, i: usize) -> (usize, Option<usize>, Option<(u8, u8)>) {
        match self.inner.samples[i].source {
            Source::Image(a) => (a, None, None),
            Source::Pair(a, b) => (a, Some(b), None),
            Source::Region { images, mode } => {
                let mut rng = Rng::derive(self.inner.cfg.seed, epoch, i as u64, stream::PAIR);
                let (m1, m2) = sample_pair(mode, &mut rng);
                (images[m1], Some(images[m2]), Some((m1 as u8, m2 as u8)))
            }
        }
    }

    /// Builds batch `index` of `epoch` on the calling thread (work spread over the pool).
    pub fn batch(&self, epoch: u64, index: usize) -> Result<Batch, LoaderError> {
        let order = self.order(epoch);
        self.batch_from_order(&order, epoch, index)
    }

    fn batch_from_order(&self, order: &[usize], epoch: u64, index: usize) -> Result<Batch, LoaderError> {
        let inner = &*self.inner;
        let b = inner.cfg.batch_size;
        let start = index * b;
        if index >= self.batches_per_epoch() {
            return Err(LoaderError::BadConfig(format!(
                "batch {index} does not exist; an epoch has {}",
                self.batches_per_epoch()
            )));
        }
        let ids: Vec<usize> = order[start..(start + b).min(order.len())].to_vec();
        let views: Vec<_> = ids.iter().map(|&i| self.views(epoch, i)).collect();

        // All outputs of a batch must share one size; it follows from the inputs and the config.
        let out_size = |store_idx: usize| {
            let (w, h) = inner.store.size(store_idx);
            inner.cfg.augment.output_size(w, h)
        };
        let (ow, oh) = out_size(views[0].0);
        for (k, v) in views.iter().enumerate() {
            for idx in std::iter::once(v.0).chain(v.1) {
                if out_size(idx) != (ow, oh) {
                    let (w, h) = out_size(idx);
                    return Err(LoaderError::MixedSizes {
                        first: inner.store.name(views[0].0).to_string(),
                        first_size: (ow, oh),
                        other: inner.store.name(idx).to_string(),
                        other_size: (w, h),
                        batch: index,
                        position: k,
                    });
                }
            }
        }
        let per = 3 * ow * oh;
        let mut view1 = vec![0f32; per * ids.len()];
        let mut view2 = inner.paired.then(|| vec![0f32; per * ids.len()]);
        let cfg = &inner.cfg;
        let render = |store_idx: usize, sample: usize, s: u64, out: &mut [f32]| {
            let mut rng = Rng::derive(cfg.seed, epoch, sample as u64, s);
            let img = augment::augment(&cfg.augment, inner.store.image(store_idx), &mut rng);
            to_chw(&img, cfg.normalize, out);
        };
        inner.pool.install(|| {
            view1.par_chunks_mut(per).zip(ids.par_iter().zip(&views)).for_each(|(out, (&i, v))| {
                render(v.0, i, stream::VIEW1, out);
            });
            if let Some(view2) = view2.as_mut() {
                view2.par_chunks_mut(per).zip(ids.par_iter().zip(&views)).for_each(|(out, (&i, v))| {
                    if let Some(idx) = v.1 {
                        render(idx, i, stream::VIEW2, out);
                    }
                });
            }
        });
        Ok(Batch {
            epoch,
            index,
            shape: [ids.len(), 3, oh, ow],
            view1,
            view2,
            labels: ids.iter().map(|&i| inner.samples[i].label).collect(),
            magnifications: views.iter().filter_map(|v| v.2).collect(),
            samples: ids,
        })
    }

    /// The batches of `epoch`, built on a background thread `prefetch` ahead. Dropping the
    /// iterator stops the producer after the batch it is building.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        let (tx, rx) = sync_channel(self.inner.cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let (loader, stop2) = (self.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("mpcs-loader-prefetch".into())
            .spawn(move || {
                let order = loader.order(epoch);
                for index in 0..loader.batches_per_epoch() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = loader.batch_from_order(&order, epoch, index);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            })
            .ok();
        EpochIter { rx: Some(rx), handle, stop, spawn_failed: false }.check_spawn()
    }
}

/// Iterator over one epoch's batches (see [`Loader::epoch`]).
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch, LoaderError>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    spawn_failed: bool,
}

impl EpochIter {
    fn check_spawn(mut self) -> EpochIter {
        self.spawn_failed = self.handle.is_none();
        self
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.spawn_failed {
            self.spawn_failed = false;
            self.rx = None;
            return Some(Err(LoaderError::BadConfig("cannot start the prefetch thread".into())));
        }
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full channel.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Writes `img` as CHW f32 into `out` (len 3·w·h).
fn to_chw(img: &Rgb8, norm: Normalize, out: &mut [f32]) {
    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];
    let plane = img.width * img.height;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (k, p) in img.data.chunks_exact(3).enumerate() {
        for (c, dst) in [&mut r[k], &mut g[k], &mut b[k]].into_iter().enumerate() {
            let v = p[c] as f32 / 255.0;
            *dst = match norm {
                Normalize::None => v,
                Normalize::ImageNet => (v - MEAN[c]) / STD[c],
            };
        }
    }
}
