//! Per-call limits and the classification of how a call ended.
//!
//! Owns [`Limits`] (fuel, deadline and memory of one call, as the operator
//! sets them in `[runtime.defaults]` and a sidecar's `[limits]`) and the
//! mapping from a wasmtime error to an [`Outcome`]. The memory cap itself
//! is enforced by the host's limiter in each store. It must not decide what
//! happens after a trap; the instance owner does.

use serde::Deserialize;
use wasmtime::Trap;

use crate::host::wait::WaitCutOff;
use crate::telemetry::Outcome;

/// Per-call limits of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) per call.
    pub fuel: u64,
    /// Wall-clock deadline per call, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory cap per instance, in MiB.
    pub memory_mb: u64,
}

/// Limits where every field is optional (a sidecar's `[limits]`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialLimits {
    /// Fuel per call.
    pub fuel: Option<u64>,
    /// Deadline per call, ms.
    pub timeout_ms: Option<u64>,
    /// Memory cap, MiB.
    pub memory_mb: Option<u64>,
}

impl Limits {
    /// `self` with the fields `over` sets replaced.
    pub fn merged(self, over: PartialLimits) -> Limits {
        Limits {
            fuel: over.fuel.unwrap_or(self.fuel),
            timeout_ms: over.timeout_ms.unwrap_or(self.timeout_ms),
            memory_mb: over.memory_mb.unwrap_or(self.memory_mb),
        }
    }
}

/// How a failed call ended, from its error and whether memory was refused.
pub fn classify(error: &wasmtime::Error, memory_refused: bool) -> Outcome {
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Outcome::out_of_fuel,
        Some(Trap::Interrupt) => Outcome::timeout,
        // A wait in the host, which the epoch cannot interrupt, ended at
        // the same deadline.
        _ if error.downcast_ref::<WaitCutOff>().is_some() => Outcome::timeout,
        _ if memory_refused => Outcome::memory,
        _ => Outcome::trap,
    }
}

/// The exact trap code, when there is one (for logs and tests).
pub fn trap_code(error: &wasmtime::Error) -> Option<Trap> {
    error.downcast_ref::<Trap>().copied()
}
