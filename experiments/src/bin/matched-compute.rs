//! The reviewers' fairness question: is QTALE better than D-LLM at the same compute? The first variant
//! of `experiments/configs/matched-compute.toml` (QTALE) runs first; its realized execution ratio
//! becomes `$reference_ratio` in the others: D-LLM trained to that ratio, and D-LLM with theta tuned to
//! it (rule (a)) but no entropy term.
use std::collections::HashMap;

use anyhow::Result;
use experiments::cell::CellResult;
use experiments::grid;
use serde_json::Value;

fn main() -> Result<()> {
    let vars = |r: &CellResult| -> HashMap<String, Value> {
        let ratio = r
            .theta
            .as_ref()
            .and_then(|t| t.chosen.as_ref())
            .map(|p| p.ratio)
            .or(r.exec_ratio)
            .unwrap_or(1.0);
        // Rounded so that the dependent cells' keys do not change with float noise.
        let ratio = (ratio * 1000.0).round() / 1000.0;
        println!("reference execution ratio (calibration): {ratio}");
        HashMap::from([("reference_ratio".to_string(), Value::from(ratio))])
    };
    grid::grid_main(
        "matched-compute",
        "D-LLM at QTALE's execution ratio: trained to it, or theta-tuned to it without the entropy term",
        Some(&vars),
        |_, _| Ok(()),
    )
}
