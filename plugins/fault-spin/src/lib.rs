//! Fixture plugin that never returns.
//!
//! Every event starts a busy loop the optimizer cannot remove, so the only
//! way out is the host's deadline (epoch interruption) or fuel limit. It
//! does nothing else.

use std::hint::black_box;

use watchgate_sdk::{Event, Plugin, export};

/// Spins forever on every event.
struct FaultSpin;

impl Plugin for FaultSpin {
    fn handle(_event: Event) -> Result<(), String> {
        let mut counter = 0_u64;
        loop {
            counter = black_box(counter.wrapping_add(1));
        }
    }
}

export!(FaultSpin);
