//! The state directory: what must survive a restart or a crash.
//!
//! One embedded transactional store (redb, `DIR/state.redb`) holds, per
//! plugin and source, the cursor (the last position whose events that plugin
//! fully handled or dead-lettered); per source, the key index (key →
//! revision, position and value, with tombstones for deletes some plugin has
//! not handled yet) that restarts diff against; each plugin's `state`; and
//! the dead letters. Writes go through one writer thread that commits in
//! small batches: key-index changes in the order the dispatcher made them,
//! and, in the same transaction, the cursors the running plugins report.
//! Cursors are read *before* the pending writes are drained, so a committed
//! cursor never covers an event whose key-index change is not committed.
//!
//! This module owns the file format (tables and their encodings) and the
//! writer; it must not decide what a cursor means (the dispatcher does).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::event::EventLine;

/// The store's file name inside the state directory.
pub const FILE_NAME: &str = "state.redb";
/// The layout version written into the store.
const SCHEMA: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("sources");
const KEYS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("keys");
const CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("cursors");
const PLUGIN_STATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("plugin_state");
const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");

/// How long the writer gathers changes before it commits.
const COMMIT_INTERVAL: Duration = Duration::from_millis(20);
/// How long a woken writer waits for more changes before it commits.
const GATHER: Duration = Duration::from_millis(2);
/// Most queued writes one transaction takes.
const MAX_BATCH: usize = 20_000;

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

/// One key of a source as the dispatcher last saw it: the current value, or
/// a tombstone (`value: None`) for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Current value; `None` once deleted.
    pub value: Option<Bytes>,
    /// The source's revision of the last change.
    pub revision: u64,
    /// Position of the last change.
    pub seq: u64,
    /// Source-specific extras of the last put.
    pub metadata: Vec<(String, String)>,
}

/// Per-source bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMeta {
    /// The highest position assigned.
    pub last_seq: u64,
    /// For sources with a revision history: position = revision + offset.
    /// Raised when the store's revisions go back (a replaced cluster).
    pub offset: u64,
    /// Tombstones at or below this position were pruned: a plugin whose
    /// cursor is older restarts from a snapshot.
    pub floor: u64,
    /// What the positions of a source with history refer to (its prefix);
    /// a watch resumes only while it is unchanged.
    pub identity: String,
}

/// An event a plugin failed on after every attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Identifier, unique in the store.
    pub id: u64,
    /// The event.
    pub event: EventLine,
    /// Its position.
    pub seq: u64,
    /// Outcome class of the last attempt.
    pub outcome: String,
    /// Message of the last attempt.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// Seconds since the Unix epoch of the last attempt.
    pub at: u64,
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

enum Op {
    Wake,
    Cursor(String, Arc<str>, u64),
    State(String, String, Option<Vec<u8>>),
    DeadLetter(String, u64, Option<Vec<u8>>),
    Flush(mpsc::SyncSender<()>),
}

type Probes = Arc<Mutex<HashMap<String, Arc<dyn CursorProbe>>>>;
type Indexes = Arc<Mutex<Vec<Arc<dyn IndexProbe>>>>;

/// The open store and its writer thread.
pub struct Store {
    db: Arc<Database>,
    path: Option<PathBuf>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    probes: Probes,
    indexes: Indexes,
    writer: Mutex<Option<JoinHandle<()>>>,
    next_dead_letter: AtomicU64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("in-memory encoding cannot fail")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
        let db = Database::create(&path).map_err(|e| classify(&path, e))?;
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
        let next_dead_letter = init_tables(&db).map_err(|e| unreadable(e.to_string()))?;
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
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let probes: Probes = Arc::default();
        let indexes: Indexes = Arc::default();
        let writer = {
            let db = db.clone();
            let probes = probes.clone();
            let indexes = indexes.clone();
            std::thread::Builder::new()
                .name("state-writer".into())
                .spawn(move || {
                    lower_priority();
                    write_loop(&db, &rx, &probes, &indexes);
                })
                .expect("spawning the state writer")
        };
        Ok(Store {
            db,
            path,
            tx: Mutex::new(Some(tx)),
            probes,
            indexes,
            writer: Mutex::new(Some(writer)),
            next_dead_letter: AtomicU64::new(next_dead_letter),
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
                .and_then(|v| postcard::from_bytes(v.value()).ok())
                .unwrap_or_default())
        })
        .unwrap_or_default()
    }

    /// The stored key index of `source`.
    pub fn load_keys(&self, source: &str) -> BTreeMap<Arc<str>, KeyEntry> {
        self.read(|r| {
            let t = r.open_table(KEYS)?;
            let mut out = BTreeMap::new();
            for item in t.range((source, "")..)? {
                let (k, v) = item?;
                let (s, key) = k.value();
                if s != source {
                    break;
                }
                if let Ok(entry) = postcard::from_bytes::<KeyEntry>(v.value()) {
                    out.insert(Arc::from(key), entry);
                }
            }
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

    /// Every stored cursor of `plugin`, by source.
    pub fn cursors(&self, plugin: &str) -> BTreeMap<String, u64> {
        self.read(|r| {
            let t = r.open_table(CURSORS)?;
            let mut out = BTreeMap::new();
            for item in t.range((plugin, "")..)? {
                let (k, v) = item?;
                let (p, source) = k.value();
                if p != plugin {
                    break;
                }
                out.insert(source.to_owned(), v.value());
            }
            Ok(out)
        })
        .unwrap_or_default()
    }

    /// The stored `state` of `plugin`.
    pub fn plugin_state(&self, plugin: &str) -> Vec<(String, Vec<u8>)> {
        self.read(|r| {
            let t = r.open_table(PLUGIN_STATE)?;
            let mut out = Vec::new();
            for item in t.range((plugin, "")..)? {
                let (k, v) = item?;
                let (p, key) = k.value();
                if p != plugin {
                    break;
                }
                out.push((key.to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .unwrap_or_default()
    }

    /// The dead letters of `plugin`, oldest first.
    pub fn dead_letters(&self, plugin: &str) -> Vec<DeadLetter> {
        self.read(|r| {
            let t = r.open_table(DEAD_LETTERS)?;
            let mut out = Vec::new();
            for item in t.range((plugin, 0)..)? {
                let (k, v) = item?;
                if k.value().0 != plugin {
                    break;
                }
                if let Ok(d) = serde_json::from_slice::<DeadLetter>(v.value()) {
                    out.push(d);
                }
            }
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

    /// Stop writing the index of `source` (removed by a reload).
    pub fn unregister_index(&self, source: &str) {
        self.indexes.lock().retain(|p| &*p.source() != source);
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

    /// Record a plugin `state` change.
    pub fn set_plugin_state(&self, plugin: &str, key: &str, value: Option<&[u8]>) {
        self.send(Op::State(
            plugin.to_owned(),
            key.to_owned(),
            value.map(<[u8]>::to_vec),
        ));
    }

    /// Record a new dead letter; returns it with its id.
    pub fn add_dead_letter(&self, plugin: &str, mut letter: DeadLetter) -> DeadLetter {
        letter.id = self.next_dead_letter.fetch_add(1, Ordering::SeqCst);
        letter.at = now_secs();
        let bytes = serde_json::to_vec(&letter).expect("a dead letter encodes");
        self.send(Op::DeadLetter(plugin.to_owned(), letter.id, Some(bytes)));
        letter
    }

    /// Forget a dead letter (replayed successfully, or deleted).
    pub fn remove_dead_letter(&self, plugin: &str, id: u64) {
        self.send(Op::DeadLetter(plugin.to_owned(), id, None));
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

/// Create missing tables and the layout version; returns the next free dead
/// letter id.
fn init_tables(db: &Database) -> Result<u64, redb::Error> {
    let w = db.begin_write()?;
    let next;
    {
        let mut meta = w.open_table(META)?;
        if meta.get("schema")?.is_none() {
            let empty = w.list_tables()?.count() <= 1;
            if empty {
                meta.insert("schema", SCHEMA)?;
            }
        }
        w.open_table(SOURCES)?;
        w.open_table(KEYS)?;
        w.open_table(CURSORS)?;
        w.open_table(PLUGIN_STATE)?;
        let dl = w.open_table(DEAD_LETTERS)?;
        let mut max = 0;
        for item in dl.iter()? {
            let (k, _) = item?;
            max = max.max(k.value().1);
        }
        next = max + 1;
    }
    w.commit()?;
    Ok(next)
}

/// How much nicer than the rest of the gateway the state writer runs.
const WRITER_NICE: i32 = 10;

/// The writer is background work: under a flood of changes it must not
/// take a core from the threads that deliver events and call plugins. With
/// a nice 10 above theirs it gets about a tenth of their share of a
/// contended core, and all of an idle one. (On Linux, the nice value of a
/// thread ID applies to that thread alone.) Its own pacing still keeps its
/// commits to about an eighth of a core.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let me = Some(rustix::thread::gettid());
        let result = getpriority_process(me)
            .and_then(|now| setpriority_process(me, (now + WRITER_NICE).min(19)));
        if let Err(e) = result {
            tracing::debug!(error = %e, "Could not lower the state writer's priority.");
        }
    }
}

/// Receive more ops into `ops` until `until`, [`MAX_BATCH`] ops, or a
/// flush (someone waits for it). True when the channel closed.
fn gather(rx: &mpsc::Receiver<Op>, ops: &mut Vec<Op>, until: Instant) -> bool {
    while ops.len() < MAX_BATCH && !matches!(ops.last(), Some(Op::Flush(_))) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match rx.recv_timeout(left) {
            Ok(op) => ops.push(op),
            Err(mpsc::RecvTimeoutError::Timeout) => return false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return true,
        }
    }
    false
}

/// CPU time this thread has used: the writer's pacing counts the work of
/// a commit, not its waits for the disk or for a core. A commit that took
/// long only because the disk was slow to sync, or because the writer's
/// nice value let others run first, leaves little to make room for, and
/// pausing for it would only delay the next change (sources without
/// history deliver an event once its change is committed).
fn cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        // Wall time elsewhere.
        START.get_or_init(Instant::now).elapsed()
    }
}

/// The writer thread: gather, then commit cursors and changes together.
fn write_loop(db: &Database, rx: &mpsc::Receiver<Op>, probes: &Probes, indexes: &Indexes) {
    let mut written: HashMap<(String, Arc<str>), u64> = HashMap::new();
    let mut failures = 0u64;
    // When the last commit ended, and the CPU time it took.
    let mut ended = Instant::now();
    let mut took = Duration::ZERO;
    loop {
        let mut ops: Vec<Op> = Vec::new();
        let closed = match rx.recv_timeout(COMMIT_INTERVAL) {
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Ok(op) => {
                ops.push(op);
                // Give concurrent writers a moment to join this transaction,
                // and under a flood of changes keep the writer's share of a
                // core near an eighth: a commit that used `t` of CPU is
                // followed by at least `7t` of gathering. Fewer, larger
                // commits fold more changes of the same key. A flush ends
                // the gathering at once.
                let until = (Instant::now() + GATHER).max(ended + took * 7);
                gather(rx, &mut ops, until)
            }
        };
        let started = cpu_time();
        // Cursors first: every event they cover was recorded before now.
        let mut cursors: Vec<(String, Arc<str>, u64)> = Vec::new();
        for (plugin, probe) in probes.lock().iter() {
            for (source, seq) in probe.cursors() {
                cursors.push((plugin.clone(), source, seq));
            }
        }
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        cursors.retain(|(p, s, seq)| written.get(&(p.clone(), s.clone())) != Some(seq));
        // Key changes last: they include everything the cursors cover, and
        // everything recorded before a flush request.
        let probes_now: Vec<Arc<dyn IndexProbe>> = indexes.lock().clone();
        let mut taken: Vec<(Arc<dyn IndexProbe>, u64)> = Vec::new();
        let changes: Vec<SourceChanges> = probes_now
            .iter()
            .filter_map(|p| {
                let (keys, meta) = p.take_changes()?;
                taken.push((p.clone(), meta.last_seq));
                Some((p.source(), keys, meta))
            })
            .collect();
        if !ops.is_empty() || !cursors.is_empty() || !changes.is_empty() {
            let mut acks = Vec::new();
            match commit(db, ops, &cursors, &changes, &mut acks) {
                Ok(explicit) => {
                    for (p, s, seq) in cursors.into_iter().chain(explicit) {
                        written.insert((p, s), seq);
                    }
                    for (p, last) in &taken {
                        p.written(*last);
                    }
                }
                Err(e) => {
                    for ((p, _), (_, keys, _)) in taken.iter().zip(changes) {
                        p.unwritten(keys.into_iter().map(|(k, _)| k).collect());
                    }
                    failures += 1;
                    if failures.is_power_of_two() {
                        tracing::error!(error = %e, failures, "Writing the state store failed; cursors stay where they were.");
                    }
                }
            }
            for a in acks {
                let _ = a.send(());
            }
            took = cpu_time().saturating_sub(started);
            ended = Instant::now();
        }
        if closed {
            return;
        }
    }
}

type Written = Vec<(String, Arc<str>, u64)>;
type SourceChanges = (Arc<str>, Vec<(Arc<str>, Option<KeyEntry>)>, SourceMeta);

fn commit(
    db: &Database,
    ops: Vec<Op>,
    cursors: &[(String, Arc<str>, u64)],
    changes: &[SourceChanges],
    acks: &mut Vec<mpsc::SyncSender<()>>,
) -> Result<Written, redb::Error> {
    let w = db.begin_write()?;
    let mut explicit = Vec::new();
    {
        let mut keys = w.open_table(KEYS)?;
        let mut sources = w.open_table(SOURCES)?;
        let mut cur = w.open_table(CURSORS)?;
        let mut state = w.open_table(PLUGIN_STATE)?;
        let mut dead = w.open_table(DEAD_LETTERS)?;
        for (source, changed, meta) in changes {
            for (k, entry) in changed {
                match entry {
                    Some(e) => {
                        keys.insert((&**source, &**k), encode(e).as_slice())?;
                    }
                    None => {
                        keys.remove((&**source, &**k))?;
                    }
                }
            }
            sources.insert(&**source, encode(meta).as_slice())?;
        }
        for op in ops {
            match op {
                Op::Cursor(p, s, seq) => {
                    cur.insert((p.as_str(), &*s), seq)?;
                    explicit.push((p, s, seq));
                }
                Op::State(p, k, Some(v)) => {
                    state.insert((p.as_str(), k.as_str()), v.as_slice())?;
                }
                Op::State(p, k, None) => {
                    state.remove((p.as_str(), k.as_str()))?;
                }
                Op::DeadLetter(p, id, Some(v)) => {
                    dead.insert((p.as_str(), id), v.as_slice())?;
                }
                Op::DeadLetter(p, id, None) => {
                    dead.remove((p.as_str(), id))?;
                }
                Op::Flush(a) => acks.push(a),
                Op::Wake => {}
            }
        }
        for (p, s, seq) in cursors {
            cur.insert((p.as_str(), &**s), *seq)?;
        }
    }
    w.commit()?;
    Ok(explicit)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<(Arc<str>, u64)>);
    impl CursorProbe for Fixed {
        fn cursors(&self) -> Vec<(Arc<str>, u64)> {
            self.0.clone()
        }
    }

    type Changes = IndexChanges;

    /// Changes handed over once.
    struct Index(Arc<str>, Mutex<Option<Changes>>);
    impl IndexProbe for Index {
        fn source(&self) -> Arc<str> {
            self.0.clone()
        }
        fn take_changes(&self) -> Option<Changes> {
            self.1.lock().take()
        }
        fn written(&self, _: u64) {}
        fn unwritten(&self, _: Vec<Arc<str>>) {}
    }

    fn entry(v: &str, seq: u64) -> KeyEntry {
        KeyEntry {
            value: Some(Bytes::from(v.to_owned())),
            revision: seq,
            seq,
            metadata: vec![],
        }
    }

    /// An index whose first change set takes `slow` to hand over, busy
    /// (`spin`: as a large commit would) or asleep (as a commit waiting
    /// for a slow disk or for a core would), and that counts its commits.
    struct SlowFirst {
        slow: Duration,
        spin: bool,
        changed: std::sync::atomic::AtomicBool,
        first: std::sync::atomic::AtomicBool,
        written: std::sync::atomic::AtomicUsize,
    }
    impl SlowFirst {
        fn new(slow: Duration, spin: bool) -> Arc<Self> {
            Arc::new(SlowFirst {
                slow,
                spin,
                changed: true.into(),
                first: true.into(),
                written: 0.into(),
            })
        }
        fn written(&self) -> usize {
            self.written.load(std::sync::atomic::Ordering::SeqCst)
        }
        /// Wait for `n` commits; how long it took.
        fn wait_written(&self, n: usize) -> Duration {
            let asked = Instant::now();
            while self.written() < n {
                assert!(
                    asked.elapsed() < Duration::from_secs(30),
                    "commit {n} never came"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            asked.elapsed()
        }
    }
    impl IndexProbe for SlowFirst {
        fn source(&self) -> Arc<str> {
            Arc::from("slow")
        }
        fn take_changes(&self) -> Option<Changes> {
            use std::sync::atomic::Ordering::SeqCst;
            if !self.changed.swap(false, SeqCst) {
                return None;
            }
            if self.first.swap(false, SeqCst) {
                let until = Instant::now() + self.slow;
                if self.spin {
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                } else {
                    std::thread::sleep(self.slow);
                }
            }
            Some((
                vec![(Arc::from("k"), Some(entry("v", 1)))],
                SourceMeta::default(),
            ))
        }
        fn written(&self, _: u64) {
            self.written
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn unwritten(&self, _: Vec<Arc<str>>) {}
    }

    #[test]
    fn a_flush_does_not_wait_out_the_pause_after_a_slow_commit() {
        let store = Store::in_memory();
        let slow = Duration::from_millis(300);
        let probe = SlowFirst::new(slow, true);
        store.register_index(probe.clone());
        store.wake();
        probe.wait_written(1);
        // The writer now gathers for 7 × 300 ms of CPU before its next
        // commit; a flush must not wait for that.
        probe
            .changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        store.wake();
        let asked = Instant::now();
        store.flush();
        let waited = asked.elapsed();
        assert!(
            waited < slow * 3,
            "the flush waited {waited:?}, the pause after the slow commit"
        );
        assert_eq!(probe.written(), 2);
        assert_eq!(store.load_keys("slow").len(), 1);
    }

    #[test]
    fn a_commit_slow_only_in_waiting_does_not_delay_the_next() {
        let store = Store::in_memory();
        // 500 ms asleep: a sync on a loaded disk, or a core taken by
        // others. Paced by wall time, the next change would wait 3.5 s.
        let slow = Duration::from_millis(500);
        let probe = SlowFirst::new(slow, false);
        store.register_index(probe.clone());
        store.wake();
        probe.wait_written(1);
        probe
            .changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        store.wake();
        let waited = probe.wait_written(2);
        assert!(
            waited < slow * 2,
            "the next change waited {waited:?} after a commit that only waited"
        );
    }

    #[test]
    fn everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<str> = Arc::from("etcd");
        {
            let store = Store::open(dir.path()).unwrap();
            store.register_index(Arc::new(Index(
                s.clone(),
                Mutex::new(Some((
                    vec![
                        ("a".into(), Some(entry("1", 3))),
                        ("b".into(), Some(entry("2", 4))),
                        ("gone".into(), None),
                    ],
                    SourceMeta {
                        last_seq: 4,
                        ..SourceMeta::default()
                    },
                ))),
            )));
            store.register_index(Arc::new(Index(
                Arc::from("other"),
                Mutex::new(Some((
                    vec![("a".into(), Some(entry("x", 1)))],
                    SourceMeta::default(),
                ))),
            )));
            store.register("p", Arc::new(Fixed(vec![(s.clone(), 3)])));
            store.set_plugin_state("p", "k", Some(b"v"));
            let line = crate::event::Event::put(&s, "a", Bytes::from_static(b"1"), 3).to_line();
            let d = store.add_dead_letter(
                "p",
                DeadLetter {
                    id: 0,
                    event: line,
                    seq: 3,
                    outcome: "trap".into(),
                    error: "boom".into(),
                    attempts: 3,
                    at: 0,
                },
            );
            assert_eq!(d.id, 1);
            store.flush();
            store.close();
        }
        let store = Store::open(dir.path()).unwrap();
        let keys = store.load_keys("etcd");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys["b"], entry("2", 4));
        assert_eq!(store.source_meta("etcd").last_seq, 4);
        assert_eq!(store.cursor("p", "etcd"), Some(3));
        assert_eq!(store.plugin_state("p"), vec![("k".into(), b"v".to_vec())]);
        let dl = store.dead_letters("p");
        assert_eq!(dl.len(), 1);
        assert_eq!(dl[0].error, "boom");
        // New ids never reuse old ones.
        let line = dl[0].event.clone();
        let d = store.add_dead_letter(
            "p",
            DeadLetter {
                id: 0,
                ..dl[0].clone()
            },
        );
        assert_eq!(d.id, 2);
        assert_eq!(d.event, line);
    }

    #[test]
    fn a_second_open_is_refused_and_garbage_is_reported_not_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::InUse { .. })
        ));
        assert!(
            Store::reset(dir.path()).is_err(),
            "reset refuses a store in use"
        );
        store.close();
        drop(store);

        let bad = tempfile::tempdir().unwrap();
        std::fs::write(bad.path().join(FILE_NAME), vec![7u8; 8192]).unwrap();
        let Err(err) = Store::open(bad.path()) else {
            panic!("garbage must not open")
        };
        assert!(matches!(err, StoreError::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains("watchgate state reset"), "{err}");
        assert_eq!(
            std::fs::read(bad.path().join(FILE_NAME)).unwrap(),
            vec![7u8; 8192]
        );
        let moved = Store::reset(bad.path()).unwrap().unwrap();
        assert_eq!(std::fs::read(&moved).unwrap(), vec![7u8; 8192]);
        Store::open(bad.path()).expect("starts empty after a reset");
    }
}
