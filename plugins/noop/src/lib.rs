//! Benchmark plugin that accepts every event and does nothing.
//!
//! It measures the cost of delivering an event and calling a plugin, with
//! nothing of the plugin's own on top. `handle-batch` is the SDK's default:
//! every event of the batch handled in turn.

use watchgate_sdk::{Event, Plugin, export};

/// Does nothing with every event.
struct Noop;

impl Plugin for Noop {
    fn handle(event: Event) -> Result<(), String> {
        std::hint::black_box(&event);
        Ok(())
    }
}

export!(Noop);
