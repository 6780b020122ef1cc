//! The NATS key-value source against a real `nats-server -js`, with
//! injected faults.
//!
//! The ground truth is the bucket's own history: each test writes through
//! its own client, ends with a sentinel key, then replays the bucket from
//! revision 1 and compares it with what `event-log` received.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::etcd_source::{Change, changes};
use crate::fault_proxy::FaultProxy;
use crate::nats_harness::{Kv, Nats};
use crate::support::{Gateway, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);
const BUCKET: &str = "config";
const SENTINEL: &str = "zz-sentinel";
/// Values kept per key: enough that no test's writes push one out, so a
/// resume never has a reason to relist.
const HISTORY: i64 = 64;

fn nats_source(url: &str, extra: &str) -> String {
    format!(
        "[[source]]\nname = \"kv\"\nkind = \"nats\"\nurl = \"{url}\"\nbucket = \"{BUCKET}\"\n\
         reconnect_max_ms = 500\n{extra}"
    )
}

fn gateway(sources: &str) -> Gateway {
    let mut g = Gateway::with_sources(sources);
    g.install_event_log("event-log");
    g.start();
    g
}

fn change(kind: &str, key: &str, value: Option<&str>, rev: u64) -> Change {
    (kind.into(), key.into(), value.map(str::to_owned), rev)
}

fn wait_sentinel(g: &mut Gateway) -> Vec<Value> {
    wait_for("the sentinel to arrive", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        e.iter().any(|e| e["key"] == SENTINEL).then_some(e)
    })
}

fn metric(g: &Gateway, name: &str) -> f64 {
    g.metric(&format!("{name}{{source=\"kv\"}}"))
}

/// Wait until the source counted a reconnect beyond `before` and is
/// connected again (in this order: a session end lowers `connected` before
/// it raises the counter).
fn wait_reconnected(g: &Gateway, before: f64) {
    wait_for("the loss to be noticed", DEADLINE, || {
        (metric(g, "watchgate_source_reconnects_total") > before).then_some(())
    });
    wait_for("a new session", DEADLINE, || {
        (metric(g, "watchgate_source_connected") == 1.0).then_some(())
    });
}

#[test]
fn nats_snapshot_then_puts_updates_deletes_and_purges_in_order() {
    let nats = Nats::start();
    let kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    let a = kv.put("app.a", "1").unwrap();
    let b = kv.put("app.b", "2").unwrap();
    kv.put("other.x", "not watched").unwrap();
    kv.put("app.gone", "x").unwrap();
    kv.delete("app.gone").unwrap();
    let mut g = gateway(&nats_source(&nats.url(), "prefix = \"app.\"\n"));

    // The snapshot: the live keys under the prefix, as puts.
    let mut snap = changes(&g.wait_events("event-log", 2, DEADLINE));
    snap.sort();
    assert_eq!(
        snap,
        vec![
            change("put", "app.a", Some("1"), a),
            change("put", "app.b", Some("2"), b)
        ]
    );
    let ready = g.json("/readyz");
    assert_eq!(ready["ready"], true, "{ready}");

    let c = kv.put("app.c", "3").unwrap();
    let a2 = kv.put("app.a", "1b").unwrap();
    kv.put("other.y", "not watched").unwrap();
    kv.delete("app.b").unwrap();
    kv.purge("app.a").unwrap();
    let end = kv.put(&format!("app.{SENTINEL}"), "end").unwrap();
    let delivered = changes(&wait_for("the sentinel", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        (e.len() >= 7).then_some(e)
    }));
    let after: Vec<(String, String, Option<String>)> = delivered[2..]
        .iter()
        .map(|c| (c.0.clone(), c.1.clone(), c.2.clone()))
        .collect();
    let t =
        |k: &str, key: &str, v: Option<&str>| (k.to_owned(), key.to_owned(), v.map(str::to_owned));
    assert_eq!(
        after,
        vec![
            t("put", "app.c", Some("3")),
            t("put", "app.a", Some("1b")),
            t("delete", "app.b", None),
            t("delete", "app.a", None),
            t("put", &format!("app.{SENTINEL}"), Some("end")),
        ]
    );
    // Revisions are the bucket's, strictly increasing.
    let revs: Vec<u64> = delivered[2..].iter().map(|c| c.3).collect();
    assert_eq!(revs[0], c);
    assert_eq!(revs[1], a2);
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    assert_eq!(*revs.last().unwrap(), end);
    assert_eq!(metric(&g, "watchgate_source_revision"), end as f64);
    assert_eq!(metric(&g, "watchgate_source_connected"), 1.0);
    assert_eq!(metric(&g, "watchgate_source_resyncs_total"), 0.0);
    let sources = g.json("/v1/sources");
    let s = &sources["sources"][0];
    assert_eq!(s["synced"], true, "{sources}");
    assert_eq!(s["revision"], end, "{sources}");
}

#[test]
fn nats_server_kill_9_and_restart_resumes_from_history_without_resync() {
    let mut nats = Nats::start();
    let mut kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.put("a", "1").unwrap();
    let proxy = FaultProxy::start(nats.addr());
    let url = format!("nats://{}", proxy.addr());
    let mut g = gateway(&nats_source(&url, "reconnect_initial_ms = 50\n"));
    g.wait_events("event-log", 1, DEADLINE);

    // Cut off: the gateway's connection is reset and new ones refused,
    // while the bucket changes (puts and deletes) behind its back.
    proxy.set_mode(crate::fault_proxy::Mode::Refuse);
    proxy.reset_all();
    wait_for("the loss to be noticed", DEADLINE, || {
        (metric(&g, "watchgate_source_connected") == 0.0).then_some(())
    });
    kv.put("b", "2").unwrap();
    kv.delete("a").unwrap();
    kv.put("c", "3").unwrap();
    proxy.set_mode(crate::fault_proxy::Mode::Pass);
    wait_reconnected(&g, 0.0);

    // The server dies (kill -9) and comes back with the same store.
    nats.kill();
    wait_for("the gateway to notice", DEADLINE, || {
        (metric(&g, "watchgate_source_connected") == 0.0).then_some(())
    });
    nats.restart();
    kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.retry(|k| k.put("d", "4"));
    kv.retry(|k| k.put(SENTINEL, "end"));
    let events = wait_sentinel(&mut g);
    assert_eq!(
        changes(&events),
        kv.history(SENTINEL),
        "delivered events differ from the bucket's history"
    );
    assert!(
        events.iter().all(|e| e["resync"] == false),
        "a resume within the history must not resync: {events:#?}"
    );
    assert_eq!(metric(&g, "watchgate_source_resyncs_total"), 0.0);
    assert!(metric(&g, "watchgate_source_reconnects_total") >= 2.0);
}

#[test]
fn nats_gateway_kill_9_while_changes_happen_loses_nothing() {
    const CHANGES: usize = 600;
    const KILLS: usize = 2;
    let nats = Nats::start();
    let url = nats.url();
    let kv = Kv::connect(&url, BUCKET, HISTORY);
    kv.put("seed", "0").unwrap();
    let mut g = gateway(&nats_source(&url, ""));
    g.wait_events("event-log", 1, DEADLINE);

    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (progress, url) = (progress.clone(), url.clone());
        std::thread::spawn(move || {
            let kv = Kv::connect(&url, BUCKET, HISTORY);
            for i in 0..CHANGES {
                // 20 keys, 30 changes each: all within the kept history.
                if i % 7 == 6 {
                    kv.retry(|k| k.delete(&format!("k{}", (i * 3) % 20)));
                } else {
                    kv.retry(|k| k.put(&format!("k{}", i % 20), &format!("v{i}")));
                }
                progress.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    for point in [150, 400] {
        wait_for(&format!("{point} writes"), DEADLINE, || {
            (progress.load(Ordering::SeqCst) >= point).then_some(())
        });
        g.kill9();
        g.start();
    }
    writer.join().expect("writer thread");
    kv.put(SENTINEL, "end").unwrap();
    let events = wait_sentinel(&mut g);
    let delivered = changes(&events);
    let history = kv.history(SENTINEL);

    let got: HashSet<&Change> = delivered.iter().collect();
    let missing: Vec<&Change> = history.iter().filter(|c| !got.contains(c)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} changes never arrived, first: {:?}",
        missing.len(),
        history.len(),
        &missing[..missing.len().min(5)]
    );
    let known: HashSet<&Change> = history.iter().collect();
    assert!(
        delivered.iter().all(|c| known.contains(c)),
        "something arrived that the bucket never had"
    );
    assert!(events.iter().all(|e| e["resync"] == false));
    // In order per key: a key goes back only where a crash replayed what
    // was handled after the last committed cursor, at most once per crash.
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut back: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &delivered {
        if let Some(prev) = last.insert(&c.1, c.3)
            && c.3 <= prev
        {
            *back.entry(&c.1).or_default() += 1;
        }
    }
    assert!(
        back.values().all(|&n| n <= KILLS),
        "a key went back more often than the gateway was killed: {back:?}"
    );
    // Duplicates come only from events handled after the last committed
    // cursor (one commit interval's worth per crash).
    let duplicates = delivered.len() - history.len();
    assert!(
        duplicates <= KILLS * 500,
        "{duplicates} duplicates for {KILLS} crashes"
    );
    eprintln!(
        "{} changes, {} delivered ({duplicates} duplicates) after {KILLS} kills",
        history.len(),
        delivered.len()
    );
}

#[test]
fn nats_a_20_second_outage_logs_a_bounded_number_of_lines() {
    let mut nats = Nats::start();
    let kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.put("a", "1").unwrap();
    // Retry often (delays of 50 ms growing to at most 500 ms, jittered) so
    // a bound on lines means something.
    let mut g = gateway(&nats_source(&nats.url(), "reconnect_initial_ms = 50\n"));
    g.wait_events("event-log", 1, DEADLINE);
    let warn_lines = |g: &Gateway| {
        g.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["level"] == "WARN" || v["level"] == "ERROR")
            .count()
    };
    let before = warn_lines(&g);
    nats.kill();
    let outage = Instant::now();
    wait_for("the outage to be noticed", DEADLINE, || {
        (metric(&g, "watchgate_source_connected") == 0.0).then_some(())
    });
    // The outage itself: its length is what is being tested.
    std::thread::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed()));
    let attempts = metric(&g, "watchgate_source_reconnects_total");
    let lines = warn_lines(&g) - before;
    assert!(
        attempts >= 30.0,
        "only {attempts} reconnect attempts in 20 s"
    );
    assert!(
        lines <= 40,
        "{lines} warning lines for {attempts} attempts in a 20 s outage"
    );
    let sources = g.json("/v1/sources");
    let s = &sources["sources"][0];
    assert_eq!(s["connected"], false, "{sources}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains(&nats.url()),
        "{sources}"
    );
    nats.restart();
    let kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.retry(|k| k.put(SENTINEL, "end"));
    wait_sentinel(&mut g);
    eprintln!("{attempts} attempts, {lines} warning lines in a 20 s outage");
}

#[test]
fn nats_a_hundred_connection_resets_leave_tasks_and_fds_flat() {
    let nats = Nats::start();
    let kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    let proxy = FaultProxy::start(nats.addr());
    let url = format!("nats://{}", proxy.addr());
    let mut g = gateway(&nats_source(&url, "reconnect_initial_ms = 10\n"));
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let started = Instant::now();
    let mut baseline = None;
    for cycle in 1..=100u32 {
        let before = metric(&g, "watchgate_source_reconnects_total");
        proxy.reset_all();
        wait_reconnected(&g, before);
        kv.put(&format!("cycle{}", cycle % 5), &cycle.to_string())
            .unwrap();
        if cycle == 10 {
            baseline = Some((g.metric("watchgate_runtime_alive_tasks"), fds(g.pid())));
        }
    }
    kv.put(SENTINEL, "end").unwrap();
    let delivered = changes(&wait_sentinel(&mut g));
    assert_eq!(
        delivered,
        kv.history(SENTINEL),
        "events lost or repeated across resets"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(120), "100 cycles took {took:?}");
    let (tasks0, fds0) = baseline.unwrap();
    // Connections close asynchronously: wait (bounded) for the last
    // session's predecessors to go.
    wait_for("one connection to NATS", DEADLINE, || {
        (proxy.open_connections() == 1).then_some(())
    });
    let (tasks, fds_now) = (g.metric("watchgate_runtime_alive_tasks"), fds(g.pid()));
    assert!(tasks <= tasks0 + 2.0, "tasks grew from {tasks0} to {tasks}");
    assert!(fds_now <= fds0 + 2, "fds grew from {fds0} to {fds_now}");
    let lines = g.log().matches("NATS watch interrupted").count();
    assert!(
        lines <= 5,
        "{lines} reconnect warnings for 100 identical resets"
    );
    assert_eq!(metric(&g, "watchgate_source_resyncs_total"), 0.0);
    eprintln!("100 reset cycles in {took:?}; tasks {tasks0} -> {tasks}, fds {fds0} -> {fds_now}");
}

#[test]
fn nats_startup_fail_without_a_server_exits_1_naming_the_source() {
    let nats = Nats::not_started();
    let g = Gateway::with_sources(&nats_source(
        &nats.url(),
        "startup = \"fail\"\nstartup_timeout = \"2s\"\n",
    ));
    let config = g.config_path();
    let started = Instant::now();
    let (code, _, stderr) = g.cli(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(stderr.contains("source \"kv\""), "{stderr}");
    assert!(
        stderr.contains(&nats.url()),
        "the reason names the server: {stderr}"
    );
}

#[test]
fn nats_startup_degraded_becomes_ready_once_the_server_appears() {
    let mut nats = Nats::not_started();
    let mut g = Gateway::with_sources(&nats_source(&nats.url(), "startup = \"degraded\"\n"));
    g.install_event_log("event-log");
    g.spawn();
    let not_ready = wait_for("an error to be reported", DEADLINE, || {
        let (code, body) = g.get("/readyz")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 503 && !v["sources"][0]["last_error"].is_null()).then_some(v)
    });
    assert_eq!(not_ready["sources"][0]["synced"], false);
    nats.spawn();
    let kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.put(SENTINEL, "end").unwrap();
    wait_sentinel(&mut g);
    wait_for("ready", DEADLINE, || {
        (g.get("/readyz")?.0 == 200).then_some(())
    });
}

#[test]
fn nats_a_recreated_bucket_is_relisted_with_resync_deletes() {
    let nats = Nats::start();
    let mut kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.put("keep", "1").unwrap();
    kv.put("gone", "2").unwrap();
    kv.put("same", "3").unwrap();
    // More revisions than the new bucket will have at first, so that its
    // revisions are not simply behind.
    for i in 0..3 {
        kv.put("same", &format!("{i}")).unwrap();
    }
    kv.put("same", "3").unwrap();
    let proxy = FaultProxy::start(nats.addr());
    let url = format!("nats://{}", proxy.addr());
    let mut g = gateway(&nats_source(&url, "reconnect_initial_ms = 50\n"));
    g.wait_events("event-log", 3, DEADLINE);

    // Behind the gateway's back, the bucket is deleted and made again,
    // reaching a revision beyond the one the gateway had delivered.
    proxy.set_mode(crate::fault_proxy::Mode::Refuse);
    proxy.reset_all();
    wait_for("the loss to be noticed", DEADLINE, || {
        (metric(&g, "watchgate_source_connected") == 0.0).then_some(())
    });
    kv.recreate();
    kv.put("same", "3").unwrap();
    kv.put("keep", "new").unwrap();
    kv.put("fresh", "4").unwrap();
    for i in 0..6 {
        kv.put("churn", &format!("{i}")).unwrap();
    }
    kv.delete("churn").unwrap();
    assert!(kv.last_revision() > 7);
    proxy.set_mode(crate::fault_proxy::Mode::Pass);
    let events = wait_for("the relist", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        (e.len() >= 6).then_some(e)
    });
    let mut relist: Vec<(String, String, Option<String>, bool)> = events[3..]
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
    relist.sort();
    assert_eq!(
        relist,
        vec![
            ("delete".into(), "gone".into(), None, true),
            ("put".into(), "fresh".into(), Some("4".into()), true),
            ("put".into(), "keep".into(), Some("new".into()), true),
        ],
        "an unchanged key is not sent again; a vanished one is deleted"
    );
    assert_eq!(metric(&g, "watchgate_source_resyncs_total"), 1.0);
    // Later changes follow the new bucket's revisions.
    let end = kv.put(SENTINEL, "end").unwrap();
    let events = wait_sentinel(&mut g);
    let last = events.last().unwrap();
    assert_eq!(last["revision"], end);
    assert_eq!(last["resync"], false);
}

#[test]
fn nats_history_gone_while_cut_off_relists_with_resync() {
    let nats = Nats::start();
    // One value per key: every new value pushes the key's old one out.
    let kv = Kv::connect(&nats.url(), BUCKET, 1);
    kv.put("a", "1").unwrap();
    kv.put("b", "2").unwrap();
    kv.put("c", "3").unwrap();
    let proxy = FaultProxy::start(nats.addr());
    let url = format!("nats://{}", proxy.addr());
    let mut g = gateway(&nats_source(&url, "reconnect_initial_ms = 50\n"));
    g.wait_events("event-log", 3, DEADLINE);

    proxy.set_mode(crate::fault_proxy::Mode::Refuse);
    proxy.reset_all();
    wait_for("the loss to be noticed", DEADLINE, || {
        (metric(&g, "watchgate_source_connected") == 0.0).then_some(())
    });
    // The entries right after the last delivered revision are pushed out:
    // the bucket no longer holds everything a resume would need.
    kv.put("a", "1b").unwrap();
    kv.put("a", "1c").unwrap();
    kv.delete("b").unwrap();
    kv.put("c", "3b").unwrap();
    proxy.set_mode(crate::fault_proxy::Mode::Pass);
    let events = wait_for("the relist", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        (e.len() >= 6).then_some(e)
    });
    let mut relist: Vec<(String, String, Option<String>, bool)> = events[3..]
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
    relist.sort();
    assert_eq!(
        relist,
        vec![
            ("delete".into(), "b".into(), None, true),
            ("put".into(), "a".into(), Some("1c".into()), true),
            ("put".into(), "c".into(), Some("3b".into()), true),
        ]
    );
    assert_eq!(metric(&g, "watchgate_source_resyncs_total"), 1.0);
    let end = kv.put(SENTINEL, "end").unwrap();
    let last = wait_sentinel(&mut g).last().cloned().unwrap();
    assert_eq!(last["revision"], end);
    assert_eq!(last["resync"], false);
}

#[test]
fn nats_a_blackholed_connection_is_detected_by_pings_and_resumed() {
    let nats = Nats::start();
    let kv = Kv::connect(&nats.url(), BUCKET, HISTORY);
    kv.put("a", "1").unwrap();
    let proxy = FaultProxy::start(nats.addr());
    let url = format!("nats://{}", proxy.addr());
    let mut g = gateway(&nats_source(
        &url,
        "ping_interval_s = 1\ndial_timeout_s = 2\nreconnect_initial_ms = 50\n",
    ));
    g.wait_events("event-log", 1, DEADLINE);
    // Nothing passes either way, but the connection stays open.
    proxy.set_mode(crate::fault_proxy::Mode::Blackhole);
    let cut = Instant::now();
    wait_for("the dead connection to be noticed", DEADLINE, || {
        (metric(&g, "watchgate_source_connected") == 0.0).then_some(())
    });
    let detected = cut.elapsed();
    // Two unanswered pings a second apart, plus the ping timer's slack.
    assert!(
        detected <= Duration::from_secs(6),
        "detection took {detected:?} with 1 s pings"
    );
    kv.put("b", "2").unwrap();
    proxy.set_mode(crate::fault_proxy::Mode::Pass);
    kv.put(SENTINEL, "end").unwrap();
    let events = wait_sentinel(&mut g);
    assert_eq!(changes(&events), kv.history(SENTINEL));
    assert!(events.iter().all(|e| e["resync"] == false));
    eprintln!("a blackholed connection noticed after {detected:?}");
}
