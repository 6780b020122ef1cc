//! Per-plugin delivery policy: what a failed call leads to, where a new
//! plugin starts, and where it runs in a cluster.
//!
//! Owns [`RetryPolicy`], [`StartPosition`] and [`PluginMode`], the settings
//! the dispatcher acts on; the config file fills them from `[plugins]` and
//! each sidecar. It must not read configuration or act on a policy itself.

use std::time::Duration;

use serde::Deserialize;

/// What happens when a plugin call fails (an error, a trap, a limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls per event, the first included, before it is dead-lettered.
    pub attempts: u32,
    /// The most wait before the second attempt (each wait is drawn at
    /// random up to a bound that starts here and doubles).
    pub backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// Traps (including limit hits) in a row that quarantine the plugin; 0
    /// never quarantines.
    pub quarantine_after: u32,
    /// The most first wait before a quarantined plugin is probed again;
    /// the bound doubles per failed probe, up to
    /// [`RetryPolicy::MAX_PROBE_BACKOFF`].
    pub probe_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            quarantine_after: 5,
            probe_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The longest wait between probes of a quarantined plugin.
    pub const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(300);
}

/// Where a plugin without a cursor starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartPosition {
    /// The current keys as puts, then every change (default).
    #[default]
    Snapshot,
    /// Only changes from now on.
    Now,
}

/// Where a plugin runs in a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginMode {
    /// On exactly one live replica at a time (default).
    #[default]
    Single,
    /// On every replica (per-host work, such as rendering a local file).
    EveryReplica,
}
