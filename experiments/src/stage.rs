//! Stages and cells computed exactly once across processes (Slurm array tasks sharing a cache).
//!
//! Each stage directory `D` has a lock file `D.lock`; a process takes the exclusive advisory lock
//! (`flock`, released by the kernel when the process dies, so a killed job never leaves a stale lock)
//! for the whole check-compute-publish sequence. Whoever gets it first computes; the others wait, then
//! find the finished marker and read the result. Files are published by writing a uniquely named
//! temporary file and renaming it over the target, so a reader never sees a partial file.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

/// An exclusive lock on a stage or cell, held until dropped.
pub struct StageLock {
    file: File,
    path: PathBuf,
}

impl StageLock {
    /// Lock `target` (a stage directory or a cell file) through `target.lock`, waiting for another
    /// process that holds it (saying so on stderr, also when `quiet`: a job log should show why a
    /// task sat idle; `quiet` only drops the message when the wait is over).
    pub fn acquire(target: &Path, quiet: bool) -> Result<Self> {
        let path = lock_path(target);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!(
                    "waiting for another process working on {} (lock {})",
                    target.display(),
                    path.display()
                );
                let t = Instant::now();
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
                if !quiet {
                    eprintln!(
                        "got {} after {:.1}s",
                        path.display(),
                        t.elapsed().as_secs_f64()
                    );
                }
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        Ok(StageLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StageLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

fn lock_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// A temporary name next to `path`, unique to this process and call.
pub fn unique_tmp(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Write `v` as pretty JSON to `path` atomically (unique temporary file, then rename).
pub fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = unique_tmp(path);
    std::fs::write(&tmp, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
