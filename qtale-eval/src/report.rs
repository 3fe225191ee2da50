//! Results files: a JSON with the full configuration and per-task metrics, a CSV with one row per
//! (model variant, task), and an optional per-doc JSONL log.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use qtale_model::ModelSource;

use crate::encode::EncodeConfig;
use crate::error::{EvalError, Result};
use crate::metrics::{csqa7_average, TaskMetrics};
use crate::run::{Efficiency, TaskResult};
use crate::tasks::TaskId;

/// Everything that produced a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Name of the model variant (e.g. `dense`, `rtn-w4g128`, `routed-theta0.5`).
    pub variant: String,
    pub model_source: String,
    /// sha256 over the model's files (GGUF file; or config.json + safetensors of an HF dir).
    pub model_hash: Option<String>,
    pub device: String,
    pub dtype: String,
    pub batch_size: usize,
    pub limit: Option<usize>,
    pub share_context: bool,
    pub threads: i32,
    pub encode: EncodeConfig,
    pub data_root: PathBuf,
    pub tasks: Vec<String>,
    /// Quantization and routing configs of the variant (`null` for the dense model).
    pub quantization: Option<serde_json::Value>,
    pub routing: Option<serde_json::Value>,
    pub theta: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskSummary {
    pub split: String,
    pub source: PathBuf,
    pub format: crate::data::Format,
    pub data_note: String,
    pub available_docs: usize,
    pub metrics: TaskMetrics,
    pub efficiency: Efficiency,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResultsFile {
    pub harness: String,
    pub harness_version: String,
    pub protocol: String,
    /// What produced the file: revision, versions, device, dtype, threads, host, Slurm ids, date.
    pub provenance: crate::provenance::Provenance,
    pub config: RunConfig,
    pub tasks: BTreeMap<String, TaskSummary>,
    /// Unweighted mean over the CSQA-7 tasks of their headline metric (acc_norm where reported).
    pub csqa7: Option<f64>,
    pub csqa7_rule: String,
    pub total_wall_s: f64,
    pub notes: Vec<String>,
}

impl ResultsFile {
    pub fn new(
        config: RunConfig,
        provenance: crate::provenance::Provenance,
        results: &[TaskResult],
        notes: Vec<String>,
    ) -> Self {
        let pairs: Vec<(TaskId, &TaskMetrics)> =
            results.iter().map(|r| (r.task, &r.metrics)).collect();
        ResultsFile {
            harness: "qtale-eval".into(),
            harness_version: env!("CARGO_PKG_VERSION").into(),
            protocol: "lm-evaluation-harness rules (docs/eval-protocol.md): zero-shot, \
                       target delimiter ' ', trailing context whitespace moved to the continuation, \
                       acc_norm by characters"
                .into(),
            provenance,
            config,
            tasks: results
                .iter()
                .map(|r| {
                    (
                        r.task.name().to_string(),
                        TaskSummary {
                            split: r.source.split.clone(),
                            source: r.source.path.clone(),
                            format: r.source.format,
                            data_note: r.source.note.clone(),
                            available_docs: r.available,
                            metrics: r.metrics.clone(),
                            efficiency: r.efficiency.clone(),
                        },
                    )
                })
                .collect(),
            csqa7: csqa7_average(&pairs),
            csqa7_rule: "mean of piqa acc_norm, boolq acc, social_iqa acc, arc_easy acc_norm, \
                         arc_challenge acc_norm, winogrande acc, openbookqa acc_norm"
                .into(),
            total_wall_s: results.iter().map(|r| r.efficiency.wall_s).sum(),
            notes,
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let s = serde_json::to_string_pretty(self).map_err(|e| EvalError::Input(e.to_string()))?;
        std::fs::write(path, s + "\n").map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub const CSV_HEADER: [&str; 19] = [
    "variant",
    "task",
    "split",
    "n",
    "acc",
    "acc_stderr",
    "acc_norm",
    "acc_norm_stderr",
    "wall_s",
    "docs_per_s",
    "tokens_per_s",
    "request_tokens_per_s",
    "weight_bytes",
    "peak_kv_bytes",
    "exec_ratio",
    "flops_rel_dense",
    "theta",
    "bos",
    "model_hash",
];

/// Append one row per task to a CSV (header written when the file is new or empty).
pub fn append_csv(path: &Path, cfg: &RunConfig, results: &[TaskResult]) -> Result<()> {
    let new = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    let mut w = csv::Writer::from_writer(f);
    let csv_err = |e: csv::Error| EvalError::Input(format!("{}: {e}", path.display()));
    if new {
        w.write_record(CSV_HEADER).map_err(csv_err)?;
    }
    let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
    for r in results {
        let m = &r.metrics;
        let e = &r.efficiency;
        w.write_record([
            cfg.variant.clone(),
            r.task.name().to_string(),
            r.source.split.clone(),
            m.n.to_string(),
            format!("{:.6}", m.acc.mean),
            format!("{:.6}", m.acc.stderr),
            opt(m.acc_norm.map(|x| x.mean)),
            opt(m.acc_norm.map(|x| x.stderr)),
            format!("{:.3}", e.wall_s),
            format!("{:.3}", e.docs_per_s),
            format!("{:.1}", e.tokens_per_s),
            format!("{:.1}", e.request_tokens_per_s),
            e.weight_bytes.to_string(),
            e.peak_kv_bytes.to_string(),
            opt(e.exec_ratio),
            opt(e.flops_rel_dense),
            opt(cfg.theta),
            cfg.encode.add_bos.to_string(),
            cfg.model_hash.clone().unwrap_or_default(),
        ])
        .map_err(csv_err)?;
    }
    w.flush().map_err(io_err(path))?;
    Ok(())
}

/// One JSON line per doc: task, doc id, gold, predictions and each choice's log-likelihood.
pub fn write_doc_log(path: &Path, results: &[TaskResult]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_err(path))?);
    for r in results {
        for d in &r.docs {
            let mut v = serde_json::to_value(d).map_err(|e| EvalError::Input(e.to_string()))?;
            if let Some(o) = v.as_object_mut() {
                o.insert("task".into(), r.task.name().into());
            }
            writeln!(f, "{v}").map_err(io_err(path))?;
        }
    }
    f.flush().map_err(io_err(path))
}

/// sha256 over the files that define a model.
pub fn model_hash(src: &ModelSource) -> Option<String> {
    let files: Vec<PathBuf> = match src {
        ModelSource::Gguf(p) => vec![p.clone()],
        ModelSource::HfDir(d) => {
            let mut v: Vec<PathBuf> = std::fs::read_dir(d)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().to_string());
                    n.is_some_and(|n| n == "config.json" || n.ends_with(".safetensors"))
                })
                .collect();
            v.sort();
            v
        }
        ModelSource::Hub { .. } => return None,
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = std::fs::File::open(p).ok()?;
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Some(format!("{:x}", h.finalize()))
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format_utc(secs)
}

/// Unix seconds to `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, days-from-civil inverse).
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
