//! The memory and table caps of one plugin instance.
//!
//! Owns the [`ResourceLimiter`] kept in every store's [`super::HostState`],
//! which refuses growth past the plugin's memory limit and remembers that
//! it did, so the runtime can report the call's outcome as `memory`. It
//! must not decide what happens after a refusal; the instance owner does.

use wasmtime::ResourceLimiter;

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
