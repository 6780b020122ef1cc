//! The `[grants]` table of a sidecar: the capabilities the operator gives
//! one plugin.
//!
//! Owns [`Grants`], as written by the operator, and the capability names
//! they stand for. Each capability checks its own grant on every call; this
//! module must not check or perform anything.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::kv::KvGrant;

/// `[grants]`: the only way a plugin gets a capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Directory the plugin may write into (created if missing); relative
    /// paths are relative to the sidecar file.
    pub files: Option<PathBuf>,
    /// `HOST:PORT` pairs the plugin may send HTTP requests to, for example
    /// `["hooks.example.com:443", "127.0.0.1:8080", "[::1]:8080"]`.
    #[serde(default)]
    pub http: Vec<String>,
    /// Prefixes the plugin may write under, per source (etcd sources only).
    #[serde(default)]
    pub kv: Vec<KvGrant>,
    /// Read the current values of subscribed keys.
    #[serde(default)]
    pub snapshot: bool,
    /// Commands the plugin may run, by name: each an argv whose first
    /// element is an absolute path (`reload = ["/usr/sbin/nginx", "-s",
    /// "reload"]`). `{file}` in any later element stands for the absolute
    /// path of a file the plugin names inside its `files` grant. No shell.
    #[serde(default)]
    pub commands: BTreeMap<String, Vec<String>>,
    /// The whole environment of every granted command (empty by default).
    #[serde(default)]
    pub command_env: BTreeMap<String, String>,
    /// The working directory of every granted command: the `files` grant's
    /// directory when there is one, else `/`. Relative paths are relative
    /// to the sidecar file.
    pub command_dir: Option<PathBuf>,
    /// How long one command may run before its process group is killed
    /// (default 30s); a `run` also ends at its call's deadline.
    #[serde(default, with = "humantime_serde")]
    pub command_timeout: Option<Duration>,
    /// Pid files of processes the plugin may send SIGHUP to, by name
    /// (`nginx = "/run/nginx.pid"`). Relative paths are relative to the
    /// sidecar file.
    #[serde(default)]
    pub signals: BTreeMap<String, PathBuf>,
}

impl Grants {
    /// The capabilities these grants give, by name, in WIT order.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.files.is_some() {
            v.push("files");
        }
        if !self.http.is_empty() {
            v.push("http");
        }
        if !self.kv.is_empty() {
            v.push("kv");
        }
        if self.snapshot {
            v.push("snapshot");
        }
        if !self.commands.is_empty() || !self.signals.is_empty() {
            v.push("commands");
        }
        v
    }
}
