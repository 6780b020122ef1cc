//! A small, fixed run of one dispatch mode, for instruction counts under
//! `valgrind --tool=callgrind` (timing on a shared machine is too noisy to
//! compare two builds; instruction counts are not).
//!
//! Usage: `dispatch-probe MODE N [PLUGIN]` with MODE one of `dispatch`,
//! `batched`, `sandboxed`, `floor`, `route`; PLUGIN defaults to
//! `dist/plugins/noop.wasm`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use watchgate::dispatch::{Dispatcher, PluginMode, PluginSpec, RetryPolicy, StartPosition};
use watchgate::event::{Event, EventSink};
use watchgate::host::PluginContext;
use watchgate::host::log::{Level, LogSink, PluginLog, Stream};
use watchgate::runtime::instance::{LoadedPlugin, Sandbox, bare_calls};
use watchgate::runtime::{Runtime, RuntimeConfig};
use watchgate::store::Store;
use watchgate::telemetry::Metrics;

const SOURCE: &str = "bench";

struct Quiet;
impl LogSink for Quiet {
    fn line(&self, _: &str, _: Level, _: Stream, _: &str) {}
}

fn loaded(runtime: &Runtime, wasm: &[u8]) -> anyhow::Result<LoadedPlugin> {
    let metrics = Metrics::shared();
    Ok(LoadedPlugin {
        compiled: runtime.compile(wasm)?,
        ctx: Arc::new(PluginContext::new(
            "noop",
            Arc::default(),
            Arc::new(PluginLog::new("noop", 10, Arc::new(Quiet), metrics.clone())),
            metrics,
        )),
        version: 1,
        limits: RuntimeConfig::default().defaults,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("dispatch", String::as_str);
    let n: usize = args.get(2).map_or(Ok(20_000), |s| s.parse())?;
    let path = args.get(3).map_or("dist/plugins/noop.wasm", String::as_str);
    let wasm = std::fs::read(path)?;
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 16,
        ..RuntimeConfig::default()
    })?;
    let src: Arc<str> = Arc::from(SOURCE);
    let value = Bytes::from(vec![b'v'; 100]);
    let input: Vec<Event> = (0..n)
        .map(|i| {
            Event::put(
                &src,
                format!("k{}", i % 10_000),
                value.clone(),
                i as u64 + 1,
            )
        })
        .collect();
    let plugin = loaded(&runtime, &wasm)?;
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
            let d = Dispatcher::new(
                runtime.clone(),
                Metrics::shared(),
                Arc::new(Store::in_memory()),
                [(SOURCE.to_owned(), true)],
            );
            if mode != "route" {
                d.upsert(PluginSpec {
                    loaded: plugin,
                    subscriptions: Vec::new(),
                    grants: watchgate::host::Grants::default(),
                    queue_capacity: n + 1,
                    retry: RetryPolicy {
                        attempts: 1,
                        quarantine_after: 0,
                        ..RetryPolicy::default()
                    },
                    dead_letters: watchgate::store::DeadLetterCap::default(),
                    start: StartPosition::Now,
                    mode: PluginMode::Single,
                    batch_max: if mode == "batched" { 64 } else { 1 },
                })?;
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
        other => anyhow::bail!("unknown mode {other}"),
    }
    eprintln!("{mode} {n}: {:?}", start.elapsed());
    Ok(())
}
