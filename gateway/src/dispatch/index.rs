//! The key index of each source: every key's current value (deletes kept
//! as tombstones until every plugin has handled them) and the source's
//! position counter, mirrored into the [`Store`].
//!
//! Owns the arithmetic of positions (a revision plus an offset for a source
//! with history, a delivery counter otherwise), the diff that turns a
//! relist into changes, and what a plugin that starts or resumes late is
//! given from the index. The store's writer takes the changed entries from
//! here ([`IndexProbe`]). This module must not queue events or call
//! plugins: [`route`](super::route) does that with what it returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::Dispatcher;
use super::route::PluginSpec;
use crate::event::{Event, EventKind};
use crate::host::snapshot::{ScanRequest, Scanned};
use crate::store::{IndexChanges, IndexProbe, KeyEntry, SourceMeta, Store};

/// How often (in batches) a source prunes tombstones every plugin handled.
const PRUNE_EVERY: u64 = 64;

/// A set hashed with foldhash: keys are hashed on every delivery, and
/// this set needs no defence against chosen collisions (the keys come
/// from the operator's store), so SipHash's cost buys nothing.
type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Delivery bookkeeping of one source: the key index (with tombstones) and
/// the position counter, mirrored into the store.
pub(super) struct SourceKeys {
    pub(super) map: BTreeMap<Arc<str>, KeyEntry>,
    pub(super) meta: SourceMeta,
    /// Positions are the store's revisions (etcd), so a resumed watch can
    /// replay them; otherwise positions count deliveries.
    pub(super) revisioned: bool,
    /// Something was delivered in this process.
    pub(super) live: bool,
    /// The identity to record with the next snapshot (a changed prefix).
    pub(super) pending_identity: Option<String>,
    tombstones: usize,
    batches: u64,
    /// Keys changed since the store last took them.
    dirty: FastSet<Arc<str>>,
    meta_dirty: bool,
}

/// The current keys of one source, in key order.
pub(super) struct SourceCache {
    pub(super) name: Arc<str>,
    pub(super) keys: Mutex<SourceKeys>,
    /// The highest position whose index change is committed. Events of a
    /// source without history reach a plugin only once their change is
    /// durable: after a crash the relist diffs against the stored index,
    /// and a change the plugin saw but the index lost could never be
    /// undone (a delete would never come).
    pub(super) committed: Arc<AtomicU64>,
    /// A wake-up for the writer is on its way.
    wake_sent: AtomicBool,
}

impl SourceCache {
    /// The index of `name` as the store kept it.
    pub(super) fn load(store: &Store, name: &str, revisioned: bool) -> SourceCache {
        let map = store.load_keys(name);
        let meta = store.source_meta(name);
        SourceCache {
            name: Arc::from(name),
            committed: Arc::new(AtomicU64::new(meta.last_seq)),
            wake_sent: AtomicBool::new(false),
            keys: Mutex::new(SourceKeys::new(map, meta, revisioned)),
        }
    }

    /// Ask the store to commit soon.
    pub(super) fn wake(&self, store: &Store) {
        if !self.wake_sent.swap(true, Ordering::SeqCst) {
            store.wake();
        }
    }
}

impl IndexProbe for SourceCache {
    fn source(&self) -> Arc<str> {
        self.name.clone()
    }

    fn take_changes(&self) -> Option<IndexChanges> {
        self.wake_sent.store(false, Ordering::SeqCst);
        let mut keys = self.keys.lock();
        if keys.dirty.is_empty() && !keys.meta_dirty {
            return None;
        }
        keys.meta_dirty = false;
        let dirty = std::mem::take(&mut keys.dirty);
        let changes = dirty
            .into_iter()
            .map(|k| {
                let e = keys.map.get(&k).cloned();
                (k, e)
            })
            .collect();
        Some((changes, keys.meta.clone()))
    }

    fn written(&self, last_seq: u64) {
        self.committed.fetch_max(last_seq, Ordering::SeqCst);
    }

    fn unwritten(&self, again: Vec<Arc<str>>) {
        let mut keys = self.keys.lock();
        keys.dirty.extend(again);
        keys.meta_dirty = true;
    }
}

impl SourceKeys {
    fn new(map: BTreeMap<Arc<str>, KeyEntry>, meta: SourceMeta, revisioned: bool) -> SourceKeys {
        let tombstones = map.values().filter(|e| e.value.is_none()).count();
        SourceKeys {
            map,
            meta,
            revisioned,
            live: false,
            pending_identity: None,
            tombstones,
            batches: 0,
            dirty: FastSet::default(),
            meta_dirty: false,
        }
    }

    /// Give each event of one delivery its position; returns the highest.
    pub(super) fn assign(&mut self, events: &mut [Event]) -> u64 {
        if self.revisioned {
            for e in events.iter_mut() {
                e.seq = e.revision + self.meta.offset;
            }
            let hi = events.iter().map(|e| e.seq).max().unwrap_or(0);
            self.meta.last_seq = self.meta.last_seq.max(hi);
            hi
        } else {
            self.meta.last_seq += 1;
            for e in events.iter_mut() {
                e.seq = self.meta.last_seq;
            }
            self.meta.last_seq
        }
    }

    /// The position of a snapshot taken at the source's `revision`: always
    /// a new one. A source whose revisions went back (a replaced cluster)
    /// gets a larger offset, so positions never repeat.
    pub(super) fn snapshot_position(&mut self, revision: u64) -> u64 {
        let upto = if self.revisioned {
            let p = revision + self.meta.offset;
            if p <= self.meta.last_seq {
                self.meta.offset = self.meta.last_seq + 1 - revision;
                self.meta.last_seq + 1
            } else {
                p
            }
        } else {
            self.meta.last_seq + 1
        };
        self.meta.last_seq = upto;
        upto
    }

    /// The changes a relist of `scope` at `revision` means against the
    /// index, all at position `upto`: puts whose value is new or differs
    /// (with the previous value), and deletes for indexed keys the relist
    /// no longer has. Changes are flagged `resync` unless the index knew
    /// nothing of the scope (a first sync, not a resync).
    pub(super) fn diff(
        &self,
        name: &Arc<str>,
        scope: &dyn Fn(&str) -> bool,
        revision: u64,
        upto: u64,
        events: Vec<Event>,
    ) -> (Vec<Event>, bool) {
        let had_scope = self.map.keys().any(|k| scope(k));
        let fresh: std::collections::HashSet<Arc<str>> =
            events.iter().map(|e| e.key.clone()).collect();
        // In place: a large listing is not held twice.
        let mut changes = events;
        changes.retain_mut(|e| {
            let old = self.map.get(&e.key).and_then(|c| c.value.clone());
            if old.is_some() && old == e.value {
                return false;
            }
            e.prev_value = old;
            e.resync = had_scope;
            e.seq = upto;
            true
        });
        for (k, c) in &self.map {
            if c.value.is_some() && scope(k) && !fresh.contains(k) {
                let mut e = Event::delete(name, k.clone(), revision).with_prev(c.value.clone());
                e.resync = true;
                e.seq = upto;
                changes.push(e);
            }
        }
        (changes, had_scope)
    }

    /// Record `events` in the index (the store takes them from there). Each
    /// event's key becomes the index's own copy of it, so queueing copies
    /// no key and no thread frees a key another thread allocated (a
    /// cross-thread free takes the allocator's arena lock). An event of a
    /// source with history that comes without its previous value (a store
    /// whose changes do not carry it) gets the indexed value, when the index
    /// holds the key at an earlier revision: that is the value it replaces.
    pub(super) fn apply(&mut self, events: &mut [Event]) {
        for e in events {
            let entry = KeyEntry {
                value: if e.kind == EventKind::Put {
                    e.value.clone()
                } else {
                    None
                },
                revision: e.revision,
                seq: e.seq,
                metadata: if e.kind == EventKind::Put {
                    e.metadata.to_vec()
                } else {
                    Vec::new()
                },
            };
            let is_tombstone = entry.value.is_none();
            let was_tombstone = match self.map.entry(e.key.clone()) {
                std::collections::btree_map::Entry::Occupied(mut slot) => {
                    e.key = slot.key().clone();
                    // A source with history that does not know the previous
                    // value (etcd once it is compacted, NATS KV always)
                    // gets the one delivered before; a replay of what the
                    // index already holds learns nothing.
                    if self.revisioned && e.prev_value.is_none() && slot.get().revision < e.revision
                    {
                        e.prev_value = slot.get().value.clone();
                    }
                    Some(slot.insert(entry).value.is_none())
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(entry);
                    None
                }
            };
            match (was_tombstone, is_tombstone) {
                (Some(false) | None, true) => self.tombstones += 1,
                (Some(true), false) => self.tombstones -= 1,
                _ => {}
            }
            if !self.dirty.contains(&*e.key) {
                self.dirty.insert(e.key.clone());
            }
        }
        self.meta_dirty = true;
        self.live = true;
    }

    /// Positions of this index mean nothing any more (its source was
    /// removed): the next start relists rather than resumes.
    pub(super) fn forget_identity(&mut self) {
        self.meta.identity = String::new();
        self.pending_identity = None;
        self.meta_dirty = true;
    }

    /// The index entries `spec` has not been given: in `scope`, changed
    /// after `from` and before `upto`, as resync events at `upto`.
    pub(super) fn missed(
        &self,
        name: &Arc<str>,
        spec: &PluginSpec,
        scope: &dyn Fn(&str) -> bool,
        from: u64,
        upto: u64,
    ) -> Vec<Event> {
        self.map
            .iter()
            .filter(|(k, e)| e.seq > from && e.seq < upto && scope(k) && spec.matches(name, k))
            .map(|(k, e)| {
                let mut ev = match &e.value {
                    Some(v) => {
                        let mut ev = Event::put(name, k.clone(), v.clone(), e.revision);
                        ev.metadata = e.metadata.as_slice().into();
                        ev
                    }
                    None => Event::delete(name, k.clone(), e.revision),
                };
                ev.resync = true;
                ev.seq = e.seq;
                ev
            })
            .collect()
    }

    /// The live keys matching `spec`, as puts at their own positions.
    pub(super) fn current(&self, name: &Arc<str>, spec: &PluginSpec, resync: bool) -> Vec<Event> {
        self.map
            .iter()
            .filter(|(k, _)| spec.matches(name, k))
            .filter_map(|(k, e)| {
                let v = e.value.as_ref()?;
                let mut ev = Event::put(name, k.clone(), v.clone(), e.revision);
                ev.metadata = e.metadata.as_slice().into();
                ev.resync = resync;
                ev.seq = e.seq;
                Some(ev)
            })
            .collect()
    }

    /// Whether this delivery is one on which tombstones should be pruned:
    /// every [`PRUNE_EVERY`] batches, when there are any.
    fn prune_due(&mut self) -> bool {
        self.batches += 1;
        self.tombstones > 0 && self.batches.is_multiple_of(PRUNE_EVERY)
    }

    /// Drop the tombstones at or below `floor` (every plugin handled them).
    fn prune(&mut self, floor: u64) {
        let gone: Vec<Arc<str>> = self
            .map
            .iter()
            .filter(|(_, e)| e.value.is_none() && e.seq <= floor)
            .map(|(k, _)| k.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        for k in gone {
            self.map.remove(&k);
            self.tombstones -= 1;
            self.dirty.insert(k);
        }
        self.meta.floor = self.meta.floor.max(floor);
        self.meta_dirty = true;
    }
}

impl Dispatcher {
    /// Drop tombstones every subscribed plugin has handled, now and then.
    pub(super) fn maybe_prune(&self, name: &Arc<str>, keys: &mut SourceKeys) {
        if !keys.prune_due() {
            return;
        }
        // The floor is kept with the index, and a plugin whose stored
        // cursor is below it is resent the current keys after a restart.
        // The stored cursor trails the live one by up to a commit, so the
        // floor takes the lower of the two: a crash right after this prune
        // must not leave a cursor below the floor it committed.
        let live: Vec<(String, u64)> = self
            .workers
            .iter()
            .filter(|w| w.takes_from(name))
            .filter_map(|w| Some((w.name.clone(), w.cursor(name)?)))
            .collect();
        let plugins: Vec<&str> = live.iter().map(|(p, _)| p.as_str()).collect();
        let stored = self.store.cursors_in(name, &plugins);
        let floor = live
            .iter()
            .zip(stored)
            .map(|((_, live), stored)| stored.map_or(*live, |s| s.min(*live)))
            .min()
            .unwrap_or(keys.meta.last_seq);
        keys.prune(floor);
    }

    /// The index of `source`, created (without history) for a source no
    /// config named.
    pub(super) fn cache(&self, source: &str) -> Arc<SourceCache> {
        if let Some(c) = self.caches.get(source) {
            return c.clone();
        }
        self.add_source(source, false);
        self.caches
            .get(source)
            .map(|c| c.clone())
            .expect("just added")
    }

    /// Start routing a source added by a reload.
    pub fn add_source(&self, name: &str, revisioned: bool) {
        self.caches.entry(name.to_owned()).or_insert_with(|| {
            let cache = Arc::new(SourceCache::load(&self.store, name, revisioned));
            self.store.register_index(cache.clone());
            if !revisioned {
                self.durable
                    .insert(name.to_owned(), cache.committed.clone());
            }
            cache
        });
    }

    /// A source removed by a reload: its subscribed plugins get a delete
    /// (flagged `resync`, at `revision`, the last one it delivered) for
    /// every key it held, as if it had relisted empty. A plugin's view is
    /// the keys of the sources it subscribes to; a source that is gone has
    /// none, and a consumer left holding them would act on keys no store
    /// backs any more.
    ///
    /// The emptied index stays registered, so those deletes are committed
    /// and delivered like any relist's, and a source added again under the
    /// same name starts from a full snapshot: its positions are wiped too,
    /// so an etcd watch cannot resume past keys the index no longer holds.
    pub fn retire_source(&self, name: &str, revision: u64) {
        if !self.caches.contains_key(name) {
            return;
        }
        crate::event::EventSink::deliver_snapshot(self, name, &|_| true, revision, Vec::new());
        if let Some(cache) = self.caches.get(name) {
            cache.keys.lock().forget_identity();
            cache.wake(&self.store);
        }
    }

    /// The highest position `source` reached, in this run or an earlier one.
    pub fn last_position(&self, source: &str) -> u64 {
        self.caches
            .get(source)
            .map_or(0, |c| c.keys.lock().meta.last_seq)
    }
}

impl crate::host::snapshot::SnapshotReader for Dispatcher {
    fn value(&self, source: &str, key: &str) -> Option<Option<Bytes>> {
        let cache = self.caches.get(source)?.clone();
        let keys = cache.keys.lock();
        Some(keys.map.get(key).and_then(|e| e.value.clone()))
    }

    fn scan(&self, scan: &ScanRequest<'_>) -> Option<Scanned> {
        let cache = self.caches.get(scan.source)?.clone();
        let keys = cache.keys.lock();
        // From the prefix on, in key order: the scan reads only its range.
        let present = keys
            .map
            .range::<str, _>((
                std::ops::Bound::Included(scan.prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(scan.prefix))
            .filter(|(k, _)| (scan.keep)(k))
            .filter_map(|(k, e)| Some((&**k, e.value.as_ref()?)));
        Some(Scanned::collect(present, scan.bounds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SourceKeys {
        SourceKeys::new(BTreeMap::new(), SourceMeta::default(), true)
    }

    #[test]
    fn applied_events_share_the_index_key_and_count_tombstones() {
        let src: Arc<str> = Arc::from("s");
        let mut k = keys();
        let mut first = vec![Event::put(&src, "a", Bytes::from_static(b"1"), 1)];
        k.apply(&mut first);
        // Later events bring their own copies of the key, as a source
        // decodes them; each leaves with the index's copy.
        let mut later = vec![
            Event::put(&src, String::from("a"), Bytes::from_static(b"2"), 2),
            Event::delete(&src, String::from("a"), 3),
            Event::put(&src, String::from("b"), Bytes::from_static(b"3"), 4),
        ];
        k.apply(&mut later);
        let (a, entry) = k.map.get_key_value("a").unwrap();
        assert!(Arc::ptr_eq(a, &first[0].key));
        assert!(later[..2].iter().all(|e| Arc::ptr_eq(a, &e.key)));
        assert_eq!(entry.value, None);
        assert_eq!(entry.revision, 3);
        let (b, _) = k.map.get_key_value("b").unwrap();
        assert!(Arc::ptr_eq(b, &later[2].key));
        assert_eq!(k.tombstones, 1);
        let mut dirty: Vec<&str> = k.dirty.iter().map(|d| &**d).collect();
        dirty.sort_unstable();
        assert_eq!(dirty, ["a", "b"]);
        // Put back, the tombstone is gone.
        k.apply(&mut [Event::put(&src, "a", Bytes::from_static(b"4"), 5)]);
        assert_eq!(k.tombstones, 0);
    }

    #[test]
    fn a_change_without_its_previous_value_gets_the_indexed_one() {
        let src: Arc<str> = Arc::from("s");
        let mut k = keys();
        k.apply(&mut [Event::put(&src, "a", Bytes::from_static(b"1"), 1)]);
        let mut later = vec![
            Event::put(&src, "a", Bytes::from_static(b"2"), 2),
            Event::delete(&src, "a", 3),
            Event::put(&src, "a", Bytes::from_static(b"4"), 4),
            // A replay of what the index already holds learns nothing.
            Event::put(&src, "a", Bytes::from_static(b"2"), 2),
            // A previous value the store sent is kept.
            Event::put(&src, "a", Bytes::from_static(b"5"), 5)
                .with_prev(Some(Bytes::from_static(b"store"))),
        ];
        k.apply(&mut later);
        let prev: Vec<Option<&[u8]>> = later.iter().map(|e| e.prev_value.as_deref()).collect();
        assert_eq!(
            prev,
            [
                Some(&b"1"[..]),
                Some(&b"2"[..]),
                None,
                None,
                Some(&b"store"[..])
            ]
        );
    }

    #[test]
    fn a_relist_becomes_changed_puts_and_deletes_of_vanished_keys() {
        let src: Arc<str> = Arc::from("s");
        let mut k = keys();
        k.apply(&mut [
            Event::put(&src, "a", Bytes::from_static(b"1"), 1),
            Event::put(&src, "b", Bytes::from_static(b"2"), 2),
            Event::put(&src, "c", Bytes::from_static(b"3"), 3),
        ]);
        let relist = vec![
            Event::put(&src, "a", Bytes::from_static(b"1"), 9),
            Event::put(&src, "b", Bytes::from_static(b"changed"), 9),
        ];
        let (changes, had_scope) = k.diff(&src, &|_| true, 9, 10, relist);
        assert!(had_scope);
        let seen: Vec<(&str, EventKind, bool)> = changes
            .iter()
            .map(|e| (&*e.key, e.kind, e.resync))
            .collect();
        assert_eq!(
            seen,
            [("b", EventKind::Put, true), ("c", EventKind::Delete, true)]
        );
        assert_eq!(changes[0].prev_value.as_deref(), Some(&b"2"[..]));
        assert_eq!(changes[1].prev_value.as_deref(), Some(&b"3"[..]));
        assert!(changes.iter().all(|e| e.seq == 10));
    }

    #[test]
    fn pruning_drops_only_tombstones_every_plugin_handled() {
        let src: Arc<str> = Arc::from("s");
        let mut k = keys();
        k.apply(&mut [
            Event::delete(&src, "old", 1),
            Event::delete(&src, "new", 5),
            Event::put(&src, "live", Bytes::from_static(b"1"), 2),
        ]);
        for e in k.map.values_mut() {
            e.seq = e.revision;
        }
        k.prune(3);
        assert!(!k.map.contains_key("old"));
        assert!(k.map.contains_key("new"));
        assert!(k.map.contains_key("live"));
        assert_eq!(k.tombstones, 1);
        assert_eq!(k.meta.floor, 3);
    }
}
