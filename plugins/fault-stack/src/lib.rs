//! Fixture plugin that recurses without bound on every event.
//!
//! Each level keeps a 1 KiB array on the stack and passes its values
//! through [`std::hint::black_box`], so the compiler can neither turn the
//! recursion into a loop nor shrink the frames. The call ends in a
//! stack-overflow trap (the host's `max_wasm_stack`, or the shadow stack in
//! linear memory running out, whichever comes first); the handler never
//! returns.
//!
//! It exists to test that the gateway survives a stack overflow in a plugin
//! (trap accounting, instance recycling) and must stay a fixture.
//!
//! Settings: none. Grants: none. It declares no capabilities.

use std::hint::black_box;

use watchgate_sdk::{Event, Plugin, export, manifest};

manifest!(concat!(
    "name = \"fault-stack\"\n",
    "version = \"",
    env!("CARGO_PKG_VERSION"),
    "\"\n",
    "description = \"Fixture: unbounded recursion on every event (stack-overflow trap).\"\n",
    "capabilities = []\n",
));

/// Bytes of stack each level keeps alive across the recursive call.
const FRAME: usize = 1024;

/// Recurses until the stack overflows.
struct FaultStack;

impl Plugin for FaultStack {
    fn handle(event: Event) -> Result<(), String> {
        let depth = dive(black_box(event.key.len() as u64));
        Err(format!("fault-stack: recursion returned at depth {depth}"))
    }
}

export!(FaultStack);

/// One level of the recursion. The `u64::MAX` exit is never taken; it only
/// keeps the function from recursing unconditionally in the compiler's eyes.
#[inline(never)]
fn dive(depth: u64) -> u64 {
    if black_box(depth) == u64::MAX {
        return depth;
    }
    let mut frame = [0u8; FRAME];
    frame[(depth as usize) % FRAME] = depth as u8;
    let frame = black_box(frame);
    let below = dive(black_box(depth + 1));
    // Use the frame after the call, so it must survive the call.
    below.wrapping_add(u64::from(black_box(frame)[(below as usize) % FRAME]))
}
