//! Split-by-seed: cross-validation folds as manifests (rows of file, label, subtype, patient, magnification,
//! portion), never copies of the images.
//!
//! BreakHis (METHOD.md): patients are shuffled with the seed and dealt into k folds stratified by subtype, so
//! every image of a patient lands in one portion. In each fold the non-test patients are split again, stratified
//! by subtype, into train_60 / val_20 (a quarter of them to validation) and separately into train_70 / val_10 (an
//! eighth). Label-fraction portions are nested subsets of the non-test patients, named by the share of all
//! patients they hold: train_20 ⊂ train_40 ⊂ train_60 ⊂ train_80 = every non-test patient (also written as
//! `train`). BACH and breast cell: images stratified by class into k folds; within a fold the non-test images
//! split 75/25 into train / val.
//!
//! The shuffling uses this module's own generator (SplitMix64), not numpy's, so the folds are not the paper's
//! exact patient lists: they have the same sizes and strata, and are reproducible from the seed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::data::{Dataset, ImageRecord};

/// SplitMix64: tiny, fast, and well distributed; enough for shuffling.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// One row of a fold manifest.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    pub file: String,
    pub label: u32,
    pub class: String,
    pub subtype: String,
    pub patient: String,
    pub magnification: String,
    pub portion: String,
}

/// A fold: every (image, portion) it assigns.
pub struct Fold {
    pub rows: Vec<Row>,
}

/// The unit that is never divided between portions: a patient (BreakHis) or an image (BACH, breast cell),
/// with the stratum it is balanced by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Unit {
    stratum: String,
    id: String,
}

fn units(dataset: Dataset, records: &[ImageRecord]) -> Vec<Unit> {
    let set: BTreeSet<Unit> = records
        .iter()
        .map(|r| match dataset {
            Dataset::BreakHis => Unit {
                stratum: r.subtype.clone().unwrap_or_default(),
                id: format!("{}/{}", r.subtype.as_deref().unwrap_or(""), r.patient.as_deref().unwrap_or("")),
            },
            _ => Unit { stratum: r.class_name.clone(), id: r.rel_path.clone() },
        })
        .collect();
    set.into_iter().collect()
}

fn unit_of(dataset: Dataset, r: &ImageRecord) -> String {
    match dataset {
        Dataset::BreakHis => format!("{}/{}", r.subtype.as_deref().unwrap_or(""), r.patient.as_deref().unwrap_or("")),
        _ => r.rel_path.clone(),
    }
}

/// Deals shuffled units into k folds per stratum, continuing the round-robin across strata so fold sizes stay
/// within one unit of each other.
fn stratified_folds(units: &[Unit], k: usize, rng: &mut SplitMix64) -> Vec<BTreeSet<String>> {
    let mut by_stratum: BTreeMap<&str, Vec<&Unit>> = BTreeMap::new();
    for u in units {
        by_stratum.entry(&u.stratum).or_default().push(u);
    }
    let mut folds = vec![BTreeSet::new(); k];
    let mut next = 0usize;
    for (_, mut list) in by_stratum {
        rng.shuffle(&mut list);
        for u in list {
            folds[next % k].insert(u.id.clone());
            next += 1;
        }
    }
    folds
}

/// Stratified holdout of round(fraction·n) units (at least one when there are two or more): each stratum gets
/// its proportional share rounded down, and the units left over go to the strata with the largest remainders (ties
/// broken at random), as sklearn's stratified splitters do. Per-stratum rounding alone would empty small strata.
fn stratified_holdout(units: &[&Unit], fraction: f64, rng: &mut SplitMix64) -> BTreeSet<String> {
    let mut by_stratum: BTreeMap<&str, Vec<&Unit>> = BTreeMap::new();
    for u in units {
        by_stratum.entry(&u.stratum).or_default().push(u);
    }
    let n = units.len();
    let mut total = (fraction * n as f64).round() as usize;
    if total == 0 && n >= 2 && fraction > 0.0 {
        total = 1;
    }
    let mut take: Vec<(usize, f64, u64)> = by_stratum
        .values()
        .map(|list| {
            let exact = fraction * list.len() as f64;
            (exact.floor() as usize, exact - exact.floor(), rng.next_u64())
        })
        .collect();
    let mut left = total.saturating_sub(take.iter().map(|t| t.0).sum());
    let mut order: Vec<usize> = (0..take.len()).collect();
    order.sort_by(|&a, &b| take[b].1.total_cmp(&take[a].1).then(take[a].2.cmp(&take[b].2)));
    for &i in order.iter().cycle().take(order.len() * 2) {
        if left == 0 {
            break;
        }
        let size = by_stratum.values().nth(i).map_or(0, Vec::len);
        if take[i].0 < size {
            take[i].0 += 1;
            left -= 1;
        }
    }
    let mut out = BTreeSet::new();
    for ((_, mut list), (k, _, _)) in by_stratum.into_iter().zip(take) {
        rng.shuffle(&mut list);
        out.extend(list.iter().take(k).map(|u| u.id.clone()));
    }
    out
}

/// Portions of each fold, in the order they are written.
pub fn portions(dataset: Dataset) -> &'static [&'static str] {
    match dataset {
        Dataset::BreakHis => {
            &["test_20", "train_60", "val_20", "train_70", "val_10", "train_20", "train_40", "train_80", "train"]
        }
        _ => &["test", "train", "val"],
    }
}

/// Splits `records` into `k` folds with `seed`.
pub fn split(dataset: Dataset, records: &[ImageRecord], k: usize, seed: u64) -> Result<Vec<Fold>, String> {
    if k < 2 {
        return Err(format!("`folds` must be at least 2 (got {k})"));
    }
    let all = units(dataset, records);
    if all.len() < k {
        return Err(format!(
            "{} {} are too few for {k} folds; lower `folds`",
            all.len(),
            if dataset == Dataset::BreakHis { "patients" } else { "images" }
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let folds = stratified_folds(&all, k, &mut rng);
    let mut out = Vec::with_capacity(k);
    for test in &folds {
        let rest: Vec<&Unit> = all.iter().filter(|u| !test.contains(&u.id)).collect();
        let mut member: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        match dataset {
            Dataset::BreakHis => {
                let val_20 = stratified_holdout(&rest, 0.25, &mut rng);
                let val_10 = stratified_holdout(&rest, 0.125, &mut rng);
                let train_60: BTreeSet<String> =
                    rest.iter().map(|u| u.id.clone()).filter(|id| !val_20.contains(id)).collect();
                let train_70: BTreeSet<String> =
                    rest.iter().map(|u| u.id.clone()).filter(|id| !val_10.contains(id)).collect();
                // Nested label fractions inside train_60: keep 40/60 of it, then 20/40 of that.
                let t60: Vec<&Unit> = rest.iter().copied().filter(|u| train_60.contains(&u.id)).collect();
                let drop_to_40 = stratified_holdout(&t60, 1.0 / 3.0, &mut rng);
                let train_40: BTreeSet<String> = train_60.difference(&drop_to_40).cloned().collect();
                let t40: Vec<&Unit> = rest.iter().copied().filter(|u| train_40.contains(&u.id)).collect();
                let drop_to_20 = stratified_holdout(&t40, 0.5, &mut rng);
                let train_20: BTreeSet<String> = train_40.difference(&drop_to_20).cloned().collect();
                let train_80: BTreeSet<String> = rest.iter().map(|u| u.id.clone()).collect();
                member.insert("test_20", test.clone());
                member.insert("train_60", train_60);
                member.insert("val_20", val_20);
                member.insert("train_70", train_70);
                member.insert("val_10", val_10);
                member.insert("train_20", train_20);
                member.insert("train_40", train_40);
                member.insert("train", train_80.clone());
                member.insert("train_80", train_80);
            }
            _ => {
                let val = stratified_holdout(&rest, 0.25, &mut rng);
                let train: BTreeSet<String> =
                    rest.iter().map(|u| u.id.clone()).filter(|id| !val.contains(id)).collect();
                member.insert("test", test.clone());
                member.insert("train", train);
                member.insert("val", val);
            }
        }
        let mut rows = Vec::new();
        for portion in portions(dataset) {
            let ids = &member[portion];
            for r in records {
                if ids.contains(&unit_of(dataset, r)) {
                    rows.push(Row {
                        file: r.rel_path.clone(),
                        label: r.label,
                        class: r.class_name.clone(),
                        subtype: r.subtype.clone().unwrap_or_default(),
                        patient: r.patient.clone().or_else(|| r.batch.clone()).unwrap_or_default(),
                        magnification: r.magnification.map(|m| format!("{m}X")).unwrap_or_default(),
                        portion: portion.to_string(),
                    });
                }
            }
        }
        out.push(Fold { rows });
    }
    Ok(out)
}

/// The rows as CSV (header: file,label,class,subtype,patient,magnification,portion).
pub fn rows_csv(rows: &[Row]) -> String {
    let mut s = String::from("file,label,class,subtype,patient,magnification,portion\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            r.file, r.label, r.class, r.subtype, r.patient, r.magnification, r.portion
        ));
    }
    s
}

/// Per-portion counts of images and patients by class and subtype, like the paper's per-fold count files.
pub fn counts_csv(rows: &[Row]) -> String {
    let mut m: BTreeMap<(String, String, String), (usize, BTreeSet<String>)> = BTreeMap::new();
    for r in rows {
        let e = m.entry((r.portion.clone(), r.class.clone(), r.subtype.clone())).or_default();
        e.0 += 1;
        e.1.insert(r.patient.clone());
    }
    let mut s = String::from("portion,class,subtype,images,patients\n");
    for ((p, c, st), (n, pats)) in m {
        s.push_str(&format!("{p},{c},{st},{n},{}\n", pats.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<u32> = (0..50).collect();
        let mut b = a.clone();
        SplitMix64::new(1).shuffle(&mut a);
        SplitMix64::new(1).shuffle(&mut b);
        assert_eq!(a, b);
        let mut c: Vec<u32> = (0..50).collect();
        SplitMix64::new(2).shuffle(&mut c);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn holdout_takes_the_global_share_even_from_single_unit_strata() {
        let units: Vec<Unit> = (0..12).map(|i| Unit { stratum: format!("s{}", i % 8), id: format!("u{i}") }).collect();
        let refs: Vec<&Unit> = units.iter().collect();
        let mut rng = SplitMix64::new(3);
        assert_eq!(stratified_holdout(&refs, 0.25, &mut rng).len(), 3);
        assert_eq!(stratified_holdout(&refs, 0.125, &mut rng).len(), 2);
        assert_eq!(stratified_holdout(&refs, 0.5, &mut rng).len(), 6);
        // A third of twelve, spread over eight strata of one or two units.
        let held = stratified_holdout(&refs, 4.0 / 12.0, &mut rng);
        assert_eq!(held.len(), 4);
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut r = SplitMix64::new(7);
        let mut counts = [0u32; 5];
        for _ in 0..50_000 {
            counts[r.below(5) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    }
}
