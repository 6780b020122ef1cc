//! Compile bombs: plugin files that are cheap to write and expensive to
//! compile. Each is generated here rather than built from a crate (no
//! compiler emits one on purpose) and dropped into the plugin directory
//! beside `event-log`. The gateway must refuse it with a message naming the
//! limit, count it, keep loading other plugins and delivering their events,
//! stay within its memory bound, let the operator remove it, and stop
//! within its grace.

use std::time::{Duration, Instant};

use wasm_encoder::{
    BlockType, CodeSection, Component, Function, FunctionSection, Module, ModuleSection,
    TypeSection, ValType,
};

use crate::adversarial::{N, PER_EVENT, rss_kb};
use crate::support::{GRACE, Gateway, wait_for, write_atomic};

const DEADLINE: Duration = Duration::from_secs(30);
/// A component whose one core module has `functions` functions, built by
/// `body`.
fn component(functions: u32, locals: u32, body: impl Fn(&mut Function)) -> Vec<u8> {
    let mut types = TypeSection::new();
    types.ty().function([], []);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    for _ in 0..functions {
        funcs.function(0);
        let mut f = Function::new([(locals, ValType::I32)]);
        body(&mut f);
        f.instructions().end();
        code.function(&f);
    }
    let mut module = Module::new();
    module.section(&types).section(&funcs).section(&code);
    let mut c = Component::new();
    c.section(&ModuleSection(&module));
    c.finish()
}

/// The bomb of the issue: 300,000 tiny functions in under 3 MB, which
/// took 33–50 s and 1.7 GiB to compile.
fn many_functions() -> Vec<u8> {
    component(300_000, 0, |f| {
        f.instructions().i32_const(0).drop();
    })
}

/// One function of `ops` operations that keep a thousand locals live
/// across branches: small enough for every pre-scan limit, and tens of
/// seconds to compile (register allocation grows faster than the code).
fn slow_function(ops: u32) -> Vec<u8> {
    const LOCALS: u32 = 1000;
    component(1, LOCALS, |f| {
        for i in 0..ops {
            if i % 64 == 0 {
                f.instructions().local_get(i % LOCALS).if_(BlockType::Empty);
            }
            f.instructions()
                .local_get(i % LOCALS)
                .local_get(i.wrapping_mul(7) % LOCALS)
                .i32_add()
                .local_set(i.wrapping_mul(13).wrapping_add(1) % LOCALS);
            if i % 64 == 63 || i + 1 == ops {
                f.instructions().end();
            }
        }
    })
}

/// Why `name` is rejected, if it is.
fn rejection(g: &Gateway, name: &str) -> Option<String> {
    g.json("/v1/plugins")["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .map(|r| r["error"].as_str().unwrap().to_owned())
}

/// Write `N` keys, each reaching `event-log` within [`PER_EVENT`], and
/// check they arrived in order. Returns the highest RSS seen meanwhile.
fn events_arrive_in_order(g: &mut Gateway, prefix: &str) -> u64 {
    let mut rss = 0;
    let before = g.events("event-log").len();
    for i in 0..N {
        write_atomic(
            &g.path(&format!("watched/{prefix}{i:02}")),
            i.to_string().as_bytes(),
        );
        g.wait_events("event-log", before + i + 1, PER_EVENT);
        rss = rss.max(rss_kb(g.pid()));
    }
    let keys: Vec<String> = g.events("event-log")[before..]
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..N).map(|i| format!("{prefix}{i:02}")).collect();
    assert_eq!(
        keys, expected,
        "event-log lost, repeated or reordered events"
    );
    rss
}

/// Remove the bomb's file: its rejection goes away and the gateway stops
/// on SIGTERM within its grace.
fn unload_and_stop(g: &mut Gateway) {
    std::fs::remove_file(g.path("plugins.d/bomb.wasm")).unwrap();
    wait_for("the bomb's rejection to go", DEADLINE, || {
        rejection(g, "bomb").is_none().then_some(())
    });
    assert_eq!(g.plugin_names(), vec!["event-log".to_owned()]);
    g.stop_within(GRACE);
}

#[test]
fn function_bomb_is_refused_before_it_compiles() {
    let mut g = Gateway::new();
    g.install_event_log("event-log");
    g.start();
    let rss_at_start = rss_kb(g.pid());
    let bomb = many_functions();
    let dropped = Instant::now();
    write_atomic(&g.path("plugins.d/bomb.wasm"), &bomb);
    let error = wait_for("the bomb's refusal", DEADLINE, || rejection(&g, "bomb"));
    let refused_in = dropped.elapsed();
    assert!(
        error.ends_with(
            "bomb.wasm: defines at least 300000 functions, more than [runtime] max_plugin_functions = 50000"
        ),
        "{error}"
    );
    // Refused by the pre-scan, not after a compile: the compile took 33 s
    // and more.
    assert!(
        refused_in < Duration::from_secs(5),
        "refused after {refused_in:?}"
    );
    assert_eq!(
        g.metric(
            "watchgate_plugin_compile_refused_total{plugin=\"bomb\",limit=\"max_plugin_functions\"}"
        ),
        1.0
    );
    assert_eq!(
        g.metric("watchgate_plugin_load_failures_total{plugin=\"bomb\"}"),
        1.0
    );
    assert_eq!(g.metric("watchgate_compiles_running"), 0.0);
    assert!(
        g.log().contains("max_plugin_functions = 50000"),
        "no log line names the limit"
    );

    let rss = events_arrive_in_order(&mut g, "k");
    assert!(
        rss <= rss_at_start + 64 * 1024,
        "gateway RSS grew from {rss_at_start} kB to {rss} kB beside a {} byte bomb",
        bomb.len()
    );
    eprintln!(
        "function bomb ({} bytes): refused in {refused_in:?}, RSS {rss_at_start} → {rss} kB",
        bomb.len()
    );
    unload_and_stop(&mut g);
}

#[test]
fn slow_compile_is_abandoned_while_a_plugin_beside_it_loads() {
    let mut g = Gateway::with_sources(
        "[runtime]\ncompile_timeout = \"2s\"\n\n\
         [[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\ndebounce_ms = 20\n",
    );
    g.start();
    let rss_at_start = rss_kb(g.pid());
    // About 480 KiB: under max_function_bytes, and far longer than
    // compile_timeout to compile.
    let bomb = slow_function(50_000);
    write_atomic(&g.path("plugins.d/bomb.wasm"), &bomb);
    wait_for("the bomb's compile to start", DEADLINE, || {
        (g.metric("watchgate_compiles_running") >= 1.0).then_some(())
    });

    // A healthy plugin dropped in while the bomb compiles loads without
    // waiting for it.
    let dropped = Instant::now();
    g.install_event_log("event-log");
    wait_for("event-log to load", DEADLINE, || {
        g.plugin_names()
            .contains(&"event-log".to_owned())
            .then_some(())
    });
    let loaded_in = dropped.elapsed();
    assert!(
        g.metric("watchgate_compiles_running") >= 1.0,
        "the bomb's compile ended before event-log loaded; it proves nothing"
    );
    assert!(
        loaded_in < Duration::from_secs(10),
        "event-log took {loaded_in:?} to load beside the bomb"
    );

    let error = wait_for("the bomb's refusal", DEADLINE, || rejection(&g, "bomb"));
    assert!(
        error.ends_with(
            "bomb.wasm: did not compile within [runtime] compile_timeout = 2s; the compile was abandoned"
        ),
        "{error}"
    );
    assert_eq!(
        g.metric(
            "watchgate_plugin_compile_refused_total{plugin=\"bomb\",limit=\"compile_timeout\"}"
        ),
        1.0
    );
    assert!(
        g.log().contains("compile_timeout = 2s"),
        "no log line names the limit"
    );

    // The abandoned compile runs on in the background; event-log's events
    // do not wait for it, and memory stays bounded.
    let rss = events_arrive_in_order(&mut g, "k");
    assert!(
        rss <= rss_at_start + 384 * 1024,
        "gateway RSS grew from {rss_at_start} kB to {rss} kB beside a slow compile"
    );
    assert!(
        g.metric("watchgate_compiles_running") >= 1.0,
        "the abandoned compile ended before the stop; the stop below proves less"
    );
    eprintln!(
        "slow compile ({} bytes): event-log loaded in {loaded_in:?}, RSS {rss_at_start} → {rss} kB",
        bomb.len()
    );
    unload_and_stop(&mut g);
}

#[test]
fn check_and_plugin_test_apply_the_same_limits() {
    let g = Gateway::new();
    let bomb = g.path("plugins.d/bomb.wasm");
    write_atomic(&bomb, &many_functions());
    let limit =
        "defines at least 300000 functions, more than [runtime] max_plugin_functions = 50000";
    let config = g.config_path();
    let (code, _, err) = g.cli(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("plugin bomb: error: ") && err.contains(limit),
        "{err}"
    );
    let events = g.path("events.jsonl");
    std::fs::write(&events, "").unwrap();
    let (code, _, err) = g.cli(&[
        "plugin",
        "test",
        bomb.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(limit), "{err}");
}
