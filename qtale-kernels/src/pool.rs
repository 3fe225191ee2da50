//! A persistent team of threads for the ops of one decode step: [`Pool::run`] hands one closure to every
//! thread (the caller is thread 0), and inside it the threads split each op's work with
//! [`Ctx::chunks`] and meet at [`Ctx::barrier`] between ops, as ggml's CPU graph executor does. A decoder
//! layer at batch 1 is about eight ops of 10-300 us each; a rayon fan-out per op (a wake-up and a join)
//! costs several microseconds, a spin barrier between running threads well under one.
//!
//! Waiting threads spin (with `spin_loop`), then yield, then (between jobs only) sleep on a condition
//! variable: spinning alone collapses when another process takes the core a waiting thread needs.
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Spins of a waiting thread before it starts yielding its time slice.
const SPINS_BEFORE_YIELD: u32 = 20_000;
/// How long an idle worker keeps polling for the next job before it sleeps.
const IDLE_POLL: Duration = Duration::from_micros(300);

type Job = dyn Fn(&Ctx) + Sync;

struct Shared {
    n: usize,
    /// Incremented by the caller for each job.
    epoch: AtomicUsize,
    /// The current job (valid while a job runs: `run` waits until every worker is done with it).
    job: UnsafeCell<Option<*const Job>>,
    /// Workers finished with the current job.
    done: AtomicUsize,
    /// Barrier: arrivals and generation.
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// The next unclaimed chunk of the current phase (reset when a barrier completes).
    next_chunk: AtomicUsize,
    sleepers: AtomicUsize,
    quit: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    /// A job panicked on a worker thread.
    poisoned: AtomicBool,
}

// SAFETY: `job` is written by the caller only while no worker reads it (before the epoch is published
// and after all workers reported done), and read by workers only between those points.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// What a thread of a job sees: its index, the team size, the barrier and the chunk counter.
pub struct Ctx<'a> {
    tid: usize,
    shared: &'a Shared,
}

impl Ctx<'_> {
    /// This thread's index, `0` for the caller of [`Pool::run`].
    pub fn tid(&self) -> usize {
        self.tid
    }

    /// Threads in the team.
    pub fn threads(&self) -> usize {
        self.shared.n
    }

    /// Wait until every thread of the team has arrived here. Also resets the chunk counter, so each
    /// phase of [`Ctx::chunks`] must be separated from the next by a barrier.
    pub fn barrier(&self) {
        let s = self.shared;
        if s.n == 1 {
            s.next_chunk.store(0, Ordering::Relaxed);
            return;
        }
        let gen = s.generation.load(Ordering::Acquire);
        if s.arrived.fetch_add(1, Ordering::AcqRel) + 1 == s.n {
            s.arrived.store(0, Ordering::Relaxed);
            s.next_chunk.store(0, Ordering::Relaxed);
            s.generation.fetch_add(1, Ordering::Release);
        } else {
            let mut spins = 0u32;
            while s.generation.load(Ordering::Acquire) == gen {
                if spins < SPINS_BEFORE_YIELD {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Claim chunks `0..n` of the current phase dynamically (each index goes to exactly one thread);
    /// a thread that finishes early takes more, so a core slowed by another process does less.
    pub fn chunks(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        let s = self.shared;
        std::iter::from_fn(move || {
            let i = s.next_chunk.fetch_add(1, Ordering::Relaxed);
            (i < n).then_some(i)
        })
    }
}

/// The team: `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Only one job at a time (a second caller waits).
    running: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.shared.n)
            .finish()
    }
}

impl Pool {
    /// A team of `threads` (at least 1) threads; `threads - 1` are spawned now and live until the pool
    /// is dropped.
    pub fn new(threads: usize) -> Self {
        let n = threads.max(1);
        let shared = Arc::new(Shared {
            n,
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            next_chunk: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            quit: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            poisoned: AtomicBool::new(false),
        });
        let workers = (1..n)
            .map(|tid| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("qtale-pool-{tid}"))
                    .spawn(move || worker(tid, &s))
                    .expect("spawn pool worker")
            })
            .collect();
        Pool {
            shared,
            workers,
            running: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.shared.n
    }

    /// Run `f` on every thread of the team (the caller as thread 0) and return when all are done.
    /// A panic in `f` on any thread is re-raised here.
    pub fn run<F: Fn(&Ctx) + Sync>(&self, f: F) {
        let s = &*self.shared;
        if s.n == 1 {
            s.next_chunk.store(0, Ordering::Relaxed);
            f(&Ctx { tid: 0, shared: s });
            return;
        }
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let job: *const (dyn Fn(&Ctx) + Sync + '_) = &f;
        // SAFETY: workers read `job` only after the epoch below is published and stop using it before
        // they increment `done`; we wait for all of them before `f` goes out of scope. The lifetime is
        // erased for storage only.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<
                *const (dyn Fn(&Ctx) + Sync + '_),
                *const Job,
            >(job));
        }
        s.done.store(0, Ordering::Relaxed);
        s.next_chunk.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(&Ctx { tid: 0, shared: s })
        }));
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < s.n - 1 {
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: all workers are done with the job.
        unsafe { *s.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.poisoned.swap(false, Ordering::AcqRel) {
            panic!("a pool worker panicked while running a job");
        }
    }
}

fn worker(tid: usize, s: &Shared) {
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: poll, then sleep.
        let t0 = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.quit.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins.is_multiple_of(256) && t0.elapsed() > IDLE_POLL {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen && !s.quit.load(Ordering::SeqCst) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
                spins = 0;
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: the caller published the job before the epoch and keeps it alive until `done`.
        let job = unsafe { (*s.job.get()).expect("job published with the epoch") };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: see above.
            unsafe { (*job)(&Ctx { tid, shared: s }) }
        }));
        if r.is_err() {
            s.poisoned.store(true, Ordering::Release);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A mutable slice shared by the threads of a job, each writing a disjoint part (the ops' outputs).
#[derive(Debug, Clone, Copy)]
pub struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: access goes through `range_mut`, whose contract makes concurrent writes disjoint.
unsafe impl<T: Send> Send for SharedSlice<T> {}
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    pub fn new(s: &mut [T]) -> Self {
        SharedSlice {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `a..b`.
    ///
    /// # Safety
    /// The underlying slice must outlive the use, and no other thread may read or write `a..b` while
    /// the returned slice is alive (threads of a job write disjoint ranges between barriers).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut(&self, a: usize, b: usize) -> &mut [T] {
        assert!(a <= b && b <= self.len, "range {a}..{b} of {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(a), b - a)
    }

    /// Elements `a..b`, read-only.
    ///
    /// # Safety
    /// As [`SharedSlice::range_mut`]: no thread may write `a..b` while the returned slice is alive.
    pub unsafe fn range(&self, a: usize, b: usize) -> &[T] {
        assert!(a <= b && b <= self.len, "range {a}..{b} of {}", self.len);
        std::slice::from_raw_parts(self.ptr.add(a), b - a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_each_index_once_across_phases() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            for rep in 0..50 {
                let counts: Vec<AtomicUsize> = (0..2 * 97).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|ctx| {
                    for i in ctx.chunks(97) {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    }
                    ctx.barrier();
                    for i in ctx.chunks(97) {
                        counts[97 + i].fetch_add(1 + rep % 2, Ordering::Relaxed);
                    }
                    ctx.barrier();
                });
                for (i, c) in counts.iter().enumerate() {
                    let want = if i < 97 { 1 } else { 1 + rep % 2 };
                    assert_eq!(
                        c.load(Ordering::Relaxed),
                        want,
                        "threads {threads}, index {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn barrier_orders_writes_and_sleeping_workers_wake() {
        let pool = Pool::new(2);
        let mut buf = vec![0usize; 64];
        for round in 0..20 {
            if round % 5 == 4 {
                // long enough for the worker to go to sleep
                std::thread::sleep(Duration::from_millis(5));
            }
            let sh = SharedSlice::new(&mut buf);
            pool.run(|ctx| {
                // phase 1: each thread fills its half; phase 2: each reads the other half
                let n = sh.len() / ctx.threads();
                let (a, b) = (ctx.tid() * n, (ctx.tid() + 1) * n);
                // SAFETY: disjoint halves.
                unsafe { sh.range_mut(a, b).fill(round * 10 + ctx.tid()) };
                ctx.barrier();
                let other = 1 - ctx.tid();
                // SAFETY: nobody writes after the barrier.
                let seen = unsafe { sh.range(other * n, (other + 1) * n) };
                assert!(seen.iter().all(|&v| v == round * 10 + other));
                ctx.barrier();
            });
        }
    }

    #[test]
    #[should_panic(expected = "pool worker panicked")]
    fn worker_panic_is_reported() {
        let pool = Pool::new(2);
        pool.run(|ctx| {
            if ctx.tid() == 1 {
                panic!("boom");
            }
        });
    }
}
