//! Routing: which plugin gets which event of a delivery.
//!
//! Owns a plugin's routing settings ([`PluginSpec`]), the fan-out of one
//! delivery to every subscribed plugin's queue, and where a plugin starts
//! in a source (its cursor, what it missed, or its `start` setting). The
//! source's key index is updated first ([`index`](super::index)); then each
//! worker that takes from the source gets the matching events. This module
//! must not call plugins or wait for anything: a delivery only ever locks
//! one source's index and pushes into queues.

use std::sync::Arc;

use super::policy::{PluginMode, RetryPolicy, StartPosition};
use crate::event::{Event, EventSink, Subscription};
use crate::host::Grants;
use crate::runtime::instance::LoadedPlugin;
use crate::store::DeadLetterCap;

use super::Dispatcher;
use super::index::SourceKeys;
use super::queue::EventQueue;
use super::worker::Worker;

/// One version of a plugin with its routing and queue settings.
#[derive(Clone)]
pub struct PluginSpec {
    /// Code, host context and limits.
    pub loaded: LoadedPlugin,
    /// What it receives; empty means every source, every key.
    pub subscriptions: Vec<Subscription>,
    /// The operator's grants, as configured (the context holds them live).
    pub grants: Grants,
    /// Queue capacity before folding.
    pub queue_capacity: usize,
    /// What a failed call leads to.
    pub retry: RetryPolicy,
    /// How many dead letters, and bytes of them, it keeps.
    pub dead_letters: DeadLetterCap,
    /// Where it starts when it has no cursor.
    pub start: StartPosition,
    /// In a cluster: one replica at a time, or every replica.
    pub mode: PluginMode,
    /// Most events per `handle-batch` call when a backlog has built up
    /// (1: one call per event).
    pub batch_max: usize,
}

impl PluginSpec {
    /// Whether the plugin receives `key` of `source`.
    pub(super) fn matches(&self, source: &str, key: &str) -> bool {
        Subscription::any_matches(&self.subscriptions, source, key)
    }

    /// Whether the plugin receives anything of `source`.
    pub(super) fn subscribes_to(&self, source: &str) -> bool {
        Subscription::any_covers(&self.subscriptions, source)
    }
}

impl Dispatcher {
    /// Rebuild `roster` from `workers`. Under a lock, so the last rebuild
    /// sees every change made before it.
    pub(super) fn refresh_roster(&self) {
        let _one = self.roster_lock.lock();
        let mut all: Vec<Arc<Worker>> = self.workers.iter().map(|w| w.value().clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        self.roster.store(Arc::new(all));
    }

    /// The caches of the sources `spec` subscribes to, in name order (the
    /// order every taker of several locks them in).
    pub(super) fn subscribed(&self, spec: &PluginSpec) -> Vec<Arc<super::index::SourceCache>> {
        let mut sources: Vec<_> = self
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
    pub(super) fn initial(
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
            w.replay.replayed(source);
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
            .filter(|w| w.takes_from(source))
            .map(|w| w.queue.enqueued(source).unwrap_or(0))
            .min()
            .unwrap_or(keys.meta.last_seq);
        Some(min.saturating_sub(keys.meta.offset))
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
        let (mut changes, had_scope) = keys.diff(&name, scope, revision, upto, events);
        keys.apply(&mut changes);
        cache.wake(&self.store);
        let roster = self.roster.load();
        self.publish_tail(
            source,
            &changes,
            roster.iter().filter(|w| !w.skips(source, &w.spec.load())),
        );
        let takers: Vec<&Arc<Worker>> = roster
            .iter()
            .filter(|w| !w.skips(source, &w.spec.load()))
            .collect();
        // Every plugin but the last gets copies; the last takes the changes
        // (a large listing is not held twice).
        let mut changes = Some(changes);
        for (i, w) in takers.iter().enumerate() {
            let spec = w.spec.load();
            let from = w.queue.enqueued(source).unwrap_or(0);
            // The first sync of a scope is the state before any change:
            // a plugin that starts at "now" never sees it.
            let first_for_now = !had_scope && spec.start == StartPosition::Now;
            let wanted = |e: &Event| !first_for_now && spec.matches(source, &e.key);
            let mut out: Vec<Event> = if i + 1 == takers.len() {
                let mut all = changes.take().unwrap_or_default();
                all.retain(|e| wanted(e));
                all
            } else {
                let all = changes.as_deref().unwrap_or_default();
                all.iter().filter(|e| wanted(e)).cloned().collect()
            };
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
        // Only an observer (the benchmarks) reads the delivery time: without
        // one, no clock is read and no event written for it.
        if self.observer.load().is_some() {
            let now = crate::event::Stamp::now();
            for e in &mut events {
                e.delivered_at = Some(now);
            }
        }
        keys.apply(&mut events);
        cache.wake(&self.store);
        let roster = self.roster.load();
        let takers: Vec<&Arc<Worker>> = roster
            .iter()
            .filter(|w| !w.skips(source, &w.spec.load()))
            .collect();
        self.publish_tail(source, &events, takers.iter().copied());
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
