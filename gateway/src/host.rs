//! What a plugin may call back into.
//!
//! Owns the per-plugin [`PluginContext`] (name, grants, state, log), the
//! per-instance [`HostState`] stored in each wasmtime `Store` with its
//! memory limiter, the operator's [`Grants`], the bindings generated from
//! the WIT world and the implementations of its imports. Each capability
//! lives in its own file behind its grant check and is counted on every
//! call. WASI is linked with nothing ambient: no preopened directories,
//! environment, arguments, network or inherited stdio, and its waits end
//! at the call's deadline ([`wait`]). This module sits
//! below `runtime`: it must not call into guests, and must not reach up to
//! the runtime, the dispatcher, the sources or the config file; what a
//! capability needs from them (the etcd client settings behind a `kv`
//! grant, the reader behind `snapshot`) is handed in when the context is
//! built.

pub mod bindings;
pub mod commands;
pub mod files;
pub mod grants;
pub mod http;
pub mod kv;
pub mod limiter;
pub mod log;
pub mod snapshot;
pub mod state;
pub mod wait;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::telemetry::Metrics;
use bindings::watchgate::plugin as wit;
use commands::CommandsGrant;
use files::FilesGrant;
pub use grants::Grants;
use http::HttpGrant;
use kv::KvWriter;
use limiter::MemoryLimiter;
use log::{Level, LineStream, PluginLog, Stream};
use snapshot::SnapshotGrant;
use state::PluginState;
use wait::{CallClock, CallDeadline};

/// Everything of one plugin that outlives its instances.
pub struct PluginContext {
    /// Plugin name (the file stem).
    pub name: String,
    /// `files` grant, if the operator gave one.
    pub files: Option<FilesGrant>,
    /// `http` grant, if the operator gave one.
    pub http: Option<HttpGrant>,
    /// `kv` grants, if the operator gave any.
    pub kv: Option<KvWriter>,
    /// `snapshot` grant, if the operator gave one.
    pub snapshot: Option<SnapshotGrant>,
    /// `commands` and `signals` grants, if the operator gave any.
    pub commands: Option<CommandsGrant>,
    /// The sidecar's `[settings]`.
    pub settings: BTreeMap<String, String>,
    /// Host-kept state.
    pub state: Arc<PluginState>,
    /// Log output.
    pub log: Arc<PluginLog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// What the capabilities do with granted requests.
    pub effects: Effects,
}

impl PluginContext {
    /// A context with no grants, no settings, performing effects.
    pub fn new(
        name: &str,
        state: Arc<PluginState>,
        log: Arc<PluginLog>,
        metrics: Arc<Metrics>,
    ) -> PluginContext {
        PluginContext {
            name: name.to_owned(),
            files: None,
            http: None,
            kv: None,
            snapshot: None,
            commands: None,
            settings: BTreeMap::new(),
            state,
            log,
            metrics,
            effects: Effects::default(),
        }
    }

    /// The capabilities this context grants, by name.
    pub fn granted(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.files.is_some() {
            v.push("files");
        }
        if self.http.is_some() {
            v.push("http");
        }
        if self.kv.is_some() {
            v.push("kv");
        }
        if self.snapshot.is_some() {
            v.push("snapshot");
        }
        if self.commands.is_some() {
            v.push("commands");
        }
        v
    }
}

/// What granted `files`, `http`, `kv` and `commands` requests do: in the gateway they
/// are performed; `watchgate plugin test` reports them and performs them
/// only when asked.
#[derive(Clone)]
pub struct Effects {
    /// Carry the requests out.
    pub perform: bool,
    /// Called with a JSON description of each granted request.
    pub report: Option<Arc<dyn Fn(serde_json::Value) + Send + Sync>>,
}

impl Default for Effects {
    fn default() -> Self {
        Effects {
            perform: true,
            report: None,
        }
    }
}

impl Effects {
    fn report(&self, plugin: &str, capability: &str, detail: serde_json::Value) {
        if let Some(report) = &self.report {
            report(serde_json::json!({
                "effect": capability,
                "plugin": plugin,
                "performed": self.perform,
                "detail": detail,
            }));
        }
    }
}

/// Most WASI resources (pollables, streams, …) one instance may hold at
/// once. Each is host memory the guest allocates by calling an import, and
/// a guest that never drops them would otherwise keep them for as long as
/// its instance lives (wasmtime allows a million). No plugin of the world
/// needs more than a handful; one past the bound fails its import, which
/// traps the call, and the instance, with everything it held, is replaced.
pub const MAX_HOST_RESOURCES: usize = 10_000;

/// The data of one wasmtime `Store`: one plugin instance.
pub struct HostState {
    ctx: Arc<PluginContext>,
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory and table caps; records whether a cap was hit.
    pub limiter: MemoryLimiter,
    stdout: LineStream,
    stderr: LineStream,
    /// The deadline of the call in progress: WASI waits end at it, and
    /// host calls that wait (a `state.set` whose writes queue is full) stop
    /// a tenth of it before (none: outside a call, waits are not bounded
    /// and host calls do not wait).
    deadline: Option<CallDeadline>,
}

impl HostState {
    /// Fresh per-instance state for `ctx`, capped at `memory_bytes`.
    pub fn new(ctx: Arc<PluginContext>, memory_bytes: usize) -> HostState {
        let stdout = LineStream::new(ctx.log.clone(), Stream::Stdout);
        let stderr = LineStream::new(ctx.log.clone(), Stream::Stderr);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_blocking_current_thread(true)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        HostState {
            ctx,
            wasi,
            table,
            limiter: MemoryLimiter::new(memory_bytes),
            stdout,
            stderr,
            deadline: None,
        }
    }

    /// Hold the WASI waits of the call that started at `started` to
    /// `timeout_ms`, the deadline the epoch holds its wasm to.
    pub fn arm_deadline(&mut self, started: CallClock, timeout_ms: u64) {
        self.deadline = Some(CallDeadline::starting_at(started, timeout_ms));
    }

    /// Until when a host call may wait: a tenth of the call's deadline
    /// before it, so the guest gets a refusal with time to handle it rather
    /// than being interrupted in the host; not at all outside a call.
    fn waits_end(&self) -> Instant {
        self.deadline
            .and_then(|d| Some(d.at()? - Duration::from_millis(d.timeout_ms) / 10))
            .unwrap_or_else(Instant::now)
    }

    /// The plugin this instance belongs to.
    pub fn plugin(&self) -> &Arc<PluginContext> {
        &self.ctx
    }

    /// Emit partial stdout/stderr lines; called after every call.
    pub fn flush_output(&self) {
        self.stdout.flush_partial();
        self.stderr.flush_partial();
    }

    fn count(&self, capability: &str, outcome: &str) {
        self.ctx
            .metrics
            .capability(&self.ctx.name, capability, outcome);
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::types::Host for HostState {}

impl wit::log::Host for HostState {
    fn log(&mut self, level: wit::log::Level, message: String) {
        let level = match level {
            wit::log::Level::Trace => Level::Trace,
            wit::log::Level::Debug => Level::Debug,
            wit::log::Level::Info => Level::Info,
            wit::log::Level::Warn => Level::Warn,
            wit::log::Level::Error => Level::Error,
        };
        self.ctx.log.line(level, Stream::Log, &message);
    }
}

impl wit::state::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.count("state", "ok");
        self.ctx.state.get(&key)
    }

    fn set(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), String> {
        match self.ctx.state.set(key, value, self.waits_end()) {
            Ok(how) => {
                if how == state::Set::AfterWait {
                    self.ctx.metrics.state_waited(&self.ctx.name);
                }
                self.count("state", "ok");
                Ok(())
            }
            Err(e) => Err(self.refused("state", e)),
        }
    }
}

impl wit::settings::Host for HostState {
    fn get(&mut self, name: String) -> Option<String> {
        self.ctx.settings.get(&name).cloned()
    }
}

impl HostState {
    fn not_granted(&self, capability: &str) -> String {
        self.count(capability, "denied");
        format!(
            "capability `{capability}` is not granted to this plugin (see [grants] in its sidecar)"
        )
    }

    /// Count a refusal or failure and turn it into the guest's error.
    fn refused(&self, capability: &str, (outcome, message): (&'static str, String)) -> String {
        self.count(capability, outcome);
        message
    }

    /// A `files` operation `op_name` on `path` (`data` for a write, the
    /// second path of a rename): reported to `plugin test`, carried out
    /// unless it is an effect (`effect`) not to be performed, then counted
    /// by outcome.
    fn files_op<T: Default>(
        &mut self,
        op_name: &'static str,
        path: &str,
        data: FileData<'_>,
        effect: bool,
        op: impl FnOnce(&FilesGrant) -> Result<T, files::FilesError>,
    ) -> Result<T, String> {
        let Some(grant) = &self.ctx.files else {
            return Err(self.not_granted("files"));
        };
        if self.ctx.effects.report.is_some() || !self.ctx.effects.perform {
            if let Err(e) = files::clean_path(path) {
                self.count("files", "denied");
                return Err(e.to_string());
            }
            let mut detail = serde_json::json!({
                "op": op_name,
                "path": grant.root().join(path),
            });
            match data {
                FileData::None => {}
                FileData::Bytes(data) => {
                    detail["bytes"] = data.len().into();
                    detail["data"] = String::from_utf8_lossy(data).into();
                }
                FileData::To(to) => {
                    if let Err(e) = files::clean_path(to) {
                        self.count("files", "denied");
                        return Err(e.to_string());
                    }
                    detail["to"] = serde_json::json!(grant.root().join(to));
                }
            }
            self.ctx.effects.report(&self.ctx.name, "files", detail);
            if effect && !self.ctx.effects.perform {
                self.count("files", "ok");
                return Ok(T::default());
            }
        }
        let r = op(grant);
        match &r {
            Ok(_) => self.count("files", "ok"),
            Err(files::FilesError::BadPath { .. }) => self.count("files", "denied"),
            Err(files::FilesError::Quota { .. }) => self.count("files", "quota"),
            Err(files::FilesError::TooLarge { .. }) => self.count("files", "too_large"),
            Err(_) => self.count("files", "error"),
        }
        let used = grant.usage();
        self.ctx
            .metrics
            .files_used(&self.ctx.name, used.bytes, used.entries);
        r.map_err(|e| e.to_string())
    }
}

/// What a `files` operation carries besides its path, for its report.
#[derive(Clone, Copy)]
enum FileData<'a> {
    None,
    Bytes(&'a [u8]),
    To(&'a str),
}

impl wit::files::Host for HostState {
    fn append(&mut self, path: String, data: Vec<u8>) -> Result<(), String> {
        self.files_op("append", &path, FileData::Bytes(&data), true, |g| {
            g.append(&path, &data)
        })
    }

    fn replace(&mut self, path: String, data: Vec<u8>) -> Result<(), String> {
        self.files_op("replace", &path, FileData::Bytes(&data), true, |g| {
            g.replace(&path, &data)
        })
    }

    fn read(&mut self, path: String) -> Result<Option<Vec<u8>>, String> {
        // Not an effect: `plugin test` reads without `--perform` too.
        self.files_op("read", &path, FileData::None, false, |g| g.read(&path))
    }

    fn rename(&mut self, from: String, to: String) -> Result<(), String> {
        self.files_op("rename", &from, FileData::To(&to), true, |g| {
            g.rename(&from, &to)
        })
    }

    fn remove(&mut self, path: String) -> Result<(), String> {
        self.files_op("remove", &path, FileData::None, true, |g| g.remove(&path))
    }
}

impl wit::http::Host for HostState {
    fn send(&mut self, request: wit::http::Request) -> Result<u64, String> {
        let Some(grant) = &self.ctx.http else {
            return Err(self.not_granted("http"));
        };
        let checked = match grant.check(http::Request {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
        }) {
            Ok(c) => c,
            Err(e) => return Err(self.refused("http", e)),
        };
        let id = grant.next_id();
        if self.ctx.effects.report.is_some() {
            let mut detail = checked.describe();
            detail["id"] = id.into();
            self.ctx.effects.report(&self.ctx.name, "http", detail);
        }
        if self.ctx.effects.perform
            && let Err(e) = grant.send(id, checked, &self.ctx.name, &self.ctx.metrics)
        {
            return Err(self.refused("http", e));
        }
        self.count("http", "queued");
        Ok(id)
    }
}

impl HostState {
    fn kv_write(&mut self, write: kv::Write) -> Result<(), String> {
        let Some(writer) = &self.ctx.kv else {
            return Err(self.not_granted("kv"));
        };
        if let Err(e) = writer.check(&write) {
            return Err(self.refused("kv", e));
        }
        self.ctx
            .effects
            .report(&self.ctx.name, "kv", write.describe());
        if self.ctx.effects.perform
            && let Err(e) = writer.submit(write)
        {
            return Err(self.refused("kv", e));
        }
        self.count("kv", "queued");
        Ok(())
    }
}

impl wit::kv::Host for HostState {
    fn put(&mut self, source: String, key: String, value: Vec<u8>) -> Result<(), String> {
        self.kv_write(kv::Write {
            source,
            key,
            value: Some(value),
        })
    }

    fn delete(&mut self, source: String, key: String) -> Result<(), String> {
        self.kv_write(kv::Write {
            source,
            key,
            value: None,
        })
    }
}

impl wit::snapshot::Host for HostState {
    fn get(&mut self, source: String, key: String) -> Result<Option<Vec<u8>>, String> {
        let Some(grant) = &self.ctx.snapshot else {
            return Err(self.not_granted("snapshot"));
        };
        match grant.get(&source, &key) {
            Ok(v) => {
                self.count("snapshot", "ok");
                Ok(v)
            }
            Err(e) => Err(self.refused("snapshot", e)),
        }
    }

    fn scan(&mut self, source: String, prefix: String) -> Result<Vec<(String, Vec<u8>)>, String> {
        let Some(grant) = &self.ctx.snapshot else {
            return Err(self.not_granted("snapshot"));
        };
        match grant.scan(&source, &prefix) {
            Ok(v) => {
                self.count("snapshot", "ok");
                let bytes = v.iter().map(|(k, v)| k.len() + v.len()).sum();
                self.ctx.metrics.snapshot_scanned(&self.ctx.name, bytes);
                Ok(v)
            }
            Err(e) => Err(self.refused("snapshot", e)),
        }
    }
}
