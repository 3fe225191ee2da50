//! Batch-1 throughput of the native decoder on SmolLM2-135M, in llama-bench's terms, for each weight
//! format and thread count, in one run:
//! * `pp<P>`: prefill of a P-token prompt (tch, one batched forward; logits of the last position);
//! * `tg<N>`: N greedy tokens from an empty context (llama-bench's `-n N`);
//! * `tg<N>@d<P>`: N greedy tokens after the P-token prompt (llama-bench's `-n N -d P`);
//! * with `--tch-decode`, the tch decode loop at depth P for comparison.
//!
//! ```sh
//! cargo run --release -p qtale-model --example native_speed -- --threads 1,2 --variants f32,int4g32,int4g64
//! ```
//! Flags: `--threads LIST` (default 1,2), `--prompt P` (512), `--decode N` (128), `--reps R` (3, the
//! median is printed), `--variants LIST` out of `f32`, `int4g32`, `int4g64`, `int4g128` (RTN, asymmetric),
//! `--head auto|f32|q8|q8i8` (`q8i8`: int8 activations too), `--kv f32|f16`, `--tch-decode`, `--json PATH`,
//! `--model PATH.gguf` (default: the SmolLM2 asset).
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qtale_model::native::{HeadFormat, KvDtype, NativeDecoder, NativeOptions};
use qtale_model::ptq::{quantize_model, PtqOptions};
use qtale_model::{load_model, KvCache, Llama, ModelSource};
use qtale_quant::rtn::Rtn;
use qtale_quant::QuantConfig;
use tch::{Device, Kind, Tensor};

struct Args {
    threads: Vec<usize>,
    prompt: usize,
    decode: usize,
    reps: usize,
    variants: Vec<String>,
    head: HeadFormat,
    kv: KvDtype,
    tch_decode: bool,
    json: Option<String>,
    model: Option<String>,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        threads: vec![1, 2],
        prompt: 512,
        decode: 128,
        reps: 3,
        variants: vec!["f32".into(), "int4g32".into(), "int4g64".into()],
        head: HeadFormat::Auto,
        kv: KvDtype::F32,
        tch_decode: false,
        json: None,
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(f) = it.next() {
        let mut val = || it.next().with_context(|| format!("{f} needs a value"));
        match f.as_str() {
            "--threads" => {
                a.threads = val()?
                    .split(',')
                    .map(|s| s.parse().with_context(|| format!("--threads: {s:?}")))
                    .collect::<Result<_>>()?
            }
            "--prompt" => a.prompt = val()?.parse().context("--prompt")?,
            "--decode" => a.decode = val()?.parse().context("--decode")?,
            "--reps" => a.reps = val()?.parse().context("--reps")?,
            "--variants" => a.variants = val()?.split(',').map(String::from).collect(),
            "--head" => {
                a.head = match val()?.as_str() {
                    "auto" => HeadFormat::Auto,
                    "f32" => HeadFormat::F32,
                    "q8" => HeadFormat::Q8 { int8_acts: false },
                    "q8i8" => HeadFormat::Q8 { int8_acts: true },
                    h => bail!("--head {h:?}: auto, f32, q8 or q8i8"),
                }
            }
            "--kv" => {
                a.kv = match val()?.as_str() {
                    "f32" => KvDtype::F32,
                    "f16" => KvDtype::F16,
                    k => bail!("--kv {k:?}: f32 or f16"),
                }
            }
            "--tch-decode" => a.tch_decode = true,
            "--json" => a.json = Some(val()?),
            "--model" => a.model = Some(val()?),
            _ => bail!("unknown flag {f:?} (see the doc comment of examples/native_speed.rs)"),
        }
    }
    if a.prompt < 1 || a.decode < 1 || a.reps < 1 || a.threads.contains(&0) {
        bail!("--prompt, --decode, --reps and --threads must be positive");
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn build(src: &ModelSource, variant: &str) -> Result<Llama> {
    let mut m = load_model(src, Device::Cpu, Kind::Float)?.model;
    if let Some(g) = variant.strip_prefix("int4g") {
        let group: usize = g.parse().with_context(|| format!("variant {variant:?}"))?;
        let cfg = QuantConfig::new(4, group)?;
        quantize_model(&mut m, &[], &Rtn, &cfg, &PtqOptions::default())?;
    } else if variant != "f32" {
        bail!("unknown variant {variant:?} (f32, int4g32, int4g64, int4g128)");
    }
    Ok(m)
}

fn main() -> Result<()> {
    let a = parse()?;
    let path = a
        .model
        .clone()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(qtale_model::load::default_gguf_path);
    if !path.is_file() {
        bail!(
            "{} not found (run scripts/setup.sh or pass --model)",
            path.display()
        );
    }
    let src = ModelSource::Gguf(path);
    let prompt: Vec<i64> = (0..a.prompt as i64)
        .map(|i| 1000 + (i * 7919) % 40000)
        .collect();
    let _g = tch::no_grad_guard();
    println!(
        "native_speed: SmolLM2, pp{} / tg{} / tg{}@d{}, median of {} reps; load average {}",
        a.prompt,
        a.decode,
        a.decode,
        a.prompt,
        a.reps,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut rows = Vec::new();
    for v in &a.variants {
        let model = build(&src, v)?;
        for &t in &a.threads {
            tch::set_num_threads(t as i32);
            let dec = NativeDecoder::from_llama(
                &model,
                &NativeOptions {
                    threads: t,
                    head: a.head,
                    kv_dtype: a.kv,
                    ..Default::default()
                },
            )?;
            let mut st = dec.new_state(a.prompt + a.decode + 1)?;
            let (mut pp, mut tg, mut tgd, mut tch_tg) = (vec![], vec![], vec![], vec![]);
            // warm-up
            dec.generate_greedy(
                &prompt[..16],
                4,
                None,
                qtale_model::native::Prefill::Native,
                &mut st,
            )?;
            for _ in 0..a.reps {
                // prefill in tch, hand-over included
                let t0 = Instant::now();
                let mut next = dec.prefill_tch(&model, &prompt, &mut st)?;
                pp.push(a.prompt as f64 / t0.elapsed().as_secs_f64());
                let t1 = Instant::now();
                for _ in 0..a.decode {
                    next = dec.forward_token(next, &mut st)? as i64;
                }
                tgd.push(a.decode as f64 / t1.elapsed().as_secs_f64());
                // from an empty context
                st.reset();
                let t2 = Instant::now();
                let mut next = prompt[0];
                for _ in 0..a.decode {
                    next = dec.forward_token(next, &mut st)? as i64;
                }
                tg.push(a.decode as f64 / t2.elapsed().as_secs_f64());
                if a.tch_decode {
                    let mut cache = KvCache::new(model.layers.len());
                    let ids = Tensor::from_slice(&prompt).view([1, -1]);
                    let h = model.forward_hidden_cached(&ids, None, &mut cache)?;
                    let mut nx = model
                        .lm_logits(&h.select(1, -1))
                        .argmax(-1, false)
                        .int64_value(&[0]);
                    let t3 = Instant::now();
                    for _ in 0..a.decode {
                        let o = model.forward_cached(
                            &Tensor::from_slice(&[nx]).view([1, 1]),
                            None,
                            &mut cache,
                        )?;
                        nx = o.logits.view([-1]).argmax(0, false).int64_value(&[]);
                    }
                    tch_tg.push(a.decode as f64 / t3.elapsed().as_secs_f64());
                }
            }
            let (pp, tg, tgd) = (median(pp), median(tg), median(tgd));
            let tch = (!tch_tg.is_empty()).then(|| median(tch_tg));
            println!(
                "{v:<9} t{t}  pp{} {pp:8.1} tok/s  tg{} {tg:7.1} tok/s  tg{}@d{} {tgd:7.1} tok/s{}  [{:.1} MB; {}]",
                a.prompt,
                a.decode,
                a.decode,
                a.prompt,
                tch.map(|x| format!("  tch tg@d {x:6.1}")).unwrap_or_default(),
                dec.weight_bytes() as f64 / 1e6,
                dec.describe()
            );
            rows.push(serde_json::json!({
                "variant": v, "threads": t, "pp_tok_s": pp, "tg_tok_s": tg, "tg_depth_tok_s": tgd,
                "tch_tg_depth_tok_s": tch, "weight_bytes": dec.weight_bytes(), "formats": dec.describe(),
            }));
        }
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({
            "prompt": a.prompt, "decode": a.decode, "reps": a.reps,
            "loadavg_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "rows": rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {p}"))?;
    }
    Ok(())
}
