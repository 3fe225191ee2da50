//! The paper's main table: dense FP, dense-quant, D-LLM FP / quant, QTALE FP / quant, for each
//! quantizer and bit width of `experiments/configs/main-table.toml`; CSQA-7 per task and average,
//! HellaSwag, perplexity, execution ratio, FLOPs and weight memory. Also plots CSQA-7 vs FLOPs.
use anyhow::Result;
use experiments::{grid, plot};

fn main() -> Result<()> {
    grid::grid_main(
        "main-table",
        "Main table: dense / D-LLM / QTALE, full precision and quantized (RTN, GPTQ, AWQ at 4/3/2 bits)",
        None,
        |env, results| {
            let p = env.out.join("csqa7_vs_flops.svg");
            plot::with_errors(
                &p,
                "CSQA-7 (+-1 s.e.) vs FLOPs",
                "FLOPs / dense",
                "CSQA-7 (%)",
                &grid::flops_points(results),
                20.0,
            )?;
            println!("wrote {}", p.display());
            Ok(())
        },
    )
}
