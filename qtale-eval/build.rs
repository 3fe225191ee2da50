//! Build-time facts for results' provenance: the git revision and dirty flag of the sources this
//! build compiled, the rustc version, and the tch version locked in Cargo.lock. Re-run whenever a
//! workspace source or git's HEAD/index changes, so a rebuilt binary never carries a stale revision.
use std::path::Path;
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for p in [".git/HEAD", ".git/index", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // Every workspace crate's sources (cargo scans a directory recursively).
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let p = e.path();
            if p.join("Cargo.toml").is_file() && p.join("src").is_dir() {
                println!("cargo:rerun-if-changed={}", p.join("src").display());
            }
        }
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .map(|s| if s.is_empty() { "false" } else { "true" })
        .unwrap_or("");
    println!("cargo:rustc-env=QTALE_GIT_REV={rev}");
    println!("cargo:rustc-env=QTALE_GIT_DIRTY={dirty}");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rv = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=QTALE_RUSTC_VERSION={rv}");
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let tch = lock
        .split("[[package]]")
        .find(|b| b.contains("\nname = \"tch\"\n"))
        .and_then(|b| b.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=QTALE_TCH_VERSION={tch}");
}
