//! Benchmark plugin that records when each event entered it.
//!
//! On entry it reads the wall clock, then appends one line to
//! `entries.log` in its files grant: the key, the wall-clock time of entry
//! in nanoseconds since the Unix epoch, and the event's value (a benchmark
//! writes its own send time there), separated by spaces. The benchmark
//! subtracts the two for the end-to-end latency.

use std::time::{SystemTime, UNIX_EPOCH};

use watchgate_sdk::{Event, Plugin, export, files};

/// Records entry times.
struct BenchProbe;

impl Plugin for BenchProbe {
    fn handle(event: Event) -> Result<(), String> {
        let entered = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let value = event
            .value
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let line = format!("{} {entered} {value}\n", event.key);
        files::append("entries.log", line.as_bytes()).map_err(|e| format!("bench-probe: {e}"))
    }
}

export!(BenchProbe);
