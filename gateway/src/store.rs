//! The state directory: what must survive a restart or a crash.
//!
//! One embedded transactional store (redb, `DIR/state.redb`) holds, per
//! plugin and source, the cursor (the last position whose events that plugin
//! fully handled or dead-lettered); per source, the key index (key →
//! revision, position and value, with tombstones for deletes some plugin has
//! not handled yet) that restarts diff against; each plugin's `state`; and
//! the dead letters. Writes go through one writer thread that commits in
//! small batches: key-index changes in the order the dispatcher made them,
//! and, in the same transaction, the cursors the running plugins report and
//! the plugins' `state` writes.
//!
//! This module is the store's face: opening and resetting it, reading it,
//! and queueing writes. The file layout lives in `schema`, the writer thread
//! in `writer`, the dead letters' caps and pages in `letters`, the bounded
//! per-plugin queue of `state` writes in `pending`. It must not decide what
//! a cursor means (the dispatcher does).

mod letters;
mod pending;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use redb::{Database, Key, ReadableDatabase, TableDefinition, Value};

use letters::LetterIndex;
pub use letters::{AddedLetter, DeadLetterCap, LetterPage, LetterTally};
use pending::Pending;
pub use pending::{MAX_PENDING_BYTES, MAX_PENDING_WRITES, Queued, StateBusy};
use schema::{CURSORS, KEYS, META, PLUGIN_STATE, SCHEMA, SOURCES, decode, init_tables};
pub use schema::{DeadLetter, KeyEntry, SourceMeta};
use writer::{Indexes, Op, Probes};

/// The store's file name inside the state directory.
pub const FILE_NAME: &str = "state.redb";

/// A problem with the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process (a running gateway) holds the store.
    #[error(
        "the state store {path} is in use by another process (is a gateway running with this state directory?)"
    )]
    InUse {
        /// The store file.
        path: PathBuf,
    },
    /// The file is not a readable store.
    #[error(
        "the state store {path} is unreadable: {message}. Nothing was changed; `watchgate state reset` moves it aside and starts empty (cursors, plugin state and dead letters are forgotten)"
    )]
    Unreadable {
        /// The store file.
        path: PathBuf,
        /// What redb reported.
        message: String,
    },
}

/// Something that knows a running plugin's cursors (its queue).
pub trait CursorProbe: Send + Sync {
    /// (source, cursor) for every source the plugin tracks.
    fn cursors(&self) -> Vec<(Arc<str>, u64)>;
}

/// Keys changed since the last write (`None`: removed) and the source's
/// bookkeeping.
pub type IndexChanges = (Vec<(Arc<str>, Option<KeyEntry>)>, SourceMeta);

/// Something holding a source's key index, which changes far more often
/// than it is written: the writer pulls what changed once per commit.
pub trait IndexProbe: Send + Sync {
    /// The source's name.
    fn source(&self) -> Arc<str>;
    /// The keys changed since the last call, with their current entries
    /// (`None`: removed from the index), and the source's bookkeeping;
    /// `None` when nothing changed.
    fn take_changes(&self) -> Option<IndexChanges>;
    /// The changes taken last were committed, up to position `last_seq`.
    fn written(&self, last_seq: u64);
    /// The changes taken last could not be written: take these keys again.
    fn unwritten(&self, keys: Vec<Arc<str>>);
}

/// The open store and its writer thread.
pub struct Store {
    db: Arc<Database>,
    path: Option<PathBuf>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    probes: Probes,
    indexes: Indexes,
    pending: Arc<Pending>,
    writer: Mutex<Option<JoinHandle<()>>>,
    next_dead_letter: AtomicU64,
    /// Each plugin's dead letters: ids and stored sizes.
    letters: Mutex<LetterIndex>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Memory the store may use to cache its file. The dispatcher keeps the
/// index it routes by in memory and reads the file only when it starts, so
/// the file's pages are written once and seldom read: redb's default (1 GiB)
/// would hold a copy of every index page beside the dispatcher's own, which
/// at a million keys doubles the gateway's size for nothing.
const CACHE_BYTES: usize = 32 << 20;

impl Store {
    /// Open (or create) the store in `dir`.
    ///
    /// # Errors
    /// [`StoreError`] when the directory cannot be created, another process
    /// holds the store, or the file is not a readable store of this layout.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| classify(&path, e))?;
        Self::start(db, Some(path))
    }

    /// A store that keeps nothing on disk (tests, `plugin test`).
    pub fn in_memory() -> Store {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory store always opens");
        Self::start(db, None).expect("an in-memory store has the current layout")
    }

    fn start(db: Database, path: Option<PathBuf>) -> Result<Store, StoreError> {
        let unreadable = |message: String| StoreError::Unreadable {
            path: path.clone().unwrap_or_default(),
            message,
        };
        init_tables(&db).map_err(|e| unreadable(e.to_string()))?;
        let schema = {
            let r = db.begin_read().map_err(|e| unreadable(e.to_string()))?;
            let t = r.open_table(META).map_err(|e| unreadable(e.to_string()))?;
            t.get("schema")
                .map_err(|e| unreadable(e.to_string()))?
                .map(|v| v.value())
        };
        if schema != Some(SCHEMA) {
            return Err(unreadable(format!(
                "layout version {schema:?}, this gateway reads version {SCHEMA}"
            )));
        }
        let (letters, next_dead_letter) =
            letters::load_index(&db).map_err(|e| unreadable(e.to_string()))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let probes: Probes = Arc::default();
        let indexes: Indexes = Arc::default();
        let pending: Arc<Pending> = Arc::default();
        let writer = writer::spawn(
            db.clone(),
            rx,
            probes.clone(),
            indexes.clone(),
            pending.clone(),
        );
        Ok(Store {
            db,
            path,
            tx: Mutex::new(Some(tx)),
            probes,
            indexes,
            pending,
            writer: Mutex::new(Some(writer)),
            next_dead_letter: AtomicU64::new(next_dead_letter),
            letters: Mutex::new(letters),
        })
    }

    /// The store file, when on disk.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Move the store in `dir` aside (to `state.redb.reset-UNIX_SECONDS`),
    /// so the next start begins empty. Returns where it went, or `None`
    /// when there was no store.
    ///
    /// # Errors
    /// When a running gateway holds the store, or the file cannot be moved.
    pub fn reset(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Ok(None);
        }
        match Database::create(&path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse { path }.into());
            }
            Ok(db) => drop(db),
            Err(_) => {} // unreadable: exactly what reset is for
        }
        let backup = dir.join(format!("{FILE_NAME}.reset-{}", now_secs()));
        std::fs::rename(&path, &backup).map_err(|e| {
            anyhow::anyhow!(
                "cannot move {} to {}: {e}",
                path.display(),
                backup.display()
            )
        })?;
        Ok(Some(backup))
    }

    fn send(&self, op: Op) {
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.send(op);
        }
    }

    /// Bookkeeping of `source`.
    pub fn source_meta(&self, source: &str) -> SourceMeta {
        self.read(|r| {
            let t = r.open_table(SOURCES)?;
            Ok(t.get(source)?
                .and_then(|v| decode(v.value()))
                .unwrap_or_default())
        })
        .unwrap_or_default()
    }

    /// The stored key index of `source`.
    pub fn load_keys(&self, source: &str) -> BTreeMap<Arc<str>, KeyEntry> {
        self.read(|r| {
            let mut out = BTreeMap::new();
            each_under(r, KEYS, source, "", |key: &str, v: &[u8]| {
                if let Some(entry) = decode::<KeyEntry>(v) {
                    out.insert(Arc::from(key), entry);
                }
            })?;
            Ok(out)
        })
        .unwrap_or_default()
    }

    /// The stored cursor of `plugin` for `source`.
    pub fn cursor(&self, plugin: &str, source: &str) -> Option<u64> {
        self.read(|r| {
            let t = r.open_table(CURSORS)?;
            Ok(t.get((plugin, source))?.map(|v| v.value()))
        })
        .ok()
        .flatten()
    }

    /// The stored cursor in `source` of each of `plugins`, in their order,
    /// read in one transaction.
    pub fn cursors_in(&self, source: &str, plugins: &[&str]) -> Vec<Option<u64>> {
        self.read(|r| {
            let t = r.open_table(CURSORS)?;
            plugins
                .iter()
                .map(|p| Ok(t.get((*p, source))?.map(|v| v.value())))
                .collect()
        })
        .unwrap_or_else(|_| vec![None; plugins.len()])
    }

    /// Every stored cursor of `plugin`, by source.
    pub fn cursors(&self, plugin: &str) -> BTreeMap<String, u64> {
        self.read(|r| {
            let mut out = BTreeMap::new();
            each_under(r, CURSORS, plugin, "", |source: &str, seq: u64| {
                out.insert(source.to_owned(), seq);
            })?;
            Ok(out)
        })
        .unwrap_or_default()
    }

    /// The stored `state` of `plugin`.
    pub fn plugin_state(&self, plugin: &str) -> Vec<(String, Vec<u8>)> {
        self.read(|r| {
            let mut out = Vec::new();
            each_under(r, PLUGIN_STATE, plugin, "", |key: &str, v: &[u8]| {
                out.push((key.to_owned(), v.to_vec()));
            })?;
            Ok(out)
        })
        .unwrap_or_default()
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, redb::Error> {
        let r = self.db.begin_read()?;
        f(&r)
    }

    /// Write `probe`'s key changes with every commit from now on (a
    /// source's index; one per source name).
    pub fn register_index(&self, probe: Arc<dyn IndexProbe>) {
        let mut v = self.indexes.lock();
        v.retain(|p| p.source() != probe.source());
        v.push(probe);
    }

    /// Ask the writer to commit soon (an index changed).
    pub fn wake(&self) {
        self.send(Op::Wake);
    }

    /// Record a cursor directly (a plugin starting at "now", or a final
    /// cursor on unload).
    pub fn set_cursor(&self, plugin: &str, source: &Arc<str>, seq: u64) {
        self.send(Op::Cursor(plugin.to_owned(), source.clone(), seq));
    }

    /// Record a plugin `state` change. A later change of the same key
    /// replaces it while it waits for the writer. When `plugin` already has
    /// [`MAX_PENDING_WRITES`] writes or [`MAX_PENDING_BYTES`] bytes waiting,
    /// wait until `until` for the writer to commit them.
    ///
    /// # Errors
    /// [`StateBusy`] when there is no room by `until`; nothing is recorded.
    pub fn set_plugin_state(
        &self,
        plugin: &str,
        key: &str,
        value: Option<&[u8]>,
        until: Instant,
    ) -> Result<Queued, StateBusy> {
        let queued = self.pending.put(plugin, key, value, until)?;
        if queued.wake {
            self.wake();
        }
        Ok(queued)
    }

    /// Report `probe`'s cursors with every commit from now on.
    pub fn register(&self, plugin: &str, probe: Arc<dyn CursorProbe>) {
        self.probes.lock().insert(plugin.to_owned(), probe);
    }

    /// Stop reporting `plugin`'s cursors, recording their final values.
    pub fn unregister(&self, plugin: &str) {
        if let Some(p) = self.probes.lock().remove(plugin) {
            for (source, seq) in p.cursors() {
                self.set_cursor(plugin, &source, seq);
            }
        }
    }

    /// Wait until everything recorded so far is committed.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Op::Flush(tx));
        let _ = rx.recv_timeout(Duration::from_secs(30));
    }

    /// Commit what is pending and stop the writer. Later writes are ignored.
    pub fn close(&self) {
        self.pending.close();
        self.tx.lock().take();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Hand `row` the rest of the key and the value of every row of `table`
/// whose key begins with `first`, in key order from `(first, from)`.
fn each_under<'a, S: Key + 'static, V: Value + 'static>(
    r: &redb::ReadTransaction,
    table: TableDefinition<(&'static str, S), V>,
    first: &'a str,
    from: S::SelfType<'a>,
    mut row: impl FnMut(S::SelfType<'_>, V::SelfType<'_>),
) -> Result<(), redb::Error> {
    let t = r.open_table(table)?;
    for item in t.range((first, from)..)? {
        let (k, v) = item?;
        let (f, rest) = k.value();
        if f != first {
            break;
        }
        row(rest, v.value());
    }
    Ok(())
}

/// Map an open error to what the operator must know.
fn classify(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_owned(),
        },
        other => StoreError::Unreadable {
            path: path.to_owned(),
            message: other.to_string(),
        },
    }
}
