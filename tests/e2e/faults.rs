//! Faulty plugins beside `event-log` neither delay nor lose its events, and
//! show up in the outcome metrics.

use std::time::{Duration, Instant};

use crate::support::{Gateway, wait_for};

#[test]
fn panicking_and_spinning_plugins_do_not_delay_or_lose_events() {
    let mut g = Gateway::new();
    g.install_event_log("event-log");
    // Three attempts per event (the default), quickly. This test is about
    // retries and dead letters, so no quarantine (tests/e2e/adversarial.rs
    // and platform.rs cover it).
    g.install(
        "fault-panic",
        "fault-panic",
        "retry_backoff = \"1ms\"\nquarantine_after = 0\n",
    );
    // Unlimited fuel, so the spin ends at the wall-clock deadline; one
    // attempt per event.
    g.install(
        "fault-spin",
        "fault-spin",
        "retry_attempts = 1\nquarantine_after = 0\n[limits]\nfuel = 1_000_000_000_000_000\ntimeout_ms = 150\n",
    );
    g.start();

    const N: usize = 40;
    let started = Instant::now();
    for i in 0..N {
        std::fs::write(g.path(&format!("watched/key-{i:02}")), format!("value {i}")).unwrap();
    }
    let events = g.wait_events("event-log", N, Duration::from_secs(30));
    let took = started.elapsed();
    // fault-spin needs 150 ms per event: had it been in event-log's way,
    // event-log could not have finished before it ran N deadlines.
    let spin_done =
        g.metric("watchgate_plugin_invocations_total{plugin=\"fault-spin\",outcome=\"timeout\"}");
    assert!(
        spin_done < N as f64,
        "event-log finished only after fault-spin handled {spin_done} of {N} events ({took:?})"
    );
    let depth = g.metric("watchgate_plugin_queue_depth{plugin=\"fault-spin\"}");
    assert!(depth > 0.0, "fault-spin's backlog should still be queued");

    // event-log got every key exactly once, nothing lost.
    let mut keys: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), N, "{events:#?}");

    // Each fault is classified: a panic is a trap, the spin a timeout.
    wait_for("all fault calls to finish", Duration::from_secs(60), || {
        g.assert_running();
        let m = g.metrics();
        let panic = m
            .get("watchgate_plugin_invocations_total{plugin=\"fault-panic\",outcome=\"trap\"}")
            .copied()
            .unwrap_or(0.0);
        let spin = m
            .get("watchgate_plugin_invocations_total{plugin=\"fault-spin\",outcome=\"timeout\"}")
            .copied()
            .unwrap_or(0.0);
        (panic == 3.0 * N as f64 && spin == N as f64).then_some(())
    });
    // Every event fault-panic failed on, after its three attempts, is a
    // dead letter.
    wait_for("dead letters", Duration::from_secs(10), || {
        let letters = g.json("/v1/plugins/fault-panic/dead-letters");
        (letters["dead_letters"].as_array().unwrap().len() == N).then_some(())
    });
    assert_eq!(
        g.metric("watchgate_dead_letters_total{plugin=\"fault-panic\"}"),
        N as f64
    );
    assert_eq!(
        g.metric("watchgate_plugin_retries_total{plugin=\"fault-panic\"}"),
        2.0 * N as f64
    );
    assert_eq!(
        g.metric("watchgate_plugin_invocations_total{plugin=\"fault-spin\",outcome=\"timeout\"}"),
        N as f64
    );
    assert_eq!(
        g.metric("watchgate_plugin_invocations_total{plugin=\"fault-panic\",outcome=\"ok\"}"),
        0.0
    );
    // Every trap recycled the instance: one fresh instance per failed call.
    assert!(
        g.metric("watchgate_plugin_instantiations_total{plugin=\"fault-panic\"}") >= 3.0 * N as f64
    );

    // The gateway is still healthy and still delivering.
    std::fs::write(g.path("watched/after"), "still here").unwrap();
    let events = g.wait_events("event-log", N + 1, Duration::from_secs(30));
    assert_eq!(events[N]["key"], "after");
    let plugins = g.json("/v1/plugins");
    let spin = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fault-spin")
        .unwrap();
    assert_eq!(spin["last_failure"]["outcome"], "timeout");

    // Shutdown finishes promptly even with fault-spin busy.
    for i in 0..5 {
        std::fs::write(g.path(&format!("watched/late-{i}")), "x").unwrap();
    }
    let stopping = Instant::now();
    let status = g.stop();
    assert!(status.success(), "exit {status}; log:\n{}", g.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}
