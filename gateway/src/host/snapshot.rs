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

/// Most bytes (keys plus values) one `scan` copies into a plugin. The key
/// count alone does not bound the copy: 10,000 values of 4 MiB would be
/// 40 GiB. 4 MiB fits the smallest memory cap a plugin is likely to run
/// with and is far more than a scan of configuration keys needs.
pub const SCAN_BYTES: usize = 4 << 20;

/// How much one scan may return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanBounds {
    /// Most entries.
    pub keys: usize,
    /// Most bytes of keys plus values.
    pub bytes: usize,
}

impl ScanBounds {
    /// The bounds every plugin's scans run with.
    pub const PLUGIN: ScanBounds = ScanBounds {
        keys: SCAN_LIMIT,
        bytes: SCAN_BYTES,
    };
}

/// What one scan copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    /// The entries, in key order.
    pub entries: Vec<(String, Bytes)>,
    /// Bytes of keys plus values in `entries`.
    pub bytes: usize,
    /// The byte bound stopped the scan: more entries were left.
    pub cut: bool,
}

impl Scanned {
    /// Copy entries from `present` (keys in order, already filtered)
    /// until `bounds` is reached. It stops at the first entry that would
    /// pass the byte bound, so nothing beyond the bound is ever copied; the
    /// key bound ends the scan without marking it cut.
    pub fn collect<'a>(
        present: impl Iterator<Item = (&'a str, &'a Bytes)>,
        bounds: ScanBounds,
    ) -> Scanned {
        let mut out = Scanned::default();
        for (key, value) in present.take(bounds.keys) {
            let size = key.len().saturating_add(value.len());
            if out.bytes.saturating_add(size) > bounds.bytes {
                out.cut = true;
                break;
            }
            out.bytes += size;
            out.entries.push((key.to_owned(), value.clone()));
        }
        out
    }
}

/// Where current values come from (the dispatcher's key index).
pub trait SnapshotReader: Send + Sync {
    /// The current value of `key`: `None` for an unknown source,
    /// `Some(None)` for an absent or deleted key.
    fn value(&self, source: &str, key: &str) -> Option<Option<Bytes>>;
    /// The present keys `scan` asks for, in key order, within its bounds
    /// (see [`Scanned::collect`]); `None` for an unknown source.
    fn scan(&self, scan: &ScanRequest<'_>) -> Option<Scanned>;
}

/// One scan of a source's keys.
pub struct ScanRequest<'a> {
    /// The source.
    pub source: &'a str,
    /// Keys under this prefix.
    pub prefix: &'a str,
    /// Only keys for which this is true (the plugin's subscriptions).
    pub keep: &'a dyn Fn(&str) -> bool,
    /// Most entries and bytes.
    pub bounds: ScanBounds,
}

impl ScanRequest<'_> {
    /// Whether `key` is one this scan asks for.
    pub fn wants(&self, key: &str) -> bool {
        key.starts_with(self.prefix) && (self.keep)(key)
    }
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
    /// cover, at most [`SCAN_LIMIT`] of them and [`SCAN_BYTES`] of keys
    /// plus values.
    ///
    /// # Errors
    /// As for [`SnapshotGrant::get`]; `too_large` when the entries pass
    /// [`SCAN_BYTES`]. The WIT result cannot mark a list as partial, and a
    /// partial list a plugin takes for the whole would be a wrong answer,
    /// so the plugin gets an error naming the bound and can scan narrower
    /// prefixes or `get` single keys instead.
    pub fn scan(&self, source: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, Denied> {
        self.scan_within(source, prefix, ScanBounds::PLUGIN)
    }

    fn scan_within(
        &self,
        source: &str,
        prefix: &str,
        bounds: ScanBounds,
    ) -> Result<Vec<(String, Vec<u8>)>, Denied> {
        self.subscribed(source)?;
        let reader = self
            .reader
            .upgrade()
            .ok_or(("error", "gateway stopping".into()))?;
        let keep = |k: &str| self.covers(source, k);
        let scanned = reader
            .scan(&ScanRequest {
                source,
                prefix,
                keep: &keep,
                bounds,
            })
            .ok_or_else(|| ("error", format!("no source named {source:?}")))?;
        if scanned.cut {
            return Err((
                "too_large",
                format!(
                    "scan result passes the limit of {} bytes of keys and values per scan; \
                     scan a narrower prefix",
                    bounds.bytes
                ),
            ));
        }
        Ok(scanned
            .entries
            .into_iter()
            .map(|(k, b)| (k, b.to_vec()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;

    /// One source, `s`, with the given keys.
    struct Keys(BTreeMap<String, Bytes>);

    impl SnapshotReader for Keys {
        fn value(&self, _: &str, key: &str) -> Option<Option<Bytes>> {
            Some(self.0.get(key).cloned())
        }

        fn scan(&self, scan: &ScanRequest<'_>) -> Option<Scanned> {
            (scan.source == "s").then(|| {
                let present = self
                    .0
                    .iter()
                    .filter(|(k, _)| scan.wants(k))
                    .map(|(k, v)| (k.as_str(), v));
                Scanned::collect(present, scan.bounds)
            })
        }
    }

    /// Keys `p/0` … `p/{n-1}` (3 bytes each), each with a 97-byte value:
    /// 100 bytes an entry.
    fn hundreds(n: usize) -> Arc<Keys> {
        Arc::new(Keys(
            (0..n)
                .map(|i| (format!("p/{i}"), Bytes::from(vec![b'v'; 97])))
                .collect(),
        ))
    }

    fn grant(reader: &Arc<Keys>) -> SnapshotGrant {
        let reader: Arc<dyn SnapshotReader> = reader.clone();
        SnapshotGrant::new(Arc::downgrade(&reader), Vec::new())
    }

    #[test]
    fn collecting_stops_at_the_entry_that_would_pass_the_byte_bound() {
        let values: Vec<(String, Bytes)> = (0..10)
            .map(|i| (format!("k{i}"), Bytes::from(vec![0; 98])))
            .collect();
        let mut pulled = 0;
        let present = values.iter().map(|(k, v)| {
            pulled += 1;
            (k.as_str(), v)
        });
        let scanned = Scanned::collect(
            present,
            ScanBounds {
                keys: 100,
                bytes: 350,
            },
        );
        assert!(scanned.cut);
        assert_eq!(scanned.entries.len(), 3);
        assert_eq!(scanned.bytes, 300);
        // The fourth entry was looked at, refused, and nothing after it.
        assert_eq!(pulled, 4);
    }

    #[test]
    fn the_key_bound_ends_a_scan_without_cutting_it() {
        let values: Vec<(String, Bytes)> = (0..10)
            .map(|i| (format!("k{i}"), Bytes::from_static(b"v")))
            .collect();
        let present = values.iter().map(|(k, v)| (k.as_str(), v));
        let scanned = Scanned::collect(
            present,
            ScanBounds {
                keys: 4,
                bytes: 1 << 20,
            },
        );
        assert!(!scanned.cut);
        assert_eq!(scanned.entries.len(), 4);
        assert_eq!(scanned.bytes, 12);
    }

    #[test]
    fn a_scan_past_the_byte_bound_is_refused_with_the_bound_named() {
        let keys = hundreds(50);
        let bounds = ScanBounds {
            keys: SCAN_LIMIT,
            bytes: 1_000,
        };
        let (outcome, message) = grant(&keys).scan_within("s", "p/", bounds).unwrap_err();
        assert_eq!(outcome, "too_large");
        assert!(message.contains("1000 bytes"), "{message}");
    }

    #[test]
    fn a_scan_within_the_byte_bound_returns_every_entry() {
        let keys = hundreds(10);
        let bounds = ScanBounds {
            keys: SCAN_LIMIT,
            bytes: 1_000,
        };
        let got = grant(&keys).scan_within("s", "p/", bounds).unwrap();
        let want: Vec<(String, Vec<u8>)> = keys
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.to_vec()))
            .collect();
        assert_eq!(got, want);
        // The plugin's own bounds leave such a scan alone too.
        assert_eq!(grant(&keys).scan("s", "p/").unwrap(), want);
    }

    #[test]
    fn the_plugin_byte_bound_refuses_many_large_values() {
        // 20 values of 256 KiB: 5 MiB, past the 4 MiB bound.
        let keys = Arc::new(Keys(
            (0..20)
                .map(|i| (format!("big/{i:02}"), Bytes::from(vec![0; 256 << 10])))
                .collect(),
        ));
        let (outcome, _) = grant(&keys).scan("s", "big/").unwrap_err();
        assert_eq!(outcome, "too_large");
        let scanned = keys
            .scan(&ScanRequest {
                source: "s",
                prefix: "big/",
                keep: &|_| true,
                bounds: ScanBounds::PLUGIN,
            })
            .unwrap();
        assert!(scanned.cut);
        assert!(scanned.bytes <= SCAN_BYTES);
        assert_eq!(scanned.entries.len(), 15);
    }
}
