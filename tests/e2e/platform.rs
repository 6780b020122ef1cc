//! The plugin platform: capabilities under operator grants (http, kv,
//! snapshot, settings), manifests, quarantine, the example plugins, and
//! the tools for plugin authors.

use std::time::Duration;

use serde_json::Value;

use crate::etcd_harness::Etcd;
use crate::etcd_source::Store;
use crate::http_sink::HttpSink;
use crate::support::{Gateway, plugin, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

fn report(g: &Gateway, name: &str) -> Value {
    g.json("/v1/plugins")["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not running"))
        .clone()
}

fn capability(g: &Gateway, plugin: &str, cap: &str, outcome: &str) -> f64 {
    g.metric(&format!(
        "watchgate_capability_calls_total{{plugin=\"{plugin}\",capability=\"{cap}\",outcome=\"{outcome}\"}}"
    ))
}

/// Wait for a plugin log line containing `text`.
fn wait_log(g: &Gateway, text: &str) {
    wait_for(&format!("log line {text:?}"), DEADLINE, || {
        g.log().contains(text).then_some(())
    });
}

#[test]
fn a_quarantined_plugin_keeps_its_events_folded_by_key_and_gets_them_after_recovery() {
    let mut g = Gateway::new();
    // Enough attempts that the probes failing before the fixed build
    // arrives (their number depends on how fast this machine writes the
    // changes) never dead-letter a kept event.
    let sidecar = "retry_backoff = \"1ms\"\nretry_attempts = 1000\nquarantine_after = 3\n\
                   queue_capacity = 4\n[grants]\nfiles = \"../out/guarded\"\n";
    // "guarded" starts as a build that traps on every call.
    g.install("guarded", "fault-panic", sidecar);
    g.start();
    std::fs::write(g.path("watched/first"), "1").unwrap();
    wait_for("quarantine", DEADLINE, || {
        (g.metric("watchgate_plugin_quarantined{plugin=\"guarded\"}") == 1.0).then_some(())
    });
    assert_eq!(report(&g, "guarded")["state"], "quarantined");
    // While quarantined: three changes of each of six keys.
    for round in 0..3 {
        for k in 0..6 {
            std::fs::write(g.path(&format!("watched/key{k}")), round.to_string()).unwrap();
            // Let each change land as its own event.
            wait_for("the change to be seen", DEADLINE, || {
                (g.metric("watchgate_source_events_total{source=\"local\"}")
                    >= (2 + round * 6 + k) as f64)
                    .then_some(())
            });
        }
    }
    assert_eq!(
        g.metric("watchgate_plugin_invocations_total{plugin=\"guarded\",outcome=\"ok\"}"),
        0.0
    );
    // The fixed build arrives under the same name: it is probed at once,
    // leaves quarantine and gets everything that was kept.
    g.install("guarded", "event-log", sidecar);
    let events = wait_for("the kept events", DEADLINE, || {
        let e = g.events("guarded");
        let done = (0..6).all(|k| {
            e.iter()
                .any(|x| x["key"] == format!("key{k}") && x["value"] == "2")
        }) && e.iter().any(|x| x["key"] == "first");
        done.then_some(e)
    });
    assert_eq!(
        g.metric("watchgate_plugin_quarantined{plugin=\"guarded\"}"),
        0.0
    );
    assert_eq!(report(&g, "guarded")["state"], "running");
    // Folded while waiting: fewer events than changes, and the folds said
    // so in `coalesced`.
    assert!(
        events.len() < 1 + 18,
        "{} events for 19 changes",
        events.len()
    );
    let folded: u64 = events
        .iter()
        .map(|e| e["coalesced"].as_u64().unwrap_or(0))
        .sum();
    assert!(folded > 0, "no event says it was folded: {events:#?}");
    // Per key, the values arrive in order.
    for k in 0..6 {
        let values: Vec<&str> = events
            .iter()
            .filter(|e| e["key"] == format!("key{k}"))
            .map(|e| e["value"].as_str().unwrap())
            .collect();
        let mut sorted = values.clone();
        sorted.sort_unstable();
        assert_eq!(values, sorted, "key{k} out of order");
    }
}

#[test]
fn webhook_notify_posts_each_change_to_the_granted_url_only() {
    let sink = HttpSink::start();
    let mut g = Gateway::new();
    g.install(
        "webhook-notify",
        "webhook-notify",
        &format!(
            "[grants]\nhttp = [\"{addr}\"]\n[settings]\nurl = \"http://{addr}/hook\"\nauthorization = \"Bearer t0k\"\n",
            addr = sink.addr()
        ),
    );
    g.start();
    for i in 0..5 {
        std::fs::write(g.path(&format!("watched/svc{i}")), format!("v{i}")).unwrap();
    }
    // The delete only once the puts went out (the file source would fold a
    // put and delete within its debounce into nothing).
    wait_for("five notifications", DEADLINE, || {
        (sink.received().len() >= 5).then_some(())
    });
    std::fs::remove_file(g.path("watched/svc0")).unwrap();
    let got = wait_for("six notifications", DEADLINE, || {
        let r = sink.received();
        (r.len() >= 6).then_some(r)
    });
    assert_eq!(got.len(), 6, "{got:#?}");
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.url, "/hook");
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "authorization" && v == "Bearer t0k"),
            "{r:?}"
        );
    }
    let bodies: Vec<Value> = got
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    assert!(
        bodies
            .iter()
            .any(|b| b["key"] == "svc3" && b["kind"] == "put" && b["value"] == "v3"),
        "{bodies:#?}"
    );
    assert!(
        bodies
            .iter()
            .any(|b| b["key"] == "svc0" && b["kind"] == "delete"),
        "{bodies:#?}"
    );
    wait_for("deliveries counted", DEADLINE, || {
        (capability(&g, "webhook-notify", "http", "delivered") == 6.0).then_some(())
    });
    let r = report(&g, "webhook-notify");
    assert_eq!(r["capabilities"]["requested"], serde_json::json!(["http"]));
    assert_eq!(r["capabilities"]["granted"], serde_json::json!(["http"]));
    assert_eq!(r["manifest"]["name"], "webhook-notify");
}

#[test]
fn http_is_refused_off_the_allowlist_and_redirects_may_not_leave_it() {
    let granted = HttpSink::start();
    let other = HttpSink::start();
    let mut g = Gateway::new();
    g.install(
        "probe",
        "capability-probe",
        &format!(
            "retry_attempts = 1\n[grants]\nhttp = [\"{}\"]\n",
            granted.addr()
        ),
    );
    g.start();
    let send = |name: &str, url: String| {
        let v = serde_json::json!({"op": "http", "url": url, "body": name}).to_string();
        std::fs::write(g.path(&format!("watched/{name}")), v).unwrap();
    };
    // Straight to a host that was not granted: refused in the call.
    send("direct", format!("http://{}/x", other.addr()));
    wait_log(&g, "probe http err");
    // A redirect that stays on the granted host is followed.
    send(
        "stay",
        format!("http://{0}/redirect/http://{0}/landed", granted.addr()),
    );
    wait_for("the followed redirect", DEADLINE, || {
        granted
            .received()
            .iter()
            .any(|r| r.url == "/landed")
            .then_some(())
    });
    // A redirect off the allowlist is not followed.
    send(
        "leave",
        format!(
            "http://{}/redirect/http://{}/stolen",
            granted.addr(),
            other.addr()
        ),
    );
    wait_for("the refused redirect", DEADLINE, || {
        (capability(&g, "probe", "http", "failed") == 1.0).then_some(())
    });
    assert!(
        other.received().is_empty(),
        "the other host was reached: {:?}",
        other.received()
    );
    assert_eq!(capability(&g, "probe", "http", "denied"), 1.0);
    assert_eq!(capability(&g, "probe", "http", "delivered"), 1.0);
    // A server error is retried with backoff, and the retry delivers.
    send("flaky", format!("http://{}/flaky/once", granted.addr()));
    wait_for("the retried request", DEADLINE, || {
        (capability(&g, "probe", "http", "delivered") == 2.0).then_some(())
    });
    let tries = granted
        .received()
        .iter()
        .filter(|r| r.url == "/flaky/once")
        .count();
    assert_eq!(tries, 2, "one 503, then one success");
}

#[test]
fn kv_writes_back_under_the_granted_prefix_and_snapshot_reads_subscribed_keys() {
    let etcd = Etcd::start();
    let mut store = Store::connect(&[etcd.client_url()]);
    store.put("/wg/data/x", "42").unwrap();
    store.put("/wg/data/y", "7").unwrap();
    store.put("/other/secret", "s").unwrap();
    let mut g = Gateway::with_sources(&format!(
        "[[source]]\nname = \"main\"\nkind = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"/\"\n",
        etcd.client_url()
    ));
    g.install(
        "probe",
        "capability-probe",
        "retry_attempts = 1\n[[subscribe]]\nsource = \"main\"\nprefix = \"/wg/\"\n\
         [grants]\nkv = [{ source = \"main\", prefix = \"/wg/out/\" }]\nsnapshot = true\n\
         [settings]\ngreeting = \"hello\"\n",
    );
    g.start();
    let mut cmd = |n: u32, v: Value| {
        store.put(&format!("/wg/cmd/{n}"), v.to_string()).unwrap();
    };
    cmd(
        1,
        serde_json::json!({"op": "snapshot_get", "source": "main", "key": "/wg/data/x"}),
    );
    wait_log(&g, "probe snapshot_get ok 42");
    cmd(
        2,
        serde_json::json!({"op": "snapshot_scan", "source": "main", "prefix": "/wg/data/"}),
    );
    wait_log(&g, "probe snapshot_scan ok /wg/data/x=42,/wg/data/y=7");
    cmd(
        3,
        serde_json::json!({"op": "snapshot_get", "source": "main", "key": "/other/secret"}),
    );
    wait_log(&g, "outside this plugin's subscriptions");
    cmd(4, serde_json::json!({"op": "setting", "name": "greeting"}));
    wait_log(&g, "probe setting ok hello");
    cmd(
        5,
        serde_json::json!({"op": "kv_put", "source": "main", "key": "/wg/out/result", "value": "done"}),
    );
    cmd(
        6,
        serde_json::json!({"op": "kv_put", "source": "main", "key": "/wg/data/x", "value": "hijacked"}),
    );
    wait_log(&g, "is not granted to this plugin");
    wait_for("the write-back", DEADLINE, || {
        (store.get("/wg/out/result").as_deref() == Some("done")).then_some(())
    });
    assert_eq!(store.get("/wg/data/x").as_deref(), Some("42"));
    store
        .put(
            "/wg/cmd/7",
            serde_json::json!({"op": "kv_delete", "source": "main", "key": "/wg/out/result"})
                .to_string(),
        )
        .unwrap();
    wait_for("the delete", DEADLINE, || {
        store.get("/wg/out/result").is_none().then_some(())
    });
    // The writer counts a write after etcd acknowledged it, so the count
    // can trail what the store already shows.
    wait_for("both writes counted", DEADLINE, || {
        (capability(&g, "probe", "kv", "written") == 2.0).then_some(())
    });
    assert_eq!(capability(&g, "probe", "kv", "written"), 2.0);
    assert_eq!(capability(&g, "probe", "kv", "denied"), 1.0);
    assert_eq!(capability(&g, "probe", "snapshot", "denied"), 1.0);
    let r = report(&g, "probe");
    assert_eq!(
        r["capabilities"]["granted"],
        serde_json::json!(["kv", "snapshot"])
    );
    assert_eq!(r["capabilities"]["ungranted"], serde_json::json!(["http"]));
}

#[test]
fn upstream_render_keeps_an_upstream_file_current() {
    let mut g = Gateway::new();
    g.install(
        "upstream-render",
        "upstream-render",
        "[grants]\nfiles = \"../out/nginx\"\n",
    );
    g.start();
    std::fs::create_dir_all(g.path("watched/services/web")).unwrap();
    let put = |id: &str, v: Value| {
        std::fs::write(g.path(&format!("watched/services/web/{id}")), v.to_string()).unwrap();
    };
    put(
        "a",
        serde_json::json!({"address": "10.0.0.2", "port": 8080}),
    );
    put(
        "b",
        serde_json::json!({"address": "10.0.0.1", "port": 8080}),
    );
    let conf = g.path("out/nginx/upstreams/web.conf");
    let read = || std::fs::read_to_string(&conf).unwrap_or_default();
    wait_for("both servers", DEADLINE, || {
        let t = read();
        (t.contains("server 10.0.0.1:8080;") && t.contains("server 10.0.0.2:8080;")).then_some(())
    });
    let text = read();
    assert!(text.contains("upstream web {"), "{text}");
    assert!(
        text.find("10.0.0.1").unwrap() < text.find("10.0.0.2").unwrap(),
        "servers sorted: {text}"
    );
    std::fs::remove_file(g.path("watched/services/web/a")).unwrap();
    wait_for("a removed", DEADLINE, || {
        (!read().contains("10.0.0.2")).then_some(())
    });
    std::fs::remove_file(g.path("watched/services/web/b")).unwrap();
    wait_for("no server left", DEADLINE, || {
        read().contains("down;").then_some(())
    });
    // Written atomically: no temporary file is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(g.path("out/nginx/upstreams"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n != "web.conf")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn config_guard_dead_letters_or_logs_invalid_values() {
    let mut g = Gateway::new();
    g.install(
        "guard",
        "config-guard",
        "retry_attempts = 1\n[settings]\nprefix = \"conf/\"\nformat = \"auto\"\non_invalid = \"dead-letter\"\n",
    );
    g.install(
        "guard-log",
        "config-guard",
        "[settings]\nprefix = \"conf/\"\non_invalid = \"log\"\n",
    );
    g.start();
    std::fs::create_dir_all(g.path("watched/conf")).unwrap();
    for (name, text) in [
        ("a.json", "{\"port\": 8080}"),
        ("b.json", "{\"port\": "),
        ("c.yaml", "port: 8080\nhosts: [a, b]\n"),
        ("d.yaml", "port: [8080\n"),
        ("e.txt", "not under any rule but the default: JSON"),
    ] {
        std::fs::write(g.path(&format!("watched/conf/{name}")), text).unwrap();
    }
    std::fs::write(g.path("watched/elsewhere.json"), "{ broken").unwrap();
    let letters = wait_for("dead letters", DEADLINE, || {
        let l = g.json("/v1/plugins/guard/dead-letters")["dead_letters"]
            .as_array()
            .unwrap()
            .clone();
        (l.len() >= 3).then_some(l)
    });
    let mut keys: Vec<&str> = letters
        .iter()
        .map(|l| l["event"]["key"].as_str().unwrap())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["conf/b.json", "conf/d.yaml", "conf/e.txt"]);
    // The logging instance handled everything and said what was wrong.
    wait_for("guard-log done", DEADLINE, || {
        (g.metric("watchgate_plugin_invocations_total{plugin=\"guard-log\",outcome=\"ok\"}") == 6.0)
            .then_some(())
    });
    let log = g.log();
    assert!(
        log.lines()
            .any(|l| l.contains("guard-log") && l.contains("conf/b.json")),
        "no log line names conf/b.json"
    );
}

#[test]
fn check_reports_requested_against_granted_capabilities() {
    let g = Gateway::new();
    g.install("webhook-notify", "webhook-notify", "");
    g.install_event_log("event-log");
    let (code, out, err) = g.cli(&["check", "--config", g.config_path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("capabilities requested: [http], granted: []"),
        "{out}"
    );
    assert!(out.contains("warning: asks for [http]"), "{out}");
    assert!(out.contains("manifest webhook-notify"), "{out}");
}

#[test]
fn plugin_test_prints_effects_and_performs_them_only_when_asked() {
    let sink = HttpSink::start();
    let g = Gateway::new();
    let sidecar = g.path("webhook.toml");
    std::fs::write(
        &sidecar,
        format!(
            "[grants]\nhttp = [\"{a}\"]\n[settings]\nurl = \"http://{a}/hook\"\n",
            a = sink.addr()
        ),
    )
    .unwrap();
    let events = g.path("events.jsonl");
    std::fs::write(
        &events,
        "{\"kind\":\"put\",\"key\":\"a\",\"value\":\"1\",\"revision\":1}\n\
         {\"kind\":\"delete\",\"key\":\"a\",\"revision\":2}\n",
    )
    .unwrap();
    let wasm = plugin("webhook-notify");
    let args = |perform: bool| {
        let mut a = vec![
            "plugin".to_owned(),
            "test".to_owned(),
            wasm.display().to_string(),
            "--events".to_owned(),
            events.display().to_string(),
            "--config".to_owned(),
            g.config_path().display().to_string(),
            "--sidecar".to_owned(),
            sidecar.display().to_string(),
        ];
        if perform {
            a.push("--perform".to_owned());
        }
        a
    };
    let dry: Vec<String> = args(false);
    let (code, out, err) = g.cli(&dry.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let effects: Vec<&Value> = lines.iter().filter(|l| l["effect"] == "http").collect();
    assert_eq!(effects.len(), 2, "{out}");
    assert_eq!(effects[0]["performed"], false);
    assert_eq!(
        effects[0]["detail"]["url"],
        format!("http://{}/hook", sink.addr())
    );
    assert!(sink.received().is_empty(), "a dry run sent requests");
    let wet = args(true);
    let (code, out, err) = g.cli(&wet.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(sink.received().len(), 2, "{out}{err}");
}

#[test]
fn http_requests_in_flight_are_bounded_per_plugin() {
    // A server that never answers: the kernel accepts connections into the
    // backlog, nobody reads them, so every request waits for its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let mut g = Gateway::new();
    g.install(
        "probe",
        "capability-probe",
        &format!("retry_attempts = 1\n[grants]\nhttp = [\"{addr}\"]\n"),
    );
    g.start();
    for i in 0..20 {
        let v = serde_json::json!({"op": "http", "url": format!("http://{addr}/{i}")});
        std::fs::write(g.path(&format!("watched/req{i:02}")), v.to_string()).unwrap();
    }
    wait_for("all twenty calls", DEADLINE, || {
        (capability(&g, "probe", "http", "queued") + capability(&g, "probe", "http", "busy")
            >= 20.0)
            .then_some(())
    });
    // Sixteen wait on the silent server; the rest were refused at once.
    assert_eq!(capability(&g, "probe", "http", "queued"), 16.0);
    assert_eq!(capability(&g, "probe", "http", "busy"), 4.0);
    assert_eq!(capability(&g, "probe", "http", "delivered"), 0.0);
    wait_log(&g, "requests already in flight");
    drop(silent);
}

#[test]
fn manifest_subscriptions_apply_unless_the_sidecar_overrides_them() {
    // capability-probe's manifest subscribes to every key of `local`.
    let mut g = Gateway::new();
    g.install("probe", "capability-probe", "");
    g.install(
        "probe-narrow",
        "capability-probe",
        "[[subscribe]]\nsource = \"local\"\nprefix = \"narrow/\"\n",
    );
    g.start();
    assert_eq!(
        report(&g, "probe")["subscriptions"],
        serde_json::json!([{"source": "local", "prefix": ""}])
    );
    assert_eq!(
        report(&g, "probe-narrow")["subscriptions"],
        serde_json::json!([{"source": "local", "prefix": "narrow/"}])
    );
    // A gateway without that source rejects the plugin and says why.
    let other = Gateway::with_sources(
        "[[source]]\nname = \"elsewhere\"\nkind = \"file\"\npath = \"watched\"\n",
    );
    other.install("probe", "capability-probe", "");
    let (code, out, err) = other.cli(&["check", "--config", other.config_path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("manifest subscribes to source \"local\""),
        "{err}"
    );
}
