//! The Nacos source against a protocol-faithful fake Nacos
//! (`fake_nacos.rs`): config listening with MD5s, deletes, changes made
//! while disconnected, one upstream listen for many plugins, and service
//! instances.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::fake_nacos::FakeNacos;
use crate::support::{Gateway, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

fn nacos_source(url: &str) -> String {
    format!(
        "[[source]]\nname = \"configs\"\nkind = \"nacos\"\nserver = \"{url}\"\n\
         configs = [{{ data_id = \"app.yaml\" }}, {{ data_id = \"db.yaml\", group = \"infra\" }}]\n\
         services = [\"order-service\"]\nlong_poll_timeout = \"2s\"\npoll_interval = \"100ms\"\n\
         reconnect_max_ms = 300\n"
    )
}

/// The last value per key (absent after a delete) that `plugin` logged.
fn state(g: &Gateway, plugin: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for e in g.events(plugin) {
        let key = e["key"].as_str().unwrap().to_owned();
        match e["value"].as_str() {
            Some(v) if e["kind"] == "put" => {
                m.insert(key, v.to_owned());
            }
            _ => {
                m.remove(&key);
            }
        }
    }
    m
}

fn wait_state(
    g: &mut Gateway,
    plugin: &str,
    what: &str,
    f: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Vec<Value> {
    wait_for(what, DEADLINE, || {
        g.assert_running();
        f(&state(g, plugin)).then(|| g.events(plugin))
    })
}

#[test]
fn configs_are_put_changed_and_deleted_and_the_snapshot_comes_first() {
    let nacos = FakeNacos::start();
    nacos.publish_config("app.yaml", "DEFAULT_GROUP", "", "port: 80");
    let mut g = Gateway::with_sources(&nacos_source(&nacos.url()));
    g.install_event_log("event-log");
    g.start();
    wait_state(&mut g, "event-log", "the snapshot", |s| {
        s.get("DEFAULT_GROUP/app.yaml").map(String::as_str) == Some("port: 80")
    });
    assert_eq!(g.json("/readyz")["ready"], true);

    wait_for("the listener to park", DEADLINE, || {
        (nacos.parked_listeners() == 1).then_some(())
    });
    nacos.publish_config("app.yaml", "DEFAULT_GROUP", "", "port: 81");
    nacos.publish_config("db.yaml", "infra", "", "url: x");
    wait_state(&mut g, "event-log", "the changes", |s| {
        s.get("DEFAULT_GROUP/app.yaml").map(String::as_str) == Some("port: 81")
            && s.get("infra/db.yaml").map(String::as_str) == Some("url: x")
    });
    nacos.delete_config("app.yaml", "DEFAULT_GROUP", "");
    let events = wait_state(&mut g, "event-log", "the delete", |s| {
        !s.contains_key("DEFAULT_GROUP/app.yaml")
    });
    let last = events
        .iter()
        .rev()
        .find(|e| e["key"] == "DEFAULT_GROUP/app.yaml")
        .unwrap();
    assert_eq!(last["kind"], "delete");
    // Recreated after a delete: a put again (the MD5 was reset).
    nacos.publish_config("app.yaml", "DEFAULT_GROUP", "", "port: 81");
    wait_state(&mut g, "event-log", "the recreation", |s| {
        s.get("DEFAULT_GROUP/app.yaml").map(String::as_str) == Some("port: 81")
    });
    let puts_of_app = g
        .events("event-log")
        .iter()
        .filter(|e| e["key"] == "DEFAULT_GROUP/app.yaml")
        .count();
    assert_eq!(puts_of_app, 4, "put, change, delete, put again");
}

#[test]
fn a_change_made_while_disconnected_is_not_lost_and_all_listens_are_resent() {
    let nacos = FakeNacos::start();
    nacos.publish_config("app.yaml", "DEFAULT_GROUP", "", "v1");
    nacos.publish_config("db.yaml", "infra", "", "v1");
    let mut g = Gateway::with_sources(&nacos_source(&nacos.url()));
    g.install_event_log("event-log");
    g.start();
    wait_state(&mut g, "event-log", "the snapshot", |s| s.len() == 2);
    wait_for("the listener to park", DEADLINE, || {
        (nacos.parked_listeners() == 1).then_some(())
    });
    nacos.set_down(true);
    nacos.restart();
    wait_for("the source to notice", DEADLINE, || {
        (g.metric("watchgate_source_connected{source=\"configs\"}") == 0.0).then_some(())
    });
    nacos.publish_config("db.yaml", "infra", "", "v2 while down");
    let listens = nacos.listen_requests();
    nacos.set_down(false);
    wait_state(&mut g, "event-log", "the change made while down", |s| {
        s.get("infra/db.yaml").map(String::as_str) == Some("v2 while down")
    });
    wait_for("a listen after the restart", DEADLINE, || {
        (nacos.listen_requests() > listens).then_some(())
    });
    // The first listen after the restart carries every config at once.
    assert_eq!(
        nacos.listened_keys_last(),
        vec![
            "app.yaml\u{2}DEFAULT_GROUP".to_owned(),
            "db.yaml\u{2}infra".to_owned()
        ]
    );
}

#[test]
fn one_upstream_listen_serves_several_plugins_and_a_slow_one_delays_nobody() {
    let nacos = FakeNacos::start();
    nacos.publish_config("app.yaml", "DEFAULT_GROUP", "", "v1");
    let mut g = Gateway::with_sources(&nacos_source(&nacos.url()));
    g.install_event_log("first");
    g.install_event_log("second");
    g.install(
        "slow",
        "fault-spin",
        "[limits]\nfuel = 1_000_000_000_000_000\ntimeout_ms = 3000\n",
    );
    g.start();
    wait_for("the listener to park", DEADLINE, || {
        (nacos.parked_listeners() == 1).then_some(())
    });
    for i in 2..5 {
        nacos.publish_config("app.yaml", "DEFAULT_GROUP", "", &format!("v{i}"));
        for plugin in ["first", "second"] {
            wait_state(&mut g, plugin, "the change", |s| {
                s.get("DEFAULT_GROUP/app.yaml").map(String::as_str)
                    == Some(format!("v{i}").as_str())
            });
        }
    }
    // Still exactly one parked listen, carrying the config once.
    wait_for("the listener to park again", DEADLINE, || {
        (nacos.parked_listeners() == 1).then_some(())
    });
    assert_eq!(
        nacos.listened_keys_last(),
        vec![
            "app.yaml\u{2}DEFAULT_GROUP".to_owned(),
            "db.yaml\u{2}infra".to_owned()
        ],
        "each config is listened to once"
    );
    assert!(g.metric("watchgate_plugin_queue_depth{plugin=\"slow\"}") >= 1.0);
}

#[test]
fn service_instances_follow_health_and_deregistration() {
    let nacos = FakeNacos::start();
    nacos.register_instance("order-service", "DEFAULT_GROUP", "10.0.0.1", 8080, true);
    nacos.register_instance("order-service", "DEFAULT_GROUP", "10.0.0.2", 8080, false);
    let mut g = Gateway::with_sources(&nacos_source(&nacos.url()));
    g.install_event_log("event-log");
    g.start();
    let events = wait_state(&mut g, "event-log", "the healthy instance", |s| {
        s.contains_key("services/order-service/10.0.0.1:8080")
    });
    assert!(
        !state(&g, "event-log").contains_key("services/order-service/10.0.0.2:8080"),
        "an unhealthy instance was reported: {events:#?}"
    );
    let v: Value =
        serde_json::from_str(&state(&g, "event-log")["services/order-service/10.0.0.1:8080"])
            .unwrap();
    assert_eq!(v["ip"], "10.0.0.1");
    assert_eq!(v["port"], 8080);
    nacos.set_healthy("order-service", "DEFAULT_GROUP", "10.0.0.2", 8080, true);
    nacos.set_healthy("order-service", "DEFAULT_GROUP", "10.0.0.1", 8080, false);
    wait_state(&mut g, "event-log", "the swap", |s| {
        s.contains_key("services/order-service/10.0.0.2:8080")
            && !s.contains_key("services/order-service/10.0.0.1:8080")
    });
    nacos.deregister_instance("order-service", "DEFAULT_GROUP", "10.0.0.2", 8080);
    wait_state(&mut g, "event-log", "no instances", |s| {
        !s.keys().any(|k| k.starts_with("services/"))
    });
}
