//! Plugins written in Python, JavaScript and Go, as `scripts/build-plugins`
//! built them into `dist/plugins/`, in a real gateway: each behaviour is one
//! function run once per language (`languages::BEHAVIOUR::{python,
//! javascript, go}`), each with a gateway of its own.
//!
//! * the language's `event-log` writes the same bytes as the Rust
//!   `event-log` beside it, on file events and on etcd events (in a
//!   one-replica cluster, so each line carries a fencing token);
//! * a loop is stopped by fuel and by the deadline, and the next event is
//!   served;
//! * unbounded allocation ends as outcome `memory`;
//! * an error is retried, then dead-lettered;
//! * host state survives the instances a trap and a memory fault replace.
//!
//! The fault fixtures (`py-`, `js-` and `go-fault-by-key`) share the keys
//! used here: `spin`, `alloc`, `error`, `state`, and anything else succeeds.

use serde_json::Value;

use crate::etcd_harness::{Etcd, etcdctl};
use crate::etcd_source::{SENTINEL, Store, etcd_source};
use crate::support::{Gateway, wait_for, write_atomic};
use crate::support_lang::{
    DEADLINE, FILE_SOURCE, Lang, dead_letters, event_log_bytes, install_dist, install_event_log,
    invocations, lang_gateway, plugin_lines, start_loaded, wait_lines,
};

/// One `#[test]` per language for each behaviour function.
macro_rules! per_language {
    ($($behaviour:ident),* $(,)?) => {
        $(
            mod $behaviour {
                use crate::support_lang::Lang;

                #[test]
                fn python() {
                    super::$behaviour(Lang::Python);
                }

                #[test]
                fn javascript() {
                    super::$behaviour(Lang::JavaScript);
                }

                #[test]
                fn go() {
                    super::$behaviour(Lang::Go);
                }
            }
        )*
    };
}

per_language!(
    event_log_matches_rust_on_file_events,
    event_log_matches_rust_on_etcd_events,
    a_loop_is_stopped_and_the_next_event_served,
    the_memory_limit_ends_in_outcome_memory,
    an_error_is_retried_then_dead_lettered,
    state_survives_instance_recycling,
);

/// The Rust `event-log`, the reference.
const RUST: &str = "event-log";

/// Values JSON has to escape or that a serializer may write differently:
/// quotes, backslashes, control characters, DEL, `<`, `&`, U+2028, non-ASCII
/// and a character outside the BMP.
const AWKWARD: &str = "héllo \"q\" \\ \n\t\r\u{1}\u{1f} <&> \u{7f} \u{2028} 😀";

/// A value that is not UTF-8 (`value_b64` "/wBB").
const BINARY: &[u8] = &[0xff, 0x00, 0x41];

/// Text then an invalid sequence: not UTF-8 either.
const MIXED: &[u8] = b"ok \xc3\x28";

fn event_log_matches_rust_on_file_events(lang: Lang) {
    let mut g = lang_gateway(FILE_SOURCE);
    let theirs = lang.event_log();
    // In place before the start: part of the initial snapshot.
    write_atomic(&g.path("watched/before.txt"), b"snapshot");
    install_event_log(&g, RUST, RUST);
    install_event_log(&g, &theirs, &theirs);
    start_loaded(&mut g, lang, &[RUST, &theirs]);
    let logs = [RUST, theirs.as_str()];
    wait_lines(&mut g, &logs, 1);

    let puts: [(&str, &[u8]); 6] = [
        ("app/port", b"8080"),
        ("app/config.json", b"{\"a\": [1, 2]}"),
        ("awkward", AWKWARD.as_bytes()),
        ("binary", BINARY),
        ("empty", b""),
        ("mixed", MIXED),
    ];
    for (key, value) in puts {
        write_atomic(&g.path(&format!("watched/{key}")), value);
    }
    wait_lines(&mut g, &logs, 1 + puts.len());
    // The delete after its put was handled, so nothing can fold them.
    std::fs::remove_file(g.path("watched/app/port")).unwrap();
    let lines = 2 + puts.len();
    let bytes = wait_lines(&mut g, &logs, lines);
    let (rust, other) = (&bytes[0], &bytes[1]);

    let text = String::from_utf8(rust.clone()).expect("event-log writes UTF-8");
    assert_eq!(text.lines().count(), lines, "{text}");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_key = |key: &str| {
        events
            .iter()
            .filter(|e| e["key"] == key)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(by_key("before.txt")[0]["value"], "snapshot");
    assert_eq!(by_key("awkward")[0]["value"], AWKWARD);
    assert_eq!(by_key("binary")[0]["value_b64"], "/wBB", "{text}");
    assert!(by_key("binary")[0].get("value").is_none(), "{text}");
    assert_eq!(by_key("mixed")[0]["value_b64"], "b2sgwyg=", "{text}");
    assert_eq!(by_key("empty")[0]["value"], "");
    let port = by_key("app/port");
    assert_eq!(port.len(), 2, "{text}");
    assert_eq!(port[1]["kind"], "delete");
    assert!(port[1].get("value").is_none() && port[1].get("value_b64").is_none());
    assert!(
        events.iter().all(|e| e.get("fencing_token").is_none()),
        "no cluster, no fencing token: {text}"
    );

    assert_eq!(
        String::from_utf8_lossy(other),
        text,
        "{theirs} must write event-log's bytes"
    );
    assert_eq!(other, rust);
}

/// The fencing token of `plugin`: the create revision of its owner key
/// under the cluster's default prefix.
fn owner_token(endpoint: &str, plugin: &str) -> u64 {
    let out = etcdctl(
        endpoint,
        &[
            "get",
            &format!("/watchgate/cluster/owners/{plugin}"),
            "-w",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(&out).expect("etcdctl -w json");
    v["kvs"][0]["create_revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("no owner key for {plugin}: {out}"))
}

/// The one fencing token on every line of `lines`.
fn the_token(lines: &str) -> u64 {
    let tokens: Vec<u64> = lines
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["fencing_token"]
                .as_u64()
                .unwrap_or_else(|| panic!("a line without a fencing token: {l}"))
        })
        .collect();
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "one owner, one token: {tokens:?}"
    );
    tokens[0]
}

fn event_log_matches_rust_on_etcd_events(lang: Lang) {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let mut store = Store::connect(std::slice::from_ref(&url));
    store.put("/wg/before", "snapshot").unwrap();
    // A cluster of one: every event carries its plugin's fencing token.
    let mut g = lang_gateway(&format!(
        "[cluster]\netcd = [\"{url}\"]\nname = \"gw-lang\"\nlease_ttl = \"5s\"\n\n{}",
        etcd_source(std::slice::from_ref(&url), "")
    ));
    let theirs = lang.event_log();
    install_event_log(&g, RUST, RUST);
    install_event_log(&g, &theirs, &theirs);
    start_loaded(&mut g, lang, &[RUST, &theirs]);
    let logs = [RUST, theirs.as_str()];
    wait_lines(&mut g, &logs, 1);

    store.put("/wg/port", "8080").unwrap();
    store.put("/wg/port", "8081").unwrap();
    store.put("/wg/awkward", AWKWARD).unwrap();
    store.put("/wg/binary", BINARY).unwrap();
    store.put("/wg/empty", "").unwrap();
    store.put("/wg/mixed", MIXED).unwrap();
    store.delete("/wg/port").unwrap();
    store.put("/elsewhere/skipped", "x").unwrap();
    store.put(SENTINEL, "end").unwrap();
    let lines = 9;
    let bytes = wait_for("both logs to reach the sentinel", DEADLINE, || {
        g.assert_running();
        let all: Vec<Vec<u8>> = logs.iter().map(|p| event_log_bytes(&g, p)).collect();
        all.iter()
            .all(|b| String::from_utf8_lossy(b).contains(SENTINEL))
            .then_some(all)
    });
    let rust = String::from_utf8(bytes[0].clone()).expect("event-log writes UTF-8");
    let other = String::from_utf8_lossy(&bytes[1]).into_owned();
    assert_eq!(rust.lines().count(), lines, "{rust}");
    assert!(rust.contains("\"value_b64\":\"/wBB\""), "{rust}");
    assert!(
        rust.contains("\"kind\":\"delete\",\"key\":\"/wg/port\""),
        "{rust}"
    );
    assert!(!rust.contains("/elsewhere/"), "{rust}");

    // Each plugin has its own owner key, so its own token; the lines are
    // the same bytes once the token is swapped.
    let (rust_token, their_token) = (the_token(&rust), the_token(&other));
    assert_eq!(rust_token, owner_token(&url, RUST));
    assert_eq!(their_token, owner_token(&url, &theirs));
    let expected = rust.replace(
        &format!(",\"fencing_token\":{rust_token}}}\n"),
        &format!(",\"fencing_token\":{their_token}}}\n"),
    );
    assert_eq!(other, expected, "{theirs} must write event-log's bytes");
    assert_eq!(bytes[1], expected.as_bytes());
}

/// Each event is tried once and no quarantine gets in the way.
const ONE_ATTEMPT: &str = "retry_attempts = 1\nquarantine_after = 0\n";

/// Limits under which a loop ends by fuel (100M, the default) long
/// before its deadline.
const FUEL_STOPS: &str = "[limits]\nfuel = 100_000_000\ntimeout_ms = 30_000\n";

/// Write the file source's key `key` with `value`.
fn put(g: &Gateway, key: &str, value: &str) {
    write_atomic(&g.path(&format!("watched/{key}")), value.as_bytes());
}

/// The `/v1/plugins` report of `plugin`.
fn report(g: &Gateway, plugin: &str) -> Value {
    g.plugin_report(plugin)
        .unwrap_or_else(|| panic!("{plugin} is not running"))
}

fn a_loop_is_stopped_and_the_next_event_served(lang: Lang) {
    let mut g = lang_gateway(FILE_SOURCE);
    let fixture = lang.fault_by_key();
    install_dist(&g, "fuel", &fixture, &format!("{ONE_ATTEMPT}{FUEL_STOPS}"));
    // Fuel without end: only the wall-clock deadline can stop it.
    install_dist(
        &g,
        "deadline",
        &fixture,
        &format!("{ONE_ATTEMPT}[limits]\nfuel = 1_000_000_000_000_000\ntimeout_ms = 1_000\n"),
    );
    start_loaded(&mut g, lang, &["fuel", "deadline"]);
    put(&g, "spin", "1");
    let stops = [("fuel", "out_of_fuel"), ("deadline", "timeout")];
    wait_for("both loops to be stopped", DEADLINE, || {
        g.assert_running();
        stops
            .iter()
            .all(|(p, outcome)| invocations(&g, p, outcome) == 1.0)
            .then_some(())
    });
    put(&g, "next", "1");
    wait_for("the next event to be served", DEADLINE, || {
        g.assert_running();
        stops
            .iter()
            .all(|(p, _)| invocations(&g, p, "ok") == 1.0)
            .then_some(())
    });
    for (p, outcome) in stops {
        let r = report(&g, p);
        assert_eq!(r["last_failure"]["outcome"], outcome, "{r:#}");
        assert_eq!(r["last_failure"]["key"], "spin", "{r:#}");
        assert_eq!(r["invocations"][outcome], 1, "{r:#}");
        assert_eq!(r["invocations"]["ok"], 1, "{r:#}");
        assert_eq!(r["state"], "running", "{r:#}");
        let letters = dead_letters(&g, p);
        assert_eq!(letters.len(), 1, "{letters:#?}");
        assert_eq!(letters[0]["event"]["key"], "spin");
        assert_eq!(letters[0]["outcome"], outcome);
        // The trap dropped the instance: a fresh one served "next".
        let made = g.metric(&format!(
            "watchgate_plugin_instantiations_total{{plugin=\"{p}\"}}"
        ));
        assert!(made >= 2.0, "{p}: {made} instantiations");
    }
}

fn the_memory_limit_ends_in_outcome_memory(lang: Lang) {
    let mut g = lang_gateway(FILE_SOURCE);
    // 32 MiB holds each language's initial memory (Python's is the
    // largest, 13.3 MiB); fuel and time to spare, so only memory stops it.
    install_dist(
        &g,
        "mem",
        &lang.fault_by_key(),
        &format!(
            "{ONE_ATTEMPT}[limits]\nmemory_mb = 32\nfuel = 1_000_000_000_000\ntimeout_ms = 20_000\n"
        ),
    );
    start_loaded(&mut g, lang, &["mem"]);
    put(&g, "alloc", "1");
    wait_for("the allocation to be stopped", DEADLINE, || {
        g.assert_running();
        (dead_letters(&g, "mem").len() == 1).then_some(())
    });
    let letter = &dead_letters(&g, "mem")[0];
    assert_eq!(letter["event"]["key"], "alloc", "{letter:#}");
    assert_eq!(letter["outcome"], "memory", "{letter:#}");
    assert_eq!(invocations(&g, "mem", "memory"), 1.0);
    let r = report(&g, "mem");
    assert_eq!(r["invocations"]["memory"], 1, "{r:#}");
    assert_eq!(r["last_failure"]["outcome"], "memory", "{r:#}");
    assert_eq!(r["limits"]["memory_mb"], 32, "{r:#}");

    put(&g, "next", "1");
    wait_for("the next event to be served", DEADLINE, || {
        g.assert_running();
        (invocations(&g, "mem", "ok") == 1.0).then_some(())
    });
}

fn an_error_is_retried_then_dead_lettered(lang: Lang) {
    let mut g = lang_gateway(FILE_SOURCE);
    install_dist(
        &g,
        "err",
        &lang.fault_by_key(),
        "retry_attempts = 3\nretry_backoff = \"1ms\"\n",
    );
    start_loaded(&mut g, lang, &["err"]);
    put(&g, "error", "v1");
    wait_for("the error to be dead-lettered", DEADLINE, || {
        g.assert_running();
        (dead_letters(&g, "err").len() == 1).then_some(())
    });
    let letter = &dead_letters(&g, "err")[0];
    assert_eq!(letter["event"]["key"], "error", "{letter:#}");
    assert_eq!(letter["event"]["value"], "v1", "{letter:#}");
    assert_eq!(letter["outcome"], "error", "{letter:#}");
    assert_eq!(letter["attempts"], 3, "{letter:#}");
    let error = letter["error"].as_str().unwrap();
    assert!(error.contains(lang.error_text()), "{letter:#}");
    assert_eq!(invocations(&g, "err", "error"), 3.0);
    assert_eq!(
        g.metric("watchgate_plugin_retries_total{plugin=\"err\"}"),
        2.0
    );
    assert_eq!(
        g.metric("watchgate_dead_letters_total{plugin=\"err\"}"),
        1.0
    );
    let r = report(&g, "err");
    assert_eq!(r["dead_letters"], 1, "{r:#}");
    assert_eq!(r["invocations"]["error"], 3, "{r:#}");
    // An error is not a trap: no quarantine.
    assert_eq!(r["state"], "running", "{r:#}");

    put(&g, "next", "1");
    wait_for("the next event to be served", DEADLINE, || {
        g.assert_running();
        (invocations(&g, "err", "ok") == 1.0).then_some(())
    });
}

fn state_survives_instance_recycling(lang: Lang) {
    let mut g = lang_gateway(FILE_SOURCE);
    install_dist(
        &g,
        "st",
        &lang.fault_by_key(),
        &format!(
            "{ONE_ATTEMPT}[limits]\nfuel = 100_000_000\ntimeout_ms = 30_000\nmemory_mb = 32\n"
        ),
    );
    start_loaded(&mut g, lang, &["st"]);
    let counts = |g: &Gateway| -> Vec<String> {
        plugin_lines(g, "st")
            .into_iter()
            .filter(|m| m.starts_with("count="))
            .collect()
    };
    let instances = |g: &Gateway| g.metric("watchgate_plugin_instantiations_total{plugin=\"st\"}");
    put(&g, "state", "1");
    wait_for("count=1", DEADLINE, || {
        g.assert_running();
        (counts(&g).len() == 1).then_some(())
    });
    // Each fault traps and drops the instance; the next call gets a new
    // one, and the counter in host state goes on.
    for (n, (fault, outcome)) in [("spin", "out_of_fuel"), ("alloc", "memory")]
        .into_iter()
        .enumerate()
    {
        let before = instances(&g);
        put(&g, fault, "1");
        wait_for(&format!("{fault} to end as {outcome}"), DEADLINE, || {
            g.assert_running();
            (invocations(&g, "st", outcome) == 1.0).then_some(())
        });
        put(&g, "state", &(n + 2).to_string());
        wait_for(&format!("count={}", n + 2), DEADLINE, || {
            g.assert_running();
            let dropped = g.metric("watchgate_plugin_log_dropped_total{plugin=\"st\"}");
            assert_eq!(dropped, 0.0, "the rate limit dropped log lines");
            (counts(&g).len() == n + 2).then_some(())
        });
        assert!(
            instances(&g) > before,
            "after {fault}, a new instance served the count"
        );
    }
    assert_eq!(counts(&g), ["count=1", "count=2", "count=3"]);
    // The plugin logs its count during the call; the call is counted once
    // it has returned.
    wait_for("the third call counted", DEADLINE, || {
        (invocations(&g, "st", "ok") >= 3.0).then_some(())
    });
    assert_eq!(invocations(&g, "st", "ok"), 3.0);
}
