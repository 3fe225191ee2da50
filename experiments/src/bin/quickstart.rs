//! The main job: on the embedded default (SmolLM2-135M-Instruct + the first docs of the CSQA-7 tasks),
//! CPU only, a short D-LLM and a short QTALE fine-tune of routers + LoRA, LoRA merge, 4-bit PTQ, theta
//! calibration, and evaluation of dense, dense-quant, D-LLM + quant and QTALE + quant
//! (`experiments/configs/quickstart.toml`). Prints the table, writes CSV/JSON/SVG under
//! `out/quickstart` and compares them with the committed reference `results/quickstart`; trained routers and quantized weights are cached by config under
//! `$QTALE_HOME/cache`, so a second run only re-reads them (`--fresh` recomputes).
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use experiments::grid::{self, run_grid, write_outputs, GridArgs};
use experiments::plot;

#[derive(Parser, Debug)]
#[command(
    version,
    name = "quickstart",
    about = "Fine-tune D-LLM and QTALE routers briefly, quantize to 4 bits, calibrate theta, evaluate 4 variants"
)]
struct Cli {
    #[command(flatten)]
    grid: GridArgs,
}

fn main() -> Result<()> {
    let a = Cli::parse();
    experiments::signals::install()?;
    let t0 = Instant::now();
    if !a.grid.list && !a.grid.merge {
        // A 1-second check that the model loads and computes right before the long part starts.
        let lm = experiments::load_from_args(a.grid.model.as_deref(), &a.grid.device, "f32")?;
        let enc = lm
            .tokenizer
            .encode(experiments::PARAGRAPH, false)
            .map_err(anyhow::Error::msg)?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&x| x as i64).collect();
        let nll = lm.model.sequence_nll(&ids).context("perplexity forward")?;
        println!(
            "model: {} ({} layers, {:.1}M parameters); perplexity on the fixed paragraph {:.3} (HF transformers: 13.365 for the default model)",
            lm.source,
            lm.model.config.num_hidden_layers,
            lm.model.config.num_parameters() as f64 / 1e6,
            nll.exp()
        );
    }
    let (env, file, results) = run_grid(&a.grid, "quickstart", None)?;
    if a.grid.list || (a.grid.cell.is_some() && !a.grid.merge) {
        return Ok(());
    }
    write_outputs(&env, &file, &results)?;
    let p = env.out.join("csqa7_vs_flops.svg");
    plot::with_errors(
        &p,
        "quickstart: CSQA-7 (+-1 s.e., 40 docs per task) vs FLOPs",
        "FLOPs / dense",
        "CSQA-7 (%)",
        &grid::flops_points(&results),
        20.0,
    )?;
    println!("wrote {}", p.display());
    println!(
        "quickstart finished in {:.1} min",
        t0.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}
