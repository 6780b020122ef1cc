//! Wiring: builds the pipeline from a [`Config`] and owns every task.
//!
//! Start-up runs in phases so that what can be checked early fails early:
//! engine and admin port, then the plugin directory (any rejected plugin is
//! a start-up error), then sources, each with its start-up policy. Every
//! task is spawned into one [`JoinSet`] owned here and cancelled through one
//! [`CancellationToken`] tree; nothing is detached. A reload (SIGHUP or
//! `POST /v1/reload`) diffs the new config against the running one and
//! restarts only what changed. Shutdown is a signal, then a drain bounded by
//! `shutdown_grace`. This module must not implement any source, capability
//! or route itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminSettings, AdminState, ReloadRequest};
use crate::backoff::Backoff;
use crate::cluster::{Cluster, ClusterReport};
use crate::config::{Config, SourceConfig, SourceEntry, StartupPolicy};
use crate::dispatch::Dispatcher;
use crate::host::log::TracingSink;
use crate::plugin_dir::PluginLoader;
use crate::runtime::Runtime;
use crate::source::consul::ConsulSource;
use crate::source::etcd::EtcdSource;
use crate::source::file::FileSource;
use crate::source::nacos::NacosSource;
use crate::source::nats::NatsSource;
use crate::source::zookeeper::ZookeeperSource;
use crate::source::{Source, SourceContext, SourceStatus};
use crate::store::Store;
use crate::telemetry::{Metrics, RepeatLog};

/// A start-up failure found before any source connects; `main` exits 2.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The engine could not be built (a configuration problem).
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    /// The admin address cannot be bound.
    #[error("cannot listen on admin address {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The plugin directory is missing.
    #[error("plugin directory {0} does not exist (create it, or fix [plugins] dir in the config)")]
    PluginDir(String),
    /// Plugins in the directory were rejected.
    #[error("{} plugin(s) rejected at start: {}", .0.len(), .0.join("; "))]
    Plugins(Vec<String>),
    /// The state store cannot be opened.
    #[error(transparent)]
    State(#[from] crate::store::StoreError),
}

fn build_source(config: &SourceConfig) -> Box<dyn Source> {
    match config {
        SourceConfig::File(c) => Box::new(FileSource::new(c.clone())),
        SourceConfig::Etcd(c) => Box::new(EtcdSource::new(c.clone())),
        SourceConfig::Consul(c) => Box::new(ConsulSource::new(c.clone())),
        SourceConfig::Nacos(c) => Box::new(NacosSource::new(c.clone())),
        SourceConfig::Nats(c) => Box::new(NatsSource::new(c.clone())),
        SourceConfig::Zookeeper(c) => Box::new(ZookeeperSource::new(c.clone())),
    }
}

/// Run one source, restarting it after a failure unless `fatal_before_sync`
/// (a source started with the process under `startup = "fail"`) and it has
/// not synced yet. A source added by a reload never takes the running
/// gateway down: it keeps retrying and reports its error.
async fn supervise(
    entry: SourceEntry,
    ctx: SourceContext,
    fatal_before_sync: bool,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut errors = RepeatLog::new(Duration::from_secs(60));
    loop {
        let started = Instant::now();
        let result = build_source(&entry.spec).run(ctx.clone()).await;
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        let error = match result {
            Ok(()) => anyhow::anyhow!("the source stopped by itself"),
            Err(e) => e,
        };
        let reason = format!("{error:#}");
        ctx.status.set_connected(false);
        ctx.status.set_error(reason.clone());
        if fatal_before_sync && !ctx.status.is_synced() {
            return Err(error);
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match errors.should_log(&reason) {
            Some(repeated) => tracing::warn!(
                source = %ctx.name,
                error = %reason,
                retry_in_ms = delay.as_millis() as u64,
                repeated,
                "Source failed; restarting it."
            ),
            None => ctx.status.log_suppressed(),
        }
        ctx.status.reconnecting();
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A running source.
struct Running {
    entry: SourceEntry,
    status: Arc<SourceStatus>,
    token: CancellationToken,
    generation: u64,
    /// Started with the process (its start-up policy applies), rather than
    /// added by a reload.
    at_boot: bool,
}

/// What finished in the task set.
enum Task {
    Admin,
    Loader,
    Source { name: String, generation: u64 },
    SignalListener,
    Cluster,
}

/// What a reload changed, as `POST /v1/reload` answers it.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    /// Sources started by this reload.
    pub sources_added: Vec<String>,
    /// Sources stopped by this reload.
    pub sources_removed: Vec<String>,
    /// Sources whose settings changed, restarted.
    pub sources_restarted: Vec<String>,
    /// Settings that changed but take effect only after a restart.
    pub requires_restart: Vec<String>,
}

struct App {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    dispatcher: Arc<Dispatcher>,
    admin: Arc<AdminState>,
    loader_configs: mpsc::Sender<crate::plugin_dir::Reconfigure>,
    tasks: JoinSet<(Task, anyhow::Result<()>)>,
    tasks_token: CancellationToken,
    sources: BTreeMap<String, Running>,
    generation: u64,
}

impl App {
    fn start_source(&mut self, entry: SourceEntry, at_boot: bool) {
        let name = entry.name().to_owned();
        self.dispatcher.add_source(&name, entry.spec.has_history());
        let token = self.tasks_token.child_token();
        let mut ctx = SourceContext::new(
            Arc::from(name.as_str()),
            self.dispatcher.clone(),
            self.metrics.clone(),
            token.clone(),
        );
        ctx.status.set_kind(entry.spec.kind());
        ctx.resume = entry
            .spec
            .history_identity()
            .and_then(|identity| self.dispatcher.resume_position(&name, &identity));
        if !entry.spec.has_history() {
            ctx.revision_base = self.dispatcher.last_position(&name);
        }
        if let Some(revision) = ctx.resume {
            tracing::info!(source = %name, after = revision, "Resuming the watch from the plugins' cursors.");
        }
        self.generation += 1;
        let generation = self.generation;
        let running = Running {
            entry: entry.clone(),
            status: ctx.status.clone(),
            token,
            generation,
            at_boot,
        };
        tracing::info!(source = %name, "Starting source.");
        let task_name = name.clone();
        let fatal_before_sync = at_boot && entry.common.startup == StartupPolicy::Fail;
        self.tasks.spawn(async move {
            let r = supervise(entry, ctx, fatal_before_sync).await;
            (
                Task::Source {
                    name: task_name,
                    generation,
                },
                r,
            )
        });
        self.sources.insert(name, running);
        self.publish_sources();
    }

    /// Restart sources so they replay from the plugins' cursors (a plugin
    /// taken over in the cluster resumes from its previous owner's cursor).
    async fn replay(&mut self, sources: Vec<String>) {
        for name in sources {
            let Some(entry) = self.sources.get(&name).map(|r| r.entry.clone()) else {
                continue;
            };
            tracing::info!(source = %name, "Restarting source to replay from a handed-over cursor.");
            self.stop_source(&name).await;
            self.start_source(entry, false);
        }
    }

    /// Stop a source and wait (bounded) for its task to return.
    async fn stop_source(&mut self, name: &str) {
        let Some(running) = self.sources.remove(name) else {
            return;
        };
        running.token.cancel();
        running.status.set_connected(false);
        // Its task ends on its own; the join loop ignores stale
        // generations. Wait until it has, so the restarted source never
        // runs beside it.
        let deadline = Instant::now() + self.config.gateway.shutdown_grace;
        let mut others = Vec::new();
        while Instant::now() < deadline {
            let left = deadline - Instant::now();
            match tokio::time::timeout(left, self.tasks.join_next()).await {
                Ok(Some(Ok((Task::Source { generation, .. }, _))))
                    if generation == running.generation =>
                {
                    break;
                }
                Ok(Some(Ok(other))) => others.push(other),
                Ok(Some(Err(e))) => tracing::error!(error = %e, "A task panicked."),
                Ok(None) | Err(_) => break,
            }
        }
        // Anything else that ended meanwhile is handled by the main loop.
        for (task, result) in others {
            self.tasks.spawn(async move { (task, result) });
        }
        self.publish_sources();
    }

    fn publish_sources(&self) {
        *self.admin.sources.write() = self.sources.values().map(|r| r.status.clone()).collect();
    }

    /// The first fail-policy source whose initial sync stalled: no
    /// connection, and no page of the listing, for `startup_timeout`. The
    /// deadline is on progress, not on the total: a large store that keeps
    /// answering takes as long as it takes.
    fn startup_overdue(&self) -> Option<anyhow::Error> {
        self.sources.values().find_map(|r| {
            let timeout = r.entry.common.startup_timeout;
            let overdue = r.at_boot
                && r.entry.common.startup == StartupPolicy::Fail
                && !r.status.is_synced()
                && r.status.idle_for() >= timeout;
            overdue.then(|| anyhow::anyhow!("{}", r.status.stalled_sync(timeout)))
        })
    }

    /// Apply a new configuration read from the same file.
    async fn reload(&mut self) -> Result<ReloadReport, String> {
        let new = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        let old = self.config.clone();
        let mut report = ReloadReport::default();
        if new.admin.listen != old.admin.listen {
            report.requires_restart.push("admin.listen".into());
        }
        if new.plugins.dir != old.plugins.dir {
            report.requires_restart.push("plugins.dir".into());
        }
        if new.state.dir != old.state.dir {
            report.requires_restart.push("state.dir".into());
        }
        if new.cluster != old.cluster {
            report.requires_restart.push("cluster".into());
        }
        let (o, n) = (&old.runtime, &new.runtime);
        if (
            o.max_memory_mb,
            o.max_timeout_ms,
            o.max_wasm_stack_kb,
            o.max_instances,
            o.compile_concurrency,
        ) != (
            n.max_memory_mb,
            n.max_timeout_ms,
            n.max_wasm_stack_kb,
            n.max_instances,
            n.compile_concurrency,
        ) {
            report.requires_restart.push(
                "runtime (max_memory_mb, max_timeout_ms, max_wasm_stack_kb, max_instances, compile_concurrency)".into(),
            );
        }
        // Keep what cannot change live as it runs, so the running engine and
        // listener stay consistent with the config the loader sees.
        let mut effective = new.clone();
        effective.admin.listen = old.admin.listen;
        effective.plugins.dir = old.plugins.dir.clone();
        effective.state.dir = old.state.dir.clone();
        effective.cluster = old.cluster.clone();
        effective.runtime.max_memory_mb = o.max_memory_mb;
        effective.runtime.max_timeout_ms = o.max_timeout_ms;
        effective.runtime.max_wasm_stack_kb = o.max_wasm_stack_kb;
        effective.runtime.max_instances = o.max_instances;
        effective.runtime.compile_concurrency = o.compile_concurrency;
        if effective.runtime.defaults.memory_mb > o.max_memory_mb
            || effective.runtime.defaults.timeout_ms > o.max_timeout_ms
        {
            return Err(
                "runtime.defaults exceed the running runtime ceilings; restart to raise them"
                    .into(),
            );
        }
        let effective = Arc::new(effective);

        let wanted: BTreeMap<&str, &SourceEntry> =
            effective.sources.iter().map(|s| (s.name(), s)).collect();
        let running: Vec<String> = self.sources.keys().cloned().collect();
        for name in running {
            match wanted.get(name.as_str()) {
                None => {
                    let revision = self.sources[&name].status.report().revision;
                    self.stop_source(&name).await;
                    self.dispatcher.retire_source(&name, revision);
                    report.sources_removed.push(name);
                }
                Some(entry) if **entry != self.sources[&name].entry => {
                    self.stop_source(&name).await;
                    self.start_source((*entry).clone(), false);
                    report.sources_restarted.push(name);
                }
                Some(_) => {}
            }
        }
        for (name, entry) in &wanted {
            if !self.sources.contains_key(*name) {
                self.start_source((*entry).clone(), false);
                report.sources_added.push((*name).to_owned());
            }
        }
        *self.admin.settings.write() = AdminSettings {
            token: effective.admin.effective_token(),
            degraded_is_unready: effective.gateway.degraded_is_unready,
            reveal_values: effective.admin.reveal_values,
        };
        self.config = effective.clone();
        // Plugins are re-evaluated against the new config by the loader;
        // only those whose effective settings changed get a new version.
        // The reply waits for that, so a reload that returned is in effect.
        let (done, applied) = tokio::sync::oneshot::channel();
        if self.loader_configs.send((effective, done)).await.is_ok()
            && tokio::time::timeout(Duration::from_secs(60), applied)
                .await
                .is_err()
        {
            tracing::warn!(
                "Plugins are still being re-evaluated after 60 s; the reload reply does not wait longer."
            );
        }
        tracing::info!(
            added = ?report.sources_added,
            removed = ?report.sources_removed,
            restarted = ?report.sources_restarted,
            requires_restart = ?report.requires_restart,
            "Configuration reloaded."
        );
        Ok(report)
    }

    async fn handle_reload(&mut self, reply: Option<ReloadRequest>) {
        let result = self.reload().await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "Reload refused; the running configuration stays.");
        }
        if let Some(reply) = reply {
            let _ = reply
                .send(result.map(|r| serde_json::to_value(r).unwrap_or(serde_json::Value::Null)));
        }
    }
}

/// Run the gateway until `shutdown` is cancelled or a task fails.
///
/// # Errors
/// [`StartError`] (inside the `anyhow::Error`) for failures before sources
/// start; otherwise the failure of a source (start-up policy `fail`) or of
/// the plugin directory watch.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Metrics::shared();
    let cache = config
        .runtime
        .compile_cache
        .then(|| std::path::absolute(config.state.dir.join("compiled")))
        .transpose()
        .and_then(|dir| {
            if let Some(d) = &dir {
                std::fs::create_dir_all(d)?;
            }
            Ok(dir)
        })
        .map_err(|source| {
            StartError::State(crate::store::StoreError::Dir {
                path: config.state.dir.join("compiled"),
                source,
            })
        })?;
    let runtime =
        Runtime::with_cache(&config.runtime, cache.as_deref()).map_err(StartError::from)?;
    runtime.count_compiles_in(metrics.compiles_running.clone());
    if !config.plugins.dir.is_dir() {
        return Err(StartError::PluginDir(config.plugins.dir.display().to_string()).into());
    }
    let listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = listener.local_addr().context("admin listener address")?;
    tracing::info!(addr = %admin_addr, "Admin server listening.");

    let store = Arc::new(Store::open(&config.state.dir).map_err(StartError::from)?);
    tracing::info!(path = %config.state.dir.join(crate::store::FILE_NAME).display(), "State store open.");
    let dispatcher = Dispatcher::new(
        runtime.clone(),
        metrics.clone(),
        store.clone(),
        config
            .sources
            .iter()
            .map(|s| (s.name().to_owned(), s.spec.has_history())),
    );
    let tasks_token = shutdown.child_token();
    let mut tasks: JoinSet<(Task, anyhow::Result<()>)> = JoinSet::new();
    // In a cluster, plugins of one owner run only where claimed.
    dispatcher.set_clustered(config.cluster.is_some());
    let cluster_report = config
        .cluster
        .as_ref()
        .map(|_| Arc::new(parking_lot::RwLock::new(ClusterReport::default())));
    let (replay_tx, mut replay_rx) = mpsc::unbounded_channel::<Vec<String>>();
    if let (Some(c), Some(report)) = (&config.cluster, &cluster_report) {
        let cluster = Cluster::new(
            c.clone(),
            dispatcher.clone(),
            metrics.clone(),
            report.clone(),
            replay_tx,
        );
        let token = tasks_token.clone();
        tasks.spawn(async move { (Task::Cluster, cluster.run(token).await) });
    } else {
        drop(replay_tx);
    }

    let loader = PluginLoader::new(
        config.clone(),
        runtime.clone(),
        dispatcher.clone(),
        metrics.clone(),
        Arc::new(TracingSink),
    );
    let loader_status = loader.status();
    let commands = loader.commands();
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        dispatcher: dispatcher.clone(),
        loader: loader_status.clone(),
        sources: Default::default(),
        settings: parking_lot::RwLock::new(AdminSettings {
            token: config.admin.effective_token(),
            degraded_is_unready: config.gateway.degraded_is_unready,
            reveal_values: config.admin.reveal_values,
        }),
        reload: reload_tx,
        cluster: cluster_report.clone(),
        starting: std::sync::atomic::AtomicBool::new(true),
        streams: Default::default(),
    });
    {
        let (token, state) = (tasks_token.clone(), admin_state.clone());
        tasks.spawn(async move {
            admin::serve(listener, state, token).await;
            (Task::Admin, Ok(()))
        });
    }
    let (loader_configs, loader_rx) = mpsc::channel(4);
    {
        let token = tasks_token.clone();
        tasks.spawn(async move { (Task::Loader, loader.run(token, loader_rx).await) });
    }
    // SIGHUP asks for a reload, like POST /v1/reload.
    let (hup_tx, mut hup_rx) = mpsc::channel::<()>(1);
    {
        let token = tasks_token.clone();
        tasks.spawn(async move {
            let result = async {
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .context("cannot listen for SIGHUP")?;
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return Ok(()),
                        _ = hup.recv() => { let _ = hup_tx.try_send(()); }
                    }
                }
            }
            .await;
            (Task::SignalListener, result)
        });
    }

    let mut app = App {
        config: config.clone(),
        metrics,
        dispatcher: dispatcher.clone(),
        admin: admin_state,
        loader_configs,
        tasks,
        tasks_token: tasks_token.clone(),
        sources: BTreeMap::new(),
        generation: 0,
    };

    // Phase 2: plugins, so the sources' initial snapshots reach them directly.
    let outcome = loop {
        if loader_status.is_loaded() {
            let rejected = loader_status.rejected();
            if rejected.is_empty() {
                break None;
            }
            let reasons = rejected
                .into_iter()
                .map(|r| format!("{}: {}", r.name, r.error))
                .collect();
            break Some(Err(StartError::Plugins(reasons).into()));
        }
        tokio::select! {
            // Shutdown first: tasks that watch the same token (the admin
            // server) end with it, and that is no failure.
            biased;
            _ = shutdown.cancelled() => break Some(Ok(())),
            done = app.tasks.join_next() => {
                if shutdown.is_cancelled() {
                    break Some(Ok(()));
                }
                break Some(task_ended(done));
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };

    // Phase 3: sources, then serve until told to stop.
    let outcome = match outcome {
        Some(o) => o,
        None => {
            for entry in config.sources.iter().cloned() {
                app.start_source(entry, true);
            }
            app.admin
                .starting
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    // Shutdown first: tasks that watch the same token (the
                    // admin server, the cluster membership) end with it, and
                    // that is no failure. Without this, a task that ended on
                    // the signal could win the race and fail the exit.
                    biased;
                    _ = shutdown.cancelled() => break Ok(()),
                    done = app.tasks.join_next() => {
                        if shutdown.is_cancelled() {
                            break Ok(());
                        }
                        match done {
                            Some(Ok((Task::Source { name, generation }, result)))
                                if app.sources.get(&name).is_none_or(|r| r.generation != generation) =>
                            {
                                // A source stopped by a reload.
                                if let Err(e) = result {
                                    tracing::debug!(source = %name, error = %e, "Replaced source ended with an error.");
                                }
                            }
                            Some(Ok((Task::SignalListener, Err(e)))) => {
                                tracing::warn!(error = %e, "Reload on SIGHUP is unavailable.");
                            }
                            Some(Ok((Task::SignalListener, Ok(())))) => {}
                            other => break task_ended(other),
                        }
                    }
                    Some(reply) = reload_rx.recv() => app.handle_reload(Some(reply)).await,
                    Some(sources) = replay_rx.recv() => app.replay(sources).await,
                    Some(()) = hup_rx.recv() => {
                        tracing::info!("SIGHUP received; reloading the configuration.");
                        app.handle_reload(None).await;
                    }
                    _ = tick.tick() => {
                        if let Some(e) = app.startup_overdue() {
                            break Err(e);
                        }
                    }
                }
            }
        }
    };

    let grace = app.config.gateway.shutdown_grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "Shutting down.");
    // Granted commands still running when the grace is nearly over are
    // killed, process group and all, leaving a moment to reap them.
    let grace_end = Instant::now() + grace;
    commands.stop_all(grace_end - (grace / 10).min(Duration::from_millis(500)));
    tasks_token.cancel();
    let mut tasks = std::mem::take(&mut app.tasks);
    let drain = async {
        while tasks.join_next().await.is_some() {}
        // In-flight plugin calls finish or hit their deadline; queued events
        // stay behind the cursors and are delivered after a restart.
        let d = dispatcher.clone();
        let _ = tokio::task::spawn_blocking(move || d.shutdown()).await;
        let c = commands.clone();
        let _ = tokio::task::spawn_blocking(move || c.wait_idle(grace_end)).await;
    };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "Shutdown grace period ran out; exiting anyway."
        );
    }
    // Commit what the writer holds; cursors never run ahead of delivery, so
    // whatever is cut short here is delivered again after a restart.
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    outcome
}

fn task_ended(
    done: Option<Result<(Task, anyhow::Result<()>), tokio::task::JoinError>>,
) -> anyhow::Result<()> {
    let label = |t: &Task| match t {
        Task::Admin => "the admin server".to_owned(),
        Task::Loader => "the plugin directory watch".to_owned(),
        Task::Source { name, .. } => format!("source {name:?}"),
        Task::SignalListener => "the signal listener".to_owned(),
        Task::Cluster => "the cluster membership".to_owned(),
    };
    match done {
        Some(Ok((task, Ok(())))) => Err(anyhow::anyhow!("{} stopped unexpectedly", label(&task))),
        Some(Ok((task, Err(e)))) => Err(e.context(format!("{} failed", label(&task)))),
        Some(Err(e)) => Err(anyhow::anyhow!("a task panicked: {e}")),
        None => Err(anyhow::anyhow!("no tasks left")),
    }
}
