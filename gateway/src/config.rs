//! The gateway configuration file and the per-plugin sidecar files.
//!
//! Owns parsing (TOML, unknown keys rejected), defaults and validation.
//! Every error names the file, the key and the line. Relative paths are
//! resolved here, against the directory of the file that names them, so no
//! other module ever sees a relative path. This module must not start
//! anything.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::client::etcd::{EtcdClientConfig, EtcdTlsConfig};
use crate::dispatch::{PluginMode, RetryPolicy, StartPosition};
use crate::event::Subscription;
use crate::host::Grants;
use crate::host::kv::KvGrant;
use crate::runtime::{PartialLimits, RuntimeConfig};
use crate::source::consul::ConsulSourceConfig;
use crate::source::etcd::EtcdSourceConfig;
use crate::source::file::FileSourceConfig;
use crate::source::nacos::NacosSourceConfig;

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

impl ConfigError {
    fn parse(path: &Path, text: &str, span: Option<Range<usize>>, message: String) -> Self {
        let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    }
}

/// The key an "unknown field `x`" or "missing field `x`" message names.
fn offending_key(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("invalid type"))?;
    rest.split('`')
        .next()
        .filter(|k| !k.is_empty() && !k.contains(' '))
}

/// Byte offset of `key = ` in the table starting at `span` (up to the next
/// table header).
fn key_offset(text: &str, span: Range<usize>, key: &str) -> Option<usize> {
    let rest = text.get(span.start..)?;
    let body_start = rest.find('\n').map_or(rest.len(), |i| i + 1);
    let end = rest[body_start..]
        .find("\n[")
        .map_or(rest.len(), |i| body_start + i + 1);
    let region = &rest[..end];
    let mut offset = 0;
    for line in region.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(span.start + offset + (line.len() - trimmed.len()));
        }
        offset += line.len();
    }
    None
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStateConfig {
    dir: Option<PathBuf>,
}

/// The failure-policy settings a config section may set.
#[derive(Debug, Clone, Copy, Default)]
struct PolicyOverrides {
    attempts: Option<u32>,
    backoff: Option<Duration>,
    quarantine_after: Option<u32>,
    probe_backoff: Option<Duration>,
}

impl PolicyOverrides {
    /// `base` with the settings this section gives replaced.
    fn over(self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            attempts: self.attempts.unwrap_or(base.attempts),
            backoff: self.backoff.unwrap_or(base.backoff),
            max_backoff: base.max_backoff,
            quarantine_after: self.quarantine_after.unwrap_or(base.quarantine_after),
            probe_backoff: self.probe_backoff.unwrap_or(base.probe_backoff),
        }
    }
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    plugins: RawPluginsConfig,
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default)]
    gateway: GatewayConfig,
    #[serde(default)]
    state: RawStateConfig,
    cluster: Option<ClusterConfig>,
    #[serde(default)]
    source: Vec<toml::Spanned<toml::Table>>,
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
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPluginsConfig {
    dir: Option<PathBuf>,
    queue_capacity: Option<usize>,
    retry_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    retry_backoff: Option<Duration>,
    batch_max: Option<usize>,
    quarantine_after: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    quarantine_probe: Option<Duration>,
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
}

impl SourceConfig {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::File(c) => &c.name,
            SourceConfig::Etcd(c) => &c.name,
            SourceConfig::Consul(c) => &c.name,
            SourceConfig::Nacos(c) => &c.name,
        }
    }

    /// Whether the store keeps a revision history a watch can resume in
    /// (etcd); other sources relist after a gap.
    pub fn has_history(&self) -> bool {
        self.history_identity().is_some()
    }

    /// For a source with a revision history: what its positions are
    /// positions *of*. A watch resumes from stored cursors only while this
    /// is unchanged; a different prefix must be relisted.
    pub fn history_identity(&self) -> Option<String> {
        match self {
            SourceConfig::Etcd(c) => Some(format!("etcd prefix={:?}", c.prefix)),
            _ => None,
        }
    }
}

fn parse_toml<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::parse(path, text, e.span(), e.message().trim().to_owned()))
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// `p` made absolute against `base` (and `base` against the working
/// directory), with `.` and `..` folded lexically so logs show plain paths.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    };
    let absolute = std::path::absolute(&joined).unwrap_or(joined);
    let mut clean = PathBuf::new();
    for c in absolute.components() {
        match c {
            std::path::Component::ParentDir => {
                clean.pop();
            }
            std::path::Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

impl Config {
    /// Read and validate a gateway config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and key of the first problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validate config text as if read from `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and key of the first problem.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = parse_toml(path, text)?;
        let base = base_dir(path);
        let mut names = HashSet::new();
        let mut sources = Vec::new();
        for (i, spanned) in raw.source.iter().enumerate() {
            let span = spanned.span();
            let mut table = spanned.get_ref().clone();
            let mut common_table = toml::Table::new();
            for key in ["startup", "startup_timeout"] {
                if let Some(v) = table.remove(key) {
                    common_table.insert(key.to_owned(), v);
                }
            }
            let err = |msg: String| {
                let at = offending_key(&msg)
                    .and_then(|k| key_offset(text, span.clone(), k))
                    .map_or(span.clone(), |o| o..o);
                ConfigError::parse(path, text, Some(at), format!("source[{i}]: {msg}"))
            };
            let kind = match table.get("kind") {
                Some(toml::Value::String(k)) => k.as_str(),
                Some(_) => return Err(err("`kind` must be a string".into())),
                None => {
                    return Err(err(
                        "missing key `kind` (one of: \"file\", \"etcd\", \"consul\", \"nacos\")"
                            .into(),
                    ));
                }
            };
            let source = match kind {
                "file" => {
                    let mut c: FileSourceConfig = table
                        .try_into()
                        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
                    c.path = resolve(&base, &c.path);
                    SourceConfig::File(c)
                }
                "etcd" => {
                    let mut c: EtcdSourceConfig = table
                        .try_into()
                        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
                    c.validate().map_err(err)?;
                    for p in c.tls.iter_mut().flat_map(EtcdTlsConfig::files_mut) {
                        *p = resolve(&base, p);
                    }
                    SourceConfig::Etcd(c)
                }
                "consul" => {
                    let mut c: ConsulSourceConfig = table
                        .try_into()
                        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
                    c.validate().map_err(err)?;
                    SourceConfig::Consul(c)
                }
                "nacos" => {
                    let mut c: NacosSourceConfig = table
                        .try_into()
                        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
                    c.validate().map_err(err)?;
                    SourceConfig::Nacos(c)
                }
                other => {
                    return Err(err(format!(
                        "unknown source kind {other:?} (known: \"file\", \"etcd\", \"consul\", \"nacos\")"
                    )));
                }
            };
            let common: SourceCommon = common_table
                .try_into()
                .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
            let source = SourceEntry {
                common,
                spec: source,
            };
            if source.name().is_empty() {
                return Err(err("`name` must not be empty".into()));
            }
            if !names.insert(source.name().to_owned()) {
                return Err(err(format!("duplicate source name {:?}", source.name())));
            }
            sources.push(source);
        }
        let plugins = PluginsConfig {
            dir: resolve(
                &base,
                raw.plugins.dir.as_deref().unwrap_or(Path::new("plugins.d")),
            ),
            queue_capacity: raw.plugins.queue_capacity.unwrap_or(1024),
            retry: PolicyOverrides {
                attempts: raw.plugins.retry_attempts,
                backoff: raw.plugins.retry_backoff,
                quarantine_after: raw.plugins.quarantine_after,
                probe_backoff: raw.plugins.quarantine_probe,
            }
            .over(RetryPolicy::default()),
            batch_max: raw.plugins.batch_max.unwrap_or(64),
        };
        let state = StateConfig {
            dir: resolve(&base, raw.state.dir.as_deref().unwrap_or(Path::new("data"))),
        };
        let cluster = raw.cluster;
        if let Some(c) = &cluster {
            let bad = |m: String| ConfigError::Parse {
                path: path.to_owned(),
                line: 0,
                column: 0,
                message: m,
            };
            if c.etcd.is_empty()
                || c.etcd
                    .iter()
                    .any(|e| !(e.starts_with("http://") || e.starts_with("https://")))
            {
                return Err(bad(format!(
                    "cluster.etcd: give one or more http:// or https:// URLs, not {:?}",
                    c.etcd
                )));
            }
            if c.name.is_empty() || c.name.contains('/') {
                return Err(bad(format!(
                    "cluster.name: {:?} must be non-empty and contain no '/'",
                    c.name
                )));
            }
            if c.lease_ttl < Duration::from_secs(2) {
                return Err(bad("cluster.lease_ttl must be at least 2s".into()));
            }
            if !c.prefix.ends_with('/') {
                return Err(bad(format!(
                    "cluster.prefix: {:?} must end with '/'",
                    c.prefix
                )));
            }
        }
        let whole = |msg: String| ConfigError::Parse {
            path: path.to_owned(),
            line: 0,
            column: 0,
            message: msg,
        };
        if plugins.queue_capacity == 0 {
            return Err(whole("plugins.queue_capacity must be at least 1".into()));
        }
        if plugins.batch_max == 0 {
            return Err(whole("plugins.batch_max must be at least 1".into()));
        }
        if plugins.retry.probe_backoff.is_zero() {
            return Err(whole("plugins.quarantine_probe must be more than 0".into()));
        }
        if plugins.retry.attempts == 0 {
            return Err(whole(
                "plugins.retry_attempts must be at least 1 (the first call counts)".into(),
            ));
        }
        let rt = &raw.runtime;
        if rt.defaults.memory_mb > rt.max_memory_mb {
            return Err(whole(format!(
                "runtime.defaults.memory_mb ({}) exceeds runtime.max_memory_mb ({})",
                rt.defaults.memory_mb, rt.max_memory_mb
            )));
        }
        if rt.defaults.timeout_ms > rt.max_timeout_ms || rt.defaults.timeout_ms == 0 {
            return Err(whole(format!(
                "runtime.defaults.timeout_ms ({}) must be between 1 and runtime.max_timeout_ms ({})",
                rt.defaults.timeout_ms, rt.max_timeout_ms
            )));
        }
        Ok(Config {
            path: path.to_owned(),
            admin: raw.admin,
            plugins,
            runtime: raw.runtime,
            gateway: raw.gateway,
            sources,
            state,
            cluster,
        })
    }
}

/// The operator's sidecar `NAME.toml` beside `NAME.wasm`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// What the plugin receives. Empty: every event of every source.
    #[serde(default)]
    pub subscribe: Vec<Subscription>,
    /// Per-call limits, over `[runtime.defaults]`.
    #[serde(default)]
    pub limits: PartialLimits,
    /// Capabilities granted by the operator.
    #[serde(default)]
    pub grants: Grants,
    /// Overrides `[plugins] queue_capacity` for this plugin.
    pub queue_capacity: Option<usize>,
    /// Overrides `[plugins] retry_attempts` for this plugin.
    pub retry_attempts: Option<u32>,
    /// Overrides `[plugins] batch_max` for this plugin.
    pub batch_max: Option<usize>,
    /// Overrides `[plugins] retry_backoff` for this plugin.
    #[serde(default, with = "humantime_serde")]
    pub retry_backoff: Option<Duration>,
    /// Overrides `[plugins] quarantine_after` for this plugin.
    pub quarantine_after: Option<u32>,
    /// Free-form settings the plugin reads with `settings.get` (a webhook
    /// URL, a prefix). Strings are passed as written, other values in their
    /// TOML form.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
    /// Where the plugin starts the first time it runs (it has no cursor
    /// yet): `"snapshot"` (default) or `"now"`. Later starts resume from its
    /// cursor.
    #[serde(default)]
    pub start: StartPosition,
    /// In a cluster: `"single"` (default: on one replica at a time) or
    /// `"every-replica"`.
    #[serde(default)]
    pub mode: PluginMode,
}

impl Sidecar {
    /// The effective failure policy over the gateway's.
    pub fn retry(&self, config: &Config) -> RetryPolicy {
        PolicyOverrides {
            attempts: self.retry_attempts,
            backoff: self.retry_backoff,
            quarantine_after: self.quarantine_after,
            probe_backoff: None,
        }
        .over(config.plugins.retry)
    }

    /// The `[settings]` table as text values.
    pub fn settings_text(&self) -> BTreeMap<String, String> {
        self.settings
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

impl Sidecar {
    /// Read and validate a sidecar against the gateway config.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and key of the first problem.
    pub fn load(path: &Path, config: &Config) -> Result<Sidecar, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, config)
    }

    /// Validate sidecar text as if read from `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and key of the first problem.
    pub fn parse(path: &Path, text: &str, config: &Config) -> Result<Sidecar, ConfigError> {
        let mut sidecar: Sidecar = parse_toml(path, text)?;
        let whole = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            line: 0,
            column: 0,
            message,
        };
        for (i, sub) in sidecar.subscribe.iter().enumerate() {
            if !config.sources.iter().any(|s| s.name() == sub.source) {
                let known: Vec<&str> = config.sources.iter().map(SourceEntry::name).collect();
                return Err(whole(format!(
                    "subscribe[{i}].source: no source named {:?} in {} (known: {known:?})",
                    sub.source,
                    config.path.display()
                )));
            }
        }
        let l = sidecar.limits;
        if let Some(m) = l.memory_mb
            && (m == 0 || m > config.runtime.max_memory_mb)
        {
            return Err(whole(format!(
                "limits.memory_mb: {m} is outside 1..={} (runtime.max_memory_mb)",
                config.runtime.max_memory_mb
            )));
        }
        if let Some(t) = l.timeout_ms
            && (t == 0 || t > config.runtime.max_timeout_ms)
        {
            return Err(whole(format!(
                "limits.timeout_ms: {t} is outside 1..={} (runtime.max_timeout_ms)",
                config.runtime.max_timeout_ms
            )));
        }
        if l.fuel == Some(0) {
            return Err(whole("limits.fuel must be at least 1".into()));
        }
        if sidecar.queue_capacity == Some(0) {
            return Err(whole("queue_capacity must be at least 1".into()));
        }
        if sidecar.batch_max == Some(0) {
            return Err(whole("batch_max must be at least 1".into()));
        }
        if sidecar.retry_attempts == Some(0) {
            return Err(whole(
                "retry_attempts must be at least 1 (the first call counts)".into(),
            ));
        }
        if let Some(dir) = &sidecar.grants.files {
            sidecar.grants.files = Some(resolve(&base_dir(path), dir));
        }
        for (i, entry) in sidecar.grants.http.iter().enumerate() {
            if let Err(e) = crate::host::http::HostPort::parse(entry) {
                return Err(whole(format!("grants.http[{i}]: {e}")));
            }
        }
        for (i, g) in sidecar.grants.kv.iter().enumerate() {
            match config.sources.iter().find(|s| s.name() == g.source) {
                Some(s) if matches!(s.spec, SourceConfig::Etcd(_)) => {}
                Some(_) => {
                    return Err(whole(format!(
                        "grants.kv[{i}].source: {:?} is not an etcd source; only etcd sources take writes",
                        g.source
                    )));
                }
                None => {
                    return Err(whole(format!(
                        "grants.kv[{i}].source: no source named {:?}",
                        g.source
                    )));
                }
            }
            if g.prefix.is_empty() {
                return Err(whole(format!("grants.kv[{i}].prefix must not be empty")));
            }
        }
        Ok(sidecar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/wg/watchgate.toml"), text)
    }

    #[test]
    fn resolves_relative_paths_against_the_config_file() {
        let c = parse(
            "[plugins]\ndir = \"p\"\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"watched\"\n",
        )
        .unwrap();
        assert_eq!(c.plugins.dir, PathBuf::from("/etc/wg/p"));
        let SourceConfig::File(f) = &c.sources[0].spec else {
            panic!("not a file source")
        };
        assert_eq!(f.path, PathBuf::from("/etc/wg/watched"));
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn unknown_top_level_key_names_file_key_and_line() {
        let err = parse("[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/wg/watchgate.toml:3:"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn unknown_source_key_names_the_source_and_line() {
        let err = parse(
            "[admin]\n\n[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\npth = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("watchgate.toml:7:1:"), "{err}");
        assert!(err.contains("source[0]") && err.contains("pth"), "{err}");
    }

    #[test]
    fn rejects_unknown_kind_and_duplicate_names() {
        let err = parse("[[source]]\nname = \"a\"\nkind = \"zookeeper\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown source kind \"zookeeper\""), "{err}");
        let err = parse(
            "[[source]]\nname = \"a\"\nkind = \"file\"\npath = \"x\"\n[[source]]\nname = \"a\"\nkind = \"file\"\npath = \"y\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(":5:") && err.contains("duplicate source name"),
            "{err}"
        );
    }

    #[test]
    fn sidecar_checks_sources_and_limits() {
        let c = parse("[[source]]\nname = \"local\"\nkind = \"file\"\npath = \"w\"\n").unwrap();
        let p = Path::new("/srv/plugins/x.toml");
        let ok = Sidecar::parse(
            p,
            "[[subscribe]]\nsource = \"local\"\nprefix = \"a/\"\n[limits]\nfuel = 5\n[grants]\nfiles = \"../out\"\n",
            &c,
        )
        .unwrap();
        assert_eq!(ok.grants.files, Some(PathBuf::from("/srv/out")));
        assert_eq!(ok.limits.fuel, Some(5));
        let err = Sidecar::parse(p, "[[subscribe]]\nsource = \"nope\"\n", &c)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no source named \"nope\""), "{err}");
        let err = Sidecar::parse(p, "[limits]\nmemory_mb = 100000\n", &c)
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.memory_mb"), "{err}");
        let err = Sidecar::parse(p, "[grants]\nnetwork = true\n", &c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.toml:2:") && err.contains("network"),
            "{err}"
        );
        let err = Sidecar::parse(p, "[grants]\nhttp = [\"hooks.example.com\"]\n", &c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grants.http[0]") && err.contains("port"),
            "{err}"
        );
        let err = Sidecar::parse(
            p,
            "[grants]\nkv = [{ source = \"nope\", prefix = \"/a/\" }]\n",
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("grants.kv[0].source"), "{err}");
    }
}
