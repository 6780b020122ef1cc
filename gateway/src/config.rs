//! The gateway configuration file and the per-plugin sidecar files.
//!
//! Owns the file format only: the top-level [`Config`] with its `[admin]`,
//! `[plugins]`, `[gateway]`, `[state]` and `[cluster]` tables, the
//! `[[source]]` list, and the [`Sidecar`]. The settings each layer acts on
//! are that layer's own types (a source's settings in its source file,
//! `[runtime]` and `[limits]` in `runtime`, `[grants]` in `host`, the
//! delivery policy in `dispatch`); this module imports them, fills them in
//! and checks them against each other. Every error names the file, the key
//! and the line. Relative paths are resolved here, against the directory of
//! the file that names them, so no other module ever sees a relative path.
//! This module must not start anything.
//!
//! Reading and assembling live in `parse`, the checks in `validate`, the
//! sidecar in `sidecar`.

mod parse;
mod sidecar;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::client::etcd::EtcdClientConfig;
use crate::dispatch::RetryPolicy;
use crate::host::kv::KvGrant;
use crate::runtime::RuntimeConfig;
use crate::source::consul::ConsulSourceConfig;
use crate::source::etcd::EtcdSourceConfig;
use crate::source::file::FileSourceConfig;
use crate::source::nacos::NacosSourceConfig;
use crate::source::nats::NatsSourceConfig;
use crate::source::zookeeper::ZookeeperSourceConfig;
use crate::store::DeadLetterCap;

pub use parse::resolve;
pub use sidecar::Sidecar;

/// A configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// The gateway configuration (`watchgate.toml`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    /// Admin HTTP server.
    pub admin: AdminConfig,
    /// Plugin directory and queue settings.
    pub plugins: PluginsConfig,
    /// Default and maximum limits for plugin calls.
    pub runtime: RuntimeConfig,
    /// Shutdown and readiness behaviour.
    pub gateway: GatewayConfig,
    /// The stores to watch.
    pub sources: Vec<SourceEntry>,
    /// Where cursors, the key index, plugin state and dead letters live.
    pub state: StateConfig,
    /// Several replicas sharing the plugins; `None`: this gateway runs
    /// alone.
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// How to connect to each etcd source that `grants` name, by source
    /// name: what the `kv` capability writes through.
    pub fn kv_targets(&self, grants: &[KvGrant]) -> HashMap<String, EtcdClientConfig> {
        self.sources
            .iter()
            .filter_map(|s| match &s.spec {
                SourceConfig::Etcd(c) if grants.iter().any(|g| g.source == c.name) => {
                    Some((c.name.clone(), c.client()))
                }
                _ => None,
            })
            .collect()
    }
}

/// `[cluster]`: replicas coordinated through etcd leases and transactions,
/// each plugin run by exactly one live replica.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The coordination etcd's endpoints (`http://` or `https://` URLs);
    /// may be the same etcd as a source.
    pub etcd: Vec<String>,
    /// This replica's id, unique in the cluster. Default: hostname-pid.
    #[serde(default = "default_replica_name")]
    pub name: String,
    /// The lease time to live: a replica that stops renewing is gone after
    /// it, and its plugins move. Default `"10s"`, at least `"2s"`.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Key prefix of the cluster's records in etcd. Default
    /// `"/watchgate/cluster/"`.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
}

fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "watchgate".to_owned());
    format!("{host}-{}", std::process::id())
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_cluster_prefix() -> String {
    "/watchgate/cluster/".to_owned()
}

/// `[state]`: the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// Directory of the state store (`state.redb`). Default `data` beside
    /// the config file. Created if missing.
    pub dir: PathBuf,
}

/// `[gateway]`: process-wide behaviour.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// How long shutdown may take: in-flight plugin calls finish or hit their
    /// deadline, watches are cancelled, then the process exits regardless.
    /// Default `"10s"`.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// When true, `/readyz` answers 503 while a source that finished its
    /// initial sync has lost its connection ("degraded"). Default false: a
    /// degraded source is reported, but the gateway stays ready, since it
    /// still serves the last known state.
    #[serde(default)]
    pub degraded_is_unready: bool,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            shutdown_grace: default_shutdown_grace(),
            degraded_is_unready: false,
        }
    }
}

/// What to do when a source cannot complete its initial sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartupPolicy {
    /// Exit with status 1 and the reason once `startup_timeout` passes.
    #[default]
    Fail,
    /// Keep running and retrying; `/readyz` reports not ready meanwhile.
    Degraded,
}

/// Keys every `[[source]]` accepts, whatever its kind.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceCommon {
    /// `"fail"` (default) or `"degraded"`.
    #[serde(default)]
    pub startup: StartupPolicy,
    /// How long the initial sync may take before `startup` applies.
    /// Default `"30s"`.
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
}

fn default_startup_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for SourceCommon {
    fn default() -> Self {
        SourceCommon {
            startup: StartupPolicy::Fail,
            startup_timeout: default_startup_timeout(),
        }
    }
}

/// One `[[source]]`: the keys common to every kind, and the kind's own.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEntry {
    /// Start-up behaviour.
    pub common: SourceCommon,
    /// The kind and its settings.
    pub spec: SourceConfig,
}

impl SourceEntry {
    /// The source's name.
    pub fn name(&self) -> &str {
        self.spec.name()
    }
}

/// `[admin]`: the HTTP server for health, metrics and the JSON API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on. Default `127.0.0.1:9464`. Port 0 picks a free
    /// port (the chosen address is logged).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token for mutating endpoints (`POST /v1/reload`). The
    /// environment variable `WATCHGATE_ADMIN_TOKEN` takes precedence. Without
    /// either, mutating endpoints are disabled.
    pub token: Option<String>,
    /// Show values (and only then) in the live tail of the console and
    /// `/v1/events/stream`. Default false: keys, kinds and revisions only.
    /// Allowed only on a loopback `listen`, so values never leave the host.
    #[serde(default)]
    pub reveal_values: bool,
}

impl AdminConfig {
    /// The effective admin token: the environment, then the file.
    pub fn effective_token(&self) -> Option<String> {
        std::env::var("WATCHGATE_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| self.token.clone().filter(|t| !t.is_empty()))
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
            reveal_values: false,
        }
    }
}

/// `[plugins]`: where plugins come from and how much may queue for each.
#[derive(Debug, Clone)]
pub struct PluginsConfig {
    /// Directory watched for `NAME.wasm` and `NAME.toml`. Default
    /// `plugins.d` beside the config file.
    pub dir: PathBuf,
    /// Events queued per plugin before changes of the same key are folded
    /// together. Default 1024.
    pub queue_capacity: usize,
    /// Failed calls: `retry_attempts` calls per event (default 3), waiting
    /// `retry_backoff` (default `"100ms"`, doubling, at most 5 s) between
    /// them; then the event becomes a dead letter. `quarantine_after`
    /// (default 5) traps in a row quarantine the plugin, probed again after
    /// `quarantine_probe` (default `"1s"`, doubling, at most 5 min).
    pub retry: RetryPolicy,
    /// Most events handed to a plugin in one `handle-batch` call when its
    /// queue has a backlog. Default 64; 1 calls `handle` once per event.
    pub batch_max: usize,
    /// Dead letters kept per plugin: `max_dead_letters` (default 1000)
    /// and `max_dead_letter_bytes` as stored (default 16 MiB); past either,
    /// the oldest are dropped and counted.
    pub dead_letters: DeadLetterCap,
    /// How long readiness waits for the compiles of the plugin directory's
    /// first contents. Compiled code from the cache starts in milliseconds;
    /// a compile still running after this (a new Python or JavaScript
    /// plugin takes tens of seconds) is listed under `compiling` in
    /// `/readyz` and does not hold readiness: its plugin starts when the
    /// compile ends, from its cursor or per its `start` setting. Default
    /// `"5s"`.
    pub compile_ready_wait: Duration,
}

/// One `[[source]]`.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// `kind = "file"`.
    File(FileSourceConfig),
    /// `kind = "etcd"`.
    Etcd(EtcdSourceConfig),
    /// `kind = "consul"`.
    Consul(ConsulSourceConfig),
    /// `kind = "nacos"`.
    Nacos(NacosSourceConfig),
    /// `kind = "nats"`.
    Nats(NatsSourceConfig),
    /// `kind = "zookeeper"`.
    Zookeeper(ZookeeperSourceConfig),
}

impl SourceConfig {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::File(c) => &c.name,
            SourceConfig::Etcd(c) => &c.name,
            SourceConfig::Consul(c) => &c.name,
            SourceConfig::Nacos(c) => &c.name,
            SourceConfig::Nats(c) => &c.name,
            SourceConfig::Zookeeper(c) => &c.name,
        }
    }

    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::File(_) => "file",
            SourceConfig::Etcd(_) => "etcd",
            SourceConfig::Consul(_) => "consul",
            SourceConfig::Nacos(_) => "nacos",
            SourceConfig::Nats(_) => "nats",
            SourceConfig::Zookeeper(_) => "zookeeper",
        }
    }

    /// Whether the store keeps a revision history a watch can resume in
    /// (etcd, NATS key-value); other sources relist after a gap.
    pub fn has_history(&self) -> bool {
        self.history_identity().is_some()
    }

    /// For a source with a revision history: what its positions are
    /// positions *of*. A watch resumes from stored cursors only while this
    /// is unchanged; a different prefix must be relisted.
    pub fn history_identity(&self) -> Option<String> {
        match self {
            SourceConfig::Etcd(c) => Some(format!("etcd prefix={:?}", c.prefix)),
            // A recreated bucket keeps this identity; the source notices
            // it from the stream itself (J3).
            SourceConfig::Nats(c) => {
                Some(format!("nats bucket={:?} prefix={:?}", c.bucket, c.prefix))
            }
            _ => None,
        }
    }
}
