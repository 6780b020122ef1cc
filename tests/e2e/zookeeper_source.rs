//! The ZooKeeper source against a real ZooKeeper server (Debian's 3.8),
//! with the server, the gateway and a client owning ephemeral znodes killed
//! with SIGKILL.
//!
//! The ground truth is the tree itself: each test writes through its own
//! client, ends with a sentinel znode, then folds what `event-log` received
//! into a map and compares it with the subtree as ZooKeeper has it. Every
//! key's revisions must rise, and a put's revision is the znode's mzxid.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fault_proxy::FaultProxy;
use crate::support::{Gateway, free_port, wait_for};
use crate::zk_harness::{EphemeralOwner, Zk, Zookeeper};

const DEADLINE: Duration = Duration::from_secs(60);
const ROOT: &str = "/config";
const SENTINEL: &str = "/config/~sentinel";

fn source(servers: &str, extra: &str) -> String {
    format!(
        "[[source]]\nname = \"zk\"\nkind = \"zookeeper\"\nservers = [\"{servers}\"]\nroot = \"{ROOT}\"\n\
         session_timeout = \"2s\"\nreconnect_initial_ms = 50\nreconnect_max_ms = 500\n{extra}"
    )
}

fn gateway(servers: &str, extra: &str) -> Gateway {
    let mut g = Gateway::with_sources(&source(servers, extra));
    g.install_event_log("event-log");
    g.start();
    g
}

/// Fold events into the state they describe, checking that each key's
/// revisions rise. The same change twice in a row is the at-least-once
/// redelivery after a crash, not a step back.
fn fold(events: &[Value]) -> BTreeMap<String, String> {
    let mut state = BTreeMap::new();
    let mut last: BTreeMap<String, (u64, &Value, &Value)> = BTreeMap::new();
    for e in events {
        let key = e["key"].as_str().unwrap().to_owned();
        let rev = e["revision"].as_u64().unwrap();
        let now = (rev, &e["kind"], &e["value"]);
        if let Some(before) = last.insert(key.clone(), now)
            && before != now
        {
            let all: Vec<String> = events
                .iter()
                .filter(|x| x["key"] == key.as_str())
                .map(Value::to_string)
                .collect();
            assert!(
                rev > before.0,
                "{key}: revision {rev} after {}: {all:#?}",
                before.0
            );
        }
        match e["kind"].as_str().unwrap() {
            "put" => state.insert(key, e["value"].as_str().unwrap_or_default().to_owned()),
            _ => state.remove(&key),
        };
    }
    state
}

/// Write the sentinel with `value` and wait until event-log has it; the
/// events so far.
fn sync_on_sentinel(g: &mut Gateway, zk: &Zk, value: &str) -> Vec<Value> {
    zk.put(SENTINEL, value);
    wait_for("the sentinel to arrive", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        e.iter()
            .any(|e| e["key"] == SENTINEL && e["value"] == value)
            .then_some(e)
    })
}

/// Wait until event-log's folded state equals the tree.
fn wait_same_state(g: &mut Gateway, zk: &Zk) -> Vec<Value> {
    wait_for("event-log's state to equal the tree", DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        (fold(&e) == zk.tree(ROOT)).then_some(e)
    })
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn zookeeper_snapshot_then_changes_arrive_with_mzxid_revisions() {
    let server = Zookeeper::start();
    let zk = Zk::connect(&server.server());
    zk.put("/config/app/db", "postgres://a");
    zk.put("/config/app/cache", "redis://a");
    zk.put("/configuration/not-watched", "x");
    let mut g = gateway(&server.server(), "");
    let snapshot = g.wait_events("event-log", 4, DEADLINE);
    let keys: Vec<&str> = snapshot
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "/config",
            "/config/app",
            "/config/app/cache",
            "/config/app/db"
        ],
        "every znode of the subtree, the root included, and nothing beside it"
    );
    let (_, mzxid) = zk.get("/config/app/db").unwrap();
    assert_eq!(snapshot[3]["revision"].as_i64(), Some(mzxid));

    let put = zk.put("/config/app/db", "postgres://b");
    zk.put("/config/app/new/deep/leaf", "v1");
    zk.put("/config/app/new/deep/leaf", "v2");
    assert!(zk.delete_tree("/config/app/cache"));
    zk.put("/config/empty", "");
    let events = sync_on_sentinel(&mut g, &zk, "1");
    assert_eq!(fold(&events), zk.tree(ROOT));
    let db = events
        .iter()
        .find(|e| e["key"] == "/config/app/db" && e["value"] == "postgres://b")
        .expect("the update");
    assert_eq!(db["revision"].as_i64(), Some(put), "revision = mzxid");
    let cache = events
        .iter()
        .find(|e| e["key"] == "/config/app/cache" && e["kind"] == "delete")
        .expect("the delete");
    assert!(cache["revision"].as_i64().unwrap() > put);
    assert_eq!(cache["resync"], false);
    let live: Vec<u64> = events[4..]
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(
        live.windows(2).all(|w| w[0] <= w[1]),
        "revisions went back: {live:?}"
    );
    assert_eq!(g.metric("watchgate_source_connected{source=\"zk\"}"), 1.0);
    let sources = g.json("/v1/sources");
    let zk_status = sources["sources"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "zk"))
        .cloned()
        .unwrap_or_else(|| panic!("no zk in {sources}"));
    assert_eq!(zk_status["synced"], true);
    assert!(zk_status["revision"].as_i64().unwrap() >= put);
}

#[test]
fn zookeeper_ephemeral_of_a_killed_client_becomes_a_delete() {
    let server = Zookeeper::start();
    let zk = Zk::connect(&server.server());
    zk.put("/config/services/api", "");
    let mut g = gateway(&server.server(), "");
    let mut owner = EphemeralOwner::start(&server.server(), 1000);
    owner.create("/config/services/api/instance-1", "10.0.0.1:8080");
    wait_for("the instance to arrive", DEADLINE, || {
        g.events("event-log").iter().find_map(|e| {
            (e["key"] == "/config/services/api/instance-1" && e["kind"] == "put").then_some(())
        })
    });
    let killed = Instant::now();
    owner.kill9();
    wait_for("the instance's delete", DEADLINE, || {
        g.assert_running();
        g.events("event-log")
            .into_iter()
            .find(|e| e["key"] == "/config/services/api/instance-1" && e["kind"] == "delete")
    });
    assert!(zk.get("/config/services/api/instance-1").is_none());
    // The session of at most 20 ticks expires, then the delete follows.
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    let events = sync_on_sentinel(&mut g, &zk, "1");
    assert_eq!(fold(&events), zk.tree(ROOT));
}

#[test]
fn zookeeper_server_kill_9_and_restart_then_later_changes_arrive() {
    let mut server = Zookeeper::start();
    let zk = Zk::connect(&server.server());
    zk.put("/config/a", "1");
    let mut g = gateway(&server.server(), "");
    sync_on_sentinel(&mut g, &zk, "0");
    drop(zk);
    server.kill();
    wait_for("the loss to show", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"zk\"}") == 0.0).then_some(())
    });
    server.restart();
    let zk = Zk::connect(&server.server());
    zk.put("/config/a", "2");
    zk.put("/config/b/c", "3");
    assert!(zk.get("/config/a").is_some());
    let events = sync_on_sentinel(&mut g, &zk, "1");
    assert_eq!(fold(&events), zk.tree(ROOT));
    assert_eq!(g.metric("watchgate_source_connected{source=\"zk\"}"), 1.0);
}

#[test]
fn zookeeper_gateway_kill_9_while_writing_loses_nothing() {
    let server = Zookeeper::start();
    let zk = Zk::connect(&server.server());
    for i in 0..20 {
        zk.put(&format!("/config/k{i}"), "0");
    }
    let mut g = gateway(&server.server(), "");
    wait_same_state(&mut g, &zk);
    for round in 1..=3 {
        let writer = {
            let server = server.server();
            std::thread::spawn(move || {
                let zk = Zk::connect(&server);
                for i in 0..200 {
                    let k = format!("/config/k{}", i % 20);
                    if i % 7 == 0 {
                        zk.delete_tree(&k);
                    } else {
                        zk.put(&k, &format!("{round}-{i}"));
                    }
                }
            })
        };
        wait_for("some writes", DEADLINE, || {
            (g.events("event-log").len() > 25).then_some(())
        });
        g.kill9();
        writer.join().unwrap();
        g.start();
    }
    let events = sync_on_sentinel(&mut g, &zk, "end");
    assert_eq!(fold(&events), zk.tree(ROOT), "state lost across kill -9");
    assert!(
        events.iter().any(|e| e["resync"] == true),
        "what changed while down arrives flagged resync"
    );
}

#[test]
fn zookeeper_session_expiry_while_the_gateway_is_stopped_resyncs_with_deletes() {
    let server = Zookeeper::start();
    let zk = Zk::connect(&server.server());
    zk.put("/config/keep", "1");
    zk.put("/config/change", "1");
    zk.put("/config/gone/child", "1");
    let mut g = gateway(&server.server(), "");
    wait_same_state(&mut g, &zk);
    let expired_before = server.log().matches("Expiring session").count();
    // A stopped gateway answers no pings: the server expires its session.
    signal(g.pid(), "STOP");
    zk.put("/config/change", "2");
    zk.delete_tree("/config/gone");
    zk.put("/config/added", "1");
    wait_for("the gateway's session to expire", DEADLINE, || {
        (server.log().matches("Expiring session").count() > expired_before).then_some(())
    });
    signal(g.pid(), "CONT");
    let events = wait_same_state(&mut g, &zk);
    for key in ["/config/gone", "/config/gone/child"] {
        let e = events
            .iter()
            .find(|e| e["key"] == key && e["kind"] == "delete")
            .unwrap_or_else(|| panic!("no delete of {key}"));
        assert_eq!(e["resync"], true, "{e}");
    }
    let change = events
        .iter()
        .find(|e| e["key"] == "/config/change" && e["value"] == "2")
        .unwrap();
    assert_eq!(change["resync"], true);
    assert!(
        g.log().contains("ZooKeeper session ended: Expired"),
        "the expiry is named in the log"
    );
    let events = sync_on_sentinel(&mut g, &zk, "1");
    assert_eq!(fold(&events), zk.tree(ROOT));
}

#[test]
fn zookeeper_startup_fail_without_a_server_exits_1_naming_it() {
    let port = free_port();
    let g = Gateway::with_sources(&source(
        &format!("127.0.0.1:{port}"),
        "startup_timeout = \"2s\"\n",
    ));
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_watchgate"))
        .args(["run", "--config"])
        .arg(g.config_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("did not connect within 2s"), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")),
        "names the server: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn zookeeper_degraded_outage_logs_a_bounded_number_of_lines_then_syncs() {
    let port = free_port();
    let mut g = Gateway::with_sources(&source(
        &format!("127.0.0.1:{port}"),
        "startup = \"degraded\"\nstartup_timeout = \"1s\"\n",
    ));
    g.install_event_log("event-log");
    g.spawn();
    // The outage being measured: 20 s with nothing listening.
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(20) {
        g.assert_running();
        let (code, body) = g.get("/readyz").expect("readyz answers");
        assert_eq!(code, 503, "ready without ZooKeeper: {body}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, body) = g.get("/readyz").unwrap();
    assert!(
        body.contains(&format!("127.0.0.1:{port}")),
        "the reason: {body}"
    );
    assert!(g.metric("watchgate_source_reconnects_total{source=\"zk\"}") >= 10.0);
    let warnings = g
        .log()
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\""))
        .count();
    eprintln!("outage: {warnings} warning lines in 20 s");
    assert!(warnings <= 40, "{warnings} warnings in a 20 s outage");
    assert!(g.metric("watchgate_log_suppressed_total{origin=\"source/zk\"}") >= 5.0);

    let server = Zookeeper::start_on(port);
    let zk = Zk::connect(&server.server());
    zk.put("/config/a", "1");
    wait_for("readiness", DEADLINE, || {
        (g.get("/readyz")?.0 == 200).then_some(())
    });
    let events = sync_on_sentinel(&mut g, &zk, "1");
    assert_eq!(fold(&events), zk.tree(ROOT));
}

#[test]
fn zookeeper_a_hundred_reconnects_leave_tasks_and_fds_flat() {
    let server = Zookeeper::start();
    let proxy = FaultProxy::start(server.addr());
    let zk = Zk::connect(&server.server());
    zk.put("/config/a", "0");
    let mut g = gateway(&proxy.addr().to_string(), "");
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let started = Instant::now();
    let mut baseline = None;
    for cycle in 1..=100u32 {
        let before = g.metric("watchgate_source_reconnects_total{source=\"zk\"}");
        proxy.reset_all();
        wait_for("the loss to be noticed", DEADLINE, || {
            (g.metric("watchgate_source_reconnects_total{source=\"zk\"}") > before).then_some(())
        });
        wait_for("the relist", DEADLINE, || {
            (g.metric("watchgate_source_connected{source=\"zk\"}") == 1.0).then_some(())
        });
        zk.put(&format!("/config/c{}", cycle % 5), &cycle.to_string());
        if cycle == 10 {
            baseline = Some((g.metric("watchgate_runtime_alive_tasks"), fds(g.pid())));
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "{:?}",
        started.elapsed()
    );
    let events = sync_on_sentinel(&mut g, &zk, "end");
    assert_eq!(fold(&events), zk.tree(ROOT));
    let (tasks0, fds0) = baseline.unwrap();
    let (tasks, fds_now) = (g.metric("watchgate_runtime_alive_tasks"), fds(g.pid()));
    eprintln!(
        "100 resets in {:?}: tasks {tasks0} -> {tasks}, fds {fds0} -> {fds_now}",
        started.elapsed()
    );
    assert!(tasks <= tasks0 + 2.0, "tasks grew from {tasks0} to {tasks}");
    assert!(fds_now <= fds0 + 2, "fds grew from {fds0} to {fds_now}");
    assert_eq!(
        proxy.open_connections(),
        1,
        "exactly one connection to ZooKeeper"
    );
    let lines = g.log().matches("Lost the connection to ZooKeeper").count();
    assert!(lines <= 5, "{lines} warnings for 100 identical resets");
    assert!(g.metric("watchgate_log_suppressed_total{origin=\"source/zk\"}") >= 90.0);
}

#[test]
fn zookeeper_digest_credentials_read_a_protected_subtree() {
    let server = Zookeeper::start();
    let owner = Zk::connect_as(&server.server(), "reader:s3cret");
    owner.put("/config/secret", "v1");
    // Without the credentials the subtree cannot be read: the source says
    // so and stays unsynced.
    let mut denied = Gateway::with_sources(&source(&server.server(), "startup = \"degraded\"\n"));
    denied.spawn();
    wait_for("the refusal to be reported", DEADLINE, || {
        let (code, body) = denied.get("/readyz")?;
        (code == 503 && body.contains("cannot read \\\"/config\\\": not authorized")).then_some(())
    });
    drop(denied);
    // Under startup = "fail" the refusal ends the process, naming it.
    let fail = Gateway::with_sources(&source(&server.server(), "startup_timeout = \"2s\"\n"));
    let out = Command::new(env!("CARGO_BIN_EXE_watchgate"))
        .args(["run", "--config"])
        .arg(fail.config_path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot read \"/config\": not authorized"),
        "{err}"
    );
    let mut g = gateway(
        &server.server(),
        "username = \"reader\"\npassword = \"s3cret\"\n",
    );
    let events = g.wait_events("event-log", 2, DEADLINE);
    assert_eq!(fold(&events), owner.tree(ROOT));
    owner.put("/config/secret", "v2");
    wait_for("the change", DEADLINE, || {
        (fold(&g.events("event-log")).get("/config/secret")? == "v2").then_some(())
    });
}
