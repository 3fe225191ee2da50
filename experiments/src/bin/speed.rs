//! Wall-clock prefill and decode throughput of dense / quantized / routed / routed + quantized models,
//! measured side by side in one run (the variants of `experiments/configs/speed.toml`; their routers
//! and quantized weights come from the shared stage cache), with speedups as ratios to the first
//! variant and memory (weights as stored, K/V cache after prompt + generation).
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use tch::{Kind, Tensor};

use experiments::cell::build_model;
use experiments::grid::{config_path, env_of, to_cell, ExperimentFile, GridArgs};
use qtale_eval::{Decoder, RoutedDecoder};
use qtale_model::model::KvCache;

#[derive(Parser, Debug)]
#[command(
    name = "speed",
    about = "Prefill and decode throughput of dense / quantized / routed / routed+quantized, side by side"
)]
struct Cli {
    #[command(flatten)]
    grid: GridArgs,
    /// Prompt tokens (prefill of one sequence).
    #[arg(long, default_value_t = 256)]
    prompt_len: usize,
    /// Tokens generated one at a time after the prompt (greedy, KV cache).
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(Serialize)]
struct Row {
    variant: String,
    theta: Option<f64>,
    exec_ratio: Option<f64>,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    prefill_speedup: f64,
    decode_speedup: f64,
    weight_bytes: usize,
    kv_bytes: usize,
}

fn cache_bytes(c: &KvCache) -> usize {
    let b = |t: &Option<Tensor>| {
        t.as_ref()
            .map_or(0, |t| t.numel() * t.kind().elt_size_in_bytes())
    };
    c.layers.iter().map(|l| b(&l.k) + b(&l.v)).sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (prefill seconds, decode seconds, K/V bytes at the end) of one run.
fn run_once(d: &dyn Decoder, prompt: &[i64], n_new: usize) -> Result<(f64, f64, usize)> {
    let _g = tch::no_grad_guard();
    let dev = d.device();
    let mut cache = KvCache::new(d.num_layers());
    let ids = Tensor::from_slice(prompt).unsqueeze(0).to_device(dev);
    let mask = ids.ones_like();
    let t0 = Instant::now();
    let h = d.forward_hidden(&ids, &mask, &mut cache)?;
    let mut next = d.head(&h.select(1, -1)).argmax(-1, false);
    let _ = next.int64_value(&[0]);
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..n_new {
        let ids = next.view([1, 1]);
        let h = d.forward_hidden(&ids, &ids.ones_like(), &mut cache)?;
        next = d.head(&h.select(1, -1)).argmax(-1, false);
        let _ = next.int64_value(&[0]);
    }
    Ok((prefill, t1.elapsed().as_secs_f64(), cache_bytes(&cache)))
}

fn main() -> Result<()> {
    let a = Cli::parse();
    anyhow::ensure!(
        a.prompt_len >= 2 && a.decode_tokens >= 1 && a.reps >= 1,
        "--prompt-len >= 2, --decode-tokens >= 1 and --reps >= 1"
    );
    let binary = "speed";
    let file = ExperimentFile::read(&config_path(&a.grid, binary))?;
    let env = env_of(&a.grid, binary)?;
    std::fs::create_dir_all(&env.out).with_context(|| format!("creating {}", env.out.display()))?;
    let mut rows: Vec<Row> = Vec::new();
    for v in file.expand()? {
        let cell = to_cell(v, &a.grid)?;
        if a.grid.list {
            println!("{}", cell.name);
            continue;
        }
        let built = build_model(&cell, &env)?;
        let prompt: Vec<i64> =
            qtale_model::corpus::heldout_windows(&built.lm.tokenizer, 1, a.prompt_len)?
                .pop()
                .context("no held-out text (run `bash scripts/setup.sh`)")?;
        let (routed, theta) = match built.routed(&cell, &env)? {
            Some(r) => (Some(RoutedDecoder::new(r.model)), r.theta.report.chosen),
            None => (None, None),
        };
        let d: &dyn Decoder = match &routed {
            Some(r) => r,
            None => &built.lm.model,
        };
        run_once(d, &prompt[..prompt.len().min(16)], 2)?; // warm-up
        d.take_exec_stats();
        let (mut pre, mut dec, mut kv) = (Vec::new(), Vec::new(), 0);
        for _ in 0..a.reps {
            let (p, t, k) = run_once(d, &prompt, a.decode_tokens)?;
            pre.push(prompt.len() as f64 / p);
            dec.push(a.decode_tokens as f64 / t);
            kv = k;
        }
        let exec = d.take_exec_stats().map(|e| e.ratio());
        let (p, t) = (median(pre), median(dec));
        let (p0, t0) = rows
            .first()
            .map_or((p, t), |r| (r.prefill_tok_s, r.decode_tok_s));
        println!(
            "{:<22} prefill {:>8.1} tok/s ({:.2}x)  decode {:>6.2} tok/s ({:.2}x)  weights {:>7.1} MB  KV {:>6.2} MB{}",
            cell.name,
            p,
            p / p0,
            t,
            t / t0,
            d.weight_bytes() as f64 / 1e6,
            kv as f64 / 1e6,
            exec.map_or(String::new(), |e| format!("  ratio {e:.3}"))
        );
        rows.push(Row {
            variant: cell.name.clone(),
            theta: theta.map(|p| p.theta),
            exec_ratio: exec,
            prefill_tok_s: p,
            decode_tok_s: t,
            prefill_speedup: p / p0,
            decode_speedup: t / t0,
            weight_bytes: d.weight_bytes(),
            kv_bytes: kv,
        });
    }
    if a.grid.list {
        return Ok(());
    }
    let mut w = csv::Writer::from_path(env.out.join("speed.csv"))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let (rev, dirty) = qtale_eval::report::git_state();
    let json = serde_json::json!({"experiment": file, "git_revision": rev, "git_dirty": dirty,
        "date_utc": qtale_eval::report::utc_now(), "threads": tch::get_num_threads(),
        "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens, "reps": a.reps,
        "kind": format!("{:?}", Kind::Float), "rows": rows});
    std::fs::write(
        env.out.join("speed.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("wrote {}/speed.csv and speed.json", env.out.display());
    Ok(())
}
