//! The state of a worker: where its rounds run, and whether it takes
//! events at all.
//!
//! One atomic holds a [`WorkerState`], read on every delivery and every
//! round; every change goes through the transitions here, each made by
//! one party, so no two flags can disagree. This module must not run
//! rounds or touch the queue.

use std::sync::atomic::Ordering;

use super::worker::Worker;

/// Where a worker is in its life. One atomic holds it; each transition is
/// made by one party:
///
/// * `Own` ⇄ `Pooled`: the thread running the rounds (its own thread pools
///   a quick plugin; a pooled round hands it back).
/// * `Own` ⇄ `Quarantined`: its own thread ([`failure`](super::failure)).
/// * any → `Parked` → `Own` or `Quarantined`: the cluster
///   ([`ownership`](super::ownership)).
/// * any but `Stopped` → `Failed`: its own thread, when the gateway's code
///   panicked in a round outside a call; the thread ends, and only
///   removal leaves it.
/// * any → `Stopped`: removal; final.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum WorkerState {
    /// Takes events; rounds run on its own thread.
    Own = 0,
    /// Takes events; rounds run on the shared pool.
    Pooled = 1,
    /// Takes events; it trapped on every recent call, so its own thread
    /// probes one event at a time.
    Quarantined = 2,
    /// Another replica owns it (or ownership is not settled): takes
    /// nothing here.
    Parked = 3,
    /// Removed: its thread ends.
    Stopped = 4,
    /// Its thread ended on a panic of the gateway's own code (a bug): it
    /// takes no events, and its cursor stays before what it had not
    /// handled, so loading it again (a new version, or after an unload) or
    /// a restart resumes there.
    Failed = 5,
}

impl WorkerState {
    fn from_u8(v: u8) -> WorkerState {
        match v {
            0 => WorkerState::Own,
            1 => WorkerState::Pooled,
            2 => WorkerState::Quarantined,
            3 => WorkerState::Parked,
            5 => WorkerState::Failed,
            _ => WorkerState::Stopped,
        }
    }

    /// The state as `/v1/plugins` names it.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            WorkerState::Own | WorkerState::Pooled => "running",
            WorkerState::Quarantined => "quarantined",
            WorkerState::Parked => "parked",
            WorkerState::Stopped => "stopped",
            WorkerState::Failed => "failed",
        }
    }
}

impl Worker {
    /// The current state.
    pub(super) fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// `from` → `to`; false (and no change) when the state is not `from`.
    pub(super) fn shift(&self, from: WorkerState, to: WorkerState) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Move to `to` from any state but `Stopped`, which is final, and
    /// `Failed`, which only removal leaves (nothing runs the rounds).
    pub(super) fn set_state(&self, to: WorkerState) {
        let _ = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s != WorkerState::Stopped as u8 && s != WorkerState::Failed as u8)
                    .then_some(to as u8)
            });
    }

    /// Parked → taking events again (quarantined still, if it was).
    pub(super) fn unpark_state(&self) {
        let to = if self.quarantine.lock().is_some() {
            WorkerState::Quarantined
        } else {
            WorkerState::Own
        };
        if self.shift(WorkerState::Parked, to) {
            self.unpark();
        }
    }

    /// Parked, stopped or failed: what is in flight stays pending.
    pub(super) fn interrupted(&self) -> bool {
        matches!(
            self.state(),
            WorkerState::Parked | WorkerState::Stopped | WorkerState::Failed
        )
    }
}
