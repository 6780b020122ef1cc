//! One plugin's queue: bounded, never blocking the producer, folding
//! changes of the same key together once full.
//!
//! Below capacity every event is queued as is. At capacity a new event is
//! folded into the last queued event of the same key (latest value wins, the
//! earliest previous value is kept, `coalesced` counts the folded changes).
//! A queued delete is never overwritten by a later put: the put is queued
//! after it, so a plugin always sees that the key went away. Only when no
//! queued event of that key can absorb it does the queue grow past capacity,
//! so its length stays below capacity + 2 × distinct keys. Order per key is
//! always preserved.
//!
//! The queue also reports the plugin's cursors, counted by `positions` as
//! events are queued, folded and completed; a hot consumer with nothing to
//! take spins (`spin`) before it sleeps. This module must not call plugins.

mod backlog;
mod positions;
mod spin;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::event::{Event, EventKind};
use backlog::Backlog;
use positions::Cursors;
pub(crate) use spin::spin_while;

/// What a push did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushStats {
    /// Events queued as new entries.
    pub queued: usize,
    /// Events folded into a queued event.
    pub coalesced: usize,
    /// New entries accepted past capacity.
    pub overflow: usize,
    /// Events queued after the push.
    pub len: usize,
}

#[derive(Default)]
struct Inner {
    /// The queued events.
    entries: Backlog,
    /// Sequence number of `entries[0]`.
    head: u64,
    /// Hash of (source, key) → sequence number of its last queued entry
    /// (checked against the entry: a collision only costs a fold). Kept
    /// only while `indexed`: it is needed for folding, which only a full
    /// queue does, so it is built when the queue fills and dropped when it
    /// has drained to half.
    last: HashMap<u64, u64, foldhash::fast::RandomState>,
    indexed: bool,
    hasher: foldhash::fast::RandomState,
    closed: bool,
    /// The plugin's cursors.
    cursors: Cursors,
    /// Handled events left for the producer to drop (see
    /// [`EventQueue::complete_and_retire`]), and how many.
    spent: Vec<Vec<Event>>,
    spent_len: usize,
    /// Waits in a row that found nothing (see [`EventQueue::idle`]).
    idle_waits: u32,
    /// The most events queued since the allocator was last asked to give
    /// memory back.
    peak: usize,
}

impl Inner {
    /// The retired events, to drop after the lock is released.
    fn take_spent(&mut self) -> Vec<Vec<Event>> {
        self.spent_len = 0;
        std::mem::take(&mut self.spent)
    }

    fn id(&self, e: &Event) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((&*e.source, &*e.key))
    }

    /// Build the fold index from the queued entries (the queue is full).
    fn index(&mut self) {
        self.last.clear();
        self.entries.make_contiguous();
        let ids: Vec<u64> = self.entries.iter().map(|e| self.id(e)).collect();
        for (i, id) in ids.into_iter().enumerate() {
            self.last.insert(id, self.head + i as u64);
        }
        self.indexed = true;
    }

    /// Drop the fold index once the queue has drained to half its
    /// capacity.
    fn unindex(&mut self, capacity: usize) {
        if self.indexed && self.entries.len() <= capacity / 2 {
            self.last.clear();
            self.indexed = false;
            self.entries.allow_chunks();
        }
    }
}

/// A multi-producer, single-consumer queue of events for one plugin.
pub struct EventQueue {
    capacity: std::sync::atomic::AtomicUsize,
    inner: Mutex<Inner>,
    ready: Condvar,
    /// `entries.len()`, readable without the lock.
    len: AtomicUsize,
    /// The consumer found work without sleeping last time: events arrive
    /// faster than it sleeps and wakes, so it spins briefly before it does.
    hot: AtomicBool,
    /// Called after a push that queued something (a pooled consumer is
    /// scheduled by it rather than woken through `ready`).
    on_push: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// Most handled events left for the producer to drop (see
/// [`EventQueue::complete_and_retire`]).
const SPENT_MAX: usize = 1024;
/// After a backlog has drained and its queue stayed idle, hand the memory
/// the allocator keeps from it back to the system. glibc's malloc keeps freed
/// memory for reuse; after the initial sync of a large store (the listing,
/// its diff and the queues, all transient) that is most of the process's
/// resident memory, and nothing else returns it. This runs once per such
/// backlog, so rarely, on the worker's thread, outside any lock.
#[allow(unsafe_code)]
fn give_back_freed_memory() {
    // The one call the workspace's `deny(unsafe_code)` lets through: a
    // foreign function with no Rust wrapper. Elsewhere (musl) it is left
    // out: that allocator has no such call.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer and has no precondition; glibc
    // locks each arena while it walks it, so it is safe beside other
    // threads' allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Empty waits in a row (each up to the worker's idle wait, 200 ms) after
/// which a queue has the memory of a past backlog given back.
const SHRINK_AFTER_IDLE_WAITS: u32 = 25;
/// The largest backlog (in events) whose memory is left to the allocator,
/// and the room a queue's chunks keep when it shrinks.
const SHRINK_KEEP: usize = 1024;

/// Whether a queued event may absorb a later change of the same key.
fn can_absorb(queued: &Event, later: &Event) -> bool {
    !(queued.kind == EventKind::Delete && later.kind == EventKind::Put)
        && queued.dead_letter.is_none()
        && later.dead_letter.is_none()
}

impl EventQueue {
    /// An empty queue folding at `capacity` (at least 1).
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            capacity: std::sync::atomic::AtomicUsize::new(capacity.max(1)),
            inner: Mutex::new(Inner::default()),
            ready: Condvar::new(),
            len: AtomicUsize::new(0),
            hot: AtomicBool::new(false),
            on_push: std::sync::OnceLock::new(),
        }
    }

    /// Change the capacity (a reloaded plugin setting); queued events stay.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity
            .store(capacity.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Queue events in order. Never blocks beyond a short lock.
    pub fn push(&self, events: impl IntoIterator<Item = Event>) -> PushStats {
        self.push_upto(None, false, events)
    }

    /// Like [`push_batch`](Self::push_batch), skipping events at or below
    /// the position already given (a watch replaying from a lower cursor).
    pub fn push_new(
        &self,
        source: &Arc<str>,
        upto: u64,
        events: impl IntoIterator<Item = Event>,
    ) -> PushStats {
        self.push_upto(Some((source, upto)), true, events)
    }

    /// Queue the events of one delivery of `source` that reached position
    /// `upto`, after which the plugin has been given everything up to it.
    pub fn push_batch(
        &self,
        source: &Arc<str>,
        upto: u64,
        events: impl IntoIterator<Item = Event>,
    ) -> PushStats {
        self.push_upto(Some((source, upto)), false, events)
    }

    /// The position of `source` delivered up to, if the queue tracks it.
    pub fn enqueued(&self, source: &str) -> Option<u64> {
        self.inner.lock().cursors.enqueued(source)
    }

    /// Drop every queued event but keep them pending: the cursor stays
    /// before them (a plugin parked on this replica).
    pub fn clear_entries(&self) {
        self.drop_entries(&mut self.inner.lock());
    }

    /// Drop every queued entry and the fold index; the entries stay
    /// pending. Returns how many there were.
    fn drop_entries(&self, inner: &mut Inner) -> usize {
        let n = inner.entries.len();
        inner.entries.clear();
        self.len.store(0, Ordering::Release);
        inner.last.clear();
        inner.indexed = false;
        inner.entries.allow_chunks();
        n
    }

    /// Start `source` over at position `at` (a cursor handed over from
    /// another replica), forgetting what was pending.
    pub fn reset_source(&self, source: &Arc<str>, at: u64) {
        self.inner.lock().cursors.reset(source, at);
    }

    /// The event taken by [`pop`](Self::pop) was handled (or dead-lettered).
    pub fn complete(&self, event: &Event) {
        self.inner.lock().cursors.untrack(&event.source, event.seq);
    }

    /// Several taken events were handled: [`complete`](Self::complete)
    /// under one lock.
    pub fn complete_all(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        self.inner.lock().cursors.untrack_all(events);
    }

    /// [`complete_all`](Self::complete_all), leaving the events to be
    /// dropped by the next push, on the producer's thread: their keys,
    /// values and source names are reference counts the producer touches
    /// anyway, so dropping them there keeps those cache lines on its core
    /// instead of moving them to the worker's and back for every event. At
    /// most [`SPENT_MAX`] wait; past that, or when nothing more is queued,
    /// the consumer drops them itself.
    pub fn complete_and_retire(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        inner.cursors.untrack_all(&events);
        if inner.entries.is_empty() {
            // Nothing queued (or closed): the consumer goes idle, and no
            // push may come soon (a pooled plugin is not polled again until
            // one does).
            let spent = inner.take_spent();
            drop(inner);
            drop((spent, events));
            return;
        }
        if inner.spent_len + events.len() > SPENT_MAX {
            drop(inner);
            drop(events);
            return;
        }
        inner.spent_len += events.len();
        inner.spent.push(events);
    }

    /// (source, cursor) for every tracked source.
    pub fn cursor_positions(&self) -> Vec<(Arc<str>, u64)> {
        self.inner.lock().cursors.positions()
    }

    /// Where the first queued event of `key` in `source` at or after
    /// position `seq` stands (0: next to be taken), looking at no more than
    /// the first `cap` entries so a trace never holds the lock for long.
    pub fn find(&self, source: &str, key: &str, seq: u64, cap: usize) -> Option<usize> {
        let inner = self.inner.lock();
        inner
            .entries
            .iter()
            .take(cap)
            .position(|e| e.seq >= seq && *e.source == *source && *e.key == *key)
    }

    fn push_upto(
        &self,
        upto: Option<(&Arc<str>, u64)>,
        only_new: bool,
        events: impl IntoIterator<Item = Event>,
    ) -> PushStats {
        let capacity = self.capacity.load(std::sync::atomic::Ordering::Relaxed);
        let mut stats = PushStats::default();
        // Made (cloned, filtered) before the lock: the consumer waits for
        // it meanwhile.
        let events: Vec<Event> = events.into_iter().collect();
        let mut inner = self.inner.lock();
        let spent = inner.take_spent();
        let given = match upto {
            Some((source, upto)) => inner.cursors.deliver(source, upto),
            None => 0,
        };
        if inner.closed {
            return stats;
        }
        let fits = !inner.indexed && inner.entries.len() + events.len() <= capacity;
        if fits && !(only_new && events.iter().any(|e| e.seq > 0 && e.seq <= given)) {
            // Nothing to skip or fold: the delivery goes in as it is.
            inner.cursors.track_all(&events);
            stats.queued = events.len();
            inner.entries.append(events);
        } else {
            self.push_each(&mut inner, &mut stats, only_new, given, events);
        }
        stats.len = inner.entries.len();
        inner.peak = inner.peak.max(stats.len);
        self.len.store(stats.len, Ordering::Release);
        drop(inner);
        self.ready.notify_one();
        drop(spent);
        if stats.queued > 0
            && let Some(kick) = self.on_push.get()
        {
            kick();
        }
        stats
    }

    /// Queue `events` one by one: skipping those at or below `given` when
    /// `only_new`, folding into queued ones once full.
    fn push_each(
        &self,
        inner: &mut Inner,
        stats: &mut PushStats,
        only_new: bool,
        given: u64,
        events: Vec<Event>,
    ) {
        let capacity = self.capacity.load(std::sync::atomic::Ordering::Relaxed);
        for event in events {
            if only_new && event.seq > 0 && event.seq <= given {
                continue;
            }
            let full = inner.entries.len() >= capacity;
            if full && !inner.indexed {
                inner.index();
            }
            let id = if inner.indexed { inner.id(&event) } else { 0 };
            if full
                && let Some(&seq) = inner.last.get(&id)
                && let Some(queued) = inner.entries.get_mut((seq - inner.head) as usize)
                && queued.source == event.source
                && queued.key == event.key
                && can_absorb(queued, &event)
            {
                let (source, before) = (queued.source.clone(), queued.seq);
                queued.absorb(event);
                let after = queued.seq;
                if after != before {
                    inner.cursors.untrack(&source, before);
                    inner.cursors.track(&source, after);
                }
                stats.coalesced += 1;
                continue;
            }
            if full {
                stats.overflow += 1;
            }
            inner.cursors.track(&event.source, event.seq);
            if inner.indexed {
                let seq = inner.head + inner.entries.len() as u64;
                inner.last.insert(id, seq);
            }
            inner.entries.push_back(event);
            stats.queued += 1;
        }
    }

    /// Call `kick` after every push that queues something (once set, it
    /// stays).
    pub fn on_push(&self, kick: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_push.set(kick);
    }

    fn take_front(&self, inner: &mut Inner) -> Option<Event> {
        let event = inner.entries.pop_front()?;
        self.len.store(inner.entries.len(), Ordering::Release);
        let seq = inner.head;
        inner.head += 1;
        if inner.indexed {
            let id = inner.id(&event);
            if inner.last.get(&id) == Some(&seq) {
                inner.last.remove(&id);
            }
            inner.unindex(self.capacity.load(Ordering::Relaxed));
        }
        Some(event)
    }

    fn take_up_to(&self, inner: &mut Inner, max: usize) -> Vec<Event> {
        let n = inner.entries.len().min(max.max(1));
        if n > 0 {
            inner.idle_waits = 0;
        }
        if inner.indexed {
            return (0..n).filter_map(|_| self.take_front(inner)).collect();
        }
        let taken = inner.entries.take_front(n);
        inner.head += taken.len() as u64;
        self.len.store(inner.entries.len(), Ordering::Release);
        taken
    }

    /// Take the next event, waiting up to `wait` for one. `None` when the
    /// wait ran out or the queue is closed.
    pub fn pop(&self, wait: Duration) -> Option<Event> {
        self.pop_many(1, wait).pop()
    }

    /// Take up to `max` events from the front, waiting up to `wait` for the
    /// first. Empty when the wait ran out or the queue is closed.
    pub fn pop_many(&self, max: usize, wait: Duration) -> Vec<Event> {
        if self.len.load(Ordering::Acquire) == 0 && self.hot.load(Ordering::Relaxed) {
            self.spin();
        }
        let mut inner = self.inner.lock();
        Self::drop_spent_if_idle(&mut inner);
        if inner.closed {
            return Vec::new();
        }
        if inner.entries.is_empty() {
            self.hot.store(false, Ordering::Relaxed);
            let timed_out = self.ready.wait_for(&mut inner, wait).timed_out();
            if inner.closed {
                return Vec::new();
            }
            if timed_out && Self::idle_wait(&mut inner) {
                parking_lot::MutexGuard::unlocked(&mut inner, give_back_freed_memory);
            }
        } else {
            self.hot.store(true, Ordering::Relaxed);
        }
        self.take_up_to(&mut inner, max)
    }

    /// Take up to `max` events from the front without waiting (or
    /// spinning).
    pub fn take_many(&self, max: usize) -> Vec<Event> {
        let mut inner = self.inner.lock();
        Self::drop_spent_if_idle(&mut inner);
        if inner.closed {
            return Vec::new();
        }
        self.take_up_to(&mut inner, max)
    }

    /// With nothing queued, no push may come to drop the retired events:
    /// the consumer drops them, outside the lock.
    fn drop_spent_if_idle(inner: &mut parking_lot::MutexGuard<'_, Inner>) {
        if inner.entries.is_empty() && inner.spent_len > 0 {
            let spent = inner.take_spent();
            parking_lot::MutexGuard::unlocked(inner, || drop(spent));
        }
    }

    /// The consumer waited for events (on its own thread, or asleep while
    /// a pool runs its rounds) and none came. A backlog's chunks are freed
    /// as it drains, all but the last, which stays for the next pushes;
    /// the allocator keeps the memory of the rest (an initial sync of a
    /// million keys leaves hundreds of MiB). So once the queue has stayed
    /// empty for [`SHRINK_AFTER_IDLE_WAITS`] waits in a row after a backlog
    /// above [`SHRINK_KEEP`] events, its last chunk goes too and the
    /// allocator is asked to give the memory back. Not sooner: a plugin
    /// that drains a burst and gets the next one a moment later reuses it.
    pub fn idle(&self) {
        let shrunk = Self::idle_wait(&mut self.inner.lock());
        if shrunk {
            give_back_freed_memory();
        }
    }

    /// Count an empty wait; whether the memory of a backlog is to be given
    /// back now.
    fn idle_wait(inner: &mut Inner) -> bool {
        if !inner.entries.is_empty() {
            inner.idle_waits = 0;
            return false;
        }
        inner.idle_waits = inner.idle_waits.saturating_add(1);
        // The allocator keeps a drained backlog's memory until asked.
        let shrink = inner.idle_waits >= SHRINK_AFTER_IDLE_WAITS
            && (inner.entries.capacity() > SHRINK_KEEP || inner.peak > SHRINK_KEEP);
        if shrink {
            inner.entries.shrink_to(SHRINK_KEEP);
            inner.peak = 0;
        }
        shrink
    }

    /// Wait briefly for an event without sleeping (see [`spin_while`]).
    fn spin(&self) {
        spin_while(|| self.len.load(Ordering::Acquire) == 0);
    }

    /// Put events taken by [`pop_many`](Self::pop_many) back at the front,
    /// in order (a batch that failed part way: the rest goes one by one).
    /// They stay pending throughout.
    pub fn requeue_front(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        if inner.closed {
            return;
        }
        let n = events.len() as u64;
        inner.head -= n;
        let head = inner.head;
        for (i, e) in events.into_iter().enumerate().rev() {
            if inner.indexed {
                let id = inner.id(&e);
                inner.last.entry(id).or_insert(head + i as u64);
            }
            inner.entries.push_front(e);
        }
        self.len.store(inner.entries.len(), Ordering::Release);
    }

    /// Take the next event without waiting.
    pub fn try_pop(&self) -> Option<Event> {
        self.take_front(&mut self.inner.lock())
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Nothing waiting?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stop accepting events and wake the consumer; returns how many events
    /// were still queued. They are dropped from memory but stay pending, so
    /// the cursor stays below them and a restart delivers them again.
    pub fn close(&self) -> usize {
        let mut inner = self.inner.lock();
        inner.closed = true;
        let n = self.drop_entries(&mut inner);
        let spent = inner.take_spent();
        drop(inner);
        drop(spent);
        self.ready.notify_all();
        n
    }
}

impl crate::store::CursorProbe for EventQueue {
    fn cursors(&self) -> Vec<(Arc<str>, u64)> {
        self.cursor_positions()
    }
}
