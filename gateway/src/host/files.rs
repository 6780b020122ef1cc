//! The `files` capability: write-only access rooted in one granted
//! directory.
//!
//! Owns path validation (relative, normal components only, no escape through
//! symlinks) and the two write operations. It must not offer reads, listing,
//! deletion or any path outside the grant.

use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

/// A write grant rooted in one directory.
#[derive(Debug, Clone)]
pub struct FilesGrant {
    root: PathBuf,
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

impl FilesGrant {
    /// A grant rooted at `root` (created when missing).
    ///
    /// # Errors
    /// When the directory cannot be created or resolved.
    pub fn new(root: &Path) -> std::io::Result<FilesGrant> {
        std::fs::create_dir_all(root)?;
        Ok(FilesGrant {
            root: root.canonicalize()?,
        })
    }

    /// The granted directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolve a plugin-supplied path to a file inside the grant, creating
    /// its parent directories.
    fn target(&self, path: &str) -> Result<PathBuf, FilesError> {
        let bad = |reason| FilesError::BadPath {
            path: path.to_owned(),
            reason,
        };
        let target = self.root.join(clean_path(path)?);
        let parent = target.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(|source| FilesError::Io {
            op: "create directory for",
            path: path.to_owned(),
            source,
        })?;
        // The grant's own directory may contain symlinks placed by the
        // operator; a plugin must not write through one to the outside.
        let real_parent = parent.canonicalize().map_err(|source| FilesError::Io {
            op: "resolve",
            path: path.to_owned(),
            source,
        })?;
        if !real_parent.starts_with(&self.root) {
            return Err(bad("resolves outside the granted directory"));
        }
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            if meta.file_type().is_symlink() {
                return Err(bad("target is a symlink"));
            }
            if meta.is_dir() {
                return Err(bad("target is a directory"));
            }
        }
        Ok(real_parent.join(target.file_name().unwrap_or_default()))
    }

    /// Append `data` to `path`, creating it.
    ///
    /// # Errors
    /// [`FilesError`] when the path is refused or the write fails.
    pub fn append(&self, path: &str, data: &[u8]) -> Result<(), FilesError> {
        let target = self.target(path)?;
        let io = |source| FilesError::Io {
            op: "append",
            path: path.to_owned(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&target)
            .map_err(io)?;
        f.write_all(data).map_err(io)
    }

    /// Replace the contents of `path` atomically: a reader sees the old or
    /// the new contents, never a mix.
    ///
    /// # Errors
    /// [`FilesError`] when the path is refused or the write fails.
    pub fn replace(&self, path: &str, data: &[u8]) -> Result<(), FilesError> {
        let target = self.target(path)?;
        let io = |source| FilesError::Io {
            op: "replace",
            path: path.to_owned(),
            source,
        };
        let dir = target.parent().unwrap_or(&self.root);
        let mut tmp = tempfile::Builder::new()
            .prefix(".watchgate-")
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(data).map_err(io)?;
        tmp.as_file().sync_data().map_err(io)?;
        tmp.persist(&target).map_err(|e| io(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_inside_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let g = FilesGrant::new(&dir.path().join("grant")).unwrap();
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
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        // No temporary files are left behind by replace.
        let names: Vec<_> = std::fs::read_dir(g.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".watchgate-")),
            "{names:?}"
        );
    }
}
