//! Reading the gateway config file and assembling [`Config`] from it.
//!
//! Owns the TOML parsing (unknown keys rejected), the private raw tables
//! that give every setting its default, the resolution of relative paths,
//! and the mapping of a parse error to its file, line and column. A
//! `[[source]]` is checked as it is read (by its own source's rules, and for
//! a unique name), so its errors can point at its line; every other check
//! is `validate`'s.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    AdminConfig, ClusterConfig, Config, ConfigError, GatewayConfig, PluginsConfig, SourceCommon,
    SourceConfig, SourceEntry, StateConfig, validate,
};
use crate::client::etcd::EtcdTlsConfig;
use crate::dispatch::RetryPolicy;
use crate::runtime::RuntimeConfig;
use crate::source::consul::ConsulSourceConfig;
use crate::source::etcd::EtcdSourceConfig;
use crate::source::file::FileSourceConfig;
use crate::source::nacos::NacosSourceConfig;
use crate::source::nats::NatsSourceConfig;
use crate::source::zookeeper::ZookeeperSourceConfig;
use crate::store::DeadLetterCap;

impl ConfigError {
    /// A problem with the file as a whole, or one without a position.
    pub(super) fn whole(path: &Path, message: String) -> Self {
        ConfigError::Parse {
            path: path.to_owned(),
            line: 0,
            column: 0,
            message,
        }
    }

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

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStateConfig {
    dir: Option<PathBuf>,
}

/// The failure-policy settings a config section may set.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PolicyOverrides {
    pub(super) attempts: Option<u32>,
    pub(super) backoff: Option<Duration>,
    pub(super) quarantine_after: Option<u32>,
    pub(super) probe_backoff: Option<Duration>,
}

impl PolicyOverrides {
    /// `base` with the settings this section gives replaced.
    pub(super) fn over(self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            attempts: self.attempts.unwrap_or(base.attempts),
            backoff: self.backoff.unwrap_or(base.backoff),
            max_backoff: base.max_backoff,
            quarantine_after: self.quarantine_after.unwrap_or(base.quarantine_after),
            probe_backoff: self.probe_backoff.unwrap_or(base.probe_backoff),
        }
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
    max_dead_letters: Option<u64>,
    max_dead_letter_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    compile_ready_wait: Option<Duration>,
}

pub(super) fn parse_toml<T: for<'de> Deserialize<'de>>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::parse(path, text, e.span(), e.message().trim().to_owned()))
}

pub(super) fn base_dir(path: &Path) -> PathBuf {
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
                        "missing key `kind` (one of: \"file\", \"etcd\", \"consul\", \"nacos\", \"nats\", \"zookeeper\")"
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
                "nats" => {
                    let mut c: NatsSourceConfig = table
                        .try_into()
                        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
                    c.validate().map_err(err)?;
                    for p in c.files_mut() {
                        *p = resolve(&base, p);
                    }
                    SourceConfig::Nats(c)
                }
                "zookeeper" => {
                    let c: ZookeeperSourceConfig = table
                        .try_into()
                        .map_err(|e: toml::de::Error| err(e.message().trim().to_owned()))?;
                    c.validate().map_err(err)?;
                    SourceConfig::Zookeeper(c)
                }
                other => {
                    return Err(err(format!(
                        "unknown source kind {other:?} (known: \"file\", \"etcd\", \"consul\", \"nacos\", \"nats\", \"zookeeper\")"
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
            dead_letters: DeadLetterCap {
                count: raw
                    .plugins
                    .max_dead_letters
                    .unwrap_or(DeadLetterCap::default().count),
                bytes: raw
                    .plugins
                    .max_dead_letter_bytes
                    .unwrap_or(DeadLetterCap::default().bytes),
            },
            compile_ready_wait: raw
                .plugins
                .compile_ready_wait
                .unwrap_or(Duration::from_secs(5)),
        };
        let state = StateConfig {
            dir: resolve(&base, raw.state.dir.as_deref().unwrap_or(Path::new("data"))),
        };
        let config = Config {
            path: path.to_owned(),
            admin: raw.admin,
            plugins,
            runtime: raw.runtime,
            gateway: raw.gateway,
            sources,
            state,
            cluster: raw.cluster,
        };
        validate::gateway(&config).map_err(|message| ConfigError::whole(path, message))?;
        Ok(config)
    }
}
