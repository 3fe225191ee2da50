//! Post-training execution-ratio adjustment (QTALE): pick the one global `theta` on calibration data,
//! either (a) to reach a requested execution ratio (bisection), or (b) as the smallest execution ratio
//! whose caller-supplied score stays within a tolerance of a reference score (grid search).
use std::borrow::Borrow;

use qtale_model::Llama;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RouterError};
use crate::routed::{CalibBatch, ForwardOptions, Mode, RoutedLlama};
use crate::router::Router;
use qtale_model::decoder::ExecSummary;

/// One evaluated threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThetaPoint {
    pub theta: f64,
    /// Execution ratio (real non-reserved tokens, all layers; see [`crate::ExecStats::ratio`]).
    pub ratio: f64,
    /// Executed FLOPs / dense FLOPs.
    pub flops_fraction: f64,
    /// Executed FLOPs per real token.
    pub flops_per_token: f64,
    /// Score of the grid rule (None for bisection).
    pub score: Option<f64>,
}

/// Result of a calibration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThetaReport {
    /// The chosen threshold, `None` when no grid point met the tolerance.
    pub chosen: Option<ThetaPoint>,
    /// Whether the target was met (bisection: |ratio - target| <= tol; grid: a point qualified).
    pub converged: bool,
    /// Every evaluation, in order.
    pub points: Vec<ThetaPoint>,
}

/// Bisection options.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BisectOptions {
    /// Accept when |ratio - target| <= tol.
    pub tol: f64,
    pub max_iter: usize,
}

impl Default for BisectOptions {
    fn default() -> Self {
        BisectOptions {
            tol: 0.005,
            max_iter: 30,
        }
    }
}

/// Run the calibration batches at `theta` (inference mode) and summarise.
pub fn measure<M: Borrow<Llama>, R: Router>(
    routed: &mut RoutedLlama<M, R>,
    batches: &[CalibBatch],
    theta: f64,
) -> Result<(ThetaPoint, ExecSummary)> {
    if batches.is_empty() {
        return Err(RouterError::Input("no calibration batches".into()));
    }
    routed.set_theta(theta)?;
    let _g = tch::no_grad_guard();
    let mut sum = ExecSummary::default();
    let opts = ForwardOptions {
        forced: None,
        stats: true,
    };
    for b in batches {
        let out = routed.forward(&b.ids, b.mask.as_ref(), Mode::Infer, &opts)?;
        sum.merge(&out.stats.expect("stats requested").summary());
    }
    Ok((
        ThetaPoint {
            theta,
            ratio: sum.ratio(),
            flops_fraction: sum.flops_fraction(),
            flops_per_token: sum.flops_per_token(),
            score: None,
        },
        sum,
    ))
}

/// Rule (a): bisection on theta in [0, 1] for the execution ratio `target` (the ratio falls as theta
/// rises). Leaves the routed model at the chosen theta. When the target is out of reach (below the ratio
/// at theta = 1), or the ratio jumps over the tolerance band, reports the closest point with
/// `converged = false`.
pub fn calibrate_ratio<M: Borrow<Llama>, R: Router>(
    routed: &mut RoutedLlama<M, R>,
    batches: &[CalibBatch],
    target: f64,
    opts: BisectOptions,
) -> Result<ThetaReport> {
    if !(0.0..=1.0).contains(&target) {
        return Err(RouterError::Input(format!(
            "target ratio {target} is not in [0, 1]"
        )));
    }
    let mut points = Vec::new();
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut best: Option<ThetaPoint> = None;
    let closer = |p: &ThetaPoint, best: &Option<ThetaPoint>| {
        best.as_ref()
            .is_none_or(|b| (p.ratio - target).abs() < (b.ratio - target).abs())
    };
    for (i, theta) in std::iter::once(0.0)
        .chain(std::iter::once(1.0))
        .chain(std::iter::repeat(f64::NAN))
        .take(opts.max_iter.max(2))
        .enumerate()
    {
        let theta = if i < 2 { theta } else { 0.5 * (lo + hi) };
        let (pt, _) = measure(routed, batches, theta)?;
        points.push(pt.clone());
        if closer(&pt, &best) {
            best = Some(pt.clone());
        }
        if (pt.ratio - target).abs() <= opts.tol {
            break;
        }
        if i == 1 && pt.ratio > target {
            break; // unreachable: even theta = 1 executes more
        }
        if i >= 2 {
            if pt.ratio > target {
                lo = theta;
            } else {
                hi = theta;
            }
        }
    }
    let best = best.expect("at least one point");
    routed.set_theta(best.theta)?;
    Ok(ThetaReport {
        converged: (best.ratio - target).abs() <= opts.tol,
        chosen: Some(best),
        points,
    })
}

/// Rule (b): evaluate every theta of `grid`; among the points whose score is within `tolerance` of
/// `reference` (`score >= reference - tolerance` when higher is better, `<= reference + tolerance`
/// otherwise), choose the smallest execution ratio (ties: fewer FLOPs). `score` is called with the
/// routed model already set to the grid theta (the eval harness plugs in accuracy or perplexity). Leaves
/// the routed model at the chosen theta (or unchanged when none qualifies).
pub fn calibrate_grid<M: Borrow<Llama>, R: Router, F>(
    routed: &mut RoutedLlama<M, R>,
    batches: &[CalibBatch],
    grid: &[f64],
    reference: f64,
    tolerance: f64,
    higher_is_better: bool,
    mut score: F,
) -> Result<ThetaReport>
where
    F: FnMut(&RoutedLlama<M, R>) -> Result<f64>,
{
    if grid.is_empty() {
        return Err(RouterError::Input("empty theta grid".into()));
    }
    let original = routed.config.theta;
    let mut points = Vec::with_capacity(grid.len());
    for &theta in grid {
        let (mut pt, _) = measure(routed, batches, theta)?;
        pt.score = Some(score(routed)?);
        points.push(pt);
    }
    let ok = |s: f64| {
        if higher_is_better {
            s >= reference - tolerance
        } else {
            s <= reference + tolerance
        }
    };
    let chosen = points
        .iter()
        .filter(|p| p.score.is_some_and(ok))
        .min_by(|a, b| {
            a.ratio
                .total_cmp(&b.ratio)
                .then(a.flops_fraction.total_cmp(&b.flops_fraction))
        })
        .cloned();
    routed.set_theta(chosen.as_ref().map_or(original, |c| c.theta))?;
    Ok(ThetaReport {
        converged: chosen.is_some(),
        chosen,
        points,
    })
}
