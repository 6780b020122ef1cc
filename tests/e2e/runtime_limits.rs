//! Per-call limits through the library: each fault ends in its exact trap,
//! fails only its own call, and a fresh instance serves the next one.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use wasmtime::Trap;
use watchgate::event::Event;
use watchgate::host::PluginContext;
use watchgate::host::log::{Level, LogSink, PluginLog, Stream};
use watchgate::runtime::Runtime;
use watchgate::runtime::instance::{LoadedPlugin, Sandbox};
use watchgate::runtime::{Limits, RuntimeConfig};
use watchgate::telemetry::{Metrics, Outcome};

use crate::support::plugin;

#[derive(Default)]
struct Lines(Mutex<Vec<(Level, Stream, String)>>);

impl LogSink for Lines {
    fn line(&self, _plugin: &str, level: Level, stream: Stream, message: &str) {
        self.0.lock().push((level, stream, message.to_owned()));
    }
}

struct Fixture {
    sandbox: Sandbox,
    plugin: LoadedPlugin,
    lines: Arc<Lines>,
    metrics: Arc<Metrics>,
}

fn fixture(limits: Limits) -> Fixture {
    fixture_with_log_rate(limits, 1_000)
}

fn fixture_with_log_rate(limits: Limits, lines_per_second: u32) -> Fixture {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let compiled = runtime
        .compile(&std::fs::read(plugin("fault-by-key")).unwrap())
        .unwrap();
    let lines = Arc::new(Lines::default());
    let metrics = Metrics::shared();
    let ctx = Arc::new(PluginContext::new(
        "fault-by-key",
        Arc::default(),
        Arc::new(PluginLog::new(
            "fault-by-key",
            lines_per_second,
            lines.clone(),
            metrics.clone(),
        )),
        metrics.clone(),
    ));
    Fixture {
        sandbox: Sandbox::new(runtime),
        plugin: LoadedPlugin {
            compiled,
            ctx,
            version: 1,
            limits,
        },
        lines,
        metrics,
    }
}

fn event(key: &str) -> Event {
    Event::put(&Arc::from("test"), key, Bytes::from_static(b"v"), 1)
}

const LIMITS: Limits = Limits {
    fuel: 200_000_000,
    timeout_ms: 2_000,
    memory_mb: 32,
    ..Limits::DEFAULT
};

#[test]
fn every_fault_ends_in_its_exact_trap_and_the_next_call_succeeds() {
    let mut f = fixture(LIMITS);
    let cases: [(&str, Outcome, Option<Trap>); 5] = [
        ("panic", Outcome::trap, Some(Trap::UnreachableCodeReached)),
        ("spin", Outcome::out_of_fuel, Some(Trap::OutOfFuel)),
        ("recurse", Outcome::trap, Some(Trap::StackOverflow)),
        ("alloc", Outcome::memory, None),
        ("error", Outcome::error, None),
    ];
    for (key, outcome, trap) in cases {
        let r = f.sandbox.call(&f.plugin, &event(key));
        assert_eq!(r.outcome, outcome, "{key}: {r:?}");
        if trap.is_some() {
            assert_eq!(r.trap, trap, "{key}: {r:?}");
        }
        let trapped = !matches!(outcome, Outcome::error);
        assert_eq!(f.sandbox.has_instance(), !trapped, "{key}");
        // The next call gets a working instance.
        let ok = f.sandbox.call(&f.plugin, &event("fine"));
        assert_eq!(ok.outcome, Outcome::ok, "after {key}: {ok:?}");
    }
    // One initial instance plus one per trap (4 traps).
    let text = f.metrics.encode();
    assert!(
        text.contains("watchgate_plugin_instantiations_total{plugin=\"fault-by-key\"} 5"),
        "{text}"
    );
}

#[test]
fn the_wall_clock_deadline_interrupts_a_spin_with_unlimited_fuel() {
    let mut f = fixture(Limits {
        fuel: u64::MAX / 2,
        timeout_ms: 100,
        memory_mb: 32,
        ..Limits::DEFAULT
    });
    let r = f.sandbox.call(&f.plugin, &event("spin"));
    assert_eq!(r.outcome, Outcome::timeout, "{r:?}");
    assert_eq!(r.trap, Some(Trap::Interrupt));
    assert!(r.elapsed.as_millis() >= 100, "{r:?}");
    assert_eq!(
        f.sandbox.call(&f.plugin, &event("fine")).outcome,
        Outcome::ok
    );
}

#[test]
fn state_survives_instance_recycling_and_output_is_logged() {
    let mut f = fixture(LIMITS);
    assert_eq!(
        f.sandbox.call(&f.plugin, &event("state")).outcome,
        Outcome::ok
    );
    assert_eq!(
        f.sandbox.call(&f.plugin, &event("panic")).outcome,
        Outcome::trap
    );
    assert_eq!(
        f.sandbox.call(&f.plugin, &event("state")).outcome,
        Outcome::ok
    );
    assert_eq!(
        f.sandbox.call(&f.plugin, &event("stdout")).outcome,
        Outcome::ok
    );
    let lines = f.lines.0.lock().clone();
    let messages: Vec<&str> = lines.iter().map(|(_, _, m)| m.as_str()).collect();
    assert!(messages.contains(&"count=1"), "{messages:?}");
    assert!(
        messages.contains(&"count=2"),
        "state was lost: {messages:?}"
    );
    assert!(lines.contains(&(Level::Info, Stream::Stdout, "hello from stdout".to_owned())));
    assert!(lines.contains(&(Level::Warn, Stream::Stderr, "hello from stderr".to_owned())));
}

#[test]
fn a_log_flood_is_rate_limited_and_counted() {
    let Fixture {
        mut sandbox,
        plugin,
        lines,
        metrics,
    } = fixture_with_log_rate(LIMITS, 20);
    assert_eq!(
        sandbox.call(&plugin, &event("log-flood")).outcome,
        Outcome::ok
    );
    let kept = lines
        .0
        .lock()
        .iter()
        .filter(|(_, _, m)| m.starts_with("fault-by-key: log flood line"))
        .count();
    assert!((1..=40).contains(&kept), "kept {kept} of 10000 lines");
    let text = metrics.encode();
    let dropped: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("watchgate_plugin_log_dropped_total{plugin=\"fault-by-key\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(dropped as usize + kept, 10_000);
}
