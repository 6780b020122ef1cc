//! The `notify` side of the file source: one recursive watch on the
//! directory, the signals its callback thread hands the run loop, and the
//! identity of the watched directory, so that a directory replaced at the
//! same path is noticed.
//!
//! It must not block in the `notify` callback (it only flags the tree dirty
//! and keeps at most one message), and must not read files: what changed is
//! for a scan to find.

use std::path::Path;
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// What the `notify` callback thread shares with the run loop. The callback
/// never blocks: it stores a permit in `dirty` and, at most, one message.
#[derive(Default)]
pub(super) struct Signals {
    /// Something in the tree may have changed.
    pub(super) dirty: Notify,
    /// The watcher reported an error or lost events since the last rescan.
    pub(super) trouble: Mutex<Option<String>>,
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
pub(super) fn changes_tree(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// A live recursive watch. Dropping it stops the watch.
pub(super) struct Watch {
    _watcher: RecommendedWatcher,
    /// The directory the watch was set up on.
    pub(super) root: RootId,
}

impl Watch {
    /// Blocking: stats the directory, then watches it recursively.
    pub(super) fn start(root: &Path, signals: Arc<Signals>) -> Result<Watch, String> {
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
pub(super) struct RootId {
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

/// The identity of the directory at `root` (following symlinks), or why it
/// is not usable.
pub(super) fn root_id(root: &Path) -> Result<RootId, String> {
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
