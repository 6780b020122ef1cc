//! `watchgate plugin test`: a plugin run outside the gateway.
//!
//! Owns running one plugin on recorded events, with the limits, grants and
//! settings the gateway would give it (`plugin new` is in
//! [`super::scaffold`]). It reports every effect (files, HTTP, kv,
//! commands) as a JSON line and performs effects only with `--perform`; the values
//! `snapshot` reads come from the recorded events seen so far.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{Config, Sidecar};
use crate::event::{Event, EventKind, EventLine};
use crate::host::commands::CommandsGrant;
use crate::host::files::FilesGrant;
use crate::host::http::HttpGrant;
use crate::host::kv::KvWriter;
use crate::host::log::{Level, LogSink, PluginLog, Stream};
use crate::host::snapshot::{ScanRequest, Scanned, SnapshotGrant, SnapshotReader};
use crate::host::{Effects, PluginContext};
use crate::manifest::CapabilityReport;
use crate::runtime::instance::{LoadedPlugin, Sandbox};
use crate::runtime::{CompileLimits, Limits, PartialLimits};
use crate::telemetry::Metrics;

/// Arguments of `watchgate plugin test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The plugin component (`.wasm`).
    pub wasm: PathBuf,
    /// Events, one JSON object per line (as `event-log` writes them).
    #[arg(long)]
    pub events: PathBuf,
    /// A gateway config: its `[runtime.defaults]` limits and sources apply,
    /// and the plugin's sidecar is read from its plugin directory
    /// (`NAME.toml`, NAME being the file stem) unless `--sidecar` is given.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The sidecar to take grants, limits and settings from (needs
    /// `--config`, which names the sources it may refer to).
    #[arg(long, requires = "config")]
    pub sidecar: Option<PathBuf>,
    /// Grant the `files` capability rooted in this directory (over the
    /// sidecar's grant).
    #[arg(long)]
    pub files: Option<PathBuf>,
    /// Fuel per call.
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Deadline per call, in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Memory cap, in MiB.
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Carry out the effects (write the files, send the requests, make the
    /// kv writes, run the commands, send the signals) instead of only
    /// printing them.
    #[arg(long)]
    pub perform: bool,
}

/// Prints plugin log lines and effects as JSON objects.
struct JsonLines(Mutex<std::io::Stdout>);

impl JsonLines {
    fn print(&self, value: &impl Serialize) {
        let mut out = self.0.lock();
        let _ = serde_json::to_writer(&mut *out, value);
        let _ = writeln!(out);
    }
}

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
        self.print(&LogLine {
            log: LogBody {
                level,
                stream,
                message,
            },
        });
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

/// The values `snapshot` reads in a test: the recorded events so far.
#[derive(Default)]
struct Recorded(Mutex<BTreeMap<String, BTreeMap<String, Bytes>>>);

impl Recorded {
    fn apply(&self, e: &Event) {
        let mut m = self.0.lock();
        let keys = m.entry(e.source.to_string()).or_default();
        match (&e.kind, &e.value) {
            (EventKind::Put, Some(v)) => {
                keys.insert(e.key.to_string(), v.clone());
            }
            _ => {
                keys.remove(&*e.key);
            }
        }
    }
}

impl SnapshotReader for Recorded {
    fn value(&self, source: &str, key: &str) -> Option<Option<Bytes>> {
        Some(self.0.lock().get(source)?.get(key).cloned())
    }

    fn scan(&self, scan: &ScanRequest<'_>) -> Option<Scanned> {
        let m = self.0.lock();
        let Some(keys) = m.get(scan.source) else {
            return Some(Scanned::default());
        };
        let present = keys
            .iter()
            .filter(|(k, _)| scan.wants(k))
            .map(|(k, v)| (k.as_str(), v));
        Some(Scanned::collect(present, scan.bounds))
    }
}

/// The config and sidecar a test runs with.
fn settings(args: &TestArgs, name: &str) -> Result<(Config, Sidecar), String> {
    let Some(config_path) = &args.config else {
        let config = Config::parse(Path::new("watchgate.toml"), "")
            .map_err(|e| format!("built-in config: {e}"))?;
        return Ok((config, Sidecar::default()));
    };
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let sidecar_path = args
        .sidecar
        .clone()
        .unwrap_or_else(|| config.plugins.dir.join(format!("{name}.toml")));
    let sidecar = match std::fs::read_to_string(&sidecar_path) {
        Ok(text) => Sidecar::parse(&sidecar_path, &text, &config).map_err(|e| e.to_string())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.sidecar.is_none() => {
            Sidecar::default()
        }
        Err(e) => return Err(format!("{}: cannot read: {e}", sidecar_path.display())),
    };
    Ok((config, sidecar))
}

/// Run `plugin test`; returns the exit code.
pub fn plugin_test(args: &TestArgs) -> i32 {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        2
    };
    let name = args
        .wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("plugin")
        .to_owned();
    let (config, sidecar) = match settings(args, &name) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let runtime_config = config.runtime.clone();
    let limits: Limits = runtime_config
        .defaults
        .merged(sidecar.limits)
        .merged(PartialLimits {
            fuel: args.fuel,
            timeout_ms: args.timeout_ms,
            memory_mb: args.memory_mb,
            ..PartialLimits::default()
        });
    let runtime = match super::tool_runtime(&config) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let bytes = match std::fs::read(&args.wasm) {
        Ok(b) => b,
        Err(e) => return fail(format!("{}: cannot read: {e}", args.wasm.display())),
    };
    let limits_of_compile = CompileLimits::from(&runtime_config);
    let compiled = match runtime.compile_blocking(Bytes::from(bytes), &limits_of_compile) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {e}", args.wasm.display())),
    };
    if let Err(e) = compiled.footprint.fits_memory(limits.memory_mb) {
        return fail(format!("{}: {e}", args.wasm.display()));
    }
    let files_dir = args.files.clone().or_else(|| sidecar.grants.files.clone());
    let files = match files_dir
        .as_deref()
        .map(|dir| FilesGrant::new(dir, limits.files_quota()))
        .transpose()
    {
        Ok(f) => f,
        Err(e) => return fail(format!("files grant: {e}")),
    };
    let events = match std::fs::File::open(&args.events) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => return fail(format!("{}: cannot read: {e}", args.events.display())),
    };
    // Sends and writes run here when performed.
    let io = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the I/O runtime: {e}")),
    };
    let handle = args.perform.then(|| io.handle().clone());
    let http = if sidecar.grants.http.is_empty() {
        None
    } else {
        match HttpGrant::new(&sidecar.grants.http, handle.clone()) {
            Ok(g) => Some(g),
            Err(e) => return fail(format!("grants.http: {e}")),
        }
    };
    let metrics = Metrics::shared();
    let sink = Arc::new(JsonLines(Mutex::new(std::io::stdout())));
    let recorded: Arc<Recorded> = Arc::default();
    let reader: Arc<dyn SnapshotReader> = recorded.clone();
    let effect_sink = sink.clone();
    let subscriptions = sidecar.subscribe.clone();
    let log = Arc::new(PluginLog::new(
        &name,
        u32::MAX,
        sink.clone(),
        metrics.clone(),
    ));
    let commands = CommandsGrant::new(
        &sidecar.grants,
        files.as_ref().map(FilesGrant::root),
        log.clone(),
        metrics.clone(),
        config.gateway.shutdown_grace,
        None,
    );
    let ctx = PluginContext {
        files,
        http,
        kv: (!sidecar.grants.kv.is_empty()).then(|| {
            KvWriter::new(
                sidecar.grants.kv.clone(),
                config.kv_targets(&sidecar.grants.kv),
                handle.as_ref(),
                &name,
                &metrics,
            )
        }),
        snapshot: sidecar
            .grants
            .snapshot
            .then(|| SnapshotGrant::new(Arc::downgrade(&reader), subscriptions)),
        commands,
        settings: sidecar.settings_text(),
        effects: Effects {
            perform: args.perform,
            report: Some(Arc::new(move |v| effect_sink.print(&v))),
        },
        ..PluginContext::new(&name, Arc::default(), log, metrics.clone())
    };
    let report = CapabilityReport::new(compiled.manifest.as_deref(), ctx.granted());
    sink.print(&serde_json::json!({
        "plugin": name,
        "manifest": compiled.manifest.as_deref(),
        "capabilities": report,
        "limits": crate::dispatch::LimitsReport::from(limits),
        "perform": args.perform,
    }));
    let plugin = LoadedPlugin {
        compiled,
        ctx: Arc::new(ctx),
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
        recorded.apply(&event);
        let report = sandbox.call(&plugin, &event);
        if report.outcome != crate::telemetry::Outcome::ok {
            failed += 1;
        }
        sink.print(&OutcomeLine {
            line: n,
            key: &event.key,
            kind: event.kind.as_str(),
            outcome: report.outcome.as_str(),
            message: report.message.as_deref(),
            trap: report.trap.map(|t| format!("{t:?}")),
            elapsed_us: report.elapsed.as_micros(),
        });
    }
    if args.perform {
        wait_for_effects(&metrics, &name);
        if let Some(c) = &plugin.ctx.commands
            && !c
                .runner()
                .wait_idle(Instant::now() + Duration::from_secs(60))
        {
            eprintln!("warning: some commands were still running after 60 s");
        }
    }
    if bad_input > 0 {
        2
    } else if failed > 0 {
        1
    } else {
        0
    }
}

/// With `--perform`: wait (at most 30 s) until every queued HTTP request
/// and kv write has finished, so the process does not exit under them.
fn wait_for_effects(metrics: &Metrics, plugin: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let count = |cap: &str, outcome: &str| metrics.capability_count(plugin, cap, outcome);
    while Instant::now() < deadline {
        let http_done = count("http", "delivered") + count("http", "failed");
        let kv_done = count("kv", "written") + count("kv", "failed");
        if http_done >= count("http", "queued") && kv_done >= count("kv", "queued") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: some effects were still running after 30 s");
}
