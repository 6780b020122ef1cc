//! Routing events to plugins: subscriptions, per-plugin queues, workers.
//!
//! Owns the table of running plugins, each with its own [`EventQueue`] and
//! its own worker thread running a [`Sandbox`] (or, for quick plugins once
//! there are more plugins than cores, rounds on a shared [`pool`]), and
//! every source's key index (mirrored in the [`Store`]) so that a plugin
//! loaded late starts from the current state (as puts) before it sees
//! changes. [`Dispatcher::deliver`]
//! never blocks on a plugin: a slow, spinning or crashing plugin only ever
//! fills its own queue. Plugin calls run on the workers' own OS threads or
//! the pool's, never on the tokio workers.
//!
//! Delivery is at least once across restarts. Every delivery of a source
//! gets a position (the revision for a source with history, a counter
//! otherwise); each plugin's cursor per source is the position below which
//! it has handled (or dead-lettered) everything, and the store keeps it. On
//! restart a plugin resumes from its cursor: a source with history replays
//! its watch from the lowest cursor and each plugin skips what it had; any
//! other source relists, and each plugin is given the index entries changed
//! after its cursor (deletes included, from tombstones) flagged `resync`.
//! This module must not parse files or compile code.

pub mod policy;
pub mod pool;
pub mod queue;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use serde::Serialize;

use crate::event::{Event, EventKind, EventSink, Subscription};
use crate::runtime::instance::{BatchReport, CallReport, LoadedPlugin, Sandbox};
use crate::runtime::{Limits, Runtime};
use crate::store::{CursorProbe, DeadLetter, IndexProbe, KeyEntry, SourceMeta, Store};
use crate::telemetry::{Metrics, Outcome};
pub use policy::{PluginMode, RetryPolicy, StartPosition};
use queue::EventQueue;

/// One version of a plugin with its routing and queue settings.
#[derive(Clone)]
pub struct PluginSpec {
    /// Code, host context and limits.
    pub loaded: LoadedPlugin,
    /// What it receives; empty means every source, every key.
    pub subscriptions: Vec<Subscription>,
    /// The operator's grants, as configured (the context holds them live).
    pub grants: crate::host::Grants,
    /// Queue capacity before folding.
    pub queue_capacity: usize,
    /// What a failed call leads to.
    pub retry: RetryPolicy,
    /// Where it starts when it has no cursor.
    pub start: StartPosition,
    /// In a cluster: one replica at a time, or every replica.
    pub mode: PluginMode,
    /// Most events per `handle-batch` call when a backlog has built up
    /// (1: one call per event).
    pub batch_max: usize,
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

/// Delivery bookkeeping of one source: the key index (with tombstones) and
/// the position counter, mirrored into the store.
struct SourceKeys {
    map: BTreeMap<Arc<str>, KeyEntry>,
    meta: SourceMeta,
    /// Positions are the store's revisions (etcd), so a resumed watch can
    /// replay them; otherwise positions count deliveries.
    revisioned: bool,
    /// Something was delivered in this process.
    live: bool,
    /// The identity to record with the next snapshot (a changed prefix).
    pending_identity: Option<String>,
    tombstones: usize,
    batches: u64,
    /// Keys changed since the store last took them.
    dirty: FastSet<Arc<str>>,
    meta_dirty: bool,
}

/// A set hashed with foldhash: keys are hashed on every delivery, and
/// SipHash showed up in the profile.
type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// The current keys of one source, in key order.
struct SourceCache {
    name: Arc<str>,
    keys: Mutex<SourceKeys>,
    /// The highest position whose index change is committed. Events of a
    /// source without history reach a plugin only once their change is
    /// durable: after a crash the relist diffs against the stored index,
    /// and a change the plugin saw but the index lost could never be
    /// undone (a delete would never come).
    committed: Arc<AtomicU64>,
    /// A wake-up for the writer is on its way.
    wake_sent: AtomicBool,
}

impl SourceCache {
    fn load(store: &Store, name: &str, revisioned: bool) -> SourceCache {
        let map = store.load_keys(name);
        let tombstones = map.values().filter(|e| e.value.is_none()).count();
        let meta = store.source_meta(name);
        SourceCache {
            name: Arc::from(name),
            committed: Arc::new(AtomicU64::new(meta.last_seq)),
            wake_sent: AtomicBool::new(false),
            keys: Mutex::new(SourceKeys {
                map,
                meta,
                revisioned,
                live: false,
                pending_identity: None,
                tombstones,
                batches: 0,
                dirty: FastSet::default(),
                meta_dirty: false,
            }),
        }
    }
}

impl IndexProbe for SourceCache {
    fn source(&self) -> Arc<str> {
        self.name.clone()
    }

    fn take_changes(&self) -> Option<crate::store::IndexChanges> {
        self.wake_sent.store(false, Ordering::SeqCst);
        let mut keys = self.keys.lock();
        if keys.dirty.is_empty() && !keys.meta_dirty {
            return None;
        }
        keys.meta_dirty = false;
        let dirty = std::mem::take(&mut keys.dirty);
        let changes = dirty
            .into_iter()
            .map(|k| {
                let e = keys.map.get(&k).cloned();
                (k, e)
            })
            .collect();
        Some((changes, keys.meta.clone()))
    }

    fn written(&self, last_seq: u64) {
        self.committed.fetch_max(last_seq, Ordering::SeqCst);
    }

    fn unwritten(&self, again: Vec<Arc<str>>) {
        let mut keys = self.keys.lock();
        keys.dirty.extend(again);
        keys.meta_dirty = true;
    }
}

impl SourceCache {
    /// Ask the store to commit soon.
    fn wake(&self, store: &Store) {
        if !self.wake_sent.swap(true, Ordering::SeqCst) {
            store.wake();
        }
    }
}

/// Successful calls in a row before a plugin gets batches again.
const HEALTHY_TO_BATCH: u32 = 16;

/// Most events a healthy plugin's worker takes from its queue at once when
/// each call gets one event (`batch_max = 1`); otherwise it takes one
/// call's worth.
const TAKE_AT_ONCE: usize = 64;

/// The longest its calls may take on average for a plugin to be pooled: a
/// pool thread is shared, so what it runs must be quick.
const QUICK_CALL: Duration = Duration::from_micros(250);

/// A pooled plugin whose calls in a round average more than this goes back
/// to its own thread.
const SLOW_CALL: Duration = Duration::from_millis(1);

/// Most events in one round on a pool thread, so a round stays short.
const POOLED_TAKE: usize = 32;

/// Quick, successful events in a row on its own thread before a plugin is
/// pooled (counted once it is healthy enough for batches); doubled each
/// time it leaves the pool, up to [`TO_POOL_MOST`], so a plugin that is
/// quick only now and then stops going back and forth. Kept low: until it
/// is pooled, every event costs a plugin a thread wake-up, and with a
/// hundred plugins starting at once those wake-ups were the worst
/// latencies of the fan-out benchmark (64 here made each plugin's first
/// 100 events wait two to three times longer than 16 does).
const TO_POOL_FIRST: u64 = HEALTHY_TO_BATCH as u64;
const TO_POOL_MOST: u64 = TO_POOL_FIRST << 12;

/// How often (in batches) a source prunes tombstones every plugin handled.
const PRUNE_EVERY: u64 = 64;

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
    dead_letters: AtomicU64,
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::ok,
    Outcome::error,
    Outcome::trap,
    Outcome::timeout,
    Outcome::out_of_fuel,
    Outcome::memory,
];

/// The metrics one worker updates on every event, looked up once.
struct Handles {
    calls: Vec<prometheus_client::metrics::counter::Counter>,
    seconds: prometheus_client::metrics::histogram::Histogram,
    depth: prometheus_client::metrics::gauge::Gauge,
    coalesced: prometheus_client::metrics::counter::Counter,
    overflow: prometheus_client::metrics::counter::Counter,
}

impl Handles {
    fn new(metrics: &Metrics, plugin: &str) -> Handles {
        let labels = Metrics::plugin(plugin);
        Handles {
            calls: OUTCOMES
                .iter()
                .map(|o| {
                    metrics
                        .plugin_invocations
                        .get_or_create(&crate::telemetry::OutcomeLabels {
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

/// The call state of one worker, used by whichever thread runs its rounds:
/// its own, or a pool thread while it is pooled.
struct Runner {
    sandbox: Sandbox,
    labels: crate::telemetry::PluginLabels,
    /// Failures are logged at most once a second per plugin; the rest are
    /// counted in the outcome metric and summarized in the next line.
    failures: FailureLog,
    /// Consecutive successful calls; batches only for a healthy plugin, so
    /// a failing or slow one is called (and limited) event by event.
    healthy: u32,
    /// Traps in a row, towards quarantine.
    traps: u32,
    /// Successful events in a row on the worker's own thread, in rounds
    /// that waited for nothing, and the time their rounds took.
    quick: u64,
    quick_time: Duration,
    /// How many of those pool the plugin.
    to_pool: u64,
    /// A failed first attempt the pool made on the event now at the front
    /// of the queue: the worker's own thread goes on with its retries.
    carried: Option<(EventId, CallReport)>,
}

/// Which event: source, position, key.
type EventId = (Arc<str>, u64, Arc<str>);

fn event_id(e: &Event) -> EventId {
    (e.source.clone(), e.seq, e.key.clone())
}

/// Failure lines of one worker, rate limited.
struct FailureLog {
    limiter: DefaultDirectRateLimiter,
    unlogged: u64,
}

/// A running plugin: its queue, settings and worker thread.
struct Worker {
    name: String,
    spec: ArcSwap<PluginSpec>,
    queue: Arc<EventQueue>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<WorkerStats>,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    /// Not dispatched on this replica (another owns it, or ownership is not
    /// established).
    parked: AtomicBool,
    /// The ownership's fencing token, passed to the plugin in each event's
    /// metadata as `fencing_token` (0: none).
    fencing: AtomicU64,
    /// Held for the duration of a call (with its retries), so parking can
    /// wait for the call in flight.
    calling: Mutex<()>,
    /// Sources this plugin takes nothing from until they restart and replay
    /// from its (handed-over) cursor: a live event now would move its
    /// position past the gap the replay must fill.
    awaiting_replay: Mutex<Vec<Arc<str>>>,
    /// `awaiting_replay` is not empty (read without the lock).
    awaiting: AtomicBool,
    /// Events taken from the queue for the call in progress.
    in_batch: std::sync::atomic::AtomicUsize,
    /// Told the queueing latency of each event when its call starts
    /// (benchmarks).
    observer: Arc<ArcSwapOption<Observer>>,
    handles: Handles,
    durable: Watermarks,
    /// Set while the plugin is quarantined after repeated traps.
    quarantine: Mutex<Option<Quarantine>>,
    /// The call state, held by the thread running a round.
    runner: Mutex<Runner>,
    /// Rounds run on the shared pool, not on the worker's own thread.
    pooled: AtomicBool,
    /// On the pool's run queue or in a round there.
    scheduled: AtomicBool,
    pool: Arc<pool::Pool<Worker>>,
}

impl pool::Task for Worker {
    fn run_round(self: Arc<Self>) {
        // Held only by the worker's own thread when not here: a plugin
        // taken back from the pool (a stale submission), or one just
        // pooled, whose own thread schedules it again as it lets go.
        if let Some(mut r) = self.runner.try_lock()
            && self.pooled.load(Ordering::SeqCst)
            && !self.pooled_round(&mut r)
        {
            self.pooled.store(false, Ordering::SeqCst);
            r.quick = 0;
            r.quick_time = Duration::ZERO;
            r.to_pool = (r.to_pool * 2).min(TO_POOL_MOST);
        }
        // Read-modify-write, so a producer's `kick` that found it still
        // scheduled is seen below (its events, queued before).
        self.scheduled.swap(false, Ordering::SeqCst);
        if self.pooled.load(Ordering::SeqCst) {
            self.kick();
        } else {
            self.unpark();
        }
    }

    fn abandon(&self) {
        self.pooled.store(false, Ordering::SeqCst);
        self.scheduled.store(false, Ordering::SeqCst);
        self.unpark();
    }
}

/// A plugin set aside after `quarantine_after` traps in a row. Its events
/// stay queued (folded by key when the queue is full); one at a time is
/// tried as a probe, with a growing wait between probes. A probe that does
/// not trap ends the quarantine. An event that traps on as many probes as
/// the plugin's retry attempts becomes a dead letter, so one poisonous
/// event cannot hold the rest back forever.
#[derive(Debug)]
struct Quarantine {
    since: SystemTime,
    probes: u32,
    next_probe: std::time::Instant,
    /// The event probed last, and how often it trapped.
    head: Option<(Arc<str>, u64, String)>,
    head_attempts: u32,
}

/// The quarantine in `/v1/plugins`.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineReport {
    /// Seconds since the Unix epoch when it began.
    pub since: u64,
    /// Probes made so far.
    pub probes: u32,
    /// Milliseconds until the next probe (0: as soon as an event waits).
    pub next_probe_in_ms: u64,
}

/// Outcomes that mean the plugin itself broke (as opposed to a handler
/// returning an error): these count towards quarantine.
fn is_trap(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::trap | Outcome::timeout | Outcome::out_of_fuel | Outcome::memory
    )
}

/// How [`Worker::handle_one`] ended.
enum Handled {
    /// Complete (handled or dead-lettered); whether the first attempt
    /// succeeded.
    Done(bool),
    /// A stop or park interrupted it; the event stays pending.
    Interrupted,
    /// The plugin was quarantined; the event was not completed.
    Quarantined,
}

/// Receives (plugin, time from delivery to the start of its call).
pub type Observer = Box<dyn Fn(&str, Duration) + Send + Sync>;

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
    /// Calls per event before it is dead-lettered.
    pub retry_attempts: u32,
    /// Dead letters kept for this plugin.
    pub dead_letters: u64,
    /// Per source: every event at or below this position was handled.
    pub cursors: BTreeMap<String, u64>,
    /// In a cluster: `"single"` or `"every-replica"`.
    pub mode: &'static str,
    /// In a cluster: not run on this replica now.
    pub parked: bool,
    /// `running`, `quarantined` or `parked`.
    pub state: &'static str,
    /// Its calls run on the shared pool of threads (a quick, healthy
    /// plugin when there are more plugins than cores), not on its own
    /// thread.
    pub pooled: bool,
    /// Set while quarantined.
    pub quarantine: Option<QuarantineReport>,
    /// What the plugin says about itself (its embedded manifest).
    pub manifest: Option<crate::manifest::Manifest>,
    /// Capabilities requested by the manifest against those granted.
    pub capabilities: crate::manifest::CapabilityReport,
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
        d: &Dispatcher,
        spec: PluginSpec,
        queue: Arc<EventQueue>,
        parked: bool,
    ) -> std::io::Result<Arc<Worker>> {
        let (runtime, metrics, store) = (d.runtime.clone(), d.metrics.clone(), d.store.clone());
        let (observer, durable) = (d.observer.clone(), d.durable.clone());
        let name = spec.loaded.ctx.name.clone();
        let runner = Runner {
            sandbox: Sandbox::new(runtime),
            labels: Metrics::plugin(&name),
            failures: FailureLog {
                limiter: RateLimiter::direct(Quota::per_second(NonZeroU32::MIN)),
                unlogged: 0,
            },
            healthy: HEALTHY_TO_BATCH,
            traps: 0,
            quick: 0,
            quick_time: Duration::ZERO,
            to_pool: TO_POOL_FIRST,
            carried: None,
        };
        let stats = WorkerStats::default();
        stats
            .dead_letters
            .store(store.dead_letters(&name).len() as u64, Ordering::Relaxed);
        let handles = Handles::new(&metrics, &name);
        let worker = Arc::new(Worker {
            name: name.clone(),
            queue,
            spec: ArcSwap::from_pointee(spec),
            stop: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            stats: Arc::new(stats),
            metrics,
            store,
            parked: AtomicBool::new(parked),
            fencing: AtomicU64::new(0),
            calling: Mutex::new(()),
            awaiting_replay: Mutex::new(Vec::new()),
            awaiting: AtomicBool::new(false),
            in_batch: std::sync::atomic::AtomicUsize::new(0),
            observer,
            handles,
            durable,
            quarantine: Mutex::new(None),
            runner: Mutex::new(runner),
            pooled: AtomicBool::new(false),
            scheduled: AtomicBool::new(false),
            pool: d.pool.clone(),
        });
        let w = worker.clone();
        let handle = std::thread::Builder::new()
            .name(format!("plugin-{name}"))
            .spawn(move || w.run())?;
        *worker.thread.lock() = Some(handle);
        worker.pool.count(true);
        let weak = Arc::downgrade(&worker);
        worker.queue.on_push(Box::new(move || {
            if let Some(w) = weak.upgrade() {
                w.kick();
            }
        }));
        worker
            .store
            .register(&name, worker.queue.clone() as Arc<dyn CursorProbe>);
        Ok(worker)
    }

    /// The worker thread: rounds of the queue while the plugin is not
    /// pooled; asleep while it is (a pool thread runs its rounds then).
    fn run(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            if self.pooled.load(Ordering::SeqCst) {
                if !self.pool.is_closed() {
                    std::thread::park_timeout(Duration::from_millis(200));
                    continue;
                }
                // The pool is gone (shutdown): take the plugin back.
                self.pooled.store(false, Ordering::SeqCst);
            }
            let mut runner = self.runner.lock();
            if self.pooled.load(Ordering::SeqCst) {
                continue;
            }
            self.round(&mut runner);
            let pooled = runner.quick >= runner.to_pool
                && runner.quick_time < QUICK_CALL * u32::try_from(runner.quick).unwrap_or(u32::MAX)
                && self.pool.worthwhile()
                && !self.stop.load(Ordering::SeqCst)
                && !self.parked.load(Ordering::SeqCst);
            if pooled {
                runner.quick = 0;
                runner.quick_time = Duration::ZERO;
                self.pooled.store(true, Ordering::SeqCst);
            }
            drop(runner);
            if pooled {
                self.kick();
            }
        }
        self.handles.depth.set(0);
    }

    /// One round of the worker loop, in queue order. With a backlog several
    /// events go to the plugin in one `handle-batch` call; a batch that
    /// fails falls back to one call per remaining event. A failed call is
    /// retried with backoff; after the last attempt the event becomes a
    /// dead letter. Either way it is then complete and the cursor moves past
    /// it; an event interrupted by a stop or a park stays pending.
    fn round(&self, r: &mut Runner) {
        let depth = &self.handles.depth;
        let probe_at = self.quarantine.lock().as_ref().map(|q| q.next_probe);
        if let Some(at) = probe_at {
            // Re-read each time round: a new version is probed at once.
            let left = at.saturating_duration_since(std::time::Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left.min(Duration::from_millis(50)));
                return;
            }
        }
        // A healthy plugin takes a backlog in one go, however many events
        // each call gets: one lock and one completion for the lot. A
        // failing one takes one event at a time, so what waits stays in the
        // queue, where later changes can fold into it.
        let per_call = self.spec.load().batch_max;
        let max = if probe_at.is_some() || r.healthy < HEALTHY_TO_BATCH {
            1
        } else {
            Self::take_at_once(per_call)
        };
        let batch = self.queue.pop_many(max, Duration::from_millis(200));
        depth.set(self.depth() as i64);
        if batch.is_empty() {
            return;
        }
        self.in_batch.store(batch.len(), Ordering::SeqCst);
        depth.set(self.depth() as i64);
        let calling = self.calling.lock();
        if self.parked.load(Ordering::SeqCst) {
            // Parked meanwhile: the events stay pending for the owner.
            self.in_batch.store(0, Ordering::SeqCst);
            return;
        }
        let batch = self.fenced(batch);
        let waited = !self.committed(&batch);
        if waited && !self.wait_durable(&batch) {
            self.in_batch.store(0, Ordering::SeqCst);
            return;
        }
        self.observe(&batch);
        let started = std::time::Instant::now();
        let mut batch = batch;
        // A first attempt the pool made on this event before handing the
        // plugin back.
        let mut prior = r
            .carried
            .take()
            .filter(|(id, _)| *id == event_id(&batch[0]))
            .map(|(_, report)| report);
        if probe_at.is_some() {
            let event = &batch[0];
            let spec = self.spec.load_full();
            let report = r.sandbox.call(&spec.loaded, event);
            if is_trap(report.outcome) {
                self.record(
                    event,
                    report.outcome,
                    report.elapsed.as_secs_f64(),
                    Some(&report),
                );
                self.probe_failed(event, &report, &spec);
                self.in_batch.store(0, Ordering::SeqCst);
                return;
            }
            self.leave_quarantine();
            r.traps = 0;
            r.healthy = 0;
            prior = Some(report);
        }
        let mut in_batch_call = 0;
        if batch.len() > 1 && per_call > 1 && prior.is_none() {
            let spec = self.spec.load_full();
            let report = self.call_batch(r, &spec, &batch);
            in_batch_call = report.handled;
            let mut rest = batch.split_off(report.handled);
            self.queue.complete_and_retire(std::mem::take(&mut batch));
            if report.failure.is_some() {
                // One call per event until the plugin is healthy again.
                r.healthy = 0;
            }
            if report.attributed && !rest.is_empty() {
                // The handler's error on the first remaining event is its
                // first attempt; the others go back to the queue.
                prior = report.failure;
                let others = rest.split_off(1);
                self.queue.requeue_front(others);
                batch = rest;
            } else {
                // All handled, or a trap or limit somewhere in the batch:
                // what is left goes back, to be called one by one.
                self.queue.requeue_front(rest);
                batch = Vec::new();
            }
            self.in_batch.store(batch.len(), Ordering::SeqCst);
            depth.set(self.depth() as i64);
        } else if batch.len() > 1 && prior.is_none() && r.healthy >= HEALTHY_TO_BATCH {
            // A healthy plugin, one call per event: straight calls while
            // they succeed; the first failure goes on below as the first
            // attempt of its event.
            let spec = self.spec.load_full();
            let (handled, failure) = self.call_each(r, &spec, &batch);
            in_batch_call = handled;
            r.healthy = r
                .healthy
                .saturating_add(u32::try_from(handled).unwrap_or(u32::MAX));
            let rest = batch.split_off(handled);
            self.queue
                .complete_and_retire(std::mem::replace(&mut batch, rest));
            prior = failure;
            self.in_batch.store(batch.len(), Ordering::SeqCst);
        }
        let mut done = 0;
        for (i, event) in batch.iter().enumerate() {
            if self.stop.load(Ordering::Relaxed) || self.parked.load(Ordering::Relaxed) {
                break;
            }
            let handled = self.handle_one(r, event, prior.take());
            if matches!(handled, Handled::Done(_)) {
                done = i + 1;
            }
            match handled {
                Handled::Done(true) => r.healthy = r.healthy.saturating_add(1),
                Handled::Done(false) => r.healthy = 0,
                Handled::Interrupted => break,
                Handled::Quarantined => {
                    // This event and the rest wait for the probes.
                    self.queue.requeue_front(batch[i..].to_vec());
                    r.healthy = 0;
                    break;
                }
            }
        }
        // The rest stays pending (stopped or parked) or went back to the
        // queue (quarantined).
        batch.truncate(done);
        self.queue.complete_and_retire(batch);
        self.in_batch.store(0, Ordering::SeqCst);
        drop(calling);
        // Towards the pool: quick, successful rounds that waited for
        // nothing.
        if !waited && probe_at.is_none() && r.healthy >= HEALTHY_TO_BATCH {
            r.quick = r.quick.saturating_add((in_batch_call + done) as u64);
            r.quick_time += started.elapsed();
        } else {
            r.quick = 0;
            r.quick_time = Duration::ZERO;
        }
    }

    /// Most events to take from the queue in one round of a healthy
    /// plugin.
    fn take_at_once(per_call: usize) -> usize {
        if per_call > 1 { per_call } else { TAKE_AT_ONCE }
    }

    /// Each event with the ownership's fencing token in its metadata (set,
    /// or replaced when the event went round once already).
    fn fenced(&self, batch: Vec<Event>) -> Vec<Event> {
        let token = self.fencing.load(Ordering::SeqCst);
        if token == 0 {
            return batch;
        }
        batch
            .into_iter()
            .map(|mut e| {
                let value = token.to_string();
                match e.metadata.iter_mut().find(|(k, _)| k == "fencing_token") {
                    Some(entry) => entry.1 = value,
                    None => e.metadata.push(("fencing_token".to_owned(), value)),
                }
                e
            })
            .collect()
    }

    /// Tell the observer (benchmarks) each event's queueing latency.
    fn observe(&self, batch: &[Event]) {
        if let Some(observe) = self.observer.load().as_ref() {
            let now = std::time::Instant::now();
            for e in batch {
                if let Some(at) = e.delivered_at {
                    observe(&self.name, now.saturating_duration_since(at));
                }
            }
        }
    }

    /// One `handle-batch` call; the events it handled are recorded, each
    /// with an equal share of its time (the caller completes them).
    fn call_batch(&self, r: &mut Runner, spec: &PluginSpec, batch: &[Event]) -> BatchReport {
        let report = r.sandbox.call_batch(&spec.loaded, batch);
        let each = report.elapsed.as_secs_f64() / batch.len() as f64;
        for e in &batch[..report.handled] {
            self.handles.seconds.observe(each);
            self.succeeded(e);
        }
        self.count_ok(report.handled);
        report
    }

    /// One call per event while they succeed (and the plugin is neither
    /// stopped nor parked): the number that did, and the report of the call
    /// that did not (not recorded: it is the first attempt of that event's
    /// retries).
    fn call_each(
        &self,
        r: &mut Runner,
        spec: &PluginSpec,
        batch: &[Event],
    ) -> (usize, Option<CallReport>) {
        // Each call is timed from the end of the one before (so with this
        // loop's own bookkeeping): one clock read per call.
        let mut start = std::time::Instant::now();
        let mut failure = None;
        let mut done = 0;
        for e in batch {
            if self.stop.load(Ordering::Relaxed) || self.parked.load(Ordering::Relaxed) {
                // The rest stays pending.
                break;
            }
            let report = r.sandbox.call_since(&spec.loaded, e, start);
            start += report.elapsed;
            if report.outcome != Outcome::ok {
                failure = Some(report);
                break;
            }
            self.handles.seconds.observe(report.elapsed.as_secs_f64());
            self.succeeded(e);
            done += 1;
        }
        self.count_ok(done);
        (done, failure)
    }

    /// Count `n` successful calls (their times are observed one by one) in
    /// one step each for the metric and the stats, rather than per call.
    fn count_ok(&self, n: usize) {
        const { assert!(matches!(OUTCOMES[0], Outcome::ok)) };
        if n > 0 {
            self.handles.calls[0].inc_by(n as u64);
            self.stats.calls[0].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Put the plugin on the pool's run queue if it is pooled, has events
    /// waiting, and is not there already.
    fn kick(self: &Arc<Self>) {
        if self.pooled.load(Ordering::SeqCst)
            && !self.queue.is_empty()
            && !self.scheduled.swap(true, Ordering::SeqCst)
        {
            self.pool.submit(self.clone());
        }
    }

    /// Wake the worker's own thread (it has the plugin back, or stops).
    fn unpark(&self) {
        if let Some(t) = self.thread.lock().as_ref() {
            t.thread().unpark();
        }
    }

    /// One round on a pool thread: up to one batch's worth of events, each
    /// called once. False when the plugin must go back to its own thread:
    /// a call failed (its retries are waited for there, the failed attempt
    /// carried over), the round was slow, or the plugin has to wait for
    /// something (a commit, a quarantine, a park, a stop).
    fn pooled_round(&self, r: &mut Runner) -> bool {
        if self.stop.load(Ordering::SeqCst)
            || self.parked.load(Ordering::SeqCst)
            || r.healthy < HEALTHY_TO_BATCH
            || self.quarantine.lock().is_some()
        {
            return false;
        }
        let spec = self.spec.load_full();
        let per_call = spec.batch_max;
        let batch = self
            .queue
            .take_many(Self::take_at_once(per_call).min(POOLED_TAKE));
        if batch.is_empty() {
            return true;
        }
        self.in_batch.store(batch.len(), Ordering::SeqCst);
        let calling = self.calling.lock();
        if self.parked.load(Ordering::SeqCst) {
            // Parked meanwhile: the events stay pending for the owner.
            self.in_batch.store(0, Ordering::SeqCst);
            return false;
        }
        let mut batch = self.fenced(batch);
        if !self.committed(&batch) {
            self.queue.requeue_front(batch);
            self.in_batch.store(0, Ordering::SeqCst);
            return false;
        }
        self.observe(&batch);
        let started = std::time::Instant::now();
        let mut failed = false;
        let done = if batch.len() > 1 && per_call > 1 {
            let report = self.call_batch(r, &spec, &batch);
            if let Some(failure) = report.failure {
                failed = true;
                if report.attributed && report.handled < batch.len() {
                    r.carried = Some((event_id(&batch[report.handled]), failure));
                }
            }
            report.handled
        } else {
            let (done, failure) = self.call_each(r, &spec, &batch);
            if let Some(report) = failure {
                // Its own thread records it as the first attempt.
                r.carried = Some((event_id(&batch[done]), report));
                failed = true;
            }
            done
        };
        let elapsed = started.elapsed();
        let rest = batch.split_off(done);
        self.queue.complete_and_retire(batch);
        self.queue.requeue_front(rest);
        self.in_batch.store(0, Ordering::SeqCst);
        self.handles.depth.set(self.depth() as i64);
        drop(calling);
        if failed {
            r.healthy = 0;
            return false;
        }
        r.healthy = r
            .healthy
            .saturating_add(u32::try_from(done).unwrap_or(u32::MAX));
        elapsed < SLOW_CALL * u32::try_from(done.max(1)).unwrap_or(u32::MAX)
    }

    /// One event with retries, then a dead letter. `prior` is a first
    /// attempt already made (in a batch, or as a probe). `traps` counts
    /// traps in a row; reaching the plugin's `quarantine_after` quarantines
    /// it and leaves the event to the caller.
    fn handle_one(&self, r: &mut Runner, event: &Event, prior: Option<CallReport>) -> Handled {
        let Runner {
            sandbox,
            labels,
            failures,
            traps,
            ..
        } = r;
        let quarantines = |outcome: Outcome, traps: &mut u32| {
            if is_trap(outcome) {
                *traps += 1;
            } else {
                *traps = 0;
            }
            let k = self.spec.load().retry.quarantine_after;
            k > 0 && *traps >= k
        };
        let mut attempt = 1;
        let mut report = match prior {
            Some(r) => {
                self.record(event, r.outcome, r.elapsed.as_secs_f64(), Some(&r));
                r
            }
            None => {
                let spec = self.spec.load_full();
                let r = sandbox.call(&spec.loaded, event);
                self.record(event, r.outcome, r.elapsed.as_secs_f64(), Some(&r));
                r
            }
        };
        let first_ok = report.outcome == Outcome::ok;
        loop {
            if quarantines(report.outcome, traps) {
                self.enter_quarantine(*traps, &report);
                return Handled::Quarantined;
            }
            let spec = self.spec.load_full();
            if report.outcome == Outcome::ok || attempt >= spec.retry.attempts {
                break;
            }
            if !self.pause(spec.retry.delay(attempt)) {
                // Stopped or parked while waiting to retry: the event stays
                // pending and is delivered again after a restart (or by the
                // next owner).
                return Handled::Interrupted;
            }
            self.metrics.plugin_retries.get_or_create(labels).inc();
            attempt += 1;
            report = sandbox.call(&spec.loaded, event);
            self.record(
                event,
                report.outcome,
                report.elapsed.as_secs_f64(),
                Some(&report),
            );
        }
        // The caller completes the event in the queue (with the others of
        // its batch).
        if report.outcome == Outcome::ok {
            self.succeeded(event);
        } else {
            let letter = self.dead_letter(event, &report, attempt);
            if failures.limiter.check().is_ok() {
                tracing::warn!(
                    plugin = %self.name,
                    source = %event.source,
                    key = %event.key,
                    revision = event.revision,
                    outcome = report.outcome.as_str(),
                    attempts = attempt,
                    dead_letter = letter,
                    suppressed = failures.unlogged,
                    error = report.message.as_deref().unwrap_or(""),
                    "Plugin call failed on every attempt; the event was kept as a dead letter."
                );
                failures.unlogged = 0;
            } else {
                failures.unlogged += 1;
                self.metrics.suppressed(&format!("plugin/{}", self.name));
            }
        }
        Handled::Done(first_ok)
    }

    fn set_quarantined(&self, on: bool) {
        self.metrics
            .plugin_quarantined
            .get_or_create(&Metrics::plugin(&self.name))
            .set(i64::from(on));
    }

    fn enter_quarantine(&self, traps: u32, report: &CallReport) {
        let delay = self.spec.load().retry.probe_delay(1);
        *self.quarantine.lock() = Some(Quarantine {
            since: SystemTime::now(),
            probes: 0,
            next_probe: std::time::Instant::now() + delay,
            head: None,
            head_attempts: 0,
        });
        self.set_quarantined(true);
        tracing::warn!(
            plugin = %self.name,
            traps,
            outcome = report.outcome.as_str(),
            error = report.message.as_deref().unwrap_or(""),
            probe_in_ms = delay.as_millis() as u64,
            "Plugin quarantined after trapping on every recent call; its events are kept and it will be probed again."
        );
    }

    fn leave_quarantine(&self) {
        let probes = self.quarantine.lock().take().map_or(0, |q| q.probes);
        self.set_quarantined(false);
        tracing::info!(plugin = %self.name, probes, "Plugin left quarantine: a probe call did not trap.");
    }

    /// A probe trapped: wait longer for the next one; the event is probed
    /// again, or dead-lettered once it trapped on as many probes as the
    /// plugin's retry attempts.
    fn probe_failed(&self, event: &Event, report: &CallReport, spec: &PluginSpec) {
        let id = (event.source.clone(), event.seq, event.key.to_string());
        let (attempts, probes) = {
            let mut q = self.quarantine.lock();
            let Some(q) = q.as_mut() else {
                return;
            };
            q.probes += 1;
            q.next_probe = std::time::Instant::now() + spec.retry.probe_delay(q.probes + 1);
            if q.head.as_ref() == Some(&id) {
                q.head_attempts += 1;
            } else {
                q.head = Some(id);
                q.head_attempts = 1;
            }
            (q.head_attempts, q.probes)
        };
        if attempts >= spec.retry.attempts {
            let letter = self.dead_letter(event, report, attempts);
            tracing::warn!(
                plugin = %self.name,
                source = %event.source,
                key = %event.key,
                dead_letter = letter,
                probes,
                "Quarantined plugin trapped on this event at every probe; it was kept as a dead letter."
            );
            self.queue.complete(event);
        } else {
            self.queue.requeue_front(vec![event.clone()]);
        }
    }

    /// A new version arrived: probe it at once.
    fn probe_now(&self) {
        if let Some(q) = self.quarantine.lock().as_mut() {
            q.next_probe = std::time::Instant::now();
        }
    }

    /// A replayed dead letter succeeded: forget it.
    fn succeeded(&self, event: &Event) {
        if let Some(id) = event.dead_letter {
            self.store.remove_dead_letter(&self.name, id);
            self.stats.dead_letters.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether the index changes of `batch` are committed already (sources
    /// without history; see [`SourceCache::committed`]).
    fn committed(&self, batch: &[Event]) -> bool {
        // No source without history: nothing to look up (the hot path of
        // an etcd-only gateway).
        self.durable.is_empty()
            || batch.iter().filter(|e| e.seq > 0).all(|e| {
                self.durable
                    .get(&*e.source)
                    .is_none_or(|m| m.value().load(Ordering::SeqCst) >= e.seq)
            })
    }

    /// Wait until the index changes of `batch` are committed. False when
    /// stopped or parked meanwhile (the events stay pending).
    fn wait_durable(&self, batch: &[Event]) -> bool {
        while !self.committed(batch) {
            if self.stop.load(Ordering::SeqCst) || self.parked.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_micros(250));
        }
        true
    }

    /// Events waiting: queued, plus taken into the batch in progress.
    fn depth(&self) -> usize {
        self.queue.len() + self.in_batch.load(Ordering::SeqCst)
    }

    /// Whether a delivery of `source` passes this plugin by: parked, not
    /// subscribed, or waiting for the source to replay.
    fn skips(&self, source: &str, spec: &PluginSpec) -> bool {
        self.parked.load(Ordering::SeqCst)
            || !spec.subscribes_to(source)
            || (self.awaiting.load(Ordering::SeqCst)
                && self.awaiting_replay.lock().iter().any(|s| &**s == source))
    }

    /// Wait `delay` unless stopped or parked meanwhile; false then.
    fn pause(&self, delay: Duration) -> bool {
        let until = std::time::Instant::now() + delay;
        while !self.stop.load(Ordering::SeqCst) && !self.parked.load(Ordering::SeqCst) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        false
    }

    /// Keep `event` as a dead letter (replacing the one it replayed);
    /// returns its id.
    fn dead_letter(&self, event: &Event, report: &CallReport, attempts: u32) -> u64 {
        if let Some(old) = event.dead_letter {
            self.store.remove_dead_letter(&self.name, old);
        } else {
            self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics
            .dead_letters
            .get_or_create(&Metrics::plugin(&self.name))
            .inc();
        let letter = self.store.add_dead_letter(
            &self.name,
            DeadLetter {
                id: 0,
                event: event.to_line(),
                seq: event.seq,
                outcome: report.outcome.as_str().to_owned(),
                error: report.message.clone().unwrap_or_default(),
                attempts,
                at: 0,
            },
        );
        letter.id
    }

    fn record(&self, event: &Event, outcome: Outcome, seconds: f64, report: Option<&CallReport>) {
        self.handles.seconds.observe(seconds);
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.handles.calls[i].inc();
            self.stats.calls[i].fetch_add(1, Ordering::Relaxed);
        }
        if outcome != Outcome::ok {
            *self.stats.last_failure.lock() = Some(LastFailure {
                outcome,
                key: event.key.to_string(),
                message: report.and_then(|r| r.message.clone()).unwrap_or_default(),
                at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            });
        }
    }

    /// Queue the matching events of one delivery of `source` up to `upto`.
    fn enqueue(&self, source: &Arc<str>, upto: u64, events: Vec<Event>) {
        let stats = self.queue.push_batch(source, upto, events);
        self.count(stats);
    }

    fn count(&self, stats: queue::PushStats) {
        if stats.queued + stats.coalesced == 0 {
            return;
        }
        let depth = stats.len + self.in_batch.load(Ordering::Relaxed);
        if stats.coalesced > 0 {
            self.handles.coalesced.inc_by(stats.coalesced as u64);
        }
        if stats.overflow > 0 {
            self.handles.overflow.inc_by(stats.overflow as u64);
        }
        self.handles.depth.set(depth as i64);
    }

    /// Stop taking events and wait for the worker thread; an in-flight call
    /// finishes or hits its deadline first. Queued events stay below the
    /// cursor, so a restart delivers them again. Blocking: call off the
    /// async workers.
    fn stop_and_join(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let left = self.queue.close();
        if left > 0 {
            tracing::info!(
                plugin = %self.name,
                queued = left,
                "Plugin stopped with events queued; its cursor stays before them, so they are delivered after a restart."
            );
        }
        let thread = self.thread.lock().take();
        if let Some(t) = thread {
            t.thread().unpark();
            let _ = t.join();
        }
        self.pool.count(false);
        if self.quarantine.lock().take().is_some() {
            self.set_quarantined(false);
        }
        self.store.unregister(&self.name);
        self.metrics
            .plugin_queue_depth
            .get_or_create(&Metrics::plugin(&self.name))
            .set(0);
    }

    fn report(&self) -> PluginReport {
        let spec = self.spec.load();
        let quarantine = self.quarantine.lock().as_ref().map(|q| QuarantineReport {
            since: q
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            probes: q.probes,
            next_probe_in_ms: q
                .next_probe
                .saturating_duration_since(std::time::Instant::now())
                .as_millis() as u64,
        });
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
            queue_depth: self.depth(),
            queue_capacity: spec.queue_capacity,
            invocations: OUTCOMES
                .iter()
                .zip(&self.stats.calls)
                .map(|(o, c)| (o.as_str().to_owned(), c.load(Ordering::Relaxed)))
                .collect(),
            last_failure: self.stats.last_failure.lock().clone(),
            retry_attempts: spec.retry.attempts,
            dead_letters: self.stats.dead_letters.load(Ordering::Relaxed),
            cursors: self
                .queue
                .cursor_positions()
                .into_iter()
                .map(|(s, c)| (s.to_string(), c))
                .collect(),
            mode: match spec.mode {
                PluginMode::Single => "single",
                PluginMode::EveryReplica => "every-replica",
            },
            parked: self.parked.load(Ordering::Relaxed),
            state: if self.parked.load(Ordering::Relaxed) {
                "parked"
            } else if quarantine.is_some() {
                "quarantined"
            } else {
                "running"
            },
            quarantine,
            pooled: self.pooled.load(Ordering::Relaxed),
            manifest: spec.loaded.compiled.manifest.as_deref().cloned(),
            capabilities: crate::manifest::CapabilityReport::new(
                spec.loaded.compiled.manifest.as_deref(),
                spec.loaded.ctx.granted(),
            ),
        }
    }
}

impl crate::host::snapshot::SnapshotReader for Dispatcher {
    fn value(&self, source: &str, key: &str) -> Option<Option<Bytes>> {
        let cache = self.caches.get(source)?.clone();
        let keys = cache.keys.lock();
        Some(keys.map.get(key).and_then(|e| e.value.clone()))
    }

    fn scan(
        &self,
        source: &str,
        prefix: &str,
        keep: &dyn Fn(&str) -> bool,
        limit: usize,
    ) -> Option<Vec<(String, Bytes)>> {
        let cache = self.caches.get(source)?.clone();
        let keys = cache.keys.lock();
        Some(
            keys.map
                .range::<str, _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(k, _)| keep(k))
                .filter_map(|(k, e)| Some((k.to_string(), e.value.clone()?)))
                .take(limit)
                .collect(),
        )
    }
}

/// Routes source events to plugin queues. Shared by every source (as their
/// [`EventSink`]) and the plugin loader.
pub struct Dispatcher {
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    caches: DashMap<String, Arc<SourceCache>>,
    workers: DashMap<String, Arc<Worker>>,
    /// The workers as one list, for the delivery path: replaced (under
    /// `roster_lock`) whenever `workers` changes.
    roster: ArcSwap<Vec<Arc<Worker>>>,
    roster_lock: Mutex<()>,
    clustered: AtomicBool,
    observer: Arc<ArcSwapOption<Observer>>,
    durable: Watermarks,
    /// Threads shared by quick plugins once there are more plugins than
    /// cores.
    pool: Arc<pool::Pool<Worker>>,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.pool.close();
    }
}

/// Per source without history: the highest position committed.
type Watermarks = Arc<DashMap<String, Arc<AtomicU64>>>;

impl SourceKeys {
    /// Give each event of one delivery its position; returns the highest.
    fn assign(&mut self, events: &mut [Event]) -> u64 {
        if self.revisioned {
            for e in events.iter_mut() {
                e.seq = e.revision + self.meta.offset;
            }
            let hi = events.iter().map(|e| e.seq).max().unwrap_or(0);
            self.meta.last_seq = self.meta.last_seq.max(hi);
            hi
        } else {
            self.meta.last_seq += 1;
            for e in events.iter_mut() {
                e.seq = self.meta.last_seq;
            }
            self.meta.last_seq
        }
    }

    /// The position of a snapshot taken at the source's `revision`: always
    /// a new one. A source whose revisions went back (a replaced cluster)
    /// gets a larger offset, so positions never repeat.
    fn snapshot_position(&mut self, revision: u64) -> u64 {
        let upto = if self.revisioned {
            let p = revision + self.meta.offset;
            if p <= self.meta.last_seq {
                self.meta.offset = self.meta.last_seq + 1 - revision;
                self.meta.last_seq + 1
            } else {
                p
            }
        } else {
            self.meta.last_seq + 1
        };
        self.meta.last_seq = upto;
        upto
    }

    /// Record `events` in the index (the store takes them from there). Each
    /// event's key becomes the index's own copy of it, so queueing copies
    /// no key and no thread frees a key another thread allocated (a
    /// cross-thread free takes the allocator's arena lock).
    fn apply(&mut self, events: &mut [Event]) {
        for e in events {
            let entry = KeyEntry {
                value: if e.kind == EventKind::Put {
                    e.value.clone()
                } else {
                    None
                },
                revision: e.revision,
                seq: e.seq,
                metadata: if e.kind == EventKind::Put {
                    e.metadata.clone()
                } else {
                    Vec::new()
                },
            };
            let is_tombstone = entry.value.is_none();
            let was_tombstone = match self.map.entry(e.key.clone()) {
                std::collections::btree_map::Entry::Occupied(mut slot) => {
                    e.key = slot.key().clone();
                    Some(slot.insert(entry).value.is_none())
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(entry);
                    None
                }
            };
            match (was_tombstone, is_tombstone) {
                (Some(false) | None, true) => self.tombstones += 1,
                (Some(true), false) => self.tombstones -= 1,
                _ => {}
            }
            if !self.dirty.contains(&*e.key) {
                self.dirty.insert(e.key.clone());
            }
        }
        self.meta_dirty = true;
        self.live = true;
    }

    /// The index entries `spec` has not been given: in `scope`, changed
    /// after `from` and before `upto`, as resync events at `upto`.
    fn missed(
        &self,
        name: &Arc<str>,
        spec: &PluginSpec,
        scope: &dyn Fn(&str) -> bool,
        from: u64,
        upto: u64,
    ) -> Vec<Event> {
        self.map
            .iter()
            .filter(|(k, e)| e.seq > from && e.seq < upto && scope(k) && spec.matches(name, k))
            .map(|(k, e)| {
                let mut ev = match &e.value {
                    Some(v) => {
                        let mut ev = Event::put(name, k.clone(), v.clone(), e.revision);
                        ev.metadata = e.metadata.clone();
                        ev
                    }
                    None => Event::delete(name, k.clone(), e.revision),
                };
                ev.resync = true;
                ev.seq = e.seq;
                ev
            })
            .collect()
    }

    /// The live keys matching `spec`, as puts at their own positions.
    fn current(&self, name: &Arc<str>, spec: &PluginSpec, resync: bool) -> Vec<Event> {
        self.map
            .iter()
            .filter(|(k, _)| spec.matches(name, k))
            .filter_map(|(k, e)| {
                let v = e.value.as_ref()?;
                let mut ev = Event::put(name, k.clone(), v.clone(), e.revision);
                ev.metadata = e.metadata.clone();
                ev.resync = resync;
                ev.seq = e.seq;
                Some(ev)
            })
            .collect()
    }
}

impl Dispatcher {
    /// A dispatcher for the named sources (with whether each has a
    /// revision history a watch can resume in), restoring their key
    /// indexes from `store`.
    pub fn new(
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
        sources: impl IntoIterator<Item = (String, bool)>,
    ) -> Arc<Dispatcher> {
        let durable: Watermarks = Arc::default();
        let caches = sources
            .into_iter()
            .map(|(s, revisioned)| {
                let cache = Arc::new(SourceCache::load(&store, &s, revisioned));
                store.register_index(cache.clone());
                if !revisioned {
                    durable.insert(s.clone(), cache.committed.clone());
                }
                (s, cache)
            })
            .collect();
        Arc::new(Dispatcher {
            runtime,
            metrics,
            store,
            caches,
            workers: DashMap::new(),
            roster: ArcSwap::from_pointee(Vec::new()),
            roster_lock: Mutex::new(()),
            clustered: AtomicBool::new(false),
            observer: Arc::default(),
            durable,
            pool: pool::Pool::start(
                std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            ),
        })
    }

    /// The state store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
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

    /// Start a plugin, or replace the running version of it (which keeps
    /// its queue and cursors; an in-flight call finishes on the old
    /// version). A plugin with a stored cursor resumes from it: it is given
    /// what it missed when the source has already delivered in this
    /// process, or else by the source's own start (a replayed watch, or a
    /// relist diffed against the index). A plugin without a cursor starts
    /// per its `start` setting.
    ///
    /// # Errors
    /// When the worker thread cannot be started.
    pub fn upsert(&self, spec: PluginSpec) -> std::io::Result<()> {
        let name = spec.loaded.ctx.name.clone();
        if let Some(w) = self.workers.get(&name).map(|w| w.clone()) {
            let every = spec.mode == PluginMode::EveryReplica;
            w.queue.set_capacity(spec.queue_capacity);
            w.spec.store(Arc::new(spec));
            w.probe_now();
            if every && w.parked.load(Ordering::SeqCst) {
                // Now for every replica: nobody claims it, run it here.
                self.activate(&name, None, 0);
            }
            return Ok(());
        }
        // Hold the caches of the subscribed sources (in name order, like
        // every other taker of several) so no event slips between the
        // snapshot and the registration.
        let sources = self.subscribed(&spec);
        let guards: Vec<_> = sources.iter().map(|c| (&c.name, c.keys.lock())).collect();
        let queue = Arc::new(EventQueue::new(spec.queue_capacity));
        // In a cluster a plugin of one owner starts parked; the cluster
        // activates it on the replica that claims it.
        let parked = self.clustered.load(Ordering::SeqCst) && spec.mode == PluginMode::Single;
        let initial = if parked {
            Vec::new()
        } else {
            guards
                .iter()
                .flat_map(|(source, keys)| self.initial(&name, &spec, source, keys, &queue))
                .collect()
        };
        let worker = Worker::start(self, spec, queue, parked)?;
        for (source, upto, events) in initial {
            worker.enqueue(&source, upto, events);
        }
        self.workers.insert(name, worker);
        // Before the source locks go: the next delivery sees the worker.
        self.refresh_roster();
        drop(guards);
        Ok(())
    }

    /// The caches of the sources `spec` subscribes to, in name order (the
    /// order every taker of several locks them in).
    fn subscribed(&self, spec: &PluginSpec) -> Vec<Arc<SourceCache>> {
        let mut sources: Vec<Arc<SourceCache>> = self
            .caches
            .iter()
            .filter(|c| spec.subscribes_to(c.key()))
            .map(|c| c.value().clone())
            .collect();
        sources.sort_by(|a, b| a.name.cmp(&b.name));
        sources
    }

    /// Where a starting plugin begins in `source`: from its stored cursor
    /// (with what it missed, when the source already delivered in this
    /// process), or per its `start` setting. Sets the queue's position and
    /// returns the events to queue first.
    fn initial(
        &self,
        name: &str,
        spec: &PluginSpec,
        source: &Arc<str>,
        keys: &SourceKeys,
        queue: &EventQueue,
    ) -> Option<(Arc<str>, u64, Vec<Event>)> {
        let last = keys.meta.last_seq;
        match self.store.cursor(name, source) {
            Some(c) if c >= keys.meta.floor || c >= last => {
                queue.reset_source(source, c);
                keys.live.then(|| {
                    let missed = keys.missed(source, spec, &|_| true, c, u64::MAX);
                    (source.clone(), last, missed)
                })
            }
            Some(c) => {
                tracing::warn!(
                    plugin = %name,
                    source = %source,
                    cursor = c,
                    pruned_to = keys.meta.floor,
                    "Plugin cursor is older than the kept delete history; resending the current keys."
                );
                queue.reset_source(source, last);
                Some((source.clone(), last, keys.current(source, spec, true)))
            }
            None => {
                queue.reset_source(source, last);
                (spec.start == StartPosition::Snapshot)
                    .then(|| (source.clone(), last, keys.current(source, spec, false)))
            }
        }
    }

    /// Run plugins of one owner only where the cluster activates them.
    /// Call before plugins load.
    pub fn set_clustered(&self, clustered: bool) {
        self.clustered.store(clustered, Ordering::SeqCst);
    }

    /// Running plugins that run on one replica at a time.
    pub fn single_plugins(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .workers
            .iter()
            .filter(|w| w.spec.load().mode == PluginMode::Single)
            .map(|w| w.key().clone())
            .collect();
        v.sort();
        v
    }

    /// Stop dispatching `plugin` on this replica: drop what is queued, wait
    /// for the call in flight, and return its cursors as source revisions
    /// (sources with a revision history only: other positions are this
    /// replica's own). Blocking: call off the async workers.
    pub fn park(&self, plugin: &str) -> Option<BTreeMap<String, u64>> {
        let w = self.workers.get(plugin)?.clone();
        w.parked.store(true, Ordering::SeqCst);
        w.queue.clear_entries();
        let guard = w.calling.lock();
        w.fencing.store(0, Ordering::SeqCst);
        let cursors = self.revision_cursors(&w);
        drop(guard);
        w.count(queue::PushStats::default());
        Some(cursors)
    }

    /// Park several plugins: all stop taking events first, then each call in
    /// flight is waited for. Blocking: call off the async workers.
    pub fn park_many(&self, plugins: &[String]) {
        let workers: Vec<Arc<Worker>> = plugins
            .iter()
            .filter_map(|p| self.workers.get(p).map(|w| w.clone()))
            .collect();
        for w in &workers {
            w.parked.store(true, Ordering::SeqCst);
            w.queue.clear_entries();
        }
        for p in plugins {
            self.park(p);
        }
    }

    /// The cursors of a running `plugin` as source revisions (sources with
    /// a revision history only), for handing over to another replica.
    pub fn cluster_cursors(&self, plugin: &str) -> Option<BTreeMap<String, u64>> {
        let w = self.workers.get(plugin)?.clone();
        Some(self.revision_cursors(&w))
    }

    fn revision_cursors(&self, w: &Worker) -> BTreeMap<String, u64> {
        w.queue
            .cursor_positions()
            .into_iter()
            .filter_map(|(source, seq)| {
                let cache = self.caches.get(&*source)?.clone();
                let keys = cache.keys.lock();
                keys.revisioned
                    .then(|| (source.to_string(), seq.saturating_sub(keys.meta.offset)))
            })
            .collect()
    }

    /// Start dispatching `plugin` on this replica, as owner with fencing
    /// `token`, from `cursors` (source revisions handed over by the previous
    /// owner) or, without them, as a plugin starting here. Returns the
    /// sources with a history that must replay from the new cursors. For a
    /// source without history a handed-over plugin gets the current keys as
    /// `resync` puts (its positions are this replica's own).
    pub fn activate(
        &self,
        plugin: &str,
        cursors: Option<&BTreeMap<String, u64>>,
        token: u64,
    ) -> Vec<String> {
        let Some(w) = self.workers.get(plugin).map(|w| w.clone()) else {
            return Vec::new();
        };
        let spec = w.spec.load_full();
        let sources = self.subscribed(&spec);
        let guards: Vec<_> = sources.iter().map(|c| (&c.name, c.keys.lock())).collect();
        let mut replay = Vec::new();
        let mut initial = Vec::new();
        for (source, keys) in &guards {
            let handed = cursors.and_then(|c| c.get(&***source)).copied();
            match (handed, keys.revisioned) {
                (Some(rev), true) => {
                    // The source replays from the lowest cursor: restarted
                    // if it already runs, or at its own start.
                    w.queue.reset_source(source, rev + keys.meta.offset);
                    w.awaiting_replay.lock().push((*source).clone());
                    w.awaiting.store(true, Ordering::SeqCst);
                    replay.push(source.to_string());
                }
                _ if cursors.is_some() => {
                    let last = keys.meta.last_seq;
                    w.queue.reset_source(source, last);
                    initial.push(((*source).clone(), last, keys.current(source, &spec, true)));
                }
                _ => initial.extend(self.initial(plugin, &spec, source, keys, &w.queue)),
            }
        }
        w.fencing.store(token, Ordering::SeqCst);
        w.parked.store(false, Ordering::SeqCst);
        for (source, upto, events) in initial {
            w.enqueue(&source, upto, events);
        }
        drop(guards);
        replay
    }

    /// Rebuild `roster` from `workers`. Under a lock, so the last rebuild
    /// sees every change made before it.
    fn refresh_roster(&self) {
        let _one = self.roster_lock.lock();
        let mut all: Vec<Arc<Worker>> = self.workers.iter().map(|w| w.value().clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        self.roster.store(Arc::new(all));
    }

    /// Stop and remove a plugin; waits for its in-flight call. Its cursors
    /// stay in the store. Blocking: call off the async workers.
    pub fn remove(&self, name: &str) -> bool {
        match self.workers.remove(name) {
            Some((_, w)) => {
                self.refresh_roster();
                w.stop_and_join();
                true
            }
            None => false,
        }
    }

    /// Stop every plugin and commit the store. Blocking: call off the async
    /// workers.
    pub fn shutdown(&self) {
        let names = self.plugin_names();
        for n in names {
            self.remove(&n);
        }
        self.store.flush();
    }

    /// The running version of `plugin`.
    pub fn running(&self, plugin: &str) -> Option<Arc<PluginSpec>> {
        self.workers.get(plugin).map(|w| w.spec.load_full())
    }

    /// Observe every event's queueing latency (benchmarks); `None` stops.
    pub fn set_observer(&self, observer: Option<Observer>) {
        self.observer.store(observer.map(Arc::new));
    }

    /// Successful calls of `plugin` (events handled), if it runs.
    pub fn handled(&self, plugin: &str) -> Option<u64> {
        self.workers
            .get(plugin)
            .map(|w| w.stats.calls[0].load(Ordering::Relaxed))
    }

    /// Events waiting for `plugin`, if it runs.
    pub fn queue_depth(&self, plugin: &str) -> Option<usize> {
        self.workers.get(plugin).map(|w| w.depth())
    }

    /// Where a source with a revision history should resume its watch:
    /// events after the returned revision are the ones some running plugin
    /// has not been given. `None` when the source keeps no history, has
    /// never delivered, or `identity` (its prefix) changed: it starts with
    /// a full snapshot, diffed against the index.
    pub fn resume_position(&self, source: &str, identity: &str) -> Option<u64> {
        let cache = self.caches.get(source)?.clone();
        let mut keys = cache.keys.lock();
        // The source (re)starts now: from here on it gives every plugin what
        // it lacks, from its cursor, so none waits any more.
        for w in self.workers.iter() {
            let mut a = w.awaiting_replay.lock();
            a.retain(|s| &**s != source);
            w.awaiting.store(!a.is_empty(), Ordering::SeqCst);
        }
        if !keys.revisioned {
            return None;
        }
        if keys.meta.identity != identity {
            // Positions of another prefix: relist, and record the new
            // identity with that snapshot.
            keys.pending_identity = Some(identity.to_owned());
            return None;
        }
        if keys.meta.last_seq == 0 {
            return None;
        }
        let min = self
            .workers
            .iter()
            .filter(|w| !w.parked.load(Ordering::SeqCst) && w.spec.load().subscribes_to(source))
            .map(|w| w.queue.enqueued(source).unwrap_or(0))
            .min()
            .unwrap_or(keys.meta.last_seq);
        Some(min.saturating_sub(keys.meta.offset))
    }

    /// The highest position `source` reached, in this run or an earlier one.
    pub fn last_position(&self, source: &str) -> u64 {
        self.caches
            .get(source)
            .map_or(0, |c| c.keys.lock().meta.last_seq)
    }

    /// Drop tombstones every subscribed plugin has handled, now and then.
    fn maybe_prune(&self, name: &Arc<str>, keys: &mut SourceKeys) {
        keys.batches += 1;
        if keys.tombstones == 0 || !keys.batches.is_multiple_of(PRUNE_EVERY) {
            return;
        }
        let floor = self
            .workers
            .iter()
            .filter(|w| !w.parked.load(Ordering::SeqCst) && w.spec.load().subscribes_to(name))
            .filter_map(|w| {
                w.queue
                    .cursor_positions()
                    .into_iter()
                    .find(|(s, _)| s == name)
                    .map(|(_, c)| c)
            })
            .min()
            .unwrap_or(keys.meta.last_seq);
        let gone: Vec<Arc<str>> = keys
            .map
            .iter()
            .filter(|(_, e)| e.value.is_none() && e.seq <= floor)
            .map(|(k, _)| k.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        for k in gone {
            keys.map.remove(&k);
            keys.tombstones -= 1;
            keys.dirty.insert(k);
        }
        keys.meta.floor = keys.meta.floor.max(floor);
        keys.meta_dirty = true;
    }

    fn cache(&self, source: &str) -> Arc<SourceCache> {
        if let Some(c) = self.caches.get(source) {
            return c.clone();
        }
        self.add_source(source, false);
        self.caches
            .get(source)
            .map(|c| c.clone())
            .expect("just added")
    }
}

impl Dispatcher {
    /// Start routing a source added by a reload.
    pub fn add_source(&self, name: &str, revisioned: bool) {
        self.caches.entry(name.to_owned()).or_insert_with(|| {
            let cache = Arc::new(SourceCache::load(&self.store, name, revisioned));
            self.store.register_index(cache.clone());
            if !revisioned {
                self.durable
                    .insert(name.to_owned(), cache.committed.clone());
            }
            cache
        });
    }

    /// Forget a source removed by a reload (its keys are not deleted in the
    /// plugins: a removed source says nothing about its keys).
    pub fn remove_source(&self, name: &str) {
        self.caches.remove(name);
        self.store.unregister_index(name);
        self.durable.remove(name);
    }
}

impl Dispatcher {
    /// The dead letters of `plugin` (running or not), oldest first.
    pub fn dead_letters(&self, plugin: &str) -> Vec<DeadLetter> {
        self.store.dead_letters(plugin)
    }

    /// Queue every dead letter of a running `plugin` again, behind what is
    /// queued. A replayed letter is removed once a call succeeds, and kept
    /// (with its new failure) otherwise. `None` when the plugin does not run.
    pub fn replay_dead_letters(&self, plugin: &str) -> Option<usize> {
        let w = self.workers.get(plugin)?.clone();
        let events: Vec<Event> = self
            .store
            .dead_letters(plugin)
            .into_iter()
            .filter_map(|d| {
                let mut e = Event::try_from(d.event).ok()?;
                e.dead_letter = Some(d.id);
                Some(e)
            })
            .collect();
        let n = events.len();
        let stats = w.queue.push(events);
        w.count(stats);
        Some(n)
    }

    /// Forget every dead letter of `plugin`; returns how many.
    pub fn delete_dead_letters(&self, plugin: &str) -> usize {
        let letters = self.store.dead_letters(plugin);
        for d in &letters {
            self.store.remove_dead_letter(plugin, d.id);
        }
        if let Some(w) = self.workers.get(plugin) {
            w.stats.dead_letters.store(0, Ordering::Relaxed);
        }
        letters.len()
    }
}

impl EventSink for Dispatcher {
    fn deliver_snapshot(
        &self,
        source: &str,
        scope: &dyn Fn(&str) -> bool,
        revision: u64,
        events: Vec<Event>,
    ) {
        let cache = self.cache(source);
        let name = cache.name.clone();
        let mut keys = cache.keys.lock();
        let upto = keys.snapshot_position(revision);
        if let Some(identity) = keys.pending_identity.take() {
            keys.meta.identity = identity;
        }
        // Nothing of this scope known: a first sync, not a resync.
        let had_scope = keys.map.keys().any(|k| scope(k));
        let fresh: std::collections::HashSet<Arc<str>> =
            events.iter().map(|e| e.key.clone()).collect();
        let mut changes: Vec<Event> = Vec::new();
        for mut e in events {
            let old = keys.map.get(&e.key).and_then(|c| c.value.clone());
            if old.is_some() && old == e.value {
                continue;
            }
            e.prev_value = old;
            e.resync = had_scope;
            e.seq = upto;
            changes.push(e);
        }
        for (k, c) in keys.map.iter() {
            if c.value.is_some() && scope(k) && !fresh.contains(k) {
                let mut e = Event::delete(&name, k.clone(), revision).with_prev(c.value.clone());
                e.resync = true;
                e.seq = upto;
                changes.push(e);
            }
        }
        keys.apply(&mut changes);
        cache.wake(&self.store);
        for w in self.workers.iter() {
            let spec = w.spec.load();
            if w.skips(source, &spec) {
                continue;
            }
            let from = w.queue.enqueued(source).unwrap_or(0);
            // The first sync of a scope is the state before any change:
            // a plugin that starts at "now" never sees it.
            let first_for_now = !had_scope && spec.start == StartPosition::Now;
            let mut out: Vec<Event> = changes
                .iter()
                .filter(|e| !first_for_now && spec.matches(source, &e.key))
                .cloned()
                .collect();
            out.extend(keys.missed(&name, &spec, scope, from, upto));
            out.sort_by(|a, b| a.key.cmp(&b.key));
            w.enqueue(&name, upto, out);
        }
        self.maybe_prune(&name, &mut keys);
    }

    fn deliver(&self, source: &str, mut events: Vec<Event>) {
        let cache = self.cache(source);
        let name = cache.name.clone();
        let mut keys = cache.keys.lock();
        let upto = keys.assign(&mut events);
        let now = std::time::Instant::now();
        for e in &mut events {
            e.delivered_at = Some(now);
        }
        keys.apply(&mut events);
        cache.wake(&self.store);
        let roster = self.roster.load();
        let takers: Vec<&Arc<Worker>> = roster
            .iter()
            .filter(|w| !w.skips(source, &w.spec.load()))
            .collect();
        // Every plugin but the last gets copies; the last takes the events.
        let mut events = Some(events);
        for (i, w) in takers.iter().enumerate() {
            let spec = w.spec.load();
            let matches = |e: &Event| spec.matches(source, &e.key);
            // A resumed watch replays from the lowest cursor: each plugin
            // skips what it was already given (`push_new`).
            let stats = if i + 1 == takers.len() {
                let all = events.take().unwrap_or_default();
                w.queue
                    .push_new(&name, upto, all.into_iter().filter(|e| matches(e)))
            } else {
                let all = events.as_deref().unwrap_or_default();
                w.queue
                    .push_new(&name, upto, all.iter().filter(|e| matches(e)).cloned())
            };
            w.count(stats);
        }
        self.maybe_prune(&name, &mut keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SourceKeys {
        SourceKeys {
            map: BTreeMap::new(),
            meta: SourceMeta::default(),
            revisioned: true,
            live: false,
            pending_identity: None,
            tombstones: 0,
            batches: 0,
            dirty: FastSet::default(),
            meta_dirty: false,
        }
    }

    #[test]
    fn applied_events_share_the_index_key_and_count_tombstones() {
        let src: Arc<str> = Arc::from("s");
        let mut k = keys();
        let mut first = vec![Event::put(&src, "a", Bytes::from_static(b"1"), 1)];
        k.apply(&mut first);
        // Later events bring their own copies of the key, as a source
        // decodes them; each leaves with the index's copy.
        let mut later = vec![
            Event::put(&src, String::from("a"), Bytes::from_static(b"2"), 2),
            Event::delete(&src, String::from("a"), 3),
            Event::put(&src, String::from("b"), Bytes::from_static(b"3"), 4),
        ];
        k.apply(&mut later);
        let (a, entry) = k.map.get_key_value("a").unwrap();
        assert!(Arc::ptr_eq(a, &first[0].key));
        assert!(later[..2].iter().all(|e| Arc::ptr_eq(a, &e.key)));
        assert_eq!(entry.value, None);
        assert_eq!(entry.revision, 3);
        let (b, _) = k.map.get_key_value("b").unwrap();
        assert!(Arc::ptr_eq(b, &later[2].key));
        assert_eq!(k.tombstones, 1);
        let mut dirty: Vec<&str> = k.dirty.iter().map(|d| &**d).collect();
        dirty.sort_unstable();
        assert_eq!(dirty, ["a", "b"]);
        // Put back, the tombstone is gone.
        k.apply(&mut [Event::put(&src, "a", Bytes::from_static(b"4"), 5)]);
        assert_eq!(k.tombstones, 0);
    }
}
