//! Fixture plugin that grows its linear memory until allocation is denied.
//!
//! On every event it allocates 1 MiB chunks, writes to every page of each
//! one and leaks it, so nothing is ever freed and the optimizer cannot drop
//! the work. When the host refuses to grow memory further (the per-instance
//! memory cap), the allocator fails and the Rust runtime aborts: the call
//! ends in a trap. The handler never returns `Ok`; without any cap it keeps
//! going until the 4 GiB address space of `wasm32` runs out, which traps
//! the same way.
//!
//! It exists to test the gateway's memory limits (trap accounting, instance
//! recycling, quarantine) and must stay a fixture.
//!
//! Settings: none. Grants: none. It declares no capabilities.

use std::hint::black_box;

use watchgate_sdk::{Event, Plugin, export, manifest};

manifest!(concat!(
    "name = \"fault-memory\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: grows memory on every event until allocation is denied (traps).\"\n",
    "capabilities = []\n",
));

/// Size of one allocation.
const CHUNK: usize = 1 << 20;
/// Every page of a chunk is written, so the memory is really used.
const PAGE: usize = 4096;

/// Allocates and leaks memory until the allocator fails.
struct FaultMemory;

impl Plugin for FaultMemory {
    fn handle(event: Event) -> Result<(), String> {
        let mark = black_box(event.key.len() as u8 | 1);
        loop {
            // `vec!` aborts (a trap) when the allocator cannot get memory.
            let chunk: &'static mut [u8] = Vec::leak(vec![0u8; CHUNK]);
            for page in chunk.iter_mut().step_by(PAGE) {
                *page = mark;
            }
            black_box(&*chunk);
        }
    }
}

export!(FaultMemory);
