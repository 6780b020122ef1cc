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
//! The queue also knows the plugin's cursors. Per source it tracks the
//! position delivered up to (`enqueued`) and the positions of events not yet
//! completed (queued or in flight, folding moves a position). The cursor of a
//! source is one below the lowest such position, or `enqueued` when none is
//! left: everything at or below it was handled. This module must not call
//! plugins.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::event::{Event, EventKind};

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

/// The positions of one source's events not yet completed, with
/// multiplicity, in ascending order. Events are mostly tracked in ascending
/// order and completed from the front, so runs of a deque do what an
/// ordered map would without a tree operation per event. A position
/// completed out of order keeps its slot with a count of zero until the
/// front passes it (or a compaction drops it).
#[derive(Default)]
struct Positions {
    /// (position, count), positions strictly ascending, the front's count
    /// above zero.
    runs: VecDeque<(u64, u32)>,
    /// Slots with a count of zero.
    zeros: usize,
}

impl Positions {
    fn add(&mut self, seq: u64) {
        match self.runs.back_mut() {
            Some((last, n)) if *last == seq => {
                if *n == 0 {
                    self.zeros -= 1;
                }
                *n += 1;
            }
            Some((last, _)) if *last > seq => {
                // Out of order (rare): find its place.
                match self.runs.binary_search_by_key(&seq, |r| r.0) {
                    Ok(i) => {
                        if self.runs[i].1 == 0 {
                            self.zeros -= 1;
                        }
                        self.runs[i].1 += 1;
                    }
                    Err(i) => self.runs.insert(i, (seq, 1)),
                }
            }
            _ => self.runs.push_back((seq, 1)),
        }
    }

    fn remove(&mut self, seq: u64) {
        match self.runs.front_mut() {
            Some((first, n)) if *first == seq => {
                *n -= 1;
                if *n > 0 {
                    return;
                }
                self.runs.pop_front();
                while let Some((_, 0)) = self.runs.front() {
                    self.runs.pop_front();
                    self.zeros -= 1;
                }
            }
            Some(_) => {
                if let Ok(i) = self.runs.binary_search_by_key(&seq, |r| r.0)
                    && self.runs[i].1 > 0
                {
                    self.runs[i].1 -= 1;
                    if self.runs[i].1 == 0 {
                        self.zeros += 1;
                        // Keep completed slots from piling up behind a
                        // front that does not move (a quarantined plugin
                        // folding a flood into its queue).
                        if self.zeros > 64 && self.zeros * 2 > self.runs.len() {
                            self.runs.retain(|r| r.1 > 0);
                            self.zeros = 0;
                        }
                    }
                }
            }
            None => {}
        }
    }

    /// The lowest position not completed.
    fn lowest(&self) -> Option<u64> {
        self.runs.front().map(|r| r.0)
    }
}

#[derive(Default)]
struct Inner {
    /// Entries; `None` marks an entry whose event was taken by a fold.
    entries: VecDeque<Event>,
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
    /// Per source: the position delivered up to.
    enqueued: HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    /// Per source: positions of events not completed, with multiplicity.
    pending: HashMap<Arc<str>, Positions, foldhash::fast::RandomState>,
    /// Handled events left for the producer to drop (see
    /// [`EventQueue::complete_and_retire`]), and how many.
    spent: Vec<Vec<Event>>,
    spent_len: usize,
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

    fn track(&mut self, source: &Arc<str>, seq: u64) {
        if seq == 0 {
            return;
        }
        let positions = match self.pending.get_mut(source) {
            Some(p) => p,
            None => self.pending.entry(source.clone()).or_default(),
        };
        positions.add(seq);
    }

    fn untrack(&mut self, source: &Arc<str>, seq: u64) {
        if seq == 0 {
            return;
        }
        if let Some(p) = self.pending.get_mut(source) {
            p.remove(seq);
        }
    }

    /// Complete several events: one look-up per run of the same source.
    fn untrack_all(&mut self, events: &[Event]) {
        let mut at: Option<(&Arc<str>, Option<&mut Positions>)> = None;
        for e in events.iter().filter(|e| e.seq > 0) {
            let same = at
                .as_ref()
                .is_some_and(|(source, _)| Arc::ptr_eq(source, &e.source));
            if !same {
                at = Some((&e.source, self.pending.get_mut(&e.source)));
            }
            if let Some((_, Some(p))) = at.as_mut() {
                p.remove(e.seq);
            }
        }
    }

    /// Build the fold index from the queued entries (the queue is full).
    fn index(&mut self) {
        self.last.clear();
        for i in 0..self.entries.len() {
            let id = self.id(&self.entries[i]);
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

/// How long a hot consumer spins for the next event before it sleeps. A
/// sleep costs both sides a system call (the producer's wake-up), several
/// times the cost of a no-op plugin call.
const SPIN: Duration = Duration::from_micros(50);

/// Most handled events left for the producer to drop (see
/// [`EventQueue::complete_and_retire`]).
const SPENT_MAX: usize = 1024;

/// Spin (yielding between checks) while `waiting` holds, for up to
/// [`SPIN`], unless enough other threads spin already: with many plugins
/// busy at once (fan-out) spinning threads would only take the CPU from the
/// ones with work. At most one thread per core but one spins.
pub(crate) fn spin_while(waiting: impl Fn() -> bool) {
    static SPINNING: AtomicUsize = AtomicUsize::new(0);
    static MOST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let most = *MOST.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    });
    if SPINNING.fetch_add(1, Ordering::AcqRel) >= most {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let until = Instant::now() + SPIN;
    while waiting() && Instant::now() < until {
        for _ in 0..32 {
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
    SPINNING.fetch_sub(1, Ordering::AcqRel);
}

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
        self.inner.lock().enqueued.get(source).copied()
    }

    /// Drop every queued event but keep them pending: the cursor stays
    /// before them (a plugin parked on this replica).
    pub fn clear_entries(&self) {
        let mut inner = self.inner.lock();
        inner.entries.clear();
        self.len.store(0, Ordering::Release);
        inner.last.clear();
        inner.indexed = false;
    }

    /// Start `source` over at position `at` (a cursor handed over from
    /// another replica), forgetting what was pending.
    pub fn reset_source(&self, source: &Arc<str>, at: u64) {
        let mut inner = self.inner.lock();
        inner.enqueued.insert(source.clone(), at);
        inner.pending.remove(source);
    }

    /// The event taken by [`pop`](Self::pop) was handled (or dead-lettered).
    pub fn complete(&self, event: &Event) {
        self.inner.lock().untrack(&event.source, event.seq);
    }

    /// Several taken events were handled: [`complete`](Self::complete)
    /// under one lock.
    pub fn complete_all(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        self.inner.lock().untrack_all(events);
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
        inner.untrack_all(&events);
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
        let inner = self.inner.lock();
        inner
            .enqueued
            .iter()
            .map(|(s, &upto)| {
                let low = inner.pending.get(s).and_then(Positions::lowest);
                (s.clone(), low.map_or(upto, |l| (l - 1).min(upto)))
            })
            .collect()
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
        let mut given = 0;
        if let Some((source, upto)) = upto {
            let e = inner.enqueued.entry(source.clone()).or_default();
            given = *e;
            *e = (*e).max(upto);
        }
        if inner.closed {
            return stats;
        }
        for event in events {
            if only_new && event.seq > 0 && event.seq <= given {
                continue;
            }
            let full = inner.entries.len() >= capacity;
            if full && !inner.indexed {
                inner.index();
            }
            let id = if inner.indexed { inner.id(&event) } else { 0 };
            if full && let Some(&seq) = inner.last.get(&id) {
                let idx = (seq - inner.head) as usize;
                let queued = &mut inner.entries[idx];
                if queued.source == event.source
                    && queued.key == event.key
                    && can_absorb(queued, &event)
                {
                    let (source, before) = (queued.source.clone(), queued.seq);
                    queued.absorb(event);
                    let after = queued.seq;
                    if after != before {
                        inner.untrack(&source, before);
                        inner.track(&source, after);
                    }
                    stats.coalesced += 1;
                    continue;
                }
            }
            if full {
                stats.overflow += 1;
            }
            inner.track(&event.source, event.seq);
            if inner.indexed {
                let seq = inner.head + inner.entries.len() as u64;
                inner.last.insert(id, seq);
            }
            inner.entries.push_back(event);
            stats.queued += 1;
        }
        stats.len = inner.entries.len();
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
        if inner.indexed {
            return (0..n).filter_map(|_| self.take_front(inner)).collect();
        }
        let taken: Vec<Event> = inner.entries.drain(..n).collect();
        inner.head += n as u64;
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
            let _ = self.ready.wait_for(&mut inner, wait);
            if inner.closed {
                return Vec::new();
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

    /// Wait up to [`SPIN`] for an event without sleeping.
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
        let n = inner.entries.len();
        inner.entries.clear();
        self.len.store(0, Ordering::Release);
        inner.last.clear();
        inner.indexed = false;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn put(k: &str, v: &str, rev: u64) -> Event {
        Event::put(&Arc::from("s"), k, Bytes::from(v.to_owned()), rev)
    }
    fn del(k: &str, rev: u64) -> Event {
        Event::delete(&Arc::from("s"), k, rev)
    }
    #[test]
    fn retired_events_are_dropped_by_the_next_push_or_an_idle_consumer() {
        let src: Arc<str> = Arc::from("s");
        let key: Arc<str> = Arc::from("k");
        let q = EventQueue::new(100);
        let at = |seq| {
            let mut e = Event::put(&src, key.clone(), Bytes::from_static(b"v"), seq);
            e.seq = seq;
            e
        };
        q.push_batch(&src, 2, [at(1), at(2)]);
        let taken = q.take_many(1);
        assert_eq!(Arc::strong_count(&key), 3);
        q.complete_and_retire(taken);
        // Completed (the cursor moves) but not dropped yet.
        assert_eq!(q.cursor_positions(), vec![(src.clone(), 1)]);
        assert_eq!(Arc::strong_count(&key), 3);
        // The next push drops it.
        q.push_batch(&src, 3, [at(3)]);
        assert_eq!(Arc::strong_count(&key), 3);
        // Retired with more still queued: kept; retired with nothing left
        // queued, dropped at once with what was kept.
        let taken = q.take_many(1);
        q.complete_and_retire(taken);
        assert_eq!(Arc::strong_count(&key), 3);
        let taken = q.take_many(1);
        assert_eq!(Arc::strong_count(&key), 3);
        q.complete_and_retire(taken);
        assert_eq!(Arc::strong_count(&key), 1);
        // Kept events are also dropped by a consumer that finds the queue
        // empty (the producer pushed nothing more).
        q.push_batch(&src, 5, [at(4), at(5)]);
        let taken = q.take_many(1);
        q.complete_and_retire(taken);
        assert_eq!(Arc::strong_count(&key), 3);
        q.clear_entries();
        assert!(q.take_many(1).is_empty());
        assert_eq!(Arc::strong_count(&key), 1);
        // Past the bound, the consumer drops them at once.
        q.push_batch(&src, 6, [at(6)]);
        let many: Vec<Event> = (1..=SPENT_MAX as u64 + 1).map(|i| at(10 + i)).collect();
        q.complete_and_retire(many);
        assert_eq!(Arc::strong_count(&key), 2);
    }

    fn drain(q: &EventQueue) -> Vec<(String, EventKind, Option<String>, u64, u32)> {
        std::iter::from_fn(|| q.try_pop())
            .map(|e| {
                (
                    e.key.to_string(),
                    e.kind,
                    e.value.map(|v| String::from_utf8(v.to_vec()).unwrap()),
                    e.revision,
                    e.coalesced,
                )
            })
            .collect()
    }

    #[test]
    fn below_capacity_everything_is_queued_in_order() {
        let q = EventQueue::new(10);
        let s = q.push([put("a", "1", 1), put("a", "2", 2), del("a", 3)]);
        assert_eq!(
            s,
            PushStats {
                queued: 3,
                coalesced: 0,
                overflow: 0,
                len: 3,
            }
        );
        let got = drain(&q);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].1, EventKind::Delete);
    }

    #[test]
    fn full_queue_folds_latest_value_and_counts() {
        let q = EventQueue::new(2);
        q.push([put("a", "1", 1), put("b", "1", 2)]);
        let s = q.push([put("a", "2", 3), put("a", "3", 4), put("b", "2", 5)]);
        assert_eq!(s.coalesced, 3);
        assert_eq!(
            drain(&q),
            vec![
                ("a".into(), EventKind::Put, Some("3".into()), 4, 2),
                ("b".into(), EventKind::Put, Some("2".into()), 5, 1),
            ]
        );
    }

    #[test]
    fn a_delete_is_never_lost() {
        let q = EventQueue::new(1);
        q.push([put("a", "1", 1)]);
        // put then delete folds into the delete
        q.push([del("a", 2)]);
        // a put after a queued delete is queued behind it, not folded in
        let s = q.push([put("a", "2", 3), put("a", "3", 4)]);
        assert_eq!(
            s,
            PushStats {
                queued: 1,
                coalesced: 1,
                overflow: 1,
                len: 2,
            }
        );
        assert_eq!(
            drain(&q),
            vec![
                ("a".into(), EventKind::Delete, None, 2, 1),
                ("a".into(), EventKind::Put, Some("3".into()), 4, 1),
            ]
        );
    }

    #[test]
    fn distinct_keys_overflow_instead_of_dropping() {
        let q = EventQueue::new(2);
        let s = q.push((0..5).map(|i| put(&format!("k{i}"), "v", i)));
        assert_eq!(
            s,
            PushStats {
                queued: 5,
                coalesced: 0,
                overflow: 3,
                len: 5,
            }
        );
        assert_eq!(drain(&q).len(), 5);
    }

    #[test]
    fn folding_targets_the_keys_last_entry_after_pops() {
        let q = EventQueue::new(2);
        q.push([put("a", "1", 1), put("b", "1", 2)]);
        assert_eq!(&*q.try_pop().unwrap().key, "a");
        q.push([put("a", "2", 3)]); // room: queued
        q.push([put("a", "3", 4)]); // full: folds into a@3
        assert_eq!(
            drain(&q),
            vec![
                ("b".into(), EventKind::Put, Some("1".into()), 2, 0),
                ("a".into(), EventKind::Put, Some("3".into()), 4, 1),
            ]
        );
    }

    fn seq(mut e: Event, seq: u64) -> Event {
        e.seq = seq;
        e
    }

    #[test]
    fn the_cursor_stays_below_every_event_not_completed() {
        let q = EventQueue::new(2);
        let s: Arc<str> = Arc::from("s");
        q.reset_source(&s, 4);
        assert_eq!(q.cursor_positions(), vec![(s.clone(), 4)]);
        q.push_batch(&s, 5, [seq(put("a", "1", 5), 5)]);
        q.push_batch(&s, 6, [seq(put("b", "1", 6), 6)]);
        // Full: a@7 folds into a@5, which moves to position 7; b@6 is now
        // the lowest pending position.
        q.push_batch(&s, 7, [seq(put("a", "2", 7), 7)]);
        assert_eq!(q.cursor_positions(), vec![(s.clone(), 5)]);
        let a = q.try_pop().unwrap();
        assert_eq!((&*a.key, a.seq), ("a", 7));
        q.complete(&a);
        assert_eq!(
            q.cursor_positions(),
            vec![(s.clone(), 5)],
            "b@6 is still queued"
        );
        let b = q.try_pop().unwrap();
        assert_eq!(
            q.cursor_positions(),
            vec![(s.clone(), 5)],
            "b@6 is in flight"
        );
        q.complete(&b);
        assert_eq!(q.cursor_positions(), vec![(s.clone(), 7)]);
        // A batch that matched nothing still moves the cursor.
        q.push_batch(&s, 9, []);
        assert_eq!(q.cursor_positions(), vec![(s.clone(), 9)]);
        // Closing keeps undelivered events pending.
        q.push_batch(&s, 10, [seq(put("c", "1", 10), 10)]);
        assert_eq!(q.close(), 1);
        assert_eq!(q.cursor_positions(), vec![(s, 9)]);
    }

    #[test]
    fn the_same_key_of_two_sources_is_never_folded() {
        let q = EventQueue::new(1);
        q.push([put("a", "1", 1)]);
        let mut other = put("a", "2", 2);
        other.source = Arc::from("t");
        let s = q.push([other]);
        assert_eq!(s.coalesced, 0);
        assert_eq!(drain(&q).len(), 2);
    }

    #[test]
    fn requeued_events_come_first_and_still_fold_into_the_right_entry() {
        let q = EventQueue::new(3);
        q.push([put("a", "1", 1), put("b", "1", 2), put("c", "1", 3)]);
        let taken = q.pop_many(2, Duration::ZERO);
        assert_eq!(taken.len(), 2);
        q.requeue_front(taken);
        // Full: a later change of b folds into the requeued b.
        let s = q.push([put("b", "2", 4)]);
        assert_eq!(s.coalesced, 1);
        assert_eq!(
            drain(&q),
            vec![
                ("a".into(), EventKind::Put, Some("1".into()), 1, 0),
                ("b".into(), EventKind::Put, Some("2".into()), 4, 1),
                ("c".into(), EventKind::Put, Some("1".into()), 3, 0),
            ]
        );
    }

    #[test]
    fn close_wakes_a_waiting_consumer() {
        let q = Arc::new(EventQueue::new(4));
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.pop(Duration::from_secs(30)));
        while q.inner.lock().entries.is_empty() && !t.is_finished() {
            q.close();
            std::thread::yield_now();
        }
        assert!(t.join().unwrap().is_none());
    }

    #[test]
    fn len_follows_every_change_without_the_lock() {
        let q = EventQueue::new(8);
        q.push([put("a", "1", 1), put("b", "1", 2), put("c", "1", 3)]);
        assert_eq!(q.len(), 3);
        let taken = q.pop_many(2, Duration::ZERO);
        assert_eq!(q.len(), 1);
        q.requeue_front(taken);
        assert_eq!(q.len(), 3);
        assert!(q.try_pop().is_some());
        assert_eq!(q.len(), 2);
        q.clear_entries();
        assert!(q.is_empty());
        q.push([put("d", "1", 4)]);
        assert_eq!(q.close(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn completing_a_batch_at_once_moves_the_cursor_like_one_by_one() {
        let s: Arc<str> = Arc::from("s");
        let events = |q: &EventQueue| {
            q.reset_source(&s, 0);
            q.push_batch(
                &s,
                4,
                (1..=4).map(|i| seq(put(&format!("k{i}"), "v", i), i)),
            );
            q.pop_many(4, Duration::ZERO)
        };
        let (one, all) = (EventQueue::new(8), EventQueue::new(8));
        let (a, b) = (events(&one), events(&all));
        for e in &a[..3] {
            one.complete(e);
        }
        all.complete_all(&b[..3]);
        assert_eq!(one.cursor_positions(), vec![(s.clone(), 3)]);
        assert_eq!(all.cursor_positions(), one.cursor_positions());
        all.complete_all(&b[3..]);
        assert_eq!(all.cursor_positions(), vec![(s, 4)]);
    }

    #[test]
    fn a_hot_consumer_still_gets_an_event_pushed_while_it_spins_or_sleeps() {
        let q = Arc::new(EventQueue::new(8));
        // Work found without waiting: the consumer is hot and spins first.
        q.push([put("a", "1", 1)]);
        assert_eq!(q.pop_many(8, Duration::ZERO).len(), 1);
        assert!(q.hot.load(Ordering::Relaxed));
        for round in 0..50u64 {
            let q2 = q.clone();
            let producer = std::thread::spawn(move || {
                q2.push([put("b", "1", round + 2)]);
            });
            let got = q.pop_many(8, Duration::from_secs(30));
            producer.join().unwrap();
            let got = if got.is_empty() {
                q.pop_many(8, Duration::from_secs(30))
            } else {
                got
            };
            assert_eq!(got.len(), 1, "round {round}: the pushed event arrives");
        }
    }

    /// A small deterministic generator for the randomized tests.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn positions_agree_with_an_ordered_multiset() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for round in 0..200 {
            let mut p = Positions::default();
            let mut model: std::collections::BTreeMap<u64, u32> = Default::default();
            let mut top = 1;
            for step in 0..400 {
                let r = next(&mut state);
                match r % 10 {
                    // Mostly ascending adds, some repeats and some out of
                    // order.
                    0..=3 => {
                        top += r % 3;
                        p.add(top);
                        *model.entry(top).or_default() += 1;
                    }
                    4 => {
                        let seq = 1 + (r >> 8) % top;
                        p.add(seq);
                        *model.entry(seq).or_default() += 1;
                    }
                    // Mostly from the front, some from anywhere, some not
                    // tracked at all.
                    5..=7 => {
                        if let Some(&seq) = model.keys().next() {
                            p.remove(seq);
                            let n = model.get_mut(&seq).unwrap();
                            *n -= 1;
                            if *n == 0 {
                                model.remove(&seq);
                            }
                        }
                    }
                    _ => {
                        let seq = 1 + (r >> 8) % (top + 2);
                        p.remove(seq);
                        if let Some(n) = model.get_mut(&seq) {
                            *n -= 1;
                            if *n == 0 {
                                model.remove(&seq);
                            }
                        }
                    }
                }
                assert_eq!(
                    p.lowest(),
                    model.keys().next().copied(),
                    "round {round}, step {step}"
                );
                let live = p.runs.iter().filter(|r| r.1 > 0).count();
                assert_eq!(live, model.len(), "round {round}, step {step}");
                assert_eq!(p.zeros, p.runs.len() - live, "round {round}, step {step}");
            }
        }
    }

    #[test]
    fn folding_still_works_after_the_queue_drained_and_filled_again() {
        let q = EventQueue::new(3);
        for round in 0..3u64 {
            let r = round * 10;
            q.push([
                put("a", "1", r + 1),
                put("b", "1", r + 2),
                put("c", "1", r + 3),
            ]);
            // Full: these fold.
            let s = q.push([put("a", "2", r + 4), put("c", "2", r + 5)]);
            assert_eq!(s.coalesced, 2, "round {round}");
            // Taken and put back (a batch that failed part way): still
            // folded into the right entries.
            let taken = q.pop_many(2, Duration::ZERO);
            q.requeue_front(taken);
            let s = q.push([put("b", "3", r + 6)]);
            assert_eq!(s.coalesced, 1, "round {round}");
            assert_eq!(
                drain(&q),
                vec![
                    ("a".into(), EventKind::Put, Some("2".into()), r + 4, 1),
                    ("b".into(), EventKind::Put, Some("3".into()), r + 6, 1),
                    ("c".into(), EventKind::Put, Some("2".into()), r + 5, 1),
                ],
                "round {round}"
            );
        }
    }
}
