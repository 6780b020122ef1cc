//! Harness for the Python, JavaScript and Go plugins in a real gateway
//! ([`crate::languages`]): the components `scripts/build-plugins` wrote to
//! `dist/plugins/`, a gateway config with room for their slow compiles,
//! and one compile cache shared by every test of this process tree.
//!
//! A componentize-py or componentize-js component takes 20-60 s of CPU to
//! compile on a 2-core machine. Each test's gateway keeps its own state
//! directory, but its `compiled/` is a link to one directory under cargo's
//! `CARGO_TARGET_TMPDIR`, and a test holds a per-language file lock from
//! starting its gateway until its plugins run. So the first test of a
//! language compiles each component once, and the others (in their own
//! processes under nextest) load it from the cache. The cache is keyed by
//! the component's bytes and the engine's settings, so sharing it changes
//! what a test sees only in how long the load takes: every test still
//! passes alone.

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::support::{Gateway, wait_for, workspace, write_atomic};

/// `[runtime] compile_timeout` of the tests' gateways: an uncached Python
/// or JavaScript compile on a busy 2-core machine passes the default 60 s.
pub const COMPILE_TIMEOUT: &str = "300s";

/// How long a gateway may take to load its plugins (two uncached compiles
/// in a row fit).
pub const LOAD_DEADLINE: Duration = Duration::from_secs(330);

/// How long an event may take to be handled, retried or dead-lettered once
/// the plugins run.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A file source named `local` over `watched/`.
pub const FILE_SOURCE: &str =
    "[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\ndebounce_ms = 20\n";

/// A plugin language other than Rust, with its components in
/// `dist/plugins/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Python,
    JavaScript,
    Go,
}

impl Lang {
    /// The prefix of the language's plugin directories (`py-event-log`).
    pub fn prefix(self) -> &'static str {
        match self {
            Lang::Python => "py",
            Lang::JavaScript => "js",
            Lang::Go => "go",
        }
    }

    /// The language's `event-log`.
    pub fn event_log(self) -> String {
        format!("{}-event-log", self.prefix())
    }

    /// The language's `fault-by-key` fixture.
    pub fn fault_by_key(self) -> String {
        format!("{}-fault-by-key", self.prefix())
    }

    /// What the fixture's error for key `error` (with value `v1`) says.
    pub fn error_text(self) -> &'static str {
        match self {
            Lang::Python => "ValueError: asked to fail by key 'error'",
            Lang::JavaScript => "boom",
            Lang::Go => "go-fault-by-key: error requested: v1",
        }
    }
}

/// The component `scripts/build-plugins` built as `dist/plugins/NAME.wasm`.
/// A missing file fails the test: these tests are never skipped.
pub fn dist_plugin(name: &str) -> PathBuf {
    let path = workspace()
        .join("dist")
        .join("plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/build-plugins first (it builds the Rust, Python, \
         JavaScript and Go plugins into dist/plugins; scripts/test runs it before the tests)",
        path.display()
    );
    path
}

/// The compile cache every test's gateway shares.
fn shared_cache() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("languages-compile-cache");
    std::fs::create_dir_all(&dir).expect("create the shared compile cache");
    dir
}

/// Plugin log lines a second: the default, 50, would drop the lines a
/// test waits for after a Go runtime's fatal error, whose goroutine dump on
/// stderr is about 60 lines.
pub const LOG_LINES_PER_SECOND: u32 = 2_000;

/// A gateway directory whose config has `[runtime] compile_timeout =
/// COMPILE_TIMEOUT` and `log_lines_per_second = LOG_LINES_PER_SECOND`, and
/// `tables` (sources, a `[cluster]`), with the shared compile cache as its
/// state directory's `compiled/`.
pub fn lang_gateway(tables: &str) -> Gateway {
    let g = Gateway::with_sources(&format!(
        "[runtime]\ncompile_timeout = \"{COMPILE_TIMEOUT}\"\n\
         log_lines_per_second = {LOG_LINES_PER_SECOND}\n\n{tables}"
    ));
    // The default state directory is data/ beside the config.
    std::fs::create_dir_all(g.path("data")).expect("create data/");
    std::os::unix::fs::symlink(shared_cache(), g.path("data/compiled"))
        .expect("link data/compiled to the shared compile cache");
    g
}

/// Install `dist/plugins/FILE.wasm` as plugin `name`, with a sidecar.
pub fn install_dist(g: &Gateway, name: &str, file: &str, sidecar: &str) {
    let bytes = std::fs::read(dist_plugin(file)).expect("read the built plugin");
    if !sidecar.is_empty() {
        write_atomic(
            &g.path(&format!("plugins.d/{name}.toml")),
            sidecar.as_bytes(),
        );
    }
    write_atomic(&g.path(&format!("plugins.d/{name}.wasm")), &bytes);
}

/// Install an `event-log` build (`file`) as `name`, appending to
/// `out/NAME/events.jsonl`.
pub fn install_event_log(g: &Gateway, name: &str, file: &str) {
    install_dist(
        g,
        name,
        file,
        &format!("[grants]\nfiles = \"../out/{name}\"\n"),
    );
}

/// Start the gateway and wait until it is ready and runs every plugin in
/// `plugins`, holding `lang`'s compile lock meanwhile. A plugin the gateway
/// rejects (a compile past its timeout) fails the test with the reason.
pub fn start_loaded(g: &mut Gateway, lang: Lang, plugins: &[&str]) {
    let lock = File::create(shared_cache().join(format!(".lock-{}", lang.prefix())))
        .expect("create the compile lock file");
    lock.lock().expect("take the compile lock");
    g.spawn();
    wait_for(
        &format!("the gateway to be ready and run {plugins:?}"),
        LOAD_DEADLINE,
        || {
            g.assert_running();
            let (code, body) = g.get("/readyz")?;
            let ready: Value = serde_json::from_str(&body).ok()?;
            for r in ready["plugins"]["rejected"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert!(
                    !plugins.iter().any(|p| r["name"] == *p),
                    "the gateway rejected a plugin: {r}"
                );
            }
            let running = ready["plugins"]["running"].as_array()?;
            let all = plugins
                .iter()
                .all(|p| running.iter().any(|r| r.as_str() == Some(p)));
            (code == 200 && all).then_some(())
        },
    );
    drop(lock);
}

/// `watchgate_plugin_invocations_total` of `plugin` with `outcome`.
pub fn invocations(g: &Gateway, plugin: &str, outcome: &str) -> f64 {
    g.metric(&format!(
        "watchgate_plugin_invocations_total{{plugin=\"{plugin}\",outcome=\"{outcome}\"}}"
    ))
}

/// The dead letters of `plugin` (the first page of the admin API).
pub fn dead_letters(g: &Gateway, plugin: &str) -> Vec<Value> {
    g.json(&format!("/v1/plugins/{plugin}/dead-letters"))["dead_letters"]
        .as_array()
        .expect("a dead_letters array")
        .clone()
}

/// The messages `plugin` logged (through `log` or its stdout and stderr),
/// in order, from the gateway's JSON log.
pub fn plugin_lines(g: &Gateway, plugin: &str) -> Vec<String> {
    g.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["plugin"] == plugin || v["plugin"] == plugin)
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_owned))
        .collect()
}

/// The raw bytes `event-log` installed as `name` appended so far.
pub fn event_log_bytes(g: &Gateway, name: &str) -> Vec<u8> {
    std::fs::read(g.path(&format!("out/{name}/events.jsonl"))).unwrap_or_default()
}

/// Wait until the `event-log`s `names` each appended `n` complete lines;
/// returns their bytes, in the order of `names`.
pub fn wait_lines(g: &mut Gateway, names: &[&str], n: usize) -> Vec<Vec<u8>> {
    wait_for(
        &format!("{n} lines from each of {names:?}"),
        DEADLINE,
        || {
            g.assert_running();
            let all: Vec<Vec<u8>> = names.iter().map(|p| event_log_bytes(g, p)).collect();
            all.iter()
                .all(|b| b.iter().filter(|&&c| c == b'\n').count() >= n)
                .then_some(all)
        },
    )
}
