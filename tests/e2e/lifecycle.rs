//! Start-up, readiness, reload and shutdown of the real binary: failures
//! exit promptly with a clear message, readiness tells the truth, reloads
//! restart only what changed, and shutdown ends within its grace period.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::etcd_harness::Etcd;
use crate::fault_proxy::{FaultProxy, Mode};
use crate::support::{Gateway, free_port, wait_for, write_atomic};

const DEADLINE: Duration = Duration::from_secs(60);

/// Run `watchgate run` to completion; (exit code, stderr, elapsed).
fn run_to_exit(g: &Gateway) -> (i32, String, Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_watchgate"))
        .args(["run", "--config"])
        .arg(g.config_path())
        .output()
        .expect("run watchgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

fn signal(g: &Gateway, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &g.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn unreachable_etcd(extra: &str) -> String {
    format!(
        "[[source]]\nname = \"main\"\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:{}\"]\n\
         dial_timeout_s = 1\nreconnect_max_ms = 300\n{extra}",
        free_port()
    )
}

#[test]
fn configuration_and_plugin_errors_exit_2_within_5_seconds_naming_the_problem() {
    // Bad TOML.
    let g = Gateway::new();
    std::fs::write(g.config_path(), "[admin\nlisten = 1\n").unwrap();
    let (code, err, took) = run_to_exit(&g);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("watchgate.toml:1:"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A plugin directory that does not exist.
    let g = Gateway::new();
    std::fs::remove_dir(g.path("plugins.d")).unwrap();
    let (code, err, took) = run_to_exit(&g);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("plugin directory") && err.contains("does not exist"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A plugin that does not compile.
    let g = Gateway::new();
    g.install_event_log("event-log");
    write_atomic(
        &g.path("plugins.d/broken.wasm"),
        b"\0asm\x0d\0\x01\0garbage",
    );
    let (code, err, took) = run_to_exit(&g);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rejected at start") && err.contains("broken"),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn an_unreachable_etcd_with_startup_fail_exits_1_with_the_reason() {
    let g = Gateway::with_sources(&unreachable_etcd("startup_timeout = \"2s\"\n"));
    let (code, err, took) = run_to_exit(&g);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not connect within 2s"), "{err}");
    assert!(
        err.contains("127.0.0.1"),
        "the reason names the endpoint: {err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// An etcd source behind a proxy that delays every chunk, listing small
/// pages (a message limit that holds about three of these keys keeps them
/// small): its initial sync takes several start-up timeouts in all, with
/// each page well within one.
fn slow_etcd(etcd: &Etcd) -> (FaultProxy, String) {
    const KEYS: usize = 75;
    let mut store = crate::etcd_source::Store::connect(&[etcd.client_url()]);
    for i in 0..KEYS {
        store.put(&format!("/wg/k{i:02}"), "v".repeat(300)).unwrap();
    }
    let proxy = FaultProxy::start(etcd.client_addr());
    proxy.set_mode(Mode::Delay(Duration::from_millis(150)));
    let config = crate::etcd_source::etcd_source(
        &[proxy.url()],
        "page_size = 2\nmax_message_bytes = 4096\nstartup_timeout = \"1500ms\"\n",
    );
    (proxy, config)
}

/// `/v1/sources`' entry for the source "main" while it is still syncing,
/// once it has received at least `pages` pages.
fn sync_progress(g: &mut Gateway, pages: u64) -> Value {
    wait_for("the sync's progress to be reported", DEADLINE, || {
        g.assert_running();
        let v = g.json("/v1/sources");
        let main = v["sources"].as_array()?.first()?.clone();
        (main["synced"] == false && main["sync"]["pages"].as_u64()? >= pages).then_some(main)
    })
}

#[test]
fn a_slow_initial_sync_that_keeps_progressing_outlives_the_startup_timeout() {
    let etcd = Etcd::start();
    let (_proxy, config) = slow_etcd(&etcd);
    let mut g = Gateway::with_sources(&config);
    g.install_event_log("event-log");
    g.spawn();
    let main = sync_progress(&mut g, 3);
    assert!(main["sync"]["keys_listed"].as_u64().unwrap() >= 6, "{main}");
    let ready = g.json("/readyz");
    assert_eq!(ready["sources"][0]["state"], "syncing", "{ready}");
    assert!(
        ready["sources"][0]["sync"]["pages"].as_u64().unwrap() >= 3,
        "{ready}"
    );
    // 25 pages at two delayed hops each: far longer than 1.5 s in all,
    // and longer than the 5 s between progress lines.
    g.wait_events("event-log", 75, DEADLINE);
    let main = wait_for("the source to be synced", DEADLINE, || {
        g.assert_running();
        let v = g.json("/v1/sources");
        let main = v["sources"].as_array()?.first()?.clone();
        (main["synced"] == true).then_some(main)
    });
    assert!(main.get("sync").is_none(), "{main}");
    assert!(g.log().contains("Initial sync in progress."));
    g.assert_running();
}

#[test]
fn an_initial_sync_that_stalls_for_the_startup_timeout_exits_1_with_its_progress() {
    let etcd = Etcd::start();
    let (proxy, config) = slow_etcd(&etcd);
    let mut g = Gateway::with_sources(&config);
    g.spawn();
    sync_progress(&mut g, 2);
    proxy.set_mode(Mode::Blackhole);
    let status = g.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", g.log());
    let log = g.log();
    assert!(
        log.contains("made no progress in its initial sync for 1.5s"),
        "{log}"
    );
    assert!(log.contains("keys in"), "{log}");
}

#[test]
fn degraded_start_keeps_retrying_and_sigterm_exits_0_within_grace_despite_a_spin() {
    let sources = format!(
        "{}\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\n",
        unreachable_etcd("startup = \"degraded\"\nstartup_timeout = \"1s\"\n")
    );
    let mut g = Gateway::with_sources(&format!("[gateway]\nshutdown_grace = \"5s\"\n\n{sources}"));
    g.install(
        "fault-spin",
        "fault-spin",
        "[[subscribe]]\nsource = \"local\"\n[limits]\nfuel = 1_000_000_000_000_000\ntimeout_ms = 2000\n",
    );
    for i in 0..5 {
        std::fs::write(g.path(&format!("watched/k{i}")), "x").unwrap();
    }
    g.spawn();
    // Past its start-up timeout, still running, retrying, honestly not ready.
    let body = wait_for("several reconnects", DEADLINE, || {
        g.assert_running();
        let (code, body) = g.get("/readyz")?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let main = v["sources"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "main")?
            .clone();
        (code == 503
            && g.metric("watchgate_source_reconnects_total{source=\"main\"}") >= 3.0
            && main["state"] == "syncing")
            .then_some(main)
    });
    assert!(
        body["last_error"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );
    // fault-spin is busy with a 2 s call and a backlog.
    wait_for("fault-spin to be busy", DEADLINE, || {
        (g.metric("watchgate_plugin_queue_depth{plugin=\"fault-spin\"}") >= 1.0).then_some(())
    });
    let stopping = Instant::now();
    let status = g.stop();
    assert_eq!(status.code(), Some(0), "log:\n{}", g.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(5 + 2),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

#[test]
fn readiness_reports_a_degraded_source_and_a_reload_can_make_it_unready() {
    let etcd = Etcd::start();
    let proxy = FaultProxy::start(etcd.client_addr());
    let sources = |unready: bool| {
        format!(
            "[gateway]\ndegraded_is_unready = {unready}\n\n[[source]]\nname = \"main\"\nkind = \"etcd\"\n\
             endpoints = [\"{}\"]\ndial_timeout_s = 1\nreconnect_max_ms = 300\n",
            proxy.url()
        )
    };
    let mut g = Gateway::with_sources(&sources(false));
    g.start();
    let state = |g: &Gateway| -> (u16, String) {
        let (code, body) = g.get("/readyz").unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        (code, v["sources"][0]["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state(&g), (200, "ready".into()));

    proxy.set_mode(Mode::Refuse);
    proxy.reset_all();
    wait_for("the source to degrade", DEADLINE, || {
        (state(&g) == (200, "degraded".into())).then_some(())
    });

    // Reload with degraded_is_unready: now the same state is a 503.
    let config = std::fs::read_to_string(g.config_path()).unwrap();
    std::fs::write(
        g.config_path(),
        config.replace("degraded_is_unready = false", "degraded_is_unready = true"),
    )
    .unwrap();
    signal(&g, "-HUP");
    wait_for("the reload to apply", DEADLINE, || {
        g.assert_running();
        (state(&g) == (503, "degraded".into())).then_some(())
    });
    proxy.set_mode(Mode::Pass);
    wait_for("the source to recover", DEADLINE, || {
        (state(&g) == (200, "ready".into())).then_some(())
    });
    // The reload restarted nothing: only [gateway] changed.
    assert_eq!(
        g.json("/v1/plugins")["plugins"].as_array().unwrap().len(),
        0
    );
    assert!(g.log().contains("Configuration reloaded."));
}

fn post_reload(g: &Gateway, token: Option<&str>) -> (u16, Value) {
    let mut req = ureq::post(&format!("http://127.0.0.1:{}/v1/reload", g.port))
        .timeout(Duration::from_secs(30));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let (code, body) = match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("POST /v1/reload: {e}"),
    };
    (code, serde_json::from_str(&body).unwrap())
}

/// Write `body`'s sources under an admin section with the reload token.
fn write_config(g: &Gateway, body: &str) {
    std::fs::write(
        g.config_path(),
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n\n[plugins]\ndir = \"plugins.d\"\n\
             # Ready means every plugin is running: tests send events at once.\n\
             compile_ready_wait = \"10m\"\n\n{body}"
        ),
    )
    .unwrap()
}

fn file_source(name: &str, debounce: u32) -> String {
    format!(
        "[[source]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{name}\"\ndebounce_ms = {debounce}\n"
    )
}

#[test]
fn post_reload_needs_the_token_and_restarts_only_what_changed() {
    let mut g = Gateway::with_sources(&format!("{}{}", file_source("a", 20), file_source("b", 20)));
    for d in ["a", "b", "c"] {
        std::fs::create_dir_all(g.path(d)).unwrap();
        std::fs::write(g.path(&format!("{d}/key")), d).unwrap();
    }
    g.install_event_log("event-log");
    write_config(
        &g,
        &format!("{}{}", file_source("a", 20), file_source("b", 20)),
    );
    g.start();
    g.wait_events("event-log", 2, DEADLINE);

    // The token guards the endpoint.
    assert_eq!(post_reload(&g, None).0, 401);
    assert_eq!(post_reload(&g, Some("wrong")).0, 401);
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["sources_added"], serde_json::json!([]));
    assert_eq!(report["sources_restarted"], serde_json::json!([]));
    let version = g.json("/v1/plugins")["plugins"][0]["version"].clone();

    // b changes, c is new, a stays.
    write_config(
        &g,
        &format!(
            "{}{}{}",
            file_source("a", 20),
            file_source("b", 30),
            file_source("c", 20)
        ),
    );
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["sources_added"], serde_json::json!(["c"]));
    assert_eq!(report["sources_restarted"], serde_json::json!(["b"]));
    assert_eq!(report["sources_removed"], serde_json::json!([]));
    let events = g.wait_events("event-log", 3, DEADLINE);
    // c's key arrived; b's unchanged key was not delivered again.
    let keys: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().into(),
                e["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(keys.iter().filter(|k| k.0 == "b").count(), 1, "{keys:?}");
    assert!(keys.contains(&("c".into(), "key".into())), "{keys:?}");
    // event-log's settings did not change: same version.
    assert_eq!(g.json("/v1/plugins")["plugins"][0]["version"], version);
    // A change made while b restarted is still seen.
    std::fs::write(g.path("b/key"), "b2").unwrap();
    let events = g.wait_events("event-log", 4, DEADLINE);
    assert_eq!(events[3]["value"], "b2");

    // New default limits reach the plugin as a new version.
    write_config(
        &g,
        &format!(
            "[runtime]\ndefaults = {{ fuel = 7_000_000, timeout_ms = 500, memory_mb = 32 }}\n\n{}{}{}",
            file_source("a", 20),
            file_source("b", 30),
            file_source("c", 20)
        ),
    );
    assert_eq!(post_reload(&g, Some("s3cret")).0, 200);
    let plugin = g.json("/v1/plugins")["plugins"][0].clone();
    assert_ne!(plugin["version"], version);
    assert_eq!(plugin["limits"]["fuel"], 7_000_000);

    // A new source that cannot start does not take the gateway down: it
    // retries and reports its error.
    write_config(
        &g,
        &format!(
            "{}{}{}{}",
            file_source("a", 20),
            file_source("b", 30),
            file_source("c", 20),
            file_source("missing", 20)
        ),
    );
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["sources_added"], serde_json::json!(["missing"]));
    wait_for("the new source's error to be reported", DEADLINE, || {
        g.assert_running();
        let v = g.json("/v1/sources");
        let missing = v["sources"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "missing")?
            .clone();
        missing["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist"))
            .then_some(())
    });

    // An invalid config is refused with its reason; the running one stays.
    std::fs::write(g.config_path(), "[admin]\ntoken = \"s3cret\"\nbogus = 1\n").unwrap();
    let (code, body) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("bogus"), "{body}");
    let sources: Vec<String> = g.json("/v1/sources")["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sources, vec!["a", "b", "c", "missing"]);
    std::fs::write(g.path("a/key"), "a2").unwrap();
    let events = g.wait_events("event-log", 5, DEADLINE);
    assert_eq!(events[4]["value"], "a2");
    g.assert_running();
}

#[test]
fn a_source_removed_by_a_reload_deletes_its_keys_in_its_plugins() {
    let sources = format!("{}{}", file_source("a", 20), file_source("b", 20));
    let mut g = Gateway::with_sources(&sources);
    for d in ["a", "b"] {
        std::fs::create_dir_all(g.path(d)).unwrap();
    }
    std::fs::write(g.path("a/one"), "1").unwrap();
    std::fs::write(g.path("a/two"), "2").unwrap();
    std::fs::write(g.path("b/key"), "b").unwrap();
    g.install_event_log("event-log");
    write_config(&g, &sources);
    g.start();
    g.wait_events("event-log", 3, DEADLINE);

    // a goes: its two keys are deleted in the plugin, flagged resync; b's
    // key is untouched.
    write_config(&g, &file_source("b", 20));
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["sources_removed"], serde_json::json!(["a"]));
    let events = g.wait_events("event-log", 5, DEADLINE);
    let deletes: Vec<&Value> = events[3..].iter().collect();
    for (e, key) in deletes.iter().zip(["one", "two"]) {
        assert_eq!(e["source"], "a", "{events:#?}");
        assert_eq!(e["key"], key, "{events:#?}");
        assert_eq!(e["kind"], "delete", "{events:#?}");
        assert_eq!(e["resync"], true, "{events:#?}");
    }

    // a comes back: its keys are delivered again, as a first sync (the
    // index forgot them), even one that did not change meanwhile.
    std::fs::write(g.path("a/two"), "2b").unwrap();
    write_config(&g, &sources);
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["sources_added"], serde_json::json!(["a"]));
    let events = g.wait_events("event-log", 7, DEADLINE);
    let mut back: Vec<(String, String, String)> = events[5..]
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().into(),
                e["kind"].as_str().unwrap().into(),
                e["value"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    back.sort();
    assert_eq!(
        back,
        vec![
            ("one".into(), "put".into(), "1".into()),
            ("two".into(), "put".into(), "2b".into())
        ],
        "{events:#?}"
    );
    assert!(events.iter().filter(|e| e["source"] == "b").count() == 1);

    // What the plugin was given is what the index committed: a restart
    // delivers nothing again.
    assert!(g.stop().success());
    g.start();
    std::fs::write(g.path("b/key"), "b2").unwrap();
    let events = g.wait_events("event-log", 8, DEADLINE);
    assert_eq!(events.len(), 8, "{events:#?}");
    assert_eq!(events[7]["value"], "b2");
    g.assert_running();
}

#[test]
fn an_etcd_source_removed_and_added_again_relists_rather_than_resumes() {
    let etcd = Etcd::start();
    let mut store = crate::etcd_source::Store::connect(&[etcd.client_url()]);
    store.put("/wg/kept", "1").unwrap();
    store.put("/wg/changed", "1").unwrap();
    let etcd_config = crate::etcd_source::etcd_source(&[etcd.client_url()], "");
    let mut g = Gateway::with_sources(&etcd_config);
    g.install_event_log("event-log");
    write_config(&g, &etcd_config);
    g.start();
    g.wait_events("event-log", 2, DEADLINE);

    write_config(&g, "");
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    let events = g.wait_events("event-log", 4, DEADLINE);
    assert!(
        events[2..]
            .iter()
            .all(|e| e["kind"] == "delete" && e["resync"] == true),
        "{events:#?}"
    );

    // Added again: a resumed watch would give only the change made
    // meanwhile; the relist gives both keys.
    store.put("/wg/changed", "2").unwrap();
    write_config(&g, &etcd_config);
    let (code, report) = post_reload(&g, Some("s3cret"));
    assert_eq!(code, 200, "{report}");
    let events = g.wait_events("event-log", 6, DEADLINE);
    let mut back: Vec<(String, String)> = events[4..]
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    back.sort();
    assert_eq!(
        back,
        vec![
            ("/wg/changed".into(), "2".into()),
            ("/wg/kept".into(), "1".into())
        ],
        "{events:#?}"
    );
}

#[test]
fn reload_is_disabled_without_a_token() {
    let mut g = Gateway::new();
    g.start();
    let (code, body) = post_reload(&g, Some("anything"));
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("WATCHGATE_ADMIN_TOKEN")
    );
    let (code, _) = g.get("/v1/reload").unwrap();
    assert_eq!(code, 405);
}

#[test]
fn a_thousand_identical_failures_log_a_bounded_number_of_lines() {
    let mut g = Gateway::new();
    for i in 0..1000 {
        std::fs::write(g.path(&format!("watched/k{i:04}")), "x").unwrap();
    }
    // Every failure counts here: no quarantine.
    g.install(
        "fault-panic",
        "fault-panic",
        "retry_attempts = 1\nquarantine_after = 0\n",
    );
    g.start();
    wait_for("1000 trapped calls", DEADLINE, || {
        g.assert_running();
        (g.metric("watchgate_plugin_invocations_total{plugin=\"fault-panic\",outcome=\"trap\"}")
            == 1000.0)
            .then_some(())
    });
    let log = g.log();
    let lines = log.matches("Plugin call failed").count();
    assert!(
        (1..=30).contains(&lines),
        "{lines} failure lines for 1000 identical failures"
    );
    let held = g.metric("watchgate_log_suppressed_total{origin=\"plugin/fault-panic\"}");
    assert_eq!(held as usize + lines, 1000);
}
