//! Scoring loaded tasks with a [`Scorer`]: build the requests, score them, regroup per doc; and the
//! one loop over a task list (with the CSQA-7 average) that the `eval` binary and the experiment
//! cells share.
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::encode::{encode_pair, EncodeConfig};
use crate::error::Result;
use crate::metrics::{csqa7, Csqa7, DocScore, TaskMetrics};
use crate::scorer::{LlRequest, ScoreStats, Scorer};
use crate::tasks::{TaskData, TaskId, TaskSource};

/// Cost of scoring one task.
#[derive(Debug, Clone, Serialize)]
pub struct Efficiency {
    /// Wall time for tokenization and scoring.
    pub wall_s: f64,
    pub docs_per_s: f64,
    pub requests: usize,
    /// Real tokens through the model (shared contexts once) and per second.
    pub tokens_processed: usize,
    pub tokens_per_s: f64,
    /// Tokens lm-eval would run (each request's context + continuation - 1) and per second of our wall
    /// time: the throughput comparable with lm-eval's.
    pub request_tokens: usize,
    pub request_tokens_per_s: f64,
    pub padded_slots: usize,
    pub forward_calls: usize,
    pub weight_bytes: usize,
    pub peak_kv_bytes: usize,
    /// Realized execution ratio (routed decoders), overall and per layer.
    pub exec_ratio: Option<f64>,
    pub exec_ratio_per_layer: Option<Vec<f64>>,
    /// FLOPs relative to the dense model (1.0 for dense; executed layers, attention over the keys each
    /// token sees, and the routers' own cost for routed decoders: `qtale_model::decoder::FlopModel`).
    pub flops_rel_dense: Option<f64>,
}

/// The outcome of one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub task: TaskId,
    pub source: TaskSource,
    pub available: usize,
    pub metrics: TaskMetrics,
    pub efficiency: Efficiency,
    #[serde(skip)]
    pub docs: Vec<DocScore>,
}

/// Flatten a task's docs into token requests; returns the requests and each doc's request range.
pub fn build_requests(
    tok: &Tokenizer,
    enc: &EncodeConfig,
    data: &TaskData,
) -> Result<(Vec<LlRequest>, Vec<std::ops::Range<usize>>)> {
    let mut reqs = Vec::new();
    let mut ranges = Vec::with_capacity(data.docs.len());
    for d in &data.docs {
        let start = reqs.len();
        for (c, k) in &d.requests {
            reqs.push(encode_pair(tok, c, k, enc)?);
        }
        ranges.push(start..reqs.len());
    }
    Ok((reqs, ranges))
}

/// Score a task; `progress(n)` gets the number of requests finished.
pub fn evaluate_task(
    scorer: &mut dyn Scorer,
    tok: &Tokenizer,
    enc: &EncodeConfig,
    data: &TaskData,
    weight_bytes: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<TaskResult> {
    let t0 = Instant::now();
    scorer.take_stats();
    let (reqs, ranges) = build_requests(tok, enc, data)?;
    let res = scorer.loglikelihood(&reqs, progress)?;
    let stats: ScoreStats = scorer.take_stats();
    let wall = t0.elapsed().as_secs_f64();
    let docs: Vec<DocScore> = data
        .docs
        .iter()
        .zip(&ranges)
        .map(|(d, r)| {
            DocScore::new(
                d.doc_id,
                d.gold,
                res[r.clone()].iter().map(|x| x.logprob).collect(),
                res[r.clone()].iter().map(|x| x.is_greedy).collect(),
                d.choice_lens(),
            )
        })
        .collect();
    let per_s = |x: f64| if wall > 0.0 { x / wall } else { f64::NAN };
    let efficiency = Efficiency {
        wall_s: wall,
        docs_per_s: per_s(docs.len() as f64),
        requests: reqs.len(),
        tokens_processed: stats.tokens_processed,
        tokens_per_s: per_s(stats.tokens_processed as f64),
        request_tokens: stats.tokens_unshared,
        request_tokens_per_s: per_s(stats.tokens_unshared as f64),
        padded_slots: stats.padded_slots,
        forward_calls: stats.forward_calls,
        weight_bytes,
        peak_kv_bytes: stats.peak_kv_bytes,
        flops_rel_dense: Some(stats.exec.as_ref().map_or(1.0, |e| e.flops_fraction())),
        exec_ratio: stats.exec.as_ref().map(|e| e.ratio()),
        exec_ratio_per_layer: stats.exec.as_ref().map(|e| e.layer_ratio()),
    };
    Ok(TaskResult {
        task: data.task,
        source: data.source.clone(),
        available: data.available,
        metrics: TaskMetrics::from_docs(data.task, &docs),
        efficiency,
        docs,
    })
}

/// What a caller sees of [`evaluate_tasks`]' progress (every method does nothing by default).
pub trait Progress {
    /// A task starts with `requests` requests to score.
    fn start(&mut self, _task: TaskId, _requests: usize) {}
    /// `done` requests of the current task are scored.
    fn advance(&mut self, _done: usize) {}
    /// The current task is scored.
    fn finish(&mut self, _result: &TaskResult) {}
}

/// No progress report.
pub struct Silent;

impl Progress for Silent {}

/// One progress bar per task (the task name as its message and prefix), optionally hidden, and
/// optionally a summary line per finished task on stderr.
pub struct TaskBars {
    style: ProgressStyle,
    hidden: bool,
    summary: bool,
    bar: Option<ProgressBar>,
}

impl TaskBars {
    pub fn new(style: ProgressStyle, hidden: bool, summary: bool) -> Self {
        TaskBars {
            style,
            hidden,
            summary,
            bar: None,
        }
    }
}

impl Progress for TaskBars {
    fn start(&mut self, task: TaskId, requests: usize) {
        let bar = if self.hidden {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(requests as u64)
        };
        bar.set_style(self.style.clone());
        bar.set_message(task.name());
        bar.set_prefix(task.name());
        self.bar = Some(bar);
    }
    fn advance(&mut self, done: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
        }
    }
    fn finish(&mut self, r: &TaskResult) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if !self.summary {
            return;
        }
        let m = &r.metrics;
        eprintln!(
            "{:>14}: n={:5} acc={:.4}±{:.4}{} | {:.1}s, {:.2} docs/s, {:.0} tok/s",
            r.task.name(),
            m.n,
            m.acc.mean,
            m.acc.stderr,
            m.acc_norm
                .map(|a| format!(" acc_norm={:.4}±{:.4}", a.mean, a.stderr))
                .unwrap_or_default(),
            r.efficiency.wall_s,
            r.efficiency.docs_per_s,
            r.efficiency.tokens_per_s
        );
    }
}

/// Score every loaded task in order with one scorer, and the CSQA-7 average over them (`None` unless
/// all seven of its tasks are among them).
pub fn evaluate_tasks(
    scorer: &mut dyn Scorer,
    tok: &Tokenizer,
    enc: &EncodeConfig,
    tasks: &[TaskData],
    weight_bytes: usize,
    progress: &mut dyn Progress,
) -> Result<(Vec<TaskResult>, Option<Csqa7>)> {
    let mut results = Vec::with_capacity(tasks.len());
    for data in tasks {
        let n_req: usize = data.docs.iter().map(|d| d.requests.len()).sum();
        progress.start(data.task, n_req);
        let r = evaluate_task(scorer, tok, enc, data, weight_bytes, &mut |n| {
            progress.advance(n)
        })?;
        progress.finish(&r);
        results.push(r);
    }
    let pairs: Vec<(TaskId, &TaskMetrics)> = results.iter().map(|r| (r.task, &r.metrics)).collect();
    let avg = csqa7(&pairs);
    Ok((results, avg))
}
