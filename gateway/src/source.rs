//! The plug-in point for stores: the [`Source`] trait and its context.
//!
//! A source owns one connection (or directory watch), turns what it sees into
//! [`Event`]s and hands them to [`SourceContext::emit`], which never blocks.
//! It reports its health through [`SourceStatus`]: connected, initial sync
//! done (a readiness latch), last revision, last error. A source must not
//! know about plugins, queues or wasmtime; it must return from
//! [`Source::run`] promptly once `shutdown` is cancelled.

pub mod consul;
pub mod etcd;
pub mod file;
pub mod nacos;
pub mod nats;
pub mod zookeeper;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::event::{ChannelSink, Event, EventSink};
use crate::telemetry::{Metrics, RepeatLog, SourceHandles};

/// What a source's run future resolves to.
pub type SourceFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'static>>;

/// A store connector. One file per store implements it.
pub trait Source: Send + 'static {
    /// Watch until `ctx.shutdown` is cancelled. Transient failures are the
    /// source's own business (retry with backoff, report through
    /// `ctx.status`); an `Err` means the source cannot work at all (bad
    /// configuration discovered late, for example).
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture;
}

/// Everything a running source gets.
#[derive(Clone)]
pub struct SourceContext {
    /// The source's configured name.
    pub name: Arc<str>,
    /// Health and progress, read by `/readyz`, `/v1/sources` and metrics.
    pub status: Arc<SourceStatus>,
    /// Cancelled when the source must stop.
    pub shutdown: CancellationToken,
    /// For a source with a revision history: deliver the changes after this
    /// revision rather than a snapshot (some plugin has not been given
    /// them). `None`: start with a snapshot.
    pub resume: Option<u64>,
    /// For a source whose revisions are its own counter: the revision an
    /// earlier run of it reached, to count on from (so revisions never go
    /// back across restarts). 0 the first time.
    pub revision_base: u64,
    sink: Arc<dyn EventSink>,
}

impl SourceContext {
    /// A context delivering into `sink`.
    pub fn new(
        name: Arc<str>,
        sink: Arc<dyn EventSink>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let status = Arc::new(SourceStatus::new(name.clone(), metrics));
        SourceContext {
            name,
            status,
            shutdown,
            resume: None,
            revision_base: 0,
            sink,
        }
    }

    /// A context whose events arrive on the returned channel, for tests.
    pub fn for_test(name: &str) -> (Self, tokio::sync::mpsc::UnboundedReceiver<Vec<Event>>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = SourceContext::new(
            Arc::from(name),
            Arc::new(ChannelSink(tx)),
            Metrics::shared(),
            CancellationToken::new(),
        );
        (ctx, rx)
    }

    /// Hand the source's complete current state (puts) to the dispatcher,
    /// even when empty. Never blocks.
    pub fn emit_snapshot(&self, events: Vec<Event>) {
        self.emit_snapshot_of(&|_| true, events);
    }

    /// Hand the complete current state of the keys for which `scope` is
    /// true (one watch of a source made of several) to the dispatcher, even
    /// when empty. Never blocks.
    pub fn emit_snapshot_of(&self, scope: &dyn Fn(&str) -> bool, events: Vec<Event>) {
        let revision = events.iter().map(|e| e.revision).max().unwrap_or(0);
        self.account(&events);
        self.sink
            .deliver_snapshot(&self.name, scope, revision, events);
    }

    /// Hand the complete current state, read at `revision`, to the
    /// dispatcher. Never blocks.
    pub fn emit_snapshot_at(&self, revision: u64, events: Vec<Event>) {
        self.account(&events);
        self.status.set_revision(revision);
        self.sink
            .deliver_snapshot(&self.name, &|_| true, revision, events);
    }

    /// Hand a batch of events to the dispatcher. Never blocks. Updates the
    /// status's last revision and the events counter.
    pub fn emit(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.account(&events);
        self.sink.deliver(&self.name, events);
    }

    /// Record delivered events in the status and the events counter.
    fn account(&self, events: &[Event]) {
        if let Some(max) = events.iter().map(|e| e.revision).max() {
            self.status.set_revision(max);
        }
        self.status.handles.events.inc_by(events.len() as u64);
    }
}

/// Live health of one source. Cheap to read from any thread.
pub struct SourceStatus {
    name: Arc<str>,
    /// The configured kind (`file`, `etcd`, …), set once when it starts.
    kind: std::sync::OnceLock<&'static str>,
    connected: AtomicBool,
    synced: AtomicBool,
    revision: AtomicU64,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
    handles: SourceHandles,
    sync: Mutex<SyncTracker>,
}

/// How the initial sync is going: what was listed, and when the source last
/// moved forward (connected, or received a page). The start-up deadline
/// measures the time since that, so a large store that keeps answering is
/// never cut off, while one that stops answering is.
struct SyncTracker {
    started: Instant,
    progress_at: Instant,
    logged_at: Instant,
    keys: u64,
    pages: u64,
}

/// The initial sync while it runs, as served by `/v1/sources` and
/// `/readyz`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SyncProgress {
    /// Keys listed so far.
    pub keys_listed: u64,
    /// Pages (store replies) received so far.
    pub pages: u64,
    /// Keys listed per second since the sync started.
    pub keys_per_second: f64,
    /// Milliseconds since the sync started.
    pub elapsed_ms: u64,
    /// Milliseconds since the source last made progress (connected or
    /// received a page); the start-up deadline applies to this.
    pub idle_ms: u64,
}

/// A point-in-time copy of [`SourceStatus`], as served by `/v1/sources`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceReport {
    /// Source name.
    pub name: String,
    /// Its kind (`file`, `etcd`, `consul`, `nacos`), when known.
    pub kind: Option<&'static str>,
    /// Holding a live connection or watch.
    pub connected: bool,
    /// Initial sync delivered.
    pub synced: bool,
    /// Highest revision delivered.
    pub revision: u64,
    /// Reconnects since start.
    pub reconnects: u64,
    /// The most recent error, cleared on a healthy reconnect.
    pub last_error: Option<String>,
    /// The initial sync's progress while it runs; absent once synced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
}

impl SourceStatus {
    fn new(name: Arc<str>, metrics: Arc<Metrics>) -> Self {
        let handles = SourceHandles::new(&metrics, &name);
        SourceStatus {
            name,
            kind: std::sync::OnceLock::new(),
            connected: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            revision: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
            handles,
            metrics,
            sync: Mutex::new(SyncTracker::new()),
        }
    }

    /// Record the source's configured kind (the first call counts).
    pub fn set_kind(&self, kind: &'static str) {
        let _ = self.kind.set(kind);
    }

    /// The source connected (or lost its connection).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::SeqCst);
        self.handles.connected.set(i64::from(connected));
        if connected {
            self.last_error.lock().take();
            self.sync.lock().progress_at = Instant::now();
        }
    }

    /// A page of the initial listing (or of a relist) arrived with `keys`
    /// keys. Counts as progress for the start-up deadline; while the
    /// initial sync runs, a line every few seconds says how far it got.
    pub fn listed(&self, keys: usize) {
        let now = Instant::now();
        let mut sync = self.sync.lock();
        sync.pages += 1;
        sync.keys += keys as u64;
        sync.progress_at = now;
        if !self.is_synced() && now.duration_since(sync.logged_at) >= SYNC_LOG_INTERVAL {
            sync.logged_at = now;
            let p = sync.progress(now);
            tracing::info!(
                source = %self.name,
                keys_listed = p.keys_listed,
                pages = p.pages,
                keys_per_second = p.keys_per_second.round() as u64,
                elapsed_ms = p.elapsed_ms,
                "Initial sync in progress."
            );
        }
    }

    /// The source got an answer from its store (one watch of several, for
    /// example): progress for the start-up deadline, without a page count.
    pub fn progressed(&self) {
        self.sync.lock().progress_at = Instant::now();
    }

    /// Why a fail-policy start gives up after `timeout` without progress:
    /// it never connected, or how far its listing got.
    pub fn stalled_sync(&self, timeout: Duration) -> String {
        let report = self.report();
        let reason = report.last_error.as_deref().unwrap_or("no error reported");
        let sync = report.sync.unwrap_or_default();
        if !report.connected && sync.pages == 0 {
            format!(
                "source {:?} did not connect within {timeout:?} (startup = \"fail\"): {reason}",
                report.name,
            )
        } else {
            format!(
                "source {:?} made no progress in its initial sync for {timeout:?} \
                 (startup = \"fail\"): {} keys in {} pages listed in {:.1}s, connected: {}; {reason}",
                report.name,
                sync.keys_listed,
                sync.pages,
                sync.elapsed_ms as f64 / 1000.0,
                report.connected,
            )
        }
    }

    /// How long since the source last made progress (started, connected,
    /// or received a page).
    pub fn idle_for(&self) -> Duration {
        self.sync.lock().progress_at.elapsed()
    }

    /// The initial sync has been delivered: the readiness latch opens. Later
    /// calls are no-ops.
    pub fn set_synced(&self) {
        if !self.synced.swap(true, Ordering::SeqCst) {
            self.handles.synced.set(1);
            let sync = self.sync.lock();
            tracing::info!(
                source = %self.name,
                keys_listed = sync.keys,
                pages = sync.pages,
                elapsed_ms = sync.started.elapsed().as_millis() as u64,
                "Source finished its initial sync."
            );
        }
    }

    /// A new connection attempt after a loss.
    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::SeqCst);
        self.handles.reconnects.inc();
    }

    /// Record the latest error (shown by `/v1/sources` and `/readyz`).
    pub fn set_error(&self, error: impl Into<String>) {
        *self.last_error.lock() = Some(error.into());
    }

    /// Record a delivered revision; the stored value never goes down.
    pub fn set_revision(&self, revision: u64) {
        let now = self
            .revision
            .fetch_max(revision, Ordering::SeqCst)
            .max(revision);
        self.handles
            .revision
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// The source relisted and diffed after a gap in the store's history.
    pub fn resynced(&self) {
        self.handles.resyncs.inc();
    }

    /// A repeated log line was held back.
    pub fn log_suppressed(&self) {
        self.metrics.suppressed(&format!("source/{}", self.name));
    }

    /// Initial sync delivered?
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// Connected?
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// A copy for reports.
    pub fn report(&self) -> SourceReport {
        SourceReport {
            name: self.name.to_string(),
            kind: self.kind.get().copied(),
            connected: self.is_connected(),
            synced: self.is_synced(),
            revision: self.revision.load(Ordering::SeqCst),
            reconnects: self.reconnects.load(Ordering::SeqCst),
            last_error: self.last_error.lock().clone(),
            sync: (!self.is_synced()).then(|| self.sync.lock().progress(Instant::now())),
        }
    }
}

/// Least time between two "Initial sync in progress." lines of a source.
const SYNC_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl SyncTracker {
    fn new() -> SyncTracker {
        let now = Instant::now();
        SyncTracker {
            started: now,
            progress_at: now,
            logged_at: now,
            keys: 0,
            pages: 0,
        }
    }

    fn progress(&self, now: Instant) -> SyncProgress {
        let elapsed = now.duration_since(self.started);
        SyncProgress {
            keys_listed: self.keys,
            pages: self.pages,
            keys_per_second: self.keys as f64 / elapsed.as_secs_f64().max(1e-3),
            elapsed_ms: elapsed.as_millis() as u64,
            idle_ms: now.duration_since(self.progress_at).as_millis() as u64,
        }
    }
}

/// The events that turn `old` into `new` (both key → value): puts for new
/// and changed keys, with previous values, and deletes for vanished keys,
/// sorted by key, all at `revision`. Snapshot-style sources (a directory, a
/// Consul or Nacos listing) share it.
pub fn diff_snapshot(
    source: &Arc<str>,
    old: &BTreeMap<String, Bytes>,
    new: &BTreeMap<String, Bytes>,
    revision: u64,
    resync: bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    for (key, value) in new {
        let prev = old.get(key);
        if prev != Some(value) {
            events.push(
                Event::put(source, key.as_str(), value.clone(), revision).with_prev(prev.cloned()),
            );
        }
    }
    for (key, prev) in old {
        if !new.contains_key(key) {
            events
                .push(Event::delete(source, key.as_str(), revision).with_prev(Some(prev.clone())));
        }
    }
    events.sort_by(|a, b| a.key.cmp(&b.key));
    for event in &mut events {
        event.resync = resync;
    }
    events
}

impl SourceContext {
    /// Watch `i` of `group` failed with `reason`: mark it, log the reason
    /// (a repeat only once per window, the rest counted), and wait the
    /// backoff's next delay. `false` when shutdown came first.
    pub async fn wait_after_failure(
        &self,
        group: &WatchGroup,
        i: usize,
        reason: String,
        backoff: &mut Backoff,
        errors: &mut RepeatLog,
    ) -> bool {
        group.failed(i, reason.clone());
        let delay = backoff.next_delay();
        match errors.should_log(&reason) {
            Some(repeated) => tracing::warn!(
                source = %self.name,
                error = %reason,
                retry_in_ms = delay.as_millis() as u64,
                repeated,
                "Request to the store failed; retrying."
            ),
            None => self.status.log_suppressed(),
        }
        self.status.reconnecting();
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Health of a source made of several independent watches (one per
/// service, one per KV prefix, …): connected while every watch's last
/// request succeeded, synced once every watch completed its first fetch.
pub struct WatchGroup {
    status: Arc<SourceStatus>,
    synced: Vec<AtomicBool>,
    ok: Vec<AtomicBool>,
}

impl WatchGroup {
    /// A group of `n` watches reporting into `status`.
    pub fn new(status: Arc<SourceStatus>, n: usize) -> Arc<WatchGroup> {
        Arc::new(WatchGroup {
            status,
            synced: (0..n).map(|_| AtomicBool::new(false)).collect(),
            ok: (0..n).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Watch `i` fetched successfully (its first time: it is synced).
    pub fn succeeded(&self, i: usize) {
        self.status.progressed();
        self.synced[i].store(true, Ordering::SeqCst);
        self.ok[i].store(true, Ordering::SeqCst);
        if self.ok.iter().all(|o| o.load(Ordering::SeqCst)) {
            self.status.set_connected(true);
        }
        if self.synced.iter().all(|s| s.load(Ordering::SeqCst)) {
            self.status.set_synced();
        }
    }

    /// Watch `i` failed.
    pub fn failed(&self, i: usize, error: String) {
        self.ok[i].store(false, Ordering::SeqCst);
        self.status.set_connected(false);
        self.status.set_error(error);
    }
}

/// The base URL of a store's HTTP API from the config key `key`: `http://`
/// or `https://`, without a trailing slash.
///
/// # Errors
/// A message naming the key, with `example` as a valid value.
pub(crate) fn http_base_url(key: &str, value: &str, example: &str) -> Result<String, String> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.trim_end_matches('/').to_owned())
    } else {
        Err(format!(
            "{key}: {value:?} must be a URL such as {example:?}"
        ))
    }
}

/// Check the reconnect delays every source takes.
///
/// # Errors
/// When the first delay is zero or above the longest.
pub(crate) fn check_reconnect(initial_ms: u64, max_ms: u64) -> Result<(), String> {
    if initial_ms == 0 || max_ms < initial_ms {
        return Err("need 0 < reconnect_initial_ms <= reconnect_max_ms".into());
    }
    Ok(())
}

/// Default first reconnect delay of every source, in ms.
pub(crate) fn default_reconnect_initial_ms() -> u64 {
    200
}

/// Default longest reconnect delay of the HTTP sources, in ms.
pub(crate) fn default_http_reconnect_max_ms() -> u64 {
    30_000
}

/// Default least time between two requests of an HTTP source.
pub(crate) fn default_min_interval() -> std::time::Duration {
    std::time::Duration::from_millis(100)
}
