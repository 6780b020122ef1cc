//! A worker's own OS thread: started, woken, and waited for within a bound.
//!
//! Stopping a plugin waits for its thread to finish the call in flight,
//! which its deadline bounds; but a thread held in the host beyond it (a
//! host call that does not return) must not hold up an unload, the plugin
//! loader behind it, or a shutdown. So a stop waits at most a bound, and a
//! thread still running then is left to end on its own: it holds only its
//! own plugin's instance, and takes no more events. [`OwnThread`] must not
//! know what the thread runs; the worker's stop, which closes its queue and
//! waits for that thread, is here too.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::worker::{Worker, WorkerState};

/// How much longer than its call deadline a stop waits for the worker's
/// thread: the round's own bookkeeping after the call, on a busy machine.
pub(super) const STOP_MARGIN: Duration = Duration::from_secs(1);

/// A thread running one closure, and word of the closure's end.
pub(super) struct OwnThread {
    handle: JoinHandle<()>,
    /// Disconnected once the closure has returned or unwound.
    ended: mpsc::Receiver<()>,
}

impl OwnThread {
    /// Run `f` on a new thread called `name`.
    pub(super) fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<Self> {
        let (tx, ended) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Dropped as `f` returns or unwinds: the waiter's receive ends.
            let _ended = tx;
            f();
        })?;
        Ok(OwnThread { handle, ended })
    }

    /// Wake the thread from `park`.
    pub(super) fn unpark(&self) {
        self.handle.thread().unpark();
    }

    /// Wait for the closure to end, until `by`. False when it had not:
    /// the thread is then detached and ends on its own.
    pub(super) fn join_by(self, by: Instant) -> bool {
        let left = by.saturating_duration_since(Instant::now());
        match self.ended.recv_timeout(left) {
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            // Nothing is ever sent: the sender went with the closure.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Only the thread's own exit is left; a panic in it was
                // the closure's, reported where it happened.
                let _ = self.handle.join();
                true
            }
        }
    }
}

impl Worker {
    /// Stop taking events and wake the worker thread to end; an in-flight
    /// call finishes or hits its deadline. Queued events stay below the
    /// cursor, so a restart delivers them again. [`Worker::join_by`] waits
    /// for the thread.
    pub(super) fn stop(&self) {
        self.state
            .store(WorkerState::Stopped as u8, Ordering::SeqCst);
        let left = self.queue.close();
        if left > 0 {
            tracing::info!(
                plugin = %self.name,
                queued = left,
                "Plugin stopped with events queued; its cursor stays before them, so they are delivered after a restart."
            );
        }
        self.unpark();
    }

    /// How long after its stop the worker's thread is waited for: the
    /// deadline of the call it may be in, plus [`STOP_MARGIN`].
    pub(super) fn stop_bound(&self) -> Duration {
        Duration::from_millis(self.spec.load().loaded.limits.timeout_ms) + STOP_MARGIN
    }

    /// After [`Worker::stop`]: wait for the worker's thread until `by`, and
    /// let go of the plugin. A thread still running then is held in the
    /// host past its call's deadline; it is left to end on its own (it
    /// takes no more events), counted and logged, so an unload or a
    /// shutdown never waits on it. Blocking: call off the async workers.
    pub(super) fn join_by(&self, by: Instant, since: Instant) {
        let thread = self.thread.lock().take();
        if let Some(t) = thread
            && !t.join_by(by)
        {
            self.metrics.thread_abandoned(
                &self.name,
                since.elapsed(),
                self.spec.load().loaded.limits.timeout_ms,
            );
        }
        self.pool.count(false);
        self.end_quarantine();
        self.store.unregister(&self.name);
        self.handles.depth.set(0);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_thread_that_ends_is_joined() {
        let t = OwnThread::spawn("ends".into(), || {}).unwrap();
        assert!(t.join_by(Instant::now() + Duration::from_secs(30)));
    }

    #[test]
    fn a_thread_that_panics_is_joined() {
        let t = OwnThread::spawn("panics".into(), || panic!("deliberate")).unwrap();
        assert!(t.join_by(Instant::now() + Duration::from_secs(30)));
    }

    #[test]
    fn a_stuck_thread_is_left_behind_at_the_bound() {
        let (release, stuck) = mpsc::channel::<()>();
        let t = OwnThread::spawn("stuck".into(), move || {
            let _ = stuck.recv();
        })
        .unwrap();
        let start = Instant::now();
        let bound = Duration::from_millis(100);
        assert!(!t.join_by(start + bound));
        let waited = start.elapsed();
        assert!(
            waited >= bound && waited < Duration::from_secs(10),
            "waited {waited:?} for a bound of {bound:?}"
        );
        drop(release);
    }
}
