//! The `files` capability: access rooted in one granted directory, within
//! a disk quota.
//!
//! Owns path validation (relative, normal components only, no escape through
//! symlinks), the operations (append, replace, read, rename, remove) and the
//! grant's quota: bytes of file contents and the number of files and
//! directories under the granted directory. Usage is measured on disk when
//! the grant is made (a restart or a new version does not reset it) and kept
//! up to date by every operation; a write that would pass the quota is
//! refused before it touches the disk, and a read is bounded by the quota
//! and [`MAX_READ`]. It also resolves the `{file}` of a granted command
//! ([`FilesGrant::resolve`]). It must not offer listing or any path outside
//! the grant.

use std::ffi::OsStr;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How much one grant may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesQuota {
    /// Most bytes of file contents (`limits.files_mb`).
    pub bytes: u64,
    /// Most files and directories, the granted directory itself not
    /// counted (`limits.files_count`).
    pub entries: u64,
}

/// What a grant holds, as its quota counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilesUsage {
    /// Bytes of file contents.
    pub bytes: u64,
    /// Files and directories (and anything else, such as the operator's
    /// symlinks), the granted directory itself not counted.
    pub entries: u64,
}

/// How often, at most, a refused write measures the directory again. Files
/// the operator removes (a rotated log) are not seen by the running count;
/// a write that would pass the quota looks at the disk first, so the room
/// they leave is found within this long, and a plugin that keeps hitting
/// its quota cannot make the host walk its directory on every call.
const REMEASURE: Duration = Duration::from_secs(1);

/// Largest file one `read` returns, below the grant's byte quota: a larger
/// file is refused, never loaded.
pub const MAX_READ: u64 = 16 << 20;

#[derive(Debug)]
struct Counted {
    usage: FilesUsage,
    /// When `usage` was measured on disk; `None` after a write failed
    /// half-way, when only the disk knows what it left.
    measured: Option<Instant>,
}

/// A write grant rooted in one directory, with its quota.
#[derive(Debug, Clone)]
pub struct FilesGrant {
    root: PathBuf,
    quota: FilesQuota,
    /// Held for the whole of a write, so concurrent writes of one plugin
    /// are counted one after the other.
    counted: Arc<Mutex<Counted>>,
}

/// Why a file operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The plugin has no `files` grant.
    #[error("capability `files` is not granted to this plugin")]
    NotGranted,
    /// The path is not a plain relative path inside the grant.
    #[error("path {path:?} refused: {reason}")]
    BadPath {
        /// The path as given.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The write would pass the grant's quota; nothing was written.
    #[error("{op} {path:?} refused: {detail}")]
    Quota {
        /// `append` or `replace`.
        op: &'static str,
        /// The path as given.
        path: String,
        /// Which limit, its value, the usage and what the write needed.
        detail: String,
    },
    /// The file is larger than a read may return; nothing was read.
    #[error("{op} {path:?} refused: {detail}")]
    TooLarge {
        /// `read`.
        op: &'static str,
        /// The path as given.
        path: String,
        /// The file's size and the bound.
        detail: String,
    },
    /// The operation failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// `append` or `replace`.
        op: &'static str,
        /// The path as given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Check a plugin-supplied path and return it cleaned: relative, only
/// normal components, naming a file. Touches nothing on disk.
///
/// # Errors
/// [`FilesError::BadPath`] saying why the path is refused.
pub fn clean_path(path: &str) -> Result<PathBuf, FilesError> {
    let bad = |reason| FilesError::BadPath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.contains('\0') {
        return Err(bad("NUL byte in path"));
    }
    let mut clean = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("`..` is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad("absolute paths are not allowed"));
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(bad("path names no file"));
    }
    Ok(clean)
}

/// Bytes of file contents and entries under `root`, not following
/// symlinks. What cannot be read is not counted.
fn measure(root: &Path) -> FilesUsage {
    let mut usage = FilesUsage::default();
    for entry in walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
    {
        usage.entries += 1;
        if entry.file_type().is_file() {
            usage.bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    usage
}

/// Where a write lands, resolved before anything is created.
struct Target {
    /// The file.
    file: PathBuf,
    /// Its directory, inside the grant.
    dir: PathBuf,
    /// Directories the write must create.
    new_dirs: u64,
    /// The file's length, when it exists.
    len: Option<u64>,
}

/// What a write adds to a grant while it runs.
#[derive(Clone, Copy)]
struct Need {
    bytes: u64,
    entries: u64,
}

impl FilesGrant {
    /// A grant rooted at `root` (created when missing), holding at most
    /// `quota`; what is already there counts.
    ///
    /// # Errors
    /// When the directory cannot be created or resolved.
    pub fn new(root: &Path, quota: FilesQuota) -> std::io::Result<FilesGrant> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let usage = measure(&root);
        Ok(FilesGrant {
            root,
            quota,
            counted: Arc::new(Mutex::new(Counted {
                usage,
                measured: Some(Instant::now()),
            })),
        })
    }

    /// The granted directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The grant's quota.
    pub fn quota(&self) -> FilesQuota {
        self.quota
    }

    /// What the grant holds, as counted so far.
    pub fn usage(&self) -> FilesUsage {
        self.counted.lock().usage
    }

    /// Resolve a plugin-supplied path to a file inside the grant, creating
    /// nothing: the deepest directory of the path that exists must resolve
    /// inside the grant, and the rest are directories to create.
    fn target(&self, path: &str) -> Result<Target, FilesError> {
        let bad = |reason| FilesError::BadPath {
            path: path.to_owned(),
            reason,
        };
        let resolve = |source| FilesError::Io {
            op: "resolve",
            path: path.to_owned(),
            source,
        };
        let clean = clean_path(path)?;
        let name = clean.file_name().unwrap_or_default().to_owned();
        let mut existing = self.root.clone();
        let mut missing: Vec<&OsStr> = Vec::new();
        for part in clean.parent().into_iter().flat_map(Path::components) {
            let part = part.as_os_str();
            if missing.is_empty() {
                let next = existing.join(part);
                match std::fs::symlink_metadata(&next) {
                    Ok(_) => {
                        existing = next;
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(resolve(e)),
                }
            }
            missing.push(part);
        }
        // The grant's own directory may contain symlinks placed by the
        // operator; a plugin must not write through one to the outside.
        let real = existing.canonicalize().map_err(resolve)?;
        if !real.starts_with(&self.root) {
            return Err(bad("resolves outside the granted directory"));
        }
        if !real.is_dir() {
            return Err(bad("a parent of the target is a file"));
        }
        let dir = missing.iter().fold(real, |d, part| d.join(part));
        let file = dir.join(name);
        let len = match std::fs::symlink_metadata(&file) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(bad("target is a symlink")),
            Ok(meta) if meta.is_dir() => return Err(bad("target is a directory")),
            Ok(meta) => Some(meta.len()),
            Err(_) => None,
        };
        Ok(Target {
            file,
            dir,
            new_dirs: missing.len() as u64,
            len,
        })
    }

    /// Create the directories `target` needs.
    fn make_dirs(&self, target: &Target, path: &str) -> Result<(), FilesError> {
        if target.new_dirs == 0 {
            return Ok(());
        }
        let io = |source| FilesError::Io {
            op: "create directory for",
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&target.dir).map_err(io)?;
        if !target
            .dir
            .canonicalize()
            .map_err(io)?
            .starts_with(&self.root)
        {
            return Err(FilesError::BadPath {
                path: path.to_owned(),
                reason: "resolves outside the granted directory",
            });
        }
        Ok(())
    }

    /// Check that `need` more fits in the quota, measuring the directory
    /// again first when the count may be off.
    fn admit(
        &self,
        counted: &mut Counted,
        op: &'static str,
        path: &str,
        need: Need,
    ) -> Result<(), FilesError> {
        // The running count stands until it may be off: after a failed
        // write, and, for a write it would refuse, once a second.
        let look = match counted.measured {
            None => true,
            Some(at) => at.elapsed() >= REMEASURE && self.refusal(counted.usage, need).is_some(),
        };
        if look {
            counted.usage = measure(&self.root);
            counted.measured = Some(Instant::now());
        }
        match self.refusal(counted.usage, need) {
            None => Ok(()),
            Some(mut detail) => {
                if op == "replace" {
                    detail.push_str(
                        " (a replace writes the new contents beside the old ones before it renames them over)",
                    );
                }
                Err(FilesError::Quota {
                    op,
                    path: path.to_owned(),
                    detail,
                })
            }
        }
    }

    /// Why `need` more does not fit beside `usage`, if it does not.
    fn refusal(&self, usage: FilesUsage, need: Need) -> Option<String> {
        let q = self.quota;
        if need.bytes > 0 && usage.bytes.saturating_add(need.bytes) > q.bytes {
            return Some(format!(
                "files quota: {} bytes are in use of the {} allowed (limits.files_mb = {}); this write needs {} more",
                usage.bytes,
                q.bytes,
                q.bytes >> 20,
                need.bytes
            ));
        }
        if need.entries > 0 && usage.entries.saturating_add(need.entries) > q.entries {
            return Some(format!(
                "files quota: {} files and directories are in use of the {} allowed (limits.files_count); this write needs {} more",
                usage.entries, q.entries, need.entries
            ));
        }
        None
    }

    /// Append `data` to `path`, creating it and its directories.
    ///
    /// # Errors
    /// [`FilesError`] when the path is refused, the quota would be passed,
    /// or the write fails.
    pub fn append(&self, path: &str, data: &[u8]) -> Result<(), FilesError> {
        let mut counted = self.counted.lock();
        let target = self.target(path)?;
        let new_entries = target.new_dirs + u64::from(target.len.is_none());
        let need = Need {
            bytes: data.len() as u64,
            entries: new_entries,
        };
        self.admit(&mut counted, "append", path, need)?;
        let io = |source| FilesError::Io {
            op: "append",
            path: path.to_owned(),
            source,
        };
        let written = self.make_dirs(&target, path).and_then(|()| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&target.file)
                .map_err(io)?;
            f.write_all(data).map_err(io)?;
            Ok(f.metadata().map_err(io)?.len())
        });
        match written {
            Ok(len) => {
                let grown = len.saturating_sub(target.len.unwrap_or(0));
                counted.usage.bytes += grown;
                counted.usage.entries += new_entries;
            }
            Err(_) => counted.measured = None,
        }
        written.map(drop)
    }

    /// Replace the contents of `path` atomically: a reader sees the old or
    /// the new contents, never a mix. The temporary file holding the new
    /// contents counts against the quota while it exists.
    ///
    /// # Errors
    /// [`FilesError`] when the path is refused, the quota would be passed,
    /// or the write fails.
    pub fn replace(&self, path: &str, data: &[u8]) -> Result<(), FilesError> {
        let mut counted = self.counted.lock();
        let target = self.target(path)?;
        let need = Need {
            bytes: data.len() as u64,
            entries: target.new_dirs + 1,
        };
        self.admit(&mut counted, "replace", path, need)?;
        let io = |source| FilesError::Io {
            op: "replace",
            path: path.to_owned(),
            source,
        };
        let written = self.make_dirs(&target, path).and_then(|()| {
            let mut tmp = tempfile::Builder::new()
                .prefix(".watchgate-")
                .tempfile_in(&target.dir)
                .map_err(io)?;
            tmp.write_all(data).map_err(io)?;
            tmp.as_file().sync_data().map_err(io)?;
            tmp.persist(&target.file).map_err(|e| io(e.error))?;
            Ok(())
        });
        match written {
            Ok(()) => {
                let u = &mut counted.usage;
                u.bytes = (u.bytes + data.len() as u64).saturating_sub(target.len.unwrap_or(0));
                u.entries += target.new_dirs + u64::from(target.len.is_none());
            }
            Err(_) => counted.measured = None,
        }
        written
    }
}

impl FilesGrant {
    /// The absolute path `path` names inside the grant, resolved like a
    /// write's target (no `..`, no absolute path, no way out through a
    /// symlink); the file need not exist. Creates nothing.
    ///
    /// # Errors
    /// [`FilesError::BadPath`] when the path is refused.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, FilesError> {
        let _counted = self.counted.lock();
        self.target(path).map(|t| t.file)
    }

    /// The most one read returns: the grant's byte quota, at most
    /// [`MAX_READ`].
    pub fn read_bound(&self) -> u64 {
        self.quota.bytes.min(MAX_READ)
    }

    /// The contents of `path`; `None` when it does not exist. A file larger
    /// than [`FilesGrant::read_bound`] is refused without being read.
    ///
    /// # Errors
    /// [`FilesError`] when the path is refused, the file is too large, or
    /// the read fails.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>, FilesError> {
        use std::io::Read as _;
        let target = {
            let _counted = self.counted.lock();
            self.target(path)?
        };
        if target.len.is_none() || target.new_dirs > 0 {
            return Ok(None);
        }
        let io = |source| FilesError::Io {
            op: "read",
            path: path.to_owned(),
            source,
        };
        let bound = self.read_bound();
        let too_large = |len: u64| FilesError::TooLarge {
            op: "read",
            path: path.to_owned(),
            detail: format!(
                "the file is {len} bytes or more; a read returns at most {bound} bytes \
                 (limits.files_mb = {}, and never more than {} MiB)",
                self.quota.bytes >> 20,
                MAX_READ >> 20
            ),
        };
        let f = match std::fs::File::open(&target.file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(FilesError::BadPath {
                path: path.to_owned(),
                reason: "not a regular file",
            });
        }
        if meta.len() > bound {
            return Err(too_large(meta.len()));
        }
        // The file may grow while it is read: never more than the bound.
        let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        f.take(bound + 1).read_to_end(&mut data).map_err(io)?;
        if data.len() as u64 > bound {
            return Err(too_large(data.len() as u64));
        }
        Ok(Some(data))
    }

    /// Rename `from` over `to` atomically, both inside the grant, creating
    /// the directories `to` needs. A file `to` replaces stops counting.
    ///
    /// # Errors
    /// [`FilesError`] when a path is refused, `from` does not exist, the
    /// directories `to` needs do not fit the quota, or the rename fails.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), FilesError> {
        let mut counted = self.counted.lock();
        let source = self.target(from)?;
        let dest = self.target(to)?;
        let io = |source| FilesError::Io {
            op: "rename",
            path: from.to_owned(),
            source,
        };
        if source.len.is_none() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            )));
        }
        if source.file == dest.file {
            return Ok(());
        }
        let need = Need {
            bytes: 0,
            entries: dest.new_dirs,
        };
        self.admit(&mut counted, "rename", to, need)?;
        let done = self
            .make_dirs(&dest, to)
            .and_then(|()| std::fs::rename(&source.file, &dest.file).map_err(io));
        match done {
            Ok(()) => {
                let u = &mut counted.usage;
                u.entries += dest.new_dirs;
                if let Some(old) = dest.len {
                    // The file it replaced is gone; the moved one stays.
                    u.bytes = u.bytes.saturating_sub(old);
                    u.entries = u.entries.saturating_sub(1);
                }
            }
            Err(_) => counted.measured = None,
        }
        done
    }

    /// Remove `path`; a file that does not exist is not an error.
    ///
    /// # Errors
    /// [`FilesError`] when the path is refused (a directory, a symlink) or
    /// the removal fails.
    pub fn remove(&self, path: &str) -> Result<(), FilesError> {
        let mut counted = self.counted.lock();
        let target = self.target(path)?;
        let Some(len) = target.len else {
            return Ok(());
        };
        match std::fs::remove_file(&target.file) {
            Ok(()) => {
                let u = &mut counted.usage;
                u.bytes = u.bytes.saturating_sub(len);
                u.entries = u.entries.saturating_sub(1);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                counted.measured = None;
                Ok(())
            }
            Err(source) => {
                counted.measured = None;
                Err(FilesError::Io {
                    op: "remove",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
