//! One scan of the file source's tree: walk the directory (following
//! symlinks), read every regular file into a snapshot keyed by its path
//! relative to the directory with `/` separators, and warn once about each
//! path skipped.
//!
//! A scan is blocking work for the blocking pool. This module must not emit
//! events or keep the source's index (the run loop diffs a snapshot against
//! it), and must not interpret file contents.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use walkdir::WalkDir;

use super::watch::{RootId, root_id};

/// What a scan needs, shared with the blocking pool.
pub(super) struct ScanConfig {
    pub(super) source: Arc<str>,
    pub(super) root: PathBuf,
    pub(super) include_hidden: bool,
    pub(super) max_value_bytes: u64,
}

/// The outcome of one scan.
pub(super) enum Scan {
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
pub(super) struct Snapshot {
    pub(super) files: BTreeMap<String, Bytes>,
    /// Keys (files or directories) that exist but could not be read; their
    /// previous values, and those of keys below them, are kept.
    unreadable: Vec<String>,
}

impl Snapshot {
    /// The files read, with the last value in `index` of every key that
    /// exists but could not be read this time.
    pub(super) fn files_keeping_unreadable(
        self,
        index: &BTreeMap<String, Bytes>,
    ) -> BTreeMap<String, Bytes> {
        let Snapshot {
            mut files,
            unreadable,
        } = self;
        for (key, value) in index {
            if !files.contains_key(key) && unreadable.iter().any(|u| covers(u, key)) {
                files.insert(key.clone(), value.clone());
            }
        }
        files
    }
}

/// Why a path was skipped. Equal reasons for the same path in successive
/// scans are warned about once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Skip {
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
pub(super) fn scan_tree(
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
pub(super) fn key_of(root: &Path, path: &Path) -> Option<String> {
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
pub(super) fn covers(unreadable: &str, key: &str) -> bool {
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
