//! Cluster ownership of plugins: park, activate, fencing, hand-over.
//!
//! In a cluster a plugin of mode `single` runs on one replica at a time.
//! The cluster layer decides who owns what; this module carries out its
//! decisions on the local workers: a parked plugin takes no events (its
//! queue is emptied and its cursors are handed over as source revisions),
//! an activated one starts from the cursors it was handed, carrying the
//! ownership's fencing token in every event's metadata. It must not decide
//! ownership, and nothing here runs on the delivery path beyond the
//! worker's state and [`Replay::waiting_for`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::Dispatcher;
use super::policy::PluginMode;
use super::worker::{Worker, WorkerState};
use crate::event::Event;

/// Sources a plugin takes nothing from until they restart and replay from
/// its (handed-over) cursor: a live event now would move its position past
/// the gap the replay must fill.
#[derive(Default)]
pub(super) struct Replay {
    sources: Mutex<Vec<Arc<str>>>,
    /// `sources` is not empty (read without the lock on every delivery).
    any: AtomicBool,
}

impl Replay {
    /// Whether deliveries of `source` wait for its replay.
    pub(super) fn waiting_for(&self, source: &str) -> bool {
        self.any.load(Ordering::SeqCst) && self.sources.lock().iter().any(|s| &**s == source)
    }

    fn wait_for(&self, source: Arc<str>) {
        self.sources.lock().push(source);
        self.any.store(true, Ordering::SeqCst);
    }

    /// `source` restarted: it replays from the cursors from now on.
    pub(super) fn replayed(&self, source: &str) {
        let mut a = self.sources.lock();
        a.retain(|s| &**s != source);
        self.any.store(!a.is_empty(), Ordering::SeqCst);
    }
}

impl Worker {
    /// Each event with the ownership's fencing token in its metadata (set,
    /// or replaced when the event went round once already).
    pub(super) fn fenced(&self, batch: Vec<Event>) -> Vec<Event> {
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

    /// Stop taking events here: the state says parked and the queue is
    /// emptied (its events stay pending for the owner). The call in flight
    /// is not waited for.
    fn set_parked(&self) {
        self.set_state(WorkerState::Parked);
        self.queue.clear_entries();
        self.unpark();
    }
}

impl Dispatcher {
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
        w.set_parked();
        let guard = w.calling.lock();
        w.fencing.store(0, Ordering::SeqCst);
        let cursors = self.revision_cursors(&w);
        drop(guard);
        w.count(super::queue::PushStats::default());
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
            w.set_parked();
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
                    w.replay.wait_for((*source).clone());
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
        w.unpark_state();
        for (source, upto, events) in initial {
            w.enqueue(&source, upto, events);
        }
        drop(guards);
        replay
    }
}
