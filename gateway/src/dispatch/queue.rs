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
//! always preserved. This module must not call plugins.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

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
}

#[derive(Default)]
struct Inner {
    /// Entries; `None` marks an entry whose event was taken by a fold.
    entries: VecDeque<Event>,
    /// Sequence number of `entries[0]`.
    head: u64,
    /// Key → sequence number of its last queued entry.
    last: HashMap<String, u64>,
    closed: bool,
}

/// A multi-producer, single-consumer queue of events for one plugin.
pub struct EventQueue {
    capacity: std::sync::atomic::AtomicUsize,
    inner: Mutex<Inner>,
    ready: Condvar,
}

/// Whether a queued event may absorb a later change of the same key.
fn can_absorb(queued: &Event, later: &Event) -> bool {
    !(queued.kind == EventKind::Delete && later.kind == EventKind::Put)
}

impl EventQueue {
    /// An empty queue folding at `capacity` (at least 1).
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            capacity: std::sync::atomic::AtomicUsize::new(capacity.max(1)),
            inner: Mutex::new(Inner::default()),
            ready: Condvar::new(),
        }
    }

    /// Change the capacity (a reloaded plugin setting); queued events stay.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity
            .store(capacity.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Queue events in order. Never blocks beyond a short lock.
    pub fn push(&self, events: impl IntoIterator<Item = Event>) -> PushStats {
        let capacity = self.capacity.load(std::sync::atomic::Ordering::Relaxed);
        let mut stats = PushStats::default();
        let mut inner = self.inner.lock();
        if inner.closed {
            return stats;
        }
        for event in events {
            let full = inner.entries.len() >= capacity;
            if full && let Some(&seq) = inner.last.get(&event.key) {
                let idx = (seq - inner.head) as usize;
                let queued = &mut inner.entries[idx];
                if can_absorb(queued, &event) {
                    queued.absorb(event);
                    stats.coalesced += 1;
                    continue;
                }
            }
            if full {
                stats.overflow += 1;
            }
            let seq = inner.head + inner.entries.len() as u64;
            inner.last.insert(event.key.clone(), seq);
            inner.entries.push_back(event);
            stats.queued += 1;
        }
        drop(inner);
        self.ready.notify_one();
        stats
    }

    fn take_front(inner: &mut Inner) -> Option<Event> {
        let event = inner.entries.pop_front()?;
        let seq = inner.head;
        inner.head += 1;
        if inner.last.get(&event.key) == Some(&seq) {
            inner.last.remove(&event.key);
        }
        Some(event)
    }

    /// Take the next event, waiting up to `wait` for one. `None` when the
    /// wait ran out or the queue is closed.
    pub fn pop(&self, wait: Duration) -> Option<Event> {
        let mut inner = self.inner.lock();
        if inner.closed {
            return None;
        }
        if inner.entries.is_empty() {
            let _ = self.ready.wait_for(&mut inner, wait);
            if inner.closed {
                return None;
            }
        }
        Self::take_front(&mut inner)
    }

    /// Take the next event without waiting.
    pub fn try_pop(&self) -> Option<Event> {
        Self::take_front(&mut self.inner.lock())
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Nothing waiting?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stop accepting events and wake the consumer; returns how many events
    /// were still queued (they are discarded).
    pub fn close(&self) -> usize {
        let mut inner = self.inner.lock();
        inner.closed = true;
        let n = inner.entries.len();
        inner.entries.clear();
        inner.last.clear();
        drop(inner);
        self.ready.notify_all();
        n
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
    fn drain(q: &EventQueue) -> Vec<(String, EventKind, Option<String>, u64, u32)> {
        std::iter::from_fn(|| q.try_pop())
            .map(|e| {
                (
                    e.key,
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
                overflow: 0
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
                overflow: 1
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
                overflow: 3
            }
        );
        assert_eq!(drain(&q).len(), 5);
    }

    #[test]
    fn folding_targets_the_keys_last_entry_after_pops() {
        let q = EventQueue::new(2);
        q.push([put("a", "1", 1), put("b", "1", 2)]);
        assert_eq!(q.try_pop().unwrap().key, "a");
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
}
