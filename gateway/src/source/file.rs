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
//! This module holds the source and its run loop; `watch` owns the watch
//! and `scan` reads the tree.
//!
//! It must not do blocking file-system work on tokio workers (scans and
//! watch set-up run on the blocking pool), must not block in the `notify`
//! callback (it only flags the tree dirty), must not interpret file
//! contents, and must not know about plugins or dispatch.

mod config;
mod scan;
#[cfg(test)]
mod tests;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::diff_snapshot as diff;
use super::{Source, SourceContext, SourceFuture};
use crate::backoff::Backoff;
use crate::event::Event;
pub use config::FileSourceConfig;
use scan::{Scan, ScanConfig, Skip, Snapshot, scan_tree};
use watch::{RootId, Signals, Watch};

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
        // The scan is the listing: one page, for the sync's report.
        self.ctx.status.listed(snapshot.files.len());
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
        // A file that could not be read keeps its last known value.
        let files = snapshot.files_keeping_unreadable(&self.index);
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
