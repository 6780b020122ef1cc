//! The operator's sidecar `NAME.toml` beside a plugin's `NAME.wasm`.
//!
//! Owns [`Sidecar`]: what a plugin subscribes to, its limits, grants,
//! queue and retry overrides and free-form settings, read and checked
//! against the gateway [`Config`]. It must not load the plugin.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::parse::{PolicyOverrides, base_dir, parse_toml, resolve};
use super::{Config, ConfigError, validate};
use crate::dispatch::{PluginMode, RetryPolicy, StartPosition};
use crate::event::Subscription;
use crate::host::Grants;
use crate::runtime::PartialLimits;
use crate::store::DeadLetterCap;

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
    /// Overrides `[plugins] max_dead_letters` for this plugin.
    pub max_dead_letters: Option<u64>,
    /// Overrides `[plugins] max_dead_letter_bytes` for this plugin.
    pub max_dead_letter_bytes: Option<u64>,
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

    /// The effective dead-letter caps over the gateway's.
    pub fn dead_letters(&self, config: &Config) -> DeadLetterCap {
        let base = config.plugins.dead_letters;
        DeadLetterCap {
            count: self.max_dead_letters.unwrap_or(base.count),
            bytes: self.max_dead_letter_bytes.unwrap_or(base.bytes),
        }
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
        validate::sidecar(&sidecar, config).map_err(|message| ConfigError::whole(path, message))?;
        let base = base_dir(path);
        let g = &mut sidecar.grants;
        if let Some(dir) = &g.files {
            g.files = Some(resolve(&base, dir));
        }
        if let Some(dir) = &g.command_dir {
            g.command_dir = Some(resolve(&base, dir));
        }
        for pid_file in g.signals.values_mut() {
            *pid_file = resolve(&base, pid_file);
        }
        Ok(sidecar)
    }
}
