//! Fixture plugin that panics on every event.
//!
//! It exists to test how the gateway handles a trapping plugin (counting the
//! trap, recycling the instance, quarantine). It does nothing else.

use watchgate_sdk::{Event, Plugin, export};

/// Panics on every event.
struct FaultPanic;

impl Plugin for FaultPanic {
    fn handle(event: Event) -> Result<(), String> {
        panic!("fault-panic: deliberate panic on {}", event.key);
    }
}

export!(FaultPanic);
