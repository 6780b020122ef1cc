//! Fixture plugin that asks the host to copy as much as it can.
//!
//! Every event scans the event's whole source (prefix `""`) [`SCANS`]
//! times through the `snapshot` capability, and logs each result as
//! `scan ok <keys> keys <bytes> bytes` or `scan refused: <error>`, then
//! succeeds. With large values under the source, each scan would copy them
//! all into the plugin were the host's byte bound per scan missing; the
//! log lets a test check what one scan returned. It must stay a fixture.
//!
//! Settings: none. Grants: `snapshot = true` (without it every scan is
//! refused as not granted).

use watchgate_sdk::{Event, Plugin, export, log, manifest, snapshot};

manifest!(concat!(
    "name = \"fault-scan\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: scans its whole source several times per event.\"\n",
    "capabilities = [\"snapshot\"]\n",
));

/// Scans per event.
const SCANS: u32 = 8;

/// Scans the whole source [`SCANS`] times per event.
struct FaultScan;

impl Plugin for FaultScan {
    fn handle(event: Event) -> Result<(), String> {
        for _ in 0..SCANS {
            match snapshot::scan(&event.source, "") {
                Ok(entries) => {
                    let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
                    log::info(format!("scan ok {} keys {bytes} bytes", entries.len()));
                }
                Err(e) => log::info(format!("scan refused: {e}")),
            }
        }
        Ok(())
    }
}

export!(FaultScan);
