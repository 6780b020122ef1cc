//! The plugin directory: `NAME.wasm` plus an optional operator sidecar
//! `NAME.toml`, loaded, replaced and unloaded while the gateway runs.
//!
//! Owns turning directory contents into [`PluginSpec`]s and keeping the
//! dispatcher in step: a new file loads, a changed one swaps (the old
//! version keeps serving if the new one is rejected), a removed one unloads.
//! The directory is watched with the same [`FileSource`] users watch
//! directories with, so there is one file-watching code path. Compiles run
//! concurrently on the runtime's bounded pool, each file's result applied
//! when its compile ends, so a plugin dropped in beside a slow one loads
//! without waiting for it; a newer file of the same plugin supersedes a
//! compile still under way. A rejected file is logged once with its reason
//! (cut to [`MAX_TEXT`](crate::text::MAX_TEXT): a compiler's or parser's
//! complaint may quote the file) and counted; the gateway keeps serving.
//! This module must not run plugin calls.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Sidecar};
use crate::dispatch::{Dispatcher, PluginSpec};
use crate::event::{ChannelSink, Event, EventKind, Subscription};
use crate::host::PluginContext;
use crate::host::commands::{CommandsGrant, Supervisor};
use crate::host::files::FilesGrant;
use crate::host::http::HttpGrant;
use crate::host::kv::KvWriter;
use crate::host::log::{LogSink, PluginLog};
use crate::host::snapshot::{SnapshotGrant, SnapshotReader};
use crate::host::state::PluginState;
use crate::runtime::instance::LoadedPlugin;
use crate::runtime::{CompileLimits, CompiledPlugin, LoadError, Runtime};
use crate::source::file::{FileSource, FileSourceConfig};
use crate::source::{Source, SourceContext, SourceStatus};
use crate::telemetry::{Metrics, PluginCounter};

mod status;
pub use status::{CompilingNow, LoaderStatus, Rejection};

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The name is not usable.
    #[error("plugin name {0:?} must be 1-64 characters of A-Z a-z 0-9 - _")]
    BadName(String),
    /// The sidecar is invalid.
    #[error("{0}")]
    Sidecar(#[from] ConfigError),
    /// The wasm file is not a usable plugin.
    #[error("{path}: {source}")]
    Wasm {
        /// The file.
        path: PathBuf,
        /// Why.
        source: LoadError,
    },
    /// The granted directory cannot be used.
    #[error("{path}: grants.files directory {dir:?} cannot be created: {source}")]
    Grant {
        /// The sidecar.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Whether `name` is a valid plugin name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Validate a sidecar and compile a plugin under the config's compile
/// limits; does not start it. Blocking: for callers outside an async
/// runtime (`watchgate check`).
///
/// # Errors
/// [`PluginError`] with the file and reason.
pub fn compile_plugin(
    runtime: &Arc<Runtime>,
    config: &Config,
    name: &str,
    wasm: &[u8],
    sidecar: Option<(&Path, &str)>,
) -> Result<(CompiledPlugin, Sidecar), PluginError> {
    if !valid_name(name) {
        return Err(PluginError::BadName(name.to_owned()));
    }
    let sidecar = match sidecar {
        Some((path, text)) => Sidecar::parse(path, text, config)?,
        None => Sidecar::default(),
    };
    let limits = CompileLimits::from(&config.runtime);
    let compiled = runtime
        .compile_blocking(Bytes::copy_from_slice(wasm), &limits)
        .map_err(|source| PluginError::Wasm {
            path: config.plugins.dir.join(format!("{name}.wasm")),
            source,
        })?;
    Ok((compiled, sidecar))
}

/// The subscriptions a plugin runs with: the sidecar's when it gives any
/// (the operator overrides), else the manifest's, which must name sources
/// of this gateway.
///
/// # Errors
/// A manifest subscription to a source the config does not have.
pub fn effective_subscriptions(
    config: &Config,
    sidecar: &Sidecar,
    compiled: &CompiledPlugin,
) -> Result<Vec<Subscription>, String> {
    if !sidecar.subscribe.is_empty() {
        return Ok(sidecar.subscribe.clone());
    }
    let Some(manifest) = &compiled.manifest else {
        return Ok(Vec::new());
    };
    for s in &manifest.subscribe {
        if !config.sources.iter().any(|c| c.name() == s.source) {
            return Err(format!(
                "its manifest subscribes to source {:?}, which this gateway does not have; \
                 give [[subscribe]] in its sidecar to choose sources",
                s.source
            ));
        }
    }
    Ok(manifest.subscribe.clone())
}

/// A reloaded configuration for the loader, and where to say that every
/// plugin has been re-evaluated against it.
pub type Reconfigure = (Arc<Config>, tokio::sync::oneshot::Sender<()>);

#[derive(Default)]
struct Files {
    wasm: Option<Bytes>,
    sidecar: Option<Bytes>,
}

/// A plugin's newest compile under way.
struct Compiling {
    ticket: u64,
    digest: String,
    task: AbortHandle,
}

/// A compile that ended.
struct Compiled {
    name: String,
    ticket: u64,
    result: Result<CompiledPlugin, LoadError>,
}

/// Keeps the dispatcher's plugins in step with the plugin directory.
pub struct PluginLoader {
    config: Arc<Config>,
    runtime: Arc<Runtime>,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    log_sink: Arc<dyn LogSink>,
    status: Arc<LoaderStatus>,
    files: HashMap<String, Files>,
    states: HashMap<String, Arc<PluginState>>,
    logs: HashMap<String, Arc<PluginLog>>,
    compiled: HashMap<String, CompiledPlugin>,
    compiling: HashMap<String, Compiling>,
    compiles: JoinSet<Compiled>,
    next_version: u64,
    next_ticket: u64,
    commands: Supervisor,
}

impl PluginLoader {
    /// A loader for `config.plugins.dir`.
    pub fn new(
        config: Arc<Config>,
        runtime: Arc<Runtime>,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        log_sink: Arc<dyn LogSink>,
    ) -> PluginLoader {
        PluginLoader {
            config,
            runtime,
            dispatcher,
            metrics,
            log_sink,
            status: Arc::default(),
            files: HashMap::new(),
            states: HashMap::new(),
            logs: HashMap::new(),
            compiled: HashMap::new(),
            compiling: HashMap::new(),
            compiles: JoinSet::new(),
            next_version: 1,
            next_ticket: 1,
            commands: Supervisor::default(),
        }
    }

    /// What reaches the granted commands of every plugin it loads, to stop
    /// them at shutdown.
    pub fn commands(&self) -> Supervisor {
        self.commands.clone()
    }

    /// The status handle (readiness, rejections).
    pub fn status(&self) -> Arc<LoaderStatus> {
        self.status.clone()
    }

    /// Watch the directory until `shutdown`, loading what appears, and
    /// re-evaluate every plugin when a reloaded config arrives on
    /// `configs`.
    ///
    /// # Errors
    /// When the directory cannot be created or watched.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        mut configs: mpsc::Receiver<Reconfigure>,
    ) -> anyhow::Result<()> {
        let dir = self.config.plugins.dir.clone();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watch_token = shutdown.child_token();
        let mut fc = FileSourceConfig::new("plugins", &dir);
        fc.max_value_bytes = 512 * 1024 * 1024;
        // Plugin files are expected to arrive by rename (atomically), so a short
        // settle time is enough; it bounds how soon a new plugin runs.
        fc.debounce_ms = 30;
        fc.rescan_interval_s = 30;
        let ctx = SourceContext::new(
            Arc::from("plugins"),
            Arc::new(ChannelSink(tx)),
            Arc::new(Metrics::new()),
            watch_token.clone(),
        );
        let dir_status: Arc<SourceStatus> = ctx.status.clone();
        let watcher = tokio::spawn(Box::new(FileSource::new(fc)).run(ctx));
        tracing::info!(dir = %dir.display(), "Watching the plugin directory.");
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                batch = rx.recv() => match batch {
                    Some(batch) => self.apply(batch).await,
                    None => break Err(anyhow::anyhow!("plugin directory watch ended")),
                },
                Some((config, done)) = configs.recv() => {
                    // A reload: re-evaluate every plugin against the new
                    // config; only those whose settings changed restart.
                    self.config = config;
                    let names: Vec<String> = self.files.keys().cloned().collect();
                    for name in names {
                        self.reload(&name).await;
                    }
                    let _ = done.send(());
                }
                Some(ended) = self.compiles.join_next(), if !self.compiles.is_empty() => {
                    match ended {
                        Ok(ended) => self.compiled(ended).await,
                        Err(e) if e.is_cancelled() => {}
                        Err(e) => self.compile_task_failed(&e),
                    }
                }
                _ = tick.tick() => {}
            }
            if !self.status.is_loaded()
                && dir_status.is_synced()
                && rx.is_empty()
                && !self.compiles_hold_readiness()
            {
                self.status.loaded.store(true, Ordering::SeqCst);
                tracing::info!(
                    plugins = ?self.dispatcher.plugin_names(),
                    rejected = self.status.rejected.lock().len(),
                    still_compiling = ?self.status.compiling.lock().keys().collect::<Vec<_>>(),
                    "Plugin directory loaded."
                );
            }
        };
        watch_token.cancel();
        match watcher.await {
            Ok(Ok(())) => result,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("plugin directory watcher panicked: {e}")),
        }
    }

    async fn apply(&mut self, batch: Vec<Event>) {
        let mut touched = BTreeSet::new();
        for e in batch {
            let (stem, is_wasm) = if let Some(s) = e.key.strip_suffix(".wasm") {
                (s, true)
            } else if let Some(s) = e.key.strip_suffix(".toml") {
                (s, false)
            } else {
                continue;
            };
            if stem.contains('/') {
                continue;
            }
            let files = self.files.entry(stem.to_owned()).or_default();
            let value = match e.kind {
                EventKind::Put => e.value,
                EventKind::Delete => None,
            };
            if is_wasm {
                files.wasm = value;
            } else {
                files.sidecar = value;
            }
            touched.insert(stem.to_owned());
        }
        for name in touched {
            self.reload(&name).await;
        }
    }

    /// Whether a compile of the directory's first contents has run for
    /// less than `compile_ready_wait`, so readiness still waits for it.
    fn compiles_hold_readiness(&self) -> bool {
        let wait = self.config.plugins.compile_ready_wait;
        self.status
            .compiling
            .lock()
            .values()
            .any(|since| since.elapsed() < wait)
    }

    fn reject(&self, name: &str, error: String) {
        self.metrics.count_plugin(PluginCounter::LoadFailure, name);
        let (error, truncated) = crate::text::clip_owned(error);
        if truncated {
            self.metrics
                .count_plugin(PluginCounter::TextTruncated, name);
        }
        let running = self.dispatcher.plugin_names().iter().any(|n| n == name);
        tracing::error!(
            plugin = %name,
            error = %error,
            still_running = running,
            "Plugin rejected; the gateway keeps serving{}.",
            if running { " with the previous version" } else { "" }
        );
        self.status.rejected.lock().insert(name.to_owned(), error);
    }

    /// Start compiling `wasm` as `name`'s newest file; a compile of an
    /// older file of it is abandoned.
    fn start_compile(&mut self, name: &str, wasm: Bytes, digest: String) {
        self.abandon(name);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let runtime = self.runtime.clone();
        let limits = CompileLimits::from(&self.config.runtime);
        let n = name.to_owned();
        let task = self.compiles.spawn(async move {
            let result = runtime.compile_bounded(wasm, &limits).await;
            Compiled {
                name: n,
                ticket,
                result,
            }
        });
        tracing::debug!(plugin = %name, digest = %&digest[..12], "Compiling plugin.");
        self.status
            .compiling
            .lock()
            .insert(name.to_owned(), Instant::now());
        self.compiling.insert(
            name.to_owned(),
            Compiling {
                ticket,
                digest,
                task,
            },
        );
    }

    /// Forget `name`'s compile under way. One still waiting for a slot
    /// leaves the queue; one compiling runs to its end and is dropped.
    fn abandon(&mut self, name: &str) {
        if let Some(c) = self.compiling.remove(name) {
            c.task.abort();
        }
        self.status.compiling.lock().remove(name);
    }

    /// A compile ended: apply it if it is of the plugin's newest file.
    async fn compiled(&mut self, ended: Compiled) {
        let Compiled {
            name,
            ticket,
            result,
        } = ended;
        if self.compiling.get(&name).is_none_or(|c| c.ticket != ticket) {
            return;
        }
        self.compiling.remove(&name);
        self.status.compiling.lock().remove(&name);
        match result {
            Ok(compiled) => {
                self.compiled.insert(name.clone(), compiled);
                self.reload(&name).await;
            }
            Err(source) => {
                if let Some(limit) = source.limit() {
                    self.metrics.compile_refused(&name, limit);
                }
                let e = PluginError::Wasm {
                    path: self.config.plugins.dir.join(format!("{name}.wasm")),
                    source,
                };
                self.reject(&name, e.to_string());
            }
        }
    }

    fn compile_task_failed(&mut self, e: &tokio::task::JoinError) {
        let name = self
            .compiling
            .iter()
            .find(|(_, c)| c.task.id() == e.id())
            .map(|(name, _)| name.clone());
        if let Some(name) = name {
            self.compiling.remove(&name);
            self.status.compiling.lock().remove(&name);
            self.reject(&name, format!("compiler task failed: {e}"));
        }
    }

    async fn reload(&mut self, name: &str) {
        let Some(files) = self.files.get(name) else {
            return;
        };
        let Some(wasm) = files.wasm.clone() else {
            // No code (deleted, or a sidecar that arrived first): unload,
            // keeping the sidecar for when the code arrives.
            if files.sidecar.is_none() {
                self.files.remove(name);
            }
            self.abandon(name);
            self.compiled.remove(name);
            self.status.rejected.lock().remove(name);
            let dispatcher = self.dispatcher.clone();
            let n = name.to_owned();
            if tokio::task::spawn_blocking(move || dispatcher.remove(&n))
                .await
                .unwrap_or(false)
            {
                tracing::info!(plugin = %name, "Plugin unloaded.");
            }
            return;
        };
        if !valid_name(name) {
            return self.reject(name, PluginError::BadName(name.to_owned()).to_string());
        }
        let sidecar_path = self.config.plugins.dir.join(format!("{name}.toml"));
        let sidecar = match &files.sidecar {
            None => Sidecar::default(),
            Some(b) => match std::str::from_utf8(b) {
                Ok(text) => match Sidecar::parse(&sidecar_path, text, &self.config) {
                    Ok(s) => s,
                    Err(e) => return self.reject(name, e.to_string()),
                },
                Err(_) => {
                    self.reject(name, format!("{}: not UTF-8 text", sidecar_path.display()));
                    return;
                }
            },
        };
        let digest = crate::runtime::digest(&wasm);
        let cached = self
            .compiled
            .get(name)
            .filter(|c| c.digest == digest)
            .cloned();
        let Some(compiled) = cached else {
            // New code. When it is already compiling, its end reloads with
            // the sidecar and config of that moment.
            if self.compiling.get(name).is_none_or(|c| c.digest != digest) {
                self.start_compile(name, wasm, digest);
            }
            return;
        };
        let limits = self.config.runtime.defaults.merged(sidecar.limits);
        if let Err(e) = compiled.footprint.fits_memory(limits.memory_mb) {
            self.metrics.compile_refused(name, "memory_mb");
            return self.reject(
                name,
                format!(
                    "{}: {e}",
                    self.config
                        .plugins
                        .dir
                        .join(format!("{name}.wasm"))
                        .display()
                ),
            );
        }
        let files_grant = match &sidecar.grants.files {
            None => None,
            // Making the grant measures what its directory holds.
            Some(dir) => match tokio::task::spawn_blocking({
                let (dir, quota) = (dir.clone(), limits.files_quota());
                move || FilesGrant::new(&dir, quota)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            {
                Ok(g) => {
                    let used = g.usage();
                    self.metrics.files_used(name, used.bytes, used.entries);
                    Some(g)
                }
                Err(source) => {
                    let e = PluginError::Grant {
                        path: self.config.plugins.dir.join(format!("{name}.toml")),
                        dir: dir.clone(),
                        source,
                    };
                    return self.reject(name, e.to_string());
                }
            },
        };
        let store = self.dispatcher.store().clone();
        let state = self
            .states
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(PluginState::durable(store, name)))
            .clone();
        let log = self
            .logs
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(PluginLog::new(
                    name,
                    self.config.runtime.log_lines_per_second,
                    self.log_sink.clone(),
                    self.metrics.clone(),
                ))
            })
            .clone();
        let subscriptions = match effective_subscriptions(&self.config, &sidecar, &compiled) {
            Ok(s) => s,
            Err(e) => return self.reject(name, e),
        };
        let http_grant = if sidecar.grants.http.is_empty() {
            None
        } else {
            match HttpGrant::new(
                &sidecar.grants.http,
                Some(tokio::runtime::Handle::current()),
            ) {
                Ok(g) => Some(g),
                Err(e) => return self.reject(name, format!("grants.http: {e}")),
            }
        };
        let queue_capacity = sidecar
            .queue_capacity
            .unwrap_or(self.config.plugins.queue_capacity);
        let batch_max = sidecar.batch_max.unwrap_or(self.config.plugins.batch_max);
        if let Some(running) = self.dispatcher.running(name)
            && running.loaded.compiled.digest == compiled.digest
            && running.loaded.limits == limits
            && running.subscriptions == subscriptions
            && running.queue_capacity == queue_capacity
            && running.retry == sidecar.retry(&self.config)
            && running.dead_letters == sidecar.dead_letters(&self.config)
            && running.start == sidecar.start
            && running.mode == sidecar.mode
            && running.batch_max == batch_max
            && running.loaded.ctx.files.as_ref().map(FilesGrant::root)
                == files_grant.as_ref().map(FilesGrant::root)
            && running.grants == sidecar.grants
            && running.loaded.ctx.settings == sidecar.settings_text()
        {
            // Nothing that matters changed: keep the running version.
            self.status.rejected.lock().remove(name);
            return;
        }
        let version = self.next_version;
        self.next_version += 1;
        let files_root = files_grant.as_ref().map(|g| g.root().to_owned());
        let digest = compiled.digest.clone();
        let spec = PluginSpec {
            loaded: LoadedPlugin {
                compiled,
                ctx: Arc::new(PluginContext {
                    files: files_grant,
                    http: http_grant,
                    kv: (!sidecar.grants.kv.is_empty()).then(|| {
                        KvWriter::new(
                            sidecar.grants.kv.clone(),
                            self.config.kv_targets(&sidecar.grants.kv),
                            Some(&tokio::runtime::Handle::current()),
                            name,
                            &self.metrics,
                        )
                    }),
                    snapshot: sidecar.grants.snapshot.then(|| {
                        let reader: Arc<dyn SnapshotReader> = self.dispatcher.clone();
                        SnapshotGrant::new(Arc::downgrade(&reader), subscriptions.clone())
                    }),
                    commands: CommandsGrant::new(
                        &sidecar.grants,
                        files_root.as_deref(),
                        log.clone(),
                        self.metrics.clone(),
                        self.config.gateway.shutdown_grace,
                        Some(&self.commands),
                    ),
                    settings: sidecar.settings_text(),
                    ..PluginContext::new(name, state, log, self.metrics.clone())
                }),
                version,
                limits,
            },
            grants: sidecar.grants.clone(),
            subscriptions,
            queue_capacity,
            retry: sidecar.retry(&self.config),
            dead_letters: sidecar.dead_letters(&self.config),
            start: sidecar.start,
            mode: sidecar.mode,
            batch_max,
        };
        let report = crate::manifest::CapabilityReport::new(
            spec.loaded.compiled.manifest.as_deref(),
            spec.loaded.ctx.granted(),
        );
        if !report.ungranted.is_empty() {
            tracing::warn!(
                plugin = %name,
                requested = ?report.requested,
                granted = ?report.granted,
                ungranted = ?report.ungranted,
                "Plugin asks for capabilities the operator did not grant; calls to them will fail. Grant them in its sidecar's [grants] if intended."
            );
        }
        let replacing = self.dispatcher.plugin_names().iter().any(|n| n == name);
        if let Err(e) = self.dispatcher.upsert(spec) {
            return self.reject(name, format!("cannot start worker thread: {e}"));
        }
        self.status.rejected.lock().remove(name);
        self.metrics.count_plugin(PluginCounter::Load, name);
        tracing::info!(
            plugin = %name,
            version,
            digest = %&digest[..12],
            "Plugin {}.",
            if replacing { "replaced" } else { "loaded" }
        );
    }
}
