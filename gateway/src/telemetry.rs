//! Metrics and the named telemetry events that both log and count.
//!
//! Owns the Prometheus registry and every metric family. Code elsewhere
//! records a thing by calling one method here, so a metric and its log line
//! never drift apart. It must not decide policy (what is an error, when to
//! retry): it only records.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod labels;
mod repeat;

pub use labels::{
    CapabilityLabels, CommandLabels, CompileRefusalLabels, OUTCOMES, OriginLabels, Outcome,
    OutcomeLabels, PanicSite, PluginCounter, PluginLabels, SourceLabels,
};
pub use repeat::RepeatLog;

type HistogramFamily = Family<PluginLabels, Histogram, fn() -> Histogram>;

fn command_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn call_histogram() -> Histogram {
    // 50 µs … ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric watchgate exports.
pub struct Metrics {
    registry: Registry,
    /// Events produced per source.
    pub source_events: Family<SourceLabels, Counter>,
    /// 1 while the source has a live connection.
    pub source_connected: Family<SourceLabels, Gauge>,
    /// 1 once the source finished its initial sync.
    pub source_synced: Family<SourceLabels, Gauge>,
    /// Reconnects per source.
    pub source_reconnects: Family<SourceLabels, Counter>,
    /// Relists that diffed the store against the source's key index.
    pub source_resyncs: Family<SourceLabels, Counter>,
    /// Last delivered revision per source.
    pub source_revision: Family<SourceLabels, Gauge>,
    /// Repeated identical log lines held back (counted instead).
    pub log_suppressed: Family<OriginLabels, Counter>,
    /// Plugin call outcomes.
    pub plugin_invocations: Family<OutcomeLabels, Counter>,
    /// Events waiting in each plugin's queue.
    pub plugin_queue_depth: Family<PluginLabels, Gauge>,
    /// Changes folded into queued events because the queue was full.
    pub plugin_coalesced: Family<PluginLabels, Counter>,
    /// Events accepted past the queue's capacity (distinct keys that could
    /// not be folded).
    pub plugin_queue_overflow: Family<PluginLabels, Counter>,
    /// Events a plugin failed on after every attempt, set aside as dead
    /// letters.
    pub dead_letters: Family<PluginLabels, Counter>,
    /// Plugin call attempts repeated after a failure.
    pub plugin_retries: Family<PluginLabels, Counter>,
    /// 1 while a plugin is quarantined after repeated traps.
    pub plugin_quarantined: Family<PluginLabels, Gauge>,
    /// Plugin call latency.
    pub plugin_call_seconds: HistogramFamily,
    /// Plugin files that failed to load.
    pub plugin_load_failures: Family<PluginLabels, Counter>,
    /// Plugin (re)loads that succeeded.
    pub plugin_loads: Family<PluginLabels, Counter>,
    /// Fresh instances created (first use and after every trap).
    pub plugin_instantiations: Family<PluginLabels, Counter>,
    /// Plugin log lines dropped by the rate limiter.
    pub plugin_log_dropped: Family<PluginLabels, Counter>,
    /// WASI waits (sleeps, polls) cut off at their call's deadline.
    pub plugin_waits_cut_off: Family<PluginLabels, Counter>,
    /// Worker threads a stop did not wait for past its bound.
    pub plugin_threads_abandoned: Family<PluginLabels, Counter>,
    /// Dead letters dropped, oldest first, to keep a plugin's dead letters
    /// within their caps.
    pub dead_letters_dropped: Family<PluginLabels, Counter>,
    /// Plugin-supplied strings cut to the host's bound.
    pub plugin_text_truncated: Family<PluginLabels, Counter>,
    /// Panics of the gateway's own code while it ran a plugin, contained.
    pub plugin_host_panics: Family<PluginLabels, Counter>,
    /// Capability calls.
    pub capability_calls: Family<CapabilityLabels, Counter>,
    /// Bytes of keys plus values `snapshot` scans copied into a plugin.
    pub snapshot_scan_bytes: Family<PluginLabels, Counter>,
    /// Plugin files refused by a compile limit, the instance pool or
    /// their `memory_mb`, by limit.
    pub plugin_compile_refused: Family<CompileRefusalLabels, Counter>,
    /// Plugin compiles running, abandoned ones included.
    pub compiles_running: Gauge,
    /// Bytes under a plugin's `files` grant, as its quota counts them.
    pub files_bytes: Family<PluginLabels, Gauge>,
    /// Files and directories under a plugin's `files` grant.
    pub files_entries: Family<PluginLabels, Gauge>,
    /// `state.set` calls that waited for the state writer because the
    /// plugin had as many writes pending as it may.
    pub state_waits: Family<PluginLabels, Counter>,
    /// Granted command runs, by plugin and command.
    pub command_runs: Family<CommandLabels, Counter>,
    /// Granted command runs that failed: a non-zero exit, a kill, a
    /// signal, or no start.
    pub command_failures: Family<CommandLabels, Counter>,
    /// How long granted commands ran.
    pub command_seconds: Family<CommandLabels, Histogram, fn() -> Histogram>,
    /// Live tokio tasks, refreshed on every scrape.
    pub runtime_alive_tasks: Gauge,
    /// Live replicas of the cluster, as this replica sees them.
    pub cluster_replicas: Gauge,
    /// Plugins this replica owns.
    pub cluster_owned_plugins: Gauge,
    /// Plugins this replica took over from an earlier owner.
    pub cluster_handovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            source_events: Family::default(),
            source_connected: Family::default(),
            source_synced: Family::default(),
            source_reconnects: Family::default(),
            source_resyncs: Family::default(),
            source_revision: Family::default(),
            log_suppressed: Family::default(),
            plugin_invocations: Family::default(),
            plugin_queue_depth: Family::default(),
            plugin_coalesced: Family::default(),
            plugin_queue_overflow: Family::default(),
            dead_letters: Family::default(),
            plugin_retries: Family::default(),
            plugin_quarantined: Family::default(),
            plugin_call_seconds: Family::new_with_constructor(call_histogram),
            plugin_load_failures: Family::default(),
            plugin_loads: Family::default(),
            plugin_instantiations: Family::default(),
            plugin_log_dropped: Family::default(),
            plugin_waits_cut_off: Family::default(),
            plugin_threads_abandoned: Family::default(),
            dead_letters_dropped: Family::default(),
            plugin_text_truncated: Family::default(),
            plugin_host_panics: Family::default(),
            capability_calls: Family::default(),
            snapshot_scan_bytes: Family::default(),
            plugin_compile_refused: Family::default(),
            compiles_running: Gauge::default(),
            files_bytes: Family::default(),
            files_entries: Family::default(),
            state_waits: Family::default(),
            command_runs: Family::default(),
            command_failures: Family::default(),
            command_seconds: Family::new_with_constructor(command_histogram),
            runtime_alive_tasks: Gauge::default(),
            cluster_replicas: Gauge::default(),
            cluster_owned_plugins: Gauge::default(),
            cluster_handovers: Counter::default(),
        };
        registry.register(
            "watchgate_source_events",
            "Events produced by a source",
            m.source_events.clone(),
        );
        registry.register(
            "watchgate_source_connected",
            "1 while the source holds a live connection",
            m.source_connected.clone(),
        );
        registry.register(
            "watchgate_source_synced",
            "1 once the source finished its initial sync",
            m.source_synced.clone(),
        );
        registry.register(
            "watchgate_source_reconnects",
            "Reconnects of a source",
            m.source_reconnects.clone(),
        );
        registry.register(
            "watchgate_source_resyncs",
            "Relists of a source that diffed the store against its key index",
            m.source_resyncs.clone(),
        );
        registry.register(
            "watchgate_source_revision",
            "Last revision a source delivered",
            m.source_revision.clone(),
        );
        registry.register(
            "watchgate_log_suppressed",
            "Repeated identical log lines held back and counted instead",
            m.log_suppressed.clone(),
        );
        registry.register(
            "watchgate_plugin_invocations",
            "Plugin calls by outcome",
            m.plugin_invocations.clone(),
        );
        registry.register(
            "watchgate_plugin_queue_depth",
            "Events waiting in a plugin's queue",
            m.plugin_queue_depth.clone(),
        );
        registry.register(
            "watchgate_plugin_coalesced",
            "Changes folded into queued events of the same key because the queue was full",
            m.plugin_coalesced.clone(),
        );
        registry.register(
            "watchgate_plugin_queue_overflow",
            "Events queued past capacity because no queued event of the same key could absorb them",
            m.plugin_queue_overflow.clone(),
        );
        registry.register(
            "watchgate_dead_letters",
            "Events a plugin failed on after every attempt, kept as dead letters",
            m.dead_letters.clone(),
        );
        registry.register(
            "watchgate_plugin_retries",
            "Plugin call attempts repeated after a failed call",
            m.plugin_retries.clone(),
        );
        registry.register(
            "watchgate_plugin_quarantined",
            "1 while a plugin is quarantined after repeated traps (its events are kept)",
            m.plugin_quarantined.clone(),
        );
        registry.register(
            "watchgate_plugin_call_seconds",
            "Wall-clock time of one plugin call",
            m.plugin_call_seconds.clone(),
        );
        registry.register(
            "watchgate_plugin_load_failures",
            "Plugin files that were rejected",
            m.plugin_load_failures.clone(),
        );
        registry.register(
            "watchgate_plugin_loads",
            "Plugin files loaded or replaced",
            m.plugin_loads.clone(),
        );
        registry.register(
            "watchgate_plugin_instantiations",
            "Fresh plugin instances (first use and after each trap)",
            m.plugin_instantiations.clone(),
        );
        registry.register(
            "watchgate_plugin_log_dropped",
            "Plugin log lines dropped by the per-plugin rate limit",
            m.plugin_log_dropped.clone(),
        );
        registry.register(
            "watchgate_plugin_waits_cut_off",
            "WASI waits (sleeps, polls) a plugin was still in at its call deadline, cut off to end the call as a timeout",
            m.plugin_waits_cut_off.clone(),
        );
        registry.register(
            "watchgate_plugin_threads_abandoned",
            "Plugin worker threads still in a call when an unload or shutdown stopped waiting for them, past their call deadline and a margin; each ends on its own",
            m.plugin_threads_abandoned.clone(),
        );
        registry.register(
            "watchgate_dead_letters_dropped",
            "Dead letters dropped, oldest first, to keep a plugin's dead letters within their count and byte caps",
            m.dead_letters_dropped.clone(),
        );
        registry.register(
            "watchgate_plugin_text_truncated",
            "Plugin-supplied strings (error messages, log lines) cut to the host's bound",
            m.plugin_text_truncated.clone(),
        );
        registry.register(
            "watchgate_plugin_host_panics",
            "Panics of the gateway's own code while it ran a plugin: the call failed as a trap, or the worker stopped",
            m.plugin_host_panics.clone(),
        );
        registry.register(
            "watchgate_capability_calls",
            "Host capability calls by plugin, capability and outcome",
            m.capability_calls.clone(),
        );
        registry.register(
            "watchgate_snapshot_scan_bytes",
            "Bytes of keys and values snapshot scans copied into a plugin",
            m.snapshot_scan_bytes.clone(),
        );
        registry.register(
            "watchgate_plugin_compile_refused",
            "Plugin files refused by a compile limit (size, functions, function size, compile time)",
            m.plugin_compile_refused.clone(),
        );
        registry.register(
            "watchgate_compiles_running",
            "Plugin compiles running, including abandoned ones still finishing in the background",
            m.compiles_running.clone(),
        );
        registry.register(
            "watchgate_plugin_files_bytes",
            "Bytes of file contents under a plugin's files grant, as its quota (limits.files_mb) counts them",
            m.files_bytes.clone(),
        );
        registry.register(
            "watchgate_plugin_files_entries",
            "Files and directories under a plugin's files grant, as its quota (limits.files_count) counts them",
            m.files_entries.clone(),
        );
        registry.register(
            "watchgate_plugin_state_waits",
            "state.set calls that waited for the state writer because the plugin had as many writes pending as it may",
            m.state_waits.clone(),
        );
        registry.register(
            "watchgate_plugin_command_runs",
            "Runs of a plugin's granted command (run and trigger)",
            m.command_runs.clone(),
        );
        registry.register(
            "watchgate_plugin_command_failures",
            "Runs of a granted command that failed: a non-zero exit, killed (timeout, stop), or not started",
            m.command_failures.clone(),
        );
        registry.register(
            "watchgate_plugin_command_seconds",
            "Wall-clock time of one run of a granted command",
            m.command_seconds.clone(),
        );
        registry.register(
            "watchgate_runtime_alive_tasks",
            "Live tokio tasks",
            m.runtime_alive_tasks.clone(),
        );
        registry.register(
            "watchgate_cluster_replicas",
            "Live replicas of the cluster as this replica sees them (0 outside cluster mode)",
            m.cluster_replicas.clone(),
        );
        registry.register(
            "watchgate_cluster_owned_plugins",
            "Plugins this replica owns in the cluster",
            m.cluster_owned_plugins.clone(),
        );
        registry.register(
            "watchgate_cluster_handovers",
            "Plugins this replica took over from an earlier owner, resuming from its cursor",
            m.cluster_handovers.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A shared handle.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    /// Encode every metric in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> String {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.runtime_alive_tasks
                .set(handle.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Labels for a source.
    pub fn source(name: &str) -> SourceLabels {
        SourceLabels {
            source: name.to_owned(),
        }
    }

    /// Labels for a plugin.
    pub fn plugin(name: &str) -> PluginLabels {
        PluginLabels {
            plugin: name.to_owned(),
        }
    }

    /// Record one finished plugin call.
    pub fn plugin_call(&self, plugin: &str, outcome: Outcome, seconds: f64) {
        self.plugin_invocations
            .get_or_create(&OutcomeLabels {
                plugin: plugin.to_owned(),
                outcome,
            })
            .inc();
        self.plugin_call_seconds
            .get_or_create(&Self::plugin(plugin))
            .observe(seconds);
    }

    /// Count one event of `plugin` in a per-plugin counter (a load, a
    /// failed load, an instantiation, a retry, a dead letter, a dropped
    /// log line, a wait cut off, a dropped dead letter, a truncated string).
    pub fn count_plugin(&self, counter: PluginCounter, plugin: &str) {
        let family = match counter {
            PluginCounter::Load => &self.plugin_loads,
            PluginCounter::LoadFailure => &self.plugin_load_failures,
            PluginCounter::Instantiation => &self.plugin_instantiations,
            PluginCounter::Retry => &self.plugin_retries,
            PluginCounter::DeadLetter => &self.dead_letters,
            PluginCounter::LogLineDropped => &self.plugin_log_dropped,
            PluginCounter::WaitCutOff => &self.plugin_waits_cut_off,
            PluginCounter::DeadLetterDropped => &self.dead_letters_dropped,
            PluginCounter::TextTruncated => &self.plugin_text_truncated,
            PluginCounter::HostPanic => &self.plugin_host_panics,
        };
        family.get_or_create(&Self::plugin(plugin)).inc();
    }

    /// Log and count a worker thread of `plugin` that had not ended
    /// `waited` after its stop, its call deadline being `timeout_ms`: it is
    /// left to end on its own.
    pub fn thread_abandoned(&self, plugin: &str, waited: std::time::Duration, timeout_ms: u64) {
        self.plugin_threads_abandoned
            .get_or_create(&Self::plugin(plugin))
            .inc();
        tracing::warn!(
            plugin = %plugin,
            waited_ms = waited.as_millis() as u64,
            timeout_ms,
            "Plugin thread still in a call {} ms after the plugin was stopped, past its call deadline (timeout_ms = {timeout_ms}) and a margin; stopped waiting for it. The plugin is stopped and takes no more events; the thread ends on its own when its call returns.",
            waited.as_millis()
        );
    }

    /// Count `n` dead letters of `plugin` dropped by its caps.
    pub fn dead_letters_dropped(&self, plugin: &str, n: u64) {
        self.dead_letters_dropped
            .get_or_create(&Self::plugin(plugin))
            .inc_by(n);
    }

    /// Record a panic of the gateway's own code at `site` while it ran
    /// `plugin`: logged as an error and counted. The panic is a gateway
    /// bug, whatever input led to it.
    pub fn host_panic(&self, plugin: &str, site: PanicSite, panic: &str) {
        match site {
            PanicSite::Call => tracing::error!(
                plugin,
                panic,
                "The gateway panicked during a call of this plugin (a gateway bug); the call failed as a trap and the instance was replaced."
            ),
            PanicSite::Round => tracing::error!(
                plugin,
                panic,
                "The gateway panicked in this plugin's worker outside a call (a gateway bug); the plugin is failed and takes no events until it is loaded again."
            ),
        }
        self.count_plugin(PluginCounter::HostPanic, plugin);
    }

    /// Show whether `plugin` is quarantined.
    pub fn set_quarantined(&self, plugin: &str, on: bool) {
        self.plugin_quarantined
            .get_or_create(&Self::plugin(plugin))
            .set(i64::from(on));
    }

    /// Count a log line held back as a repeat.
    pub fn suppressed(&self, origin: &str) {
        self.log_suppressed
            .get_or_create(&OriginLabels {
                origin: origin.to_owned(),
            })
            .inc();
    }

    /// How often `capability` ended in `outcome` for `plugin` so far.
    pub fn capability_count(&self, plugin: &str, capability: &str, outcome: &str) -> u64 {
        self.capability_calls
            .get_or_create(&CapabilityLabels {
                plugin: plugin.to_owned(),
                capability: capability.to_owned(),
                outcome: outcome.to_owned(),
            })
            .get()
    }

    /// Record the bytes one `snapshot` scan copied into `plugin`.
    pub fn snapshot_scanned(&self, plugin: &str, bytes: usize) {
        self.snapshot_scan_bytes
            .get_or_create(&Self::plugin(plugin))
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Count a plugin file refused by the compile limit `limit` (its
    /// `[runtime]` key).
    pub fn compile_refused(&self, plugin: &str, limit: &str) {
        self.plugin_compile_refused
            .get_or_create(&CompileRefusalLabels {
                plugin: plugin.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Show what `plugin`'s `files` grant holds: `bytes` of file contents
    /// in `entries` files and directories.
    pub fn files_used(&self, plugin: &str, bytes: u64, entries: u64) {
        let labels = Self::plugin(plugin);
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.files_bytes.get_or_create(&labels).set(gauge(bytes));
        self.files_entries
            .get_or_create(&labels)
            .set(gauge(entries));
    }

    /// Count a `state.set` of `plugin` that waited for the state writer.
    pub fn state_waited(&self, plugin: &str) {
        self.state_waits.get_or_create(&Self::plugin(plugin)).inc();
    }

    /// Record one run of `plugin`'s granted `command`.
    pub fn command_ran(&self, plugin: &str, command: &str, seconds: f64, failed: bool) {
        let labels = CommandLabels {
            plugin: plugin.to_owned(),
            command: command.to_owned(),
        };
        self.command_runs.get_or_create(&labels).inc();
        if failed {
            self.command_failures.get_or_create(&labels).inc();
        }
        self.command_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Record one capability call.
    pub fn capability(&self, plugin: &str, capability: &str, outcome: &str) {
        self.capability_calls
            .get_or_create(&CapabilityLabels {
                plugin: plugin.to_owned(),
                capability: capability.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

/// The metrics of one source, looked up once when the source starts. The
/// gauges start at zero, so a dashboard shows the source before its first
/// connection.
pub struct SourceHandles {
    /// 1 while connected.
    pub connected: Gauge,
    /// 1 once the initial sync is delivered.
    pub synced: Gauge,
    /// Reconnects.
    pub reconnects: Counter,
    /// Events produced.
    pub events: Counter,
    /// Relists diffed against the key index.
    pub resyncs: Counter,
    /// Last delivered revision.
    pub revision: Gauge,
}

impl SourceHandles {
    /// The handles of `source` in `metrics`.
    pub fn new(metrics: &Metrics, source: &str) -> SourceHandles {
        let labels = Metrics::source(source);
        let handles = SourceHandles {
            connected: metrics.source_connected.get_or_create(&labels).clone(),
            synced: metrics.source_synced.get_or_create(&labels).clone(),
            reconnects: metrics.source_reconnects.get_or_create(&labels).clone(),
            events: metrics.source_events.get_or_create(&labels).clone(),
            resyncs: metrics.source_resyncs.get_or_create(&labels).clone(),
            revision: metrics.source_revision.get_or_create(&labels).clone(),
        };
        handles.connected.set(0);
        handles.synced.set(0);
        handles.revision.set(0);
        handles
    }
}

/// The metrics one plugin's worker updates on every event, looked up once
/// when the worker starts so the hot path takes no label lookup.
pub struct PluginHandles {
    /// Calls by outcome, in the order of [`OUTCOMES`].
    pub calls: Vec<Counter>,
    /// Call durations.
    pub seconds: Histogram,
    /// Events waiting.
    pub depth: Gauge,
    /// Changes folded into queued events.
    pub coalesced: Counter,
    /// Events folded because the queue was full.
    pub overflow: Counter,
}

impl PluginHandles {
    /// The handles of `plugin` in `metrics`.
    pub fn new(metrics: &Metrics, plugin: &str) -> PluginHandles {
        let labels = Metrics::plugin(plugin);
        PluginHandles {
            calls: OUTCOMES
                .iter()
                .map(|o| {
                    metrics
                        .plugin_invocations
                        .get_or_create(&OutcomeLabels {
                            plugin: plugin.to_owned(),
                            outcome: *o,
                        })
                        .clone()
                })
                .collect(),
            seconds: metrics.plugin_call_seconds.get_or_create(&labels).clone(),
            depth: metrics.plugin_queue_depth.get_or_create(&labels).clone(),
            coalesced: metrics.plugin_coalesced.get_or_create(&labels).clone(),
            overflow: metrics.plugin_queue_overflow.get_or_create(&labels).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let m = Metrics::new();
        m.source_events.get_or_create(&Metrics::source("s")).inc();
        m.source_connected
            .get_or_create(&Metrics::source("s"))
            .set(1);
        m.source_reconnects
            .get_or_create(&Metrics::source("s"))
            .inc();
        m.plugin_call("p", Outcome::out_of_fuel, 0.01);
        m.plugin_queue_depth
            .get_or_create(&Metrics::plugin("p"))
            .set(3);
        m.plugin_coalesced
            .get_or_create(&Metrics::plugin("p"))
            .inc();
        m.snapshot_scanned("p", 7);
        m.count_plugin(PluginCounter::WaitCutOff, "p");
        m.thread_abandoned("p", std::time::Duration::from_secs(2), 1_000);
        m.compile_refused("p", "max_plugin_functions");
        m.count_plugin(PluginCounter::TextTruncated, "p");
        m.dead_letters_dropped("p", 2);
        m.host_panic("p", PanicSite::Call, "boom");
        m.files_used("p", 9, 2);
        m.state_waited("p");
        m.command_ran("p", "reload", 0.5, true);
        let text = m.encode();
        for name in [
            "watchgate_source_events_total{source=\"s\"} 1",
            "watchgate_source_connected{source=\"s\"} 1",
            "watchgate_source_reconnects_total{source=\"s\"} 1",
            "watchgate_plugin_invocations_total{plugin=\"p\",outcome=\"out_of_fuel\"} 1",
            "watchgate_plugin_queue_depth{plugin=\"p\"} 3",
            "watchgate_plugin_coalesced_total{plugin=\"p\"} 1",
            "watchgate_snapshot_scan_bytes_total{plugin=\"p\"} 7",
            "watchgate_plugin_waits_cut_off_total{plugin=\"p\"} 1",
            "watchgate_plugin_threads_abandoned_total{plugin=\"p\"} 1",
            "watchgate_plugin_compile_refused_total{plugin=\"p\",limit=\"max_plugin_functions\"} 1",
            "watchgate_compiles_running 0",
            "watchgate_plugin_text_truncated_total{plugin=\"p\"} 1",
            "watchgate_dead_letters_dropped_total{plugin=\"p\"} 2",
            "watchgate_plugin_host_panics_total{plugin=\"p\"} 1",
            "watchgate_plugin_files_bytes{plugin=\"p\"} 9",
            "watchgate_plugin_files_entries{plugin=\"p\"} 2",
            "watchgate_plugin_state_waits_total{plugin=\"p\"} 1",
            "watchgate_plugin_call_seconds_count{plugin=\"p\"} 1",
            "watchgate_plugin_command_runs_total{plugin=\"p\",command=\"reload\"} 1",
            "watchgate_plugin_command_failures_total{plugin=\"p\",command=\"reload\"} 1",
            "watchgate_plugin_command_seconds_count{plugin=\"p\",command=\"reload\"} 1",
            "watchgate_runtime_alive_tasks",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
