//! The queued events of one plugin, in chunks.
//!
//! A queue grows under its lock, and the consumer waits for that lock. One
//! contiguous buffer makes growth expensive exactly when a backlog builds:
//! doubling copies part of it, and every page of the larger buffer is
//! faulted in by the push that first writes to it. A backlog of a million
//! events is about 35,000 page faults, all with the consumer locked out.
//! Here a delivery's own vector, filled by the producer before it takes
//! the lock (its pages are in already), becomes a chunk as it is, so a push
//! moves three words, and a consumer that takes a whole chunk takes that
//! same vector back without copying. Events pushed one at a time go into
//! chunks of [`CHUNK`] events. The last chunk stays when it empties, so a
//! queue that keeps up with single events reuses one chunk rather than
//! allocating one per event; it goes when the queue has stayed idle.
//!
//! Folding needs an entry by its position. A folding queue keeps one chunk
//! ([`Backlog::make_contiguous`]), so that lookup is direct; it is full,
//! and so bounded, while it folds.

use std::collections::VecDeque;

use crate::event::Event;

/// Events in a chunk made for single pushes (about 36 KB, small enough for
/// the allocator's heap rather than a mapping of its own).
const CHUNK: usize = 256;

/// The fewest events of a delivery that become a chunk of their own; fewer
/// are copied into the last chunk.
const OWN_CHUNK_MIN: usize = 16;

/// Events in order, front to back, in chunks.
#[derive(Default)]
pub(super) struct Backlog {
    chunks: VecDeque<VecDeque<Event>>,
    len: usize,
    /// One chunk only, growing as needed (see [`Backlog::make_contiguous`]).
    contiguous: bool,
}

impl Backlog {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room held: the capacity of every chunk.
    pub(super) fn capacity(&self) -> usize {
        self.chunks.iter().map(VecDeque::capacity).sum()
    }

    /// Keep every event in one chunk from now on, until
    /// [`allow_chunks`](Self::allow_chunks), so [`get_mut`](Self::get_mut)
    /// finds an entry at once.
    pub(super) fn make_contiguous(&mut self) {
        self.contiguous = true;
        if self.chunks.len() > 1 {
            let mut one = VecDeque::with_capacity(self.len);
            for chunk in self.chunks.drain(..) {
                one.extend(chunk);
            }
            self.chunks.push_back(one);
        }
    }

    /// New events may go into new chunks again.
    pub(super) fn allow_chunks(&mut self) {
        self.contiguous = false;
    }

    pub(super) fn push_back(&mut self, event: Event) {
        self.len += 1;
        match self.chunks.back_mut() {
            Some(last) if self.contiguous || last.len() < last.capacity() => {
                last.push_back(event);
            }
            _ => {
                let mut chunk = VecDeque::with_capacity(CHUNK);
                chunk.push_back(event);
                self.chunks.push_back(chunk);
            }
        }
    }

    /// Queue all of `events` after the rest. A large enough delivery whose
    /// vector is not mostly spare room becomes a chunk without a copy.
    pub(super) fn append(&mut self, events: Vec<Event>) {
        let own = !self.contiguous
            && events.len() >= OWN_CHUNK_MIN
            && events.capacity() <= events.len() * 2;
        if own {
            self.len += events.len();
            self.chunks.push_back(VecDeque::from(events));
        } else {
            for e in events {
                self.push_back(e);
            }
        }
    }

    pub(super) fn push_front(&mut self, event: Event) {
        self.len += 1;
        match self.chunks.front_mut() {
            Some(first) => first.push_front(event),
            None => self.chunks.push_back(VecDeque::from([event])),
        }
    }

    /// The front event; a chunk it empties goes, unless it is the last.
    pub(super) fn pop_front(&mut self) -> Option<Event> {
        self.skip_empty();
        let first = self.chunks.front_mut()?;
        let event = first.pop_front()?;
        self.len -= 1;
        if first.is_empty() && self.chunks.len() > 1 {
            self.chunks.pop_front();
        }
        Some(event)
    }

    /// Up to `n` events from the front (at least one when there is one).
    /// A front chunk of at most `n` events is handed over whole, its room
    /// and all, so it may hold fewer than `n` even when more are queued;
    /// the rest go out in later takes. Not the last chunk while it is
    /// mostly room: pushes go on into that.
    pub(super) fn take_front(&mut self, n: usize) -> Vec<Event> {
        self.skip_empty();
        let more = self.chunks.len() > 1;
        let Some(first) = self.chunks.front_mut() else {
            return Vec::new();
        };
        let whole = more || first.len() * 2 >= first.capacity();
        if first.len() <= n && whole && !self.contiguous {
            let chunk = self.chunks.pop_front().unwrap_or_default();
            self.len -= chunk.len();
            // O(1) for a chunk that was a delivery's vector and has not
            // been taken from; a rotation in place otherwise.
            return Vec::from(chunk);
        }
        let n = n.min(first.len());
        self.len -= n;
        first.drain(..n).collect()
    }

    /// Drop empty chunks at the front: a contiguous backlog keeps its one
    /// chunk when it empties, and chunks may follow it once allowed again.
    fn skip_empty(&mut self) {
        while self.chunks.len() > 1 && self.chunks.front().is_some_and(VecDeque::is_empty) {
            self.chunks.pop_front();
        }
    }

    /// The event at `index` from the front.
    pub(super) fn get_mut(&mut self, mut index: usize) -> Option<&mut Event> {
        for chunk in &mut self.chunks {
            if index < chunk.len() {
                return chunk.get_mut(index);
            }
            index -= chunk.len();
        }
        None
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Event> {
        self.chunks.iter().flatten()
    }

    /// Drop every event; the chunks go with them.
    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.chunks.clear();
    }

    /// With nothing queued, give back the room of a past backlog beyond
    /// `keep` events.
    pub(super) fn shrink_to(&mut self, keep: usize) {
        if self.len == 0 {
            self.chunks.clear();
        }
        for chunk in &mut self.chunks {
            chunk.shrink_to(keep);
        }
        self.chunks.shrink_to(keep / CHUNK);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn events(from: u64, n: u64) -> Vec<Event> {
        let src: Arc<str> = Arc::from("s");
        (from..from + n)
            .map(|i| {
                let mut e = Event::put(&src, format!("k{i}"), Bytes::from_static(b"v"), i);
                e.seq = i;
                e
            })
            .collect()
    }

    fn seqs(b: &Backlog) -> Vec<u64> {
        b.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn order_holds_across_deliveries_single_pushes_and_requeues() {
        let mut b = Backlog::default();
        b.append(events(1, 64)); // its own chunk
        b.append(events(65, 3)); // copied into a chunk for single events
        b.push_back(events(68, 1).remove(0));
        b.append(events(69, 300));
        assert_eq!(b.len(), 368);
        assert_eq!(seqs(&b), (1..=368).collect::<Vec<_>>());
        let first = b.take_front(64);
        assert_eq!(first.len(), 64);
        assert_eq!(first[63].seq, 64);
        // A delivery's vector comes back whole, with its room.
        assert!(first.capacity() >= 64);
        let e = b.pop_front().unwrap();
        assert_eq!(e.seq, 65);
        assert_eq!(b.chunks.len(), 2);
        b.push_front(e);
        let next = b.take_front(10);
        assert_eq!(
            next.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![65, 66, 67, 68]
        );
        assert_eq!(b.len(), 300);
        assert_eq!(b.get_mut(299).unwrap().seq, 368);
        assert!(b.get_mut(300).is_none());
        let rest: Vec<u64> = std::iter::from_fn(|| b.pop_front().map(|e| e.seq)).collect();
        assert_eq!(rest, (69..=368).collect::<Vec<_>>());
        assert!(b.is_empty());
        // The last chunk stays, for the next pushes.
        assert_eq!(b.chunks.len(), 1);
        b.shrink_to(0);
        assert_eq!(b.capacity(), 0);
    }

    #[test]
    fn single_pushes_that_are_kept_up_with_reuse_one_chunk() {
        let mut b = Backlog::default();
        for seq in 1..=1_000 {
            b.push_back(events(seq, 1).remove(0));
            let taken = b.take_front(64);
            assert_eq!(taken.len(), 1);
            assert_eq!(taken[0].seq, seq);
            // Drained, not handed over: the chunk stays.
            assert!(taken.capacity() < CHUNK);
            assert_eq!(b.chunks.len(), 1);
        }
        // A delivery of its own is handed over whole, room and all.
        b.append(events(1_001, 64));
        let taken = b.take_front(64);
        assert_eq!((taken.len(), taken.capacity()), (64, 64));
    }

    #[test]
    fn a_small_delivery_with_much_spare_room_is_copied_not_kept() {
        let mut b = Backlog::default();
        let mut sparse = Vec::with_capacity(4096);
        sparse.extend(events(1, 20));
        b.append(sparse);
        assert!(
            b.capacity() < 4096,
            "kept {} slots for 20 events",
            b.capacity()
        );
        assert_eq!(seqs(&b), (1..=20).collect::<Vec<_>>());
    }

    #[test]
    fn a_contiguous_backlog_is_one_chunk_until_chunks_are_allowed() {
        let mut b = Backlog::default();
        b.append(events(1, 64));
        b.append(events(65, 64));
        b.make_contiguous();
        assert_eq!(b.chunks.len(), 1);
        b.append(events(129, 64));
        b.push_back(events(193, 1).remove(0));
        assert_eq!(b.chunks.len(), 1);
        assert_eq!(b.get_mut(192).unwrap().seq, 193);
        // Taking part of it leaves it one chunk.
        assert_eq!(b.take_front(100).len(), 100);
        assert_eq!(b.chunks.len(), 1);
        b.allow_chunks();
        b.append(events(194, 64));
        assert_eq!(b.chunks.len(), 2);
        assert_eq!(seqs(&b), (101..=257).collect::<Vec<_>>());
    }

    #[test]
    fn an_emptied_contiguous_chunk_does_not_hide_the_chunks_after_it() {
        let mut b = Backlog::default();
        b.append(events(1, 2));
        b.make_contiguous();
        while b.pop_front().is_some() {}
        b.allow_chunks();
        b.append(events(3, 64));
        assert_eq!(b.take_front(64).len(), 64);
        b.append(events(67, 64));
        b.make_contiguous();
        while b.pop_front().is_some() {}
        b.allow_chunks();
        b.append(events(131, 64));
        assert_eq!(b.pop_front().map(|e| e.seq), Some(131));
    }
}
