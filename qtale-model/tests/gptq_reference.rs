//! GPTQ on real SmolLM2 linears against the reference algorithm (IST-DASLab/gptq `GPTQ.fasterquant`)
//! run on the same Hessians: `fixtures/gptq_reference/reference.json` holds the reference's codes for
//! the first rows of three linears under four settings (its README says how it was made).
//!
//! The Hessian is recomputed here exactly as the fixture's was (same calibration windows, same
//! accumulation, one thread); its checksums in the fixture guard that. GPTQ's rows are independent
//! given the Hessian, so solving the first 16 rows gives the first 16 rows of the full solve.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qtale_model::corpus::calibration_windows;
use qtale_model::model::{DecoderLayer, LayerCache, Linear};
use qtale_model::{load_model, Llama, ModelSource};
use qtale_quant::gptq::Gptq;
use qtale_quant::QuantConfig;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Calibration for the Hessians: 16 windows of 128 tokens (CoQA + SQuAD).
const WINDOWS: usize = 16;
const WINDOW_LEN: usize = 128;
/// Rows of each weight solved and compared.
const ROWS: i64 = 16;
/// The linears: (block, name).
const LINEARS: [(usize, &str); 3] = [(0, "q_proj"), (0, "down_proj"), (3, "o_proj")];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Setting {
    bits: u32,
    group: usize,
    act_order: bool,
    static_groups: bool,
}

fn settings() -> Vec<Setting> {
    let s = |bits, group, act_order, static_groups| Setting {
        bits,
        group,
        act_order,
        static_groups,
    };
    vec![
        s(4, 64, false, false),
        s(3, 64, true, true),
        s(4, 128, false, false),
        s(3, 64, true, false),
    ]
}

#[derive(Debug, Deserialize)]
struct Fixture {
    linears: Vec<FixtureLinear>,
    cases: Vec<FixtureCase>,
}

#[derive(Debug, Deserialize)]
struct FixtureLinear {
    name: String,
    /// Trace, sum and sum of squares of the Hessian the reference was given.
    h_trace: f64,
    h_sum: f64,
    h_sumsq: f64,
}

#[derive(Debug, Deserialize)]
struct FixtureCase {
    linear: String,
    setting: Setting,
    /// One hex digit per code, one string per row.
    codes: Vec<String>,
    /// Per row: `sum_j (w - q)^2` of the reference's quantized weight.
    weight_err: Vec<f64>,
}

/// A linear that records its inputs.
#[derive(Debug)]
struct Rec {
    weight: Tensor,
    seen: Arc<Mutex<Vec<Tensor>>>,
}

impl Linear for Rec {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.seen.lock().unwrap().push(x.copy());
        x.linear::<Tensor>(&self.weight, None)
    }
    fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
    fn weight(&self) -> Tensor {
        self.weight.shallow_clone()
    }
    fn weight_bytes(&self) -> usize {
        0
    }
}

/// The inputs `[tokens, in]` of linear `name` of block `layer` on the windows (full-precision model).
fn inputs_of(model: &mut Llama, windows: &[Vec<i64>], layer: usize, name: &str) -> Tensor {
    let _g = tch::no_grad_guard();
    let (n, len) = (windows.len() as i64, windows[0].len() as i64);
    let ids = Tensor::from_slice(&windows.concat()).view([n, len]);
    let pos = Tensor::arange(len, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .expand([n, len], false)
        .contiguous();
    let valid = Tensor::ones([n, len], (Kind::Bool, Device::Cpu));
    let cs = model.rope.cos_sin(&pos, model.kind);
    let mut x = model.embed(&ids);
    for l in &model.layers[..layer] {
        x = l.forward(&x, &pos, &valid, &cs, &mut LayerCache::default());
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let slot = model.layers[layer].linear_mut(name).unwrap();
    let rec = Rec {
        weight: slot.weight(),
        seen: seen.clone(),
    };
    let orig = std::mem::replace(slot, Box::new(rec));
    let _ = model.layers[layer].forward(&x, &pos, &valid, &cs, &mut LayerCache::default());
    *model.layers[layer].linear_mut(name).unwrap() = orig;
    let xs = seen.lock().unwrap();
    assert_eq!(xs.len(), 1);
    let d = *xs[0].size().last().unwrap();
    xs[0].reshape([-1, d])
}

fn config(s: &Setting) -> QuantConfig {
    QuantConfig {
        act_order: s.act_order,
        static_groups: s.static_groups,
        ..QuantConfig::new(s.bits, s.group).unwrap()
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gptq_reference")
}

fn stats(h: &Tensor) -> (f64, f64, f64) {
    let h = h.to_kind(Kind::Double);
    (
        h.trace().double_value(&[]),
        h.sum(Kind::Double).double_value(&[]),
        h.square().sum(Kind::Double).double_value(&[]),
    )
}

/// Our GPTQ's codes on the first [`ROWS`] rows of three SmolLM2 linears equal the reference's, run
/// on the same Hessian, up to float-rounding effects; the total weight error agrees closely.
///
/// On the machine that made the fixture all twelve cases match bit for bit. The tolerance is for
/// other CPUs and BLAS builds: the two solvers run the same f32 operations (damped Cholesky, its
/// inverse, the upper factor, the column loop, the lazy block update as one matmul), but a different
/// kernel may round differently, and GPTQ on an ill-conditioned Hessian is chaotic at the ulp level:
/// a one-ulp change of one entry of the damped Hessian of block 0's `down_proj` changed 2.0% (group
/// 64) and 2.7% (group 128) of its codes (by up to 3) and its total weight error by 0.07% and 0.4%.
/// So each case may differ in at most 5% of its codes, and in total weight error by at most 1%. A
/// real difference of algorithm is far outside that: taking a group's parameters from the columns
/// as updated within the block instead of the reference's block-start weights changes 24-38% of the
/// codes of every dynamic-group case (measured when this test was written).
///
/// With `QTALE_GPTQ_REFERENCE_DUMP=<dir>` the test writes the Hessians and weight rows there
/// (`inputs.safetensors`, `cases.json`) for the fixture's generator instead of comparing.
#[test]
fn gptq_matches_the_reference_on_real_smollm2_layers() {
    let Some(gguf) = qtale_model::load::test_asset_gguf() else {
        return;
    };
    tch::set_num_threads(1);
    let lm = load_model(&ModelSource::Gguf(gguf), Device::Cpu, Kind::Float).unwrap();
    let mut model = lm.model;
    let windows = calibration_windows(&lm.tokenizer, WINDOWS, WINDOW_LEN).unwrap();
    assert_eq!(windows.len(), WINDOWS);
    let dump = std::env::var_os("QTALE_GPTQ_REFERENCE_DUMP").map(PathBuf::from);
    let fixture: Option<Fixture> = match &dump {
        Some(_) => None,
        None => {
            let p = fixture_dir().join("reference.json");
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            Some(serde_json::from_str(&text).unwrap())
        }
    };
    let mut dumped: Vec<(String, Tensor)> = Vec::new();
    let mut report = Vec::new();
    for (layer, name) in LINEARS {
        let full = format!(
            "model.layers.{layer}.{}.{name}",
            DecoderLayer::module_of(name)
        );
        let x = inputs_of(&mut model, &windows, layer, name);
        let w = model.layers[layer]
            .linear_mut(name)
            .unwrap()
            .weight()
            .narrow(0, 0, ROWS)
            .contiguous();
        let d = x.size()[1] as usize;
        let mut hess = None;
        for s in settings() {
            let mut g = Gptq::new(d, config(&s), Device::Cpu).unwrap();
            g.add_batch(&x).unwrap();
            if hess.is_none() {
                hess = Some(g.hessian().copy());
            }
            let Some(fx) = &fixture else { continue };
            let fl = fx.linears.iter().find(|l| l.name == full).unwrap();
            let (tr, sum, sumsq) = stats(g.hessian());
            for (what, got, want) in [
                ("trace", tr, fl.h_trace),
                ("sum", sum, fl.h_sum),
                ("sum of squares", sumsq, fl.h_sumsq),
            ] {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs(),
                    "{full}: Hessian {what} {got} vs the fixture's {want}: the calibration inputs \
                     changed; regenerate the fixture (README)"
                );
            }
            let case = fx
                .cases
                .iter()
                .find(|c| {
                    c.linear == full
                        && c.setting.bits == s.bits
                        && c.setting.group == s.group
                        && c.setting.act_order == s.act_order
                        && c.setting.static_groups == s.static_groups
                })
                .unwrap_or_else(|| panic!("{full} {s:?}: not in the fixture"));
            let (q, _) = g.solve(&w).unwrap();
            let codes: Vec<u8> = Vec::try_from(q.codes.view([-1])).unwrap();
            let dq = q.dequantize();
            let err: Vec<f64> =
                Vec::<f64>::try_from((&w - &dq).square().sum_dim_intlist(1, false, Kind::Double))
                    .unwrap();
            let (mut differ, mut worst) = (0usize, 0u8);
            for (r, row) in case.codes.iter().enumerate() {
                assert_eq!(row.len(), d, "{full}: fixture row {r}");
                for (c, ch) in row.chars().enumerate() {
                    let want = ch.to_digit(16).unwrap() as u8;
                    let got = codes[r * d + c];
                    if got != want {
                        differ += 1;
                        worst = worst.max(got.abs_diff(want));
                    }
                }
            }
            let total = ROWS as usize * d;
            let frac = differ as f64 / total as f64;
            let total_err = err.iter().sum::<f64>() / case.weight_err.iter().sum::<f64>() - 1.0;
            let line = format!(
                "{full} {s:?}: {differ}/{total} codes differ (by up to {worst}), total weight \
                 error {:+.3}% off",
                100.0 * total_err
            );
            eprintln!("{line}");
            report.push((line, frac <= 0.05 && total_err.abs() <= 0.01));
        }
        if dump.is_some() {
            dumped.push((format!("{full}.H"), hess.unwrap()));
            dumped.push((format!("{full}.W"), w));
        }
    }
    if let Some(dir) = dump {
        std::fs::create_dir_all(&dir).unwrap();
        Tensor::write_safetensors(&dumped, dir.join("inputs.safetensors")).unwrap();
        let meta = serde_json::json!({
            "linears": LINEARS
                .iter()
                .map(|(l, n)| format!("model.layers.{l}.{}.{n}", DecoderLayer::module_of(n)))
                .collect::<Vec<_>>(),
            "settings": settings(),
            "rows": ROWS,
            "calibration": {"windows": WINDOWS, "len": WINDOW_LEN},
        });
        std::fs::write(dir.join("cases.json"), meta.to_string()).unwrap();
        eprintln!("wrote the Hessians and weights to {}", dir.display());
        return;
    }
    let bad: Vec<&String> = report
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(l, _)| l)
        .collect();
    assert!(bad.is_empty(), "outside the tolerance: {bad:#?}");
}
