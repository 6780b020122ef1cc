//! The command line: `run`, `check`, `plugin test`, `state reset` and
//! `dead-letters`.
//!
//! Owns argument parsing and the commands that do not run the gateway
//! (`check`, `plugin test`, `state reset`, and `dead-letters`, which talks to
//! a running gateway's admin API). Each returns an [`ExitCode`]-like integer; it
//! must not install signal handlers or telemetry (that is `main`'s job).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{Config, Limits, RuntimeConfig};
use crate::event::{Event, EventLine};
use crate::host::PluginContext;
use crate::host::files::FilesGrant;
use crate::host::log::{Level, LogSink, PluginLog, Stream};
use crate::plugin_dir::compile_plugin;
use crate::runtime::Runtime;
use crate::runtime::instance::{LoadedPlugin, Sandbox};
use crate::telemetry::Metrics;

/// watchgate: watch configuration and discovery stores, hand every change to
/// sandboxed WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(
    name = "watchgate",
    // `watchgate 0.1.0 (plugin world watchgate:plugin@0.1.0)`: the WIT
    // package comes from plugin-sdk/wit/plugin.wit through gateway/build.rs.
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        " (plugin world ",
        env!("WATCHGATE_WIT_PACKAGE"),
        ")"
    ),
    about
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// The gateway configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the configuration and compile every plugin, then exit:
    /// 0 when everything is usable, 2 with the reasons otherwise.
    Check {
        /// The gateway configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Plugin tools.
    Plugin {
        /// Plugin subcommand.
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// The state directory (cursors, key index, plugin state, dead letters).
    State {
        /// State subcommand.
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Run the benchmark suite; writes bench/results.json and
    /// BENCHMARKS.md. Measure with a release build.
    Bench {
        /// Small sizes and few runs: checks that every case works.
        #[arg(long)]
        quick: bool,
        /// Directory of the compiled plugins (scripts/build-plugins).
        #[arg(long, default_value = "dist/plugins")]
        plugins: PathBuf,
        /// Where bench/results.json and BENCHMARKS.md are written.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Only the cases whose names contain this (repeatable).
        #[arg(long)]
        only: Vec<String>,
    },
    /// Events plugins failed on after every attempt.
    DeadLetters {
        /// What to do with them.
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
}

/// `watchgate state …`.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Move the state store aside (it is kept, renamed) so the next start
    /// begins empty: every plugin starts over per its `start` setting, and
    /// plugin state and dead letters are forgotten. Refused while a gateway
    /// uses it.
    Reset {
        /// The gateway configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// `watchgate dead-letters …`, through the running gateway's admin API.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Print a plugin's dead letters as JSON. Reads the state store
    /// directly when no gateway is running.
    List(DeadLetterArgs),
    /// Queue a plugin's dead letters again (admin token required).
    Replay(DeadLetterArgs),
    /// Forget a plugin's dead letters (admin token required).
    Delete(DeadLetterArgs),
}

/// Arguments of every `dead-letters` command.
#[derive(Debug, clap::Args)]
pub struct DeadLetterArgs {
    /// The gateway configuration file (TOML): gives the admin address,
    /// token and state directory.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The plugin.
    #[arg(long, short)]
    pub plugin: String,
    /// The admin server's base URL, when `[admin] listen` does not say
    /// where to reach it (port 0, or another host).
    #[arg(long)]
    pub admin: Option<String>,
}

/// `watchgate state reset`: returns the exit code.
pub fn state_reset(config_path: &Path) -> i32 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    match crate::store::Store::reset(&config.state.dir) {
        Ok(Some(moved)) => {
            println!("state store moved aside to {}", moved.display());
            println!("the next start begins with an empty store");
            0
        }
        Ok(None) => {
            println!(
                "no state store in {}; nothing to reset",
                config.state.dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// `watchgate dead-letters …`: returns the exit code.
pub fn dead_letters(command: DeadLetterCommand) -> i32 {
    let (args, method, suffix) = match command {
        DeadLetterCommand::List(a) => (a, reqwest::Method::GET, ""),
        DeadLetterCommand::Replay(a) => (a, reqwest::Method::POST, "/replay"),
        DeadLetterCommand::Delete(a) => (a, reqwest::Method::DELETE, ""),
    };
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let base = args.admin.clone().unwrap_or_else(|| {
        let mut addr = config.admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    });
    let url = format!(
        "{}/v1/plugins/{}/dead-letters{suffix}",
        base.trim_end_matches('/'),
        percent_encoding::utf8_percent_encode(&args.plugin, percent_encoding::NON_ALPHANUMERIC)
    );
    let token = config.admin.effective_token();
    let is_list = method == reqwest::Method::GET;
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let mut req = reqwest::Client::new()
                    .request(method, &url)
                    .timeout(std::time::Duration::from_secs(10));
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await?;
                let status = resp.status();
                Ok::<_, anyhow::Error>((status, resp.text().await?))
            })
        });
    match answer {
        Ok((status, body)) => {
            print!("{body}");
            if status.is_success() {
                0
            } else {
                eprintln!("error: the gateway answered {status}");
                1
            }
        }
        Err(e) if is_list => {
            // No gateway running: read the store itself.
            match crate::store::Store::open(&config.state.dir) {
                Ok(store) => {
                    let body = serde_json::json!({
                        "plugin": args.plugin,
                        "dead_letters": store.dead_letters(&args.plugin),
                    });
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&body).unwrap_or_default()
                    );
                    0
                }
                Err(open) => {
                    eprintln!("error: no gateway answered at {url} ({e}), and {open}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("error: no gateway answered at {url}: {e}");
            1
        }
    }
}

/// `watchgate plugin …`.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin on recorded events (JSON lines as `event-log` writes
    /// them) and print each outcome and log line as JSON. Exits 1 when any
    /// call failed, 2 when the input is unusable.
    Test {
        /// The plugin component (`.wasm`).
        wasm: PathBuf,
        /// Events, one JSON object per line.
        #[arg(long)]
        events: PathBuf,
        /// Grant the `files` capability rooted in this directory.
        #[arg(long)]
        files: Option<PathBuf>,
        /// Fuel per call.
        #[arg(long)]
        fuel: Option<u64>,
        /// Deadline per call, in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Memory cap, in MiB.
        #[arg(long)]
        memory_mb: Option<u64>,
    },
}

/// Validate a config and every plugin in its directory. Prints one line per
/// plugin and returns the exit code.
pub fn check(config_path: &Path) -> i32 {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let runtime = match Runtime::new(&config.runtime) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    println!(
        "config {}: ok ({} source(s), plugin directory {})",
        config_path.display(),
        config.sources.len(),
        config.plugins.dir.display()
    );
    let entries = match std::fs::read_dir(&config.plugins.dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "error: plugin directory {} does not exist (create it, or fix [plugins] dir in the config)",
                config.plugins.dir.display()
            );
            return 2;
        }
        Err(e) => {
            eprintln!(
                "error: cannot read plugin directory {}: {e}",
                config.plugins.dir.display()
            );
            return 2;
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".wasm"))
                .filter(|n| !n.starts_with('.'))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    let mut failed = 0;
    for name in &names {
        let wasm_path = config.plugins.dir.join(format!("{name}.wasm"));
        let sidecar_path = config.plugins.dir.join(format!("{name}.toml"));
        let result = std::fs::read(&wasm_path)
            .map_err(|e| format!("{}: cannot read: {e}", wasm_path.display()))
            .and_then(|wasm| {
                let sidecar = match std::fs::read_to_string(&sidecar_path) {
                    Ok(t) => Some(t),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(format!("{}: cannot read: {e}", sidecar_path.display())),
                };
                compile_plugin(
                    &runtime,
                    &config,
                    name,
                    &wasm,
                    sidecar.as_deref().map(|t| (sidecar_path.as_path(), t)),
                )
                .map_err(|e| e.to_string())
            });
        match result {
            Ok((compiled, sidecar)) => {
                let subs = if sidecar.subscribe.is_empty() {
                    "every source".to_owned()
                } else {
                    sidecar
                        .subscribe
                        .iter()
                        .map(|s| format!("{}:{:?}", s.source, s.prefix))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let grants = sidecar
                    .grants
                    .files
                    .as_ref()
                    .map_or("none".to_owned(), |d| format!("files={}", d.display()));
                println!(
                    "plugin {name}: ok (sha256 {}, {} bytes; subscribes to {subs}; grants: {grants})",
                    &compiled.digest[..12],
                    compiled.size
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("plugin {name}: error: {e}");
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} plugin(s) rejected", names.len());
        2
    } else {
        0
    }
}

/// Prints plugin log lines as JSON objects.
struct JsonLines(Mutex<std::io::Stdout>);

#[derive(Serialize)]
struct LogLine<'a> {
    log: LogBody<'a>,
}

#[derive(Serialize)]
struct LogBody<'a> {
    level: Level,
    stream: Stream,
    message: &'a str,
}

impl LogSink for JsonLines {
    fn line(&self, _plugin: &str, level: Level, stream: Stream, message: &str) {
        let line = LogLine {
            log: LogBody {
                level,
                stream,
                message,
            },
        };
        let mut out = self.0.lock();
        let _ = serde_json::to_writer(&mut *out, &line);
        let _ = writeln!(out);
    }
}

#[derive(Serialize)]
struct OutcomeLine<'a> {
    line: usize,
    key: &'a str,
    kind: &'a str,
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trap: Option<String>,
    elapsed_us: u128,
}

/// Arguments of `plugin test`.
pub struct PluginTest<'a> {
    /// The component.
    pub wasm: &'a Path,
    /// JSON-lines events.
    pub events: &'a Path,
    /// `files` grant.
    pub files: Option<&'a Path>,
    /// Limits over the defaults.
    pub limits: crate::config::PartialLimits,
}

/// Run `plugin test`; returns the exit code.
pub fn plugin_test(args: PluginTest<'_>) -> i32 {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        2
    };
    let runtime_config = RuntimeConfig::default();
    let limits: Limits = runtime_config.defaults.merged(args.limits);
    let runtime = match Runtime::new(&runtime_config) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let bytes = match std::fs::read(args.wasm) {
        Ok(b) => b,
        Err(e) => return fail(format!("{}: cannot read: {e}", args.wasm.display())),
    };
    let compiled = match runtime.compile(&bytes) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {e}", args.wasm.display())),
    };
    let files = match args.files.map(FilesGrant::new).transpose() {
        Ok(f) => f,
        Err(e) => return fail(format!("--files: {e}")),
    };
    let events = match std::fs::File::open(args.events) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => return fail(format!("{}: cannot read: {e}", args.events.display())),
    };
    let name = args
        .wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    let metrics = Metrics::shared();
    let sink: Arc<dyn LogSink> = Arc::new(JsonLines(Mutex::new(std::io::stdout())));
    let plugin = LoadedPlugin {
        compiled,
        ctx: Arc::new(PluginContext {
            name: name.clone(),
            files,
            state: Arc::default(),
            log: Arc::new(PluginLog::new(&name, u32::MAX, sink, metrics.clone())),
            metrics,
        }),
        version: 1,
        limits,
    };
    let mut sandbox = Sandbox::new(runtime);
    let (mut failed, mut bad_input) = (0usize, 0usize);
    for (i, line) in events.lines().enumerate() {
        let n = i + 1;
        let line = match line {
            Ok(l) => l,
            Err(e) => return fail(format!("{}:{n}: cannot read: {e}", args.events.display())),
        };
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = match serde_json::from_str::<EventLine>(&line)
            .map_err(|e| e.to_string())
            .and_then(|l| Event::try_from(l).map_err(|e| e.to_string()))
        {
            Ok(e) => e,
            Err(e) => {
                bad_input += 1;
                eprintln!("error: {}:{n}: not an event: {e}", args.events.display());
                continue;
            }
        };
        let report = sandbox.call(&plugin, &event);
        if report.outcome != crate::telemetry::Outcome::ok {
            failed += 1;
        }
        let out = OutcomeLine {
            line: n,
            key: &event.key,
            kind: event.kind.as_str(),
            outcome: report.outcome.as_str(),
            message: report.message.as_deref(),
            trap: report.trap.map(|t| format!("{t:?}")),
            elapsed_us: report.elapsed.as_micros(),
        };
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, &out);
        let _ = writeln!(stdout);
    }
    if bad_input > 0 {
        2
    } else if failed > 0 {
        1
    } else {
        0
    }
}
