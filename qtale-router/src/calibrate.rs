//! Post-training execution-ratio adjustment (QTALE): pick the one global `theta` on calibration data,
//! either (a) to reach a requested execution ratio (bisection), or (b) as the smallest execution ratio
//! whose caller-supplied score stays within a tolerance of a reference score (grid search).
use std::borrow::Borrow;

use qtale_model::Llama;
use serde::{Deserialize, Serialize};

use crate::batch::CalibBatch;
use crate::error::{Result, RouterError};
use crate::routed::{ForwardOptions, Mode, RoutedLlama};
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
        ..Default::default()
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
    let original = routed.theta;
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

/// How the inference threshold theta is chosen after training and quantization (QTALE's
/// post-training execution-ratio adjustment, method.md section 2.2). The one home of the rules; the
/// experiment cells and binaries name them in configs (`theta = { rule = "ratio", target = 0.6 }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum ThetaRule {
    /// A fixed threshold (D-LLM's 0.5: execute when p_exec >= 0.5).
    Fixed { theta: f64 },
    /// Rule (a): bisection to an execution ratio on the calibration windows.
    Ratio {
        target: f64,
        #[serde(default = "default_ratio_tol")]
        tol: f64,
    },
    /// Rule (b): the smallest execution ratio on `grid` whose calibration loss (mean NLL, nats) is
    /// within `tolerance` of the dense model with the same quantization. When no grid point qualifies
    /// the rule does not converge: the routed model is left at the grid point of lowest loss and the
    /// report says `converged = false` (tables mark such cells), never a silent choice.
    Tolerance {
        tolerance: f64,
        #[serde(default = "default_grid")]
        grid: Vec<f64>,
    },
}

fn default_ratio_tol() -> f64 {
    0.01
}
fn default_grid() -> Vec<f64> {
    vec![0.05, 0.1, 0.2, 0.3, 0.4, 0.5]
}

impl Default for ThetaRule {
    fn default() -> Self {
        ThetaRule::Fixed {
            theta: crate::routed::DEFAULT_THETA,
        }
    }
}

impl ThetaRule {
    /// Check the rule's own values (errors name the field).
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(RouterError::config(f, m));
        match self {
            ThetaRule::Fixed { theta } if !(0.0..=1.0).contains(theta) => {
                bad("theta.theta", format!("{theta} not in [0, 1]"))
            }
            ThetaRule::Ratio { target, tol } if !(0.0..=1.0).contains(target) || *tol <= 0.0 => {
                bad(
                    "theta.target",
                    format!("{target} must be in [0, 1] and theta.tol {tol} > 0"),
                )
            }
            ThetaRule::Tolerance { tolerance, grid }
                // Also refuses NaN.
                if !tolerance.is_finite()
                    || *tolerance < 0.0
                    || grid.is_empty()
                    || grid.iter().any(|t| !(0.0..=1.0).contains(t)) =>
            {
                bad(
                    "theta.tolerance",
                    "tolerance must be >= 0 and theta.grid a non-empty list of values in [0, 1]"
                        .into(),
                )
            }
            _ => Ok(()),
        }
    }

    /// Whether the rule compares with a reference loss (rule (b)).
    pub fn needs_reference(&self) -> bool {
        matches!(self, ThetaRule::Tolerance { .. })
    }

    /// Choose theta on `batches` (execution ratio) and `windows` (the loss of rule (b)), leaving
    /// `routed` at it. `reference_nll` is the dense (same quantization) model's mean NLL on `windows`,
    /// required by rule (b).
    pub fn apply<M: Borrow<Llama>, R: Router>(
        &self,
        routed: &mut RoutedLlama<M, R>,
        batches: &[CalibBatch],
        windows: &[Vec<i64>],
        reference_nll: Option<f64>,
    ) -> Result<ThetaReport> {
        self.validate()?;
        match self {
            ThetaRule::Fixed { theta } => {
                let (pt, _) = measure(routed, batches, *theta)?;
                Ok(ThetaReport {
                    chosen: Some(pt.clone()),
                    converged: true,
                    points: vec![pt],
                })
            }
            ThetaRule::Ratio { target, tol } => calibrate_ratio(
                routed,
                batches,
                *target,
                BisectOptions {
                    tol: *tol,
                    ..Default::default()
                },
            ),
            ThetaRule::Tolerance { tolerance, grid } => {
                let reference = reference_nll.ok_or_else(|| {
                    RouterError::Input("theta rule (b) needs the dense reference loss".into())
                })?;
                let mut rep =
                    calibrate_grid(routed, batches, grid, reference, *tolerance, false, |m| {
                        routed_nll(m, windows)
                    })?;
                if !rep.converged {
                    let best = rep
                        .points
                        .iter()
                        .min_by(|a, b| {
                            a.score
                                .unwrap_or(f64::INFINITY)
                                .total_cmp(&b.score.unwrap_or(f64::INFINITY))
                        })
                        .cloned()
                        .ok_or_else(|| RouterError::Input("empty theta grid".into()))?;
                    routed.set_theta(best.theta)?;
                    rep.chosen = Some(best);
                }
                Ok(rep)
            }
        }
    }
}

/// Mean next-token NLL of a routed model in inference mode (real skipping at its theta) over
/// equal-length windows: the model crate's [`qtale_model::decoder::mean_nll`] through the
/// [`crate::RoutedDecoder`] view.
pub fn routed_nll<M: Borrow<Llama>, R: Router>(
    r: &RoutedLlama<M, R>,
    windows: &[Vec<i64>],
) -> Result<f64> {
    let view = RoutedLlama {
        model: r.llama(),
        router: &r.router,
        config: r.config.clone(),
        theta: r.theta,
    };
    let mut dec = crate::RoutedDecoder::new(view);
    dec.collect_stats = false;
    Ok(qtale_model::decoder::mean_nll(&dec, windows)?)
}
