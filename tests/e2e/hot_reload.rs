//! Plugins are added, replaced and removed while the gateway runs; a file
//! that is not a plugin is rejected while the gateway keeps serving.

use std::time::Duration;

use crate::support::{Gateway, kkv, plugin, wait_for, write_atomic};

const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn hot_add_replace_and_remove() {
    let mut g = Gateway::new();
    std::fs::write(g.path("watched/existing"), "was here first").unwrap();
    g.start();
    assert!(g.plugin_names().is_empty());

    // Add: a plugin dropped in later starts from the current state.
    g.install_event_log("probe");
    let events = g.wait_events("probe", 1, DEADLINE);
    assert_eq!(
        kkv(&events),
        vec![(
            "put".into(),
            "existing".into(),
            Some("was here first".into())
        )]
    );
    std::fs::write(g.path("watched/one"), "1").unwrap();
    g.wait_events("probe", 2, DEADLINE);
    let v1 = g.json("/v1/plugins")["plugins"][0].clone();
    assert_eq!(v1["name"], "probe");

    // Replace: same name, different code (a template renderer). The queue
    // and state carry over; new events reach only the new code.
    g.install(
        "probe",
        "template-render",
        "[grants]\nfiles = \"../out/probe\"\n",
    );
    wait_for("the replacement", DEADLINE, || {
        let p = g.json("/v1/plugins")["plugins"][0].clone();
        (p["version"] != v1["version"] && p["digest"] != v1["digest"]).then_some(())
    });
    let logged_before = g.events("probe").len();
    write_atomic(
        &g.path("watched/templates/greeting.tmpl"),
        b"hello {{ key(\"one\") }}",
    );
    std::fs::write(g.path("watched/one"), "world").unwrap();
    let rendered = wait_for("the template to render", DEADLINE, || {
        std::fs::read_to_string(g.path("out/probe/greeting"))
            .ok()
            .filter(|s| s == "hello world")
    });
    assert_eq!(rendered, "hello world");
    // The old code (event-log) no longer sees events.
    let after = g.events("probe");
    assert_eq!(
        after.len(),
        logged_before,
        "event-log kept running after the replace: {after:#?}"
    );
    assert!(after.iter().all(|e| e["value"] != "world"));

    // Remove: the plugin goes away, the gateway keeps serving.
    std::fs::remove_file(g.path("plugins.d/probe.wasm")).unwrap();
    wait_for("the unload", DEADLINE, || {
        g.plugin_names().is_empty().then_some(())
    });
    std::fs::write(g.path("watched/one"), "nobody listens").unwrap();
    g.install_event_log("witness");
    let witnessed = g.wait_events("witness", 3, DEADLINE);
    assert!(kkv(&witnessed).contains(&("put".into(), "one".into(), Some("nobody listens".into()))));
    assert_eq!(
        std::fs::read_to_string(g.path("out/probe/greeting")).unwrap(),
        "hello world",
        "a removed plugin must not run"
    );
    assert_eq!(g.plugin_names(), vec!["witness".to_owned()]);
    g.assert_running();
}

#[test]
fn malformed_wasm_is_rejected_while_the_gateway_keeps_serving() {
    let mut g = Gateway::new();
    g.install_event_log("event-log");
    g.start();

    write_atomic(
        &g.path("plugins.d/garbage.wasm"),
        b"this is not wasm at all",
    );
    // A core module (wasm, but not a component of this world).
    write_atomic(&g.path("plugins.d/core.wasm"), b"\0asm\x01\0\0\0");
    // A valid component of the wrong shape would also be refused; a
    // truncated copy of a real plugin stands in for a half-copied file.
    let real = std::fs::read(plugin("event-log")).unwrap();
    write_atomic(&g.path("plugins.d/truncated.wasm"), &real[..real.len() / 2]);
    // A broken sidecar rejects its plugin too.
    std::fs::write(g.path("plugins.d/badsidecar.toml"), "[limits]\nfule = 3\n").unwrap();
    write_atomic(&g.path("plugins.d/badsidecar.wasm"), &real);

    wait_for("four rejections", DEADLINE, || {
        let rejected = g.json("/v1/plugins")["rejected"].as_array().unwrap().len();
        (rejected == 4).then_some(())
    });
    for name in ["garbage", "core", "truncated", "badsidecar"] {
        assert_eq!(
            g.metric(&format!(
                "watchgate_plugin_load_failures_total{{plugin=\"{name}\"}}"
            )),
            1.0,
            "{name}"
        );
    }
    let body = g.json("/v1/plugins");
    let reasons: Vec<String> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}: {}", r["name"], r["error"]))
        .collect();
    let joined = reasons.join("\n");
    assert!(joined.contains("not a WebAssembly file"), "{joined}");
    assert!(joined.contains("core wasm module"), "{joined}");
    assert!(joined.contains("badsidecar.toml:2"), "{joined}");
    assert!(joined.contains("fule"), "{joined}");
    // One log line per rejection, naming the plugin.
    let log = g.log();
    assert_eq!(log.matches("Plugin rejected").count(), 4, "{log}");

    // Still ready, still serving.
    let (code, _) = g.get("/readyz").unwrap();
    assert_eq!(code, 200);
    std::fs::write(g.path("watched/after"), "delivered").unwrap();
    let events = g.wait_events("event-log", 1, DEADLINE);
    assert_eq!(events[0]["key"], "after");
    assert_eq!(g.plugin_names(), vec!["event-log".to_owned()]);

    // Replacing a running plugin with garbage keeps the old version serving.
    write_atomic(&g.path("plugins.d/event-log.wasm"), b"garbage");
    wait_for("the rejection", DEADLINE, || {
        (g.metric("watchgate_plugin_load_failures_total{plugin=\"event-log\"}") == 1.0)
            .then_some(())
    });
    std::fs::write(g.path("watched/after2"), "still delivered").unwrap();
    let events = g.wait_events("event-log", 2, DEADLINE);
    assert_eq!(events[1]["key"], "after2");
}
