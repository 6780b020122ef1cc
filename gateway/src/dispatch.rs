//! Routing events to plugins: subscriptions, per-plugin queues, workers.
//!
//! Owns the table of running plugins, each with its own [`EventQueue`] and
//! its own worker thread running a sandbox (or, for quick plugins once
//! there are more plugins than cores, rounds on a shared [`pool`]), and
//! every source's key index (mirrored in the [`Store`]) so that a plugin
//! loaded late starts from the current state (as puts) before it sees
//! changes. [`EventSink::deliver`](crate::event::EventSink::deliver)
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
//!
//! One job per file:
//!
//! * [`route`]: which plugin gets which event of a delivery, and where a
//!   plugin starts in a source.
//! * [`index`]: each source's key index, positions, relist diffs, pruning.
//! * [`queue`]: one plugin's bounded queue, folding by key when full, and
//!   its cursors.
//! * [`worker`]: the worker's state and its one round loop, on its own
//!   thread or the [`pool`].
//! * [`thread`]: a worker's own thread, waited for within a bound.
//! * [`failure`]: retries, dead letters, quarantine.
//! * [`ownership`]: cluster park, activate and fencing.
//! * [`report`]: what `/v1/plugins` shows.
//! * [`tail`]: every delivered change, for the live tail.
//! * [`trace`]: where one change stands for every plugin (`/v1/trace`).
//!
//! This module must not parse files or compile code.

mod failure;
mod index;
mod ownership;
pub mod policy;
pub mod pool;
pub mod queue;
mod report;
mod route;
mod state;
pub mod tail;
mod thread;
pub mod trace;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::runtime::Runtime;
use crate::store::Store;
use crate::telemetry::Metrics;
use index::SourceCache;
use queue::EventQueue;
use worker::{Watermarks, Worker};

pub use policy::{PluginMode, RetryPolicy, StartPosition};
pub use report::{LastFailure, LimitsReport, PluginReport, QuarantineReport, SubscriptionReport};
pub use route::PluginSpec;
pub use worker::Observer;

/// Routes source events to plugin queues. Shared by every source (as their
/// [`EventSink`](crate::event::EventSink)) and the plugin loader.
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
    /// Every delivered change, for the live tail.
    tail: tail::TailSender,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.pool.close();
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
            tail: tail::channel(),
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
        let existing = self.workers.get(&name).map(|w| w.clone());
        if existing
            .as_ref()
            .is_some_and(|w| w.state() == worker::WorkerState::Failed)
        {
            // A failed worker runs no more rounds: a new version (or a new
            // sidecar) starts a fresh one, from the plugin's cursor, as
            // unloading and loading it again would.
            self.remove(&name);
        } else if let Some(w) = existing {
            let every = spec.mode == PluginMode::EveryReplica;
            w.queue.set_capacity(spec.queue_capacity);
            w.spec.store(Arc::new(spec));
            w.trim_dead_letters();
            w.probe_now();
            if every && w.state() == worker::WorkerState::Parked {
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
        worker.trim_dead_letters();
        for (source, upto, events) in initial {
            worker.enqueue(&source, upto, events);
        }
        self.workers.insert(name, worker);
        // Before the source locks go: the next delivery sees the worker.
        self.refresh_roster();
        drop(guards);
        Ok(())
    }

    /// Stop and remove a plugin; waits for its in-flight call, at most its
    /// deadline and a margin (see [`Worker::join_by`]). Its cursors stay in
    /// the store. Blocking: call off the async workers.
    pub fn remove(&self, name: &str) -> bool {
        match self.workers.remove(name) {
            Some((_, w)) => {
                self.refresh_roster();
                let now = Instant::now();
                w.stop();
                w.join_by(now + w.stop_bound(), now);
                true
            }
            None => false,
        }
    }

    /// Stop every plugin and commit the store. Every plugin is stopped
    /// before any is waited for, so the wait is the longest of their
    /// bounds, not their sum. Blocking: call off the async workers.
    pub fn shutdown(&self) {
        let stopping: Vec<Arc<Worker>> = self
            .plugin_names()
            .iter()
            .filter_map(|n| self.workers.remove(n).map(|(_, w)| w))
            .collect();
        self.refresh_roster();
        let now = Instant::now();
        for w in &stopping {
            w.stop();
        }
        for w in &stopping {
            w.join_by(now + w.stop_bound(), now);
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
}
