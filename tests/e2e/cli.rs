//! The command line: `check`, `plugin test`, and start-up errors that exit
//! promptly with a clear message.

use std::time::{Duration, Instant};

use crate::support::{Gateway, plugin, watchgate, write_atomic};

#[test]
fn check_accepts_good_plugins_and_names_bad_ones() {
    let g = Gateway::new();
    g.install_event_log("event-log");
    let config = g.config_path();
    let config = config.to_str().unwrap();
    let (code, out, err) = watchgate(&["check", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("plugin event-log: ok"), "{out}");
    assert!(out.contains("grants: files="), "{out}");

    write_atomic(&g.path("plugins.d/broken.wasm"), b"\0asm\x01\0\0\0");
    std::fs::write(
        g.path("plugins.d/wrongsource.toml"),
        "[[subscribe]]\nsource = \"nope\"\n",
    )
    .unwrap();
    write_atomic(
        &g.path("plugins.d/wrongsource.wasm"),
        &std::fs::read(plugin("event-log")).unwrap(),
    );
    let (code, out, err) = watchgate(&["check", "--config", config]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("plugin broken: error") && err.contains("core wasm module"),
        "{err}"
    );
    assert!(
        err.contains("plugin wrongsource: error") && err.contains("no source named \"nope\""),
        "{err}"
    );
    assert!(out.contains("plugin event-log: ok"), "{out}");
}

#[test]
fn a_bad_config_exits_2_promptly_naming_file_key_and_line() {
    let g = Gateway::new();
    std::fs::write(
        g.config_path(),
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\nbogus = true\n",
    )
    .unwrap();
    let config = g.config_path();
    let started = Instant::now();
    let (code, _, err) = watchgate(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.contains("watchgate.toml:8:"), "{err}");
    assert!(err.contains("bogus"), "{err}");
    let (code, _, err) = watchgate(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn an_admin_port_in_use_is_an_error_at_start() {
    let g = Gateway::new();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let config = std::fs::read_to_string(g.config_path()).unwrap();
    std::fs::write(
        g.config_path(),
        config.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let started = Instant::now();
    let (code, _, err) = watchgate(&["run", "--config", g.config_path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot listen on admin address"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_missing_watched_directory_fails_the_run_with_its_path() {
    let g = Gateway::new();
    std::fs::remove_dir(g.path("watched")).unwrap();
    let (code, _, err) = watchgate(&["run", "--config", g.config_path().to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(g.path("watched").to_str().unwrap()), "{err}");
}

#[test]
fn plugin_test_replays_recorded_events() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        concat!(
            "{\"source\":\"s\",\"kind\":\"put\",\"key\":\"a\",\"value\":\"1\",\"revision\":1}\n",
            "{\"source\":\"s\",\"kind\":\"delete\",\"key\":\"a\",\"revision\":2}\n",
            "{\"source\":\"s\",\"kind\":\"put\",\"key\":\"b\",\"value_b64\":\"/wA=\",\"revision\":3}\n",
        ),
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let (code, out, err) = watchgate(&[
        "plugin",
        "test",
        plugin("event-log").to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
        "--files",
        out_dir.to_str().unwrap(),
        "--perform",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Each write is reported as an effect, then performed (--perform).
    let effects = lines.iter().filter(|l| l["effect"] == "files").count();
    assert_eq!(effects, 3, "{out}");
    let outcomes: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("outcome").is_some())
        .collect();
    assert_eq!(outcomes.len(), 3, "{out}");
    assert!(outcomes.iter().all(|o| o["outcome"] == "ok"), "{out}");
    // The plugin's output is the same format it was fed: a round trip.
    let written = std::fs::read_to_string(out_dir.join("events.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = written
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["value"], "1");
    assert_eq!(lines[1]["kind"], "delete");
    assert_eq!(lines[2]["value_b64"], "/wA=");

    // Faults are reported per event, with the exact trap, and exit 1.
    let (code, out, _) = watchgate(&[
        "plugin",
        "test",
        plugin("fault-panic").to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    let first: serde_json::Value = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("outcome").is_some())
        .unwrap();
    assert_eq!(first["outcome"], "trap");
    assert_eq!(first["trap"], "UnreachableCodeReached");

    // A bad input line is reported and the rest still run; exit 2.
    std::fs::write(
        &events,
        "{\"kind\":\"put\",\"key\":\"x\",\"value\":\"1\"}\nnot json\n",
    )
    .unwrap();
    let (code, out, err) = watchgate(&[
        "plugin",
        "test",
        plugin("fault-by-key").to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains(":2: not an event"), "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("\"outcome\"")).count(),
        1,
        "{out}"
    );
}
