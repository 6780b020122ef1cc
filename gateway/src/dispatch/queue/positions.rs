//! A plugin's cursors. Per source the queue tracks the position delivered
//! up to and the positions of events not yet completed (queued or in flight;
//! folding moves a position). The cursor of a source is one below the lowest
//! such position, or the position delivered up to when none is left:
//! everything at or below it was handled.
//!
//! This module only counts positions: it must not hold events, and must not
//! know how the queue orders or folds them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::event::Event;

/// Per source: the position delivered up to, and the positions not yet
/// completed.
#[derive(Default)]
pub(super) struct Cursors {
    /// Per source: the position delivered up to.
    enqueued: HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    /// Per source: positions of events not completed, with multiplicity.
    pending: HashMap<Arc<str>, Positions, foldhash::fast::RandomState>,
}

impl Cursors {
    /// `source` was delivered up to `upto` (never moving back); returns the
    /// position it was delivered up to before.
    #[inline]
    pub(super) fn deliver(&mut self, source: &Arc<str>, upto: u64) -> u64 {
        let e = self.enqueued.entry(source.clone()).or_default();
        let given = *e;
        *e = (*e).max(upto);
        given
    }

    /// The position of `source` delivered up to, if tracked.
    pub(super) fn enqueued(&self, source: &str) -> Option<u64> {
        self.enqueued.get(source).copied()
    }

    /// Start `source` over at position `at`, forgetting what was pending.
    pub(super) fn reset(&mut self, source: &Arc<str>, at: u64) {
        self.enqueued.insert(source.clone(), at);
        self.pending.remove(source);
    }

    /// The event at `seq` of `source` is pending; position 0 is no position
    /// and is not tracked.
    #[inline]
    pub(super) fn track(&mut self, source: &Arc<str>, seq: u64) {
        if seq > 0 {
            self.track_run(source, seq, 1);
        }
    }

    /// Track several events: one look-up per run of the same source, and
    /// one step per run of consecutive positions (a delivery usually is
    /// one such run, after what is pending). This runs under the queue's
    /// lock, which the worker waits for.
    pub(super) fn track_all(&mut self, events: &[Event]) {
        for (source, first, n) in runs(events) {
            self.track_run(source, first, n);
        }
    }

    /// Track the events at `n` consecutive positions from `first`.
    fn track_run(&mut self, source: &Arc<str>, first: u64, n: u64) {
        let positions = match self.pending.get_mut(source) {
            Some(p) => p,
            None => self.pending.entry(source.clone()).or_default(),
        };
        if !positions.add_back_run(first, n) {
            for seq in first..first + n {
                positions.add(seq);
            }
        }
    }

    /// The event at `seq` of `source` was completed.
    #[inline]
    pub(super) fn untrack(&mut self, source: &Arc<str>, seq: u64) {
        if seq > 0 {
            self.untrack_run(source, seq, 1);
        }
    }

    /// Complete several events: one look-up per run of the same source,
    /// and one step per run of consecutive positions (a round's events
    /// usually are one such run, at the front).
    #[inline]
    pub(super) fn untrack_all(&mut self, events: &[Event]) {
        for (source, first, n) in runs(events) {
            self.untrack_run(source, first, n);
        }
    }

    /// Complete the events at `n` consecutive positions from `first`.
    fn untrack_run(&mut self, source: &Arc<str>, first: u64, n: u64) {
        if let Some(p) = self.pending.get_mut(source)
            && !p.remove_front_run(first, n)
        {
            for seq in first..first + n {
                p.remove(seq);
            }
        }
    }

    /// (source, cursor) for every tracked source.
    pub(super) fn positions(&self) -> Vec<(Arc<str>, u64)> {
        self.enqueued
            .iter()
            .map(|(s, &upto)| {
                let low = self.pending.get(s).and_then(Positions::lowest);
                (s.clone(), low.map_or(upto, |l| (l - 1).min(upto)))
            })
            .collect()
    }
}

/// `events` with a position as runs (source, first position, count) of
/// consecutive positions of one source, in order.
fn runs(events: &[Event]) -> impl Iterator<Item = (&Arc<str>, u64, u64)> {
    let mut events = events.iter().filter(|e| e.seq > 0).peekable();
    std::iter::from_fn(move || {
        let e = events.next()?;
        let mut n = 1;
        while events
            .next_if(|next| Arc::ptr_eq(&next.source, &e.source) && next.seq == e.seq + n)
            .is_some()
        {
            n += 1;
        }
        Some((&e.source, e.seq, n))
    })
}

/// The positions of one source's events not yet completed, with
/// multiplicity, in ascending order. Events are mostly tracked in ascending
/// order, one per position, and completed from the front, so the positions
/// are kept as spans of consecutive positions that share a count: a backlog
/// of a million events in order is one span, and tracking or completing
/// one is a change at an end of a deque. A span grows under the queue's
/// lock, so this also keeps a growing backlog from growing a deque there.
/// A position completed out of order splits its span, and its slot stays
/// with a count of zero until the front passes it (or a compaction drops
/// it).
#[derive(Default)]
struct Positions {
    /// Spans in ascending order, not overlapping; the front's count is
    /// above zero.
    spans: VecDeque<Span>,
    /// Spans with a count of zero.
    zeros: usize,
}

/// `len` consecutive positions from `first`, each pending `count` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    first: u64,
    len: u64,
    count: u32,
}

impl Span {
    fn end(&self) -> u64 {
        self.first + self.len
    }

    fn contains(&self, seq: u64) -> bool {
        self.first <= seq && seq < self.end()
    }
}

impl Positions {
    fn add(&mut self, seq: u64) {
        if self.add_back_run(seq, 1) {
            return;
        }
        // A repeat or out of order (rare): find its place.
        let i = self.spans.partition_point(|s| s.end() <= seq);
        match self.spans.get(i) {
            Some(s) if s.contains(seq) => self.change(i, seq, 1),
            _ => self.spans.insert(
                i,
                Span {
                    first: seq,
                    len: 1,
                    count: 1,
                },
            ),
        }
    }

    fn remove(&mut self, seq: u64) {
        // The usual completion: the front moves on by one.
        if self.remove_front_run(seq, 1) {
            return;
        }
        // Elsewhere, or a position pending more than once. The front span
        // keeps a count above zero: at its first position the count was at
        // least two, and past it the span's start stays as it was.
        let i = self.spans.partition_point(|s| s.end() <= seq);
        if self
            .spans
            .get(i)
            .is_some_and(|s| s.contains(seq) && s.count > 0)
        {
            self.change(i, seq, -1);
            if self.zeros > 64 && self.zeros * 2 > self.spans.len() {
                // Keep completed slots from piling up behind a front that
                // does not move (a quarantined plugin folding a flood into
                // its queue).
                self.spans.retain(|s| s.count > 0);
                self.zeros = 0;
            }
        }
    }

    /// Add `n` consecutive positions from `first` at once if they all come
    /// after every pending one; false (nothing done) otherwise.
    fn add_back_run(&mut self, first: u64, n: u64) -> bool {
        match self.spans.back_mut() {
            Some(last) if last.count == 1 && last.end() == first => last.len += n,
            Some(last) if last.end() <= first => self.spans.push_back(Span {
                first,
                len: n,
                count: 1,
            }),
            None => self.spans.push_back(Span {
                first,
                len: n,
                count: 1,
            }),
            Some(_) => return false,
        }
        true
    }

    /// Remove `n` consecutive positions from `first` at once if they are
    /// the front of the front span, each pending once; false (nothing
    /// done) otherwise.
    fn remove_front_run(&mut self, first: u64, n: u64) -> bool {
        let Some(front) = self.spans.front_mut() else {
            return false;
        };
        if front.first != first || front.count != 1 || front.len < n {
            return false;
        }
        front.first += n;
        front.len -= n;
        if front.len == 0 {
            self.spans.pop_front();
            self.drop_front_zeros();
        }
        true
    }

    /// Change the count of `seq`, in span `i`, by `by`: the span splits
    /// around it unless it is one position.
    fn change(&mut self, i: usize, seq: u64, by: i32) {
        let s = self.spans[i];
        let count = s.count.saturating_add_signed(by);
        if s.count == 0 {
            self.zeros -= 1;
        }
        if count == 0 {
            self.zeros += 1;
        }
        let before = Span {
            len: seq - s.first,
            ..s
        };
        let at = Span {
            first: seq,
            len: 1,
            count,
        };
        let after = Span {
            first: seq + 1,
            len: s.end() - seq - 1,
            ..s
        };
        // A zero-count span split in three leaves two of them.
        if s.count == 0 {
            self.zeros += usize::from(before.len > 0) + usize::from(after.len > 0);
        }
        self.spans[i] = at;
        if after.len > 0 {
            self.spans.insert(i + 1, after);
        }
        if before.len > 0 {
            self.spans.insert(i, before);
        }
    }

    /// Pop zero-count spans off the front, so the front counts.
    fn drop_front_zeros(&mut self) {
        while self.spans.front().is_some_and(|s| s.count == 0) {
            self.spans.pop_front();
            self.zeros -= 1;
        }
    }

    /// The lowest position not completed.
    fn lowest(&self) -> Option<u64> {
        self.spans.front().map(|s| s.first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    0 if r.is_multiple_of(5) => {
                        // A run after the top, as a delivery tracks it.
                        let first = top + 1 + (r >> 8) % 2;
                        let n = 1 + (r >> 12) % 8;
                        assert!(p.add_back_run(first, n));
                        for seq in first..first + n {
                            *model.entry(seq).or_default() += 1;
                        }
                        top = first + n - 1;
                    }
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
                    5 if r.is_multiple_of(7) => {
                        // A run from the front, as a round completes it.
                        if let Some(&first) = model.keys().next() {
                            let n = 1 + (r >> 8) % 8;
                            if !p.remove_front_run(first, n) {
                                (first..first + n).for_each(|seq| p.remove(seq));
                            }
                            for seq in first..first + n {
                                if let Some(c) = model.get_mut(&seq) {
                                    *c -= 1;
                                    if *c == 0 {
                                        model.remove(&seq);
                                    }
                                }
                            }
                        }
                    }
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
                let mut counts = std::collections::BTreeMap::new();
                let mut last_end = 0;
                for span in &p.spans {
                    assert!(span.len > 0 && span.first >= last_end, "{:?}", p.spans);
                    last_end = span.end();
                    for seq in span.first..span.end() {
                        if span.count > 0 {
                            counts.insert(seq, span.count);
                        }
                    }
                }
                assert_eq!(counts, model, "round {round}, step {step}");
                let zeros = p.spans.iter().filter(|s| s.count == 0).count();
                assert_eq!(p.zeros, zeros, "round {round}, step {step}");
            }
        }
    }
}
