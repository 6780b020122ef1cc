//! The `snapshot` capability: read the gateway's current view of the keys
//! a plugin subscribes to.
//!
//! Owns the check that a read stays inside the plugin's subscriptions. The
//! values come from the dispatcher's key index through [`SnapshotReader`];
//! this module holds only a weak reference to it, so a plugin context never
//! keeps the dispatcher alive. It must not write.

use std::sync::Weak;

use bytes::Bytes;

use crate::event::Subscription;

/// Most keys one `scan` returns.
pub const SCAN_LIMIT: usize = 10_000;

/// Where current values come from (the dispatcher's key index).
pub trait SnapshotReader: Send + Sync {
    /// The current value of `key`: `None` for an unknown source,
    /// `Some(None)` for an absent or deleted key.
    fn value(&self, source: &str, key: &str) -> Option<Option<Bytes>>;
    /// Present keys under `prefix` for which `keep` is true, in key order,
    /// at most `limit`; `None` for an unknown source.
    fn scan(
        &self,
        source: &str,
        prefix: &str,
        keep: &dyn Fn(&str) -> bool,
        limit: usize,
    ) -> Option<Vec<(String, Bytes)>>;
}

/// The `snapshot` grant of one plugin.
pub struct SnapshotGrant {
    reader: Weak<dyn SnapshotReader>,
    subscriptions: Vec<Subscription>,
}

impl std::fmt::Debug for SnapshotGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotGrant")
            .field("subscriptions", &self.subscriptions)
            .finish_non_exhaustive()
    }
}

type Denied = (&'static str, String);

impl SnapshotGrant {
    /// Reads through `reader`, limited to `subscriptions` (empty: every
    /// key of every source, as for delivery).
    pub fn new(reader: Weak<dyn SnapshotReader>, subscriptions: Vec<Subscription>) -> Self {
        SnapshotGrant {
            reader,
            subscriptions,
        }
    }

    fn covers(&self, source: &str, key: &str) -> bool {
        Subscription::any_matches(&self.subscriptions, source, key)
    }

    fn subscribed(&self, source: &str) -> Result<(), Denied> {
        if Subscription::any_covers(&self.subscriptions, source) {
            Ok(())
        } else {
            Err((
                "denied",
                format!("source {source:?} is not subscribed by this plugin"),
            ))
        }
    }

    /// The current value of `key` in `source`.
    ///
    /// # Errors
    /// `denied` outside the subscriptions, `error` for an unknown source.
    pub fn get(&self, source: &str, key: &str) -> Result<Option<Vec<u8>>, Denied> {
        self.subscribed(source)?;
        if !self.covers(source, key) {
            return Err((
                "denied",
                format!("key {key:?} is outside this plugin's subscriptions"),
            ));
        }
        let reader = self
            .reader
            .upgrade()
            .ok_or(("error", "gateway stopping".into()))?;
        reader
            .value(source, key)
            .map(|v| v.map(|b| b.to_vec()))
            .ok_or_else(|| ("error", format!("no source named {source:?}")))
    }

    /// Present keys under `prefix` in `source` that the subscriptions
    /// cover, at most [`SCAN_LIMIT`].
    ///
    /// # Errors
    /// As for [`SnapshotGrant::get`].
    pub fn scan(&self, source: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, Denied> {
        self.subscribed(source)?;
        let reader = self
            .reader
            .upgrade()
            .ok_or(("error", "gateway stopping".into()))?;
        let keep = |k: &str| self.covers(source, k);
        reader
            .scan(source, prefix, &keep, SCAN_LIMIT)
            .map(|v| v.into_iter().map(|(k, b)| (k, b.to_vec())).collect())
            .ok_or_else(|| ("error", format!("no source named {source:?}")))
    }
}
