//! The file source: a directory tree as a key-value store.
//!
//! Owns one recursive `notify` watch on the configured directory, an
//! in-memory index of every file in it (key = path relative to the directory
//! with `/` separators, value = the file's bytes) and the rescans that diff
//! the tree against that index. Notifications only say *that* something
//! changed; a debounced full rescan says *what*. That makes atomic renames
//! (write a temporary file, rename it over the target) and Kubernetes
//! ConfigMap symlink swaps come out as exactly the puts and deletes of the
//! keys whose contents changed. A periodic rescan backs up lost
//! notifications; a vanished directory is reported as deletes of every key
//! and watched again with [`Backoff`] until it is back.
//!
//! It must not do blocking file-system work on tokio workers (scans and
//! watch set-up run on the blocking pool), must not block in the `notify`
//! callback (it only flags the tree dirty), must not interpret file
//! contents, and must not know about plugins or dispatch.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use parking_lot::Mutex;

use super::diff_snapshot as diff;
use tokio::sync::Notify;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use walkdir::WalkDir;

use super::backoff::Backoff;
// MERGE: re-export while file.rs is split; move FileSourceConfig here after merge
pub use super::file_config::FileSourceConfig;
use super::{Source, SourceContext, SourceFuture};
use crate::event::Event;

/// First retry delay after the directory vanished.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest retry delay after the directory vanished.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A watch session at least this long resets the retry backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// While the directory stays lost, a warning with the attempt count this
/// often (each attempt is logged at debug).
const STILL_LOST_EVERY: Duration = Duration::from_secs(300);
/// A burst of notifications that never settles still gets rescanned after
/// this many debounce periods.
const MAX_SETTLE_PERIODS: u32 = 10;

/// Watches a directory tree and reports every file as a key (see the module
/// docs for the semantics).
pub struct FileSource {
    config: FileSourceConfig,
}

impl FileSource {
    /// A source for `config`; nothing happens until [`Source::run`].
    pub fn new(config: FileSourceConfig) -> FileSource {
        FileSource { config }
    }
}

impl Source for FileSource {
    /// Watch the directory until `ctx.shutdown` is cancelled.
    ///
    /// # Errors
    /// At start only: the directory does not exist, is not a directory, or
    /// cannot be watched (the message names the path). Later failures,
    /// including the directory vanishing, are retried and reported through
    /// `ctx.status`.
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture {
        Box::pin(Runner::new(self.config, ctx).run())
    }
}

/// The state of one running file source.
struct Runner {
    ctx: SourceContext,
    scan: Arc<ScanConfig>,
    debounce: Duration,
    rescan_every: Option<Duration>,
    signals: Arc<Signals>,
    /// Paths skipped by the last scan and why, so each is warned about once.
    warned: HashMap<PathBuf, Skip>,
    /// What the last scan found: key → contents.
    index: BTreeMap<String, Bytes>,
    revision: u64,
    backoff: Backoff,
    last_watch_error: Option<String>,
    last_loss: Option<String>,
}

/// What a scan needs, shared with the blocking pool.
struct ScanConfig {
    source: Arc<str>,
    root: PathBuf,
    include_hidden: bool,
    max_value_bytes: u64,
}

/// Why the run loop woke up.
enum Wake {
    Shutdown,
    Changed,
    Periodic,
}

impl Runner {
    fn new(config: FileSourceConfig, ctx: SourceContext) -> Runner {
        let scan = Arc::new(ScanConfig {
            source: ctx.name.clone(),
            root: config.path,
            include_hidden: config.include_hidden,
            max_value_bytes: config.max_value_bytes,
        });
        Runner {
            ctx,
            scan,
            debounce: Duration::from_millis(config.debounce_ms),
            rescan_every: (config.rescan_interval_s > 0)
                .then(|| Duration::from_secs(config.rescan_interval_s)),
            signals: Arc::new(Signals::default()),
            warned: HashMap::new(),
            index: BTreeMap::new(),
            revision: 0,
            backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX),
            last_watch_error: None,
            last_loss: None,
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let root = self.scan.root.clone();
        let fail = {
            let (name, root) = (self.ctx.name.clone(), root.clone());
            move |reason: &dyn std::fmt::Display| {
                anyhow::anyhow!(
                    "file source {:?} cannot watch directory {}: {reason}",
                    &*name,
                    root.display()
                )
            }
        };

        // Watch first, then scan: a change during the scan is then either
        // seen by it or notified after it.
        let mut watch = self.establish().await.map_err(|e| fail(&e))?;
        let snapshot = match self.rescan(watch.root).await? {
            Scan::Done(snapshot) => snapshot,
            Scan::Cancelled => return Ok(()),
            Scan::Gone(reason) => return Err(fail(&reason)),
            Scan::Replaced => return Err(fail(&"it was replaced during the initial scan")),
        };
        self.ctx.status.set_connected(true);
        // The initial snapshot is the first revision (1, or one past what an
        // earlier run reached) even when it is empty, and is delivered as
        // the source's full state (the dispatcher diffs it against what an
        // earlier run of this source delivered).
        let first = self.ctx.revision_base + 1;
        let events = diff(&self.ctx.name, &self.index, &snapshot.files, first, false);
        self.index = snapshot.files;
        self.revision = first;
        self.ctx.emit_snapshot(events);
        self.ctx.status.set_synced();
        info!(
            source = %self.ctx.name,
            path = %root.display(),
            keys = self.index.len(),
            "Watching directory."
        );

        let mut periodic = self.rescan_every.map(|every| {
            let mut interval = tokio::time::interval_at(Instant::now() + every, every);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        let mut connected = true;
        let mut session_start = Instant::now();
        // Set when the next rescan must run now, without waiting for a
        // notification; its events are then marked `resync`.
        let mut rescan_now = false;
        loop {
            let mut resync = rescan_now;
            if !std::mem::take(&mut rescan_now) {
                let wake = tokio::select! {
                    biased;
                    () = self.ctx.shutdown.cancelled() => Wake::Shutdown,
                    () = self.signals.dirty.notified() => Wake::Changed,
                    () = tick(&mut periodic) => Wake::Periodic,
                };
                match wake {
                    Wake::Shutdown => return Ok(()),
                    Wake::Changed => {
                        if !self.settle().await {
                            return Ok(());
                        }
                    }
                    Wake::Periodic => resync = true,
                }
            }
            // Lost or failed notifications: this rescan fills a gap.
            resync |= self.take_watch_trouble();

            let reason = match self.rescan(watch.root).await? {
                Scan::Done(snapshot) => {
                    if !connected {
                        connected = true;
                        self.ctx.status.set_connected(true);
                    }
                    self.apply(snapshot, resync);
                    continue;
                }
                Scan::Cancelled => return Ok(()),
                Scan::Replaced => {
                    info!(
                        source = %self.ctx.name,
                        path = %root.display(),
                        "Watched directory was replaced; watching the new one."
                    );
                    match self.establish().await {
                        Ok(new) => {
                            watch = new;
                            rescan_now = true;
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Scan::Gone(reason) => reason,
            };

            drop(watch);
            connected = false;
            let session = session_start.elapsed();
            watch = match self.recover(reason, session).await {
                Some(watch) => watch,
                None => return Ok(()),
            };
            session_start = Instant::now();
            rescan_now = true;
        }
    }

    /// Wait until notifications have been quiet for the debounce period (or
    /// a burst has lasted [`MAX_SETTLE_PERIODS`] of them). False on
    /// shutdown.
    async fn settle(&self) -> bool {
        let give_up = Instant::now() + self.debounce * MAX_SETTLE_PERIODS;
        loop {
            let quiet = (Instant::now() + self.debounce).min(give_up);
            tokio::select! {
                biased;
                () = self.ctx.shutdown.cancelled() => return false,
                () = tokio::time::sleep_until(quiet) => return true,
                () = self.signals.dirty.notified() => {}
            }
        }
    }

    /// Log (once per distinct message) what the watcher reported since the
    /// last rescan. True when it reported anything.
    fn take_watch_trouble(&mut self) -> bool {
        let Some(error) = self.signals.trouble.lock().take() else {
            return false;
        };
        if self.last_watch_error.as_deref() == Some(error.as_str()) {
            debug!(
                source = %self.ctx.name,
                error = %error,
                "File watch reported the same problem again; rescanning."
            );
        } else {
            warn!(
                source = %self.ctx.name,
                path = %self.scan.root.display(),
                error = %error,
                "File watch reported a problem; rescanning the whole tree."
            );
            self.ctx.status.set_error(format!("file watch: {error}"));
            self.last_watch_error = Some(error);
        }
        true
    }

    /// Start watching the directory (on the blocking pool: a recursive
    /// watch walks the tree).
    async fn establish(&self) -> Result<Watch, String> {
        let root = self.scan.root.clone();
        let signals = self.signals.clone();
        tokio::task::spawn_blocking(move || Watch::start(&root, signals))
            .await
            .map_err(|e| format!("watch set-up task failed: {e}"))?
    }

    /// Scan the tree on the blocking pool.
    async fn rescan(&mut self, expected: RootId) -> anyhow::Result<Scan> {
        let config = self.scan.clone();
        let cancel = self.ctx.shutdown.clone();
        let mut warned = std::mem::take(&mut self.warned);
        let (scan, warned) = tokio::task::spawn_blocking(move || {
            let scan = scan_tree(&config, expected, &cancel, &mut warned);
            (scan, warned)
        })
        .await
        .map_err(|e| anyhow::anyhow!("file source scan task failed: {e}"))?;
        self.warned = warned;
        Ok(scan)
    }

    /// Make `snapshot` the index and emit the difference as one batch at the
    /// next revision (nothing, and no new revision, when nothing changed).
    fn apply(&mut self, snapshot: Snapshot, resync: bool) {
        let Snapshot {
            mut files,
            unreadable,
        } = snapshot;
        // A file that could not be read keeps its last known value.
        for (key, value) in &self.index {
            if !files.contains_key(key) && unreadable.iter().any(|u| covers(u, key)) {
                files.insert(key.clone(), value.clone());
            }
        }
        let events = diff(
            &self.ctx.name,
            &self.index,
            &files,
            self.revision + 1,
            resync,
        );
        self.index = files;
        self.emit(events);
    }

    fn emit(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.revision += 1;
        debug!(
            source = %self.ctx.name,
            revision = self.revision,
            events = events.len(),
            "Directory changed."
        );
        self.ctx.emit(events);
    }

    /// The directory is gone: report its keys deleted, then retry watching
    /// it with backoff. `None` on shutdown.
    async fn recover(&mut self, reason: String, session: Duration) -> Option<Watch> {
        let path = self.scan.root.display().to_string();
        if self.last_loss.as_deref() == Some(reason.as_str()) {
            debug!(
                source = %self.ctx.name,
                path = %path,
                error = %reason,
                "Lost the watched directory again; retrying."
            );
        } else {
            warn!(
                source = %self.ctx.name,
                path = %path,
                error = %reason,
                "Lost the watched directory; reporting its keys deleted and retrying."
            );
        }
        self.ctx.status.set_connected(false);
        self.ctx
            .status
            .set_error(format!("lost directory {path}: {reason}"));
        self.last_loss = Some(reason);
        let gone = std::mem::take(&mut self.index);
        let events = diff(
            &self.ctx.name,
            &gone,
            &BTreeMap::new(),
            self.revision + 1,
            false,
        );
        self.emit(events);

        if session >= HEALTHY_SESSION {
            self.backoff.reset();
        }
        let mut attempts: u64 = 0;
        let mut last_summary = Instant::now();
        loop {
            let delay = self.backoff.next_delay();
            tokio::select! {
                biased;
                () = self.ctx.shutdown.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            self.ctx.status.reconnecting();
            attempts += 1;
            match self.establish().await {
                Ok(watch) => {
                    info!(
                        source = %self.ctx.name,
                        path = %path,
                        attempts,
                        "Watched directory is back; watching it again."
                    );
                    return Some(watch);
                }
                // One line per attempt at debug; a count now and then at warn.
                Err(e) if last_summary.elapsed() >= STILL_LOST_EVERY => {
                    last_summary = Instant::now();
                    warn!(
                        source = %self.ctx.name,
                        path = %path,
                        attempts,
                        error = %e,
                        "Watched directory is still unavailable; retrying."
                    );
                }
                Err(e) => debug!(
                    source = %self.ctx.name,
                    path = %path,
                    attempts,
                    error = %e,
                    "Watched directory is still unavailable."
                ),
            }
        }
    }
}

/// Resolves on the next periodic tick; never when periodic rescans are off.
async fn tick(periodic: &mut Option<Interval>) {
    match periodic {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// What the `notify` callback thread shares with the run loop. The callback
/// never blocks: it stores a permit in `dirty` and, at most, one message.
#[derive(Default)]
struct Signals {
    /// Something in the tree may have changed.
    dirty: Notify,
    /// The watcher reported an error or lost events since the last rescan.
    trouble: Mutex<Option<String>>,
}

impl Signals {
    fn on_event(&self, event: notify::Result<notify::Event>) {
        match event {
            Ok(event) if event.need_rescan() => {
                self.record("the file-system event queue overflowed; notifications were lost");
            }
            Ok(event) if !changes_tree(&event.kind) => return,
            Ok(_) => {}
            Err(e) => self.record(&e.to_string()),
        }
        self.dirty.notify_one();
    }

    fn record(&self, message: &str) {
        // `try_lock`: the run loop only holds it for a `take`.
        if let Some(mut slot) = self.trouble.try_lock()
            && slot.is_none()
        {
            *slot = Some(message.to_owned());
        }
    }
}

/// Whether a notification can mean a changed tree. Opening, reading and
/// closing without writing cannot, and must not count: inotify reports the
/// rescan's own reads, which would otherwise trigger rescans forever.
fn changes_tree(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// A live recursive watch. Dropping it stops the watch.
struct Watch {
    _watcher: RecommendedWatcher,
    /// The directory the watch was set up on.
    root: RootId,
}

impl Watch {
    /// Blocking: stats the directory, then watches it recursively.
    fn start(root: &Path, signals: Arc<Signals>) -> Result<Watch, String> {
        // Identity first, watch second: if the directory is replaced in
        // between, the next scan sees a different identity and watches
        // again, instead of trusting a watch on the old one.
        let id = root_id(root)?;
        let mut watcher = notify::recommended_watcher(move |event| signals.on_event(event))
            .map_err(|e| format!("cannot create a file watcher: {e}"))?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| format!("cannot watch it: {e}"))?;
        Ok(Watch {
            _watcher: watcher,
            root: id,
        })
    }
}

/// Which directory a path resolved to, to tell a replaced directory from
/// the one being watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RootId {
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

/// The identity of the directory at `root` (following symlinks), or why it
/// is not usable.
fn root_id(root: &Path) -> Result<RootId, String> {
    match std::fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt as _;
                Ok(RootId {
                    dev: meta.dev(),
                    ino: meta.ino(),
                })
            }
            #[cfg(not(unix))]
            {
                let _ = meta;
                Ok(RootId {})
            }
        }
        Ok(_) => Err("it is not a directory".to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("it does not exist".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The outcome of one scan.
enum Scan {
    /// The tree as read.
    Done(Snapshot),
    /// The directory is missing or unusable.
    Gone(String),
    /// A different directory now sits at the path.
    Replaced,
    /// Shutdown interrupted the scan.
    Cancelled,
}

/// The files one scan read.
#[derive(Default)]
struct Snapshot {
    files: BTreeMap<String, Bytes>,
    /// Keys (files or directories) that exist but could not be read; their
    /// previous values, and those of keys below them, are kept.
    unreadable: Vec<String>,
}

/// Why a path was skipped. Equal reasons for the same path in successive
/// scans are warned about once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Skip {
    TooLarge {
        len: u64,
        modified: Option<SystemTime>,
    },
    Unreadable(String),
    NonUtf8,
    Loop,
}

/// Blocking: walk the tree under `config.root`, which must still be the
/// directory `expected`, and read every regular file.
fn scan_tree(
    config: &ScanConfig,
    expected: RootId,
    cancel: &CancellationToken,
    warned: &mut HashMap<PathBuf, Skip>,
) -> Scan {
    match root_id(&config.root) {
        Ok(id) if id == expected => {}
        Ok(_) => return Scan::Replaced,
        Err(reason) => return Scan::Gone(reason),
    }
    let mut snapshot = Snapshot::default();
    let mut skipped = HashMap::new();
    let mut skip = |path: &Path, why: Skip| {
        if warned.get(path) != Some(&why) {
            warn_skip(config, path, &why);
        }
        skipped.insert(path.to_owned(), why);
    };
    let walk = WalkDir::new(&config.root)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| config.include_hidden || e.depth() == 0 || !is_hidden(e.file_name()));
    for entry in walk {
        if cancel.is_cancelled() {
            return Scan::Cancelled;
        }
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.depth() == 0 => return Scan::Gone(e.to_string()),
            Err(e) => {
                let path = e.path().unwrap_or(&config.root).to_owned();
                if e.loop_ancestor().is_some() {
                    skip(&path, Skip::Loop);
                } else if e
                    .io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
                {
                    // A dangling symlink, or removed while we walked: absent.
                    debug!(
                        source = %config.source,
                        path = %path.display(),
                        "Skipping a path that vanished or dangles."
                    );
                } else {
                    if let Some(key) = key_of(&config.root, &path) {
                        snapshot.unreadable.push(key);
                    }
                    skip(&path, Skip::Unreadable(e.to_string()));
                }
                continue;
            }
        };
        // With `follow_links`, this is the type of a symlink's target.
        if !entry.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        let Some(key) = key_of(&config.root, path) else {
            skip(path, Skip::NonUtf8);
            continue;
        };
        match read_file(path, config.max_value_bytes) {
            Ok(Contents::Value(value)) => {
                snapshot.files.insert(key, value);
            }
            Ok(Contents::TooLarge { len, modified }) => {
                skip(path, Skip::TooLarge { len, modified })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                snapshot.unreadable.push(key);
                skip(path, Skip::Unreadable(e.to_string()));
            }
        }
    }
    *warned = skipped;
    Scan::Done(snapshot)
}

fn warn_skip(config: &ScanConfig, path: &Path, why: &Skip) {
    let (source, path) = (&config.source, path.display());
    match why {
        Skip::TooLarge { len, .. } => warn!(
            source = %source,
            path = %path,
            bytes = len,
            max_value_bytes = config.max_value_bytes,
            "Skipping a file larger than max_value_bytes."
        ),
        Skip::Unreadable(error) => {
            warn!(source = %source, path = %path, error = %error, "Skipping unreadable file.");
        }
        Skip::NonUtf8 => {
            warn!(source = %source, path = %path, "Skipping a file whose path is not UTF-8.");
        }
        Skip::Loop => {
            warn!(source = %source, path = %path, "Skipping a symlink loop.");
        }
    }
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// `path` relative to `root`, `/`-separated; `None` when not UTF-8.
fn key_of(root: &Path, path: &Path) -> Option<String> {
    let relative = path.strip_prefix(root).ok()?;
    let mut key = String::new();
    for part in relative.components() {
        if !key.is_empty() {
            key.push('/');
        }
        key.push_str(part.as_os_str().to_str()?);
    }
    Some(key)
}

/// Whether `unreadable` (a file or directory key) is `key` or one of its
/// parents.
fn covers(unreadable: &str, key: &str) -> bool {
    key.strip_prefix(unreadable)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

enum Contents {
    Value(Bytes),
    TooLarge {
        len: u64,
        modified: Option<SystemTime>,
    },
}

/// Blocking: read a regular file, refusing more than `max` bytes even if it
/// grows while being read.
fn read_file(path: &Path, max: u64) -> std::io::Result<Contents> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let too_large = |len| Contents::TooLarge {
        len,
        modified: meta.modified().ok(),
    };
    if meta.len() > max {
        return Ok(too_large(meta.len()));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    let len = buf.len() as u64;
    if len > max {
        return Ok(too_large(len));
    }
    Ok(Contents::Value(Bytes::from(buf)))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use notify::event::{CreateKind, ModifyKind};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::event::EventKind as Kind;

    /// How long any expected condition may take.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn config(root: &Path) -> FileSourceConfig {
        let mut config = FileSourceConfig::new("files", root);
        config.rescan_interval_s = 0;
        config
    }

    /// A running source and what it emitted.
    struct Running {
        ctx: SourceContext,
        rx: tokio::sync::mpsc::UnboundedReceiver<Vec<Event>>,
        task: JoinHandle<anyhow::Result<()>>,
        revision: u64,
        sentinels: u32,
    }

    impl Running {
        fn start(config: FileSourceConfig) -> Running {
            let (ctx, rx) = SourceContext::for_test("files");
            let task = tokio::spawn(Box::new(FileSource::new(config)).run(ctx.clone()));
            Running {
                ctx,
                rx,
                task,
                revision: 0,
                sentinels: 0,
            }
        }

        /// The next batch, checked: non-empty, sorted, one revision which
        /// is the previous batch's plus one.
        async fn batch(&mut self) -> Vec<Event> {
            let batch = tokio::time::timeout(DEADLINE, self.rx.recv())
                .await
                .expect("no batch within the deadline")
                .expect("the source stopped");
            assert!(!batch.is_empty());
            assert!(
                batch.windows(2).all(|w| w[0].key < w[1].key),
                "unsorted: {batch:?}"
            );
            assert!(
                batch.iter().all(|e| e.revision == self.revision + 1),
                "after revision {}: {batch:?}",
                self.revision
            );
            self.revision += 1;
            batch
        }

        /// Write a sentinel file into `dir` and return every event up to
        /// and including the batch that reports it, without the sentinel's
        /// own: exactly what changed before it, however the rescans split.
        async fn changes_before_sentinel(&mut self, dir: &Path) -> Vec<Event> {
            self.sentinels += 1;
            let name = format!("zz-sentinel-{}", self.sentinels);
            fs::write(dir.join(&name), "sentinel").unwrap();
            let mut events = Vec::new();
            loop {
                let batch = self.batch().await;
                let seen = batch.iter().any(|e| *e.key == *name);
                events.extend(batch.into_iter().filter(|e| *e.key != *name));
                if seen {
                    return events;
                }
            }
        }

        async fn wait_for(&self, what: &str, condition: impl Fn(&SourceContext) -> bool) {
            tokio::time::timeout(DEADLINE, async {
                while !condition(&self.ctx) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("not {what} within the deadline"));
        }

        async fn stop(self) {
            self.ctx.shutdown.cancel();
            tokio::time::timeout(DEADLINE, self.task)
                .await
                .expect("the source did not stop")
                .expect("the source panicked")
                .expect("the source failed");
        }
    }

    /// One line per event, for readable assertions.
    fn brief(events: &[Event]) -> Vec<String> {
        let text = |b: &Option<Bytes>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        events
            .iter()
            .map(|e| match e.kind {
                Kind::Put => format!(
                    "put {}={:?} prev={:?}",
                    e.key,
                    text(&e.value).unwrap(),
                    text(&e.prev_value)
                ),
                Kind::Delete => format!("delete {} prev={:?}", e.key, text(&e.prev_value)),
            })
            .collect()
    }

    /// The events folded per key (later value, earliest previous value).
    fn folded(events: Vec<Event>) -> Vec<Event> {
        let mut by_key: BTreeMap<String, Event> = BTreeMap::new();
        for event in events {
            match by_key.get_mut(&*event.key) {
                Some(first) => first.absorb(event),
                None => {
                    by_key.insert(event.key.to_string(), event);
                }
            }
        }
        by_key.into_values().collect()
    }

    #[cfg(unix)]
    fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }

    #[tokio::test]
    async fn initial_snapshot_is_one_batch_of_puts_at_revision_1() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("dir/sub")).unwrap();
        fs::create_dir_all(root.join(".hidden-dir")).unwrap();
        fs::write(root.join("a.txt"), "a").unwrap();
        fs::write(root.join("dir/b.txt"), "b").unwrap();
        fs::write(root.join("dir/sub/c.txt"), "c").unwrap();
        fs::write(root.join(".hidden"), "h").unwrap();
        fs::write(root.join("dir/.hidden"), "h").unwrap();
        fs::write(root.join(".hidden-dir/x"), "x").unwrap();
        #[cfg(unix)]
        symlink("..", root.join("dir/loop"));

        let mut source = Running::start(config(root));
        let batch = source.batch().await;
        assert_eq!(
            brief(&batch),
            [
                r#"put a.txt="a" prev=None"#,
                r#"put dir/b.txt="b" prev=None"#,
                r#"put dir/sub/c.txt="c" prev=None"#,
            ]
        );
        assert!(
            batch
                .iter()
                .all(|e| e.revision == 1 && !e.resync && &*e.source == "files")
        );
        assert!(source.ctx.status.is_synced());
        assert!(source.ctx.status.is_connected());
        source.stop().await;
    }

    #[tokio::test]
    async fn an_empty_directory_syncs_with_an_empty_snapshot_at_revision_1() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = Running::start(config(dir.path()));
        source
            .wait_for("synced", |ctx| ctx.status.is_synced())
            .await;
        // The empty snapshot is still delivered (a restarted source's sink
        // must learn that every key is gone), as revision 1.
        let first = tokio::time::timeout(DEADLINE, source.rx.recv())
            .await
            .expect("the snapshot within the deadline")
            .expect("the source stopped");
        assert!(first.is_empty(), "{first:?}");
        source.revision = 1;
        let events = source.changes_before_sentinel(dir.path()).await;
        assert_eq!(brief(&events), Vec::<String>::new());
        assert_eq!(source.revision, 2);
        source.stop().await;
    }

    #[tokio::test]
    async fn create_modify_and_delete_carry_previous_values() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a"), "1").unwrap();
        let mut source = Running::start(config(root));
        assert_eq!(brief(&source.batch().await), [r#"put a="1" prev=None"#]);

        // Create, in place (a rescan may see it half-written: fold).
        fs::create_dir(root.join("new")).unwrap();
        fs::write(root.join("new/b"), "x").unwrap();
        let events = source.changes_before_sentinel(root).await;
        assert!(events.iter().all(|e| e.kind == Kind::Put), "{events:?}");
        assert_eq!(brief(&folded(events)), [r#"put new/b="x" prev=None"#]);

        // Modify in place.
        fs::write(root.join("a"), "2").unwrap();
        let events = source.changes_before_sentinel(root).await;
        assert!(events.iter().all(|e| e.kind == Kind::Put), "{events:?}");
        assert_eq!(brief(&folded(events)), [r#"put a="2" prev=Some("1")"#]);

        // Delete.
        fs::remove_file(root.join("new/b")).unwrap();
        let events = source.changes_before_sentinel(root).await;
        assert_eq!(brief(&events), [r#"delete new/b prev=Some("x")"#]);
        source.stop().await;
    }

    #[tokio::test]
    async fn an_atomic_rename_is_one_put_of_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("app.conf"), "v1").unwrap();
        let mut source = Running::start(config(root));
        source.batch().await;

        fs::write(root.join(".app.conf.tmp"), "v2").unwrap();
        fs::rename(root.join(".app.conf.tmp"), root.join("app.conf")).unwrap();
        let events = source.changes_before_sentinel(root).await;
        assert_eq!(brief(&events), [r#"put app.conf="v2" prev=Some("v1")"#]);
        assert!(!events[0].resync);
        source.stop().await;
    }

    /// What kubelet's atomic writer does to a ConfigMap volume.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_configmap_symlink_swap_reports_only_real_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let version = |name: &str, files: &[(&str, &str)]| {
            fs::create_dir(root.join(name)).unwrap();
            for (key, value) in files {
                fs::write(root.join(name).join(key), value).unwrap();
            }
        };
        version(
            "..2024_01_01_00_00_00.1",
            &[("changed", "old"), ("same", "same"), ("removed", "bye")],
        );
        symlink("..2024_01_01_00_00_00.1", root.join("..data"));
        for key in ["changed", "same", "removed"] {
            symlink(format!("..data/{key}"), root.join(key));
        }
        let mut source = Running::start(config(root));
        assert_eq!(
            brief(&source.batch().await),
            [
                r#"put changed="old" prev=None"#,
                r#"put removed="bye" prev=None"#,
                r#"put same="same" prev=None"#,
            ]
        );

        version(
            "..2024_01_02_00_00_00.2",
            &[("changed", "new"), ("same", "same")],
        );
        symlink("..2024_01_02_00_00_00.2", root.join("..data_tmp"));
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        fs::remove_file(root.join("removed")).unwrap();
        fs::remove_dir_all(root.join("..2024_01_01_00_00_00.1")).unwrap();

        let events = source.changes_before_sentinel(root).await;
        assert_eq!(
            brief(&events),
            [
                r#"put changed="new" prev=Some("old")"#,
                r#"delete removed prev=Some("bye")"#
            ]
        );
        source.stop().await;
    }

    #[tokio::test]
    async fn binary_values_pass_oversized_files_and_odd_paths_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("bin"), [0xff, 0x00, 0xfe]).unwrap();
        fs::write(root.join("big"), "0123456789abcdef").unwrap();
        fs::write(root.join("small"), "tiny").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt as _;
            fs::write(root.join(OsStr::from_bytes(b"not-utf8-\xff")), "x").unwrap();
        }
        let mut cfg = config(root);
        cfg.max_value_bytes = 8;
        let mut source = Running::start(cfg);
        let batch = source.batch().await;
        let keys: Vec<&str> = batch.iter().map(|e| &*e.key).collect();
        assert_eq!(keys, ["bin", "small"]);
        assert_eq!(batch[0].value.as_deref(), Some(&[0xff, 0x00, 0xfe][..]));

        // Shrunk under the limit: it appears.
        fs::write(root.join(".big.tmp"), "fits").unwrap();
        fs::rename(root.join(".big.tmp"), root.join("big")).unwrap();
        let events = source.changes_before_sentinel(root).await;
        assert_eq!(brief(&events), [r#"put big="fits" prev=None"#]);

        // Grown over it again: it is gone.
        fs::write(root.join(".big.tmp"), "far too large").unwrap();
        fs::rename(root.join(".big.tmp"), root.join("big")).unwrap();
        let events = source.changes_before_sentinel(root).await;
        assert_eq!(brief(&events), [r#"delete big prev=Some("fits")"#]);
        source.stop().await;
    }

    #[tokio::test]
    async fn a_missing_directory_at_start_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let (ctx, _rx) = SourceContext::for_test("files");
        let err = Box::new(FileSource::new(config(&missing)))
            .run(ctx.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(!ctx.status.is_synced());

        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        let err = Box::new(FileSource::new(config(&file)))
            .run(ctx)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("not a directory"), "{err}");
    }

    #[tokio::test]
    async fn shutdown_returns_promptly_even_while_debouncing() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "1").unwrap();
        let mut cfg = config(dir.path());
        cfg.debounce_ms = 60_000;
        cfg.rescan_interval_s = 3600;
        let mut source = Running::start(cfg);
        source.batch().await;
        // Let a change start a (very long) debounce, then stop.
        fs::write(dir.path().join("a"), "2").unwrap();
        let started = std::time::Instant::now();
        source.stop().await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "shutdown took {took:?}");
    }

    #[tokio::test]
    async fn a_vanished_directory_is_deleted_then_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("conf");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("a"), "1").unwrap();
        fs::write(root.join("b"), "2").unwrap();
        let mut source = Running::start(config(&root));
        source.batch().await;

        fs::rename(&root, dir.path().join("conf.gone")).unwrap();
        let batch = source.batch().await;
        assert_eq!(
            brief(&batch),
            [r#"delete a prev=Some("1")"#, r#"delete b prev=Some("2")"#]
        );
        let report = source.ctx.status.report();
        assert!(!report.connected);
        assert!(report.last_error.unwrap().contains("does not exist"));

        let back = dir.path().join("conf.new");
        fs::create_dir(&back).unwrap();
        fs::write(back.join("a"), "1").unwrap();
        fs::write(back.join("c"), "3").unwrap();
        fs::rename(&back, &root).unwrap();
        let batch = source.batch().await;
        assert_eq!(
            brief(&batch),
            [r#"put a="1" prev=None"#, r#"put c="3" prev=None"#]
        );
        assert!(batch.iter().all(|e| e.resync));
        let report = source.ctx.status.report();
        assert!(report.connected);
        assert!(report.reconnects >= 1);
        assert_eq!(report.last_error, None);

        // And the new directory is watched.
        let events = source.changes_before_sentinel(&root).await;
        assert!(events.is_empty(), "{events:?}");
        source.stop().await;
    }

    #[tokio::test]
    async fn a_replaced_directory_is_diffed_and_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("conf");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("same"), "s").unwrap();
        fs::write(root.join("changed"), "old").unwrap();
        fs::write(root.join("removed"), "r").unwrap();
        let mut source = Running::start(config(&root));
        source.batch().await;

        let new = dir.path().join("conf.new");
        fs::create_dir(&new).unwrap();
        fs::write(new.join("same"), "s").unwrap();
        fs::write(new.join("changed"), "new").unwrap();
        fs::rename(&root, dir.path().join("conf.old")).unwrap();
        fs::rename(&new, &root).unwrap();

        // Usually one diff; if a rescan fell between the two renames, the
        // keys were deleted and put back. Either way the net change is:
        let events = source.changes_before_sentinel(&root).await;
        let net: Vec<Event> = folded(events)
            .into_iter()
            .filter(|e| e.value != e.prev_value)
            .collect();
        assert_eq!(
            brief(&net),
            [
                r#"put changed="new" prev=Some("old")"#,
                r#"delete removed prev=Some("r")"#
            ]
        );
        assert!(source.ctx.status.is_connected());
        source.stop().await;
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_periodic_rescan_catches_what_no_notification_reports() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("conf");
        let outside = dir.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("target"), "1").unwrap();
        symlink(outside.join("target"), root.join("link"));
        let mut cfg = config(&root);
        cfg.rescan_interval_s = 1;
        let mut source = Running::start(cfg);
        assert_eq!(brief(&source.batch().await), [r#"put link="1" prev=None"#]);

        // The target's directory is not watched: only the rescan sees this.
        fs::write(outside.join(".tmp"), "2").unwrap();
        fs::rename(outside.join(".tmp"), outside.join("target")).unwrap();
        let batch = source.batch().await;
        assert_eq!(brief(&batch), [r#"put link="2" prev=Some("1")"#]);
        assert!(batch[0].resync);
        source.stop().await;
    }

    #[test]
    fn only_notifications_that_can_change_the_tree_count() {
        assert!(!changes_tree(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_tree(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes_tree(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_tree(&EventKind::Create(CreateKind::File)));
        assert!(changes_tree(&EventKind::Modify(ModifyKind::Any)));
        assert!(changes_tree(&EventKind::Other));
    }

    #[test]
    fn keys_use_slashes_and_unreadable_paths_cover_their_children() {
        let root = Path::new("/srv/conf");
        assert_eq!(
            key_of(root, &root.join("a").join("b.txt")).as_deref(),
            Some("a/b.txt")
        );
        assert!(covers("a", "a"));
        assert!(covers("a", "a/b"));
        assert!(!covers("a", "ab"));
    }

    #[test]
    fn diff_is_sorted_and_carries_previous_values() {
        let src: Arc<str> = Arc::from("files");
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, Bytes> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect()
        };
        let old = map(&[("b", "1"), ("c", "same"), ("d", "gone")]);
        let new = map(&[("a", "new"), ("b", "2"), ("c", "same")]);
        let events = diff(&src, &old, &new, 7, false);
        assert_eq!(
            brief(&events),
            [
                r#"put a="new" prev=None"#,
                r#"put b="2" prev=Some("1")"#,
                r#"delete d prev=Some("gone")"#,
            ]
        );
        assert!(events.iter().all(|e| e.revision == 7));
        assert!(diff(&src, &new, &new, 8, false).is_empty());
    }
}
