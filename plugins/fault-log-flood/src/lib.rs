//! Fixture plugin that floods the gateway's log.
//!
//! Every event writes exactly 10,000 lines at info level through
//! `watchgate_sdk::log::info`, `flood <key> <i>` for `i` in `0..10000`, then
//! succeeds. It exists to test the host's per-plugin log rate limit (lines
//! are dropped and counted rather than slowing the gateway) and must stay a
//! fixture.
//!
//! Settings: none. Grants: none (logging is always available). It declares
//! no capabilities.

use watchgate_sdk::{Event, Plugin, export, log, manifest};

manifest!(concat!(
    "name = \"fault-log-flood\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: writes 10,000 log lines per event.\"\n",
    "capabilities = []\n",
));

/// Log lines written per event.
const LINES: u32 = 10_000;

/// Writes [`LINES`] log lines per event.
struct FaultLogFlood;

impl Plugin for FaultLogFlood {
    fn handle(event: Event) -> Result<(), String> {
        for i in 0..LINES {
            log::info(format!("flood {} {i}", event.key));
        }
        Ok(())
    }
}

export!(FaultLogFlood);
