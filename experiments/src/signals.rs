//! SIGTERM / SIGINT during training: a Slurm time limit (SIGTERM, then SIGKILL after the grace period)
//! or Ctrl-C must not lose the run. Binaries call [`install`] once; while a training loop runs
//! ([`TrainingGuard`]) the first signal sets the stop flag the trainer checks after each step (it then
//! writes a checkpoint and returns), a second one exits at once. Outside training a signal exits at once
//! with the usual status `128 + signal`, as without a handler. The training crate installs nothing.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static TRAINING: AtomicBool = AtomicBool::new(false);

/// The process-wide stop flag handed to trainers.
pub fn stop_flag() -> Arc<AtomicBool> {
    STOP.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// Whether a signal asked the process to stop (a grid then runs no further cells).
pub fn stop_requested() -> bool {
    STOP.get().is_some_and(|s| s.load(Ordering::SeqCst))
}

/// Register the handlers (idempotent per process is not needed: call once from `main`).
pub fn install() -> Result<()> {
    for sig in [SIGTERM, SIGINT] {
        let stop = stop_flag();
        // SAFETY: the action only touches atomics and calls `_exit` (signal_hook::low_level::exit),
        // all async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                if TRAINING.load(Ordering::SeqCst) && !stop.swap(true, Ordering::SeqCst) {
                    return;
                }
                signal_hook::low_level::exit(128 + sig);
            })
        }
        .with_context(|| format!("installing the handler of signal {sig}"))?;
    }
    Ok(())
}

/// Marks a training loop as running (signals then ask it to stop) until dropped.
pub struct TrainingGuard(());

impl TrainingGuard {
    pub fn enter() -> Self {
        TRAINING.store(true, Ordering::SeqCst);
        TrainingGuard(())
    }
}

impl Drop for TrainingGuard {
    fn drop(&mut self) {
        TRAINING.store(false, Ordering::SeqCst);
    }
}
