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
use experiments::grid::{config_path, env_of, to_cell_with, ExperimentArgs, ExperimentFile};
use qtale_model::model::KvCache;
use qtale_model::Decoder;
use qtale_model::Llama;
use qtale_router::RoutedDecoder;
use qtale_router::TrainableRouter;

#[derive(Parser, Debug)]
#[command(
    version,
    name = "speed",
    about = "Prefill and decode throughput of dense / quantized / routed / routed+quantized, side by side"
)]
struct Cli {
    #[command(flatten)]
    grid: ExperimentArgs,
    /// Prompt tokens (prefill of one sequence; >= 2).
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    prompt_len: usize,
    /// Tokens generated one at a time after the prompt (greedy, KV cache; >= 1).
    #[arg(long, default_value_t = 32, value_parser = experiments::args::positive())]
    decode_tokens: usize,
    /// Rounds (each times every variant once, interleaved); medians over rounds are reported (>= 1).
    #[arg(long, default_value_t = 3, value_parser = experiments::args::positive())]
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

/// One variant under measurement: the dense model of its cell, routed when the cell has routers.
struct Variant<'a> {
    name: String,
    dense: &'a Llama,
    routed: Option<RoutedDecoder<&'a Llama, Box<dyn TrainableRouter>>>,
    theta: Option<f64>,
    prompt: Vec<i64>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    kv: usize,
}

impl Variant<'_> {
    fn decoder(&self) -> &dyn Decoder {
        match &self.routed {
            Some(r) => r,
            None => self.dense,
        }
    }
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
    let binary = "speed";
    experiments::signals::install()?;
    let file = ExperimentFile::read(&config_path(&a.grid, binary))?;
    let env = env_of(&a.grid, binary)?;
    std::fs::create_dir_all(&env.out).with_context(|| format!("creating {}", env.out.display()))?;
    let mut cells = Vec::new();
    for v in file.expand()? {
        let cell = to_cell_with(v, &a.grid, None)?;
        if a.grid.list {
            println!("{}", cell.name);
            continue;
        }
        let built = build_model(&cell, &env)?;
        cells.push((cell, built));
    }
    if a.grid.list {
        return Ok(());
    }
    // Every variant is built first, then timed in interleaved rounds (one run of each variant per
    // round), so a drift of the machine's speed during the run hits all variants alike.
    let mut variants: Vec<Variant> = Vec::new();
    for (cell, built) in &cells {
        let prompt: Vec<i64> =
            qtale_model::corpus::heldout_windows(&built.lm.tokenizer, 1, a.prompt_len)?
                .pop()
                .context("no held-out text (run `bash scripts/setup.sh`)")?;
        let (routed, theta) = match built.routed(cell, &env)? {
            Some(r) => {
                let mut d = RoutedDecoder::new(r.model);
                d.collect_stats = false;
                (Some(d), r.theta.report.chosen.map(|p| p.theta))
            }
            None => (None, None),
        };
        let v = Variant {
            name: cell.name.clone(),
            dense: &built.lm.model,
            routed,
            theta,
            prompt,
            prefill: Vec::new(),
            decode: Vec::new(),
            kv: 0,
        };
        run_once(v.decoder(), &v.prompt[..v.prompt.len().min(16)], 2)?; // warm-up
        variants.push(v);
    }
    for _ in 0..a.reps {
        for v in &mut variants {
            let (p, t, k) = run_once(v.decoder(), &v.prompt, a.decode_tokens)?;
            v.prefill.push(v.prompt.len() as f64 / p);
            v.decode.push(a.decode_tokens as f64 / t);
            v.kv = k;
        }
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut runs = serde_json::Map::new();
    // Speedups are the median over rounds of each round's ratio to the first variant: the rounds share
    // the machine's state, so a slow round slows every variant in it alike.
    let base = (variants[0].prefill.clone(), variants[0].decode.clone());
    let per_round = |x: &[f64], y: &[f64]| median(x.iter().zip(y).map(|(a, b)| a / b).collect());
    for mut v in variants {
        // The execution ratio from one more run with statistics on (not timed).
        let exec = match v.routed.as_mut() {
            Some(r) => {
                r.collect_stats = true;
                run_once(&*r, &v.prompt, a.decode_tokens)?;
                r.take_exec_stats().map(|e| e.ratio())
            }
            None => None,
        };
        let (p, t) = (median(v.prefill.clone()), median(v.decode.clone()));
        let (ps, ts) = (
            per_round(&v.prefill, &base.0),
            per_round(&v.decode, &base.1),
        );
        println!(
            "{:<22} prefill {:>8.1} tok/s ({:.2}x)  decode {:>6.2} tok/s ({:.2}x)  weights {:>7.1} MB  KV {:>6.2} MB{}",
            v.name,
            p,
            ps,
            t,
            ts,
            v.decoder().weight_bytes() as f64 / 1e6,
            v.kv as f64 / 1e6,
            exec.map_or(String::new(), |e| format!("  ratio {e:.3}"))
        );
        rows.push(Row {
            variant: v.name.clone(),
            theta: v.theta,
            exec_ratio: exec,
            prefill_tok_s: p,
            decode_tok_s: t,
            prefill_speedup: ps,
            decode_speedup: ts,
            weight_bytes: v.decoder().weight_bytes(),
            kv_bytes: v.kv,
        });
        runs.insert(
            v.name.clone(),
            serde_json::json!({"prefill_tok_s": v.prefill, "decode_tok_s": v.decode}),
        );
    }
    let mut w = csv::Writer::from_path(env.out.join("speed.csv"))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let json = serde_json::json!({"experiment": file, "provenance": env.provenance(),
        "threads": tch::get_num_threads(),
        "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens, "reps": a.reps,
        "kind": format!("{:?}", Kind::Float), "rows": rows, "runs_per_round": runs,
        "timing": "variants interleaved per round; statistics off while timed; tok/s: median over rounds; speedups: median over rounds of the ratio to the first variant in the same round"});
    std::fs::write(
        env.out.join("speed.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("wrote {}/speed.csv and speed.json", env.out.display());
    Ok(())
}
