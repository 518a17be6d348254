//! Turning dataset records into the loader's inputs: the list of files for the [`ImageStore`]
//! (`super::ImageStore`) and the [`Sample`]s that index into it.

use std::path::{Path, PathBuf};

use super::batch::{Sample, Source};
use super::pairs::PairMode;
use crate::data::breakhis::Region;
use crate::data::ImageRecord;

/// MPCS pretraining inputs: region `r`'s image at magnification `m` (0..4 = 40X..400X) is store
/// index `4 r + m`; each sample is that region with the pair drawn per epoch by `mode`.
/// Labels are the binary labels (benign 0, malignant 1); pretraining does not use them.
pub fn region_samples(root: &Path, regions: &[Region], mode: PairMode) -> (Vec<PathBuf>, Vec<Sample>) {
    let mut paths = Vec::with_capacity(regions.len() * 4);
    let mut samples = Vec::with_capacity(regions.len());
    for (r, region) in regions.iter().enumerate() {
        paths.extend(region.images.iter().map(|rel| root.join(rel)));
        let images = [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3];
        samples.push(Sample { source: Source::Region { images, mode }, label: region.label });
    }
    (paths, samples)
}

/// Fine-tuning / evaluation inputs: record `i` is store index `i`, one view, labelled with the
/// binary label or, with `subtype`, the 8-class subtype label (records without one are an error
/// the caller sees as `None`).
pub fn image_samples(root: &Path, records: &[ImageRecord], subtype: bool) -> Option<(Vec<PathBuf>, Vec<Sample>)> {
    let paths = records.iter().map(|r| r.path(root)).collect();
    let samples = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let label = if subtype { r.subtype_label? } else { r.label };
            Some(Sample { source: Source::Image(i), label })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((paths, samples))
}
