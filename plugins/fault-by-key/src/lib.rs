//! Fixture plugin whose behaviour is chosen by the event key.
//!
//! One component covers every failure mode the gateway must survive, so a
//! test picks the fault by writing a key:
//!
//! | key         | behaviour                                                   |
//! |-------------|-------------------------------------------------------------|
//! | `panic`     | panics (trap)                                               |
//! | `spin`      | loops forever (deadline or fuel)                            |
//! | `alloc`     | keeps allocating 1 MiB chunks until allocation fails (trap) |
//! | `recurse`   | unbounded non-tail recursion (stack overflow)               |
//! | `error`     | returns `Err("fault-by-key: requested error")`              |
//! | `log-flood` | calls `log::info` 10 000 times (log rate limit)             |
//! | `stdout`    | prints one line to stdout and one to stderr                 |
//! | `state`     | increments the counter in state key `count`, logs `count=N` |
//! | other       | returns `Ok(())`                                            |
//!
//! It must stay a test fixture: no behaviour here is meant for production.

use std::hint::black_box;

use watchgate_sdk::{Event, Plugin, export, log, state};

/// Size of one allocation for the `alloc` fault.
const CHUNK: usize = 1 << 20;
/// Stride used to touch every page of a chunk (the wasm page is 64 KiB; 4 KiB
/// also covers hosts that commit memory lazily at a finer grain).
const PAGE: usize = 4096;
/// How many lines the `log-flood` fault writes.
const FLOOD_LINES: u32 = 10_000;

/// Misbehaves as the event key asks.
struct FaultByKey;

impl Plugin for FaultByKey {
    fn handle(event: Event) -> Result<(), String> {
        match event.key.as_str() {
            "panic" => panic!("fault-by-key: deliberate panic on {}", event.key),
            "spin" => spin(),
            "alloc" => alloc_forever(),
            "recurse" => {
                let depth = recurse(0);
                Err(format!("fault-by-key: recursion ended at depth {depth}"))
            }
            "error" => Err("fault-by-key: requested error".to_owned()),
            "log-flood" => {
                for i in 0..FLOOD_LINES {
                    log::info(format!("fault-by-key: log flood line {i}"));
                }
                Ok(())
            }
            "stdout" => {
                println!("hello from stdout");
                eprintln!("hello from stderr");
                Ok(())
            }
            "state" => bump_counter(),
            _ => Ok(()),
        }
    }
}

/// Loops forever; `black_box` keeps the optimizer from removing the loop.
fn spin() -> ! {
    let mut counter = 0_u64;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB chunks, keeping all of them, until the
/// allocator fails (which aborts, trapping the instance).
fn alloc_forever() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0_u8; CHUNK];
        for byte in chunk.iter_mut().step_by(PAGE) {
            *byte = 1;
        }
        chunks.push(black_box(chunk));
        black_box(&chunks);
    }
}

/// Recurses without bound until the wasm call stack overflows.
///
/// The frame keeps only integers, which live in wasm locals rather than on
/// the linear-memory shadow stack, so the guard the host puts on the call
/// stack trips (a stack-overflow trap) instead of the shadow stack running
/// off the bottom of memory. The addition after the call keeps it from being
/// a tail call; `black_box` hides that the exit condition never holds.
fn recurse(depth: u64) -> u64 {
    let next = black_box(depth.wrapping_add(1));
    if next == 0 {
        return depth;
    }
    recurse(next).wrapping_add(depth)
}

/// Increments the decimal counter in state key `count` and logs it.
fn bump_counter() -> Result<(), String> {
    let current = match state::get("count") {
        None => 0,
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| "fault-by-key: state key \"count\" is not a decimal u64".to_owned())?,
    };
    let next = current + 1;
    state::set("count", Some(next.to_string().as_bytes()))?;
    log::info(format!("count={next}"));
    Ok(())
}

export!(FaultByKey);
