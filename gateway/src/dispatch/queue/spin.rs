//! The spinner shared by every thread that waits for events (a queue's
//! consumer, the worker pool): a thread that expects work soon spins
//! briefly instead of sleeping, while one process-wide count keeps the
//! spinning threads below the number of cores.
//!
//! It must not know what is waited for (the caller's condition says), and
//! must never spin without the bound: spinning threads take the cores the
//! plugins need.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a hot consumer spins for the next event before it sleeps. A
/// sleep costs both sides a system call (the producer's wake-up), several
/// times the cost of a no-op plugin call.
const SPIN: Duration = Duration::from_micros(50);

/// Spin (yielding between checks) while `waiting` holds, for up to
/// [`SPIN`], unless enough other threads spin already: with many plugins
/// busy at once (fan-out) spinning threads would only take the CPU from the
/// ones with work. At most one thread per core but one spins.
pub(crate) fn spin_while(waiting: impl Fn() -> bool) {
    static SPINNING: AtomicUsize = AtomicUsize::new(0);
    static MOST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let most = *MOST.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    });
    if SPINNING.fetch_add(1, Ordering::AcqRel) >= most {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let until = Instant::now() + SPIN;
    while waiting() && Instant::now() < until {
        for _ in 0..32 {
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
    SPINNING.fetch_sub(1, Ordering::AcqRel);
}
