//! What a plugin may call back into.
//!
//! Owns the per-plugin [`PluginContext`] (name, grants, state, log), the
//! per-instance [`HostState`] stored in each wasmtime `Store`, and the
//! implementations of the WIT imports. Each capability lives in its own file
//! behind its grant check and is counted on every call. WASI is linked with
//! nothing ambient: no preopened directories, environment, arguments,
//! network or inherited stdio. This module must not call into guests.

pub mod files;
pub mod log;
pub mod state;

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::runtime::bindings::watchgate::plugin as wit;
use crate::runtime::limits::MemoryLimiter;
use crate::telemetry::Metrics;
use files::FilesGrant;
use log::{Level, LineStream, PluginLog, Stream};
use state::PluginState;

/// Everything of one plugin that outlives its instances.
pub struct PluginContext {
    /// Plugin name (the file stem).
    pub name: String,
    /// `files` grant, if the operator gave one.
    pub files: Option<FilesGrant>,
    /// Host-kept state.
    pub state: Arc<PluginState>,
    /// Log output.
    pub log: Arc<PluginLog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// The data of one wasmtime `Store`: one plugin instance.
pub struct HostState {
    ctx: Arc<PluginContext>,
    wasi: WasiCtx,
    table: ResourceTable,
    /// Memory and table caps; records whether a cap was hit.
    pub limiter: MemoryLimiter,
    stdout: LineStream,
    stderr: LineStream,
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
        HostState {
            ctx,
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory_bytes),
            stdout,
            stderr,
        }
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
        let r = self.ctx.state.set(key, value);
        self.count("state", if r.is_ok() { "ok" } else { "error" });
        r
    }
}

impl HostState {
    fn files_op(
        &mut self,
        op: impl FnOnce(&FilesGrant) -> Result<(), files::FilesError>,
    ) -> Result<(), String> {
        let Some(grant) = &self.ctx.files else {
            self.count("files", "denied");
            return Err(files::FilesError::NotGranted.to_string());
        };
        let r = op(grant);
        match &r {
            Ok(()) => self.count("files", "ok"),
            Err(files::FilesError::BadPath { .. }) => self.count("files", "denied"),
            Err(_) => self.count("files", "error"),
        }
        r.map_err(|e| e.to_string())
    }
}

impl wit::files::Host for HostState {
    fn append(&mut self, path: String, data: Vec<u8>) -> Result<(), String> {
        self.files_op(|g| g.append(&path, &data))
    }

    fn replace(&mut self, path: String, data: Vec<u8>) -> Result<(), String> {
        self.files_op(|g| g.replace(&path, &data))
    }
}
