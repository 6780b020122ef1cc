//! The `files` capability: write-only access rooted in one granted
//! directory, within a disk quota.
//!
//! Owns path validation (relative, normal components only, no escape through
//! symlinks), the two write operations and the grant's quota: bytes of file
//! contents and the number of files and directories under the granted
//! directory. Usage is measured on disk when the grant is made (a restart or
//! a new version does not reset it) and kept up to date by the writes; a
//! write that would pass the quota is refused before it touches the disk. It
//! must not offer reads, listing, deletion or any path outside the grant.

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
    /// The write failed.
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

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: FilesQuota = FilesQuota {
        bytes: 1 << 20,
        entries: 100,
    };

    #[test]
    fn writes_inside_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let g = FilesGrant::new(&dir.path().join("grant"), ROOMY).unwrap();
        g.append("a/log.txt", b"one\n").unwrap();
        g.append("a/log.txt", b"two\n").unwrap();
        g.replace("out.conf", b"v1").unwrap();
        g.replace("./out.conf", b"v2").unwrap();
        assert_eq!(
            std::fs::read_to_string(g.root().join("a/log.txt")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(
            std::fs::read_to_string(g.root().join("out.conf")).unwrap(),
            "v2"
        );
        for bad in ["", "../x", "a/../../x", "/etc/passwd", ".", "a/\0b"] {
            assert!(
                matches!(g.append(bad, b"x"), Err(FilesError::BadPath { .. })),
                "{bad:?} was accepted"
            );
        }
        std::os::unix::fs::symlink(outside.path(), g.root().join("escape")).unwrap();
        assert!(matches!(
            g.replace("escape/x", b"x"),
            Err(FilesError::BadPath { .. })
        ));
        std::os::unix::fs::symlink(outside.path().join("f"), g.root().join("link")).unwrap();
        assert!(matches!(
            g.append("link", b"x"),
            Err(FilesError::BadPath { .. })
        ));
        // Through a file, as if it were a directory.
        assert!(matches!(
            g.append("out.conf/x", b"x"),
            Err(FilesError::BadPath { .. })
        ));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        // No temporary files are left behind by replace.
        assert_no_temporary_files(g.root());
    }

    /// A grant of at most 1000 bytes and 5 entries.
    /// `replace` left none of its temporary files in `dir`.
    fn assert_no_temporary_files(dir: &Path) {
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".watchgate-")),
            "{names:?}"
        );
    }

    fn small(root: &Path) -> FilesGrant {
        FilesGrant::new(
            root,
            FilesQuota {
                bytes: 1000,
                entries: 5,
            },
        )
        .unwrap()
    }

    fn quota_message(r: Result<(), FilesError>) -> String {
        match r {
            Err(e @ FilesError::Quota { .. }) => e.to_string(),
            other => panic!("expected a quota refusal, got {other:?}"),
        }
    }

    #[test]
    fn append_stops_at_the_byte_quota_and_writes_nothing_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let g = small(dir.path());
        for _ in 0..9 {
            g.append("log", &[b'x'; 100]).unwrap();
        }
        g.append("log", &[b'x'; 100]).unwrap();
        let message = quota_message(g.append("log", b"y"));
        assert!(
            message.contains("1000 bytes are in use of the 1000 allowed (limits.files_mb")
                && message.contains("needs 1 more")
                && message.starts_with("append \"log\" refused"),
            "{message}"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("log")).unwrap().len(),
            1000
        );
        assert_eq!(
            g.usage(),
            FilesUsage {
                bytes: 1000,
                entries: 1
            }
        );
        // Writing nothing needs no room.
        g.append("log", b"").unwrap();
    }

    #[test]
    fn files_and_the_directories_made_for_them_count_as_entries() {
        let dir = tempfile::tempdir().unwrap();
        let g = small(dir.path());
        // a, a/b, a/b/c, a/b/c/f: four entries.
        g.append("a/b/c/f", b"1").unwrap();
        assert_eq!(g.usage().entries, 4);
        // Two more directories and a file would make seven.
        let message = quota_message(g.append("a/x/y/f", b"1"));
        assert!(
            message.contains(
                "4 files and directories are in use of the 5 allowed (limits.files_count); this write needs 3 more"
            ),
            "{message}"
        );
        assert!(
            !dir.path().join("a/x").exists(),
            "a refused write made a directory"
        );
        g.append("a/g", b"1").unwrap();
        // Full: appending to a file that exists still works.
        g.append("a/b/c/f", b"2").unwrap();
        quota_message(g.append("a/h", b"1"));
        assert_eq!(g.usage(), measure(dir.path()));
    }

    #[test]
    fn replace_counts_the_new_size_less_the_old_and_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let g = small(dir.path());
        g.replace("conf", &[b'a'; 600]).unwrap();
        assert_eq!(
            g.usage(),
            FilesUsage {
                bytes: 600,
                entries: 1
            }
        );
        // 600 more beside the old 600 do not fit while both exist.
        let message = quota_message(g.replace("conf", &[b'b'; 600]));
        assert!(
            message.contains("600 bytes are in use") && message.contains("beside the old ones"),
            "{message}"
        );
        assert_eq!(std::fs::read(dir.path().join("conf")).unwrap(), [b'a'; 600]);
        // Smaller contents fit, and the count drops to them.
        g.replace("conf", &[b'c'; 300]).unwrap();
        assert_eq!(g.usage().bytes, 300);
        g.replace("conf", &[b'd'; 700]).unwrap();
        assert_eq!(g.usage().bytes, 700);
        assert_eq!(g.usage(), measure(dir.path()));
        // Four entries in use: a replace of an existing file needs one more
        // for its temporary file, a new file in a new directory three.
        for f in ["x", "y", "z"] {
            g.append(f, b"").unwrap();
        }
        g.replace("conf", &[b'e'; 10]).unwrap();
        quota_message(g.replace("d/new", b"1"));
        assert_no_temporary_files(dir.path());
    }

    #[test]
    fn what_is_on_disk_counts_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("old")).unwrap();
        std::fs::write(dir.path().join("old/data"), [0; 900]).unwrap();
        // A leftover temporary file of an interrupted replace.
        std::fs::write(dir.path().join(".watchgate-abc"), [0; 50]).unwrap();
        let g = small(dir.path());
        assert_eq!(
            g.usage(),
            FilesUsage {
                bytes: 950,
                entries: 3
            }
        );
        quota_message(g.append("new", &[0; 51]));
        g.append("new", &[0; 50]).unwrap();
        // A new grant on the same directory (a restart) starts from the
        // disk, not from zero.
        let again = small(dir.path());
        assert_eq!(again.usage(), g.usage());
        quota_message(again.append("new", b"1"));
    }

    #[test]
    fn room_the_operator_makes_is_found_by_the_next_refused_write() {
        let dir = tempfile::tempdir().unwrap();
        let g = small(dir.path());
        g.append("events.log", &[b'x'; 1000]).unwrap();
        quota_message(g.append("events.log", b"y"));
        // The operator rotates the log away.
        std::fs::remove_file(dir.path().join("events.log")).unwrap();
        // Within REMEASURE of the last look, the count stands.
        quota_message(g.append("events.log", b"y"));
        g.counted.lock().measured = Some(Instant::now() - REMEASURE);
        g.append("events.log", b"y").unwrap();
        assert_eq!(
            g.usage(),
            FilesUsage {
                bytes: 1,
                entries: 1
            }
        );
    }
}
