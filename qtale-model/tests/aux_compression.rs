//! MagR and magnitude / Wanda pruning through the LLaMA PTQ driver on the tiny fixture model: the
//! sparsity is exact per row (Wanda) and per group (2:4), a quantizer after pruning keeps the
//! pruned weights at 0, and MagR shrinks the row maxima before quantizing.
use std::path::Path;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use qtale_model::config::HfConfig;
use qtale_model::ptq::{quantize_model, PtqOptions, QuantizeSummary};
use qtale_model::Llama;
use qtale_quant::QuantConfig;

fn tiny() -> Llama {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gqa_tied");
    let p = dir.join("config.json");
    let cfg = HfConfig::from_file(&p).unwrap().resolve(&p).unwrap();
    qtale_model::load::load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap()
}

fn calib() -> Vec<Vec<i64>> {
    (0..6)
        .map(|s| {
            (0..24)
                .map(|i| ((i * 7 + s * 13 + 3) % 96) as i64)
                .collect()
        })
        .collect()
}

fn run(name: &str, options: Value, bits: u32) -> (Llama, QuantizeSummary) {
    let mut model = tiny();
    let q = qtale_quant::quantizer(name, &options).unwrap();
    let opts = PtqOptions {
        batch: 2,
        ..Default::default()
    };
    let s = quantize_model(
        &mut model,
        &calib(),
        q.as_ref(),
        &QuantConfig::new(bits, 16).unwrap(),
        &opts,
    )
    .unwrap();
    (model, s)
}

/// Every compressed linear's (dequantized) weight.
fn weights(s: &QuantizeSummary) -> Vec<(String, Tensor)> {
    s.packed
        .iter()
        .map(|(n, p)| (n.clone(), p.dequantize()))
        .chain(s.dense.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
        .collect()
}

/// Zeros in each row / in each group of `m` columns: `[out]` / `[out, in / m]`.
fn zeros_per(w: &Tensor, m: i64) -> Tensor {
    let (o, i) = (w.size()[0], w.size()[1]);
    w.eq(0.0)
        .view([o, i / m, m])
        .sum_dim_intlist(-1, false, Kind::Int64)
}

#[test]
fn wanda_unstructured_is_exact_per_row_and_sequential() {
    let (model, s) = run("wanda", json!({"sparsity": 0.5}), 4);
    assert_eq!(s.reports.len(), 7 * model.layers.len());
    assert_eq!(s.packed.len(), 0);
    for (n, w) in weights(&s) {
        let i = w.size()[1];
        let per_row = zeros_per(&w, i);
        assert_eq!(
            per_row.ne(i / 2).sum(Kind::Int64).int64_value(&[]),
            0,
            "{n}: {per_row:?}"
        );
    }
    assert!(
        (s.zero_fraction() - 0.5).abs() < 1e-9,
        "{}",
        s.zero_fraction()
    );
    // the installed model is the pruned one
    let q = model.layers[1].self_attn.q_proj.weight();
    assert_eq!(q.eq(0.0).sum(Kind::Int64).int64_value(&[]), 32 * 16);
}

#[test]
fn pruning_then_quantizing_keeps_the_mask() {
    for (name, then) in [("wanda", "rtn"), ("magnitude", "gptq"), ("wanda", "gptq")] {
        let (_, s) = run(name, json!({"nm": "2:4", "then": then}), 4);
        assert_eq!(s.dense.len(), 0, "{name}+{then}: everything quantized");
        assert_eq!(s.packed.len(), 14);
        for (n, w) in weights(&s) {
            // at least the 2 pruned of every 4 are exactly 0 (a kept weight may round to 0 too)
            let z = zeros_per(&w, 4);
            assert_eq!(
                z.lt(2).sum(Kind::Int64).int64_value(&[]),
                0,
                "{name}+{then} {n}"
            );
        }
        assert!(s.zero_fraction() >= 0.5, "{name}+{then}");
    }
    // magnitude over the layer, then RTN
    let (_, s) = run("magnitude", json!({"sparsity": 0.25, "then": "rtn"}), 4);
    assert!(s.zero_fraction() >= 0.25);
}

#[test]
fn magr_shrinks_row_maxima_then_quantizes() {
    for then in ["rtn", "gptq"] {
        let (_, s) = run("magr", json!({"then": then, "alpha": 0.01, "iters": 30}), 4);
        assert_eq!(s.packed.len(), 14, "magr+{then}");
        let recs: Vec<&Value> = s
            .artifacts
            .iter()
            .filter(|a| a.get("magr").is_some())
            .collect();
        assert_eq!(recs.len(), 2);
        for r in recs {
            for l in r["magr"]["linears"].as_array().unwrap() {
                let (b, a) = (
                    l["mean_row_max_before"].as_f64().unwrap(),
                    l["mean_row_max_after"].as_f64().unwrap(),
                );
                assert!(a < b, "magr+{then} {l}");
            }
        }
        assert!(s.reports.iter().all(|r| r.method == "magr"));
        if then == "gptq" {
            assert!(s.reports.iter().all(|r| r.gptq.is_some()));
        }
    }
}
