//! SIGTERM (a Slurm time limit) loses nothing: the real `train` binary, signalled mid-run, finishes the
//! step, writes a checkpoint and exits non-zero naming it and `--resume`; the resumed run ends with the
//! parameters of an uninterrupted run, bit for bit (1 thread: the trainer is deterministic), and its log
//! holds every step once.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

const STEPS: usize = 400;

fn train(model: &Path, data: &Path, cfg: &Path, out: &Path) -> Command {
    train_with(model, data, cfg, out, &[])
}

/// The run's command line with `overrides` (flag, value) replacing the defaults.
fn train_with(
    model: &Path,
    data: &Path,
    cfg: &Path,
    out: &Path,
    overrides: &[(&str, &str)],
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec![
        "--model".into(),
        s(model),
        "--train-data".into(),
        s(data),
        "--train-config".into(),
        s(cfg),
        "--out".into(),
        s(out),
        "--threads".into(),
        "1".into(),
        "--steps".into(),
        STEPS.to_string(),
        "--seq-len".into(),
        "32".into(),
        "--batch-size".into(),
        "2".into(),
        "--holdout".into(),
        "0.1".into(),
    ];
    for (flag, value) in overrides {
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = value.to_string(),
            None => args.extend([flag.to_string(), value.to_string()]),
        }
    }
    c.args(args);
    c
}

fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for f in ["lora.safetensors", "router.safetensors"] {
        let mut t = Tensor::read_safetensors(dir.join(f)).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        v.extend(t.into_iter().map(|(n, x)| (format!("{f}:{n}"), x)));
    }
    v
}

fn last_logged_step(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("step").and_then(|s| s.as_u64()))
        .max()
        .unwrap_or(0) as usize
}

#[test]
fn sigterm_checkpoints_and_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model_dir(&model);
    let data = tmp.path().join("train.jsonl");
    common::training_jsonl(&data, 120);
    let cfg = tmp.path().join("cfg.json");
    // Validation only at the end; checkpoint_every beyond the run (clamped to STEPS / 2).
    std::fs::write(
        &cfg,
        r#"{"log_every": 1, "eval_every": 100000, "checkpoint_every": 100000, "routing": {"hidden": 16}}"#,
    )
    .unwrap();

    let full: PathBuf = tmp.path().join("full");
    let t0 = Instant::now();
    let o = train(&model, &data, &cfg, &full).output().unwrap();
    assert!(
        o.status.success(),
        "uninterrupted run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("uninterrupted run: {:.1}s", t0.elapsed().as_secs_f64());

    let cut = tmp.path().join("cut");
    let mut child = train(&model, &data, &cfg, &cut)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = cut.join("train_log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while last_logged_step(&log) < 10 {
        assert!(Instant::now() < deadline, "the run never reached step 10");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a stopped run must exit non-zero");
    assert!(!err.contains("panicked"), "{err}");
    let ck = cut.join("checkpoint.safetensors");
    assert!(
        err.contains(ck.to_str().unwrap()) && err.contains("--resume"),
        "the message names the checkpoint and how to resume: {err}"
    );
    let (_, meta) = qtale_train::checkpoint::load(&ck).unwrap();
    let at = meta["step"].as_u64().unwrap() as usize;
    assert!((10..STEPS).contains(&at), "stopped at step {at}");
    assert!(!cut.join("done.json").exists());

    // A resume that would not continue this run is refused, naming the field.
    for (over, needle) in [
        (
            ("--holdout", "0.2"),
            "data.holdout: 0.1 (checkpoint) vs 0.2 (now)",
        ),
        (("--steps", "500"), "steps: 400 (checkpoint) vs 500 (now)"),
        (("--seed", "3"), "seed: 0 (checkpoint) vs 3 (now)"),
    ] {
        let o = train_with(&model, &data, &cfg, &cut, &[over])
            .arg("--resume")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{over:?}: {err}"
        );
    }
    let o = train(&model, &data, &cfg, &cut)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "resumed run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (a, b) = (tensors(&full), tensors(&cut));
    assert_eq!(a.len(), b.len());
    for ((n, x), (m, y)) in a.iter().zip(&b) {
        assert_eq!(n, m);
        assert_eq!(
            (x - y).abs().max().double_value(&[]),
            0.0,
            "{n} differs after SIGTERM + --resume (stopped at step {at})"
        );
    }
    // Every step once, one resume marker; the outcome covers the whole run.
    let steps: Vec<u64> = qtale_train::trainer::read_log(&log)
        .unwrap()
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches(r#""event":"resume""#).count(), 1);
    let done: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("done.json")).unwrap()).unwrap();
    let tps = done["tokens_per_s"].as_f64().unwrap();
    assert!(tps.is_finite() && tps > 0.0, "{done}");
    assert_eq!(done["steps"], STEPS);

    // Resuming the finished run reports it (a finite throughput again), trains nothing.
    let o = train(&model, &data, &cfg, &cut)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("already finished"));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("done.json")).unwrap()).unwrap();
    assert_eq!(again["tokens_per_s"], done["tokens_per_s"]);
}
