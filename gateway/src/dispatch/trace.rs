//! Where one change of one key stands for every plugin (`/v1/trace`).
//!
//! Owns the answer to "which consumers have this change": it reads the
//! source's key index (the key's last position), each plugin's cursor,
//! the event it is retrying, the head of its queue and its newest dead
//! letters. Every read is bounded ([`QUEUE_SCAN`], [`LETTER_SCAN`]) and
//! none waits for a call in flight. It must not change any state.

use serde::Serialize;

use super::Dispatcher;
use super::worker::{Worker, WorkerState};

/// Most queued events a trace looks at per plugin (from the front).
pub const QUEUE_SCAN: usize = 4096;
/// Most dead letters a trace looks at per plugin (the newest).
pub const LETTER_SCAN: usize = 1024;

/// The change a trace follows.
#[derive(Debug, Clone, Serialize)]
pub struct TracedChange {
    /// `put` or `delete`.
    pub kind: &'static str,
    /// The source's revision of the change.
    pub revision: u64,
    /// Its position in the source (what plugin cursors count in).
    pub position: u64,
    /// Whether it is the key's latest change.
    pub latest: bool,
}

/// One plugin in a trace.
#[derive(Debug, Clone, Serialize)]
pub struct PluginTrace {
    /// Plugin name.
    pub plugin: String,
    /// `handled`, `queued`, `retrying`, `dead_letter`, `quarantined`,
    /// `parked`, `failed` or `not_subscribed`.
    pub status: &'static str,
    /// Its cursor in the source: everything at or below was handled.
    pub cursor: Option<u64>,
    /// The revision it handled (for `handled`).
    pub revision: Option<u64>,
    /// When it handled it, Unix milliseconds, while it is among the
    /// plugin's most recently handled events.
    pub handled_at_ms: Option<u64>,
    /// Attempts made (for `retrying` and `dead_letter`).
    pub attempts: Option<u32>,
    /// Events ahead of it in the queue (for `queued`), when it is within
    /// the first [`QUEUE_SCAN`].
    pub queue_position: Option<usize>,
    /// The dead letter's id (for `dead_letter`).
    pub dead_letter: Option<u64>,
    /// The error of the last failed attempt, when known.
    pub error: Option<String>,
    /// In a cluster: the replica that owns it (filled in by the admin API).
    pub owner: Option<String>,
}

/// A whole trace: the change and every running plugin.
#[derive(Debug, Clone, Serialize)]
pub struct KeyTrace {
    /// Source name.
    pub source: String,
    /// The key.
    pub key: String,
    /// The change followed.
    pub change: TracedChange,
    /// Every running plugin, in name order.
    pub plugins: Vec<PluginTrace>,
    /// What a trace looks at, at most, per plugin.
    pub limits: TraceLimits,
}

/// The bounds of a trace.
#[derive(Debug, Clone, Serialize)]
pub struct TraceLimits {
    /// Queued events looked at per plugin.
    pub queue_scan: usize,
    /// Newest dead letters looked at per plugin.
    pub dead_letter_scan: usize,
}

/// Why there is no trace.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    /// No such source.
    #[error("no source named {0:?} delivers to this gateway")]
    NoSource(String),
    /// The index has no change of the key.
    #[error("no change of key {key:?} is known in source {source_name:?}")]
    NoKey {
        /// Source.
        source_name: String,
        /// Key.
        key: String,
    },
    /// The revision is not one this key's index can place.
    #[error("{0}")]
    Revision(String),
}

impl Dispatcher {
    /// Where the latest change of `key` in `source` (or its change at
    /// `revision`) stands for every running plugin.
    ///
    /// # Errors
    /// An unknown source or key, or a revision that cannot be placed.
    pub fn trace(
        &self,
        source: &str,
        key: &str,
        revision: Option<u64>,
    ) -> Result<KeyTrace, TraceError> {
        let cache = self
            .caches
            .get(source)
            .map(|c| c.clone())
            .ok_or_else(|| TraceError::NoSource(source.to_owned()))?;
        let change = {
            let keys = cache.keys.lock();
            let entry = keys.map.get(key).ok_or_else(|| TraceError::NoKey {
                source_name: source.to_owned(),
                key: key.to_owned(),
            })?;
            let kind = if entry.value.is_some() {
                "put"
            } else {
                "delete"
            };
            match revision {
                None => TracedChange {
                    kind,
                    revision: entry.revision,
                    position: entry.seq,
                    latest: true,
                },
                Some(r) if r == entry.revision => TracedChange {
                    kind,
                    revision: r,
                    position: entry.seq,
                    latest: true,
                },
                Some(r) if r > entry.revision => {
                    return Err(TraceError::Revision(format!(
                        "revision {r} is newer than the latest change of {key:?} (revision {})",
                        entry.revision
                    )));
                }
                Some(r) if keys.revisioned => TracedChange {
                    // An older change of a source with history: its
                    // position follows from the revision.
                    kind: "put",
                    revision: r,
                    position: r + keys.meta.offset,
                    latest: false,
                },
                Some(r) => {
                    return Err(TraceError::Revision(format!(
                        "revision {r} is not the latest change of {key:?} (revision {}), and \
                         source {source:?} keeps no history to place older ones",
                        entry.revision
                    )));
                }
            }
        };
        let roster = self.roster.load();
        let plugins = roster
            .iter()
            .map(|w| w.trace(source, key, &change))
            .collect();
        Ok(KeyTrace {
            source: source.to_owned(),
            key: key.to_owned(),
            change,
            plugins,
            limits: TraceLimits {
                queue_scan: QUEUE_SCAN,
                dead_letter_scan: LETTER_SCAN,
            },
        })
    }
}

impl Worker {
    /// Where `change` of `key` stands for this plugin.
    fn trace(&self, source: &str, key: &str, change: &TracedChange) -> PluginTrace {
        let spec = self.spec.load();
        let mut t = PluginTrace {
            plugin: self.name.clone(),
            status: "not_subscribed",
            cursor: self.cursor(source),
            revision: None,
            handled_at_ms: None,
            attempts: None,
            queue_position: None,
            dead_letter: None,
            error: None,
            owner: None,
        };
        if !spec.matches(source, key) {
            return t;
        }
        let at = change.position;
        let state = self.state();
        if t.cursor.is_some_and(|c| c >= at) {
            // Handled, or failed on every attempt and kept as a dead letter
            // (which also moves the cursor on).
            if let Some(letter) = self.newest_letter(source, key, at) {
                t.status = "dead_letter";
                t.dead_letter = Some(letter.id);
                t.attempts = Some(letter.attempts);
                t.error = Some(letter.error);
                return t;
            }
            t.status = "handled";
            t.revision = Some(change.revision);
            t.handled_at_ms = self.stats.recent.lock().when(source, key, at);
            return t;
        }
        t.status = match state {
            WorkerState::Parked => "parked",
            WorkerState::Failed => "failed",
            WorkerState::Quarantined => "quarantined",
            _ => "queued",
        };
        if let Some(r) = &*self.stats.retrying.lock()
            && *r.source == *source
            && *r.key == *key
            && r.seq >= at
        {
            t.status = "retrying";
            t.attempts = Some(r.attempts);
        }
        t.queue_position = self.queue.find(source, key, at, QUEUE_SCAN);
        if t.status != "queued" {
            // Why it is held up, when its last failure was on this key.
            t.error = self
                .stats
                .last_failure
                .lock()
                .as_ref()
                .filter(|f| f.key == key)
                .map(|f| f.message.clone());
        }
        t
    }

    /// The newest of this plugin's last [`LETTER_SCAN`] dead letters of
    /// `key` at or after position `at`.
    fn newest_letter(&self, source: &str, key: &str, at: u64) -> Option<crate::store::DeadLetter> {
        if self.store.dead_letter_tally(&self.name).count == 0 {
            return None;
        }
        self.store
            .newest_dead_letters(&self.name, LETTER_SCAN)
            .into_iter()
            .find(|l| l.seq >= at && l.event.source == source && l.event.key == key)
    }
}

/// How far the plugins of one source are behind it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SourceLag {
    /// The highest position the source reached.
    pub position: u64,
    /// Positions the slowest running plugin subscribed to it has not
    /// handled yet (0 when every one is caught up, or none subscribes).
    pub lag: u64,
}

impl Dispatcher {
    /// How far the running plugins of `source` are behind it.
    pub fn source_lag(&self, source: &str) -> SourceLag {
        let position = self.last_position(source);
        let slowest = self
            .roster
            .load()
            .iter()
            .filter(|w| w.takes_from(source))
            .filter_map(|w| w.cursor(source))
            .min();
        SourceLag {
            position,
            lag: slowest.map_or(0, |c| position.saturating_sub(c)),
        }
    }
}
