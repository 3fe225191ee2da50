//! Ablation (2 x 2, quantized): entropy term on/off x theta adjustment on/off, from
//! `experiments/configs/ablation.toml`.
use anyhow::Result;
use experiments::grid;

fn main() -> Result<()> {
    grid::grid_main(
        "ablation",
        "Ablation: entropy regularizer on/off x post-training theta adjustment on/off, quantized",
        None,
        |_, _| Ok(()),
    )
}
