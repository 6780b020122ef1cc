//! Routing events to plugins: subscriptions, per-plugin queues, workers.
//!
//! Owns the table of running plugins, each with its own [`EventQueue`] and
//! its own worker thread running a [`Sandbox`], and a cache of every
//! source's current keys so that a plugin loaded late starts from the
//! current state (as puts) before it sees changes. [`Dispatcher::deliver`]
//! never blocks on a plugin: a slow, spinning or crashing plugin only ever
//! fills its own queue. Plugin calls run on the workers' own OS threads,
//! never on the tokio workers. This module must not parse files or compile
//! code.

pub mod queue;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{Limits, Subscription};
use crate::event::{Event, EventKind};
use crate::runtime::Runtime;
use crate::runtime::instance::{CallReport, LoadedPlugin, Sandbox};
use crate::source::EventSink;
use crate::telemetry::{Metrics, Outcome};
use queue::EventQueue;

/// One version of a plugin with its routing and queue settings.
#[derive(Clone)]
pub struct PluginSpec {
    /// Code, host context and limits.
    pub loaded: LoadedPlugin,
    /// What it receives; empty means every source, every key.
    pub subscriptions: Vec<Subscription>,
    /// Queue capacity before folding.
    pub queue_capacity: usize,
}

impl PluginSpec {
    fn matches(&self, source: &str, key: &str) -> bool {
        self.subscriptions.is_empty()
            || self
                .subscriptions
                .iter()
                .any(|s| s.source == source && key.starts_with(&s.prefix))
    }

    fn subscribes_to(&self, source: &str) -> bool {
        self.subscriptions.is_empty() || self.subscriptions.iter().any(|s| s.source == source)
    }
}

#[derive(Clone)]
struct Cached {
    value: Bytes,
    revision: u64,
    metadata: Vec<(String, String)>,
}

/// The current keys of one source, in key order.
#[derive(Default)]
struct SourceCache {
    keys: Mutex<BTreeMap<String, Cached>>,
}

/// The most recent failure of a plugin, for `/v1/plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct LastFailure {
    /// Outcome class.
    pub outcome: Outcome,
    /// Key of the event.
    pub key: String,
    /// Message or trap description.
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// Live counters of one plugin.
#[derive(Default)]
struct WorkerStats {
    calls: [AtomicU64; 6],
    last_failure: Mutex<Option<LastFailure>>,
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::ok,
    Outcome::error,
    Outcome::trap,
    Outcome::timeout,
    Outcome::out_of_fuel,
    Outcome::memory,
];

/// A running plugin: its queue, settings and worker thread.
struct Worker {
    name: String,
    spec: ArcSwap<PluginSpec>,
    queue: Arc<EventQueue>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<WorkerStats>,
    metrics: Arc<Metrics>,
}

/// A plugin as `/v1/plugins` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginReport {
    /// Plugin name.
    pub name: String,
    /// Load counter; increases on every replace.
    pub version: u64,
    /// SHA-256 of the running file.
    pub digest: String,
    /// Size of the running file in bytes.
    pub size: usize,
    /// What it receives (empty: everything).
    pub subscriptions: Vec<SubscriptionReport>,
    /// Per-call limits.
    pub limits: LimitsReport,
    /// Granted `files` directory.
    pub files_grant: Option<String>,
    /// Events waiting.
    pub queue_depth: usize,
    /// Queue capacity before folding.
    pub queue_capacity: usize,
    /// Calls by outcome.
    pub invocations: BTreeMap<String, u64>,
    /// The most recent failed call.
    pub last_failure: Option<LastFailure>,
}

/// A subscription in a report.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionReport {
    /// Source name.
    pub source: String,
    /// Key prefix.
    pub prefix: String,
}

/// Limits in a report.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsReport {
    /// Fuel per call.
    pub fuel: u64,
    /// Deadline per call, ms.
    pub timeout_ms: u64,
    /// Memory cap, MiB.
    pub memory_mb: u64,
}

impl From<Limits> for LimitsReport {
    fn from(l: Limits) -> Self {
        LimitsReport {
            fuel: l.fuel,
            timeout_ms: l.timeout_ms,
            memory_mb: l.memory_mb,
        }
    }
}

impl Worker {
    fn start(
        runtime: Arc<Runtime>,
        spec: PluginSpec,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<Worker>> {
        let name = spec.loaded.ctx.name.clone();
        let worker = Arc::new(Worker {
            name: name.clone(),
            queue: Arc::new(EventQueue::new(spec.queue_capacity)),
            spec: ArcSwap::from_pointee(spec),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            stats: Arc::default(),
            metrics,
        });
        let w = worker.clone();
        let handle = std::thread::Builder::new()
            .name(format!("plugin-{name}"))
            .spawn(move || w.run(Sandbox::new(runtime)))?;
        *worker.thread.lock() = Some(handle);
        Ok(worker)
    }

    /// The worker loop: one event at a time, in queue order.
    fn run(self: Arc<Self>, mut sandbox: Sandbox) {
        let labels = Metrics::plugin(&self.name);
        let depth = self
            .metrics
            .plugin_queue_depth
            .get_or_create(&labels)
            .clone();
        // Failures are logged at most once a second per plugin; the rest are
        // counted in the outcome metric and summarized in the next line.
        let failure_log: DefaultDirectRateLimiter =
            RateLimiter::direct(Quota::per_second(NonZeroU32::MIN));
        let mut unlogged = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let Some(event) = self.queue.pop(Duration::from_millis(200)) else {
                depth.set(self.queue.len() as i64);
                continue;
            };
            depth.set(self.queue.len() as i64);
            let spec = self.spec.load_full();
            let report = sandbox.call(&spec.loaded, &event);
            self.record(&event, &report);
            if report.outcome != Outcome::ok {
                if failure_log.check().is_ok() {
                    tracing::warn!(
                        plugin = %self.name,
                        source = %event.source,
                        key = %event.key,
                        revision = event.revision,
                        outcome = report.outcome.as_str(),
                        suppressed = unlogged,
                        error = report.message.as_deref().unwrap_or(""),
                        "Plugin call failed; the event is not retried."
                    );
                    unlogged = 0;
                } else {
                    unlogged += 1;
                    self.metrics.suppressed(&format!("plugin/{}", self.name));
                }
            }
        }
        depth.set(0);
    }

    fn record(&self, event: &Event, report: &CallReport) {
        self.metrics
            .plugin_call(&self.name, report.outcome, report.elapsed.as_secs_f64());
        if let Some(i) = OUTCOMES.iter().position(|o| *o == report.outcome) {
            self.stats.calls[i].fetch_add(1, Ordering::Relaxed);
        }
        if report.outcome != Outcome::ok {
            *self.stats.last_failure.lock() = Some(LastFailure {
                outcome: report.outcome,
                key: event.key.clone(),
                message: report.message.clone().unwrap_or_default(),
                at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            });
        }
    }

    fn enqueue(&self, events: Vec<Event>) {
        let labels = Metrics::plugin(&self.name);
        let stats = self.queue.push(events);
        if stats.coalesced > 0 {
            self.metrics
                .plugin_coalesced
                .get_or_create(&labels)
                .inc_by(stats.coalesced as u64);
        }
        if stats.overflow > 0 {
            self.metrics
                .plugin_queue_overflow
                .get_or_create(&labels)
                .inc_by(stats.overflow as u64);
        }
        self.metrics
            .plugin_queue_depth
            .get_or_create(&labels)
            .set(self.queue.len() as i64);
    }

    /// Stop taking events and wait for the worker thread; an in-flight call
    /// finishes or hits its deadline first. Blocking: call off the async
    /// workers.
    fn stop_and_join(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let discarded = self.queue.close();
        if discarded > 0 {
            tracing::warn!(
                plugin = %self.name,
                discarded,
                "Plugin stopped with events still queued; they were not delivered."
            );
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        self.metrics
            .plugin_queue_depth
            .get_or_create(&Metrics::plugin(&self.name))
            .set(0);
    }

    fn report(&self) -> PluginReport {
        let spec = self.spec.load();
        PluginReport {
            name: self.name.clone(),
            version: spec.loaded.version,
            digest: spec.loaded.compiled.digest.clone(),
            size: spec.loaded.compiled.size,
            subscriptions: spec
                .subscriptions
                .iter()
                .map(|s| SubscriptionReport {
                    source: s.source.clone(),
                    prefix: s.prefix.clone(),
                })
                .collect(),
            limits: spec.loaded.limits.into(),
            files_grant: spec
                .loaded
                .ctx
                .files
                .as_ref()
                .map(|g| g.root().display().to_string()),
            queue_depth: self.queue.len(),
            queue_capacity: spec.queue_capacity,
            invocations: OUTCOMES
                .iter()
                .zip(&self.stats.calls)
                .map(|(o, c)| (o.as_str().to_owned(), c.load(Ordering::Relaxed)))
                .collect(),
            last_failure: self.stats.last_failure.lock().clone(),
        }
    }
}

/// Routes source events to plugin queues. Shared by every source (as their
/// [`EventSink`]) and the plugin loader.
pub struct Dispatcher {
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    caches: DashMap<String, Arc<SourceCache>>,
    workers: DashMap<String, Arc<Worker>>,
}

impl Dispatcher {
    /// A dispatcher for the named sources.
    pub fn new(
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
        sources: impl IntoIterator<Item = String>,
    ) -> Arc<Dispatcher> {
        let caches = sources.into_iter().map(|s| (s, Arc::default())).collect();
        Arc::new(Dispatcher {
            runtime,
            metrics,
            caches,
            workers: DashMap::new(),
        })
    }

    /// Names of the running plugins.
    pub fn plugin_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.workers.iter().map(|w| w.key().clone()).collect();
        v.sort();
        v
    }

    /// Reports of the running plugins, by name.
    pub fn reports(&self) -> Vec<PluginReport> {
        let mut v: Vec<PluginReport> = self.workers.iter().map(|w| w.report()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Start a plugin, or replace the running version of it. A new plugin
    /// first receives the current keys of what it subscribes to, as puts.
    /// A replaced plugin keeps its queue; an in-flight call finishes on the
    /// old version.
    ///
    /// # Errors
    /// When the worker thread cannot be started.
    pub fn upsert(&self, spec: PluginSpec) -> std::io::Result<()> {
        let name = spec.loaded.ctx.name.clone();
        if let Some(w) = self.workers.get(&name) {
            w.queue.set_capacity(spec.queue_capacity);
            w.spec.store(Arc::new(spec));
            return Ok(());
        }
        // Hold the caches of the subscribed sources (in name order, like
        // every other taker of several) so no event slips between the
        // snapshot and the registration.
        let mut sources: Vec<(String, Arc<SourceCache>)> = self
            .caches
            .iter()
            .filter(|c| spec.subscribes_to(c.key()))
            .map(|c| (c.key().clone(), c.value().clone()))
            .collect();
        sources.sort_by(|a, b| a.0.cmp(&b.0));
        let guards: Vec<_> = sources.iter().map(|(n, c)| (n, c.keys.lock())).collect();
        let mut snapshot = Vec::new();
        for (source, keys) in &guards {
            let source: Arc<str> = Arc::from(source.as_str());
            for (key, c) in keys.iter() {
                if spec.matches(&source, key) {
                    let mut e = Event::put(&source, key.clone(), c.value.clone(), c.revision);
                    e.metadata = c.metadata.clone();
                    snapshot.push(e);
                }
            }
        }
        let worker = Worker::start(self.runtime.clone(), spec, self.metrics.clone())?;
        if !snapshot.is_empty() {
            worker.enqueue(snapshot);
        }
        self.workers.insert(name, worker);
        drop(guards);
        Ok(())
    }

    /// Stop and remove a plugin; waits for its in-flight call. Blocking:
    /// call off the async workers.
    pub fn remove(&self, name: &str) -> bool {
        match self.workers.remove(name) {
            Some((_, w)) => {
                w.stop_and_join();
                true
            }
            None => false,
        }
    }

    /// Stop every plugin. Blocking: call off the async workers.
    pub fn shutdown(&self) {
        let names = self.plugin_names();
        for n in names {
            self.remove(&n);
        }
    }

    /// The running version of `plugin`.
    pub fn running(&self, plugin: &str) -> Option<Arc<PluginSpec>> {
        self.workers.get(plugin).map(|w| w.spec.load_full())
    }

    /// Events waiting for `plugin`, if it runs.
    pub fn queue_depth(&self, plugin: &str) -> Option<usize> {
        self.workers.get(plugin).map(|w| w.queue.len())
    }
}

impl Dispatcher {
    /// Start routing a source added by a reload.
    pub fn add_source(&self, name: &str) {
        self.caches.entry(name.to_owned()).or_default();
    }

    /// Forget a source removed by a reload (its keys are not deleted in the
    /// plugins: a removed source says nothing about its keys).
    pub fn remove_source(&self, name: &str) {
        self.caches.remove(name);
    }
}

impl EventSink for Dispatcher {
    fn deliver_snapshot(&self, source: &str, scope: &dyn Fn(&str) -> bool, events: Vec<Event>) {
        let cache = self.caches.entry(source.to_owned()).or_default().clone();
        let diff = {
            let keys = cache.keys.lock();
            if !keys.keys().any(|k| scope(k)) {
                // Nothing of this scope was delivered before: a first sync.
                events
            } else {
                // A restarted source: pass on only what changed meanwhile.
                let fresh: std::collections::HashSet<&str> =
                    events.iter().map(|e| e.key.as_str()).collect();
                let revision = events.iter().map(|e| e.revision).max().unwrap_or(0);
                let source_name: Arc<str> = Arc::from(source);
                let mut out: Vec<Event> = keys
                    .iter()
                    .filter(|(k, _)| scope(k) && !fresh.contains(k.as_str()))
                    .map(|(k, c)| {
                        let mut e = Event::delete(&source_name, k.clone(), revision)
                            .with_prev(Some(c.value.clone()));
                        e.resync = true;
                        e
                    })
                    .collect();
                for mut e in events {
                    match keys.get(&e.key) {
                        Some(c) if Some(&c.value) == e.value.as_ref() => {}
                        old => {
                            e.prev_value = old.map(|c| c.value.clone());
                            e.resync = true;
                            out.push(e);
                        }
                    }
                }
                out
            }
        };
        if !diff.is_empty() {
            self.deliver(source, diff);
        }
    }

    fn deliver(&self, source: &str, events: Vec<Event>) {
        let cache = self.caches.entry(source.to_owned()).or_default().clone();
        let mut keys = cache.keys.lock();
        for e in &events {
            match (e.kind, &e.value) {
                (EventKind::Put, Some(v)) => {
                    keys.insert(
                        e.key.clone(),
                        Cached {
                            value: v.clone(),
                            revision: e.revision,
                            metadata: e.metadata.clone(),
                        },
                    );
                }
                _ => {
                    keys.remove(&e.key);
                }
            }
        }
        for w in self.workers.iter() {
            let spec = w.spec.load();
            let matched: Vec<Event> = events
                .iter()
                .filter(|e| spec.matches(source, &e.key))
                .cloned()
                .collect();
            if !matched.is_empty() {
                w.enqueue(matched);
            }
        }
        drop(keys);
    }
}
