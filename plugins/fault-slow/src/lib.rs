//! Fixture plugin that busy-waits as long as each event asks.
//!
//! The event's value is a number of milliseconds (UTF-8 digits); the plugin
//! spins on the clock that long, then succeeds. A missing or unparsable
//! value means no wait. It exists to be a slow neighbour in isolation tests
//! and benchmarks, and must stay a fixture.

use std::time::{Duration, Instant};

use watchgate_sdk::{Event, Plugin, export};

/// Busy-waits the event's value in milliseconds.
struct FaultSlow;

impl Plugin for FaultSlow {
    fn handle(event: Event) -> Result<(), String> {
        let ms = event
            .value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

export!(FaultSlow);
