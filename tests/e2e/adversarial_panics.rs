//! Host panics from guest input: a plugin hands the `http` capability
//! requests past every size bound, the 40,000 header names among them that
//! once panicked the `http` crate inside the host, killed the plugin's
//! worker thread and left `/v1/plugins` saying `running` with events
//! queued. Each must be refused with a message naming its bound and
//! counted, while `event-log` beside it gets every event in order, the
//! plugin's state stays true, and the operator can still unload it and
//! stop the gateway within its grace.
//!
//! Where the gateway's own code does panic, the panic is contained where
//! it happens; the library-level tests below raise one through the hooks
//! a caller of the library may set (the `Effects` reporter, called inside
//! an import, and the dispatcher's observer, called in a round outside any
//! call), since no guest input reaches a panic any more.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use watchgate::dispatch::{Dispatcher, PluginMode, PluginSpec, RetryPolicy, StartPosition};
use watchgate::event::{Event, EventSink};
use watchgate::host::http::HttpGrant;
use watchgate::host::log::{Level, LogSink, PluginLog, Stream};
use watchgate::host::{Effects, PluginContext};
use watchgate::runtime::instance::{LoadedPlugin, Sandbox};
use watchgate::runtime::{Runtime, RuntimeConfig};
use watchgate::store::Store;
use watchgate::telemetry::{Metrics, Outcome};

use crate::adversarial::{N, PER_EVENT, beside_event_log, outcome, plugin_lines};
use crate::http_sink::HttpSink;
use crate::support::{GRACE, plugin, wait_for};

const FAULT: &str = "fault-http-abuse";

fn capability(m: &std::collections::BTreeMap<String, f64>, outcome: &str) -> f64 {
    m.get(&format!(
        "watchgate_capability_calls_total{{plugin=\"{FAULT}\",capability=\"http\",outcome=\"{outcome}\"}}"
    ))
    .copied()
    .unwrap_or(0.0)
}

#[test]
fn fault_http_abuse_is_refused_by_size_before_any_library_sees_it() {
    let sink = HttpSink::start();
    let base = format!("http://{}/", sink.addr());
    let mut g = beside_event_log(
        FAULT,
        &format!(
            "retry_attempts = 1\n[grants]\nhttp = [\"{}\"]\n",
            sink.addr()
        ),
        |_| base.clone(),
    );
    wait_for(
        &format!("every {FAULT} call to finish"),
        Duration::from_secs(30),
        || {
            let m = g.metrics();
            (outcome(&m, FAULT, "ok") + outcome(&m, FAULT, "error") + outcome(&m, FAULT, "trap")
                >= N as f64)
                .then_some(())
        },
    );
    let m = g.metrics();
    // Every call returned, none trapped, and the host never panicked.
    assert_eq!(
        outcome(&m, FAULT, "ok"),
        N as f64,
        "{FAULT} saw an abuse queued"
    );
    assert_eq!(outcome(&m, FAULT, "trap"), 0.0);
    assert_eq!(
        m.get(&format!(
            "watchgate_plugin_host_panics_total{{plugin=\"{FAULT}\"}}"
        ))
        .copied()
        .unwrap_or(0.0),
        0.0
    );
    // Five abuses per event are past a size bound, the method is not a
    // method; the control request went out.
    assert_eq!(capability(&m, "too_large"), (N * 5) as f64);
    assert_eq!(capability(&m, "invalid"), N as f64);
    assert_eq!(capability(&m, "queued"), N as f64);
    // Each refusal names its bound. The plugin logs past its line budget,
    // so some lines were dropped (the counts above are exact): every
    // refusal that was logged is one of these, and each is there.
    let lines: Vec<String> = plugin_lines(&g.log(), FAULT)
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.contains(" refused: "))
        .collect();
    // The control header (22 bytes) and eight of 9 + 4096; the base URL
    // and 1 MiB.
    let refusals = [
        "abuse header-count refused: 40000 headers are over the limit of 64 headers per request"
            .to_owned(),
        "abuse header-size refused: header \"x-abuse\" of 1048583 bytes (name and value) is \
         over the limit of 8192 bytes per header"
            .to_owned(),
        "abuse header-total refused: headers of 32862 bytes in all are over the limit of 16384 \
         bytes per request"
            .to_owned(),
        format!(
            "abuse url-size refused: url of {} bytes is over the limit of 8192 bytes",
            base.len() + (1 << 20)
        ),
        "abuse body-size refused: body of 4194304 bytes is over the limit of 1048576 bytes"
            .to_owned(),
    ];
    let method = |l: &str| {
        l.starts_with("abuse method-size refused: method \"POSTPOST")
            && l.ends_with("… (1048576 bytes) is not allowed")
            && l.len() < 200
    };
    for refusal in &refusals {
        assert!(
            lines.contains(refusal),
            "{refusal:?} not logged: {lines:#?}"
        );
    }
    assert!(lines.iter().any(|l| method(l)), "{lines:#?}");
    let unexpected: Vec<&String> = lines
        .iter()
        .filter(|l| !refusals.contains(l) && !method(l))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    // Only the control requests reached the granted host, one per event.
    let received = wait_for(
        "every control request at the sink",
        Duration::from_secs(30),
        || {
            let r = sink.received();
            (r.len() >= N).then_some(r)
        },
    );
    let mut urls: Vec<String> = received.iter().map(|r| r.url.clone()).collect();
    urls.sort();
    let expected: Vec<String> = (0..N).map(|i| format!("/control/k{i:02}")).collect();
    assert_eq!(urls, expected);
    // The state shown is true: running, nothing left queued, no failure.
    let r = g.plugin_report(FAULT).expect("the plugin runs");
    assert_eq!(r["state"], "running", "{r:#}");
    assert_eq!(r["queue_depth"], 0, "{r:#}");
    assert_eq!(r["invocations"]["ok"], N, "{r:#}");
    assert!(r["last_failure"].is_null(), "{r:#}");

    // The operator unloads it; event-log goes on.
    std::fs::remove_file(g.path(&format!("plugins.d/{FAULT}.wasm"))).unwrap();
    wait_for("the unload", Duration::from_secs(30), || {
        g.plugin_report(FAULT).is_none().then_some(())
    });
    std::fs::write(g.path("watched/after"), "x").unwrap();
    let events = g.wait_events("event-log", N + 1, PER_EVENT);
    assert_eq!(events[N]["key"], "after");
    // And stops the gateway within its grace.
    g.stop_within(GRACE);
}

/// Drops plugin log lines.
struct Quiet;
impl LogSink for Quiet {
    fn line(&self, _: &str, _: Level, _: Stream, _: &str) {}
}

/// `example` as `name`, with `ctx` changed by `with`.
fn loaded(
    runtime: &Runtime,
    example: &str,
    name: &str,
    metrics: &Arc<Metrics>,
    with: impl FnOnce(&mut PluginContext),
) -> LoadedPlugin {
    let mut ctx = PluginContext::new(
        name,
        Arc::default(),
        Arc::new(PluginLog::new(
            name,
            1_000,
            Arc::new(Quiet),
            metrics.clone(),
        )),
        metrics.clone(),
    );
    with(&mut ctx);
    LoadedPlugin {
        compiled: runtime
            .compile(&std::fs::read(plugin(example)).unwrap())
            .unwrap(),
        ctx: Arc::new(ctx),
        version: 1,
        limits: RuntimeConfig::default().defaults,
    }
}

fn put(source: &Arc<str>, key: &str, value: &str, seq: u64) -> Event {
    Event::put(source, key, Bytes::from(value.to_owned()), seq)
}

fn host_panics(metrics: &Metrics, plugin: &str) -> f64 {
    let sample = format!("watchgate_plugin_host_panics_total{{plugin=\"{plugin}\"}} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&sample)?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_host_panic_inside_an_import_fails_the_call_as_a_trap_and_replaces_the_instance() {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let metrics = Metrics::shared();
    // The reporter runs inside the `http` import, with the guest's frames
    // below it on the stack.
    let plugin = loaded(&runtime, "capability-probe", "probe", &metrics, |ctx| {
        ctx.http = Some(HttpGrant::new(&["127.0.0.1:9".into()], None).unwrap());
        ctx.effects = Effects {
            perform: false,
            report: Some(Arc::new(|_| panic!("reporter fell over"))),
        };
    });
    let mut sandbox = Sandbox::new(runtime);
    let source: Arc<str> = Arc::from("local");
    let send = r#"{"op": "http", "url": "http://127.0.0.1:9/"}"#;
    let read = r#"{"op": "setting", "name": "x"}"#;

    let report = sandbox.call(&plugin, &put(&source, "a", send, 1));
    assert_eq!(report.outcome, Outcome::trap);
    let message = report.message.unwrap();
    assert!(
        message.contains("the gateway panicked during this call")
            && message.ends_with(": reporter fell over"),
        "{message}"
    );
    assert!(!sandbox.has_instance(), "a panicked store is entered again");
    assert_eq!(host_panics(&metrics, "probe"), 1.0);

    // The next call gets a fresh instance and succeeds; the one after it
    // panics and is contained again.
    let report = sandbox.call(&plugin, &put(&source, "b", read, 2));
    assert_eq!(report.outcome, Outcome::ok, "{:?}", report.message);
    assert!(sandbox.has_instance());
    let report = sandbox.call(&plugin, &put(&source, "c", send, 3));
    assert_eq!(report.outcome, Outcome::trap);
    assert_eq!(host_panics(&metrics, "probe"), 2.0);
    let instances = metrics
        .encode()
        .lines()
        .find_map(|l| {
            l.strip_prefix("watchgate_plugin_instantiations_total{plugin=\"probe\"} ")?
                .parse::<f64>()
                .ok()
        })
        .unwrap();
    assert_eq!(instances, 2.0);
}

fn spec(loaded: LoadedPlugin) -> PluginSpec {
    PluginSpec {
        loaded,
        subscriptions: Vec::new(),
        grants: watchgate::host::Grants::default(),
        queue_capacity: 1_000,
        retry: RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(1),
            quarantine_after: 0,
            ..RetryPolicy::default()
        },
        start: StartPosition::Now,
        mode: PluginMode::Single,
        batch_max: 1,
        dead_letters: watchgate::store::DeadLetterCap::default(),
    }
}

fn plugin_report(d: &Dispatcher, name: &str) -> Value {
    let r = d.report(name).expect("the plugin runs");
    serde_json::to_value(r).unwrap()
}

#[test]
fn a_worker_survives_host_panics_in_its_calls_with_every_one_counted() {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let metrics = Metrics::shared();
    let d = Dispatcher::new(
        runtime.clone(),
        metrics.clone(),
        Arc::new(Store::in_memory()),
        [("local".to_owned(), true)],
    );
    d.upsert(spec(loaded(
        &runtime,
        "capability-probe",
        "probe",
        &metrics,
        |ctx| {
            ctx.http = Some(HttpGrant::new(&["127.0.0.1:9".into()], None).unwrap());
            ctx.effects = Effects {
                perform: false,
                report: Some(Arc::new(|_| panic!("reporter fell over"))),
            };
        },
    )))
    .unwrap();
    let source: Arc<str> = Arc::from("local");
    let send = r#"{"op": "http", "url": "http://127.0.0.1:9/"}"#;
    let read = r#"{"op": "setting", "name": "x"}"#;
    // Panicking calls between good ones: each panicking event is tried
    // twice, then dead-lettered; the good ones all succeed.
    let events: Vec<Event> = (0..6u64)
        .map(|i| {
            put(
                &source,
                &format!("k{i}"),
                if i % 2 == 0 { send } else { read },
                i + 1,
            )
        })
        .collect();
    d.deliver("local", events);
    wait_for(
        "every event handled or dead-lettered",
        Duration::from_secs(30),
        || {
            let r = plugin_report(&d, "probe");
            (r["invocations"]["ok"] == 3 && r["dead_letters"] == 3).then_some(r)
        },
    );
    let r = plugin_report(&d, "probe");
    assert_eq!(r["state"], "running", "{r:#}");
    assert_eq!(r["invocations"]["trap"], 6, "{r:#}");
    assert_eq!(r["queue_depth"], 0, "{r:#}");
    assert_eq!(r["last_failure"]["outcome"], "trap", "{r:#}");
    assert_eq!(host_panics(&metrics, "probe"), 6.0);
    // Still taking events.
    d.deliver("local", vec![put(&source, "later", read, 7)]);
    wait_for("the later event", Duration::from_secs(30), || {
        (d.handled("probe") == Some(4)).then_some(())
    });
    d.shutdown();
}

#[test]
fn a_panic_in_a_round_outside_any_call_shows_the_plugin_failed_until_a_new_version() {
    let runtime = Runtime::new(&RuntimeConfig::default()).unwrap();
    let metrics = Metrics::shared();
    let d = Dispatcher::new(
        runtime.clone(),
        metrics.clone(),
        Arc::new(Store::in_memory()),
        [("local".to_owned(), true)],
    );
    d.upsert(spec(loaded(&runtime, "noop", "doomed", &metrics, |_| {})))
        .unwrap();
    d.upsert(spec(loaded(&runtime, "noop", "healthy", &metrics, |_| {})))
        .unwrap();
    // The observer runs in each round before the calls.
    d.set_observer(Some(Box::new(|plugin, _| {
        assert_ne!(plugin, "doomed", "observer fell over");
    })));
    let source: Arc<str> = Arc::from("local");
    d.deliver("local", vec![put(&source, "a", "1", 1)]);
    let r = wait_for("doomed to fail", Duration::from_secs(30), || {
        let r = plugin_report(&d, "doomed");
        (r["state"] == "failed").then_some(r)
    });
    let message = r["last_failure"]["message"].as_str().unwrap();
    assert!(
        message.contains("the gateway panicked in this plugin's worker")
            && message.contains("observer fell over"),
        "{r:#}"
    );
    assert_eq!(r["invocations"]["ok"], 0, "{r:#}");
    assert_eq!(host_panics(&metrics, "doomed"), 1.0);
    // Its neighbour goes on, and a failed plugin takes nothing more.
    d.deliver("local", vec![put(&source, "b", "2", 2)]);
    wait_for("healthy to handle both", Duration::from_secs(30), || {
        (d.handled("healthy") == Some(2)).then_some(())
    });
    let r = plugin_report(&d, "doomed");
    assert_eq!(r["state"], "failed", "{r:#}");
    assert_eq!(r["queue_depth"], 0, "{r:#}");
    // A new version of it starts afresh and handles what comes next.
    d.set_observer(None);
    d.upsert(spec(loaded(&runtime, "noop", "doomed", &metrics, |_| {})))
        .unwrap();
    assert_eq!(plugin_report(&d, "doomed")["state"], "running");
    d.deliver("local", vec![put(&source, "c", "3", 3)]);
    wait_for(
        "the new version to handle c",
        Duration::from_secs(30),
        || d.handled("doomed").is_some_and(|n| n >= 1).then_some(()),
    );
    // It can be removed, without waiting on a thread that is gone.
    d.set_observer(Some(Box::new(|plugin, _| {
        assert_ne!(plugin, "doomed", "observer fell over");
    })));
    d.deliver("local", vec![put(&source, "d", "4", 4)]);
    wait_for("doomed to fail again", Duration::from_secs(30), || {
        (plugin_report(&d, "doomed")["state"] == "failed").then_some(())
    });
    let removing = Instant::now();
    assert!(d.remove("doomed"));
    assert!(removing.elapsed() < Duration::from_secs(5));
    assert_eq!(d.plugin_names(), vec!["healthy".to_owned()]);
    d.shutdown();
}
