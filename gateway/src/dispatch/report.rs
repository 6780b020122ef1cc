//! What the admin API shows of each running plugin (`/v1/plugins`).
//!
//! Owns the report types and the live per-plugin counters they are read
//! from. It must not change any worker's state: every read here is a
//! snapshot taken without waiting for a call in flight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;

use super::Dispatcher;
use super::policy::PluginMode;
use super::worker::{Worker, WorkerState};
use crate::runtime::Limits;
use crate::telemetry::{OUTCOMES, Outcome};

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

/// Live counters of one plugin, kept beside the metrics because the
/// metrics of a replaced or removed plugin outlive it.
#[derive(Default)]
pub(super) struct WorkerStats {
    /// Calls by outcome, in the order of [`OUTCOMES`].
    pub(super) calls: [AtomicU64; OUTCOMES.len()],
    pub(super) last_failure: Mutex<Option<LastFailure>>,
    /// The event being retried now, for `/v1/trace`.
    pub(super) retrying: Mutex<Option<Retrying>>,
    /// When recent events were handled, for `/v1/trace`.
    pub(super) recent: Mutex<RecentHandled>,
}

/// The event a worker is retrying: its source, key and position, and the
/// attempts made so far.
pub(super) struct Retrying {
    pub(super) source: std::sync::Arc<str>,
    pub(super) key: std::sync::Arc<str>,
    pub(super) seq: u64,
    pub(super) attempts: u32,
}

/// How many handled events a worker remembers the time of. A trace of an
/// older change still says it was handled (the cursor is past it), only
/// without the time.
pub(super) const RECENT_HANDLED: usize = 256;

/// A ring of the most recently handled events: (hash of source and key,
/// position, Unix milliseconds), read only by a trace. Added to once per
/// round on the worker's thread (one uncontended lock, one clock read, no
/// allocation once full). It names each event by a hash rather than by
/// clones of its source and key: their reference counts live on cache
/// lines the producer writes for every event it queues, and touching them
/// for every call moved those lines between cores. A collision of the
/// 64-bit hash could only lend a trace another key's time. The source's part of the hash is worked out once per run of events of
/// the same source, and the ring is overwritten in place once full.
#[derive(Default)]
pub(super) struct RecentHandled {
    /// Oldest to newest until full; then `next` is the oldest.
    ring: Vec<(u64, u64, u64)>,
    next: usize,
    hasher: foldhash::fast::FixedState,
}

impl RecentHandled {
    fn source_id(&self, source: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(source)
    }

    fn id(&self, source_id: u64, key: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key) ^ source_id.rotate_left(29)
    }

    /// Each of `events` with a position was handled at `at_ms`.
    pub(super) fn add(&mut self, events: &[crate::event::Event], at_ms: u64) {
        let mut source: Option<(&std::sync::Arc<str>, u64)> = None;
        for e in events.iter().filter(|e| e.seq > 0) {
            let source_id = match source {
                Some((s, id)) if std::sync::Arc::ptr_eq(s, &e.source) => id,
                _ => {
                    let id = self.source_id(&e.source);
                    source = Some((&e.source, id));
                    id
                }
            };
            let slot = (self.id(source_id, &e.key), e.seq, at_ms);
            if self.ring.len() < RECENT_HANDLED {
                self.ring.push(slot);
            } else {
                self.ring[self.next] = slot;
                self.next = (self.next + 1) % RECENT_HANDLED;
            }
        }
    }

    /// When the newest handling of `key` at or after position `seq` was,
    /// if it is still remembered.
    pub(super) fn when(&self, source: &str, key: &str, seq: u64) -> Option<u64> {
        let id = self.id(self.source_id(source), key);
        let (older, newer) = self.ring.split_at(self.next);
        newer
            .iter()
            .chain(older)
            .rev()
            .find(|(i, at, _)| *i == id && *at >= seq)
            .map(|(_, _, ms)| *ms)
    }
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
    /// Its language and toolchain, and what one instance takes.
    #[serde(flatten)]
    pub build: crate::runtime::Footprint,
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
    /// Their bytes as stored.
    pub dead_letter_bytes: u64,
    /// At most this many dead letters are kept; the oldest are dropped.
    pub max_dead_letters: u64,
    /// At most this many bytes of dead letters are kept.
    pub max_dead_letter_bytes: u64,
    /// Per source: every event at or below this position was handled.
    pub cursors: BTreeMap<String, u64>,
    /// In a cluster: `"single"` or `"every-replica"`.
    pub mode: &'static str,
    /// In a cluster: not run on this replica now.
    pub parked: bool,
    /// `running`, `quarantined`, `parked`, or `failed` (the gateway
    /// panicked in its worker outside a call; `last_failure` says how).
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
    /// Bytes under the `files` grant, MiB.
    pub files_mb: u64,
    /// Files and directories under the `files` grant.
    pub files_count: u64,
}

impl From<Limits> for LimitsReport {
    fn from(l: Limits) -> Self {
        LimitsReport {
            fuel: l.fuel,
            timeout_ms: l.timeout_ms,
            memory_mb: l.memory_mb,
            files_mb: l.files_mb,
            files_count: l.files_count,
        }
    }
}

/// Seconds since the Unix epoch (0 before it).
pub(super) fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Worker {
    /// This plugin as `/v1/plugins` shows it.
    pub(super) fn report(&self) -> PluginReport {
        let spec = self.spec.load();
        let state = self.state();
        let quarantine = self.quarantine_report();
        let letters = self.store.dead_letter_tally(&self.name);
        PluginReport {
            name: self.name.clone(),
            version: spec.loaded.version,
            digest: spec.loaded.compiled.digest.clone(),
            size: spec.loaded.compiled.size,
            build: spec.loaded.compiled.footprint.clone(),
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
            dead_letters: letters.count,
            dead_letter_bytes: letters.bytes,
            max_dead_letters: spec.dead_letters.count,
            max_dead_letter_bytes: spec.dead_letters.bytes,
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
            parked: state == WorkerState::Parked,
            state: state.as_str(),
            quarantine,
            pooled: state == WorkerState::Pooled,
            manifest: spec.loaded.compiled.manifest.as_deref().cloned(),
            capabilities: crate::manifest::CapabilityReport::new(
                spec.loaded.compiled.manifest.as_deref(),
                spec.loaded.ctx.granted(),
            ),
        }
    }
}

impl Dispatcher {
    /// The report of `plugin`, if it runs.
    pub fn report(&self, plugin: &str) -> Option<PluginReport> {
        self.workers.get(plugin).map(|w| w.report())
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::event::Event;

    #[test]
    fn the_ring_answers_with_the_newest_handling_and_forgets_the_oldest() {
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        let at = |source: &Arc<str>, key: &str, seq: u64| {
            let mut e = Event::put(source, key, Bytes::from_static(b"v"), seq);
            e.seq = seq;
            e
        };
        let mut r = RecentHandled::default();
        r.add(&[at(&a, "k", 1), at(&b, "k", 2), at(&a, "k", 3)], 10);
        assert_eq!(r.when("a", "k", 1), Some(10));
        r.add(&[at(&a, "k", 4)], 20);
        assert_eq!(r.when("a", "k", 1), Some(20), "the newest handling");
        assert_eq!(r.when("a", "k", 5), None, "not yet handled");
        assert_eq!(r.when("b", "k", 2), Some(10), "each source on its own");
        assert_eq!(r.when("c", "k", 1), None);
        // Around the ring more than once: only the newest are kept.
        for round in 0..3u64 {
            let events: Vec<Event> = (0..RECENT_HANDLED as u64)
                .map(|i| at(&a, &format!("x{i}"), 100 + round * 1_000 + i))
                .collect();
            r.add(&events, 30 + round);
        }
        assert_eq!(r.when("a", "k", 1), None, "pushed out");
        assert_eq!(r.when("a", "x0", 0), Some(32));
        assert_eq!(r.when("a", "x255", 2_100), Some(32));
        r.add(&[at(&a, "x0", 5_000)], 40);
        assert_eq!(r.when("a", "x0", 0), Some(40));
        assert_eq!(r.when("a", "x1", 0), Some(32));
    }
}
