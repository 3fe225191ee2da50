//! The input-validation catalogue: each bad input to a real binary exits non-zero, without a panic,
//! with a message naming the flag / key / file / tensor, and before anything heavy runs (every model
//! here is the tiny test model or none at all, so the whole catalogue takes seconds).
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn bin(name: &str) -> &'static str {
    match name {
        "eval" => env!("CARGO_BIN_EXE_eval"),
        "train" => env!("CARGO_BIN_EXE_train"),
        "quant-ppl" => env!("CARGO_BIN_EXE_quant-ppl"),
        "convert-gguf" => env!("CARGO_BIN_EXE_convert-gguf"),
        "speed" => env!("CARGO_BIN_EXE_speed"),
        "router-analysis" => env!("CARGO_BIN_EXE_router-analysis"),
        "main-table" => env!("CARGO_BIN_EXE_main-table"),
        "quickstart" => env!("CARGO_BIN_EXE_quickstart"),
        "ablation" => env!("CARGO_BIN_EXE_ablation"),
        "matched-compute" => env!("CARGO_BIN_EXE_matched-compute"),
        "sweep-theta" => env!("CARGO_BIN_EXE_sweep-theta"),
        "sweep-lambda2" => env!("CARGO_BIN_EXE_sweep-lambda2"),
        other => panic!("no binary {other}"),
    }
}

const ALL: [&str; 12] = [
    "eval",
    "train",
    "quant-ppl",
    "convert-gguf",
    "speed",
    "router-analysis",
    "main-table",
    "quickstart",
    "ablation",
    "matched-compute",
    "sweep-theta",
    "sweep-lambda2",
];

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        common::tiny_model_dir(&root.join("tiny"));
        common::training_jsonl(&root.join("train.jsonl"), 40);
        std::fs::write(root.join("empty.jsonl"), "").unwrap();
        // Model directories that are wrong in one way each.
        let variant = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
            let d = root.join(name);
            common::tiny_model_dir(&d);
            let p = d.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            edit(&mut v);
            std::fs::write(&p, v.to_string()).unwrap();
        };
        variant("bad-type", &|v| v["rms_norm_eps"] = "tiny".into());
        variant("gpt2", &|v| v["model_type"] = "gpt2".into());
        variant("no-tok", &|_| {});
        std::fs::remove_file(root.join("no-tok/tokenizer.json")).unwrap();
        let exp = |name: &str, body: &str| {
            std::fs::write(root.join(name), format!("description = \"x\"\n{body}")).unwrap();
        };
        exp(
            "limit-type.toml",
            "[[variants]]\nname = \"a\"\n[variants.eval]\nlimit = \"all\"\n",
        );
        exp("desc.toml", "");
        std::fs::write(
            root.join("desc-type.toml"),
            "description = 3\n[[variants]]\nname = \"a\"\n",
        )
        .unwrap();
        exp(
            "bits5.toml",
            "[[variants]]\nname = \"a\"\nquant = { method = \"rtn\", bits = 5 }\n",
        );
        exp(
            "steps-type.toml",
            "[[variants]]\nname = \"a\"\n[variants.train]\npreset = \"dllm\"\nconfig = { steps = \"many\" }\n",
        );
        exp(
            "lora-type.toml",
            "[[variants]]\nname = \"a\"\n[variants.train]\npreset = \"dllm\"\nconfig = { lora = { rank = -1 } }\n",
        );
        std::fs::write(root.join("steps-type.json"), r#"{"steps": "many"}"#).unwrap();
        std::fs::write(root.join("lora-type.json"), r#"{"lora": {"rank": "x"}}"#).unwrap();
        std::fs::write(root.join("list.json"), "[1, 2]").unwrap();
        // A run directory that already holds a checkpoint (its content is never read).
        std::fs::create_dir_all(root.join("has-ck")).unwrap();
        std::fs::write(root.join("has-ck/checkpoint.safetensors"), b"x").unwrap();
        Fixture { _tmp: tmp, root }
    }
    fn p(&self, rel: &str) -> String {
        self.root.join(rel).to_str().unwrap().to_string()
    }
}

/// Run `binary args`; it must fail without a panic, and stderr must contain every needle.
fn refused(binary: &str, args: &[String], needles: &[&str]) -> String {
    let t0 = Instant::now();
    let o = Command::new(bin(binary))
        .args(args)
        .env("QTALE_HOME", "/nonexistent-qtale-home")
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let shown = format!("{binary} {}", args.join(" "));
    assert!(!o.status.success(), "accepted: {shown}\n{err}");
    assert!(!err.contains("panicked"), "panicked: {shown}\n{err}");
    for n in needles {
        assert!(
            err.contains(n),
            "`{shown}`: the message does not name `{n}`:\n{err}"
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        secs < 30.0,
        "`{shown}` took {secs:.1}s: validation must come first"
    );
    eprintln!("{shown}\n  -> {}", err.trim().replace('\n', " | "));
    err
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn bad_inputs_are_named_errors_without_panics() {
    let f = Fixture::new();
    let tiny = f.p("tiny");
    let m = |extra: &[&str]| {
        let mut v = s(&["--model", &tiny]);
        v.extend(s(extra));
        v
    };
    // Panics before: chunk size 0, tch's unwrap on a thread count.
    refused("quant-ppl", &m(&["--calib", "4x0"]), &["--calib 4x0"]);
    refused("quant-ppl", &m(&["--eval", "0x512"]), &["--eval 0x512"]);
    refused(
        "quant-ppl",
        &m(&["--calib", "128by512"]),
        &["--calib 128by512"],
    );
    refused("eval", &m(&["--threads", "0"]), &["--threads"]);
    refused("eval", &m(&["--threads=-3"]), &["--threads"]);
    refused(
        "train",
        &m(&["--threads", "0", "--out", "x"]),
        &["--threads"],
    );
    // Silent success with NaN before.
    refused("eval", &m(&["--limit", "0"]), &["--limit"]);
    refused("eval", &m(&["--batch-size", "0"]), &["--batch-size"]);
    let empty = format!("piqa={}", f.p("empty.jsonl"));
    refused(
        "eval",
        &m(&["--tasks", "piqa", "--data-file", &empty]),
        &["piqa", "empty.jsonl"],
    );
    // Late validation before: all of these now fail before the model loads.
    refused("quant-ppl", &m(&["--bits", "5"]), &["--bits 5"]);
    refused("quant-ppl", &m(&["--bits", "4,7"]), &["--bits 7"]);
    refused(
        "quant-ppl",
        &m(&["--static-groups", "--group", "0"]),
        &["--group 0", "static_groups"],
    );
    refused(
        "quant-ppl",
        &m(&["--methods", "rtn,zip"]),
        &["--methods zip"],
    );
    refused(
        "quant-ppl",
        &m(&["--out", "results/quant-ppl.csv"]),
        &["--out results/quant-ppl.csv", "directory"],
    );
    let other = format!("arc_easy={}", f.p("empty.jsonl"));
    refused(
        "eval",
        &m(&["--tasks", "piqa", "--data-file", &other]),
        &["--data-file", "arc_easy", "not in --tasks"],
    );
    refused(
        "eval",
        &m(&["--data-file", "piqa"]),
        &["--data-file piqa", "TASK=PATH"],
    );
    refused("eval", &m(&["--ppl-window", "0"]), &["--ppl-window"]);
    refused("eval", &m(&["--ppl-window", "1"]), &["--ppl-window"]);
    refused(
        "eval",
        &m(&["--ppl-text", "/nonexistent/text.txt"]),
        &["--ppl-text", "/nonexistent/text.txt"],
    );
    refused("eval", &m(&["--tasks", "piqa,mmlu"]), &["mmlu"]);
    refused("eval", &m(&["--device", "gpu"]), &["--device gpu"]);
    refused("eval", &m(&["--dtype", "f16"]), &["--dtype f16"]);
    if !qtale_model::load::cpu_bf16_probe().fast {
        refused("eval", &m(&["--dtype", "bf16"]), &["--dtype bf16", "cuda"]);
    }
    // Experiment configs: every cell is checked when the grid is read; keys are named as paths.
    let cfg = |name: &str| s(&["--config", &f.p(name), "--model", &tiny, "--list"]);
    refused("main-table", &cfg("bits5.toml"), &["bit width 5", "quant"]);
    refused("main-table", &cfg("limit-type.toml"), &["eval.limit"]);
    refused("main-table", &cfg("desc-type.toml"), &["`description`"]);
    refused("main-table", &cfg("desc.toml"), &["variants"]);
    refused(
        "main-table",
        &cfg("steps-type.toml"),
        &["train.config", "steps"],
    );
    refused("main-table", &cfg("lora-type.toml"), &["lora.rank"]);
    refused(
        "main-table",
        &cfg("/nonexistent.toml"),
        &["/nonexistent.toml"],
    );
    let mut c = cfg("bits5.toml");
    c.truncate(4);
    c.extend(s(&["--cell", "0", "--limit", "0"]));
    refused("main-table", &c, &["--limit"]);
    refused("main-table", &s(&["--steps", "0", "--list"]), &["--steps"]);
    // Binaries that measure side by side have no cell selection to advertise.
    refused("speed", &s(&["--cell", "0"]), &["--cell"]);
    refused("speed", &s(&["--merge"]), &["--merge"]);
    refused("router-analysis", &s(&["--limit", "3"]), &["--limit"]);
    refused("speed", &s(&["--reps", "0"]), &["--reps"]);
    refused("router-analysis", &s(&["--bins", "0"]), &["--bins"]);
    // Model directories: a wrong type names its key; other architectures and a missing tokenizer.
    let data = f.p("train.jsonl");
    let out = f.p("run");
    let tr = |model: &str, extra: &[&str]| {
        let mut v = s(&["--model", model, "--train-data", &data, "--out", &out]);
        v.extend(s(extra));
        v
    };
    refused(
        "train",
        &tr(&f.p("bad-type"), &[]),
        &["rms_norm_eps", "config.json"],
    );
    refused("train", &tr(&f.p("gpt2"), &[]), &["model_type", "gpt2"]);
    refused("train", &tr(&f.p("no-tok"), &[]), &["tokenizer.json"]);
    refused(
        "train",
        &tr("/nonexistent/model-dir", &[]),
        &["/nonexistent/model-dir"],
    );
    // Training: config keys by path, the data, resume without a checkpoint, a second fresh run.
    refused(
        "train",
        &tr(&tiny, &["--train-config", &f.p("steps-type.json")]),
        &["--train-config", "`steps`"],
    );
    refused(
        "train",
        &tr(&tiny, &["--train-config", &f.p("lora-type.json")]),
        &["lora.rank"],
    );
    refused(
        "train",
        &tr(&tiny, &["--train-config", &f.p("list.json")]),
        &["--train-config", "JSON object"],
    );
    refused(
        "train",
        &tr(&tiny, &["--train-config", "/nonexistent/cfg.json"]),
        &["--train-config /nonexistent/cfg.json"],
    );
    refused(
        "train",
        &s(&[
            "--model",
            &tiny,
            "--train-data",
            "/nonexistent/d.jsonl",
            "--out",
            &out,
        ]),
        &["--train-data /nonexistent/d.jsonl"],
    );
    refused(
        "train",
        &tr(&tiny, &["--resume"]),
        &["--resume", "checkpoint.safetensors"],
    );
    refused(
        "train",
        &s(&[
            "--model",
            &tiny,
            "--train-data",
            &data,
            "--out",
            &f.p("has-ck"),
        ]),
        &["already holds a checkpoint", "--resume"],
    );
    refused("train", &tr(&tiny, &["--holdout", "0.7"]), &["holdout"]);
    refused(
        "train",
        &tr(&tiny, &["--max-sequences", "1"]),
        &["max_sequences"],
    );
    refused("train", &tr(&tiny, &["--seq-len", "1"]), &["seq_len"]);
    refused("train", &tr(&tiny, &["--steps", "0"]), &["--steps"]);
    refused(
        "train",
        &tr(&tiny, &["--preset", "fast"]),
        &["preset", "fast"],
    );
    refused(
        "train",
        &tr(&tiny, &["--router", "oracle"]),
        &["router.kind", "oracle"],
    );
    refused("train", &tr(&tiny, &["--ratio-target", "1.5"]), &["target"]);
    refused("train", &tr(&tiny, &["--config", "x.json"]), &["--config"]);
    refused("train", &tr(&tiny, &["--data", "x.jsonl"]), &["--data"]);
    // convert-gguf takes --model like every binary.
    refused(
        "convert-gguf",
        &s(&["--model", "/nonexistent/m.gguf", "--out", &f.p("hf")]),
        &["--model /nonexistent/m.gguf"],
    );
}

/// Every binary answers `--version` with the crate version, and `--help` documents every flag.
#[test]
fn every_binary_has_version_and_documented_flags() {
    for b in ALL {
        let o = Command::new(bin(b)).arg("--version").output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{b} --version");
        assert!(out.contains(env!("CARGO_PKG_VERSION")), "{b}: {out}");
        let o = Command::new(bin(b)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{b} --help");
        // A flag line has its description after two spaces, or (long help) on the next lines.
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            if t.starts_with('-') && !t.contains("  ") {
                let next = lines.get(i + 1).map_or("", |l| l.trim());
                assert!(
                    !next.is_empty() && !next.starts_with('-'),
                    "{b}: flag without a description: `{t}`\n{help}"
                );
            }
        }
    }
}
