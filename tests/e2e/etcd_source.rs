//! The etcd source against real etcd processes, with injected faults.
//!
//! The ground truth is etcd's own history: each test writes through its own
//! client, ends with a sentinel key, then replays the prefix's history with
//! a watch from revision 1 and compares it with what `event-log` received:
//! every revision exactly once, in order, with the right kind and value.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use serde_json::Value;

use crate::etcd_harness::{Etcd, EtcdCluster, EtcdOptions, etcdctl};
use crate::fault_proxy::{FaultProxy, Mode};
use crate::support::{Gateway, wait_for};

pub(crate) const DEADLINE: Duration = Duration::from_secs(60);
pub(crate) const PREFIX: &str = "/wg/";
pub(crate) const SENTINEL: &str = "/wg/~sentinel";

/// One delivered or recorded change: (kind, key, value, revision).
pub(crate) type Change = (String, String, Option<String>, u64);

/// A test's own etcd client.
pub(crate) struct Store {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Store {
    pub(crate) fn connect(endpoints: &[String]) -> Store {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(Client::connect(endpoints, None))
            .expect("connect to etcd");
        Store { rt, client }
    }

    pub(crate) fn put(
        &mut self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<i64, etcd_client::Error> {
        let r = self.rt.block_on(self.client.put(key, value, None))?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    pub(crate) fn delete(&mut self, key: &str) -> Result<i64, etcd_client::Error> {
        let r = self.rt.block_on(self.client.delete(key, None))?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// The current value of `key`, as text.
    pub(crate) fn get(&mut self, key: &str) -> Option<String> {
        let r = self
            .rt
            .block_on(self.client.get(key, None))
            .expect("etcd get");
        r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    fn txn(&mut self, ops: Vec<TxnOp>) -> Result<(), etcd_client::Error> {
        self.rt
            .block_on(self.client.txn(Txn::new().and_then(ops)))
            .map(|_| ())
    }

    pub(crate) fn revision(&mut self) -> i64 {
        let r = self
            .rt
            .block_on(self.client.get(
                PREFIX,
                Some(GetOptions::new().with_prefix().with_count_only()),
            ))
            .unwrap();
        r.header().unwrap().revision()
    }

    pub(crate) fn compact(&mut self, revision: i64) {
        self.rt
            .block_on(
                self.client
                    .compact(revision, Some(CompactionOptions::new().with_physical())),
            )
            .unwrap();
    }

    /// Retry `op` until etcd accepts it (the server may be restarting).
    pub(crate) fn retry<T>(
        &mut self,
        mut op: impl FnMut(&mut Store) -> Result<T, etcd_client::Error>,
    ) -> T {
        let start = Instant::now();
        loop {
            match op(self) {
                Ok(v) => return v,
                Err(e) => {
                    assert!(start.elapsed() < DEADLINE, "etcd kept failing: {e}");
                    // The pace of the retries, not a wait for an outcome.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// The prefix's history from `from` up to and including the sentinel.
    pub(crate) fn history(&mut self, from: i64) -> Vec<Change> {
        self.rt.block_on(async {
            let mut stream = self
                .client
                .watch(
                    PREFIX,
                    Some(WatchOptions::new().with_prefix().with_start_revision(from)),
                )
                .await
                .unwrap();
            let mut out = Vec::new();
            loop {
                let resp = tokio::time::timeout(DEADLINE, stream.message())
                    .await
                    .expect("history replay stalled")
                    .unwrap()
                    .expect("history stream ended");
                for ev in resp.events() {
                    let kv = ev.kv().unwrap();
                    let key = String::from_utf8(kv.key().to_vec()).unwrap();
                    let (kind, value) = match ev.event_type() {
                        EventType::Put => {
                            ("put", Some(String::from_utf8(kv.value().to_vec()).unwrap()))
                        }
                        EventType::Delete => ("delete", None),
                    };
                    out.push((
                        kind.to_owned(),
                        key.clone(),
                        value,
                        kv.mod_revision() as u64,
                    ));
                    if key == SENTINEL {
                        return out;
                    }
                }
            }
        })
    }
}

/// A thread writing `changes` changes under `/wg/` through its own client:
/// puts of `/wg/k0`…`/wg/k{keys-1}`, and every `delete_every`th change a
/// delete (which may hit an absent key). The counter says how many were
/// made so far.
pub(crate) fn spawn_writer(
    url: &str,
    changes: usize,
    delete_every: usize,
    keys: usize,
) -> (std::thread::JoinHandle<()>, Arc<AtomicUsize>) {
    let progress = Arc::new(AtomicUsize::new(0));
    let handle = {
        let (progress, url) = (progress.clone(), url.to_owned());
        std::thread::spawn(move || {
            let mut store = Store::connect(&[url]);
            for i in 0..changes {
                if i % delete_every == delete_every - 1 {
                    store.retry(|s| s.delete(&format!("/wg/k{}", (i * 7) % keys)));
                } else {
                    store.retry(|s| s.put(&format!("/wg/k{}", i % keys), format!("v{i}")));
                }
                progress.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    (handle, progress)
}

pub(crate) fn etcd_source(endpoints: &[String], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[[source]]\nname = \"main\"\nkind = \"etcd\"\nendpoints = [{}]\nprefix = \"{PREFIX}\"\n\
         reconnect_max_ms = 500\n{extra}",
        list.join(", ")
    )
}

pub(crate) fn changes(events: &[Value]) -> Vec<Change> {
    events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_str().map(str::to_owned),
                e["revision"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Wait until event-log has seen the sentinel; returns its events.
pub(crate) fn wait_sentinel(g: &mut Gateway) -> Vec<Value> {
    wait_for("the sentinel to arrive", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        e.iter().any(|e| e["key"] == SENTINEL).then_some(e)
    })
}

fn gateway(sources: &str) -> Gateway {
    let mut g = Gateway::with_sources(sources);
    g.install_event_log("event-log");
    g.start();
    g
}

#[test]
fn snapshot_then_watch_delivers_every_revision_once_in_order() {
    let etcd = Etcd::start();
    let mut store = Store::connect(&[etcd.client_url()]);
    let rev_a = store.put("/wg/before/a", "1").unwrap() as u64;
    let rev_b = store.put("/wg/before/b", "2").unwrap() as u64;
    store.put("/outside", "not watched").unwrap();
    let snapshot_rev = store.revision();
    let mut g = gateway(&etcd_source(&[etcd.client_url()], ""));

    // The snapshot arrives as puts, before any change.
    let first = g.wait_events("event-log", 2, DEADLINE);
    let mut snap = changes(&first);
    snap.sort();
    assert_eq!(
        snap,
        vec![
            ("put".into(), "/wg/before/a".into(), Some("1".into()), rev_a),
            ("put".into(), "/wg/before/b".into(), Some("2".into()), rev_b),
        ]
    );
    let ready = g.json("/readyz");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["sources"][0]["synced"], true);

    for i in 0..30 {
        store
            .put(&format!("/wg/k{}", i % 7), format!("v{i}"))
            .unwrap();
        if i % 5 == 4 {
            store.delete(&format!("/wg/k{}", i % 3)).unwrap();
        }
        if i % 10 == 0 {
            store
                .txn(vec![
                    TxnOp::put(format!("/wg/tx/{i}/a"), "x", None),
                    TxnOp::put(format!("/wg/tx/{i}/b"), "y", None),
                    TxnOp::delete("/wg/before/a", None),
                ])
                .unwrap();
        }
    }
    store.put("/outside", "still not watched").unwrap();
    store.put(SENTINEL, "end").unwrap();
    let delivered = changes(&wait_sentinel(&mut g));
    let history = store.history(snapshot_rev + 1);
    assert_eq!(
        &delivered[2..],
        &history[..],
        "delivered events differ from etcd's history"
    );
    assert!(delivered.iter().all(|c| !c.1.starts_with("/outside")));
    // Multi-key transactions share one revision and arrive together.
    let tx0: Vec<&Change> = delivered
        .iter()
        .filter(|c| c.1.starts_with("/wg/tx/0/"))
        .collect();
    assert_eq!(tx0.len(), 2);
    assert_eq!(tx0[0].3, tx0[1].3);
    let m = g.metrics();
    let last = history.last().unwrap().3 as f64;
    assert_eq!(m["watchgate_source_revision{source=\"main\"}"], last);
    assert_eq!(m["watchgate_source_connected{source=\"main\"}"], 1.0);
    assert_eq!(m["watchgate_source_resyncs_total{source=\"main\"}"], 0.0);
}

#[test]
fn kill_9_during_a_thousand_writes_loses_and_repeats_nothing() {
    let mut etcd = Etcd::start();
    let url = etcd.client_url();
    let mut g = gateway(&etcd_source(std::slice::from_ref(&url), ""));

    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut store = Store::connect(&[url]);
            for i in 0..1000usize {
                match i % 10 {
                    9 => {
                        store.retry(|s| s.delete(&format!("/wg/k{}", (i + 3) % 40)));
                    }
                    5 => store.retry(|s| {
                        s.txn(vec![
                            TxnOp::put(format!("/wg/t{}", i % 20), format!("a{i}"), None),
                            TxnOp::put(format!("/wg/u{}", i % 20), format!("b{i}"), None),
                            TxnOp::delete(format!("/wg/k{}", i % 40), None),
                        ])
                    }),
                    _ => {
                        store.retry(|s| s.put(&format!("/wg/k{}", i % 40), format!("v{i}")));
                    }
                }
                progress.store(i + 1, Ordering::SeqCst);
            }
            store.retry(|s| s.put(SENTINEL, "end"));
            store
        })
    };
    wait_for("300 writes", DEADLINE, || {
        (progress.load(Ordering::SeqCst) >= 300).then_some(())
    });
    etcd.kill();
    wait_for("the gateway to notice", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"main\"}") == 0.0).then_some(())
    });
    etcd.restart();
    let mut store = writer.join().expect("writer thread");
    let delivered = changes(&wait_sentinel(&mut g));
    let history = store.history(1);
    assert_eq!(delivered.len(), history.len());
    assert_eq!(
        delivered, history,
        "delivered events differ from etcd's history"
    );
    assert!(g.metric("watchgate_source_reconnects_total{source=\"main\"}") >= 1.0);
    assert_eq!(
        g.metric("watchgate_source_resyncs_total{source=\"main\"}"),
        0.0
    );
}

#[test]
fn deletes_made_while_cut_off_are_delivered_from_history() {
    let etcd = Etcd::start();
    let proxy = FaultProxy::start(etcd.client_addr());
    let mut store = Store::connect(&[etcd.client_url()]);
    for k in ["a", "b", "c"] {
        store.put(&format!("/wg/{k}"), k).unwrap();
    }
    let base = store.revision();
    let mut g = gateway(&etcd_source(&[proxy.url()], ""));
    g.wait_events("event-log", 3, DEADLINE);

    proxy.set_mode(Mode::Refuse);
    proxy.reset_all();
    wait_for("the gateway to notice the cut", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"main\"}") == 0.0).then_some(())
    });
    store.delete("/wg/a").unwrap();
    store.delete("/wg/b").unwrap();
    store.put("/wg/c", "changed").unwrap();
    store.put(SENTINEL, "end").unwrap();
    proxy.set_mode(Mode::Pass);

    let delivered = changes(&wait_sentinel(&mut g));
    let history = store.history(base + 1);
    assert_eq!(&delivered[3..], &history[..]);
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(
        g.metric("watchgate_source_resyncs_total{source=\"main\"}"),
        0.0
    );
}

#[test]
fn compaction_while_cut_off_relists_once_and_synthesizes_deletes() {
    let etcd = Etcd::start();
    let proxy = FaultProxy::start(etcd.client_addr());
    let mut store = Store::connect(&[etcd.client_url()]);
    for k in ["keep", "change", "gone1", "gone2"] {
        store.put(&format!("/wg/{k}"), "v1").unwrap();
    }
    let mut g = gateway(&etcd_source(&[proxy.url()], ""));
    g.wait_events("event-log", 4, DEADLINE);

    proxy.set_mode(Mode::Refuse);
    proxy.reset_all();
    wait_for("the gateway to notice the cut", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"main\"}") == 0.0).then_some(())
    });
    store.put("/wg/change", "v2").unwrap();
    store.delete("/wg/gone1").unwrap();
    store.put("/wg/gone2", "short-lived").unwrap();
    store.delete("/wg/gone2").unwrap();
    store.put("/wg/new", "v1").unwrap();
    store.put(SENTINEL, "end").unwrap();
    let rev = store.revision();
    store.compact(rev);
    proxy.set_mode(Mode::Pass);

    let all = wait_sentinel(&mut g);
    let tail: BTreeMap<String, (String, Option<String>, bool)> = all[4..]
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                (
                    e["kind"].as_str().unwrap().to_owned(),
                    e["value"].as_str().map(str::to_owned),
                    e["resync"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(all.len() - 4, tail.len(), "a key arrived twice: {all:#?}");
    let expected: BTreeMap<String, (String, Option<String>, bool)> = [
        ("/wg/change", ("put", Some("v2"), true)),
        ("/wg/gone1", ("delete", None, true)),
        ("/wg/gone2", ("delete", None, true)),
        ("/wg/new", ("put", Some("v1"), true)),
        (SENTINEL, ("put", Some("end"), true)),
    ]
    .into_iter()
    .map(|(k, (kind, v, r))| (k.to_owned(), (kind.to_owned(), v.map(str::to_owned), r)))
    .collect();
    assert_eq!(tail, expected);
    assert_eq!(
        g.metric("watchgate_source_resyncs_total{source=\"main\"}"),
        1.0
    );
    // No retry loop: a handful of reconnects, not hundreds.
    assert!(g.metric("watchgate_source_reconnects_total{source=\"main\"}") < 20.0);
    // Watching continues normally after the relist.
    store.put("/wg/after", "x").unwrap();
    let all = g.wait_events("event-log", all.len() + 1, DEADLINE);
    assert_eq!(all.last().unwrap()["key"], "/wg/after");
    assert_eq!(all.last().unwrap()["resync"], false);
}

#[test]
fn a_stopped_server_is_detected_and_the_watch_resumes_after_it_continues() {
    let etcd = Etcd::start();
    let mut store = Store::connect(&[etcd.client_url()]);
    store.put("/wg/a", "1").unwrap();
    let mut g = gateway(&etcd_source(
        &[etcd.client_url()],
        "keepalive_interval_s = 5\nkeepalive_timeout_s = 2\ndial_timeout_s = 2\n",
    ));
    g.wait_events("event-log", 1, DEADLINE);
    etcd.pause();
    let stopped = Instant::now();
    wait_for(
        "the dead connection to be detected",
        Duration::from_secs(30),
        || (g.metric("watchgate_source_connected{source=\"main\"}") == 0.0).then_some(()),
    );
    let detected = stopped.elapsed();
    assert!(
        detected <= Duration::from_secs(5 + 2 + 5),
        "detection took {detected:?} with a 5 s interval and a 2 s timeout"
    );
    etcd.resume();
    store.put("/wg/b", "2").unwrap();
    store.put(SENTINEL, "end").unwrap();
    let delivered = changes(&wait_sentinel(&mut g));
    let history = store.history(1);
    assert_eq!(delivered, history);
}

/// Wait until source `main` counted a reconnect beyond `before` and is
/// connected again. Two waits, in this order: one scrape may read the old
/// session's `connected` before the gateway notices the loss and then the
/// already-raised counter, which looks like a finished reconnect but is not.
/// The session end lowers `connected` before it raises the counter, so once
/// the counter is seen, `connected` = 1 can only come from a new session.
fn wait_reconnected(g: &Gateway, before: f64) {
    wait_for("the loss to be noticed", DEADLINE, || {
        (g.metric("watchgate_source_reconnects_total{source=\"main\"}") > before).then_some(())
    });
    wait_for("a new session", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"main\"}") == 1.0).then_some(())
    });
}

#[test]
fn a_hundred_connection_resets_leave_tasks_fds_and_memory_flat() {
    let etcd = Etcd::start();
    let proxy = FaultProxy::start(etcd.client_addr());
    let mut store = Store::connect(&[etcd.client_url()]);
    let mut g = gateway(&etcd_source(&[proxy.url()], "reconnect_initial_ms = 10\n"));
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let rss_kb = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    };
    let mut baseline = None;
    for cycle in 1..=100u32 {
        let before = g.metric("watchgate_source_reconnects_total{source=\"main\"}");
        proxy.reset_all();
        wait_reconnected(&g, before);
        store
            .put(&format!("/wg/cycle{}", cycle % 5), cycle.to_string())
            .unwrap();
        if cycle == 10 {
            let tasks = g.metric("watchgate_runtime_alive_tasks");
            baseline = Some((tasks, fds(g.pid()), rss_kb(g.pid())));
        }
    }
    store.put(SENTINEL, "end").unwrap();
    let delivered = changes(&wait_sentinel(&mut g));
    assert_eq!(
        delivered,
        store.history(1),
        "events lost or repeated across resets"
    );
    let (tasks0, fds0, rss0) = baseline.unwrap();
    let (tasks, fds_now, rss) = (
        g.metric("watchgate_runtime_alive_tasks"),
        fds(g.pid()),
        rss_kb(g.pid()),
    );
    assert!(tasks <= tasks0 + 2.0, "tasks grew from {tasks0} to {tasks}");
    assert!(fds_now <= fds0 + 2, "fds grew from {fds0} to {fds_now}");
    assert!(
        rss <= rss0 + 16 * 1024,
        "RSS grew from {rss0} kB to {rss} kB"
    );
    assert_eq!(
        proxy.open_connections(),
        1,
        "exactly one connection to etcd"
    );
    // One log line for the first interruption, then held back: bounded.
    let lines = g.log().matches("etcd watch interrupted").count();
    assert!(
        lines <= 5,
        "{lines} reconnect warnings for 100 identical resets"
    );
    assert!(g.metric("watchgate_log_suppressed_total{origin=\"source/main\"}") >= 90.0);
}

#[test]
fn losing_the_member_in_use_moves_to_another_member() {
    let mut cluster = EtcdCluster::start(3);
    let urls = cluster.client_urls();
    let mut store = Store::connect(&urls[1..]);
    store.put("/wg/a", "1").unwrap();
    let mut g = gateway(&etcd_source(&urls, "dial_timeout_s = 2\n"));
    g.wait_events("event-log", 1, DEADLINE);
    // The source starts on the first endpoint; take that member away.
    cluster.members[0].kill();
    wait_reconnected(&g, 0.0);
    store.retry(|s| s.put("/wg/b", "2"));
    store.retry(|s| s.put(SENTINEL, "end"));
    let delivered = changes(&wait_sentinel(&mut g));
    assert_eq!(delivered, store.history(1));
}

#[test]
fn a_five_megabyte_value_arrives_whole() {
    let etcd = Etcd::start_with(EtcdOptions {
        max_request_bytes: Some(8 * 1024 * 1024),
        ..EtcdOptions::default()
    });
    let mut store = Store::connect(&[etcd.client_url()]);
    let mut g = Gateway::with_sources(&etcd_source(&[etcd.client_url()], ""));
    // Serializing 5 MB as JSON takes more than the default fuel.
    g.install(
        "event-log",
        "event-log",
        "[limits]\nfuel = 5_000_000_000\ntimeout_ms = 10_000\n[grants]\nfiles = \"../out/event-log\"\n",
    );
    g.start();
    let big: String = "x".repeat(5 * 1024 * 1024);
    store.put("/wg/big", big.clone()).unwrap();
    store.put(SENTINEL, "end").unwrap();
    let events = wait_sentinel(&mut g);
    let got = events.iter().find(|e| e["key"] == "/wg/big").unwrap();
    assert_eq!(got["value"].as_str().unwrap().len(), big.len());
}

#[test]
fn an_unreachable_etcd_reports_not_ready_with_the_reason_then_recovers() {
    let mut etcd = Etcd::start();
    let url = etcd.client_url();
    etcd.stop();
    let mut g = Gateway::with_sources(&etcd_source(&[url], "dial_timeout_s = 1\n"));
    g.install_event_log("event-log");
    g.spawn();
    let not_ready = wait_for("an error to be reported", DEADLINE, || {
        let (code, body) = g.get("/readyz")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (code == 503 && !v["sources"][0]["last_error"].is_null()).then_some(v)
    });
    assert_eq!(not_ready["sources"][0]["synced"], false);
    etcd.restart();
    let mut store = Store::connect(&[etcd.client_url()]);
    store.put(SENTINEL, "end").unwrap();
    wait_sentinel(&mut g);
    let (code, _) = g.get("/readyz").unwrap();
    assert_eq!(code, 200);
}

#[test]
fn permission_revoked_then_restored_is_reported_with_backoff_and_loses_nothing() {
    let etcd = Etcd::start();
    let url = etcd.client_url();
    let root = ["--user", "root:rootpw"];
    etcdctl(&url, &["user", "add", "root:rootpw"]);
    etcdctl(&url, &["user", "grant-role", "root", "root"]);
    etcdctl(&url, &["user", "add", "reader:readerpw"]);
    etcdctl(&url, &["role", "add", "wg-read"]);
    etcdctl(&url, &["user", "grant-role", "reader", "wg-read"]);
    let grant = [
        "role",
        "grant-permission",
        "wg-read",
        "--prefix=true",
        "read",
        PREFIX,
    ];
    etcdctl(&url, &grant);
    etcdctl(&url, &["auth", "enable"]);
    let as_root = |args: &[&str]| etcdctl(&url, &[&root[..], args].concat());

    let proxy = FaultProxy::start(etcd.client_addr());
    as_root(&["put", "/wg/a", "1"]);
    let mut g = gateway(&etcd_source(
        &[proxy.url()],
        "username = \"reader\"\npassword = \"readerpw\"\n",
    ));
    g.wait_events("event-log", 1, DEADLINE);

    // Revoke, and force a reconnect: the source is refused and says why.
    as_root(&[
        "role",
        "revoke-permission",
        "wg-read",
        "--prefix=true",
        PREFIX,
    ]);
    as_root(&["put", "/wg/b", "written while revoked"]);
    as_root(&["del", "/wg/a"]);
    proxy.reset_all();
    let status = wait_for("the refusal to be reported", DEADLINE, || {
        let v = g.json("/v1/sources");
        let s = v["sources"][0].clone();
        let err = s["last_error"].as_str().unwrap_or_default().to_owned();
        (err.contains("permission denied") && s["reconnects"].as_u64()? >= 5).then_some(s)
    });
    assert_eq!(status["connected"], false);
    // Repeated refusals are logged once, then counted.
    let warnings = g
        .log()
        .lines()
        .filter(|l| l.contains("etcd watch interrupted") && l.contains("permission denied"))
        .count();
    assert!(warnings <= 2, "{warnings} identical warnings logged");
    assert!(g.metric("watchgate_log_suppressed_total{origin=\"source/main\"}") >= 3.0);

    // Restore: the watch resumes where it left off, nothing was lost.
    as_root(&grant);
    as_root(&["put", SENTINEL, "end"]);
    let delivered = changes(&wait_sentinel(&mut g));
    let kinds: Vec<(&str, &str)> = delivered
        .iter()
        .map(|c| (c.0.as_str(), c.1.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("put", "/wg/a"),
            ("put", "/wg/b"),
            ("delete", "/wg/a"),
            ("put", SENTINEL),
        ]
    );
    assert_eq!(
        g.metric("watchgate_source_resyncs_total{source=\"main\"}"),
        0.0
    );
}

#[test]
fn a_member_that_loses_its_leader_is_left_and_nothing_is_lost() {
    let cluster = EtcdCluster::start(3);
    let urls = cluster.client_urls();
    let mut store = Store::connect(&urls);
    store.put("/wg/a", "1").unwrap();
    let mut g = gateway(&etcd_source(&urls, "dial_timeout_s = 1\n"));
    g.wait_events("event-log", 1, DEADLINE);
    // Member 0 (the one in use) stays up but loses its peers, so it has no
    // leader: with require-leader its watch is cancelled instead of going
    // silent.
    cluster.members[1].pause();
    cluster.members[2].pause();
    let err = wait_for("the leader loss to be noticed", DEADLINE, || {
        let v = g.json("/v1/sources");
        let s = &v["sources"][0];
        (s["connected"] == false).then(|| s["last_error"].as_str().unwrap_or_default().to_owned())
    });
    assert!(!err.is_empty());
    cluster.members[1].resume();
    cluster.members[2].resume();
    cluster.wait_healthy();
    store.retry(|s| s.put("/wg/b", "2"));
    store.retry(|s| s.put(SENTINEL, "end"));
    let delivered = changes(&wait_sentinel(&mut g));
    assert_eq!(delivered, store.history(1));
}

#[test]
fn a_blackholed_connection_is_detected_by_keepalive_and_resumed() {
    let etcd = Etcd::start();
    let proxy = FaultProxy::start(etcd.client_addr());
    let mut store = Store::connect(&[etcd.client_url()]);
    store.put("/wg/a", "1").unwrap();
    let mut g = gateway(&etcd_source(
        &[proxy.url()],
        "keepalive_interval_s = 5\nkeepalive_timeout_s = 2\ndial_timeout_s = 2\n",
    ));
    g.wait_events("event-log", 1, DEADLINE);
    // Packets vanish; nothing closes the connection.
    proxy.set_mode(Mode::Blackhole);
    let cut = Instant::now();
    store.put("/wg/b", "during the partition").unwrap();
    wait_for(
        "the dead connection to be detected",
        Duration::from_secs(30),
        || (g.metric("watchgate_source_connected{source=\"main\"}") == 0.0).then_some(()),
    );
    let detected = cut.elapsed();
    assert!(
        detected <= Duration::from_secs(5 + 2 + 5),
        "detection took {detected:?} with a 5 s interval and a 2 s timeout"
    );
    proxy.set_mode(Mode::Pass);
    store.put(SENTINEL, "end").unwrap();
    let delivered = changes(&wait_sentinel(&mut g));
    assert_eq!(delivered, store.history(1));
}
