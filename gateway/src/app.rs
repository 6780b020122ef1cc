//! Wiring: builds the pipeline from a [`Config`] and owns every task.
//!
//! Start-up runs in phases so that what can be checked early fails early:
//! engine, admin port, plugin directory, then sources. Every task is
//! spawned into one [`JoinSet`] owned here and every one is cancelled
//! through one [`CancellationToken`] tree; nothing is detached. Shutdown is
//! a signal, then a bounded drain. This module must not implement any
//! source, capability or route itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::{Config, SourceConfig};
use crate::dispatch::Dispatcher;
use crate::host::log::TracingSink;
use crate::plugin_dir::PluginLoader;
use crate::runtime::Runtime;
use crate::source::etcd::EtcdSource;
use crate::source::file::FileSource;
use crate::source::{Source, SourceContext};
use crate::telemetry::Metrics;

/// How long shutdown waits for tasks and plugin calls before giving up.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A start-up failure, by phase, so `main` can pick the exit code.
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
}

fn build_source(config: &SourceConfig) -> Box<dyn Source> {
    match config {
        SourceConfig::File(c) => Box::new(FileSource::new(c.clone())),
        SourceConfig::Etcd(c) => Box::new(EtcdSource::new(c.clone())),
    }
}

/// Run the gateway until `shutdown` is cancelled or a task fails.
///
/// # Errors
/// [`StartError`] (inside the `anyhow::Error`) for start-up failures, or the
/// failure of a source or of the plugin directory watch.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let metrics = Metrics::shared();
    let runtime = Runtime::new(&config.runtime).map_err(StartError::from)?;
    let listener = TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = listener.local_addr().context("admin listener address")?;
    tracing::info!(addr = %admin_addr, "Admin server listening.");

    let dispatcher = Dispatcher::new(
        runtime.clone(),
        metrics.clone(),
        config.sources.iter().map(|s| s.name().to_owned()),
    );
    let tasks_token = shutdown.child_token();
    let mut tasks: JoinSet<(String, anyhow::Result<()>)> = JoinSet::new();

    let contexts: Vec<(SourceContext, Box<dyn Source>)> = config
        .sources
        .iter()
        .map(|s| {
            let ctx = SourceContext::new(
                Arc::from(s.name()),
                dispatcher.clone(),
                metrics.clone(),
                tasks_token.child_token(),
            );
            (ctx, build_source(s))
        })
        .collect();

    let loader = PluginLoader::new(
        config.clone(),
        runtime.clone(),
        dispatcher.clone(),
        metrics.clone(),
        Arc::new(TracingSink),
    );
    let loader_status = loader.status();
    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        dispatcher: dispatcher.clone(),
        loader: loader_status.clone(),
        sources: contexts.iter().map(|(c, _)| c.status.clone()).collect(),
    });
    {
        let token = tasks_token.clone();
        tasks.spawn(async move {
            admin::serve(listener, admin_state, token).await;
            ("admin".to_owned(), Ok(()))
        });
    }
    {
        let token = tasks_token.clone();
        tasks.spawn(async move { ("plugin directory".to_owned(), loader.run(token).await) });
    }

    // Plugins first, so the sources' initial snapshots reach them directly.
    let outcome = loop {
        if loader_status.is_loaded() {
            break None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Some(Ok(())),
            done = tasks.join_next() => break Some(task_ended(done)),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let outcome = match outcome {
        Some(o) => o,
        None => {
            for (ctx, source) in contexts {
                let name = ctx.name.to_string();
                tracing::info!(source = %name, "Starting source.");
                tasks.spawn(async move {
                    let r = source.run(ctx).await;
                    (format!("source {name:?}"), r)
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => Ok(()),
                done = tasks.join_next() => task_ended(done),
            }
        }
    };

    tracing::info!("Shutting down.");
    tasks_token.cancel();
    let drain = async {
        while tasks.join_next().await.is_some() {}
        let d = dispatcher.clone();
        let _ = tokio::task::spawn_blocking(move || d.shutdown()).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "Shutdown grace period ran out; exiting anyway."
        );
        tasks.abort_all();
    }
    outcome
}

fn task_ended(
    done: Option<Result<(String, anyhow::Result<()>), tokio::task::JoinError>>,
) -> anyhow::Result<()> {
    match done {
        Some(Ok((name, Ok(())))) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
        Some(Ok((name, Err(e)))) => Err(e.context(format!("{name} failed"))),
        Some(Err(e)) => Err(anyhow::anyhow!("a task panicked: {e}")),
        None => Err(anyhow::anyhow!("no tasks left")),
    }
}
