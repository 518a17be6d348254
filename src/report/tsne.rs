//! Exact t-SNE (van der Maaten & Hinton 2008) as scikit-learn's `TSNE(method="exact")` does it: squared
//! Euclidean distances, a binary search per point for the Gaussian precision that gives the wanted perplexity,
//! symmetrised joint P, Student-t (1 degree of freedom) Q in 2-d, gradient descent with momentum (0.5 for the
//! first 250 iterations under early exaggeration 12, then 0.8), per-parameter gains (+0.2 / ×0.8, min 0.01)
//! and sklearn's "auto" learning rate max(n / 12 / 4, 50). The start is random (seeded, std 1e-4), not PCA,
//! so a seed fixes the result. O(n²) per iteration: fine for up to a few thousand points.

use rayon::prelude::*;

use super::error::{ReportError, Result};

/// sklearn's floor for probabilities (`np.finfo(np.double).eps`).
const MACHINE_EPSILON: f64 = f64::EPSILON;

#[derive(Clone, Debug, PartialEq)]
pub struct TsneConfig {
    /// Effective number of neighbours (sklearn's default 30); must be below the number of points.
    pub perplexity: f64,
    /// Gradient steps in total (sklearn's default 1000), at least 250 + 1.
    pub iterations: usize,
    pub seed: u64,
    pub early_exaggeration: f64,
    /// Steps run with exaggerated P and momentum 0.5.
    pub exaggeration_iterations: usize,
    /// `None` = sklearn's "auto".
    pub learning_rate: Option<f64>,
}

impl TsneConfig {
    pub fn new(perplexity: f64, iterations: usize, seed: u64) -> Self {
        TsneConfig {
            perplexity,
            iterations,
            seed,
            early_exaggeration: 12.0,
            exaggeration_iterations: 250,
            learning_rate: None,
        }
    }
}

/// The embedding and the KL divergence KL(P‖Q) (with the P in use: exaggerated early on) every 50 steps and
/// at the end, as (iteration, value).
#[derive(Clone, Debug)]
pub struct Tsne {
    pub points: Vec<[f32; 2]>,
    pub kl: Vec<(usize, f64)>,
}

/// 2-d t-SNE of `features` (one row per point, all of one length).
pub fn tsne(features: &[Vec<f32>], perplexity: f64, iterations: usize, seed: u64) -> Result<Vec<[f32; 2]>> {
    Ok(tsne_with(features, &TsneConfig::new(perplexity, iterations, seed))?.points)
}

fn check(features: &[Vec<f32>], perplexity: f64) -> Result<()> {
    let n = features.len();
    if n < 2 {
        return Err(ReportError::Input(format!("t-SNE needs at least 2 points, got {n}")));
    }
    let d = features[0].len();
    if let Some((i, r)) = features.iter().enumerate().find(|(_, r)| r.len() != d) {
        return Err(ReportError::Input(format!("t-SNE: point {i} has {} values but point 0 has {d}", r.len())));
    }
    if let Some(i) = features.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
        return Err(ReportError::Input(format!("t-SNE: point {i} has a NaN or infinite value")));
    }
    if !(perplexity > 0.0 && perplexity < n as f64) {
        return Err(ReportError::Input(format!(
            "t-SNE perplexity {perplexity} must be > 0 and below the number of points ({n}); try {}",
            (n as f64 / 4.0).clamp(1.0, 30.0)
        )));
    }
    Ok(())
}

/// Squared Euclidean distances, row major n × n.
fn sq_distances(x: &[Vec<f32>]) -> Vec<f64> {
    let n = x.len();
    let mut d = vec![0f64; n * n];
    d.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = x[i].iter().zip(&x[j]).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        }
    });
    d
}

/// Conditional P(j|i) (row i, zero on the diagonal) whose perplexity 2^H is `perplexity`, by bisection on the
/// precision β = 1/(2σ²) like sklearn's `_binary_search_perplexity` (tolerance 1e-5 on the entropy in nats,
/// at most 100 steps). Returns the rows, row major n × n.
pub fn conditional_probabilities(features: &[Vec<f32>], perplexity: f64) -> Result<Vec<f64>> {
    check(features, perplexity)?;
    Ok(conditional_p(&sq_distances(features), features.len(), perplexity))
}

fn conditional_p(dist: &[f64], n: usize, perplexity: f64) -> Vec<f64> {
    let desired = perplexity.ln();
    let mut p = vec![0f64; n * n];
    p.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let d = &dist[i * n..(i + 1) * n];
        let (mut beta, mut lo, mut hi) = (1.0f64, f64::NEG_INFINITY, f64::INFINITY);
        for _ in 0..100 {
            let mut sum = 0.0;
            for j in 0..n {
                row[j] = if j == i { 0.0 } else { (-d[j] * beta).exp() };
                sum += row[j];
            }
            if sum == 0.0 {
                sum = 1e-8; // sklearn's EPSILON_DBL guard
            }
            let mut sum_dp = 0.0;
            for j in 0..n {
                row[j] /= sum;
                sum_dp += d[j] * row[j];
            }
            let entropy = sum.ln() + beta * sum_dp;
            let diff = entropy - desired;
            if diff.abs() <= 1e-5 {
                break;
            }
            if diff > 0.0 {
                lo = beta;
                beta = if hi == f64::INFINITY { beta * 2.0 } else { (beta + hi) / 2.0 };
            } else {
                hi = beta;
                beta = if lo == f64::NEG_INFINITY { beta / 2.0 } else { (beta + lo) / 2.0 };
            }
        }
    });
    p
}

/// The symmetric joint P (n × n, zero diagonal, sums to 1), as sklearn's `_joint_probabilities`:
/// (P(j|i) + P(i|j)) / Σ, floored at machine epsilon off the diagonal.
pub fn joint_probabilities(features: &[Vec<f32>], perplexity: f64) -> Result<Vec<f64>> {
    check(features, perplexity)?;
    Ok(joint_p(&sq_distances(features), features.len(), perplexity))
}

fn joint_p(dist: &[f64], n: usize, perplexity: f64) -> Vec<f64> {
    let c = conditional_p(dist, n, perplexity);
    let mut p = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            p[i * n + j] = c[i * n + j] + c[j * n + i];
        }
    }
    let total = p.iter().sum::<f64>().max(MACHINE_EPSILON);
    for i in 0..n {
        for j in 0..n {
            p[i * n + j] = if i == j { 0.0 } else { (p[i * n + j] / total).max(MACHINE_EPSILON) };
        }
    }
    p
}

/// KL(P‖Q) and its gradient for the embedding `y` (n × 2), as sklearn's `_kl_divergence` (dof 1).
fn kl_and_grad(p: &[f64], y: &[[f64; 2]], grad: &mut [[f64; 2]]) -> f64 {
    let n = y.len();
    // Unnormalised Student-t kernel w_ij = 1 / (1 + |y_i − y_j|²).
    let mut w = vec![0f64; n * n];
    w.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            if i != j {
                let (dx, dy) = (y[i][0] - y[j][0], y[i][1] - y[j][1]);
                *v = 1.0 / (1.0 + dx * dx + dy * dy);
            }
        }
    });
    // Row sums in parallel, then added in order: rayon's own `sum` reduces in a schedule-dependent order, which
    // would make the map depend on thread timing.
    let row_sums: Vec<f64> = w.par_chunks(n).map(|r| r.iter().sum()).collect();
    let sum_w: f64 = row_sums.iter().sum();
    let kl_rows: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut k = 0.0;
            for j in 0..n {
                if i != j {
                    let pij = p[i * n + j];
                    let q = (w[i * n + j] / sum_w).max(MACHINE_EPSILON);
                    k += pij * (pij.max(MACHINE_EPSILON) / q).ln();
                }
            }
            k
        })
        .collect();
    let kl: f64 = kl_rows.iter().sum();
    grad.par_iter_mut().enumerate().for_each(|(i, g)| {
        let (mut gx, mut gy) = (0.0, 0.0);
        for j in 0..n {
            if i != j {
                let wij = w[i * n + j];
                let q = (wij / sum_w).max(MACHINE_EPSILON);
                let m = (p[i * n + j] - q) * wij;
                gx += m * (y[i][0] - y[j][0]);
                gy += m * (y[i][1] - y[j][1]);
            }
        }
        *g = [4.0 * gx, 4.0 * gy];
    });
    kl
}

/// t-SNE with every knob.
pub fn tsne_with(features: &[Vec<f32>], cfg: &TsneConfig) -> Result<Tsne> {
    check(features, cfg.perplexity)?;
    if cfg.iterations <= cfg.exaggeration_iterations {
        return Err(ReportError::Input(format!(
            "t-SNE iterations ({}) must exceed the early-exaggeration phase ({})",
            cfg.iterations, cfg.exaggeration_iterations
        )));
    }
    let n = features.len();
    let p = joint_p(&sq_distances(features), n, cfg.perplexity);
    let lr = cfg.learning_rate.unwrap_or((n as f64 / cfg.early_exaggeration / 4.0).max(50.0));

    let mut rng = crate::split::SplitMix64::new(cfg.seed);
    let mut uniform = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mut y: Vec<[f64; 2]> = (0..n)
        .map(|_| {
            // Box-Muller: two standard normals.
            let (u1, u2) = (uniform(), uniform());
            let r = (-2.0 * u1.ln()).sqrt() * 1e-4;
            let t = 2.0 * std::f64::consts::PI * u2;
            [r * t.cos(), r * t.sin()]
        })
        .collect();

    let mut update = vec![[0f64; 2]; n];
    let mut gains = vec![[1f64; 2]; n];
    let mut grad = vec![[0f64; 2]; n];
    let mut kl_trace = Vec::new();
    let exaggerated: Vec<f64> = p.iter().map(|v| v * cfg.early_exaggeration).collect();
    for it in 0..cfg.iterations {
        let early = it < cfg.exaggeration_iterations;
        let momentum = if early { 0.5 } else { 0.8 };
        let kl = kl_and_grad(if early { &exaggerated } else { &p }, &y, &mut grad);
        if it % 50 == 0 || it + 1 == cfg.iterations {
            kl_trace.push((it, kl));
        }
        for i in 0..n {
            for k in 0..2 {
                let g = grad[i][k];
                gains[i][k] = if update[i][k] * g < 0.0 { gains[i][k] + 0.2 } else { gains[i][k] * 0.8 };
                gains[i][k] = gains[i][k].max(0.01);
                update[i][k] = momentum * update[i][k] - lr * gains[i][k] * g;
                y[i][k] += update[i][k];
            }
        }
    }
    if y.iter().flatten().any(|v| !v.is_finite()) {
        return Err(ReportError::Input("t-SNE diverged (non-finite coordinates); lower the learning rate".into()));
    }
    Ok(Tsne { points: y.iter().map(|p| [p[0] as f32, p[1] as f32]).collect(), kl: kl_trace })
}
