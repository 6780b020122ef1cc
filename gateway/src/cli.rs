//! The command line: `run`, `check`, `plugin test`, `plugin new`,
//! `state reset`, `dead-letters` and `trace`.
//!
//! Owns argument parsing and the commands that do not run the gateway
//! (`check`, `plugin test`, `state reset`, and `dead-letters`, which talks to
//! a running gateway's admin API). Each returns an [`ExitCode`]-like integer; it
//! must not install signal handlers or telemetry (that is `main`'s job).

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::plugin_dir::compile_plugin;
use crate::runtime::Runtime;

pub mod plugin_tools;
pub mod scaffold;
pub mod trace;

pub use plugin_tools::plugin_test;
pub use scaffold::plugin_new;
pub use trace::trace;

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
    /// Events plugins failed on after every attempt.
    DeadLetters {
        /// What to do with them.
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Where the latest change of a key (or its change at a revision)
    /// stands for every plugin of a running gateway: handled, queued,
    /// retrying, dead-lettered, quarantined, parked or not subscribed.
    Trace(trace::TraceArgs),
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
    /// Print a plugin's dead letters as JSON, every page of them. Reads
    /// the state store directly when no gateway is running.
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
                let client = reqwest::Client::new();
                let send = |url: String| {
                    let mut req = client
                        .request(method.clone(), url)
                        .timeout(std::time::Duration::from_secs(10));
                    if let Some(t) = &token {
                        req = req.bearer_auth(t);
                    }
                    async move {
                        let resp = req.send().await?;
                        let status = resp.status();
                        Ok::<_, anyhow::Error>((status, resp.text().await?))
                    }
                };
                let (status, body) = send(url.clone()).await?;
                if !is_list || !status.is_success() {
                    return Ok((status, body));
                }
                // The listing comes a page at a time: follow `next` and
                // print the letters of every page as one list.
                let mut all: serde_json::Value = serde_json::from_str(&body)?;
                let mut next = all["next"].as_str().map(str::to_owned);
                while let Some(path) = next {
                    let (status, body) =
                        send(format!("{}{path}", base.trim_end_matches('/'))).await?;
                    if !status.is_success() {
                        return Ok((status, body));
                    }
                    let mut page: serde_json::Value = serde_json::from_str(&body)?;
                    next = page["next"].as_str().map(str::to_owned);
                    if let (Some(into), Some(more)) = (
                        all["dead_letters"].as_array_mut(),
                        page["dead_letters"].as_array_mut(),
                    ) {
                        into.append(more);
                    }
                }
                if let Some(all) = all.as_object_mut() {
                    all.remove("next");
                }
                let mut text = serde_json::to_string_pretty(&all)?;
                text.push('\n');
                Ok((status, text))
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
                        "total": store.dead_letter_tally(&args.plugin),
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
    /// them) with the limits and grants it would get, and print each
    /// outcome, log line and effect (files it would write, HTTP requests
    /// and kv writes it would make) as JSON. Effects are only performed
    /// with `--perform`. Exits 1 when any call failed, 2 when the input is
    /// unusable.
    Test(plugin_tools::TestArgs),
    /// Create a new plugin in Rust, Python, JavaScript or Go: a manifest
    /// and a handler that logs each change, `build.sh` (builds NAME.wasm),
    /// a README, a sidecar example and recorded events to test with.
    New(scaffold::NewArgs),
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
    let runtime = match tool_runtime(&config) {
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
                let subscriptions =
                    crate::plugin_dir::effective_subscriptions(&config, &sidecar, &compiled);
                let subscriptions = match subscriptions {
                    Ok(s) => s,
                    Err(e) => {
                        failed += 1;
                        eprintln!("plugin {name}: rejected: {e}");
                        continue;
                    }
                };
                let subs = if subscriptions.is_empty() {
                    "every source".to_owned()
                } else {
                    subscriptions
                        .iter()
                        .map(|s| format!("{}:{:?}", s.source, s.prefix))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let mut grants: Vec<String> = Vec::new();
                if let Some(d) = &sidecar.grants.files {
                    grants.push(format!("files={}", d.display()));
                }
                if !sidecar.grants.http.is_empty() {
                    grants.push(format!("http={}", sidecar.grants.http.join(",")));
                }
                for g in &sidecar.grants.kv {
                    grants.push(format!("kv={}:{}", g.source, g.prefix));
                }
                if sidecar.grants.snapshot {
                    grants.push("snapshot".to_owned());
                }
                for (name, argv) in &sidecar.grants.commands {
                    grants.push(format!("command:{name}={}", argv.join(" ")));
                }
                for (name, pid_file) in &sidecar.grants.signals {
                    grants.push(format!("signal:{name}={}", pid_file.display()));
                }
                let grants = if grants.is_empty() {
                    "none".to_owned()
                } else {
                    grants.join(" ")
                };
                let about = compiled.manifest.as_deref().map_or_else(
                    || "no manifest".to_owned(),
                    |m| {
                        format!(
                            "manifest {} {}",
                            m.name.as_deref().unwrap_or("?"),
                            m.version.as_deref().unwrap_or("?")
                        )
                    },
                );
                println!(
                    "plugin {name}: ok (sha256 {}, {} bytes, {about}; subscribes to {subs}; grants: {grants})",
                    &compiled.digest[..12],
                    compiled.size
                );
                println!("  {}", describe_build(&compiled.footprint, compiled.size));
                let report = crate::manifest::CapabilityReport::new(
                    compiled.manifest.as_deref(),
                    sidecar.grants.names(),
                );
                println!(
                    "  capabilities requested: [{}], granted: [{}]",
                    report.requested.join(", "),
                    report.granted.join(", ")
                );
                if !report.ungranted.is_empty() {
                    println!(
                        "  warning: asks for [{}], which the operator did not grant; calls to them will fail",
                        report.ungranted.join(", ")
                    );
                }
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

/// One line on what built a plugin and what an instance of it takes.
fn describe_build(f: &crate::runtime::Footprint, size: usize) -> String {
    let toolchain = if f.toolchain.is_empty() {
        "toolchain not recorded".to_owned()
    } else {
        f.toolchain.join(", ")
    };
    format!(
        "built from {} ({toolchain}); {}, {} core instance(s), {} memory(ies), {} initial memory per instance",
        f.language,
        crate::text::human_bytes(size as u64),
        f.core_instances,
        f.memories,
        crate::text::human_bytes(f.initial_memory_bytes)
    )
}

/// The runtime `check` and `plugin test` compile with. With the config's
/// compile cache on, compiled code is kept where the gateway keeps it
/// (`compiled/` in its state directory, when that exists) or else in the
/// user's cache directory, so checking a plugin the gateway already
/// compiled, or checking it twice, does not pay a compile of tens of
/// seconds again.
pub(crate) fn tool_runtime(config: &Config) -> Result<std::sync::Arc<Runtime>, String> {
    let cache = config
        .runtime
        .compile_cache
        .then(|| {
            let dir = if config.state.dir.is_dir() {
                config.state.dir.join("compiled")
            } else {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?
                    .join("watchgate/compiled")
            };
            std::fs::create_dir_all(&dir).ok()?;
            std::path::absolute(dir).ok()
        })
        .flatten();
    Runtime::with_cache(&config.runtime, cache.as_deref()).map_err(|e| e.to_string())
}
