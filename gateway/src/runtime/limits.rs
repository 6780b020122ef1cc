//! Per-instance resource caps and the classification of how a call ended.
//!
//! Owns the memory/table limiter attached to every store and the mapping
//! from a wasmtime error to an [`Outcome`]. It must not decide what happens
//! after a trap; the instance owner does.

use wasmtime::{ResourceLimiter, Trap};

use crate::telemetry::Outcome;

/// Caps linear memory and tables of one instance; remembers a refused
/// growth so the call's outcome can say `memory`.
#[derive(Debug)]
pub struct MemoryLimiter {
    memory_bytes: usize,
    table_elements: usize,
    /// A growth was refused since the last [`MemoryLimiter::take_hit`].
    hit: bool,
}

impl MemoryLimiter {
    /// A limiter allowing `memory_bytes` per memory.
    pub fn new(memory_bytes: usize) -> Self {
        MemoryLimiter {
            memory_bytes,
            table_elements: 100_000,
            hit: false,
        }
    }

    /// Whether a growth was refused, resetting the flag.
    pub fn take_hit(&mut self) -> bool {
        std::mem::take(&mut self.hit)
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }
}

/// How a failed call ended, from its error and whether memory was refused.
pub fn classify(error: &wasmtime::Error, memory_refused: bool) -> Outcome {
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Outcome::out_of_fuel,
        Some(Trap::Interrupt) => Outcome::timeout,
        _ if memory_refused => Outcome::memory,
        _ => Outcome::trap,
    }
}

/// The exact trap code, when there is one (for logs and tests).
pub fn trap_code(error: &wasmtime::Error) -> Option<Trap> {
    error.downcast_ref::<Trap>().copied()
}
