//! Small numeric helpers shared by the normalisers: numpy-compatible percentiles, mean/std,
//! and 3×3 linear algebra (symmetric eigen-decomposition, inverse).

/// `np.percentile(v, q)` with numpy's default "linear" interpolation. Reorders `v`.
/// Uses selection (O(n)) instead of a full sort. Returns NaN for an empty slice.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    let (a, b, t) = order_stats(v, q);
    lerp(a, b, t)
}

/// The two order statistics that numpy's linear percentile interpolates between, and the weight:
/// `(v[lo], v[lo + 1], t)` of the sorted data. Reorders `v`; NaNs for an empty slice.
pub fn order_stats(v: &mut [f64], q: f64) -> (f64, f64, f64) {
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, 0.0);
    }
    let pos = (q / 100.0) * (n - 1) as f64;
    let lo = (pos.floor() as usize).min(n - 1);
    let t = pos - lo as f64;
    let (_, a, right) = v.select_nth_unstable_by(lo, f64::total_cmp);
    let a = *a;
    if right.is_empty() || t == 0.0 {
        return (a, a, 0.0);
    }
    let b = right.iter().copied().fold(f64::INFINITY, f64::min);
    (a, b, t)
}

/// Exact numpy order statistics in one tail (a percentile near 0 or 100) without storing every
/// value: a threshold is chosen from a sample, the values beyond it are kept as they are offered,
/// and the order statistics are selected among those. When the sample misjudged the tail,
/// [`TailSelect::finish`] says so and the caller offers the values again to [`TailSelect::all`].
/// Values must not be NaN.
#[derive(Debug, Clone)]
pub struct TailSelect {
    upper: bool,
    thr: f64,
    /// The values offered beyond the threshold.
    pub kept: Vec<f64>,
}

impl TailSelect {
    /// For percentile `q` of a population of which `sample` is a sample (reordered). The threshold
    /// sits three times deeper into the tail than `q`, plus half a percent.
    pub fn new(q: f64, sample: &mut [f64], kept: Vec<f64>) -> Self {
        let upper = q >= 50.0;
        let tail = if upper { 100.0 - q } else { q };
        let deeper = (3.0 * tail + 0.5).min(50.0);
        let thr = if sample.len() < 64 {
            if upper {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            }
        } else {
            let (a, _, _) = order_stats(sample, if upper { 100.0 - deeper } else { deeper });
            a
        };
        TailSelect { upper, thr, kept: reuse(kept) }
    }

    /// Keeps every value offered (the fallback).
    pub fn all(q: f64, kept: Vec<f64>) -> Self {
        let upper = q >= 50.0;
        TailSelect { upper, thr: if upper { f64::NEG_INFINITY } else { f64::INFINITY }, kept: reuse(kept) }
    }

    #[inline(always)]
    pub fn offer(&mut self, x: f64) {
        if (self.upper && x >= self.thr) || (!self.upper && x <= self.thr) {
            self.kept.push(x);
        }
    }

    /// Offers every value of `xs` (NaNs are never kept). Branch-free: each value is written past
    /// the kept ones and the length only advances when it belongs to the tail.
    pub fn offer_slice(&mut self, xs: &[f64]) {
        let thr = self.thr;
        let mut len = self.kept.len();
        self.kept.resize(len + xs.len(), 0.0);
        let buf = &mut self.kept[..];
        if self.upper {
            for &x in xs {
                buf[len] = x;
                len += (x >= thr) as usize;
            }
        } else {
            for &x in xs {
                buf[len] = x;
                len += (x <= thr) as usize;
            }
        }
        self.kept.truncate(len);
    }

    /// [`order_stats`] of all `n` values offered at percentile `q`, or `None` when the needed ranks
    /// are not among the kept values.
    pub fn finish(&mut self, n: usize, q: f64) -> Option<(f64, f64, f64)> {
        if n == 0 {
            return Some((f64::NAN, f64::NAN, 0.0));
        }
        let m = self.kept.len();
        let pos = (q / 100.0) * (n - 1) as f64;
        let lo = (pos.floor() as usize).min(n - 1);
        let t = pos - lo as f64;
        let need_next = lo + 1 < n && t != 0.0;
        // ranks of the kept values among all n: upper tail n-m..n, lower tail 0..m
        let first = if self.upper { n.checked_sub(m)? } else { 0 };
        let covered = |r: usize| r >= first && r < first + m;
        if !covered(lo) || (need_next && !covered(lo + 1)) {
            return None;
        }
        let local = lo - first;
        let (_, a, right) = self.kept.select_nth_unstable_by(local, f64::total_cmp);
        let a = *a;
        if !need_next {
            return Some((a, a, 0.0));
        }
        let b = right.iter().copied().fold(f64::INFINITY, f64::min);
        Some((a, b, t))
    }
}

fn reuse(mut v: Vec<f64>) -> Vec<f64> {
    v.clear();
    v
}

/// numpy's `_lerp`: interpolate from the nearer end for accuracy.
pub fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

/// Population mean and standard deviation (ddof = 0, as `np.mean` / `np.std`), two-pass.
pub fn mean_std(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let mut n = 0usize;
    let mut sum = 0.0;
    for x in v.clone() {
        sum += x;
        n += 1;
    }
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = sum / n as f64;
    let var = v.map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

pub type Mat3 = [[f64; 3]; 3];

/// Matrix × vector.
pub fn mul_vec(m: &Mat3, v: [f64; 3]) -> [f64; 3] {
    [
        m[0][0] * v[0] + m[0][1] * v[1] + m[0][2] * v[2],
        m[1][0] * v[0] + m[1][1] * v[1] + m[1][2] * v[2],
        m[2][0] * v[0] + m[2][1] * v[1] + m[2][2] * v[2],
    ]
}

/// Matrix × matrix.
pub fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut r = [[0.0; 3]; 3];
    for (i, row) in r.iter_mut().enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            *x = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    r
}

/// Inverse by cofactors; `None` when (nearly) singular.
pub fn inv(m: &Mat3) -> Option<Mat3> {
    let c = |i: usize, j: usize| {
        let (i1, i2) = ((i + 1) % 3, (i + 2) % 3);
        let (j1, j2) = ((j + 1) % 3, (j + 2) % 3);
        m[i1][j1] * m[i2][j2] - m[i1][j2] * m[i2][j1]
    };
    let det = m[0][0] * c(0, 0) + m[0][1] * c(0, 1) + m[0][2] * c(0, 2);
    if !det.is_finite() || det.abs() < 1e-300 {
        return None;
    }
    let mut r = [[0.0; 3]; 3];
    for (i, row) in r.iter_mut().enumerate() {
        for (j, x) in row.iter_mut().enumerate() {
            *x = c(j, i) / det; // adjugate is the transposed cofactor matrix
        }
    }
    Some(r)
}

/// Eigen-decomposition of a symmetric 3×3 matrix by cyclic Jacobi rotations.
/// Returns eigenvalues in ascending order (as `np.linalg.eigh`) and the eigenvectors as columns:
/// `vecs[row][k]` is component `row` of the k-th eigenvector. Signs are arbitrary, as in LAPACK.
pub fn eigh3(a: &Mat3) -> ([f64; 3], Mat3) {
    let mut a = *a;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _sweep in 0..64 {
        let off = a[0][1].abs() + a[0][2].abs() + a[1][2].abs();
        let scale = a[0][0].abs() + a[1][1].abs() + a[2][2].abs();
        if off <= f64::EPSILON * scale * 1e-3 || off == 0.0 {
            break;
        }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            if a[p][q] == 0.0 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
            let t = if theta == 0.0 { 1.0 } else { t };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            // A' = Jᵀ A J with J the rotation in the (p, q) plane
            for k in 0..3 {
                let (akp, akq) = (a[k][p], a[k][q]);
                a[k][p] = c * akp - s * akq;
                a[k][q] = s * akp + c * akq;
            }
            for k in 0..3 {
                let (apk, aqk) = (a[p][k], a[q][k]);
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            for row in v.iter_mut() {
                let (vp, vq) = (row[p], row[q]);
                row[p] = c * vp - s * vq;
                row[q] = s * vp + c * vq;
            }
        }
    }
    let mut order = [0usize, 1, 2];
    order.sort_by(|&i, &j| a[i][i].total_cmp(&a[j][j]));
    let vals = order.map(|i| a[i][i]);
    let mut vecs = [[0.0; 3]; 3];
    for (k, &src) in order.iter().enumerate() {
        for row in 0..3 {
            vecs[row][k] = v[row][src];
        }
    }
    (vals, vecs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1, 2, 3, 4], 99) = 3.97 ; np.percentile([5, 1, 4], 50) = 4
        assert!((percentile(&mut [4.0, 1.0, 3.0, 2.0], 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&mut [5.0, 1.0, 4.0], 50.0), 4.0);
        assert_eq!(percentile(&mut [7.0], 1.0), 7.0);
        assert!(percentile(&mut [], 1.0).is_nan());
    }

    #[test]
    fn order_statistics_match_a_sort() {
        // deterministic pseudo-random data with many ties, several sizes and percentiles
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for n in [1usize, 2, 3, 10, 100, 1000, 20_000] {
            let v: Vec<f64> = (0..n).map(|_| ((next() % 5000) as f64 - 2500.0) * 0.37).collect();
            let mut sorted = v.clone();
            sorted.sort_by(f64::total_cmp);
            for q in [0.0, 0.5, 1.0, 5.0, 50.0, 95.0, 99.0, 99.5, 100.0] {
                let pos = q / 100.0 * (n - 1) as f64;
                let lo = pos.floor() as usize;
                let t = pos - lo as f64;
                let b = if lo + 1 < n && t != 0.0 { sorted[lo + 1] } else { sorted[lo] };
                let want = (sorted[lo], b, if lo + 1 < n && t != 0.0 { t } else { 0.0 });
                assert_eq!(order_stats(&mut v.clone(), q), want, "n {n} q {q}");
                // the tail selector, from a sample of every 7th value, and its fallback
                let mut sample: Vec<f64> = v.iter().step_by(7).copied().collect();
                let mut tail = TailSelect::new(q, &mut sample, Vec::new());
                v.iter().for_each(|&x| tail.offer(x));
                let got = tail.finish(n, q).or_else(|| {
                    let mut all = TailSelect::all(q, Vec::new());
                    v.iter().for_each(|&x| all.offer(x));
                    all.finish(n, q)
                });
                assert_eq!(got, Some(want), "tail n {n} q {q}");
            }
        }
        // a sample that misjudges the tail is reported, not answered wrongly
        let v: Vec<f64> = (0..1000).map(f64::from).collect();
        let mut sample: Vec<f64> = (0..100).map(f64::from).collect();
        let mut tail = TailSelect::new(1.0, &mut sample, Vec::new());
        v.iter().for_each(|&x| tail.offer(x));
        assert_eq!(tail.finish(1000, 1.0), None);
    }

    #[test]
    fn eigh_reconstructs_matrix() {
        let m = [[2.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 0.5]];
        let (vals, vecs) = eigh3(&m);
        assert!(vals[0] <= vals[1] && vals[1] <= vals[2]);
        for k in 0..3 {
            let v = [vecs[0][k], vecs[1][k], vecs[2][k]];
            let mv = mul_vec(&m, v);
            for r in 0..3 {
                assert!((mv[r] - vals[k] * v[r]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn inverse_roundtrips() {
        let m = [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]];
        let p = mul(&m, &inv(&m).unwrap());
        for (i, row) in p.iter().enumerate() {
            for (j, x) in row.iter().enumerate() {
                assert!((x - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(inv(&[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 0.0, 1.0]]).is_none());
    }
}
