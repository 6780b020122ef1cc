//! The live tail: every delivered change, with the plugins it was queued
//! for, offered to whoever watches (`/v1/events/stream`).
//!
//! Owns the broadcast channel and what goes into it. Publishing must never
//! block or slow a delivery: with nobody watching it costs one atomic
//! read; otherwise each change is a small record sent on a bounded
//! channel that overwrites the oldest record when a reader falls behind
//! (the reader is told how many it missed). It must not hold events.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::broadcast;

use super::Dispatcher;
use super::worker::Worker;
use crate::event::{Event, EventKind};

/// Records a slow reader may fall behind by before it misses some.
pub const TAIL_CAPACITY: usize = 1024;

/// One change as the live tail shows it.
#[derive(Debug, Clone)]
pub struct TailEvent {
    /// Source name.
    pub source: Arc<str>,
    /// Put or delete.
    pub kind: EventKind,
    /// The key.
    pub key: Arc<str>,
    /// The source's revision of the change.
    pub revision: u64,
    /// The new value (shown only where the operator allows it).
    pub value: Option<Bytes>,
    /// Plugins it was queued for.
    pub plugins: Vec<String>,
    /// When the dispatcher took it, Unix milliseconds.
    pub at_ms: u64,
}

/// The sending side, kept by the dispatcher.
pub(super) type TailSender = broadcast::Sender<Arc<TailEvent>>;

/// A new tail channel.
pub(super) fn channel() -> TailSender {
    broadcast::channel(TAIL_CAPACITY).0
}

impl Dispatcher {
    /// Watch every change delivered from now on.
    pub fn tail(&self) -> broadcast::Receiver<Arc<TailEvent>> {
        self.tail.subscribe()
    }

    /// Offer `events` of `source` to the watchers, with the plugins among
    /// `takers` that receive each. Nothing happens when nobody watches.
    pub(super) fn publish_tail<'a>(
        &self,
        source: &str,
        events: &[Event],
        takers: impl Iterator<Item = &'a Arc<Worker>> + Clone,
    ) {
        if self.tail.receiver_count() == 0 {
            return;
        }
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for e in events {
            let plugins = takers
                .clone()
                .filter(|w| w.spec.load().matches(source, &e.key))
                .map(|w| w.name.clone())
                .collect();
            // An error only means every watcher went away meanwhile.
            let _ = self.tail.send(Arc::new(TailEvent {
                source: e.source.clone(),
                kind: e.kind,
                key: e.key.clone(),
                revision: e.revision,
                value: e.value.clone(),
                plugins,
                at_ms,
            }));
        }
    }
}
