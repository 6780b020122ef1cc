//! The `[grants]` table of a sidecar: the capabilities the operator gives
//! one plugin.
//!
//! Owns [`Grants`], as written by the operator, and the capability names
//! they stand for. Each capability checks its own grant on every call; this
//! module must not check or perform anything.

use std::path::PathBuf;

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
        v
    }
}
