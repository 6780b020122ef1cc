//! A shared pool of threads for fast, healthy plugins.
//!
//! Every plugin has its own worker thread, but once there are more plugins
//! than cores, a thread per plugin means a thread wake-up per plugin per
//! event: with a hundred plugins on two cores, the wake-ups cost more than
//! the calls. So a plugin whose calls have been quick and successful for a
//! while is *pooled*: its own thread sleeps, and when events arrive the
//! plugin is put on this pool's run queue, where one of a few threads (one
//! per core) takes it, runs one round of its queue and puts it back if more
//! is waiting. A plugin is never on the run queue twice, so its events are
//! still handled one round at a time, in order.
//!
//! A pooled plugin that fails, gets slow, or has to wait (a retry pause, a
//! quarantine, a commit) goes back to its own thread at once, so it can
//! never hold a pool thread for long: at most one call, itself bounded by
//! the plugin's deadline. This module only schedules; the rounds are the
//! worker's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

/// What the pool runs: one round of a plugin's queue.
pub trait Task: Send + Sync + 'static {
    /// Handle one round of queued events.
    fn run_round(self: Arc<Self>);

    /// A round panicked (a bug on the host's side): take the task off the
    /// pool, so it is not left scheduled with nobody to run it.
    fn abandon(&self);
}

/// Plugins with work, and the threads taking them.
pub struct Pool<T> {
    queue: Mutex<VecDeque<Arc<T>>>,
    ready: Condvar,
    closed: AtomicBool,
    /// `queue.len()`, readable without the lock.
    waiting: AtomicUsize,
    /// Threads started.
    threads: AtomicUsize,
    /// Plugins started and not stopped: pooling pays only beyond one per
    /// thread.
    plugins: AtomicUsize,
}

impl<T: Task> Pool<T> {
    /// A pool of `threads` threads (none: no plugin is ever pooled). A
    /// thread that cannot be started is logged and left out.
    pub fn start(threads: usize) -> Arc<Pool<T>> {
        let pool = Arc::new(Pool {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
            plugins: AtomicUsize::new(0),
        });
        for i in 0..threads {
            let p = pool.clone();
            match std::thread::Builder::new()
                .name(format!("plugin-pool-{i}"))
                .spawn(move || p.work())
            {
                Ok(_) => {
                    pool.threads.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Could not start a plugin pool thread; plugins keep more to their own threads.");
                }
            }
        }
        pool
    }

    /// Whether pooling pays: more plugins than pool threads (and the pool
    /// is running).
    pub fn worthwhile(&self) -> bool {
        let threads = self.threads.load(Ordering::Relaxed);
        threads > 0 && !self.is_closed() && self.plugins.load(Ordering::Relaxed) > threads
    }

    /// Closed: its threads stop, and it takes nothing more.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// A plugin started (`true`) or stopped.
    pub fn count(&self, started: bool) {
        if started {
            self.plugins.fetch_add(1, Ordering::Relaxed);
        } else {
            self.plugins.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Queue `task` for a round. The caller makes sure a task is queued at
    /// most once at a time.
    pub fn submit(&self, task: Arc<T>) {
        let mut queue = self.queue.lock();
        queue.push_back(task);
        self.waiting.store(queue.len(), Ordering::Release);
        drop(queue);
        self.ready.notify_one();
    }

    /// Stop the threads once the tasks queued now are dropped.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.queue.lock().clear();
        self.ready.notify_all();
    }

    fn work(&self) {
        loop {
            let task = {
                let mut queue = self.queue.lock();
                loop {
                    if self.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Some(t) = queue.pop_front() {
                        self.waiting.store(queue.len(), Ordering::Release);
                        break t;
                    }
                    self.ready.wait(&mut queue);
                }
            };
            let round = task.clone();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| round.run_round())).is_err()
            {
                // The thread stays for the other plugins; this one goes back
                // to its own thread.
                tracing::error!("A plugin round on the pool panicked; the plugin leaves the pool.");
                task.abandon();
            }
            // Plugins are submitted one by one as a delivery reaches them:
            // a thread that slept as soon as it ran dry would be woken for
            // each.
            super::queue::spin_while(|| self.waiting.load(Ordering::Acquire) == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    use super::*;

    struct Counter {
        rounds: AtomicU64,
        running: AtomicBool,
        overlapped: AtomicBool,
        panics: bool,
        abandoned: AtomicU64,
    }

    fn counter(panics: bool) -> Arc<Counter> {
        Arc::new(Counter {
            rounds: AtomicU64::new(0),
            running: AtomicBool::new(false),
            overlapped: AtomicBool::new(false),
            panics,
            abandoned: AtomicU64::new(0),
        })
    }

    fn wait_round(c: &Arc<Counter>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // One at a time, as the workers do: wait for the round.
        while Arc::strong_count(c) > 1 {
            assert!(Instant::now() < deadline, "round never ran");
            std::thread::yield_now();
        }
    }

    impl Task for Counter {
        fn run_round(self: Arc<Self>) {
            if self.running.swap(true, Ordering::SeqCst) {
                self.overlapped.store(true, Ordering::SeqCst);
            }
            let round = self.rounds.fetch_add(1, Ordering::SeqCst);
            self.running.store(false, Ordering::SeqCst);
            assert!(!self.panics || round != 0, "first round panics");
        }

        fn abandon(&self) {
            self.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn submitted_tasks_run_and_close_stops_the_threads() {
        let pool: Arc<Pool<Counter>> = Pool::start(2);
        let c = counter(false);
        for _ in 0..100 {
            pool.submit(c.clone());
            wait_round(&c);
        }
        assert_eq!(c.rounds.load(Ordering::SeqCst), 100);
        assert!(!c.overlapped.load(Ordering::SeqCst));
        pool.close();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&pool) > 1 {
            assert!(Instant::now() < deadline, "pool threads did not stop");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_panicking_round_abandons_its_task_and_the_thread_goes_on() {
        let pool: Arc<Pool<Counter>> = Pool::start(1);
        let bad = counter(true);
        pool.submit(bad.clone());
        wait_round(&bad);
        assert_eq!(bad.abandoned.load(Ordering::SeqCst), 1);
        // The only thread survived: another task still runs.
        let good = counter(false);
        pool.submit(good.clone());
        wait_round(&good);
        assert_eq!(good.rounds.load(Ordering::SeqCst), 1);
        assert_eq!(good.abandoned.load(Ordering::SeqCst), 0);
        pool.close();
    }

    #[test]
    fn pooling_pays_only_beyond_one_plugin_per_thread() {
        let pool: Arc<Pool<Counter>> = Pool::start(2);
        pool.count(true);
        pool.count(true);
        assert!(!pool.worthwhile());
        pool.count(true);
        assert!(pool.worthwhile());
        pool.count(false);
        assert!(!pool.worthwhile());
        pool.close();
        let none: Arc<Pool<Counter>> = Pool::start(0);
        for _ in 0..5 {
            none.count(true);
        }
        assert!(!none.worthwhile());
    }
}
