//! Wall-clock prefill and decode throughput of dense / quantized / routed / routed + quantized models,
//! measured side by side in one run (the variants of `experiments/configs/speed.toml`; their routers
//! and quantized weights come from the shared stage cache), with speedups as ratios to the first
//! variant and memory (weights as stored, K/V cache after prompt + generation).
//!
//! Engines: `native` (default on CPU): prefill by one batched tch forward (routed: inference mode),
//! its K/V handed to the native batch-1 decoder (`qtale_model::native`, routed through
//! `qtale_router::NativeRouted`); `tch`: the tch decode loop. With `--llama-bench`, llama.cpp's
//! `llama-bench` runs on the given GGUF files in the same rounds (one repetition per round,
//! interleaved with the variants), and every variant's decode is printed as a ratio to each of them.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use tch::{Kind, Tensor};

use experiments::cell::build_model;
use experiments::grid::{config_path, env_of, to_cell_with, ExperimentArgs, ExperimentFile};
use qtale_model::model::KvCache;
use qtale_model::native::{NativeDecoder, NativeOptions, NativeState};
use qtale_model::Decoder;
use qtale_model::Llama;
use qtale_router::TrainableRouter;
use qtale_router::{NativeRouted, RoutedDecoder};

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
    /// Decode engine: `native` (batch-1 native CPU decoder after a tch prefill) or `tch`.
    #[arg(long, value_enum, default_value_t = Engine::Native)]
    engine: Engine,
    /// A llama.cpp `llama-bench` binary to run side by side (needs `--llama-model`).
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// GGUF file(s) for `--llama-bench` (repeat the flag), e.g. the peer's Q4_0 requantization.
    #[arg(long, requires = "llama_bench")]
    llama_model: Vec<PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Engine {
    Native,
    Tch,
}

#[derive(Serialize)]
struct Row {
    variant: String,
    engine: Engine,
    theta: Option<f64>,
    exec_ratio: Option<f64>,
    prefill_tok_s: f64,
    /// Decode after the prompt (`tg<N>@d<P>` in llama-bench's terms).
    decode_tok_s: f64,
    /// Decode from an empty context (llama-bench's `tg<N>`; native engine only).
    decode_empty_tok_s: Option<f64>,
    prefill_speedup: f64,
    decode_speedup: f64,
    /// Storage of the weights as the engine runs them (native: its own formats; routers included).
    weight_bytes: usize,
    kv_bytes: usize,
}

/// One llama-bench measurement (its JSON output, the fields we use).
#[derive(serde::Deserialize, Serialize, Debug, Clone)]
struct LlamaRow {
    model_filename: String,
    model_type: String,
    model_size: u64,
    n_threads: i64,
    n_prompt: i64,
    n_gen: i64,
    #[serde(default)]
    n_depth: i64,
    avg_ts: f64,
}

impl LlamaRow {
    fn test(&self) -> String {
        let t = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        if self.n_depth > 0 {
            format!("{t} @ d{}", self.n_depth)
        } else {
            t
        }
    }
}

/// One repetition of llama-bench on `model`: pp<P>, tg<N> at depth 0 and at depth P.
fn llama_bench(
    bin: &Path,
    model: &Path,
    prompt: usize,
    n: usize,
    threads: i32,
) -> Result<Vec<LlamaRow>> {
    let out = Command::new(bin)
        .args(["-m", &model.display().to_string()])
        .args(["-p", &prompt.to_string(), "-n", &n.to_string()])
        .args(["-d", &format!("0,{prompt}")])
        .args(["-t", &threads.to_string(), "-r", "1", "-o", "json"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} -m {} failed ({}): {}",
            bin.display(),
            model.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let rows: Vec<LlamaRow> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing the JSON of {}", bin.display()))?;
    // pp at depth P is not a test we compare with
    Ok(rows
        .into_iter()
        .filter(|r| !(r.n_prompt > 0 && r.n_depth > 0))
        .collect())
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
    /// The native decoder of `dense` (native engine).
    native: Option<NativeDecoder>,
    theta: Option<f64>,
    prompt: Vec<i64>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    decode_empty: Vec<f64>,
    /// Execution ratio of the native routed decode (after the prompt).
    native_ratio: Option<f64>,
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

/// Native engine: (prefill s, decode-after-prompt s, decode-from-empty s, K/V bytes, routed decode's
/// execution ratio).
fn run_native(
    v: &Variant,
    prompt: &[i64],
    n_new: usize,
) -> Result<(f64, f64, f64, usize, Option<f64>)> {
    let dec = v.native.as_ref().context("native decoder not built")?;
    let mut st = dec.new_state(prompt.len() + n_new + 1)?;
    let mut nr = match &v.routed {
        Some(r) => Some(NativeRouted::from_routed(dec, &r.routed)?),
        None => None,
    };
    let t0 = Instant::now();
    let mut next = match (&nr, &v.routed) {
        (Some(nr), Some(r)) => nr.prefill_tch(&r.routed, prompt, &mut st)?,
        _ => dec.prefill_tch(v.dense, prompt, &mut st)?,
    };
    let prefill = t0.elapsed().as_secs_f64();
    let step = |t: i64, st: &mut NativeState, nr: &mut Option<NativeRouted>| -> Result<i64> {
        Ok(match nr {
            Some(nr) => nr.forward_token(t, st)?,
            None => dec.forward_token(t, st)?,
        } as i64)
    };
    let t1 = Instant::now();
    for _ in 0..n_new {
        next = step(next, &mut st, &mut nr)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    let kv = st.kv_bytes(dec);
    let ratio = nr.as_ref().and_then(|n| n.counts.ratio());
    st.reset();
    let t2 = Instant::now();
    let mut next = prompt[0];
    for _ in 0..n_new {
        next = step(next, &mut st, &mut nr)?;
    }
    Ok((prefill, decode, t2.elapsed().as_secs_f64(), kv, ratio))
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
        let native = match a.engine {
            Engine::Native => Some(NativeDecoder::from_llama(
                &built.lm.model,
                &NativeOptions {
                    threads: tch::get_num_threads().max(1) as usize,
                    ..Default::default()
                },
            )?),
            Engine::Tch => None,
        };
        let v = Variant {
            name: cell.name.clone(),
            dense: &built.lm.model,
            routed,
            native,
            theta,
            prompt,
            prefill: Vec::new(),
            decode: Vec::new(),
            decode_empty: Vec::new(),
            native_ratio: None,
            kv: 0,
        };
        // warm-up
        let short = &v.prompt[..v.prompt.len().min(16)];
        match a.engine {
            Engine::Native => {
                run_native(&v, short, 2)?;
            }
            Engine::Tch => {
                run_once(v.decoder(), short, 2)?;
            }
        }
        variants.push(v);
    }
    let threads = tch::get_num_threads();
    let mut llama: Vec<Vec<LlamaRow>> = vec![Vec::new(); a.llama_model.len()];
    for _ in 0..a.reps {
        for v in &mut variants {
            match a.engine {
                Engine::Native => {
                    let (p, t, e, k, ratio) = run_native(v, &v.prompt, a.decode_tokens)?;
                    v.prefill.push(v.prompt.len() as f64 / p);
                    v.decode.push(a.decode_tokens as f64 / t);
                    v.decode_empty.push(a.decode_tokens as f64 / e);
                    v.kv = k;
                    v.native_ratio = ratio;
                }
                Engine::Tch => {
                    let (p, t, k) = run_once(v.decoder(), &v.prompt, a.decode_tokens)?;
                    v.prefill.push(v.prompt.len() as f64 / p);
                    v.decode.push(a.decode_tokens as f64 / t);
                    v.kv = k;
                }
            }
        }
        if let Some(bin) = &a.llama_bench {
            for (m, runs) in a.llama_model.iter().zip(&mut llama) {
                runs.extend(llama_bench(bin, m, a.prompt_len, a.decode_tokens, threads)?);
            }
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
            Some(_) if a.engine == Engine::Native => v.native_ratio,
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
        let te = (!v.decode_empty.is_empty()).then(|| median(v.decode_empty.clone()));
        let weight_bytes = match &v.native {
            Some(n) => {
                n.weight_bytes()
                    + v.routed
                        .as_ref()
                        .map_or(0, |r| r.routed.router.weight_bytes())
            }
            None => v.decoder().weight_bytes(),
        };
        println!(
            "{:<22} prefill {:>8.1} tok/s ({:.2}x)  decode@d{} {:>6.2} tok/s ({:.2}x){}  weights {:>7.1} MB  KV {:>6.2} MB{}",
            v.name,
            p,
            ps,
            a.prompt_len,
            t,
            ts,
            te.map_or(String::new(), |e| format!("  decode@d0 {e:>6.2} tok/s")),
            weight_bytes as f64 / 1e6,
            v.kv as f64 / 1e6,
            exec.map_or(String::new(), |e| format!("  ratio {e:.3}"))
        );
        rows.push(Row {
            variant: v.name.clone(),
            engine: a.engine,
            theta: v.theta,
            exec_ratio: exec,
            prefill_tok_s: p,
            decode_tok_s: t,
            decode_empty_tok_s: te,
            prefill_speedup: ps,
            decode_speedup: ts,
            weight_bytes,
            kv_bytes: v.kv,
        });
        runs.insert(
            v.name.clone(),
            serde_json::json!({"prefill_tok_s": v.prefill, "decode_tok_s": v.decode,
                "decode_empty_tok_s": v.decode_empty}),
        );
    }
    let llama_summary = print_llama(&llama, &rows, a.prompt_len, a.decode_tokens);
    let mut w = csv::Writer::from_path(env.out.join("speed.csv"))?;
    for r in &rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let json = serde_json::json!({"experiment": file, "provenance": env.provenance(),
        "threads": tch::get_num_threads(),
        "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens, "reps": a.reps,
        "kind": format!("{:?}", Kind::Float), "rows": rows, "runs_per_round": runs,
        "engine": a.engine, "llama_bench": llama_summary, "llama_bench_runs": llama,
        "timing": "variants interleaved per round; statistics off while timed; tok/s: median over rounds; speedups: median over rounds of the ratio to the first variant in the same round"});
    std::fs::write(
        env.out.join("speed.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("wrote {}/speed.csv and speed.json", env.out.display());
    Ok(())
}

/// Median llama-bench rows per model and test, printed in llama-bench's table form, and every variant's
/// decode and prefill as ratios to each llama.cpp model's (same prompt and generation lengths).
fn print_llama(
    llama: &[Vec<LlamaRow>],
    rows: &[Row],
    prompt: usize,
    n: usize,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    if llama.is_empty() {
        return out;
    }
    println!("\nllama.cpp (llama-bench, median of the rounds, same machine, same run):");
    println!("| model | size | threads | test | t/s |");
    println!("| --- | ---: | ---: | --- | ---: |");
    for runs in llama {
        let mut tests: Vec<String> = runs.iter().map(LlamaRow::test).collect();
        tests.sort();
        tests.dedup();
        let med = |test: &str| {
            median(
                runs.iter()
                    .filter(|r| r.test() == test)
                    .map(|r| r.avg_ts)
                    .collect(),
            )
        };
        let Some(first) = runs.first() else { continue };
        let name = std::path::Path::new(&first.model_filename)
            .file_name()
            .map_or(first.model_filename.clone(), |f| {
                f.to_string_lossy().into_owned()
            });
        for t in &tests {
            println!(
                "| {name} | {:.1} MB | {} | {t} | {:.2} |",
                first.model_size as f64 / 1e6,
                first.n_threads,
                med(t)
            );
        }
        let (pp, tg, tgd) = (
            med(&format!("pp{prompt}")),
            med(&format!("tg{n}")),
            med(&format!("tg{n} @ d{prompt}")),
        );
        for r in rows {
            println!(
                "  {:<22} vs {name}: prefill {:.2}x  decode@d{prompt} {:.2}x{}",
                r.variant,
                r.prefill_tok_s / pp,
                r.decode_tok_s / tgd,
                r.decode_empty_tok_s
                    .map_or(String::new(), |e| format!("  decode@d0 {:.2}x", e / tg))
            );
        }
        out.push(
            serde_json::json!({"model": first.model_filename, "model_type": first.model_type,
            "model_bytes": first.model_size, "threads": first.n_threads,
            "pp_tok_s": pp, "tg_tok_s": tg, "tg_depth_tok_s": tgd}),
        );
    }
    out
}
