//! Accuracy vs execution-ratio curves over the sweep of `experiments/configs/sweep-theta.toml`, for D-LLM and
//! QTALE, quantized and not: the table, and `csqa7_vs_ratio.svg`.
use anyhow::Result;
use experiments::{grid, plot};

fn main() -> Result<()> {
    grid::grid_main(
        "sweep-theta",
        "Sweep: CSQA-7 accuracy vs execution ratio (plot: csqa7_vs_ratio.svg)",
        None,
        |env, results| {
            let p = env.out.join("csqa7_vs_ratio.svg");
            plot::lines(
                &p,
                "sweep-theta: CSQA-7 vs execution ratio",
                "execution ratio",
                "CSQA-7 (%)",
                &grid::curves(results),
            )?;
            println!("wrote {}", p.display());
            Ok(())
        },
    )
}
