//! The file source's settings: the `[[source]]` keys of `kind = "file"`.
//!
//! Owns [`FileSourceConfig`] and its defaults; `source/file.rs` watches with
//! it. It must not touch the file system.

use std::path::PathBuf;

use serde::Deserialize;

/// `kind = "file"`: a directory watched recursively.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Unique source name.
    pub name: String,
    /// Always `"file"`.
    #[serde(default)]
    kind: Option<String>,
    /// The directory to watch; relative paths are relative to the config
    /// file. Keys are paths relative to it, with `/` separators.
    pub path: PathBuf,
    /// Also report files whose name (or a parent directory's name) starts
    /// with `.`. Default false, which also hides Kubernetes ConfigMap
    /// internals (`..data`, `..2024_…`).
    #[serde(default)]
    pub include_hidden: bool,
    /// How long to let a burst of file-system notifications settle before
    /// rescanning, in milliseconds. Default 50.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Files larger than this many bytes are skipped with a warning. Default
    /// 4 MiB.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: u64,
    /// A full rescan every this many seconds, as a safety net against lost
    /// notifications. 0 turns it off. Default 60.
    #[serde(default = "default_rescan_interval_s")]
    pub rescan_interval_s: u64,
}

fn default_debounce_ms() -> u64 {
    50
}
fn default_max_value_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_rescan_interval_s() -> u64 {
    60
}

impl FileSourceConfig {
    /// A config with defaults, for tests and examples.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        FileSourceConfig {
            name: name.into(),
            kind: None,
            path: path.into(),
            include_hidden: false,
            debounce_ms: default_debounce_ms(),
            max_value_bytes: default_max_value_bytes(),
            rescan_interval_s: default_rescan_interval_s(),
        }
    }
}
