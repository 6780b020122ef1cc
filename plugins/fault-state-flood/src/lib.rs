//! Fixture plugin that floods the host's `state` store.
//!
//! Every event, in turn: sets one key to a fresh 256 KiB value
//! [`SAME_KEY_SETS`] times, then sets [`KEYS`] keys round-robin to fresh
//! 32 KiB values until the host refuses a set. It logs `state flood:
//! <n> same-key sets, <m> round-robin sets, refused: <error>` and succeeds.
//! The values stay well inside the state quota (8.25 MiB in all): what it
//! tests is the host's bound on writes waiting for the state store, which
//! were queued without bound (every same-key value too) before. If the
//! host never refuses, the loop runs until the call's deadline interrupts
//! it. It must stay a fixture.
//!
//! Settings: none. Grants: none (`state` is always available).

use watchgate_sdk::{Event, Plugin, export, log, manifest, state};

manifest!(concat!(
    "name = \"fault-state-flood\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: sets state keys in a tight loop until the host refuses.\"\n",
    "capabilities = []\n",
));

/// Sets of the one key, per event.
const SAME_KEY_SETS: u32 = 100;
/// Keys set round-robin.
const KEYS: u32 = 256;

/// `value` made fresh: its first bytes count the sets.
fn stamp(value: &mut [u8], n: u32) {
    value[..4].copy_from_slice(&n.to_le_bytes());
}

/// Sets state keys until refused.
struct FaultStateFlood;

impl Plugin for FaultStateFlood {
    fn handle(_event: Event) -> Result<(), String> {
        let mut big = vec![b's'; 256 << 10];
        for n in 0..SAME_KEY_SETS {
            stamp(&mut big, n);
            state::set("same", Some(&big))?;
        }
        let mut value = vec![b'r'; 32 << 10];
        let mut n = 0u32;
        let refused = loop {
            stamp(&mut value, n);
            if let Err(e) = state::set(&format!("k{}", n % KEYS), Some(&value)) {
                break e;
            }
            n = n.wrapping_add(1);
        };
        log::info(format!(
            "state flood: {SAME_KEY_SETS} same-key sets, {n} round-robin sets, refused: {refused}"
        ));
        Ok(())
    }
}

export!(FaultStateFlood);
