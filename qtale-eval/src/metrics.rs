//! Accuracy metrics as lm-eval computes them, with the standard error of the mean.
use serde::Serialize;

use crate::tasks::{Metric, TaskId, CSQA7};

/// First index of the maximum (numpy `argmax`; NaN never wins).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}

/// Per-doc outcome of a multiple-choice doc.
#[derive(Debug, Clone, Serialize)]
pub struct DocScore {
    pub doc_id: usize,
    pub gold: usize,
    /// Log-likelihood of each choice.
    pub lls: Vec<f64>,
    pub is_greedy: Vec<bool>,
    /// Choice lengths in characters.
    pub lens: Vec<usize>,
    /// `argmax(ll)`.
    pub pred: usize,
    /// `argmax(ll / len)`.
    pub pred_norm: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

impl DocScore {
    pub fn new(
        doc_id: usize,
        gold: usize,
        lls: Vec<f64>,
        is_greedy: Vec<bool>,
        lens: Vec<usize>,
    ) -> Self {
        let pred = argmax(&lls);
        let normed: Vec<f64> = lls.iter().zip(&lens).map(|(l, &n)| l / n as f64).collect();
        let pred_norm = argmax(&normed);
        DocScore {
            doc_id,
            gold,
            acc: (pred == gold) as u8 as f64,
            acc_norm: (pred_norm == gold) as u8 as f64,
            lls,
            is_greedy,
            lens,
            pred,
            pred_norm,
        }
    }
}

/// Mean and standard error of the mean (sample standard deviation, `ddof = 1`, over `sqrt(n)`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MeanStderr {
    pub mean: f64,
    pub stderr: f64,
}

pub fn mean_stderr(xs: &[f64]) -> MeanStderr {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return MeanStderr {
            mean: f64::NAN,
            stderr: f64::NAN,
        };
    }
    let mean = xs.iter().sum::<f64>() / n;
    let stderr = if xs.len() < 2 {
        f64::NAN
    } else {
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (var / n).sqrt()
    };
    MeanStderr { mean, stderr }
}

/// Task-level metrics.
#[derive(Debug, Clone, Serialize)]
pub struct TaskMetrics {
    pub n: usize,
    pub acc: MeanStderr,
    /// Only for tasks where lm-eval reports it.
    pub acc_norm: Option<MeanStderr>,
}

impl TaskMetrics {
    pub fn from_docs(task: TaskId, docs: &[DocScore]) -> Self {
        let acc: Vec<f64> = docs.iter().map(|d| d.acc).collect();
        let accn: Vec<f64> = docs.iter().map(|d| d.acc_norm).collect();
        TaskMetrics {
            n: docs.len(),
            acc: mean_stderr(&acc),
            acc_norm: task.has_acc_norm().then(|| mean_stderr(&accn)),
        }
    }

    /// The task's headline metric ([`TaskId::headline_metric`]) with its standard error.
    pub fn headline(&self, task: TaskId) -> MeanStderr {
        match (task.headline_metric(), self.acc_norm) {
            (Metric::AccNorm, Some(n)) => n,
            _ => self.acc,
        }
    }

    pub fn get(&self, m: Metric) -> f64 {
        match m {
            Metric::Acc => self.acc.mean,
            Metric::AccNorm => self.acc_norm.map_or(self.acc.mean, |x| x.mean),
        }
    }
}

/// The CSQA-7 average with its standard error.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Csqa7 {
    pub mean: f64,
    /// `sqrt(sum of the seven tasks' squared standard errors) / 7` (the tasks are independent samples).
    pub stderr: f64,
}

/// The CSQA-7 average: unweighted mean over PIQA, BoolQ, SIQA, ARC-e, ARC-c, WinoGrande, OBQA of each
/// task's headline metric ([`TaskId::headline_metric`]), and its standard error. `None` unless all
/// seven are present.
pub fn csqa7(results: &[(TaskId, &TaskMetrics)]) -> Option<Csqa7> {
    let mut sum = 0.0;
    let mut se2 = 0.0;
    for name in CSQA7 {
        let (t, m) = results.iter().find(|(id, _)| id.name() == name)?;
        let s = m.headline(*t);
        sum += s.mean;
        se2 += s.stderr * s.stderr;
    }
    let k = CSQA7.len() as f64;
    Some(Csqa7 {
        mean: sum / k,
        stderr: se2.sqrt() / k,
    })
}

/// The mean of [`csqa7`].
pub fn csqa7_average(results: &[(TaskId, &TaskMetrics)]) -> Option<f64> {
    csqa7(results).map(|c| c.mean)
}
