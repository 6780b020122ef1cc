//! What the plugin directory's loader tells `/readyz` and `/v1/plugins`:
//! whether its first contents are loaded, which files are rejected and
//! which are compiling. Written by the loader, read by the admin API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

/// What `/readyz` and `/v1/plugins` need to know about the directory.
#[derive(Default)]
pub struct LoaderStatus {
    pub(super) loaded: AtomicBool,
    pub(super) rejected: Mutex<BTreeMap<String, String>>,
    /// Plugins whose newest file is compiling, and since when.
    pub(super) compiling: Mutex<BTreeMap<String, Instant>>,
}

/// A plugin whose newest file is compiling.
#[derive(Debug, Clone, Serialize)]
pub struct CompilingNow {
    /// Plugin name.
    pub name: String,
    /// Seconds since its compile was asked for (waiting for a slot
    /// included).
    pub seconds: u64,
}

/// A rejected plugin file.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// Plugin name.
    pub name: String,
    /// Why.
    pub error: String,
}

impl LoaderStatus {
    /// The initial contents of the directory were processed.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Plugins whose newest file is compiling (an older version may still
    /// run).
    pub fn compiling(&self) -> Vec<CompilingNow> {
        self.compiling
            .lock()
            .iter()
            .map(|(name, since)| CompilingNow {
                name: name.clone(),
                seconds: since.elapsed().as_secs(),
            })
            .collect()
    }

    /// Plugins whose current files are rejected (an older version may still
    /// run).
    pub fn rejected(&self) -> Vec<Rejection> {
        self.rejected
            .lock()
            .iter()
            .map(|(name, error)| Rejection {
                name: name.clone(),
                error: error.clone(),
            })
            .collect()
    }
}
