//! Plugin `state` writes waiting for the writer, kept per plugin.
//!
//! Owns the bound on what one plugin may have waiting (writes and bytes),
//! the folding of repeated writes of one key (the latest value wins, so a
//! loop on one key costs one write per commit), and the wait of a `set`
//! that finds its plugin's share full: it waits for the writer to commit,
//! until the time it is given, then fails. The writer takes everything
//! waiting with each commit; since no plugin can have more than its bound
//! waiting, one plugin's writes add at most that much to a commit, and
//! never hold back another plugin's writes, cursors or key changes.
//!
//! It must not touch the database (the writer does) or decide how long a
//! caller may wait (the caller's deadline does).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Most writes (distinct keys) of one plugin waiting for the writer.
pub const MAX_PENDING_WRITES: usize = 1_024;
/// Most bytes (keys plus values) of one plugin's writes waiting for the
/// writer. A single larger write is taken when nothing else of the plugin
/// waits; the state quota bounds it.
pub const MAX_PENDING_BYTES: usize = 1 << 20;

/// One key's latest write: its value, or `None` to remove it.
pub(super) type Write = (String, Option<Vec<u8>>);

/// What one plugin has waiting.
#[derive(Debug, Default)]
struct Waiting {
    writes: HashMap<String, Option<Vec<u8>>>,
    bytes: usize,
}

fn size(key: &str, value: Option<&[u8]>) -> usize {
    key.len() + value.map_or(0, <[u8]>::len)
}

impl Waiting {
    /// Whether `key = value` fits beside what waits.
    fn fits(&self, key: &str, value: Option<&[u8]>) -> bool {
        let old = self.writes.get(key);
        let others = self.writes.len() - usize::from(old.is_some());
        if others == 0 {
            return true;
        }
        let old_bytes = old.map_or(0, |v| size(key, v.as_deref()));
        others < MAX_PENDING_WRITES
            && self.bytes - old_bytes + size(key, value) <= MAX_PENDING_BYTES
    }

    fn put(&mut self, key: String, value: Option<Vec<u8>>) {
        self.bytes += size(&key, value.as_deref());
        if let Some(old) = self.writes.insert(key.clone(), value) {
            self.bytes -= size(&key, old.as_deref());
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    plugins: HashMap<String, Waiting>,
    /// A wake-up for the writer is on its way.
    wake_sent: bool,
    /// The writer has stopped: later writes are ignored.
    closed: bool,
}

/// Every plugin's writes waiting for the writer.
#[derive(Debug, Default)]
pub(super) struct Pending {
    inner: Mutex<Inner>,
    /// Signalled after each commit (and on close).
    committed: Condvar,
}

/// A `set` that found its plugin's share full until its time ran out.
#[derive(Debug, thiserror::Error)]
#[error(
    "state write refused: {writes} writes ({bytes} bytes) of this plugin are still waiting for the state store, \
     at most {MAX_PENDING_WRITES} writes and {MAX_PENDING_BYTES} bytes may wait; waited {waited:?}, \
     which is as long as the call's deadline allows"
)]
pub struct StateBusy {
    /// Writes of the plugin waiting.
    pub writes: usize,
    /// Their bytes.
    pub bytes: usize,
    /// How long the `set` waited.
    pub waited: Duration,
}

/// How an accepted write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// It had to wait for the writer to commit earlier writes.
    pub waited: bool,
    /// The writer must be woken (nothing else woke it yet).
    pub(super) wake: bool,
}

impl Pending {
    /// Queue `key = value` for `plugin`, waiting until `until` for room.
    /// After [`Pending::close`] the write is ignored.
    pub(super) fn put(
        &self,
        plugin: &str,
        key: &str,
        value: Option<&[u8]>,
        until: Instant,
    ) -> Result<Queued, StateBusy> {
        let start = Instant::now();
        let mut waited = false;
        let mut inner = self.inner.lock();
        loop {
            if inner.closed {
                return Ok(Queued {
                    waited,
                    wake: false,
                });
            }
            let fits = inner.plugins.get(plugin).is_none_or(|w| w.fits(key, value));
            if fits {
                let waiting = match inner.plugins.get_mut(plugin) {
                    Some(w) => w,
                    None => inner.plugins.entry(plugin.to_owned()).or_default(),
                };
                waiting.put(key.to_owned(), value.map(<[u8]>::to_vec));
                let wake = !std::mem::replace(&mut inner.wake_sent, true);
                return Ok(Queued { waited, wake });
            }
            if Instant::now() >= until {
                let w = &inner.plugins[plugin];
                return Err(StateBusy {
                    writes: w.writes.len(),
                    bytes: w.bytes,
                    waited: start.elapsed(),
                });
            }
            waited = true;
            self.committed.wait_until(&mut inner, until);
        }
    }

    /// Take everything waiting, by plugin (the writer, for one commit).
    pub(super) fn take(&self) -> Vec<(String, Vec<Write>)> {
        let mut inner = self.inner.lock();
        inner.wake_sent = false;
        inner
            .plugins
            .drain()
            .map(|(plugin, w)| (plugin, w.writes.into_iter().collect()))
            .collect()
    }

    /// What was taken is committed: let waiting writes in.
    pub(super) fn committed(&self) {
        self.committed.notify_all();
    }

    /// What was taken could not be committed: keep it waiting, except
    /// where a newer write of the same key came meanwhile.
    pub(super) fn unwritten(&self, taken: Vec<(String, Vec<Write>)>) {
        let mut inner = self.inner.lock();
        for (plugin, writes) in taken {
            let waiting = inner.plugins.entry(plugin).or_default();
            for (key, value) in writes {
                if !waiting.writes.contains_key(&key) {
                    waiting.put(key, value);
                }
            }
        }
        drop(inner);
        self.committed.notify_all();
    }

    /// Writes and bytes `plugin` has waiting.
    #[cfg(test)]
    pub(super) fn waiting(&self, plugin: &str) -> (usize, usize) {
        let inner = self.inner.lock();
        inner
            .plugins
            .get(plugin)
            .map_or((0, 0), |w| (w.writes.len(), w.bytes))
    }

    /// The writer is stopping: ignore later writes, and let waiting ones
    /// return.
    pub(super) fn close(&self) {
        self.inner.lock().closed = true;
        self.committed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn writes_of_one_key_fold_into_the_latest() {
        let p = Pending::default();
        let first = p.put("p", "k", Some(&[1; 100]), soon()).unwrap();
        assert!(first.wake && !first.waited);
        for i in 0..10_000u32 {
            let q = p.put("p", "k", Some(&i.to_le_bytes()), soon()).unwrap();
            assert!(!q.wake && !q.waited);
        }
        p.put("p", "gone", None, soon()).unwrap();
        let mut taken = p.take();
        assert_eq!(taken.len(), 1);
        let (plugin, mut writes) = taken.pop().unwrap();
        writes.sort();
        assert_eq!(plugin, "p");
        assert_eq!(
            writes,
            [
                ("gone".to_owned(), None),
                ("k".to_owned(), Some(9_999u32.to_le_bytes().to_vec()))
            ]
        );
        // Taken: the next write wakes the writer again.
        assert!(p.put("p", "k", None, soon()).unwrap().wake);
    }

    #[test]
    fn a_full_plugin_waits_for_a_commit_or_is_refused_at_its_deadline() {
        let p = Arc::new(Pending::default());
        let value = vec![0; 2000];
        let mut n = 0;
        while p
            .put("p", &format!("k{n}"), Some(&value), Instant::now())
            .is_ok()
        {
            n += 1;
        }
        // The byte bound filled: about 1 MiB of writes of about 2000 bytes.
        assert!(
            (MAX_PENDING_BYTES / 2010..=MAX_PENDING_BYTES / 2000).contains(&n),
            "{n} writes waiting"
        );
        // Another plugin is not held back by this one.
        let other = p.put("q", "k", Some(&value), Instant::now()).unwrap();
        assert!(!other.waited);
        // Refused once its time is up, saying what waits and the bounds.
        let started = Instant::now();
        let e = p
            .put(
                "p",
                "more",
                Some(&value),
                started + Duration::from_millis(50),
            )
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(e.writes, n);
        let message = e.to_string();
        assert!(
            message.contains(&format!("{n} writes"))
                && message.contains(&format!(
                    "at most {MAX_PENDING_WRITES} writes and {MAX_PENDING_BYTES} bytes"
                )),
            "{message}"
        );
        // Rewriting a waiting key with a value of the same size still fits.
        assert!(
            !p.put("p", "k0", Some(&value), Instant::now())
                .unwrap()
                .waited
        );
        // A commit lets a waiting write in.
        let writer = {
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let taken = p.take();
                p.committed();
                taken
            })
        };
        let q = p.put("p", "more", Some(&value), soon()).unwrap();
        assert!(q.waited);
        let taken = writer.join().unwrap();
        let mine: Vec<_> = taken.iter().filter(|(plugin, _)| plugin == "p").collect();
        assert_eq!(mine[0].1.len(), n);
    }

    #[test]
    fn the_write_count_is_bounded_too_and_one_large_write_fits_alone() {
        let p = Pending::default();
        for i in 0..MAX_PENDING_WRITES {
            p.put("p", &format!("{i}"), None, Instant::now()).unwrap();
        }
        assert!(p.put("p", "one more", None, Instant::now()).is_err());
        p.take();
        let big = vec![0; 4 * MAX_PENDING_BYTES];
        p.put("p", "big", Some(&big), Instant::now()).unwrap();
        assert!(p.put("p", "small", Some(&[0]), Instant::now()).is_err());
        p.put("p", "big", Some(&big), Instant::now()).unwrap();
    }

    #[test]
    fn unwritten_writes_wait_again_unless_overwritten() {
        let p = Pending::default();
        p.put("p", "a", Some(b"1"), soon()).unwrap();
        p.put("p", "b", Some(b"1"), soon()).unwrap();
        let taken = p.take();
        p.put("p", "b", Some(b"2"), soon()).unwrap();
        p.unwritten(taken);
        let mut writes = p.take().pop().unwrap().1;
        writes.sort();
        assert_eq!(
            writes,
            [
                ("a".to_owned(), Some(b"1".to_vec())),
                ("b".to_owned(), Some(b"2".to_vec()))
            ]
        );
    }

    #[test]
    fn close_releases_waiting_writes_and_ignores_later_ones() {
        let p = Arc::new(Pending::default());
        for i in 0..MAX_PENDING_WRITES {
            p.put("p", &format!("{i}"), None, soon()).unwrap();
        }
        let closer = {
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                p.close();
            })
        };
        let started = Instant::now();
        p.put("p", "late", None, soon()).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        closer.join().unwrap();
        assert_eq!(p.take()[0].1.len(), MAX_PENDING_WRITES);
    }
}
