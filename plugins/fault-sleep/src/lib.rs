//! Fixture plugin that waits inside the host instead of spinning.
//!
//! A guest that sleeps does not run wasm meanwhile, so the epoch deadline
//! that stops a spinning guest cannot stop it: only the host can end the
//! wait. Each event's value names how this plugin waits, for [`NAP`]
//! (a minute) unless the value says otherwise:
//!
//! * `sleep`: `std::thread::sleep`, as ordinary code would.
//! * `block`: `wasi:clocks/monotonic-clock.subscribe-duration`, then
//!   `pollable.block` on it.
//! * `instant`: `subscribe-instant` a minute from now, then `block`.
//! * `poll`: `wasi:io/poll.poll` on a list holding that pollable.
//! * `naps`: one-millisecond sleeps, over and over, for a minute: each
//!   wait is short, the call is not.
//! * `none`: no wait; the call succeeds at once.
//! * `leak`: no wait, but holds host resources: subscribes [`LEAK`]
//!   pollables and never drops them, which the host must refuse past its
//!   bound rather than keep.
//!
//! Any other value (or none) means `sleep`. The plugin returns `Ok` if a
//! wait ever ends, which the host must not let happen within its deadline.
//! It must stay a fixture.

use std::time::{Duration, Instant};

use wasip2::clocks::monotonic_clock;
use wasip2::io::poll;
use watchgate_sdk::{Event, Plugin, export, manifest};

manifest!(concat!(
    "name = \"fault-sleep\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: sleeps a minute in each call through WASI.\"\n",
));

/// How long each wait asks for.
const NAP: Duration = Duration::from_secs(60);

/// How many pollables `leak` subscribes and keeps.
const LEAK: usize = 100_000;

/// Waits in the host the way the event's value names.
struct FaultSleep;

impl Plugin for FaultSleep {
    fn handle(event: Event) -> Result<(), String> {
        let nanos = u64::try_from(NAP.as_nanos()).unwrap_or(u64::MAX);
        match event.value_str().map(str::trim).unwrap_or("") {
            "none" => {}
            "leak" => {
                for _ in 0..LEAK {
                    std::mem::forget(monotonic_clock::subscribe_duration(nanos));
                }
            }
            "block" => monotonic_clock::subscribe_duration(nanos).block(),
            "instant" => {
                let when = monotonic_clock::now().saturating_add(nanos);
                monotonic_clock::subscribe_instant(when).block();
            }
            "poll" => {
                let pollable = monotonic_clock::subscribe_duration(nanos);
                poll::poll(&[&pollable]);
            }
            "naps" => {
                let until = Instant::now() + NAP;
                while Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            _ => std::thread::sleep(NAP),
        }
        Ok(())
    }
}

export!(FaultSleep);
