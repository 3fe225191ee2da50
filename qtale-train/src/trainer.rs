//! The fine-tuning loop of D-LLM and QTALE (method.md sections 1-2): the objective is the config's list
//! of loss terms ([`crate::loss`]: `CE + lambda_1(t) L_ratio + lambda_2 L_entropy` for the presets),
//! the router any registered kind ([`qtale_router::kinds`]; D-LLM's by default). Trainable: LoRA +
//! the router's parameters (if it has any), in two AdamW groups with their own learning rates (weight
//! decay on matrices only), linear warmup then cosine decay, gradient accumulation and clipping.
//! Non-finite losses skip the step; too many in a row stop the run with the last good checkpoint kept.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use qtale_model::Llama;
use qtale_router::kinds::{self, RouterBuild, RouterSpec, TrainableRouter};
use qtale_router::routed::DEFAULT_THETA;
use qtale_router::{CalibBatch, ForwardOptions, Mode, RoutedLlama, RoutedOutput, RoutingConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::checkpoint;
use crate::data::{collate, masked_ce, Example};
use crate::lora::{Lora, LoraConfig};
use crate::loss::entropy::router_entropies;
use crate::loss::{LossInput, Objective};
use crate::optim::{split_decay, AdamW, ParamGroup, WarmupCosine};
use crate::{config_err, Result, TrainError};

/// Everything that defines a run; written into every checkpoint and log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub preset: String,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr_lora: f64,
    pub lr_router: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Cosine decays to `min_lr_factor` x the base learning rate.
    pub min_lr_factor: f64,
    pub grad_clip: f64,
    /// The objective: loss terms by name with their options (`crate::loss`), e.g.
    /// `{ce: {}, ratio: {weight: 5, target: 0.5}, entropy: {weight: 0.25}}`.
    pub loss: BTreeMap<String, Value>,
    /// The router kind and its options (`qtale_router::kinds`; default D-LLM's).
    pub router: RouterSpec,
    /// Gumbel temperature at the start and end of training (linear in between).
    pub temperature_start: f64,
    pub temperature_end: f64,
    pub seed: u64,
    pub log_every: usize,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    /// Consecutive non-finite losses that stop the run.
    pub max_nonfinite: usize,
    pub lora: LoraConfig,
    pub routing: RoutingConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig::preset("qtale").expect("known preset")
    }
}

impl TrainConfig {
    /// `dllm`: D-LLM's recipe (CE + ratio loss, lambda_1 = 5 ramped, target 0.5; no entropy term).
    /// `qtale`: the same plus the entropy regularizer. The paper does not publish lambda_2; 0.25 is the
    /// largest value of our sweep (`lambda2_sweep` below: 0, 0.05, 0.1, 0.25, 0.5, 1) that kept the
    /// validation CE within 5% of lambda_2 = 0 and the ratio within 0.05 of its target, while raising the
    /// Gumbel flip rate from 0.076 to 0.128 and cutting the logit gap from 4.5 to 2.9 (tiny 8-layer
    /// model; re-sweep on the target model with `sweep-lambda2`).
    pub fn preset(name: &str) -> Result<Self> {
        let mut loss = BTreeMap::new();
        loss.insert("ce".to_string(), serde_json::json!({}));
        loss.insert(
            "ratio".to_string(),
            serde_json::json!({"weight": 5.0, "target": 0.5}),
        );
        let base = TrainConfig {
            preset: name.to_string(),
            steps: 200,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 128,
            lr_lora: 2e-4,
            lr_router: 1e-3,
            weight_decay: 0.02,
            warmup_steps: 10,
            min_lr_factor: 0.1,
            grad_clip: 1.0,
            loss,
            router: RouterSpec::default(),
            temperature_start: 1.0,
            temperature_end: 1.0,
            seed: 0,
            log_every: 10,
            eval_every: 50,
            checkpoint_every: 50,
            max_nonfinite: 5,
            lora: LoraConfig::default(),
            routing: RoutingConfig::default(),
        };
        match name {
            "dllm" => Ok(base),
            "qtale" => {
                let mut c = base;
                c.loss
                    .insert("entropy".to_string(), serde_json::json!({"weight": 0.25}));
                Ok(c)
            }
            other => Err(config_err(
                "preset",
                format!("unknown `{other}` (dllm or qtale)"),
            )),
        }
    }

    /// The objective's terms, built (and so checked) from `loss`.
    pub fn objective(&self) -> Result<Objective> {
        Objective::new(&self.loss)
    }

    /// The ratio term's target execution ratio, when the objective has one.
    pub fn ratio_target(&self) -> Option<f64> {
        self.loss.get("ratio").map(|r| {
            r.get("target")
                .and_then(Value::as_f64)
                .unwrap_or(crate::loss::ratio::DEFAULT_TARGET)
        })
    }

    /// The final weight of term `name` (0 when absent): e.g. lambda_2 = `loss_weight("entropy")`.
    pub fn loss_weight(&self, name: &str) -> f64 {
        self.objective()
            .map(|o| o.weight(name, self.steps, self.steps))
            .unwrap_or(0.0)
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |f: &str, v: usize| {
            if v == 0 {
                Err(config_err(f, "must be >= 1"))
            } else {
                Ok(())
            }
        };
        pos("steps", self.steps)?;
        pos("batch_size", self.batch_size)?;
        pos("grad_accum", self.grad_accum)?;
        pos("log_every", self.log_every)?;
        pos("eval_every", self.eval_every)?;
        pos("checkpoint_every", self.checkpoint_every)?;
        if self.seq_len < 2 {
            return Err(config_err("seq_len", "must be >= 2"));
        }
        for (f, v) in [
            ("lr_lora", self.lr_lora),
            ("lr_router", self.lr_router),
            ("grad_clip", self.grad_clip),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(config_err(f, format!("{v} must be > 0")));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(config_err(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_factor) {
            return Err(config_err("min_lr_factor", "must be in [0, 1]"));
        }
        self.objective()?;
        if !kinds::kinds().contains(&self.router.kind) {
            return Err(config_err(
                "router.kind",
                format!(
                    "unknown `{}` (registered: {})",
                    self.router.kind,
                    kinds::kinds().join(", ")
                ),
            ));
        }
        for (f, v) in [
            ("temperature_start", self.temperature_start),
            ("temperature_end", self.temperature_end),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(config_err(f, format!("{v} must be > 0")));
            }
        }
        self.lora.validate()?;
        self.routing
            .validate()
            .map_err(|e| config_err("routing", e.to_string()))
    }

    /// The checkpoint interval the loop uses: `checkpoint_every`, or `ceil(steps / 2)` when
    /// `checkpoint_every > steps` (e.g. a preset's 50 under `--steps 40`), so that every run writes a
    /// checkpoint before its last step. Not a refusal: the presets' interval stays valid for short runs.
    pub fn checkpoint_interval(&self) -> usize {
        if self.checkpoint_every > self.steps {
            self.steps.div_ceil(2).max(1)
        } else {
            self.checkpoint_every
        }
    }

    fn temperature(&self, step: usize) -> f64 {
        let p = step as f64 / self.steps.max(1) as f64;
        self.temperature_start + (self.temperature_end - self.temperature_start) * p
    }
}

/// Router diagnostics of one forward (routed layers, real non-reserved tokens).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouterDiag {
    /// Mean entropy (nats) of the router's softmax.
    pub entropy: f64,
    /// Mean |execute logit - skip logit|.
    pub logit_gap: f64,
    /// Gumbel flip rate: the probability that a Gumbel sample disagrees with the argmax decision,
    /// `mean min(p_exec, 1 - p_exec)` (exact for temperature 1; no sampling noise).
    pub flip_rate: f64,
    /// The same, counted on the samples this forward actually drew.
    pub flip_rate_sampled: f64,
    /// Mean execution ratio over tokens, and its min/max over tokens.
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    /// Per layer execution ratio (always-run layers 1).
    pub layer_ratio: Vec<f64>,
}

/// Router diagnostics of a training-mode output.
pub fn diagnostics(out: &RoutedOutput) -> RouterDiag {
    let _g = tch::no_grad_guard();
    let m = out.ratio_mask();
    let mf = m.to_kind(Kind::Float);
    let n = mf.sum(Kind::Float).double_value(&[]).max(1.0);
    let ent: f64 = router_entropies(out)
        .into_iter()
        .map(|h| (h * &mf).sum(Kind::Float).double_value(&[]))
        .sum();
    let (mut gap, mut flip, mut flip_s, mut layers) = (0.0, 0.0, 0.0, 0.0);
    for (lg, gate) in out.router_logits.iter().zip(&out.gates) {
        let (Some(lg), Some(gate)) = (lg, gate) else {
            continue;
        };
        let p = lg.log_softmax(-1, Kind::Float);
        let d = lg.select(-1, 1) - lg.select(-1, 0);
        gap += (d.abs() * &mf).sum(Kind::Float).double_value(&[]);
        let argmax = d.gt(0.0);
        let sampled = gate.gt(0.5);
        flip_s += (argmax.ne_tensor(&sampled).to_kind(Kind::Float) * &mf)
            .sum(Kind::Float)
            .double_value(&[]);
        let pe = p.select(-1, 1).exp();
        flip += (pe.minimum(&(1.0 - &pe)) * &mf)
            .sum(Kind::Float)
            .double_value(&[]);
        layers += 1.0;
    }
    let denom = (n * layers).max(1.0);
    let r = out.token_ratio().detach();
    let r_masked: Vec<f32> = Vec::try_from(r.masked_select(&m)).unwrap_or_default();
    let exec = out.exec.to_kind(Kind::Float);
    let valid = out.valid.to_kind(Kind::Float).unsqueeze(-1);
    let per_layer = (exec * &valid).sum_dim_intlist([0i64, 1].as_slice(), false, Kind::Float)
        / valid.sum(Kind::Float).clamp_min(1.0);
    RouterDiag {
        entropy: ent / denom,
        logit_gap: gap / denom,
        flip_rate: flip / denom,
        flip_rate_sampled: flip_s / denom,
        ratio: if r_masked.is_empty() {
            1.0
        } else {
            r_masked.iter().map(|&x| x as f64).sum::<f64>() / r_masked.len() as f64
        },
        ratio_min: r_masked.iter().cloned().fold(f32::INFINITY, f32::min) as f64,
        ratio_max: r_masked.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64,
        layer_ratio: Vec::try_from(per_layer).unwrap_or_default(),
    }
}

/// One logged step (also one JSONL line of `train_log.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    /// The weighted total.
    pub loss: f64,
    pub ce: f64,
    /// Each term's unweighted value, and its weight at this step.
    pub terms: BTreeMap<String, f64>,
    pub weights: BTreeMap<String, f64>,
    pub lr_lora: f64,
    pub lr_router: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Training tokens and seconds (forward + backward + update, no validation) since step 0, over
    /// every invocation of the run (carried in the checkpoint).
    pub tokens_total: usize,
    pub seconds_total: f64,
    pub skipped_nonfinite: usize,
    #[serde(flatten)]
    pub diag: RouterDiag,
    pub val_loss: Option<f64>,
    pub val_ratio: Option<f64>,
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_train: Option<StepLog>,
    pub val_ce: f64,
    pub val_ratio: f64,
    pub val_diag: RouterDiag,
    /// Training throughput over the whole run (all invocations; 0 only when nothing was timed).
    pub tokens_per_s: f64,
    pub tokens_total: usize,
    pub seconds_total: f64,
    pub lora_path: PathBuf,
    /// The directory the router was saved to (its kind decides the files).
    pub router_dir: PathBuf,
}

/// A training run over `model` (frozen base; LoRA is attached here) and a fresh or loaded router.
pub struct Trainer<'a> {
    pub cfg: TrainConfig,
    pub model: &'a mut Llama,
    pub router: Box<dyn TrainableRouter>,
    pub lora: Lora,
    objective: Objective,
    opt: AdamW,
    step: usize,
    out_dir: PathBuf,
    /// Stop (with a checkpoint) once this many steps are done, before `cfg.steps`: a time-sliced job
    /// (e.g. one Slurm allocation) continues later with `resume`.
    pub stop_at: Option<usize>,
    /// Set by the caller (e.g. from a SIGTERM handler the binary registers; this crate installs none):
    /// the loop finishes the current step, writes a checkpoint and returns [`TrainError::Stopped`].
    pub stop: Option<Arc<AtomicBool>>,
    /// Identity of the training data (e.g. file, hash, sizes), recorded in the checkpoint: a resume
    /// with other data is refused, naming the field. `Null`: not recorded.
    pub data_id: Value,
    tokens_total: usize,
    seconds_total: f64,
}

type Routed<'b> = RoutedLlama<&'b Llama, &'b dyn TrainableRouter>;

fn routed<'b>(model: &'b Llama, router: &'b dyn TrainableRouter, rc: &RoutingConfig) -> Routed<'b> {
    RoutedLlama {
        model,
        router,
        config: rc.clone(),
        theta: DEFAULT_THETA,
    }
}

/// A training-mode routed forward of one batch (Gumbel decisions at `temperature`, every token
/// computes every layer).
fn train_forward(
    routed: &Routed,
    b: &crate::data::Batch,
    temperature: f64,
) -> Result<RoutedOutput> {
    let opts = ForwardOptions {
        temperature,
        ..Default::default()
    };
    routed
        .forward(&b.ids, Some(&b.attention_mask), Mode::Train, &opts)
        .map_err(|e| config_err("routing", e.to_string()))
}

/// A fresh, reproducible torch seed per step (dropout, Gumbel noise): output `step` of the
/// SplitMix64 generator seeded with `seed`, made non-negative.
fn seed_for(seed: u64, step: usize) -> i64 {
    (qtale_router::splitmix::nth(seed, step as u64) >> 1) as i64
}

impl<'a> Trainer<'a> {
    /// Attach LoRA to `model`, create the router (of `cfg.router.kind`; `calib` batches for kinds that
    /// rank layers on data), the optimizer groups, and the output directory.
    pub fn new(
        cfg: TrainConfig,
        model: &'a mut Llama,
        out_dir: &Path,
        calib: &[CalibBatch],
    ) -> Result<Self> {
        cfg.validate()?;
        let objective = cfg.objective()?;
        let router = kinds::build(
            &cfg.router.kind,
            &RouterBuild {
                model,
                routing: &cfg.routing,
                options: &cfg.router.options,
                seed: cfg.seed,
                calib,
                saved: None,
            },
        )
        .map_err(|e| config_err("router", e.to_string()))?;
        let lora = Lora::attach(model, cfg.lora.clone(), seed_for(cfg.seed, usize::MAX - 1))?;
        let named = |vs: &tch::nn::VarStore, prefix: &str| -> Vec<(String, Tensor)> {
            let mut v: Vec<(String, Tensor)> = vs
                .variables()
                .into_iter()
                .map(|(n, t)| (format!("{prefix}.{n}"), t))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let router_vars = router
            .var_store()
            .map(|vs| named(vs, "router"))
            .unwrap_or_default();
        let mut groups = Vec::new();
        for (name, vars, lr) in [
            ("lora", named(&lora.vs, "lora"), cfg.lr_lora),
            ("router", router_vars, cfg.lr_router),
        ] {
            let (decay, no_decay) = split_decay(vars);
            groups.push(ParamGroup {
                name: format!("{name}.decay"),
                params: decay,
                lr,
                weight_decay: cfg.weight_decay,
            });
            groups.push(ParamGroup {
                name: format!("{name}.no_decay"),
                params: no_decay,
                lr,
                weight_decay: 0.0,
            });
        }
        let opt = AdamW::new(groups, 0.9, 0.95)?;
        std::fs::create_dir_all(out_dir).map_err(|e| TrainError::Io {
            path: out_dir.into(),
            source: e,
        })?;
        Ok(Trainer {
            cfg,
            model,
            router,
            lora,
            objective,
            opt,
            step: 0,
            out_dir: out_dir.into(),
            stop_at: None,
            stop: None,
            data_id: Value::Null,
            tokens_total: 0,
            seconds_total: 0.0,
        })
    }

    pub fn step(&self) -> usize {
        self.step
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.out_dir.join("checkpoint.safetensors")
    }

    /// Save LoRA + routers + optimizer state + step atomically.
    pub fn save_checkpoint(&self) -> Result<()> {
        let mut tensors = self.opt.state();
        for g in &self.opt.groups {
            for (n, t) in &g.params {
                tensors.push((n.clone(), t.shallow_clone()));
            }
        }
        let meta = serde_json::json!({"step": self.step, "config": self.cfg, "data": self.data_id,
            "tokens_total": self.tokens_total, "seconds_total": self.seconds_total});
        checkpoint::save_atomic(&self.checkpoint_path(), &tensors, &meta)
    }

    /// Resume from `out_dir/checkpoint.safetensors`, which must exist (the user asked to resume): a
    /// missing one is an error naming the path, not a fresh start. See [`Trainer::resume_if_present`].
    pub fn resume(&mut self) -> Result<()> {
        if self.resume_if_present()? {
            Ok(())
        } else {
            Err(TrainError::Checkpoint {
                path: self.checkpoint_path(),
                msg: "no checkpoint to resume from (nothing was trained in this directory yet)"
                    .into(),
            })
        }
    }

    /// Resume when `out_dir/checkpoint.safetensors` exists (a cached stage continues where it stopped);
    /// `Ok(false)` when there is none. The config and data must be the checkpoint's: every differing
    /// field is named. `steps` too: the LR schedule (warmup + cosine to `steps`), the ratio-loss ramp and
    /// the temperature schedule are functions of the total, so a longer or shorter run is not the
    /// continuation of this one. The log is cut back to the checkpoint's step and gets a resume marker.
    pub fn resume_if_present(&mut self) -> Result<bool> {
        let path = self.checkpoint_path();
        if !path.exists() {
            return Ok(false);
        }
        let (tensors, meta) = checkpoint::load(&path)?;
        let ck_err = |msg: String| TrainError::Checkpoint {
            path: path.clone(),
            msg,
        };
        let saved = meta
            .get("config")
            .cloned()
            .ok_or_else(|| ck_err("metadata has no `config`".into()))?;
        let saved_steps = saved.get("steps").and_then(Value::as_u64);
        let now = serde_json::to_value(&self.cfg).expect("serializable");
        let mut diffs = Vec::new();
        checkpoint::json_diffs("", &saved, &now, ("checkpoint", "now"), &mut diffs);
        if !diffs.is_empty() {
            let steps_note = if diffs.iter().any(|d| d.starts_with("steps:")) {
                format!(
                    "; `steps` cannot change on resume: the LR warmup + cosine, the ratio-loss ramp and the \
                     temperature schedule run to the total, so resume with steps = {} or start a new run \
                     in another directory",
                    saved_steps.map_or("?".into(), |s| s.to_string())
                )
            } else {
                String::new()
            };
            return Err(ck_err(format!(
                "written with a different training config: {}{steps_note}",
                diffs.join(", ")
            )));
        }
        match meta.get("data") {
            Some(saved_data) if !saved_data.is_null() || !self.data_id.is_null() => {
                let mut diffs = Vec::new();
                checkpoint::json_diffs(
                    "data",
                    saved_data,
                    &self.data_id,
                    ("checkpoint", "now"),
                    &mut diffs,
                );
                if !diffs.is_empty() {
                    return Err(ck_err(format!(
                        "written with different training data: {}",
                        diffs.join(", ")
                    )));
                }
            }
            None if !self.data_id.is_null() => eprintln!(
                "warning: {} records no training data (written before data were recorded); resuming \
                 on the assumption that it is the same data",
                path.display()
            ),
            _ => {}
        }
        let step = meta
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| ck_err("metadata has no `step`".into()))? as usize;
        let _g = tch::no_grad_guard();
        for g in &mut self.opt.groups {
            for (n, t) in &mut g.params {
                let src = tensors
                    .get(n)
                    .ok_or_else(|| ck_err(format!("missing `{n}`")))?;
                t.copy_(&src.to_kind(t.kind()).to_device(t.device()));
            }
        }
        self.opt.load_state(&tensors).map_err(ck_err)?;
        self.step = step;
        let log_path = self.log_path();
        let (tokens, seconds) = match (
            meta.get("tokens_total").and_then(Value::as_u64),
            meta.get("seconds_total").and_then(Value::as_f64),
        ) {
            (Some(t), Some(s)) => (t as usize, s),
            // Checkpoints from before the totals were stored: the log's intervals up to the step.
            _ => log_throughput(&log_path, step, self.tokens_per_step())?,
        };
        self.tokens_total = tokens;
        self.seconds_total = seconds;
        truncate_log(&log_path, step)?;
        append_line(
            &log_path,
            &serde_json::json!({"event": "resume", "from_step": step, "steps": self.cfg.steps,
                "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())}),
        )?;
        Ok(true)
    }

    fn log_path(&self) -> PathBuf {
        self.out_dir.join("train_log.jsonl")
    }

    fn tokens_per_step(&self) -> usize {
        self.cfg.batch_size * self.cfg.grad_accum * self.cfg.seq_len
    }

    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Validation CE and execution ratio (training mode decisions without gradient, Gumbel seeded).
    pub fn validate(&self, val: &[Example]) -> Result<(f64, f64, RouterDiag)> {
        let _g = tch::no_grad_guard();
        self.lora.set_train(false);
        tch::manual_seed(seed_for(self.cfg.seed, usize::MAX));
        let (mut ce, mut ratio, mut n) = (0.0, 0.0, 0.0);
        let mut last = RouterDiag::default();
        let routed = routed(self.model, &*self.router, &self.cfg.routing);
        for chunk in val.chunks(self.cfg.batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let b = collate(&refs, self.model.device);
            let out = train_forward(&routed, &b, self.cfg.temperature_end)?;
            ce += masked_ce(&out.logits, &b).double_value(&[]) * chunk.len() as f64;
            last = diagnostics(&out);
            ratio += last.ratio * chunk.len() as f64;
            n += chunk.len() as f64;
        }
        self.lora.set_train(true);
        Ok((ce / n.max(1.0), ratio / n.max(1.0), last))
    }

    /// Train until `cfg.steps`, logging to `out_dir/train_log.jsonl` and calling `on_log` for each
    /// logged step (the binary drives a progress bar from it).
    pub fn train(
        &mut self,
        train: &[Example],
        val: &[Example],
        mut on_log: impl FnMut(&StepLog),
    ) -> Result<TrainSummary> {
        if train.is_empty() {
            return Err(config_err("data", "no training examples"));
        }
        let sched = WarmupCosine {
            warmup: self.cfg.warmup_steps,
            total: self.cfg.steps,
            min_factor: self.cfg.min_lr_factor,
        };
        let log_path = self.log_path();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| TrainError::Io {
                path: log_path.clone(),
                source: e,
            })?;
        self.lora.set_train(true);
        let mut nonfinite_run = 0usize;
        let mut skipped_total = 0usize;
        let mut last_log = None;
        let mut t0 = Instant::now();
        let mut tokens = 0usize;
        let per_step = self.cfg.batch_size * self.cfg.grad_accum;
        let ck_every = self.cfg.checkpoint_interval();
        if ck_every != self.cfg.checkpoint_every && self.step < self.cfg.steps {
            eprintln!(
                "note: checkpoint_every {} > steps {}: checkpointing every {ck_every} steps instead",
                self.cfg.checkpoint_every, self.cfg.steps
            );
        }
        let mut saved_at = None;
        while self.step < self.cfg.steps {
            if self.stop_requested() {
                if saved_at != Some(self.step) {
                    self.save_checkpoint()?;
                }
                return Err(TrainError::Stopped {
                    step: self.step,
                    steps: self.cfg.steps,
                    path: self.checkpoint_path(),
                });
            }
            let step = self.step;
            let step_t0 = Instant::now();
            tch::manual_seed(seed_for(self.cfg.seed, step));
            let temperature = self.cfg.temperature(step);
            let routed = routed(self.model, &*self.router, &self.cfg.routing);
            self.opt.zero_grad();
            let (mut loss_v, mut ce_v) = (0.0, 0.0);
            let mut term_v: BTreeMap<String, f64> = BTreeMap::new();
            let mut diag = RouterDiag::default();
            let mut finite = true;
            for micro in 0..self.cfg.grad_accum {
                // Deterministic data order: example index from (step, micro), cycling over the shuffled set.
                let start = (step * per_step + micro * self.cfg.batch_size) % train.len();
                let refs: Vec<&Example> = (0..self.cfg.batch_size)
                    .map(|i| &train[(start + i) % train.len()])
                    .collect();
                let b = collate(&refs, self.model.device);
                let out = train_forward(&routed, &b, temperature)?;
                let dense = if self.objective.needs_dense() {
                    let _g = tch::no_grad_guard();
                    Some(self.model.forward(&b.ids, Some(&b.attention_mask))?.logits)
                } else {
                    None
                };
                let x = LossInput {
                    out: &out,
                    batch: &b,
                    dense_logits: dense.as_ref(),
                };
                let value = self.objective.evaluate(&x, step, self.cfg.steps);
                let lv = value.total.double_value(&[]);
                if !lv.is_finite() {
                    finite = false;
                    break;
                }
                (value.total / self.cfg.grad_accum as f64).backward();
                let k = self.cfg.grad_accum as f64;
                loss_v += lv / k;
                ce_v += masked_ce(&out.logits, &b).double_value(&[]) / k;
                for (name, v) in &value.parts {
                    *term_v.entry(name.clone()).or_default() += v.double_value(&[]) / k;
                }
                diag = diagnostics(&out);
                tokens += self.cfg.batch_size * self.cfg.seq_len;
                self.tokens_total += self.cfg.batch_size * self.cfg.seq_len;
            }
            let grad_norm = if finite {
                self.opt.clip_grad_norm(self.cfg.grad_clip)
            } else {
                f64::NAN
            };
            if !finite || !grad_norm.is_finite() {
                nonfinite_run += 1;
                skipped_total += 1;
                eprintln!("step {step}: non-finite loss or gradient, update skipped ({nonfinite_run} in a row)");
                self.opt.zero_grad();
                self.seconds_total += step_t0.elapsed().as_secs_f64();
                if nonfinite_run >= self.cfg.max_nonfinite {
                    return Err(TrainError::NonFinite {
                        step,
                        what: format!(
                            "{nonfinite_run} consecutive non-finite steps; last good checkpoint kept at {}",
                            self.checkpoint_path().display()
                        ),
                    });
                }
                self.step += 1;
                continue;
            }
            nonfinite_run = 0;
            let f = sched.factor(step);
            self.opt.step(f);
            self.step += 1;
            self.seconds_total += step_t0.elapsed().as_secs_f64();
            let done = self.step;
            let val_due = done.is_multiple_of(self.cfg.eval_every) || done == self.cfg.steps;
            if done.is_multiple_of(self.cfg.log_every) || val_due {
                let (val_loss, val_ratio) = if val_due && !val.is_empty() {
                    let (c, r, _) = self.validate(val)?;
                    (Some(c), Some(r))
                } else {
                    (None, None)
                };
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                let weights = self
                    .objective
                    .terms
                    .iter()
                    .map(|t| (t.name().to_string(), t.weight(step, self.cfg.steps)))
                    .collect();
                let entry = StepLog {
                    step: done,
                    loss: loss_v,
                    ce: ce_v,
                    terms: term_v,
                    weights,
                    lr_lora: self.cfg.lr_lora * f,
                    lr_router: self.cfg.lr_router * f,
                    grad_norm,
                    tokens_per_s: tokens as f64 / secs,
                    tokens_total: self.tokens_total,
                    seconds_total: self.seconds_total,
                    skipped_nonfinite: skipped_total,
                    diag,
                    val_loss,
                    val_ratio,
                };
                writeln!(
                    log,
                    "{}",
                    serde_json::to_string(&entry).expect("serializable")
                )
                .map_err(|e| TrainError::Io {
                    path: log_path.clone(),
                    source: e,
                })?;
                on_log(&entry);
                last_log = Some(entry);
                t0 = Instant::now();
                tokens = 0;
            }
            let stop = self.stop_at == Some(done);
            if done.is_multiple_of(ck_every) || done == self.cfg.steps || stop {
                self.save_checkpoint()?;
                saved_at = Some(done);
            }
            if stop {
                break;
            }
        }
        let (val_ce, val_ratio, val_diag) = if val.is_empty() {
            (f64::NAN, f64::NAN, RouterDiag::default())
        } else {
            self.validate(val)?
        };
        let lora_path = self.out_dir.join("lora.safetensors");
        self.lora.save(&lora_path)?;
        self.router
            .save(&self.out_dir)
            .map_err(|e| TrainError::Checkpoint {
                path: self.out_dir.clone(),
                msg: e.to_string(),
            })?;
        std::fs::write(
            self.out_dir.join("train_config.json"),
            serde_json::to_vec_pretty(&self.cfg).expect("serializable"),
        )
        .map_err(|e| TrainError::Io {
            path: self.out_dir.join("train_config.json"),
            source: e,
        })?;
        Ok(TrainSummary {
            steps: self.step,
            final_train: last_log,
            val_ce,
            val_ratio,
            val_diag,
            tokens_per_s: if self.seconds_total > 0.0 {
                self.tokens_total as f64 / self.seconds_total
            } else {
                0.0
            },
            tokens_total: self.tokens_total,
            seconds_total: self.seconds_total,
            lora_path,
            router_dir: self.out_dir.clone(),
        })
    }
}

/// The step entries of a `train_log.jsonl`, in order; event lines (`{"event": "resume", ...}`) are
/// skipped, as every reader of the log must.
pub fn read_log(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
        path: path.into(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| TrainError::Checkpoint {
            path: path.into(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        if v.get("event").is_none() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Keep the log's lines up to `step` (step entries with `step <= step`, events from before it); a torn
/// last line of a killed process goes too. Written to a temporary file and renamed.
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(TrainError::Io {
                path: path.into(),
                source: e,
            })
        }
    };
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let at = v
            .get("step")
            .or_else(|| v.get("from_step"))
            .and_then(Value::as_u64);
        if at.is_some_and(|s| s as usize <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| TrainError::Io { path: p, source: e }
    };
    std::fs::write(&tmp, kept).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn append_line(path: &Path, v: &Value) -> Result<()> {
    let io = |e| TrainError::Io {
        path: path.into(),
        source: e,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    writeln!(f, "{v}").map_err(io)
}

/// Training tokens and seconds up to `step` from a log without cumulative totals (runs from before
/// they were recorded): each logged interval's tokens over its rate, the last entry per step counting.
fn log_throughput(path: &Path, step: usize, tokens_per_step: usize) -> Result<(usize, f64)> {
    if !path.exists() {
        return Ok((0, 0.0));
    }
    let mut by_step = BTreeMap::new();
    for v in read_log(path)? {
        if let (Some(s), Some(r)) = (
            v.get("step").and_then(Value::as_u64),
            v.get("tokens_per_s").and_then(Value::as_f64),
        ) {
            if s as usize <= step {
                by_step.insert(s as usize, r);
            }
        }
    }
    let (mut prev, mut tokens, mut secs) = (0usize, 0usize, 0.0);
    for (s, rate) in by_step {
        let t = (s - prev) * tokens_per_step;
        if rate > 0.0 && rate.is_finite() {
            tokens += t;
            secs += t as f64 / rate;
        }
        prev = s;
    }
    Ok((tokens, secs))
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use qtale_model::config::{LlamaConfig, RopeScaling};
    use qtale_model::weights::{expected_tensors, TensorMap};
    use tch::Device;

    /// A random 8-layer model (hidden 64, vocab 64): enough depth for routers from layer 2 on.
    pub(crate) fn tiny_model(seed: i64) -> Llama {
        tiny_model_in(seed, Kind::Float)
    }

    /// The same weights as [`tiny_model`], stored in `kind`.
    pub(crate) fn tiny_model_in(seed: i64, kind: Kind) -> Llama {
        let cfg = LlamaConfig {
            vocab_size: 64,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 8,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_id: Some(0),
        };
        tch::manual_seed(seed);
        let tensors = expected_tensors(&cfg)
            .into_iter()
            .map(|(n, s)| {
                let t = if s.len() == 1 {
                    Tensor::ones(s.as_slice(), (Kind::Float, Device::Cpu))
                } else {
                    Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) * 0.15
                };
                (n, t)
            })
            .collect();
        Llama::from_tensors(
            cfg,
            TensorMap {
                source_name: "tiny".into(),
                tensors,
            },
            Device::Cpu,
            kind,
        )
        .unwrap()
    }

    /// Counting sequences (a, a+1, ...) mod 63 + 1: predictable, so CE can fall quickly.
    pub(crate) fn counting_data(n: usize, len: usize, seed: u64) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let a = (i as u64 * 7919 + seed) % 63;
                let ids: Vec<i64> = (0..len as u64).map(|t| ((a + t) % 63 + 1) as i64).collect();
                Example {
                    loss: vec![true; len],
                    ids,
                }
            })
            .collect()
    }

    pub(crate) fn small_cfg(preset: &str) -> TrainConfig {
        let mut c = TrainConfig::preset(preset).unwrap();
        c.steps = 150;
        c.batch_size = 4;
        c.seq_len = 24;
        c.lr_lora = 3e-3;
        c.lr_router = 1e-2;
        c.warmup_steps = 5;
        c.loss.get_mut("ratio").unwrap()["ramp_steps"] = 60.into();
        c.log_every = 50;
        c.eval_every = 150;
        c.checkpoint_every = 75;
        c.routing.hidden = 32;
        c.lora.dropout = 0.0;
        if preset == "qtale" {
            c.loss
                .insert("entropy".into(), serde_json::json!({"weight": 0.5}));
        }
        c
    }

    pub(crate) fn run(c: TrainConfig, out: &Path) -> (TrainSummary, f64, f64) {
        tch::set_num_threads(1);
        let mut model = tiny_model(1);
        let train = counting_data(64, c.seq_len, 0);
        let val = counting_data(8, c.seq_len, 1000);
        let mut t = Trainer::new(c, &mut model, out, &[]).unwrap();
        let (ce0, r0, _) = t.validate(&val).unwrap();
        let s = t.train(&train, &val, |_| {}).unwrap();
        (s, ce0, r0)
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    /// torch's RNG is process-global: trainer tests (which reseed it every step) must not interleave.
    static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Set-up of a trainer test: hold the RNG lock, one libtorch thread, a fresh temporary directory.
    fn serial() -> (std::sync::MutexGuard<'static, ()>, tempfile::TempDir) {
        let lock = RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::set_num_threads(1);
        (lock, tempfile::tempdir().unwrap())
    }

    fn params(t: &Trainer) -> Vec<(String, Tensor)> {
        t.opt
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(n, p)| (n.clone(), p.detach().copy())))
            .collect()
    }

    /// Interrupt at step 6 and resume: the same parameters as an uninterrupted run, bit for bit; the
    /// log has each step once and the throughput covers both invocations.
    #[test]
    fn resume_continues_exactly() {
        let (_lock, dir) = serial();
        let mut c = small_cfg("qtale");
        c.steps = 12;
        c.lora.dropout = 0.05; // exercise the reseeded dropout too
        let train = counting_data(16, c.seq_len, 0);
        let mut m1 = tiny_model(1);
        let mut a = Trainer::new(c.clone(), &mut m1, &dir.path().join("a"), &[]).unwrap();
        a.train(&train, &[], |_| {}).unwrap();
        let want = params(&a);

        let mut m2 = tiny_model(1);
        let mut b = Trainer::new(c.clone(), &mut m2, &dir.path().join("b"), &[]).unwrap();
        b.stop_at = Some(6);
        b.train(&train, &[], |_| {}).unwrap();
        assert_eq!(b.step(), 6);
        let at_stop = params(&b);
        drop(b);
        let mut m3 = tiny_model(1);
        let mut b2 = Trainer::new(c.clone(), &mut m3, &dir.path().join("b"), &[]).unwrap();
        b2.resume().unwrap();
        assert_eq!(b2.step(), 6);
        for ((n, x), (_, y)) in at_stop.iter().zip(params(&b2)) {
            assert_eq!(
                (x - &y).abs().max().double_value(&[]),
                0.0,
                "{n} differs right after resume"
            );
        }
        let s = b2.train(&train, &[], |_| {}).unwrap();
        for ((n, x), (_, y)) in want.iter().zip(params(&b2)) {
            assert_eq!(
                (x - &y).abs().max().double_value(&[]),
                0.0,
                "{n} differs after resume"
            );
        }
        // Throughput covers the whole run: both invocations' tokens.
        assert_eq!(s.tokens_total, 12 * c.batch_size * c.seq_len);
        assert!(s.tokens_per_s.is_finite() && s.tokens_per_s > 0.0);
        // Each step is logged once; the resume marker is the only event line.
        let steps: Vec<u64> = read_log(&dir.path().join("b/train_log.jsonl"))
            .unwrap()
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [12], "log_every 50: only the final step");
    }

    /// A resume that is not a continuation is refused, naming what differs; resuming a finished run
    /// just reports it, with the whole run's throughput.
    #[test]
    fn resume_refusals_name_the_field_and_finished_runs_report_themselves() {
        let (_lock, dir) = serial();
        let mut c = small_cfg("qtale");
        c.steps = 4;
        let train = counting_data(8, c.seq_len, 0);
        let val = counting_data(4, c.seq_len, 1000);
        let out = dir.path().join("r");
        let data = serde_json::json!({"jsonl": "a.jsonl", "sha256": "aa", "holdout": 0.1});
        // Asked to resume with nothing there: an error naming the checkpoint path.
        let mut m0 = tiny_model(1);
        let mut t0 = Trainer::new(c.clone(), &mut m0, &out, &[]).unwrap();
        let e = t0.resume().unwrap_err().to_string();
        assert!(
            e.contains("checkpoint.safetensors") && e.contains("no checkpoint"),
            "{e}"
        );
        assert!(!t0.resume_if_present().unwrap());
        t0.data_id = data.clone();
        let first = t0.train(&train, &val, |_| {}).unwrap();
        drop(t0);
        let try_resume = |c: TrainConfig, d: &serde_json::Value| {
            let mut m = tiny_model(1);
            let mut t = Trainer::new(c, &mut m, &out, &[]).unwrap();
            t.data_id = d.clone();
            t.resume().map(|_| t.step())
        };
        let mut c2 = c.clone();
        c2.loss.remove("entropy");
        let e = try_resume(c2, &data).unwrap_err().to_string();
        assert!(
            e.contains("loss.entropy:") && e.contains("different training config"),
            "{e}"
        );
        let mut c3 = c.clone();
        c3.steps = 8;
        let e = try_resume(c3, &data).unwrap_err().to_string();
        assert!(
            e.contains("steps: 4 (checkpoint) vs 8 (now)") && e.contains("cannot change on resume"),
            "{e}"
        );
        let mut d2 = data.clone();
        d2["sha256"] = "bb".into();
        let e = try_resume(c.clone(), &d2).unwrap_err().to_string();
        assert!(
            e.contains("data.sha256: \"aa\" (checkpoint) vs \"bb\" (now)"),
            "{e}"
        );
        // The same run again: nothing to train, the same outcome and a finite whole-run throughput.
        let mut m = tiny_model(1);
        let mut t = Trainer::new(c.clone(), &mut m, &out, &[]).unwrap();
        t.data_id = data;
        t.resume().unwrap();
        assert_eq!(t.step(), 4);
        let again = t.train(&train, &val, |_| panic!("no step runs")).unwrap();
        assert_eq!(again.val_ce, first.val_ce);
        assert_eq!(again.tokens_total, first.tokens_total);
        assert_eq!(again.tokens_per_s, first.tokens_per_s);
        assert!(first.tokens_per_s > 0.0);
    }

    /// The stop flag (a SIGTERM handler sets it in the binaries): the step in flight finishes, a
    /// checkpoint is written, `Stopped` names it; resuming gives the uninterrupted run's parameters.
    #[test]
    fn stop_flag_checkpoints_and_the_resumed_run_is_exact() {
        let (_lock, dir) = serial();
        let mut c = small_cfg("dllm");
        c.steps = 8;
        c.log_every = 1;
        c.checkpoint_every = 50; // > steps: the loop checkpoints every ceil(8 / 2) = 4 steps
        assert_eq!(c.checkpoint_interval(), 4);
        let train = counting_data(16, c.seq_len, 0);
        let mut m1 = tiny_model(1);
        let mut a = Trainer::new(c.clone(), &mut m1, &dir.path().join("a"), &[]).unwrap();
        a.train(&train, &[], |_| {}).unwrap();
        let want = params(&a);

        let out = dir.path().join("b");
        let flag = Arc::new(AtomicBool::new(false));
        let mut m2 = tiny_model(1);
        let mut b = Trainer::new(c.clone(), &mut m2, &out, &[]).unwrap();
        b.stop = Some(flag.clone());
        let ck = out.join("checkpoint.safetensors");
        let mut ck_at_5 = None;
        let e = b
            .train(&train, &[], |log| {
                if log.step == 5 {
                    ck_at_5 = Some(checkpoint::load(&ck).unwrap().1["step"].clone());
                    flag.store(true, Ordering::SeqCst);
                }
            })
            .unwrap_err();
        assert_eq!(ck_at_5, Some(serde_json::json!(4)), "clamped interval");
        match &e {
            TrainError::Stopped { step, steps, path } => {
                assert_eq!((*step, *steps), (5, 8));
                assert_eq!(path, &ck);
            }
            other => panic!("{other}"),
        }
        assert_eq!(checkpoint::load(&ck).unwrap().1["step"], 5);
        drop(b);
        let mut m3 = tiny_model(1);
        let mut b2 = Trainer::new(c.clone(), &mut m3, &out, &[]).unwrap();
        b2.resume().unwrap();
        b2.train(&train, &[], |_| {}).unwrap();
        for ((n, x), (_, y)) in want.iter().zip(params(&b2)) {
            assert_eq!((x - &y).abs().max().double_value(&[]), 0.0, "{n}");
        }
        let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
        let steps: Vec<u64> = read_log(&out.join("train_log.jsonl"))
            .unwrap()
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "{log}");
        assert_eq!(log.matches("\"event\":\"resume\"").count(), 1, "{log}");
    }

    /// Resuming from an earlier checkpoint than the log's end (a crash after logging past it) cuts the
    /// log back, so no step appears twice.
    #[test]
    fn resume_cuts_the_log_back_to_the_checkpoint() {
        let (_lock, dir) = serial();
        let mut c = small_cfg("dllm");
        c.steps = 6;
        c.log_every = 1;
        c.checkpoint_every = 2;
        let train = counting_data(8, c.seq_len, 0);
        let out = dir.path().join("r");
        let mut m = tiny_model(1);
        let mut t = Trainer::new(c.clone(), &mut m, &out, &[]).unwrap();
        t.stop_at = Some(4);
        t.train(&train, &[], |_| {}).unwrap();
        drop(t);
        // Pretend the process logged step 5 (and tore a line) before dying with the step-4 checkpoint.
        let log = out.join("train_log.jsonl");
        let mut text = std::fs::read_to_string(&log).unwrap();
        text += "{\"step\":5,\"loss\":1.0}\n{\"step\":6,\"lo";
        std::fs::write(&log, text).unwrap();
        let mut m = tiny_model(1);
        let mut t = Trainer::new(c, &mut m, &out, &[]).unwrap();
        t.resume().unwrap();
        t.train(&train, &[], |_| {}).unwrap();
        let steps: Vec<u64> = read_log(&log)
            .unwrap()
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    }

    /// Non-finite losses skip the update; too many in a row stop the run, keeping the last checkpoint.
    #[test]
    fn nan_losses_are_skipped_then_stop_the_run() {
        let (_lock, dir) = serial();
        let mut c = small_cfg("dllm");
        c.steps = 20;
        c.checkpoint_every = 2;
        c.max_nonfinite = 3;
        let train = counting_data(16, c.seq_len, 0);
        let mut m = tiny_model(1);
        let mut t = Trainer::new(c, &mut m, dir.path(), &[]).unwrap();
        t.stop_at = Some(2);
        t.train(&train, &[], |_| {}).unwrap();
        let ck = dir.path().join("checkpoint.safetensors");
        let before = std::fs::read(&ck).unwrap();
        // Poison one LoRA matrix: every forward is NaN from now on.
        tch::no_grad(|| {
            let (_, mut v) = t
                .lora
                .vs
                .variables()
                .into_iter()
                .find(|(n, _)| n.contains("lora_B"))
                .unwrap();
            let _ = v.fill_(f64::NAN);
        });
        t.stop_at = None;
        let e = t.train(&train, &[], |_| {}).unwrap_err().to_string();
        assert!(
            e.contains("3 consecutive non-finite") && e.contains("checkpoint.safetensors"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&ck).unwrap(),
            before,
            "the last good checkpoint is kept"
        );
    }

    #[test]
    fn ce_falls_ratio_reaches_target_and_entropy_term_keeps_routers_soft() {
        let _lock = RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (d, ce0, r0) = run(small_cfg("dllm"), &dir.path().join("dllm"));
        let (q, _, _) = run(small_cfg("qtale"), &dir.path().join("qtale"));
        eprintln!("start: ce {ce0:.3}, ratio {r0:.3}");
        eprintln!(
            "dllm : ce {:.3} ratio {:.3} {:?}",
            d.val_ce, d.val_ratio, d.val_diag
        );
        eprintln!(
            "qtale: ce {:.3} ratio {:.3} {:?}",
            q.val_ce, q.val_ratio, q.val_diag
        );
        assert!(
            (0.8..0.95).contains(&r0),
            "initial ratio {r0} (bias [0.1, 2.0] gives p ~ 0.87)"
        );
        assert!(
            d.val_ce < ce0 - 0.3,
            "CE did not fall: {ce0} -> {}",
            d.val_ce
        );
        assert!(
            (d.val_ratio - 0.5).abs() < 0.05,
            "dllm ratio {}",
            d.val_ratio
        );
        assert!(
            (q.val_ratio - 0.5).abs() < 0.05,
            "qtale ratio {}",
            q.val_ratio
        );
        assert!((q.val_ratio - d.val_ratio).abs() < 0.05);
        assert!(q.val_diag.entropy > d.val_diag.entropy, "entropy");
        assert!(q.val_diag.logit_gap < d.val_diag.logit_gap, "logit gap");
        assert!(q.val_diag.flip_rate > d.val_diag.flip_rate, "flip rate");
        assert!(d.lora_path.exists() && d.router_dir.join("router.safetensors").exists());
    }

    /// A bf16 base model (the CUDA configuration; tiny here, so CPU bf16 matmuls cost nothing): it
    /// starts at the f32 model's CE within bf16 rounding, the loop runs with finite losses and CE
    /// falls, and the trained parameters (adapters, routers) and their optimizer stay f32.
    #[test]
    fn bf16_base_model_trains_with_f32_adapters_and_routers() {
        let (_lock, dir) = serial();
        let mut c = small_cfg("qtale");
        c.steps = 40;
        c.log_every = 20;
        c.eval_every = 40;
        c.checkpoint_every = 40;
        let train = counting_data(64, c.seq_len, 0);
        let val = counting_data(8, c.seq_len, 1000);
        let mut m32 = tiny_model_in(1, Kind::Float);
        let ce32 = Trainer::new(c.clone(), &mut m32, &dir.path().join("f32"), &[])
            .unwrap()
            .validate(&val)
            .unwrap()
            .0;
        let mut m16 = tiny_model_in(1, Kind::BFloat16);
        assert_eq!(m16.kind, Kind::BFloat16);
        let mut t = Trainer::new(c, &mut m16, &dir.path().join("bf16"), &[]).unwrap();
        let (ce0, _, _) = t.validate(&val).unwrap();
        assert!(
            (ce0 - ce32).abs() < 0.02 * ce32,
            "bf16 start CE {ce0} vs f32 {ce32}"
        );
        let s = t.train(&train, &val, |_| {}).unwrap();
        assert!(
            s.val_ce.is_finite() && s.val_ce < ce0 - 0.2,
            "bf16 CE {ce0} -> {}",
            s.val_ce
        );
        for g in &t.opt.groups {
            for (n, p) in &g.params {
                assert_eq!(p.kind(), Kind::Float, "{n}");
            }
        }
    }

    /// The KD term is KL(dense || routed) per real token (checked against torch's `kl_div`), zero when
    /// the teacher is the routed model itself; the objective's total is the weighted sum of its terms.
    #[test]
    fn kd_term_is_the_token_mean_kl_to_the_dense_logits() {
        let _lock = RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let model = tiny_model(2);
        let mut cfg = small_cfg("dllm");
        cfg.loss
            .insert("kd".into(), serde_json::json!({"weight": 0.7}));
        let obj = cfg.objective().unwrap();
        assert!(obj.needs_dense());
        let router =
            qtale_router::DllmRouter::new(&cfg.routing, 64, 8, tch::Device::Cpu, 5).unwrap();
        let r = routed(&model, &router, &cfg.routing);
        let data = counting_data(3, 12, 0);
        let refs: Vec<&Example> = data.iter().collect();
        let b = collate(&refs, tch::Device::Cpu);
        let out = train_forward(&r, &b, 1.0).unwrap();
        let dense = model
            .forward(&b.ids, Some(&b.attention_mask))
            .unwrap()
            .logits;
        let x = LossInput {
            out: &out,
            batch: &b,
            dense_logits: Some(&dense),
        };
        let v = obj.evaluate(&x, 30, 150);
        let part = |name: &str| {
            v.parts
                .iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .double_value(&[])
        };
        let lp = out.logits.log_softmax(-1, Kind::Float);
        let lq = dense.log_softmax(-1, Kind::Float);
        let kl = lp
            .kl_div(&lq, tch::Reduction::None, true)
            .sum_dim_intlist(-1, false, Kind::Float);
        let m = b.attention_mask.to_kind(Kind::Float);
        let want = ((kl * &m).sum(Kind::Float) / m.sum(Kind::Float)).double_value(&[]);
        let got = part("kd");
        assert!(want > 1e-4, "routed and dense differ, KL {want}");
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // ratio weight at step 30 of a 60-step sine ramp: 5 sin(pi/4)
        let w_ratio = 5.0 * std::f64::consts::FRAC_PI_4.sin();
        assert!((obj.weight("ratio", 30, 150) - w_ratio).abs() < 1e-12);
        let parts = part("ce") + w_ratio * part("ratio") + 0.7 * got;
        assert!((v.total.double_value(&[]) - parts).abs() < 1e-4);
        let same = LossInput {
            dense_logits: Some(&out.logits.detach()),
            ..x
        };
        let v2 = obj.evaluate(&same, 30, 150);
        let kd_same = v2
            .parts
            .iter()
            .find(|(n, _)| n == "kd")
            .unwrap()
            .1
            .double_value(&[]);
        assert!(kd_same.abs() < 1e-6);
        assert!(!small_cfg("dllm").objective().unwrap().needs_dense());
    }
}

#[cfg(test)]
mod sweep {
    use super::tests_support::*;
    use super::*;

    /// The small lambda_2 sweep behind the `qtale` preset's default (tiny model, 150 steps each); run with
    /// `cargo test -p qtale-train --release lambda2_sweep -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lambda2_sweep() {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        println!("lambda2,val_ce,val_ratio,entropy,logit_gap,flip_rate");
        for l2 in [0.0, 0.05, 0.1, 0.25, 0.5, 1.0] {
            let mut c = small_cfg("qtale");
            c.loss
                .insert("entropy".into(), serde_json::json!({"weight": l2}));
            let mut model = tiny_model(1);
            let train = counting_data(64, c.seq_len, 0);
            let val = counting_data(8, c.seq_len, 1000);
            let mut t =
                Trainer::new(c, &mut model, &dir.path().join(format!("l{l2}")), &[]).unwrap();
            let s = t.train(&train, &val, |_| {}).unwrap();
            let d = &s.val_diag;
            println!(
                "{l2},{:.4},{:.4},{:.4},{:.4},{:.4}",
                s.val_ce, s.val_ratio, d.entropy, d.logit_gap, d.flip_rate
            );
        }
    }
}
