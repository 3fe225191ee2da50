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
            let pts: Vec<(String, Vec<(f64, f64)>)> = results
                .iter()
                .filter_map(|r| Some((r.name.clone(), vec![(r.flops_rel_dense, 100.0 * r.csqa7?)])))
                .collect();
            let p = env.out.join("csqa7_vs_flops.svg");
            plot::lines(&p, "CSQA-7 vs FLOPs", "FLOPs / dense", "CSQA-7 (%)", &pts)?;
            println!("wrote {}", p.display());
            Ok(())
        },
    )
}
