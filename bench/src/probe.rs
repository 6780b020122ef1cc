//! `--probe MODE`: a small, fixed run of one part of the dispatch path,
//! for instruction counts under `valgrind --tool=callgrind`. Timing on a
//! shared machine is too noisy to compare two builds; instruction counts
//! are not. It reuses the `dispatch` case's set-up, so both measure the
//! same path.

use std::time::{Duration, Instant};

use watchgate::event::EventSink;
use watchgate::runtime::instance::{Sandbox, bare_calls};
use watchgate::runtime::{Runtime, RuntimeConfig};

use super::BenchArgs;
use super::inproc::{SOURCE, default_limits, dispatcher, events, loaded, spec, value};

/// Run `n` events through `mode` (see `BenchArgs::probe`) into `noop`.
pub(super) fn probe(args: &BenchArgs, mode: &str, n: usize) -> anyhow::Result<()> {
    let wasm = std::fs::read(args.plugin("noop")?)?;
    // Few instances: valgrind cannot reserve the address space of the
    // bench's usual pool (256 instances).
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 16,
        ..RuntimeConfig::default()
    })?;
    let input = events(n, 10_000, &value());
    let plugin = loaded(&runtime, &wasm, "noop", default_limits())?;
    let start = Instant::now();
    match mode {
        "floor" => {
            bare_calls(&runtime, &plugin, &input)?;
        }
        "sandboxed" => {
            let mut sandbox = Sandbox::new(runtime.clone());
            for e in &input {
                sandbox.call(&plugin, e);
            }
        }
        "dispatch" | "batched" | "route" => {
            let d = dispatcher(&runtime);
            if mode != "route" {
                let batch_max = if mode == "batched" { 64 } else { 1 };
                d.upsert(spec(plugin, batch_max, n + 1))?;
            }
            for chunk in input.chunks(64) {
                d.deliver(SOURCE, chunk.to_vec());
            }
            if mode != "route" {
                while d.handled("noop").unwrap_or(0) < n as u64 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            d.shutdown();
        }
        other => anyhow::bail!(
            "unknown probe mode {other:?} (dispatch, batched, route, sandboxed, floor)"
        ),
    }
    eprintln!("{mode} {n}: {:?}", start.elapsed());
    Ok(())
}
