//! The committed experiment configs parse, expand to valid cells, and bad configs are named errors.
use std::collections::HashMap;
use std::path::PathBuf;

mod common;

use clap::Parser;
use experiments::cell::key_of;
use experiments::grid::{run_grid, substitute, to_cell, ExperimentFile, GridArgs};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    grid: GridArgs,
}

fn args(extra: &[&str]) -> GridArgs {
    let mut v = vec!["x"];
    v.extend_from_slice(extra);
    Cli::parse_from(v).grid
}

fn configs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs")
}

fn cells(name: &str, a: &GridArgs) -> Vec<experiments::cell::CellConfig> {
    let f = ExperimentFile::read(&configs().join(name)).unwrap();
    let vars = HashMap::from([("reference_ratio".to_string(), Value::from(0.62))]);
    f.expand()
        .unwrap()
        .into_iter()
        .map(|mut v| {
            substitute(&mut v, &vars).unwrap();
            to_cell(v, a).unwrap_or_else(|e| panic!("{name}: {e:#}"))
        })
        .collect()
}

#[test]
fn every_committed_config_expands_to_valid_cells() {
    let a = args(&[]);
    let mut n = 0;
    for e in std::fs::read_dir(configs()).unwrap() {
        let p = e.unwrap().path();
        let cs = cells(p.file_name().unwrap().to_str().unwrap(), &a);
        assert!(!cs.is_empty(), "{}", p.display());
        let names: std::collections::HashSet<&str> = cs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names.len(),
            cs.len(),
            "{}: duplicate cell names",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 8, "expected the 8 experiment configs, found {n}");
}

#[test]
fn main_table_is_three_variants_by_nine_quantizers() {
    let cs = cells("main-table.toml", &args(&[]));
    assert_eq!(cs.len(), 27);
    assert_eq!(cs[0].name, "dense/fp");
    assert!(cs[0].quant.is_none() && cs[0].train.is_none());
    let q = cs.iter().find(|c| c.name == "qtale/gptq-w3").unwrap();
    assert_eq!(q.quant.as_ref().unwrap().bits, 3);
    assert_eq!(q.train.as_ref().unwrap().preset, "qtale");
    // The quickstart's training equals main-table's except `steps`, so `--steps 40` shares routers.
    let qs = cells("quickstart.toml", &args(&[]));
    let short = cells("main-table.toml", &args(&["--steps", "40"]));
    let a = qs
        .iter()
        .find(|c| c.name == "qtale-quant")
        .unwrap()
        .train
        .clone();
    let b = short
        .iter()
        .find(|c| c.name == "qtale/rtn-w4")
        .unwrap()
        .train
        .clone();
    assert_eq!(a, b);
}

/// The router-baseline ablation trains one of each registered built-in router kind under the same
/// recipe, and its D-LLM and reference cells are the ablation's at `--steps 40 --limit 40` (shared
/// cells and stages).
#[test]
fn router_ablation_compares_the_registered_kinds() {
    let cs = cells("ablation-routers.toml", &args(&[]));
    let kinds: Vec<String> = cs
        .iter()
        .filter_map(|c| Some(c.train.as_ref()?.resolve().unwrap().router.kind))
        .collect();
    assert_eq!(kinds, ["dllm", "static", "random", "dense"]);
    for k in &kinds {
        assert!(qtale_router::kinds::kinds().contains(k), "{k}");
    }
    assert!(cs.iter().all(|c| c.eval.limit == Some(40)));
    let ablation = cells("ablation.toml", &args(&["--steps", "40", "--limit", "40"]));
    let key = |cs: &[experiments::cell::CellConfig], name: &str| {
        let mut c = cs.iter().find(|c| c.name == name).unwrap().clone();
        c.name.clear();
        key_of(&c)
    };
    assert_eq!(key(&cs, "dense-quant"), key(&ablation, "dense-quant"));
    assert_eq!(
        key(&cs, "router-dllm"),
        key(&ablation, "no-entropy/theta-0.5")
    );
}

/// `--list` of every committed config runs (cell keys and stage directories, nothing computed) on a
/// tiny model, so no set-up assets are needed.
#[test]
fn every_committed_config_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model_dir(&model);
    let p = |x: &std::path::Path| x.to_str().unwrap().to_string();
    for e in std::fs::read_dir(configs()).unwrap() {
        let cfg = e.unwrap().path();
        let a = args(&[
            "--config",
            &p(&cfg),
            "--model",
            &p(&model),
            "--out",
            &p(&tmp.path().join("out")),
            "--cache",
            &p(&tmp.path().join("cache")),
            "--list",
        ]);
        let (_, file, results) =
            run_grid(&a, "list", None).unwrap_or_else(|e| panic!("{}: {e:#}", cfg.display()));
        assert!(!file.variants.is_empty());
        assert!(results.is_empty(), "--list computes nothing");
    }
}

#[test]
fn overrides_reach_every_cell_and_change_the_key() {
    let base = cells("sweep-theta.toml", &args(&[]));
    let lim = cells("sweep-theta.toml", &args(&["--limit", "7", "--steps", "3"]));
    assert_eq!(base.len(), 2 * 2 * 7);
    for (a, b) in base.iter().zip(&lim) {
        assert_eq!(b.eval.limit, Some(7));
        assert_eq!(b.train.as_ref().unwrap().config["steps"], 3);
        assert_ne!(key_of(a), key_of(b));
    }
    let thetas: Vec<f64> = base
        .iter()
        .take(7)
        .map(|c| match c.theta.as_ref().unwrap() {
            qtale_router::ThetaRule::Fixed { theta } => *theta,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(thetas, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
}

fn write(dir: &std::path::Path, text: &str) -> PathBuf {
    let p = dir.join("bad.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn first_cell_error(text: &str) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), text);
    let f = match ExperimentFile::read(&p) {
        Ok(f) => f,
        Err(e) => return format!("{e:#}"),
    };
    let v = match f.expand() {
        Ok(v) => v,
        Err(e) => return format!("{e:#}"),
    };
    match to_cell(v[0].clone(), &args(&[])) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => format!("{e:#}"),
    }
}

/// MagR and the pruning methods are selected by name, with their options, like any quantizer.
#[test]
fn magr_and_pruning_are_selectable_in_configs() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "description = \"x\"\n\
         [[variants]]\nname = \"magr\"\n\
         quant = { method = \"magr\", bits = 3, group_size = 64, options = { then = \"gptq\", alpha = 0.0001, iters = 150 } }\n\
         [[variants]]\nname = \"wanda\"\n\
         quant = { method = \"wanda\", bits = 4, group_size = 64, options = { nm = \"2:4\", then = \"rtn\" } }\n\
         [[variants]]\nname = \"magnitude\"\n\
         quant = { method = \"magnitude\", bits = 4, options = { sparsity = 0.5 } }\n",
    );
    let f = ExperimentFile::read(&p).unwrap();
    let cs: Vec<_> = f
        .expand()
        .unwrap()
        .into_iter()
        .map(|v| to_cell(v, &args(&[])).unwrap())
        .collect();
    let q: Vec<(String, Value)> = cs
        .iter()
        .map(|c| {
            let q = c.quant.as_ref().unwrap();
            (q.method.clone(), q.options.clone())
        })
        .collect();
    assert_eq!(q[0].0, "magr");
    assert_eq!(q[0].1["then"], "gptq");
    assert_eq!(q[1].1["nm"], "2:4");
    assert_eq!(q[2].0, "magnitude");
    for c in &cs {
        let m = c.quant.as_ref().unwrap();
        assert_eq!(
            qtale_quant::quantizer(&m.method, &m.options)
                .unwrap()
                .name(),
            m.method
        );
    }
}

#[test]
fn bad_configs_are_named_errors() {
    let cases = [
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.eval]\nlimt = 3\n", "limt"),
        ("description = \"x\"\nvariant = []\n", "variant"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\nquant = { method = \"rtn\", bits = 5 }\n", "bit width 5"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\nquant = { method = \"zip\", bits = 4 }\n", "zip"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\nquant = { method = \"magr\", bits = 3, options = { alpha = -1.0 } }\n", "`alpha`"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\nquant = { method = \"magr\", bits = 3, options = { then = \"zip\" } }\n", "zip"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\nquant = { method = \"wanda\", bits = 4, options = { nm = \"4:2\" } }\n", "`nm`"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\nquant = { method = \"magnitude\", bits = 4, options = { sparsity = 1.5 } }\n", "`sparsity`"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\ntheta = { rule = \"fixed\", theta = 0.5 }\n", "routed"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.train]\npreset = \"dllm\"\nconfig = { lambda_entropi = 1.0 }\n", "lambda_entropi"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.train]\npreset = \"fast\"\n", "fast"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.train]\npreset = \"dllm\"\n[variants.theta]\nrule = \"fixed\"\ntheta = 1.5\n", "1.5"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.eval]\ntasks = \"piqa,mmlu\"\n", "mmlu"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.eval]\nbatch_size = 0\n", "batch_size"),
        ("description = \"x\"\n[[variants]]\nname = \"a\"\n[variants.train]\npreset = \"dllm\"\nconfig = { steps = 0 }\n", "steps"),
    ];
    for (text, needle) in cases {
        let e = first_cell_error(text);
        assert!(
            e.contains(needle),
            "error for `{needle}` does not name it: {e}"
        );
    }
}

/// Every shipped config checkpoints within its runs (`checkpoint_every <= steps`), also under the
/// quickstart-sized `--steps 40` override, so an interrupted run always has a checkpoint to resume.
#[test]
fn every_shipped_config_checkpoints_within_its_runs() {
    for overrides in [&[][..], &["--steps", "40"][..]] {
        let a = args(overrides);
        for e in std::fs::read_dir(configs()).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            for c in cells(&name, &a) {
                let Some(t) = &c.train else { continue };
                let cfg = t.resolve().unwrap();
                assert!(
                    cfg.checkpoint_every <= cfg.steps,
                    "{name} {overrides:?}: cell `{}` has checkpoint_every {} > steps {}",
                    c.name,
                    cfg.checkpoint_every,
                    cfg.steps
                );
            }
        }
    }
}
