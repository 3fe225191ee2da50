//! Two processes racing on one stage (as two Slurm array tasks sharing a cache): the stage is computed
//! once, the second process waits for it and reuses it, and both succeed.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use experiments::stage::{write_json_atomic, StageLock};

/// The check-compute-publish sequence of a stage, as `cell.rs` runs it: lock, reuse when finished,
/// else compute (slowly, so the other process surely arrives while it runs) and publish.
fn stage(dir: &Path, log: &Path) -> String {
    let _lock = StageLock::acquire(dir, false).unwrap();
    let done = dir.join("done.json");
    if done.is_file() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&done).unwrap()).unwrap();
        return format!("reused {}", v["by"]);
    }
    std::fs::create_dir_all(dir).unwrap();
    // Count computations in a file both processes append to.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    writeln!(f, "computed by {}", std::process::id()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    write_json_atomic(&done, &serde_json::json!({"by": std::process::id()})).unwrap();
    "computed".into()
}

/// The child side: runs only when the parent test starts this binary with the variables set.
#[test]
fn stage_lock_child() {
    let (Ok(dir), Ok(log)) = (
        std::env::var("QTALE_STAGE_TEST_DIR"),
        std::env::var("QTALE_STAGE_TEST_LOG"),
    ) else {
        return;
    };
    println!("RESULT {}", stage(Path::new(&dir), Path::new(&log)));
}

#[test]
fn two_processes_racing_on_one_stage_compute_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache/train/abc123");
    let log = tmp.path().join("computations.log");
    let spawn = || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "stage_lock_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QTALE_STAGE_TEST_DIR", &dir)
            .env("QTALE_STAGE_TEST_LOG", &log)
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        std::thread::sleep(Duration::from_millis(200));
        let b = s.spawn(spawn);
        (a.join().unwrap(), b.join().unwrap())
    });
    let res: Vec<String> = [&a, &b]
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let out = String::from_utf8_lossy(&o.stdout);
            out.lines()
                .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.trim()))
                .unwrap_or_else(|| panic!("no result in {out}"))
                .to_string()
        })
        .collect();
    let computed = std::fs::read_to_string(&log).unwrap();
    assert_eq!(computed.lines().count(), 1, "{computed}");
    assert_eq!(
        res.iter().filter(|r| *r == "computed").count(),
        1,
        "{res:?}"
    );
    assert!(res.iter().any(|r| r.starts_with("reused")), "{res:?}");
    // The waiting process said so.
    let waited = [&a, &b]
        .iter()
        .any(|o| String::from_utf8_lossy(&o.stderr).contains("waiting for another process"));
    assert!(waited);
    // No temporary file is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["done.json".to_string()], "{left:?}");
}
