//! Blocking inside a host call: `fault-sleep` waits in WASI (a sleep, a
//! block or a poll on a clock pollable, short naps in a loop) for a minute
//! per call, where the epoch deadline that stops a spinning guest cannot
//! reach it. Each wait must end at the call's deadline as a counted
//! timeout, `event-log` beside it must not notice, and neither an unload
//! (nor the loading of plugins after it) nor a shutdown may wait on the
//! sleeper beyond its deadline and a margin.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use watchgate::event::Event;
use watchgate::host::PluginContext;
use watchgate::host::log::{PluginLog, TracingSink};
use watchgate::runtime::instance::{LoadedPlugin, Sandbox};
use watchgate::runtime::{Limits, Runtime, RuntimeConfig};
use watchgate::telemetry::{Metrics, Outcome};

use crate::adversarial::{N, PER_EVENT, assert_trapping_fault, beside_event_log, outcome};
use crate::support::{plugin, wait_for};

const FAULT: &str = "fault-sleep";

/// The ways `fault-sleep` waits (the event's value), each for a minute.
const WAITS: [&str; 5] = ["sleep", "block", "instant", "poll", "naps"];

/// What the first and second gateway test give `fault-sleep` per call.
const SHORT_MS: u64 = 300;
const DEFAULT_MS: u64 = 1_000;

/// How much longer than its deadline a stop waits for a plugin's thread
/// (`STOP_MARGIN` in the dispatcher).
const STOP_MARGIN: Duration = Duration::from_secs(1);

/// Slack for a busy machine on top of a bound the gateway promises: the
/// plugin directory's debounce, the admin API's answer, the test's own
/// polling. Far below the minute every wait asks for.
const SLACK: Duration = Duration::from_secs(3);

fn waits_cut_off(m: &std::collections::BTreeMap<String, f64>, plugin: &str) -> f64 {
    m.get(&format!(
        "watchgate_plugin_waits_cut_off_total{{plugin=\"{plugin}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

/// Whether the gateway logged that `plugin` was unloaded (after its
/// thread was waited for).
fn unloaded_in_log(log: &str, plugin: &str) -> bool {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|l| l["fields"]["message"] == "Plugin unloaded." && l["fields"]["plugin"] == plugin)
}

/// `fault-sleep` loaded in `runtime` with a deadline of [`SHORT_MS`],
/// counting into `metrics`.
fn sleeper(runtime: &Arc<Runtime>, metrics: &Arc<Metrics>) -> LoadedPlugin {
    let compiled = runtime
        .compile(&std::fs::read(plugin(FAULT)).unwrap())
        .unwrap();
    let log = Arc::new(PluginLog::new(
        FAULT,
        1_000,
        Arc::new(TracingSink),
        metrics.clone(),
    ));
    LoadedPlugin {
        compiled,
        ctx: Arc::new(PluginContext::new(
            FAULT,
            Arc::default(),
            log,
            metrics.clone(),
        )),
        version: 1,
        limits: Limits {
            fuel: u64::MAX / 2,
            timeout_ms: SHORT_MS,
            memory_mb: 32,
            ..Limits::DEFAULT
        },
    }
}

/// Through the library: every way of waiting ends as a timeout at the
/// deadline (not a minute later), names the limit, is counted, and a fresh
/// instance serves the next call.
#[test]
fn every_wasi_wait_ends_at_the_call_deadline() {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let metrics = Metrics::shared();
    let plugin = sleeper(&runtime, &metrics);
    let mut sandbox = Sandbox::new(runtime);
    let deadline = Duration::from_millis(SHORT_MS);
    for wait in WAITS {
        let event = Event::put(
            &Arc::from("test"),
            "k",
            Bytes::from(wait.as_bytes().to_vec()),
            1,
        );
        let r = sandbox.call(&plugin, &event);
        assert_eq!(r.outcome, Outcome::timeout, "{wait}: {r:?}");
        assert!(
            r.elapsed >= deadline && r.elapsed < deadline + SLACK,
            "{wait} ended after {:?}, its deadline being {deadline:?}",
            r.elapsed
        );
        let message = r.message.unwrap_or_default();
        let expect: &[&str] = match wait {
            // A long wait is cut off in the host, and the message names
            // the wait and the limit.
            "block" | "instant" => &["pollable.block", "timeout_ms = 300", "cut off"],
            "poll" => &["wasi:io/poll poll", "timeout_ms = 300", "cut off"],
            "sleep" => &["wasi:io/poll", "timeout_ms = 300", "cut off"],
            // Short naps: the deadline comes in a nap (cut off) or between
            // two (the epoch interrupt); a timeout either way, checked
            // above.
            _ => &[],
        };
        for e in expect {
            assert!(message.contains(e), "{wait}: {message:?} lacks {e:?}");
        }
        assert!(!sandbox.has_instance(), "{wait}: the instance was kept");
    }
    let cut = metrics
        .plugin_waits_cut_off
        .get_or_create(&Metrics::plugin(FAULT))
        .get();
    assert!(
        (4..=5).contains(&cut),
        "{cut} waits counted as cut off for four long waits and the naps"
    );
    let fine = Event::put(&Arc::from("test"), "k", Bytes::from_static(b"none"), 1);
    let r = sandbox.call(&plugin, &fine);
    assert_eq!(r.outcome, Outcome::ok, "{r:?}");
}

/// Host resources a guest takes and never gives back are bounded per
/// instance: the import past the bound fails the call as a trap, and the
/// next call gets a fresh instance without them.
#[test]
fn host_resources_a_guest_keeps_are_bounded() {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let plugin = sleeper(&runtime, &Metrics::shared());
    let mut sandbox = Sandbox::new(runtime);
    let leak = Event::put(&Arc::from("test"), "k", Bytes::from_static(b"leak"), 1);
    let r = sandbox.call(&plugin, &leak);
    assert_eq!(r.outcome, Outcome::trap, "{r:?}");
    let message = r.message.unwrap_or_default();
    assert!(message.contains("resource table"), "{message:?}");
    assert!(!sandbox.has_instance(), "the instance was kept");
    let fine = Event::put(&Arc::from("test"), "k", Bytes::from_static(b"none"), 1);
    let r = sandbox.call(&plugin, &fine);
    assert_eq!(r.outcome, Outcome::ok, "{r:?}");
}

/// Beside `event-log`: the sleeper's calls all end as timeouts within about
/// their deadline, counted, and trapping on every call it is quarantined
/// with its events kept.
#[test]
fn fault_sleep_beside_event_log() {
    let g = beside_event_log(
        FAULT,
        &format!("retry_backoff = \"1ms\"\n[limits]\ntimeout_ms = {SHORT_MS}\n"),
        |i| WAITS[i % WAITS.len()].to_owned(),
    );
    assert_trapping_fault(&g, FAULT, "timeout");
    let m = g.metrics();
    let calls = m[&format!("watchgate_plugin_call_seconds_count{{plugin=\"{FAULT}\"}}")];
    assert!(calls >= 5.0, "{calls} calls");
    assert!(
        waits_cut_off(&m, FAULT) >= 4.0,
        "{} waits cut off",
        waits_cut_off(&m, FAULT)
    );
    // Every call ended within the histogram's bucket of about 1.6 s (the
    // bounds double from 50 µs), five deadlines: none waited out its
    // minute.
    let within = m
        .iter()
        .find(|(k, _)| {
            let le = k
                .split("le=\"")
                .nth(1)
                .and_then(|v| v.split('"').next())
                .and_then(|v| v.parse::<f64>().ok());
            k.starts_with("watchgate_plugin_call_seconds_bucket{")
                && k.contains(&format!("plugin=\"{FAULT}\""))
                && le.is_some_and(|le| (1.5..1.7).contains(&le))
        })
        .map(|(_, v)| *v)
        .expect("a bucket of about 1.6 s");
    assert_eq!(within, calls, "some calls of {FAULT} took over 1.6 s");
    assert_eq!(outcome(&m, FAULT, "trap"), 0.0, "a wait was not a timeout");
    // The failures logged name the wait and the limit.
    let log = g.log();
    assert!(
        log.contains("was cut off") && log.contains("timeout_ms = 300"),
        "no failure naming the cut-off wait and its limit in the log"
    );
}

/// Removing the sleeper's file unloads it within its deadline and a margin
/// while it is in a call, a plugin dropped in afterwards loads, and SIGTERM
/// with another sleeper in a call stops the gateway well within its grace.
#[test]
fn unload_and_shutdown_do_not_wait_out_a_sleeping_plugin() {
    // One attempt per event and never quarantined: the sleeper goes from
    // one minute-long wait to the next through its backlog.
    let sidecar =
        format!("retry_attempts = 1\nquarantine_after = 0\n[limits]\ntimeout_ms = {DEFAULT_MS}\n");
    let mut g = beside_event_log(FAULT, &sidecar, |i| WAITS[i % WAITS.len()].to_owned());
    // A second sleeper, started from the snapshot: N events to sleep on.
    g.install("sleeper-2", FAULT, &sidecar);
    wait_for(
        "both sleepers in their backlogs",
        Duration::from_secs(30),
        || {
            let m = g.metrics();
            (outcome(&m, FAULT, "timeout") >= 2.0 && outcome(&m, "sleeper-2", "timeout") >= 1.0)
                .then_some(())
        },
    );
    let bound = Duration::from_millis(DEFAULT_MS) + STOP_MARGIN + SLACK;

    // Unload while a call sleeps: done (its thread waited for, the loader
    // told) within the call's deadline and the stop margin, and the thread
    // ended (none was left behind).
    let removed = Instant::now();
    std::fs::remove_file(g.path(&format!("plugins.d/{FAULT}.wasm"))).unwrap();
    wait_for(&format!("{FAULT} to unload"), bound, || {
        unloaded_in_log(&g.log(), FAULT).then_some(())
    });
    let unloaded = removed.elapsed();
    assert!(!g.plugin_names().iter().any(|n| n == FAULT));
    eprintln!("{FAULT} unloaded {unloaded:?} after its file was removed");
    let m = g.metrics();
    assert_eq!(
        m.get(&format!(
            "watchgate_plugin_threads_abandoned_total{{plugin=\"{FAULT}\"}}"
        ))
        .copied()
        .unwrap_or(0.0),
        0.0,
        "the sleeper's thread outlived its deadline"
    );
    assert_eq!(outcome(&m, FAULT, "ok"), 0.0, "a minute-long wait ended");

    // The loader is free: a plugin dropped in now loads and catches up.
    let dropped_in = Instant::now();
    g.install_event_log("witness");
    g.wait_events("witness", N, bound);
    eprintln!("witness loaded and caught up in {:?}", dropped_in.elapsed());

    // event-log still gets what is written, at once.
    std::fs::write(g.path("watched/after"), "unload").unwrap();
    let events = g.wait_events("event-log", N + 1, PER_EVENT);
    assert_eq!(events[N]["key"], "after");

    // SIGTERM while sleeper-2 sleeps: the default grace is 10 s.
    g.assert_running();
    let before = g.metrics();
    let sleeping = outcome(&before, "sleeper-2", "timeout");
    assert!(
        sleeping < N as f64,
        "sleeper-2 ran out of events to sleep on ({sleeping} timeouts)"
    );
    let signalled = Instant::now();
    let status = g.stop();
    let stopped = signalled.elapsed();
    eprintln!("stopped {stopped:?} after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        stopped < bound,
        "SIGTERM took {stopped:?} with a sleeping plugin (bound {bound:?})"
    );
    let log = g.log();
    assert!(
        !log.contains("Shutdown grace period ran out"),
        "shutdown waited out its grace"
    );
    assert!(
        !log.contains("stopped waiting for it"),
        "a plugin thread outlived its deadline at shutdown"
    );
}
