//! The one event record every source produces and every plugin receives.
//!
//! Owns the host-side [`Event`] and its conversions to and from JSON lines
//! (the `event-log` format, also accepted by `watchgate plugin test`), the
//! [`EventSink`] through which sources hand events on, and the
//! [`Subscription`] that says which events a plugin receives. Sources,
//! dispatch and the host capabilities all meet here, so it sits below them
//! all: it must not know about any particular source, about plugins'
//! queues or about wasmtime.

use std::num::NonZeroU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Where a source delivers its events. Implemented by the dispatcher; tests
/// use `SourceContext::for_test`.
pub trait EventSink: Send + Sync + 'static {
    /// Deliver a batch of events of one source. The events of one batch are
    /// one atomic step of the source (one revision, one rescan). Must not
    /// block.
    fn deliver(&self, source: &str, events: Vec<Event>);

    /// Deliver the complete current state of the keys for which `scope` is
    /// true, as puts, read at the source's `revision` (a source's initial
    /// snapshot, or one watch's share of it). A sink that remembers an
    /// earlier run of the same source passes on only the difference:
    /// changed keys, and deletes for keys in scope that are gone. The
    /// default treats it as an ordinary batch.
    fn deliver_snapshot(
        &self,
        source: &str,
        scope: &dyn Fn(&str) -> bool,
        revision: u64,
        events: Vec<Event>,
    ) {
        let _ = (scope, revision);
        self.deliver(source, events);
    }
}

/// A sink that hands each batch to a channel: the plugin directory's own
/// watch, and tests of a single source. A snapshot arrives as one batch of
/// puts.
pub struct ChannelSink(pub tokio::sync::mpsc::UnboundedSender<Vec<Event>>);

impl EventSink for ChannelSink {
    fn deliver(&self, _source: &str, events: Vec<Event>) {
        // A closed receiver means its reader stopped; nothing waits for these.
        let _ = self.0.send(events);
    }
}

/// One `[[subscribe]]`: events of `source` whose key starts with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// A source name from the gateway config.
    pub source: String,
    /// Key prefix; empty matches every key.
    #[serde(default)]
    pub prefix: String,
}

impl Subscription {
    /// Whether the key `key` of `source` falls under this subscription.
    pub fn matches(&self, source: &str, key: &str) -> bool {
        self.source == source && key.starts_with(&self.prefix)
    }

    /// Whether a plugin with `subscriptions` receives `key` of `source`:
    /// an empty list receives everything.
    pub fn any_matches(subscriptions: &[Subscription], source: &str, key: &str) -> bool {
        subscriptions.is_empty() || subscriptions.iter().any(|s| s.matches(source, key))
    }

    /// Whether a plugin with `subscriptions` receives anything of `source`.
    pub fn any_covers(subscriptions: &[Subscription], source: &str) -> bool {
        subscriptions.is_empty() || subscriptions.iter().any(|s| s.source == source)
    }
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The key was created or its value changed.
    Put,
    /// The key was removed.
    Delete,
}

impl EventKind {
    /// The lowercase name used in logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Put => "put",
            EventKind::Delete => "delete",
        }
    }
}

/// A source's extras of one event (etcd's revisions and lease, Nacos's
/// md5, the fencing token): a thin list, one pointer in the event and no
/// allocation when empty, as it is for most sources.
pub type Metadata = thin_vec::ThinVec<(String, String)>;

/// When the dispatcher took an event from its source, in one word:
/// nanoseconds since the first stamp of the process, plus one (so an
/// absent stamp costs no extra word either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(NonZeroU64);

impl Stamp {
    fn base() -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    /// Now.
    pub fn now() -> Stamp {
        let base = Self::base();
        let nanos = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        Stamp(NonZeroU64::MIN.saturating_add(nanos))
    }

    /// The time from this stamp to `later` (zero if `later` is earlier).
    pub fn until(self, later: Stamp) -> Duration {
        Duration::from_nanos(later.0.get().saturating_sub(self.0.get()))
    }
}

/// One change of one key in one source.
///
/// Every event crosses from the source's thread to each plugin's worker,
/// so its size is cache lines moved per event: the rare fields take a word
/// each (see the test `an_event_fits_in_144_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Name of the source in the gateway config.
    pub source: Arc<str>,
    /// Put or delete.
    pub kind: EventKind,
    /// The key, relative to the source. Shared with the source's key
    /// index, so queueing an event copies no key.
    pub key: Arc<str>,
    /// The new value; `None` on delete.
    pub value: Option<Bytes>,
    /// The value before this change, when the source knows it.
    pub prev_value: Option<Bytes>,
    /// The source's revision of this change.
    pub revision: u64,
    /// Synthesized by a relist rather than observed.
    pub resync: bool,
    /// How many later changes of this key were folded into this event.
    pub coalesced: u32,
    /// Source-specific extras.
    pub metadata: Metadata,
    /// Position in the source's durable log, assigned by the dispatcher
    /// (0: not tracked, as for a replayed dead letter). Plugin cursors count
    /// in positions.
    pub seq: u64,
    /// The dead letter this event replays, if it is one (dead letters
    /// are numbered from 1).
    pub dead_letter: Option<NonZeroU64>,
    /// When the dispatcher took it from its source, for the queueing
    /// latency a benchmark observes (`Dispatcher::set_observer`); set only
    /// while one does.
    pub delivered_at: Option<Stamp>,
}

impl Event {
    /// A put of `value` at `revision`.
    pub fn put(source: &Arc<str>, key: impl Into<Arc<str>>, value: Bytes, revision: u64) -> Self {
        Event::new(source, EventKind::Put, key.into(), Some(value), revision)
    }

    /// A delete at `revision`.
    pub fn delete(source: &Arc<str>, key: impl Into<Arc<str>>, revision: u64) -> Self {
        Event::new(source, EventKind::Delete, key.into(), None, revision)
    }

    fn new(
        source: &Arc<str>,
        kind: EventKind,
        key: Arc<str>,
        value: Option<Bytes>,
        revision: u64,
    ) -> Self {
        Event {
            source: source.clone(),
            kind,
            key,
            value,
            prev_value: None,
            revision,
            resync: false,
            coalesced: 0,
            metadata: Metadata::new(),
            seq: 0,
            dead_letter: None,
            delivered_at: None,
        }
    }

    /// Sets the previous value.
    pub fn with_prev(mut self, prev: Option<Bytes>) -> Self {
        self.prev_value = prev;
        self
    }

    /// Fold a later change of the same key into this one: the later kind and
    /// value win, the earliest previous value is kept, and `coalesced` counts
    /// every folded change.
    pub fn absorb(&mut self, later: Event) {
        debug_assert_eq!(self.key, later.key);
        self.kind = later.kind;
        self.value = later.value;
        self.revision = self.revision.max(later.revision);
        self.seq = self.seq.max(later.seq);
        self.resync |= later.resync;
        self.coalesced = self
            .coalesced
            .saturating_add(1)
            .saturating_add(later.coalesced);
        self.metadata = later.metadata;
    }

    /// Approximate heap size, for queue accounting.
    pub fn weight(&self) -> usize {
        self.key.len()
            + self.value.as_ref().map_or(0, Bytes::len)
            + self.prev_value.as_ref().map_or(0, Bytes::len)
            + self
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// The JSON line form (see [`EventLine`]).
    pub fn to_line(&self) -> EventLine {
        let (value, value_b64) = split_utf8(self.value.as_ref());
        let (prev_value, prev_value_b64) = split_utf8(self.prev_value.as_ref());
        EventLine {
            source: self.source.to_string(),
            kind: self.kind,
            key: self.key.to_string(),
            value,
            value_b64,
            prev_value,
            prev_value_b64,
            revision: self.revision,
            resync: self.resync,
            coalesced: self.coalesced,
            metadata: self.metadata.to_vec(),
        }
    }
}

fn split_utf8(bytes: Option<&Bytes>) -> (Option<String>, Option<String>) {
    match bytes {
        None => (None, None),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => (Some(s.to_owned()), None),
            Err(_) => (None, Some(B64.encode(b))),
        },
    }
}

/// An event as one JSON object: values as UTF-8 strings, or base64 in the
/// `*_b64` field when they are not UTF-8. This is the format `event-log`
/// writes and `watchgate plugin test --events` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLine {
    /// Source name.
    #[serde(default = "default_line_source")]
    pub source: String,
    /// `put` or `delete`.
    pub kind: EventKind,
    /// The key.
    pub key: String,
    /// UTF-8 value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Base64 value, for values that are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_b64: Option<String>,
    /// UTF-8 previous value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_value: Option<String>,
    /// Base64 previous value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_value_b64: Option<String>,
    /// Revision.
    #[serde(default)]
    pub revision: u64,
    /// Synthesized by a relist.
    #[serde(default)]
    pub resync: bool,
    /// Folded changes.
    #[serde(default)]
    pub coalesced: u32,
    /// Source-specific extras.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<(String, String)>,
}

fn default_line_source() -> String {
    "test".to_owned()
}

/// A JSON line could not be turned into an event.
#[derive(Debug, thiserror::Error)]
pub enum EventLineError {
    /// Both the UTF-8 and base64 forms of one value were given.
    #[error("both `{0}` and `{0}_b64` are set; give one")]
    BothForms(&'static str),
    /// A base64 value did not decode.
    #[error("`{field}` is not valid base64: {source}")]
    Base64 {
        /// The offending field.
        field: &'static str,
        /// The decoder's complaint.
        source: base64::DecodeError,
    },
}

fn join_utf8(
    field: &'static str,
    text: Option<String>,
    b64: Option<String>,
) -> Result<Option<Bytes>, EventLineError> {
    match (text, b64) {
        (Some(_), Some(_)) => Err(EventLineError::BothForms(field)),
        (Some(s), None) => Ok(Some(Bytes::from(s))),
        (None, Some(b)) => B64
            .decode(b)
            .map(|v| Some(Bytes::from(v)))
            .map_err(|source| EventLineError::Base64 { field, source }),
        (None, None) => Ok(None),
    }
}

impl TryFrom<EventLine> for Event {
    type Error = EventLineError;

    fn try_from(line: EventLine) -> Result<Self, Self::Error> {
        Ok(Event {
            source: Arc::from(line.source),
            kind: line.kind,
            key: Arc::from(line.key),
            value: join_utf8("value", line.value, line.value_b64)?,
            prev_value: join_utf8("prev_value", line.prev_value, line.prev_value_b64)?,
            revision: line.revision,
            resync: line.resync,
            coalesced: line.coalesced,
            metadata: line.metadata.into(),
            seq: 0,
            dead_letter: None,
            delivered_at: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_fits_in_144_bytes() {
        // Two and a quarter cache lines; every added word is moved between
        // cores once per event and plugin.
        assert!(
            std::mem::size_of::<Event>() <= 144,
            "{} bytes",
            std::mem::size_of::<Event>()
        );
    }

    #[test]
    fn a_stamp_measures_forward_and_never_negative() {
        let a = Stamp::now();
        std::thread::sleep(Duration::from_millis(2));
        let b = Stamp::now();
        assert!(a.until(b) >= Duration::from_millis(2));
        assert_eq!(b.until(a), Duration::ZERO);
    }

    #[test]
    fn a_subscription_matches_its_source_under_its_prefix() {
        let s = Subscription {
            source: "main".into(),
            prefix: "/app/".into(),
        };
        assert!(s.matches("main", "/app/x"));
        assert!(!s.matches("main", "/other/x"));
        assert!(!s.matches("side", "/app/x"));
        let every_key = Subscription {
            source: "main".into(),
            prefix: String::new(),
        };
        assert!(every_key.matches("main", ""));
    }

    #[test]
    fn json_line_round_trips_binary_and_text_values() {
        let src: Arc<str> = Arc::from("local");
        let e = Event::put(&src, "a/b", Bytes::from_static(&[0xff, 0x00]), 7)
            .with_prev(Some(Bytes::from_static(b"old")));
        let line = e.to_line();
        assert_eq!(line.value, None);
        assert_eq!(line.value_b64.as_deref(), Some("/wA="));
        assert_eq!(line.prev_value.as_deref(), Some("old"));
        let json = serde_json::to_string(&line).unwrap();
        let back: EventLine = serde_json::from_str(&json).unwrap();
        assert_eq!(Event::try_from(back).unwrap(), e);
    }

    #[test]
    fn absorb_keeps_earliest_prev_and_counts() {
        let src: Arc<str> = Arc::from("s");
        let mut first = Event::put(&src, "k", Bytes::from_static(b"1"), 1)
            .with_prev(Some(Bytes::from_static(b"0")));
        first.absorb(Event::put(&src, "k", Bytes::from_static(b"2"), 2));
        first.absorb(Event::delete(&src, "k", 3));
        assert_eq!(first.kind, EventKind::Delete);
        assert_eq!(first.value, None);
        assert_eq!(first.prev_value.as_deref(), Some(&b"0"[..]));
        assert_eq!(first.revision, 3);
        assert_eq!(first.coalesced, 2);
    }
}
