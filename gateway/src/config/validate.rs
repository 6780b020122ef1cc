//! The checks serde cannot make: values against their ranges and tables
//! against each other.
//!
//! Owns the whole-file checks of the gateway config (cluster, plugins,
//! runtime ceilings) and the checks of a sidecar against the gateway config
//! (known sources, limits under the ceilings, well-formed grants). Each
//! check returns the message naming the key; the caller adds the file. It
//! must not read files or change what it checks.

use std::time::Duration;

use super::{Config, Sidecar, SourceConfig, SourceEntry};
use crate::host::http::HostPort;

/// Check an assembled gateway config.
///
/// # Errors
/// The first problem, naming its key.
pub(super) fn gateway(config: &Config) -> Result<(), String> {
    if config.admin.reveal_values && !config.admin.listen.ip().is_loopback() {
        return Err(format!(
            "admin.reveal_values: values may be shown only on a loopback admin listener, \
             not on {}; set admin.listen to 127.0.0.1 or ::1, or leave reveal_values off",
            config.admin.listen
        ));
    }
    if let Some(c) = &config.cluster {
        if c.etcd.is_empty()
            || c.etcd
                .iter()
                .any(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(format!(
                "cluster.etcd: give one or more http:// or https:// URLs, not {:?}",
                c.etcd
            ));
        }
        if c.name.is_empty() || c.name.contains('/') {
            return Err(format!(
                "cluster.name: {:?} must be non-empty and contain no '/'",
                c.name
            ));
        }
        if c.lease_ttl < Duration::from_secs(2) {
            return Err("cluster.lease_ttl must be at least 2s".into());
        }
        if !c.prefix.ends_with('/') {
            return Err(format!("cluster.prefix: {:?} must end with '/'", c.prefix));
        }
    }
    let plugins = &config.plugins;
    if plugins.queue_capacity == 0 {
        return Err("plugins.queue_capacity must be at least 1".into());
    }
    if plugins.batch_max == 0 {
        return Err("plugins.batch_max must be at least 1".into());
    }
    if plugins.retry.probe_backoff.is_zero() {
        return Err("plugins.quarantine_probe must be more than 0".into());
    }
    if plugins.retry.attempts == 0 {
        return Err("plugins.retry_attempts must be at least 1 (the first call counts)".into());
    }
    let rt = &config.runtime;
    if rt.defaults.memory_mb > rt.max_memory_mb {
        return Err(format!(
            "runtime.defaults.memory_mb ({}) exceeds runtime.max_memory_mb ({})",
            rt.defaults.memory_mb, rt.max_memory_mb
        ));
    }
    if rt.defaults.timeout_ms > rt.max_timeout_ms || rt.defaults.timeout_ms == 0 {
        return Err(format!(
            "runtime.defaults.timeout_ms ({}) must be between 1 and runtime.max_timeout_ms ({})",
            rt.defaults.timeout_ms, rt.max_timeout_ms
        ));
    }
    for (key, value) in [
        ("max_plugin_bytes", rt.max_plugin_bytes),
        ("max_plugin_functions", rt.max_plugin_functions),
        ("max_function_bytes", rt.max_function_bytes),
        ("compile_concurrency", rt.compile_concurrency as u64),
    ] {
        if value == 0 {
            return Err(format!("runtime.{key} must be at least 1"));
        }
    }
    if rt.compile_timeout.is_zero() {
        return Err("runtime.compile_timeout must be more than 0".into());
    }
    if rt.defaults.files_mb == 0 {
        return Err("runtime.defaults.files_mb must be at least 1".into());
    }
    if rt.defaults.files_count == 0 {
        return Err("runtime.defaults.files_count must be at least 1".into());
    }
    Ok(())
}

/// Check a sidecar against the gateway config it belongs to.
///
/// # Errors
/// The first problem, naming its key.
pub(super) fn sidecar(sidecar: &Sidecar, config: &Config) -> Result<(), String> {
    for (i, sub) in sidecar.subscribe.iter().enumerate() {
        if !config.sources.iter().any(|s| s.name() == sub.source) {
            let known: Vec<&str> = config.sources.iter().map(SourceEntry::name).collect();
            return Err(format!(
                "subscribe[{i}].source: no source named {:?} in {} (known: {known:?})",
                sub.source,
                config.path.display()
            ));
        }
    }
    let l = sidecar.limits;
    if let Some(m) = l.memory_mb
        && (m == 0 || m > config.runtime.max_memory_mb)
    {
        return Err(format!(
            "limits.memory_mb: {m} is outside 1..={} (runtime.max_memory_mb)",
            config.runtime.max_memory_mb
        ));
    }
    if let Some(t) = l.timeout_ms
        && (t == 0 || t > config.runtime.max_timeout_ms)
    {
        return Err(format!(
            "limits.timeout_ms: {t} is outside 1..={} (runtime.max_timeout_ms)",
            config.runtime.max_timeout_ms
        ));
    }
    if l.fuel == Some(0) {
        return Err("limits.fuel must be at least 1".into());
    }
    if l.files_mb == Some(0) {
        return Err("limits.files_mb must be at least 1".into());
    }
    if l.files_count == Some(0) {
        return Err("limits.files_count must be at least 1".into());
    }
    if sidecar.queue_capacity == Some(0) {
        return Err("queue_capacity must be at least 1".into());
    }
    if sidecar.batch_max == Some(0) {
        return Err("batch_max must be at least 1".into());
    }
    if sidecar.retry_attempts == Some(0) {
        return Err("retry_attempts must be at least 1 (the first call counts)".into());
    }
    for (i, entry) in sidecar.grants.http.iter().enumerate() {
        if let Err(e) = HostPort::parse(entry) {
            return Err(format!("grants.http[{i}]: {e}"));
        }
    }
    for (i, g) in sidecar.grants.kv.iter().enumerate() {
        match config.sources.iter().find(|s| s.name() == g.source) {
            Some(s) if matches!(s.spec, SourceConfig::Etcd(_)) => {}
            Some(_) => {
                return Err(format!(
                    "grants.kv[{i}].source: {:?} is not an etcd source; only etcd sources take writes",
                    g.source
                ));
            }
            None => {
                return Err(format!(
                    "grants.kv[{i}].source: no source named {:?}",
                    g.source
                ));
            }
        }
        if g.prefix.is_empty() {
            return Err(format!("grants.kv[{i}].prefix must not be empty"));
        }
    }
    crate::host::commands::validate(&sidecar.grants)
}
