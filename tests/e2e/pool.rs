//! The shared pool: with more plugins than cores, quick plugins run on a
//! few shared threads. What must hold there as on a plugin's own thread:
//! every event in order, and a failing call retried exactly as configured
//! (the pool hands the plugin back to its own thread for the retries, with
//! the failed first attempt counted once).

use serde_json::Value;

use crate::etcd_harness::Etcd;
use crate::etcd_source::{DEADLINE, Store, changes};
use crate::support::{Gateway, wait_for};

/// An etcd source over the whole keyspace, so `fault-by-key` sees the bare
/// keys it acts on (`error`, `panic`).
fn whole_keyspace(url: &str) -> String {
    format!(
        "[[source]]\nname = \"main\"\nkind = \"etcd\"\nendpoints = [{url:?}]\nprefix = \"\"\nreconnect_max_ms = 500\n"
    )
}

fn pooled(g: &Gateway, names: &[String]) -> Vec<String> {
    let body = g.json("/v1/plugins");
    body["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter(|p| p["pooled"] == Value::Bool(true))
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .filter(|n| names.contains(n))
        .collect()
}

/// Put keys until every plugin in `names` is pooled; returns how many.
fn put_until_pooled(g: &mut Gateway, store: &mut Store, names: &[String], from: usize) -> usize {
    let mut next = from;
    wait_for("every plugin pooled", DEADLINE, || {
        g.assert_running();
        for _ in 0..16 {
            store.put(&format!("k{next:05}"), "v").unwrap();
            next += 1;
        }
        (pooled(g, names).len() == names.len()).then_some(())
    });
    next
}

fn calls(g: &Gateway, plugin: &str, outcome: &str) -> f64 {
    g.metrics()
        .get(&format!(
            "watchgate_plugin_invocations_total{{plugin=\"{plugin}\",outcome=\"{outcome}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
}

#[test]
fn pooled_plugins_keep_order_and_retry_failures_exactly_on_their_own_thread() {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let mut store = Store::connect(std::slice::from_ref(&url));
    let mut g = Gateway::with_sources(&whole_keyspace(&url));
    // More plugins than cores, so pooling pays.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    // One event per call: a trap in a batch call is not pinned on one
    // event, so all its attempts would be made on its own thread.
    let settings =
        "retry_attempts = 3\nretry_backoff = \"1ms\"\nqueue_capacity = 1_000_000\nbatch_max = 1\n";
    let faulty: Vec<String> = (0..=cores).map(|i| format!("fbk{i}")).collect();
    for n in &faulty {
        g.install(n, "fault-by-key", settings);
    }
    g.install(
        "log",
        "event-log",
        &format!("{settings}[grants]\nfiles = \"../out/log\"\n"),
    );
    g.start();
    let mut all = faulty.clone();
    all.push("log".to_owned());
    let next = put_until_pooled(&mut g, &mut store, &all, 0);

    // A trap and a handler error, each on every attempt, the first on the
    // pool. A
    // trap drops the instance, so each attempt after a trapped one makes a
    // new one: counting them counts the attempts actually made.
    let made = |g: &Gateway, n: &str| {
        g.metric(&format!(
            "watchgate_plugin_instantiations_total{{plugin=\"{n}\"}}"
        ))
    };
    let before: Vec<f64> = faulty.iter().map(|n| made(&g, n)).collect();
    store.put("panic", "1").unwrap();
    store.put("error", "1").unwrap();
    store.put("after", "1").unwrap();
    wait_for("the failures dead-lettered", DEADLINE, || {
        g.assert_running();
        faulty
            .iter()
            .all(|n| g.metric(&format!("watchgate_dead_letters_total{{plugin=\"{n}\"}}")) == 2.0)
            .then_some(())
    });
    wait_for("the event after the trap handled", DEADLINE, || {
        faulty
            .iter()
            .all(|n| calls(&g, n, "ok") == (next + 1) as f64)
            .then_some(())
    });
    for (n, before) in faulty.iter().zip(before) {
        assert_eq!(calls(&g, n, "error"), 3.0, "{n}: attempts on `error`");
        assert_eq!(calls(&g, n, "trap"), 3.0, "{n}: attempts on `panic`");
        // The 2nd and 3rd attempts on `panic`, and the next call: a pool
        // attempt made but not counted as the first would be one more.
        assert_eq!(made(&g, n) - before, 3.0, "{n}: instances made");
    }
    // The metric counts a dead letter as it is made; the listing reads
    // the store, which has it once the writer has committed it.
    let letters = wait_for("the dead letters listed", DEADLINE, || {
        let body = g.json("/v1/plugins/fbk0/dead-letters");
        let list = body["dead_letters"]
            .as_array()
            .expect("dead letters")
            .clone();
        (list.len() == 2).then_some(list)
    });
    let attempts: Vec<(String, u64)> = letters
        .iter()
        .map(|l| {
            (
                l["event"]["key"].as_str().unwrap().to_owned(),
                l["attempts"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        vec![("panic".to_owned(), 3), ("error".to_owned(), 3)]
    );

    // Back on the pool once quick again, still in order.
    let end = put_until_pooled(&mut g, &mut store, &faulty, next);
    store.put("zz-end", "1").unwrap();
    let events = wait_for("the last put logged", DEADLINE, || {
        g.assert_running();
        let e = g.events("log");
        e.iter().any(|e| e["key"] == "zz-end").then_some(e)
    });
    let keys: Vec<String> = changes(&events).into_iter().map(|c| c.1).collect();
    let mut expected: Vec<String> = (0..next).map(|i| format!("k{i:05}")).collect();
    expected.extend(["panic", "error", "after"].map(str::to_owned));
    expected.extend((next..end).map(|i| format!("k{i:05}")));
    expected.push("zz-end".to_owned());
    assert_eq!(keys, expected, "every event once, in order");
    assert!(g.stop().success());
}
