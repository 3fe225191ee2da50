//! Each component a user swaps for an ablation is added from outside the crates, by registering it
//! under a name; the configs then select it by that name. These tests are the README's "Extending"
//! examples, run on the tiny fixture model (no assets needed), and check that the registered
//! component is really the one that runs.
use std::collections::BTreeMap;
use std::path::Path;

mod common;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use qtale_eval::data::Row;
use qtale_eval::run::{evaluate_tasks, Silent};
use qtale_eval::tasks::{self, check_gold};
use qtale_eval::{load_task, EncodeConfig, LmScorer, McDoc, TaskId, TaskSpec};
use qtale_model::config::HfConfig;
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_model::Llama;
use qtale_quant::method::{self, each_linear, BlockAccess, Calibration, Compressed, Quantizer};
use qtale_quant::QuantConfig;
use qtale_router::kinds::{self, RouterBuild, TrainableRouter};
use qtale_router::{
    logits_from_mask, ForwardOptions, Mode, RoutedLlama, Router, RouterError, RoutingConfig,
};
use qtale_train::data::Batch;
use qtale_train::loss::{self, LossInput, LossTerm, Objective};

fn tiny() -> Llama {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../qtale-model/tests/fixtures/tiny/gqa_tied");
    let p = dir.join("config.json");
    let cfg = HfConfig::from_file(&p).unwrap().resolve(&p).unwrap();
    qtale_model::load::load_hf_weights(&dir, cfg, Device::Cpu, Kind::Float).unwrap()
}

// --- A quantizer: one type implementing `Quantizer`, registered by name. ---

/// Binary weights with one scale per output row: `w = mean|w_row| * sign(w)` (a toy 1-bit method).
struct SignQuantizer;

impl Quantizer for SignQuantizer {
    fn name(&self) -> &str {
        "sign1"
    }
    fn calibration(&self) -> Calibration {
        Calibration::None
    }
    fn quantize_block(
        &self,
        block: &mut dyn BlockAccess,
        _cfg: &QuantConfig,
    ) -> qtale_quant::Result<()> {
        each_linear(block, |_, w, _| {
            let scale = w.abs().mean_dim(1, true, Kind::Float);
            Ok(Compressed::Dense(w.sign() * scale))
        })
    }
}

fn sign_factory(options: &Value) -> qtale_quant::Result<Box<dyn Quantizer>> {
    method::no_options("sign1", options)?;
    Ok(Box::new(SignQuantizer))
}

#[test]
fn a_registered_quantizer_runs_through_the_ptq_driver() {
    let _ = method::register("sign1", sign_factory);
    assert!(method::names().contains(&"sign1".to_string()));
    let mut model = tiny();
    let before: Vec<Tensor> = model
        .layers
        .iter()
        .map(|l| l.self_attn.q_proj.weight())
        .collect();
    let q = method::quantizer("sign1", &Value::Null).unwrap();
    let s = quantize_model(
        &mut model,
        &[],
        q.as_ref(),
        &QuantConfig::new(4, 32).unwrap(),
        &PtqOptions::default(),
    )
    .unwrap();
    assert_eq!(s.method, "sign1");
    for (l, w0) in model.layers.iter().zip(&before) {
        let want = w0.sign() * w0.abs().mean_dim(1, true, Kind::Float);
        let got = l.self_attn.q_proj.weight();
        assert_eq!(f64::try_from((got - want).abs().max()).unwrap(), 0.0);
    }
    // Its options are checked like the built-in methods'.
    let e = method::quantizer("sign1", &json!({"levels": 3}))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("levels"), "{e}");
}

// --- A router kind: a `Router` + `TrainableRouter`, and a factory that builds it from its options. ---

/// Runs the routed layers of one parity only (`options = { parity = 0 | 1 }`): a static baseline.
struct ParityRouter {
    parity: usize,
}

impl Router for ParityRouter {
    fn logits(&self, layer: usize, x: &Tensor, _positions: &Tensor) -> Tensor {
        let s = x.size();
        let run = layer % 2 == self.parity;
        logits_from_mask(&Tensor::full(
            [s[0], s[1]],
            run as i64,
            (Kind::Bool, x.device()),
        ))
    }
    fn name(&self) -> String {
        format!("parity{}", self.parity)
    }
}

impl TrainableRouter for ParityRouter {
    fn save(&self, dir: &Path) -> qtale_router::Result<()> {
        std::fs::write(
            dir.join("router.json"),
            json!({"kind": "parity", "parity": self.parity}).to_string(),
        )
        .map_err(|e| RouterError::config("router", e.to_string()))
    }
}

fn parity_factory(b: &RouterBuild) -> qtale_router::Result<Box<dyn TrainableRouter>> {
    let parity = b.options.get("parity").and_then(Value::as_u64).unwrap_or(0) as usize;
    if parity > 1 {
        return Err(RouterError::config(
            "router.options.parity",
            format!("{parity} must be 0 or 1"),
        ));
    }
    Ok(Box::new(ParityRouter { parity }))
}

#[test]
fn a_registered_router_kind_is_built_by_name_and_routes() {
    let _ = kinds::register("parity", parity_factory);
    let model = tiny();
    let routing = RoutingConfig {
        start_layer: 0,
        reserved_tokens: 0,
        hidden: 8,
        ..RoutingConfig::default()
    };
    let build = |options: Value| {
        kinds::build(
            "parity",
            &RouterBuild {
                model: &model,
                routing: &routing,
                options: &options,
                seed: 0,
                calib: &[],
                saved: None,
            },
        )
    };
    assert!(build(json!({"parity": 2}))
        .err()
        .unwrap()
        .to_string()
        .contains("parity"));
    let r = build(json!({"parity": 1})).unwrap();
    let n = model.layers.len();
    let routed = RoutedLlama::new(&model, r, routing.clone()).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 17, 33, 2, 7]).view([1, 6]);
    let out = routed
        .forward(
            &ids,
            None,
            Mode::Infer,
            &ForwardOptions {
                stats: true,
                ..Default::default()
            },
        )
        .unwrap();
    // Odd layers only: the execution ratio is their share of the layers.
    let want = (0..n).filter(|l| l % 2 == 1).count() as f64 / n as f64;
    assert!((out.stats.unwrap().ratio - want).abs() < 1e-12);
}

// --- A loss term: a `LossTerm` and a factory reading its table of the `loss` config. ---

/// Mean squared router logit, weighted by `weight` (a toy regularizer).
struct LogitL2 {
    weight: f64,
}

impl LossTerm for LogitL2 {
    fn name(&self) -> &str {
        "logit_l2"
    }
    fn weight(&self, _step: usize, _total: usize) -> f64 {
        self.weight
    }
    fn value(&self, x: &LossInput) -> Tensor {
        let all: Vec<Tensor> = x
            .out
            .router_logits
            .iter()
            .flatten()
            .map(|t| t.square().mean(Kind::Float))
            .collect();
        Tensor::stack(&all, 0).mean(Kind::Float)
    }
}

fn l2_factory(v: &Value) -> qtale_train::Result<Box<dyn LossTerm>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct O {
        weight: f64,
    }
    let o: O = loss::parse("logit_l2", v)?;
    loss::check_weight("logit_l2", o.weight)?;
    Ok(Box::new(LogitL2 { weight: o.weight }))
}

#[test]
fn a_registered_loss_term_joins_the_objective() {
    let _ = loss::register("logit_l2", l2_factory);
    let table: BTreeMap<String, Value> = [
        ("ce".to_string(), json!({})),
        ("logit_l2".to_string(), json!({"weight": 0.5})),
    ]
    .into();
    let obj = Objective::new(&table).unwrap();
    let bad: BTreeMap<String, Value> = [("logit_l2".to_string(), json!({"weight": -1.0}))].into();
    assert!(Objective::new(&bad)
        .err()
        .unwrap()
        .to_string()
        .contains("loss.logit_l2.weight"));

    let model = tiny();
    let routing = RoutingConfig {
        start_layer: 0,
        reserved_tokens: 0,
        hidden: 8,
        ..RoutingConfig::default()
    };
    let r = kinds::build(
        "dllm",
        &RouterBuild {
            model: &model,
            routing: &routing,
            options: &Value::Null,
            seed: 3,
            calib: &[],
            saved: None,
        },
    )
    .unwrap();
    let routed = RoutedLlama::new(&model, r, routing).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 17, 33, 2, 7]).view([1, 6]);
    let out = routed
        .forward(&ids, None, Mode::Train, &ForwardOptions::default())
        .unwrap();
    let batch = Batch {
        ids: ids.shallow_clone(),
        attention_mask: ids.ones_like(),
        loss_mask: ids.ones_like(),
    };
    let v = obj.evaluate(
        &LossInput {
            out: &out,
            batch: &batch,
            dense_logits: None,
        },
        0,
        10,
    );
    let part = |n: &str| f64::try_from(&v.parts.iter().find(|(k, _)| k == n).unwrap().1).unwrap();
    let l2 = out
        .router_logits
        .iter()
        .flatten()
        .map(|t| f64::try_from(t.square().mean(Kind::Float)).unwrap());
    let want = l2.clone().sum::<f64>() / l2.count() as f64;
    assert!((part("logit_l2") - want).abs() < 1e-5 * want.max(1.0));
    let total = f64::try_from(&v.total).unwrap();
    assert!((total - (part("ce") + 0.5 * part("logit_l2"))).abs() < 1e-4 * total.abs().max(1.0));
}

// --- A benchmark task: a `TaskSpec` (name, metric, size, data location, row rule), registered. ---

/// Which word continues a counting run: `{"run": "w5 w6 w7", "options": ["w8", "w3"], "answer": 0}`;
/// the run is the context, each option a continuation.
fn next_word_doc(doc_id: usize, row: &Row) -> qtale_eval::Result<McDoc> {
    let options = row.str_list("options")?;
    let gold = check_gold(row, "answer", row.int("answer")?, options.len())?;
    Ok(McDoc::shared(
        doc_id,
        row.str("run")?.to_string(),
        options,
        gold,
    ))
}

static NEXT_WORD: TaskSpec = TaskSpec {
    name: "next_word",
    aliases: &["nw"],
    label: "NextW",
    acc_norm: true,
    full_count: 6,
    split: "test",
    file: "next_word/test.jsonl",
    note: None,
    build_doc: next_word_doc,
};

#[test]
fn a_registered_task_is_scored_through_the_shared_evaluate_entry() {
    let _ = tasks::register(&NEXT_WORD);
    assert!(tasks::names().contains(&"next_word"));
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    std::fs::create_dir_all(root.join("next_word")).unwrap();
    let mut rows = String::new();
    for i in 0..6 {
        let a = 2 + 5 * i;
        let run: Vec<String> = (a..a + 3).map(common::word).collect();
        let (right, wrong) = (common::word(a + 3), common::word(2 + (a + 20) % 60));
        let (options, answer) = if i % 2 == 0 {
            ([right, wrong], 0)
        } else {
            ([wrong, right], 1)
        };
        rows += &json!({"run": run.join(" "), "options": options, "answer": answer}).to_string();
        rows.push('\n');
    }
    std::fs::write(root.join(NEXT_WORD.file), rows).unwrap();
    let dir = tmp.path().join("tiny");
    common::tiny_model_dir(&dir);
    let lm = qtale_model::load_model(
        &qtale_model::ModelSource::HfDir(dir),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();

    // Selected by name or alias, as `--tasks` and `eval.tasks` do; loaded from its default file.
    let list = TaskId::parse_list("next_word,nw").unwrap();
    assert_eq!(list.len(), 1);
    let data = load_task(list[0], &root, None, None).unwrap();
    assert_eq!((data.docs.len(), data.source.split.as_str()), (6, "test"));
    let enc = EncodeConfig::for_model(&lm.model.config, false).unwrap();
    let mut scorer = LmScorer::new(&lm.model, 4);
    let (res, csqa7) =
        evaluate_tasks(&mut scorer, &lm.tokenizer, &enc, &[data], 0, &mut Silent).unwrap();
    assert!(csqa7.is_none(), "CSQA-7 needs its seven tasks");
    let r = &res[0];
    assert_eq!(serde_json::to_value(r.task).unwrap(), json!("next_word"));
    assert_eq!(r.metrics.n, 6);
    assert!(r.metrics.acc_norm.is_some(), "the spec reports acc_norm");
    // The registered rule built the requests: doc 0's choices are the run continued by each option,
    // and the harness's log-likelihoods are the model's own for those tokens.
    let d0 = &r.docs[0];
    assert_eq!((d0.gold, d0.lls.len()), (0, 2));
    let ids = Tensor::from_slice(&[2i64, 3, 4]).view([1, 3]);
    let logits = lm.model.forward(&ids, None).unwrap().logits;
    let lp = logits.get(0).get(2).log_softmax(-1, Kind::Float);
    for (choice, token) in [(0, 5i64), (1, 24)] {
        let want = lp.double_value(&[token]);
        assert!(
            (d0.lls[choice] - want).abs() < 1e-4,
            "{choice}: {} vs {want}",
            d0.lls[choice]
        );
    }
}
