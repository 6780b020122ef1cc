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
        if seq == 0 {
            return;
        }
        let positions = match self.pending.get_mut(source) {
            Some(p) => p,
            None => self.pending.entry(source.clone()).or_default(),
        };
        positions.add(seq);
    }

    /// The event at `seq` of `source` was completed.
    #[inline]
    pub(super) fn untrack(&mut self, source: &Arc<str>, seq: u64) {
        if seq == 0 {
            return;
        }
        if let Some(p) = self.pending.get_mut(source) {
            p.remove(seq);
        }
    }

    /// Complete several events: one look-up per run of the same source.
    #[inline]
    pub(super) fn untrack_all(&mut self, events: &[Event]) {
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
}
