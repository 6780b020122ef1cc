//! Per-plugin limits and the classification of how a call ended.
//!
//! Owns [`Limits`] (fuel, deadline and memory of one call, and the disk
//! quota of a plugin's `files` grant, as the operator sets them in
//! `[runtime.defaults]` and a sidecar's `[limits]`) and the mapping from a
//! wasmtime error to an [`Outcome`]. The memory cap itself is enforced by
//! the host's limiter in each store, the disk quota by the `files` grant.
//! It must not decide what happens after a trap; the instance owner does.

use serde::Deserialize;
use wasmtime::Trap;

use crate::host::wait::WaitCutOff;
use crate::telemetry::Outcome;

/// Limits of a plugin: per call, and of what it keeps on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) per call.
    pub fuel: u64,
    /// Wall-clock deadline per call, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory cap per instance, in MiB.
    pub memory_mb: u64,
    /// Most bytes of file contents under the plugin's `files` grant, in
    /// MiB. Default 64.
    #[serde(default = "default_files_mb")]
    pub files_mb: u64,
    /// Most files and directories under the plugin's `files` grant.
    /// Default 1000.
    #[serde(default = "default_files_count")]
    pub files_count: u64,
}

fn default_files_mb() -> u64 {
    Limits::DEFAULT.files_mb
}

fn default_files_count() -> u64 {
    Limits::DEFAULT.files_count
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
    /// Bytes under the `files` grant, MiB.
    pub files_mb: Option<u64>,
    /// Files and directories under the `files` grant.
    pub files_count: Option<u64>,
}

impl Limits {
    /// The limits of a plugin nobody configured (`[runtime.defaults]`
    /// when the gateway config sets none).
    pub const DEFAULT: Limits = Limits {
        fuel: 100_000_000,
        timeout_ms: 1_000,
        memory_mb: 64,
        files_mb: 64,
        files_count: 1_000,
    };

    /// `self` with the fields `over` sets replaced.
    pub fn merged(self, over: PartialLimits) -> Limits {
        Limits {
            fuel: over.fuel.unwrap_or(self.fuel),
            timeout_ms: over.timeout_ms.unwrap_or(self.timeout_ms),
            memory_mb: over.memory_mb.unwrap_or(self.memory_mb),
            files_mb: over.files_mb.unwrap_or(self.files_mb),
            files_count: over.files_count.unwrap_or(self.files_count),
        }
    }

    /// The disk quota of the plugin's `files` grant.
    pub fn files_quota(&self) -> crate::host::files::FilesQuota {
        crate::host::files::FilesQuota {
            bytes: self.files_mb.saturating_mul(1 << 20),
            entries: self.files_count,
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
