//! Large plugins beside small ones: a Python plugin's compile of tens of
//! seconds must not hold up readiness or the other plugins; once
//! compiled, the same code starts at once under another name and after a
//! restart; what an instance needs is reported and checked against the
//! plugin's limits at load.

use std::time::{Duration, Instant};

use crate::support::{Gateway, wait_for, write_atomic};

/// An uncached compile of the Python SDK's component on a busy two-core
/// machine, with room to spare.
const PYTHON_COMPILE: Duration = Duration::from_secs(600);

/// Install an event-log plugin as `name` writing to `out/NAME`: the Rust
/// one as the other e2e tests build it, another language's from
/// `dist/plugins`.
fn install_logger(g: &Gateway, name: &str, example: &str) {
    if example == "event-log" {
        g.install_event_log(name);
    } else {
        crate::support_lang::install_event_log(g, name, example);
    }
}

fn compiling(g: &Gateway) -> Vec<String> {
    g.json("/readyz")["plugins"]["compiling"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_slow_compile_holds_up_neither_readiness_nor_other_plugins_and_is_paid_once() {
    let mut g = Gateway::new();
    let config = std::fs::read_to_string(g.config_path()).unwrap();
    std::fs::write(
        g.config_path(),
        config.replace(
            "compile_ready_wait = \"10m\"",
            "compile_ready_wait = \"1s\"",
        ),
    )
    .unwrap();
    install_logger(&g, "rust-log", "event-log");
    install_logger(&g, "py-log", "py-event-log");
    let started = Instant::now();
    g.start();
    // A copy of event-log whose memory cap is below the memory its
    // instances start with (installed after start: a plugin rejected at
    // start is a start-up error).
    g.install("tiny", "event-log", "[limits]\nmemory_mb = 1\n");
    // Ready while the Python plugin still compiles; the Rust one runs and
    // delivers meanwhile.
    assert!(
        compiling(&g).contains(&"py-log".to_owned()),
        "{}",
        g.json("/readyz")
    );
    wait_for("rust-log to run", Duration::from_secs(60), || {
        g.plugin_report("rust-log")
    });
    write_atomic(&g.path("watched/app.txt"), b"one");
    let delivered = g.wait_events("rust-log", 1, Duration::from_secs(30));
    assert_eq!(delivered[0]["key"], "app.txt");
    assert_eq!(
        compiling(&g),
        ["py-log"],
        "the event was delivered while the Python plugin compiled"
    );

    let tiny = wait_for("tiny to be refused", Duration::from_secs(30), || {
        g.json("/readyz")["plugins"]["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "tiny")
            .cloned()
    });
    let error = tiny["error"].as_str().unwrap();
    assert!(
        error.contains("start with 1.1 MiB of linear memory, more than its memory_mb = 1"),
        "{error}"
    );

    // The Python plugin starts when its compile ends and gets what it
    // missed (the snapshot).
    wait_for("py-log to run", PYTHON_COMPILE, || {
        g.assert_running();
        g.plugin_report("py-log")
    });
    let first_compile = started.elapsed();
    let py = g.wait_events("py-log", 1, Duration::from_secs(30));
    assert_eq!(py[0]["key"], "app.txt");
    assert!(compiling(&g).is_empty());

    // What each is built from and takes, as the operator sees it.
    let rust = g.plugin_report("rust-log").unwrap();
    let python = g.plugin_report("py-log").unwrap();
    assert_eq!(rust["language"], "Rust");
    assert_eq!(python["language"], "Python");
    assert!(python["core_instances"].as_u64().unwrap() > 10, "{python}");
    assert_eq!(rust["core_instances"], 3);
    assert!(
        python["initial_memory_bytes"].as_u64().unwrap() > 8 << 20,
        "{python}"
    );
    assert!(python["size"].as_u64().unwrap() > 10 << 20);
    assert!(
        python["toolchain"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t.as_str().unwrap().starts_with("libpython3")),
        "{python}"
    );

    // The same code under another name does not compile again.
    let copied = Instant::now();
    install_logger(&g, "py-copy", "py-event-log");
    wait_for("py-copy to run", Duration::from_secs(30), || {
        g.plugin_report("py-copy")
    });
    let copy_start = copied.elapsed();

    // A restart takes compiled code from the cache (without `tiny`, whose
    // refusal would be a start-up error).
    for file in ["tiny.wasm", "tiny.toml"] {
        std::fs::remove_file(g.path(&format!("plugins.d/{file}"))).unwrap();
    }
    g.stop_within(crate::support::GRACE);
    let restarted = Instant::now();
    g.spawn();
    wait_for("both Python plugins to run", PYTHON_COMPILE, || {
        g.assert_running();
        let names = g.plugin_names();
        (names.contains(&"py-log".to_owned()) && names.contains(&"py-copy".to_owned()))
            .then_some(())
    });
    let restart = restarted.elapsed();
    eprintln!(
        "first compile and start {first_compile:?}, copy {copy_start:?}, restart {restart:?}"
    );
    assert!(
        copy_start * 5 < first_compile,
        "a copy of compiled code took {copy_start:?}, the compile {first_compile:?}"
    );
    assert!(
        restart * 3 < first_compile,
        "a restart with the compile cache took {restart:?}, the compile {first_compile:?}"
    );
    g.stop_within(crate::support::GRACE);
}
