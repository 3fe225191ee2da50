//! Accuracy vs execution-ratio curves over the sweep of `experiments/configs/sweep-lambda2.toml`, for D-LLM and
//! QTALE, quantized and not: the table, and `csqa7_vs_ratio.svg`.
use anyhow::Result;

fn main() -> Result<()> {
    experiments::grid::sweep_main(
        "sweep-lambda2",
        "Sweep of lambda_2: CSQA-7 accuracy vs execution ratio (plot: csqa7_vs_ratio.svg)",
    )
}
