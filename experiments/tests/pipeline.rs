//! A miniature of the whole pipeline, end to end: a tiny random LLaMA written as an HF directory (with
//! the SmolLM2 tokenizer), the real task data (first 3 docs), 3 training steps per recipe,
//! 4-bit RTN, both theta rules, evaluation, tables; then the same grid again, which must come from the
//! cell files, and a reference check of the dense cell against a direct harness run.
use std::path::{Path, PathBuf};

mod common;

use clap::Parser;
use experiments::grid::{run_grid, write_outputs, GridArgs};
use qtale_eval::run::evaluate_task;
use qtale_eval::{load_task, EncodeConfig, LmScorer, TaskId};
use qtale_model::{load_model, ModelSource};
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    grid: GridArgs,
}

fn data_root() -> Option<PathBuf> {
    let root = qtale_eval::tasks::default_data_root();
    if root.join("hf_datasets").is_dir() {
        return Some(root);
    }
    if std::env::var("QTALE_SKIP_ASSET_TESTS").is_ok_and(|v| v == "1") {
        eprintln!(
            "QTALE_SKIP_ASSET_TESTS=1: skipping, {} is absent",
            root.display()
        );
        return None;
    }
    panic!("{} not found: run `bash scripts/setup.sh`", root.display());
}

/// The tiny model over the SmolLM2 vocabulary and tokenizer, so the real task data tokenizes.
fn tiny_hf_dir(dir: &Path, gguf: &Path) {
    common::write_tiny_model(dir, common::TinyTokenizer::Smollm2(gguf));
}

const CONFIG: &str = r#"
description = "miniature pipeline"

[defaults.eval]
tasks = "piqa,arc_easy,winogrande"
limit = 3
batch_size = 4
ppl_windows = 1
ppl_len = 64

[defaults.calib]
sequences = 2
len = 32

[[variants]]
name = "dense"

[[variants]]
name = "dense-quant"
quant = { method = "rtn", bits = 4, group_size = 32, calib_sequences = 2, calib_len = 32 }

[[variants]]
name = "dllm-quant"
quant = { method = "rtn", bits = 4, group_size = 32, calib_sequences = 2, calib_len = 32 }
theta = { rule = "fixed", theta = 0.5 }
[variants.train]
preset = "dllm"
data = { max_sequences = 16, holdout = 0.25 }
config = { steps = 3, batch_size = 2, seq_len = 32, log_every = 1, eval_every = 3, checkpoint_every = 2, routing = { hidden = 16 } }

[[variants]]
name = "qtale-quant"
quant = { method = "rtn", bits = 4, group_size = 32, calib_sequences = 2, calib_len = 32 }
theta = { rule = "tolerance", tolerance = 100.0, grid = [0.3, 0.6, 0.9] }
[variants.train]
preset = "qtale"
data = { max_sequences = 16, holdout = 0.25 }
config = { steps = 3, batch_size = 2, seq_len = 32, log_every = 1, eval_every = 3, checkpoint_every = 2, routing = { hidden = 16 } }
"#;

#[test]
fn miniature_pipeline_end_to_end_and_resumed() {
    let Some(root) = data_root() else { return };
    let Some(gguf) = qtale_model::load::test_asset_gguf() else {
        return;
    };
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    tiny_hf_dir(&model, &gguf);
    let cfg = tmp.path().join("mini.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("out");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let argv = vec![
        "x".to_string(),
        "--config".into(),
        p(&cfg),
        "--model".into(),
        p(&model),
        "--out".into(),
        p(&out),
        "--cache".into(),
        p(&tmp.path().join("cache")),
        "--quiet".into(),
    ];
    let a: GridArgs = Cli::parse_from(&argv).grid;
    let (env, file, res) = run_grid(&a, "mini", None).unwrap();
    write_outputs(&env, &file, &res).unwrap();
    assert_eq!(res.len(), 4);
    let by = |n: &str| res.iter().find(|r| r.name == n).unwrap();
    let (dense, dq, dllm, qtale) = (
        by("dense"),
        by("dense-quant"),
        by("dllm-quant"),
        by("qtale-quant"),
    );

    // The dense cell equals a direct harness run on the same model.
    let lm = load_model(&ModelSource::HfDir(model.clone()), Device::Cpu, Kind::Float).unwrap();
    let enc = EncodeConfig::for_model(&lm.model.config, false).unwrap();
    for name in ["piqa", "arc_easy", "winogrande"] {
        let task = TaskId::parse(name).unwrap();
        let data = load_task(task, &root, None, Some(3)).unwrap();
        let mut s = LmScorer::new(&lm.model, 4);
        let r = evaluate_task(&mut s, &lm.tokenizer, &enc, &data, 0, &mut |_| {}).unwrap();
        let row = dense.task(task.name()).unwrap();
        assert_eq!(row.n, 3);
        assert!((row.acc - r.metrics.acc.mean).abs() < 1e-12, "{task:?}");
    }
    assert!(dense.exec_ratio.is_none() && (dense.flops_rel_dense - 1.0).abs() < 1e-12);
    assert!(dense.train.is_none() && dense.quant.is_none() && dense.theta.is_none());
    // Quantized: packed linears are smaller; the bits per weight are 4 + scale/zero overhead.
    let q = dq.quant.as_ref().unwrap();
    assert!(q.bits_per_weight > 4.0 && q.bits_per_weight < 6.0, "{q:?}");
    assert!(dq.weight_bytes < dense.weight_bytes);
    // Routed: trained 3 steps, theta chosen by each rule, real skipping reflected in ratio and FLOPs.
    for r in [dllm, qtale] {
        let t = r.train.as_ref().unwrap();
        assert_eq!(t.steps, 3);
        assert!(t.val_ce.is_finite() && t.dense_val_ce.is_finite());
        let e = r.exec_ratio.unwrap();
        assert!(e > 0.0 && e <= 1.0, "{}: ratio {e}", r.name);
        assert!(
            r.flops_rel_dense < 1.05,
            "{}: flops {}",
            r.name,
            r.flops_rel_dense
        );
        assert!(
            r.weight_bytes > dq.weight_bytes,
            "router weights are counted"
        );
        assert!(r.calib_nll.unwrap().is_finite());
    }
    assert_eq!(dllm.theta(), Some(0.5));
    // Rule (b) with a huge tolerance: every point qualifies, so the smallest ratio wins.
    let rep = qtale.theta.as_ref().unwrap();
    assert_eq!(rep.points.len(), 3);
    let min_ratio = rep
        .points
        .iter()
        .map(|p| p.ratio)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(rep.chosen.as_ref().unwrap().ratio, min_ratio);
    assert!(qtale.calib_nll_reference.is_some());
    // Outputs.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("variant,key,piqa,piqa_stderr"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["cells"].as_array().unwrap().len(), 4);
    assert_eq!(json["experiment"]["description"], "miniature pipeline");

    // Second run: every cell comes from its file (same wall time recorded), nothing recomputed.
    let (_, _, again) = run_grid(&a, "mini", None).unwrap();
    for (x, y) in res.iter().zip(&again) {
        assert_eq!((&x.key, x.wall_s, x.csqa7), (&y.key, y.wall_s, y.csqa7));
    }
    // One cell as its own job (a Slurm array task), after deleting its result: recomputed equal.
    std::fs::remove_file(env.cell_path(&dllm.key)).unwrap();
    let mut one = a.clone();
    one.cell = Some(2);
    let (_, _, r2) = run_grid(&one, "mini", None).unwrap();
    assert_eq!(r2.len(), 1);
    assert_eq!(r2[0].key, dllm.key);
    for (x, y) in r2[0].tasks.iter().zip(&dllm.tasks) {
        assert_eq!((x.acc, x.exec_ratio), (y.acc, y.exec_ratio));
    }

    // Resumable evaluation: a finished chunk in the cell's partial directory is reused (here a
    // planted piqa chunk that says every doc was right), the rest is computed, and the partial
    // directory is gone once the cell is written.
    std::fs::remove_file(env.cell_path(&dllm.key)).unwrap();
    let partial = experiments::cell::partial_dir(&env, &dllm.key);
    std::fs::create_dir_all(&partial).unwrap();
    let mut planted = dllm.task("piqa").unwrap().clone();
    let pd = planted.per_doc.as_mut().unwrap();
    pd.acc = "111".into();
    pd.acc_norm = Some("111".into());
    planted.acc = 1.0;
    planted.acc_norm = Some(1.0);
    planted.score = 1.0;
    std::fs::write(
        partial.join("piqa.0.json"),
        serde_json::json!({"numerics": env.numerics(), "row": planted}).to_string(),
    )
    .unwrap();
    let (_, _, r4) = run_grid(&one, "mini", None).unwrap();
    let piqa = r4[0].task("piqa").unwrap();
    assert_eq!(
        (piqa.acc, piqa.score),
        (1.0, 1.0),
        "the planted chunk was reused"
    );
    for t in ["arc_easy", "winogrande"] {
        assert_eq!(r4[0].task(t).unwrap().acc, dllm.task(t).unwrap().acc);
    }
    assert!(!partial.exists());
    // Paired comparisons against the first variant, on the same docs: the mean difference is the
    // difference of the two cells' scores.
    let paired = std::fs::read_to_string(out.join("paired.csv")).unwrap();
    let mut rd = csv::Reader::from_reader(paired.as_bytes());
    let rows: Vec<experiments::grid::PairedRow> = rd.deserialize().map(|r| r.unwrap()).collect();
    assert_eq!(
        rows.len(),
        3 * 3,
        "3 pairs x 3 tasks (no CSQA-7 in this config)"
    );
    for r in &rows {
        assert_eq!((r.a.as_str(), r.n), ("dense", 3));
        let (ta, tb) = (
            by(&r.a).task(&r.task).unwrap(),
            by(&r.b).task(&r.task).unwrap(),
        );
        assert!(
            (r.diff - 100.0 * (tb.score - ta.score)).abs() < 1e-9,
            "{r:?}"
        );
        assert!(r.ci_lo <= r.diff && r.diff <= r.ci_hi, "{r:?}");
    }

    // `train.from`: a finished run stands in for the training stage. Same key, same scores, and a
    // fresh cache gets no training directory; a run of another config is a named error.
    let run = std::fs::read_dir(tmp.path().join("cache").join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| {
            // The preset names the recipe (both runs have router kind "dllm").
            std::fs::read_to_string(d.join("done.json")).is_ok_and(|s| {
                serde_json::from_str::<serde_json::Value>(&s)
                    .is_ok_and(|v| v["config"]["preset"] == "dllm")
            })
        })
        .unwrap();
    let with_from = |steps: usize| {
        CONFIG
            .replace(
                "preset = \"dllm\"",
                &format!("preset = \"dllm\"\nfrom = {:?}", p(&run)),
            )
            .replacen("steps = 3", &format!("steps = {steps}"), 1)
    };
    std::fs::write(&cfg, with_from(3)).unwrap();
    let mut from = one.clone();
    from.out = Some(tmp.path().join("out-from"));
    from.cache = Some(tmp.path().join("cache-from"));
    let (_, _, r3) = run_grid(&from, "mini", None).unwrap();
    assert_eq!(r3[0].key, dllm.key);
    for (x, y) in r3[0].tasks.iter().zip(&dllm.tasks) {
        assert_eq!((x.acc, x.exec_ratio), (y.acc, y.exec_ratio));
    }
    assert!(!tmp.path().join("cache-from").join("train").exists());
    std::fs::write(&cfg, with_from(4)).unwrap();
    let err = format!("{:#}", run_grid(&from, "mini", None).unwrap_err());
    assert!(err.contains("config.steps: 4 (spec) vs 3 (run)"), "{err}");
    // A run of another base model (its recorded file hash differs) is refused too.
    let done = run.join("done.json");
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&done).unwrap()).unwrap();
    assert!(
        d["model"]["sha256"].is_string(),
        "the stage records its model"
    );
    d["model"]["sha256"] = "0".repeat(64).into();
    std::fs::write(&done, d.to_string()).unwrap();
    std::fs::write(&cfg, with_from(3)).unwrap();
    std::fs::remove_dir_all(tmp.path().join("out-from")).unwrap();
    let err = format!("{:#}", run_grid(&from, "mini", None).unwrap_err());
    assert!(err.contains("the run was trained on"), "{err}");
}

/// A complete quantized HF directory (GPTQ and AWQ layouts, as hub checkpoints come) loads through the
/// plain `load_model` with packed linears, and computes what the in-memory quantized model computes.
#[test]
fn quantized_hf_directories_load_through_load_model() {
    use qtale_model::ptq::{quantize_model, PtqOptions};
    use qtale_model::quantized_io::save_quantized_hf_dir;
    use qtale_quant::packed::PackedLayout;
    let Some(gguf) = qtale_model::load::test_asset_gguf() else {
        return;
    };
    tch::set_num_threads(1);
    let _g = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("tiny");
    std::fs::create_dir_all(&base).unwrap();
    tiny_hf_dir(&base, &gguf);
    let calib: Vec<Vec<i64>> = (0..4)
        .map(|i| (0..32).map(|t| (i * 977 + t * 131) % 49152).collect())
        .collect();
    for (method, layout) in [("gptq", PackedLayout::Gptq), ("rtn", PackedLayout::Awq)] {
        let mut lm =
            load_model(&ModelSource::HfDir(base.clone()), Device::Cpu, Kind::Float).unwrap();
        let q = qtale_quant::quantizer(method, &serde_json::Value::Null).unwrap();
        let cfg = qtale_quant::QuantConfig::new(4, 32).unwrap();
        let o = PtqOptions {
            batch: 2,
            ..Default::default()
        };
        let s = quantize_model(&mut lm.model, &calib, &*q, &cfg, &o).unwrap();
        let dir = tmp.path().join(format!("{method}-{layout:?}"));
        save_quantized_hf_dir(&lm.model, &s, &dir, layout).unwrap();
        std::fs::copy(base.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let back = load_model(&ModelSource::HfDir(dir.clone()), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(back.model.weight_bytes(), lm.model.weight_bytes());
        assert!(back.model.weight_bytes() < 49152 * 64 * 4 + 4 * 7 * 64 * 128 * 4 / 4);
        let ids = Tensor::from_slice(&calib[2][..12]).view([1, -1]);
        let a = lm.model.forward(&ids, None).unwrap().logits;
        let b = back.model.forward(&ids, None).unwrap().logits;
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d <= 1e-5, "{method:?} {layout:?}: {d}");
    }
    // A broken quantization_config is a named error, through load_model too.
    let dir = tmp.path().join(format!("gptq-{:?}", PackedLayout::Gptq));
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"bits\": 4", "\"bits\": 5"),
    )
    .unwrap();
    let Err(e) = load_model(&ModelSource::HfDir(dir.clone()), Device::Cpu, Kind::Float) else {
        panic!("bits 5 accepted");
    };
    let msg = format!("{e}");
    assert!(
        msg.contains("quantized checkpoint") && msg.contains('5'),
        "{msg}"
    );
}
