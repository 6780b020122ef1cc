//! Durable delivery: per-plugin cursors in the state directory, resume after
//! a stop or a `kill -9`, resync where the history is gone, dead letters,
//! plugin state, and the state store's own failure modes.
//!
//! The ground truth for etcd is etcd's own history, as in `etcd_source`.
//! Delivery is at least once: a test counts duplicates and bounds them, and
//! checks that every change arrived and that each key's changes arrive in
//! order within every run of the gateway.

use rand::RngExt;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;

use crate::etcd_harness::Etcd;
use crate::etcd_source::{
    Change, DEADLINE, SENTINEL, Store, changes, etcd_source, spawn_writer, wait_sentinel,
};
use crate::support::{Gateway, wait_for};

/// `event-log` as `event-log`, with a queue that never folds (so every
/// change is its own line and can be matched against the history).
fn install_unfolded_event_log(g: &Gateway) {
    g.install(
        "event-log",
        "event-log",
        "queue_capacity = 1_000_000\n[grants]\nfiles = \"../out/event-log\"\n",
    );
}

fn etcd_gateway(url: &str) -> Gateway {
    let g = Gateway::with_sources(&etcd_source(&[url.to_owned()], ""));
    install_unfolded_event_log(&g);
    g
}

/// Per key, how often the delivered revisions go back (a replay after a
/// restart); panics if a key's events went back to a revision never
/// delivered before (that would be a reordering, not a replay).
fn replays_per_key(delivered: &[Change]) -> BTreeMap<String, usize> {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut seen: HashSet<(&str, u64)> = HashSet::new();
    let mut back: BTreeMap<String, usize> = BTreeMap::new();
    for (_, key, _, rev) in delivered {
        if let Some(&prev) = last.get(key.as_str())
            && *rev <= prev
        {
            assert!(
                seen.contains(&(key.as_str(), *rev)),
                "{key}: revision {rev} arrived after {prev} without having been delivered before"
            );
            *back.entry(key.clone()).or_default() += 1;
        }
        last.insert(key, *rev);
        seen.insert((key, *rev));
    }
    back
}

#[test]
fn kill_9_several_times_during_5000_changes_loses_nothing() {
    const CHANGES: usize = 5000;
    const KILLS: usize = 4;
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let mut g = etcd_gateway(&url);
    g.start();

    let (writer, progress) = spawn_writer(&url, CHANGES, 9, 60);
    let seed: u64 = rand::rng().random();
    eprintln!("kill points seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut points: Vec<usize> = (0..KILLS)
        .map(|_| rng.random_range(200..CHANGES - 200))
        .collect();
    points.sort_unstable();
    for p in &points {
        wait_for(&format!("{p} writes"), DEADLINE, || {
            (progress.load(Ordering::SeqCst) >= *p).then_some(())
        });
        g.kill9();
        g.start();
    }
    writer.join().unwrap();
    let mut store = Store::connect(&[url]);
    store.put(SENTINEL, "end").unwrap();
    let events = wait_sentinel(&mut g);
    let delivered = changes(&events);
    let history = store.history(1);

    let got: HashSet<&Change> = delivered.iter().collect();
    let missing: Vec<&Change> = history.iter().filter(|c| !got.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} changes never arrived (kills after writes {points:?}), first: {:?}",
        missing.len(),
        history.len(),
        &missing[..missing.len().min(5)]
    );
    let known: HashSet<&Change> = history.iter().collect();
    assert!(
        delivered.iter().all(|c| known.contains(c)),
        "something arrived that etcd never had"
    );
    assert!(
        events
            .iter()
            .all(|e| e["coalesced"] == 0 && e["resync"] == false)
    );
    let replays = replays_per_key(&delivered);
    assert!(
        replays.values().all(|&n| n <= KILLS),
        "a key went back more often than the gateway was killed: {replays:?}"
    );
    let duplicates = delivered.len() - history.len();
    eprintln!(
        "{} changes, {} delivered, {duplicates} duplicates after {KILLS} kills at writes {points:?}",
        history.len(),
        delivered.len()
    );
    // Duplicates come only from events handled after the last committed
    // cursor (one commit interval's worth per crash).
    assert!(
        duplicates <= KILLS * 500,
        "{duplicates} duplicates for {KILLS} crashes"
    );
}

/// A gateway that saw `/wg/a` and `/wg/b`, then stopped; returns it and
/// the store client.
fn seen_then_stopped(etcd: &Etcd) -> (Gateway, Store) {
    let url = etcd.client_url();
    let mut store = Store::connect(std::slice::from_ref(&url));
    store.put("/wg/a", "1").unwrap();
    store.put("/wg/b", "1").unwrap();
    let mut g = etcd_gateway(&url);
    g.start();
    g.wait_events("event-log", 2, DEADLINE);
    let status = g.stop();
    assert!(status.success(), "exit {status}; log:\n{}", g.log());
    (g, store)
}

#[test]
fn etcd_changes_made_while_stopped_are_replayed_from_the_cursor() {
    let etcd = Etcd::start();
    let (mut g, mut store) = seen_then_stopped(&etcd);
    let stopped_at = store.revision();
    store.delete("/wg/a").unwrap();
    store.put("/wg/b", "2").unwrap();
    store.put("/wg/c", "1").unwrap();
    store.put("/wg/b", "3").unwrap();
    g.start();
    assert!(
        g.log()
            .contains("Resuming the watch from the plugins' cursors."),
        "{}",
        g.log()
    );
    store.put(SENTINEL, "end").unwrap();
    let delivered = changes(&wait_sentinel(&mut g));
    // Every change, in order, exactly once: the history is still there, so
    // the watch replays it rather than relisting.
    assert_eq!(&delivered[2..], &store.history(stopped_at + 1)[..]);
    assert_eq!(
        g.metric("watchgate_source_resyncs_total{source=\"main\"}"),
        0.0
    );
}

#[test]
fn compaction_past_the_cursor_while_stopped_relists_and_flags_deletes_resync() {
    let etcd = Etcd::start();
    let (mut g, mut store) = seen_then_stopped(&etcd);
    store.delete("/wg/a").unwrap();
    store.put("/wg/b", "2").unwrap();
    store.put("/wg/c", "1").unwrap();
    let now = store.revision();
    store.compact(now);
    g.start();
    let events = g.wait_events("event-log", 5, DEADLINE);
    let after: Vec<(String, String, Option<String>, bool)> = events[2..]
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_str().map(str::to_owned),
                e["resync"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        after,
        vec![
            ("delete".into(), "/wg/a".into(), None, true),
            ("put".into(), "/wg/b".into(), Some("2".into()), true),
            ("put".into(), "/wg/c".into(), Some("1".into()), true),
        ]
    );
    assert_eq!(
        g.metric("watchgate_source_resyncs_total{source=\"main\"}"),
        1.0
    );
    // Then ordinary watching goes on.
    store.put(SENTINEL, "end").unwrap();
    let events = wait_sentinel(&mut g);
    assert_eq!(events.len(), 6, "{events:#?}");
}

/// `(kind, key, value, resync)` of event-log lines.
fn kkvr(events: &[Value]) -> Vec<(String, String, Option<String>, bool)> {
    events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_str().map(str::to_owned),
                e["resync"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn files_removed_or_changed_while_down_arrive_as_resync_after_a_stop_or_a_crash() {
    let mut g = Gateway::new();
    install_unfolded_event_log(&g);
    for k in ["a", "b", "c"] {
        std::fs::write(g.path(&format!("watched/{k}")), "1").unwrap();
    }
    g.start();
    g.wait_events("event-log", 3, DEADLINE);
    assert!(g.stop().success());

    std::fs::remove_file(g.path("watched/a")).unwrap();
    std::fs::write(g.path("watched/b"), "2").unwrap();
    g.start();
    let events = g.wait_events("event-log", 5, DEADLINE);
    assert_eq!(
        kkvr(&events[3..]),
        vec![
            ("delete".into(), "a".into(), None, true),
            ("put".into(), "b".into(), Some("2".into()), true),
        ]
    );
    // Revisions count on across the restart; they never go back.
    let revisions: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(revisions[3] > revisions[2], "{revisions:?}");

    // A crash right after a change was handled: at least once, nothing
    // lost, and the unchanged `c` is never sent again.
    std::fs::write(g.path("watched/d"), "1").unwrap();
    g.wait_events("event-log", 6, DEADLINE);
    g.kill9();
    std::fs::remove_file(g.path("watched/d")).unwrap();
    g.start();
    let events = wait_for("the delete of d", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        e.iter()
            .any(|e| e["key"] == "d" && e["kind"] == "delete")
            .then_some(e)
    });
    let tail = kkvr(&events[6..]);
    assert!(
        tail.iter().all(|(_, k, _, _)| k == "d"),
        "only d may repeat or arrive: {tail:?}"
    );
    assert_eq!(
        tail.last().unwrap(),
        &("delete".into(), "d".into(), None, true)
    );
    let plugins = g.json("/v1/plugins");
    assert!(
        plugins["plugins"][0]["cursors"]["local"].as_u64().unwrap() > 0,
        "{plugins:#}"
    );
}

#[test]
fn start_now_skips_the_snapshot_and_a_replaced_plugin_keeps_its_cursor() {
    let mut g = Gateway::new();
    for k in ["x", "y"] {
        std::fs::write(g.path(&format!("watched/{k}")), "1").unwrap();
    }
    g.install_event_log("snap");
    g.install(
        "now",
        "event-log",
        "start = \"now\"\n[grants]\nfiles = \"../out/now\"\n",
    );
    g.start();
    std::fs::write(g.path("watched/z"), "1").unwrap();
    let snap = g.wait_events("snap", 3, DEADLINE);
    let now = g.wait_events("now", 1, DEADLINE);
    assert_eq!(snap.len(), 3);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0]["key"], "z");

    // A new build of `snap` (a different file: event-log with a custom
    // section appended) keeps its queue and cursor: nothing is sent again.
    let digest = |g: &Gateway| -> Value {
        let p = g.json("/v1/plugins");
        p["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "snap")
            .map(|p| p["digest"].clone())
            .unwrap()
    };
    let old = digest(&g);
    let mut wasm = std::fs::read(crate::support::plugin("event-log")).unwrap();
    let name = b"rebuilt";
    let payload = b"2";
    wasm.push(0); // custom section
    wasm.push((1 + name.len() + payload.len()) as u8);
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    wasm.extend_from_slice(payload);
    crate::support::write_atomic(&g.path("plugins.d/snap.wasm"), &wasm);
    wait_for("snap to be replaced", DEADLINE, || {
        (digest(&g) != old).then_some(())
    });
    std::fs::write(g.path("watched/marker"), "1").unwrap();
    let snap = g.wait_events("snap", 4, DEADLINE);
    assert_eq!(snap[3]["key"], "marker");

    // After a restart both resume from their cursors: only what changed.
    assert!(g.stop().success());
    std::fs::write(g.path("watched/w"), "1").unwrap();
    g.start();
    std::fs::write(g.path("watched/after"), "1").unwrap();
    let snap = g.wait_events("snap", 6, DEADLINE);
    let now = g.wait_events("now", 4, DEADLINE);
    let keys = |e: &[Value]| -> Vec<String> {
        e.iter()
            .map(|e| e["key"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(keys(&snap[4..]), ["w", "after"]);
    assert_eq!(keys(&now[2..]), ["w", "after"]);
}

#[test]
fn an_unreadable_store_stops_the_start_until_reset_and_reset_refuses_a_running_store() {
    let mut g = Gateway::new();
    g.install_event_log("event-log");
    std::fs::create_dir_all(g.path("data")).unwrap();
    let garbage = vec![0x5a_u8; 16 * 1024];
    std::fs::write(g.path("data/state.redb"), &garbage).unwrap();
    let config = g.config_path();
    let config = config.to_str().unwrap();
    let (code, _, stderr) = g.cli(&["run", "--config", config]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is unreadable"), "{stderr}");
    assert!(stderr.contains("watchgate state reset"), "{stderr}");
    // Never silently discarded.
    assert_eq!(std::fs::read(g.path("data/state.redb")).unwrap(), garbage);

    let (code, stdout, stderr) = g.cli(&["state", "reset", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    let moved = stdout
        .lines()
        .find_map(|l| l.strip_prefix("state store moved aside to "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(std::fs::read(moved).unwrap(), garbage);

    std::fs::write(g.path("watched/a"), "1").unwrap();
    g.start();
    g.wait_events("event-log", 1, DEADLINE);
    let (code, _, stderr) = g.cli(&["state", "reset", "--config", config]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
}

/// A gateway with an admin token.
fn with_token(g: &Gateway) {
    let path = g.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
            1,
        ),
    )
    .unwrap();
}

fn letters(g: &Gateway, plugin: &str) -> Vec<Value> {
    g.json(&format!("/v1/plugins/{plugin}/dead-letters"))["dead_letters"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn dead_letters_persist_and_are_listed_replayed_and_deleted() {
    let mut g = Gateway::new();
    with_token(&g);
    let quick = "retry_attempts = 2\nretry_backoff = \"1ms\"\n";
    g.install("fbk", "fault-by-key", quick);
    g.install(
        "log",
        "event-log",
        &format!("{quick}[grants]\nfiles = \"../out/log\"\n"),
    );
    // event-log cannot append while its file is a directory.
    std::fs::create_dir_all(g.path("out/log/events.jsonl")).unwrap();
    g.start();
    std::fs::write(g.path("watched/error"), "1").unwrap();
    std::fs::write(g.path("watched/x"), "1").unwrap();
    wait_for("dead letters", DEADLINE, || {
        (letters(&g, "fbk").len() == 1 && letters(&g, "log").len() == 2).then_some(())
    });
    let fbk = letters(&g, "fbk");
    assert_eq!(fbk[0]["event"]["key"], "error");
    assert_eq!(fbk[0]["attempts"], 2);
    assert_eq!(fbk[0]["outcome"], "error");
    assert_eq!(
        g.metric("watchgate_dead_letters_total{plugin=\"log\"}"),
        2.0
    );
    assert!(g.stop().success());

    // Listed from the store itself while no gateway runs.
    let config = g.config_path();
    let config = config.to_str().unwrap();
    let (code, stdout, stderr) = g.cli(&[
        "dead-letters",
        "list",
        "--config",
        config,
        "--plugin",
        "fbk",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["dead_letters"][0]["event"]["key"], "error");

    // Kept across the restart, and not delivered again (they were handled
    // by being dead-lettered).
    g.start();
    assert_eq!(letters(&g, "log").len(), 2);
    assert_eq!(g.json("/v1/plugins")["plugins"][1]["dead_letters"], 2);

    let admin = format!("http://127.0.0.1:{}", g.port);
    let admin = admin.as_str();
    // Fixed: replay delivers them and they are gone.
    std::fs::remove_dir(g.path("out/log/events.jsonl")).unwrap();
    let (code, stdout, stderr) = g.cli(&[
        "dead-letters",
        "replay",
        "--config",
        config,
        "--plugin",
        "log",
        "--admin",
        admin,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"replayed\": 2"), "{stdout}");
    let events = g.wait_events("log", 2, DEADLINE);
    let mut keys: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["error", "x"]);
    wait_for("log's dead letters to go", DEADLINE, || {
        letters(&g, "log").is_empty().then_some(())
    });

    // Still failing: a replayed letter stays, with its new attempt count.
    let (code, _, stderr) = g.cli(&[
        "dead-letters",
        "replay",
        "--config",
        config,
        "--plugin",
        "fbk",
        "--admin",
        admin,
    ]);
    assert_eq!(code, 0, "{stderr}");
    wait_for("the replay to fail again", DEADLINE, || {
        (g.metric("watchgate_dead_letters_total{plugin=\"fbk\"}") == 1.0
            && g.metric("watchgate_plugin_invocations_total{plugin=\"fbk\",outcome=\"error\"}")
                == 2.0)
            .then_some(())
    });
    wait_for("the letter to be rewritten", DEADLINE, || {
        let l = letters(&g, "fbk");
        (l.len() == 1 && l[0]["id"] != fbk[0]["id"]).then_some(())
    });

    // Mutations need the token.
    let url = format!("http://127.0.0.1:{}/v1/plugins/fbk/dead-letters", g.port);
    let err = ureq::delete(&url).call().unwrap_err();
    assert!(matches!(err, ureq::Error::Status(401, _)), "{err}");
    let (code, stdout, stderr) = g.cli(&[
        "dead-letters",
        "delete",
        "--config",
        config,
        "--plugin",
        "fbk",
        "--admin",
        admin,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"deleted\": 1"), "{stdout}");
    wait_for("fbk's dead letters to go", DEADLINE, || {
        letters(&g, "fbk").is_empty().then_some(())
    });
}

#[test]
fn plugin_state_survives_a_restart() {
    let mut g = Gateway::new();
    g.install("fbk", "fault-by-key", "");
    g.start();
    std::fs::write(g.path("watched/state"), "1").unwrap();
    wait_for("count=1", DEADLINE, || {
        g.log().contains("count=1").then_some(())
    });
    std::fs::write(g.path("watched/state"), "2").unwrap();
    wait_for("count=2", DEADLINE, || {
        g.log().contains("count=2").then_some(())
    });
    assert!(g.stop().success());
    g.start();
    std::fs::write(g.path("watched/state"), "3").unwrap();
    wait_for("count=3 after the restart", DEADLINE, || {
        g.assert_running();
        g.log().contains("count=3").then_some(())
    });
}

#[test]
fn a_changed_etcd_prefix_is_relisted_not_resumed() {
    let etcd = Etcd::start();
    let (mut g, mut store) = seen_then_stopped(&etcd);
    store.put("/wg/sub/x", "1").unwrap();
    let path = g.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("prefix = \"/wg/\"", "prefix = \"/wg/sub/\"", 1),
    )
    .unwrap();
    g.start();
    assert!(
        !g.log().contains("Resuming the watch"),
        "resumed positions of another prefix:\n{}",
        g.log()
    );
    let events = g.wait_events("event-log", 5, DEADLINE);
    assert_eq!(
        kkvr(&events[2..]),
        vec![
            ("delete".into(), "/wg/a".into(), None, true),
            ("delete".into(), "/wg/b".into(), None, true),
            ("put".into(), "/wg/sub/x".into(), Some("1".into()), true),
        ]
    );
    // The next start resumes again.
    assert!(g.stop().success());
    store.put("/wg/sub/y", "1").unwrap();
    g.start();
    assert!(g.log().contains("Resuming the watch"), "{}", g.log());
    let events = g.wait_events("event-log", 6, DEADLINE);
    assert_eq!(events[5]["key"], "/wg/sub/y");
    assert_eq!(events[5]["resync"], false);
}
