//! Paired comparisons of two variants scored on the same docs: the per-doc differences, a paired
//! bootstrap confidence interval on their mean (per task, and for a macro average over tasks such as
//! CSQA-7, resampling docs within each task), McNemar's exact test on the discordant docs, and how many
//! docs a difference of a given size needs.
//!
//! Why paired: two variants of one model agree on most docs, so the variance of the per-doc difference
//! is far below the sum of the two accuracies' variances; intervals from two independent standard errors
//! would hide real 1-point effects (and show overlapping bars where the paired test is decisive).
//!
//! Resampling: Efron's percentile bootstrap on doc indices, the same indices for both variants; for a
//! macro average, each task's docs are resampled within the task (stratified), and the average of the
//! per-task mean differences is taken per resample. Deterministic: `rand`'s `StdRng` from a fixed seed.
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// A paired difference `b - a` (in the units of the scores: 0/1 accuracy gives fractions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedDiff {
    /// Docs compared.
    pub n: usize,
    /// Mean of `b - a`.
    pub mean: f64,
    /// Standard error of the mean difference (sample s.d. of the per-doc differences / sqrt(n); for a
    /// macro average, the per-task errors combined as an average of independent means).
    pub stderr: f64,
    /// Percentile bootstrap interval at `level`.
    pub lo: f64,
    pub hi: f64,
    pub level: f64,
    pub resamples: usize,
    /// Docs where only `b` is right / only `a` is right (0/1 scores; `None` otherwise).
    pub b_only: Option<usize>,
    pub a_only: Option<usize>,
    /// McNemar's exact two-sided p-value (binomial on the discordant docs; 0/1 scores only; `None` for
    /// a macro average).
    pub p_mcnemar: Option<f64>,
}

impl PairedDiff {
    /// Whether the interval excludes 0.
    pub fn resolved(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// Options of the bootstrap.
#[derive(Debug, Clone, Copy)]
pub struct BootstrapOptions {
    pub resamples: usize,
    /// Confidence level of the interval, e.g. 0.95.
    pub level: f64,
    pub seed: u64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        BootstrapOptions {
            resamples: 10_000,
            level: 0.95,
            seed: 0x5EED,
        }
    }
}

impl BootstrapOptions {
    fn check(&self) -> Result<()> {
        if self.resamples < 100 {
            return Err(EvalError::Input(format!(
                "bootstrap resamples must be >= 100, got {}",
                self.resamples
            )));
        }
        if !(self.level > 0.0 && self.level < 1.0) {
            return Err(EvalError::Input(format!(
                "bootstrap level must be in (0, 1), got {}",
                self.level
            )));
        }
        Ok(())
    }
}

/// Per-doc differences `b - a` of one task, checked for equal length and finite values.
fn diffs(task: &str, a: &[f64], b: &[f64]) -> Result<Vec<f64>> {
    if a.len() != b.len() {
        return Err(EvalError::Input(format!(
            "{task}: paired comparison of {} and {} docs (both variants must score the same docs)",
            a.len(),
            b.len()
        )));
    }
    if a.is_empty() {
        return Err(EvalError::Input(format!("{task}: no docs to compare")));
    }
    if let Some(i) = a.iter().chain(b).position(|x| !x.is_finite()) {
        return Err(EvalError::Input(format!(
            "{task}: score {i} of the paired comparison is not finite"
        )));
    }
    Ok(a.iter().zip(b).map(|(x, y)| y - x).collect())
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample standard error of the mean (0 for one value).
fn stderr(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64;
    (var / x.len() as f64).sqrt()
}

/// The `q` quantile of sorted values (linear interpolation between order statistics, numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let (i, f) = (h.floor() as usize, h - h.floor());
    if i + 1 < sorted.len() {
        sorted[i] + f * (sorted[i + 1] - sorted[i])
    } else {
        sorted[i]
    }
}

/// McNemar's exact two-sided p-value for `b_only` vs `a_only` discordant docs: `min(1, 2 P[X <= min])`
/// with `X ~ Binomial(b_only + a_only, 1/2)`.
pub fn mcnemar_exact(b_only: usize, a_only: usize) -> f64 {
    let n = b_only + a_only;
    if n == 0 {
        return 1.0;
    }
    let k = b_only.min(a_only);
    // sum_{i<=k} C(n, i) / 2^n in log space
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    let mut ln_c = 0.0f64; // ln C(n, 0)
    let mut total = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        total += (ln_c - ln_half_n).exp();
    }
    (2.0 * total).min(1.0)
}

fn is_binary(x: &[f64]) -> bool {
    x.iter().all(|&v| v == 0.0 || v == 1.0)
}

/// Paired comparison of one task: `a[i]` and `b[i]` are the two variants' scores on doc `i`.
pub fn paired(task: &str, a: &[f64], b: &[f64], opts: &BootstrapOptions) -> Result<PairedDiff> {
    paired_macro(&[(task, a, b)], opts)
}

/// Paired comparison of a macro average over tasks (the mean of the per-task mean differences, e.g.
/// CSQA-7), docs resampled within each task. With one task this is [`paired`].
pub fn paired_macro(
    tasks: &[(&str, &[f64], &[f64])],
    opts: &BootstrapOptions,
) -> Result<PairedDiff> {
    opts.check()?;
    if tasks.is_empty() {
        return Err(EvalError::Input("paired comparison of no tasks".into()));
    }
    let d: Vec<Vec<f64>> = tasks
        .iter()
        .map(|(t, a, b)| diffs(t, a, b))
        .collect::<Result<_>>()?;
    let k = d.len() as f64;
    let est = d.iter().map(|x| mean(x)).sum::<f64>() / k;
    let se = d.iter().map(|x| stderr(x).powi(2)).sum::<f64>().sqrt() / k;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut stats: Vec<f64> = (0..opts.resamples)
        .map(|_| {
            d.iter()
                .map(|x| {
                    let n = x.len();
                    (0..n).map(|_| x[rng.gen_range(0..n)]).sum::<f64>() / n as f64
                })
                .sum::<f64>()
                / k
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let alpha = (1.0 - opts.level) / 2.0;
    let single = tasks.len() == 1;
    let binary = single && is_binary(tasks[0].1) && is_binary(tasks[0].2);
    let (b_only, a_only) = if binary {
        let (a, b) = (tasks[0].1, tasks[0].2);
        let bo = a.iter().zip(b).filter(|(x, y)| **y > **x).count();
        let ao = a.iter().zip(b).filter(|(x, y)| **x > **y).count();
        (Some(bo), Some(ao))
    } else {
        (None, None)
    };
    Ok(PairedDiff {
        n: d.iter().map(Vec::len).sum(),
        mean: est,
        stderr: se,
        lo: quantile(&stats, alpha),
        hi: quantile(&stats, 1.0 - alpha),
        level: opts.level,
        resamples: opts.resamples,
        b_only,
        a_only,
        p_mcnemar: b_only.zip(a_only).map(|(b, a)| mcnemar_exact(b, a)),
    })
}

/// Docs needed so that a true difference of `effect` is resolved at two-sided level `1 - alpha` with
/// power `power`, for per-doc differences of standard deviation `sd` (normal approximation:
/// `n = ((z_{1-alpha/2} + z_power) sd / effect)^2`).
pub fn docs_to_resolve(sd: f64, effect: f64, alpha: f64, power: f64) -> f64 {
    let z = |p: f64| normal_quantile(p);
    ((z(1.0 - alpha / 2.0) + z(power)) * sd / effect).powi(2)
}

/// Standard-normal quantile (Acklam's rational approximation, relative error < 1.2e-9).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let pl = 0.02425;
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    if p < pl {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - pl {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> Vec<f64> {
        s.bytes().map(|c| f64::from(c == b'1')).collect()
    }

    /// Exact binomial tails, computed independently (Python: `2 * sum(comb(n, i) for i in
    /// range(k + 1)) / 2**n`).
    #[test]
    fn mcnemar_matches_binomial_reference() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // n = 10, k = 2: 2 * (1 + 10 + 45) / 1024 = 0.109375
        assert!((mcnemar_exact(8, 2) - 0.109375).abs() < 1e-12);
        assert!((mcnemar_exact(2, 8) - 0.109375).abs() < 1e-12);
        // n = 20, k = 3: 2 * (1 + 20 + 190 + 1140) / 2^20 = 0.002576828002929688
        assert!((mcnemar_exact(17, 3) - 0.002576828002929688).abs() < 1e-15);
        // symmetric: capped at 1
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        // n = 200, k = 80 (log-space sum over 81 terms)
        let p = mcnemar_exact(120, 80);
        assert!((p - 0.0056851559967503055).abs() < 1e-12, "{p}");
    }

    #[test]
    fn paired_interval_and_counts() {
        // 100 docs: b fixes 12 docs that a gets wrong and breaks 2 it gets right
        let a: Vec<f64> = (0..100)
            .map(|i| f64::from(i < 50 || (62..64).contains(&i)))
            .collect();
        let b: Vec<f64> = (0..100).map(|i| f64::from(i < 62)).collect();
        let r = paired("t", &a, &b, &BootstrapOptions::default()).unwrap();
        assert_eq!((r.n, r.b_only, r.a_only), (100, Some(12), Some(2)));
        assert!((r.mean - 0.10).abs() < 1e-12);
        // sd of the differences: values +1 x12, -1 x2, 0 x86 -> var = (14 - 100 * 0.01) / 99
        let se = ((14.0 - 1.0) / 99.0 / 100.0f64).sqrt();
        assert!((r.stderr - se).abs() < 1e-12);
        // the percentile interval is close to mean +- 1.96 se and excludes 0
        assert!((r.lo - (0.10 - 1.96 * se)).abs() < 0.012, "{r:?}");
        assert!((r.hi - (0.10 + 1.96 * se)).abs() < 0.012, "{r:?}");
        assert!(r.resolved());
        // n = 14, k = 2: 2 * (1 + 14 + 91) / 16384
        assert!((r.p_mcnemar.unwrap() - 212.0 / 16384.0).abs() < 1e-12);
        // identical variants: zero-width interval at 0, not resolved
        let z = paired("t", &a, &a, &BootstrapOptions::default()).unwrap();
        assert_eq!(
            (z.mean, z.lo, z.hi, z.p_mcnemar),
            (0.0, 0.0, 0.0, Some(1.0))
        );
        assert!(!z.resolved());
        // deterministic
        assert_eq!(
            r,
            paired("t", &a, &b, &BootstrapOptions::default()).unwrap()
        );
    }

    #[test]
    fn macro_average_is_mean_of_task_differences() {
        let (a1, b1) = (bits("1100110011"), bits("1110111011"));
        let (a2, b2) = (bits("10101010"), bits("10101000"));
        let r = paired_macro(
            &[("x", &a1, &b1), ("y", &a2, &b2)],
            &BootstrapOptions::default(),
        )
        .unwrap();
        let want = (0.2 + (-0.125)) / 2.0;
        assert!((r.mean - want).abs() < 1e-12);
        assert_eq!(r.n, 18);
        assert!(r.p_mcnemar.is_none());
        assert!(r.lo <= r.mean && r.mean <= r.hi);
    }

    #[test]
    fn bad_inputs_are_named() {
        let o = BootstrapOptions::default();
        let e = paired("piqa", &[1.0, 0.0], &[1.0], &o).unwrap_err();
        assert!(e.to_string().contains("piqa") && e.to_string().contains("same docs"));
        let e = paired("boolq", &[], &[], &o).unwrap_err();
        assert!(e.to_string().contains("boolq"));
        let e = paired("t", &[f64::NAN], &[1.0], &o).unwrap_err();
        assert!(e.to_string().contains("not finite"));
        let e = paired("t", &[1.0], &[1.0], &BootstrapOptions { level: 1.5, ..o }).unwrap_err();
        assert!(e.to_string().contains("level"));
    }

    #[test]
    fn normal_quantile_and_sample_size() {
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_quantile(0.8) - 0.8416212335729143).abs() < 1e-8);
        assert!((normal_quantile(0.01) + 2.3263478740408408).abs() < 1e-8);
        // sd 0.3 per doc, effect 1 point, alpha 0.05, power 0.8: ((1.95996 + 0.84162) 0.3 / 0.01)^2
        let n = docs_to_resolve(0.3, 0.01, 0.05, 0.8);
        assert!((n - 7063.99).abs() < 0.05, "{n}");
    }
}
