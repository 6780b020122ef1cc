//! The Consul source against a protocol-faithful fake Consul
//! (`fake_consul.rs`): health watches with deletes for instances that go
//! away, index resets, rate limiting under churn, restarts mid-poll, KV.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::fake_consul::FakeConsul;
use crate::support::{Gateway, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

fn consul_source(url: &str, extra: &str) -> String {
    format!(
        "[[source]]\nname = \"registry\"\nkind = \"consul\"\naddress = \"{url}\"\n\
         services = [\"web\", \"api\"]\nkv_prefix = \"config/\"\nwait = \"2s\"\n\
         min_interval = \"100ms\"\nreconnect_max_ms = 300\n{extra}"
    )
}

fn gateway(consul: &FakeConsul, extra: &str) -> Gateway {
    let mut g = Gateway::with_sources(&consul_source(&consul.url(), extra));
    g.install_event_log("event-log");
    g.start();
    g
}

/// Current state per key as event-log saw it (the last event per key).
fn state(events: &[Value]) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    for e in events {
        let key = e["key"].as_str().unwrap().to_owned();
        if e["kind"] == "delete" {
            m.remove(&key);
        } else {
            let v = match e["value"].as_str() {
                Some(text) => {
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()))
                }
                None => e["value_b64"].clone(),
            };
            m.insert(key, v);
        }
    }
    m
}

fn wait_state(
    g: &mut Gateway,
    what: &str,
    f: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> Vec<Value> {
    wait_for(what, DEADLINE, || {
        g.assert_running();
        let e = g.events("event-log");
        f(&state(&e)).then_some(e)
    })
}

#[test]
fn instances_that_go_away_or_turn_critical_are_deleted_including_the_last_one() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 8080, &["v1"]);
    consul.register("web", "web-2", "10.0.0.2", 8080, &[]);
    let mut g = gateway(&consul, "");
    let events = wait_state(&mut g, "both instances", |s| s.len() == 2);
    let web1 = &state(&events)["services/web/web-1"];
    assert_eq!(web1["address"], "10.0.0.1");
    assert_eq!(web1["port"], 8080);
    assert_eq!(web1["tags"], serde_json::json!(["v1"]));
    assert_eq!(web1["status"], "passing");
    assert_eq!(g.json("/readyz")["ready"], true);

    // A critical check takes the instance away; healthy again brings it back.
    consul.set_check("web", "web-1", "critical");
    wait_state(&mut g, "web-1 deleted", |s| {
        !s.contains_key("services/web/web-1")
    });
    consul.set_check("web", "web-1", "passing");
    wait_state(&mut g, "web-1 back", |s| {
        s.contains_key("services/web/web-1")
    });

    // Deregistration, down to the empty list.
    consul.deregister("web", "web-1");
    consul.deregister("web", "web-2");
    let events = wait_state(&mut g, "no web instances", |s| s.is_empty());
    let deletes: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "delete")
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        deletes,
        vec![
            "services/web/web-1",
            "services/web/web-1",
            "services/web/web-2"
        ],
        "{events:#?}"
    );
    // Revisions are Consul indexes: they never go down.
    let revs: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(revs.windows(2).all(|w| w[0] <= w[1]), "{revs:?}");
}

#[test]
fn a_wakeup_without_a_change_emits_nothing() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 80, &[]);
    let mut g = gateway(&consul, "");
    wait_state(&mut g, "the instance", |s| s.len() == 1);
    let before = consul.requests("/v1/health/service/web");
    for _ in 0..5 {
        consul.touch("web");
    }
    // The touches wake the blocking query (more requests) but change nothing.
    wait_for("the watch to wake", DEADLINE, || {
        (consul.requests("/v1/health/service/web") > before).then_some(())
    });
    consul.register("web", "web-2", "10.0.0.2", 80, &[]);
    let events = wait_state(&mut g, "web-2", |s| s.len() == 2);
    assert_eq!(events.len(), 2, "a touch produced an event: {events:#?}");
    assert!(consul.max_wait_seen().unwrap() <= Duration::from_secs(2));
}

#[test]
fn an_index_going_backwards_or_to_zero_resets_without_a_busy_loop() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 80, &[]);
    let mut g = gateway(&consul, "");
    wait_state(&mut g, "the instance", |s| s.len() == 1);
    // Index 0 on every answer: the source must not spin.
    consul.force_index(Some(0));
    let start = consul.requests("/v1/health/service/web");
    let t0 = std::time::Instant::now();
    wait_for("some polls with index 0", DEADLINE, || {
        (consul.requests("/v1/health/service/web") >= start + 5).then_some(())
    });
    let polls = consul.requests("/v1/health/service/web") - start;
    let elapsed = t0.elapsed();
    // At most one query per min_interval (100 ms), with slack for the burst.
    let allowed = (elapsed.as_millis() / 100) as u64 + 3;
    assert!(polls <= allowed, "{polls} polls in {elapsed:?}");
    // Backwards: from the real index down to 1, then normal again.
    consul.force_index(Some(1));
    consul.deregister("web", "web-1");
    consul.force_index(None);
    consul.register("web", "web-3", "10.0.0.3", 80, &[]);
    wait_state(&mut g, "web-1 gone, web-3 there", |s| {
        !s.contains_key("services/web/web-1") && s.contains_key("services/web/web-3")
    });
}

#[test]
fn a_check_flapping_at_10_hz_is_rate_limited_and_ends_in_the_right_state() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 80, &[]);
    let mut g = gateway(&consul, "");
    wait_state(&mut g, "the instance", |s| s.len() == 1);
    let before = consul.requests("/v1/health/service/web");
    let t0 = std::time::Instant::now();
    for i in 0..20 {
        let status = if i % 2 == 0 { "critical" } else { "passing" };
        consul.set_check("web", "web-1", status);
        std::thread::sleep(Duration::from_millis(100)); // the flapping itself, at 10 Hz
    }
    consul.set_check("web", "web-1", "critical");
    wait_state(&mut g, "the final critical state", |s| s.is_empty());
    let polls = consul.requests("/v1/health/service/web") - before;
    let allowed = (t0.elapsed().as_millis() / 100) as u64 + 3;
    assert!(
        polls <= allowed,
        "{polls} polls for 21 changes in {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_restart_mid_poll_resumes_and_changes_made_meanwhile_arrive() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 80, &[]);
    consul.kv_put("config/app", b"v1");
    let mut g = gateway(&consul, "");
    wait_state(&mut g, "instance and key", |s| s.len() == 2);
    consul.set_down(true);
    consul.restart();
    wait_for("the source to notice", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"registry\"}") == 0.0).then_some(())
    });
    consul.deregister("web", "web-1");
    consul.kv_put("config/app", b"v2");
    consul.set_down(false);
    let events = wait_state(&mut g, "the changes", |s| {
        !s.contains_key("services/web/web-1")
            && s.get("config/app") == Some(&Value::String("v2".into()))
    });
    assert!(g.metric("watchgate_source_reconnects_total{source=\"registry\"}") >= 1.0);
    let kv: Vec<&Value> = events.iter().filter(|e| e["key"] == "config/app").collect();
    assert_eq!(kv.len(), 2, "{events:#?}");
    assert!(kv[1]["revision"].as_u64() > kv[0]["revision"].as_u64());
    wait_for("reconnected", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"registry\"}") == 1.0).then_some(())
    });
}

#[test]
fn kv_keys_map_to_puts_and_deletes() {
    let consul = FakeConsul::start();
    let mut g = gateway(&consul, "");
    consul.kv_put("config/a", b"1");
    consul.kv_put("config/b", &[0xff, 0x00]);
    consul.kv_put("other/x", b"not watched");
    let events = wait_state(&mut g, "two keys", |s| s.len() == 2);
    let b = events.iter().find(|e| e["key"] == "config/b").unwrap();
    assert_eq!(b["value_b64"], "/wA=");
    consul.kv_delete("config/a");
    consul.kv_delete("config/b");
    let events = wait_state(&mut g, "no keys", |s| s.is_empty());
    assert!(events.iter().all(|e| e["key"] != "other/x"));
}

#[test]
fn a_source_restarted_by_a_reload_reports_only_what_changed_meanwhile() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 80, &[]);
    consul.register("web", "web-2", "10.0.0.2", 80, &[]);
    consul.kv_put("config/a", b"one");
    let mut g = gateway(&consul, "");
    wait_state(&mut g, "the initial state", |s| s.len() == 3);
    consul.set_down(true);
    consul.restart();
    wait_for("the source to notice", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"registry\"}") == 0.0).then_some(())
    });
    // A changed setting restarts the source on reload.
    let config = std::fs::read_to_string(g.config_path()).unwrap();
    std::fs::write(
        g.config_path(),
        config.replace("min_interval = \"100ms\"", "min_interval = \"150ms\""),
    )
    .unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("the reload", DEADLINE, || {
        g.log().contains("Configuration reloaded.").then_some(())
    });
    consul.deregister("web", "web-2");
    consul.kv_put("config/a", b"two");
    consul.set_down(false);
    let events = wait_state(&mut g, "the changes made meanwhile", |s| {
        !s.contains_key("services/web/web-2")
            && s.get("config/a") == Some(&Value::String("two".into()))
    });
    let web1 = events
        .iter()
        .filter(|e| e["key"] == "services/web/web-1")
        .count();
    assert_eq!(
        web1, 1,
        "an unchanged instance was delivered again: {events:#?}"
    );
    let gone = events
        .iter()
        .find(|e| e["key"] == "services/web/web-2" && e["kind"] == "delete")
        .unwrap();
    assert_eq!(gone["resync"], true);
}

#[test]
fn an_instance_deregistered_while_the_gateway_was_down_arrives_as_a_resync_delete() {
    let consul = FakeConsul::start();
    consul.register("web", "web-1", "10.0.0.1", 8080, &[]);
    consul.register("web", "web-2", "10.0.0.2", 8080, &[]);
    let mut g = gateway(&consul, "");
    let before = wait_state(&mut g, "both instances", |s| s.len() == 2).len();
    assert!(g.stop().success());

    consul.deregister("web", "web-1");
    g.start();
    let events = wait_state(&mut g, "web-1 deleted", |s| {
        !s.contains_key("services/web/web-1")
    });
    let after: Vec<(&str, &str, bool)> = events[before..]
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["key"].as_str().unwrap(),
                e["resync"].as_bool().unwrap(),
            )
        })
        .collect();
    // Only the change is sent, flagged resync: web-2 is not sent again.
    assert_eq!(after, vec![("delete", "services/web/web-1", true)]);
}
