//! The layout of the store file: its tables, the records kept in them, how
//! those records are encoded, and the layout version.
//!
//! Everything here is on disk, so a change to a table or a record changes
//! the file format and must raise [`SCHEMA`]. This module must not open
//! transactions beyond creating the tables, and must not decide when
//! anything is written (the writer does).

use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::event::EventLine;

/// The layout version written into the store.
pub(super) const SCHEMA: u64 = 1;

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("sources");
pub(super) const KEYS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("keys");
pub(super) const CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("cursors");
pub(super) const PLUGIN_STATE: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("plugin_state");
pub(super) const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("dead_letters");

/// One key of a source as the dispatcher last saw it: the current value, or
/// a tombstone (`value: None`) for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Current value; `None` once deleted.
    pub value: Option<Bytes>,
    /// The source's revision of the last change.
    pub revision: u64,
    /// Position of the last change.
    pub seq: u64,
    /// Source-specific extras of the last put.
    pub metadata: Vec<(String, String)>,
}

/// Per-source bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMeta {
    /// The highest position assigned.
    pub last_seq: u64,
    /// For sources with a revision history: position = revision + offset.
    /// Raised when the store's revisions go back (a replaced cluster).
    pub offset: u64,
    /// Tombstones at or below this position were pruned: a plugin whose
    /// cursor is older restarts from a snapshot.
    pub floor: u64,
    /// What the positions of a source with history refer to (its prefix);
    /// a watch resumes only while it is unchanged.
    pub identity: String,
}

/// An event a plugin failed on after every attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Identifier, unique in the store.
    pub id: u64,
    /// The event.
    pub event: EventLine,
    /// Its position.
    pub seq: u64,
    /// Outcome class of the last attempt.
    pub outcome: String,
    /// Message of the last attempt.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// Seconds since the Unix epoch of the last attempt.
    pub at: u64,
}

/// A [`KeyEntry`] or [`SourceMeta`] as stored, in `buf` (cleared first).
/// A commit encodes every changed key; reusing one buffer spares each the
/// reallocations of a Vec grown from empty.
pub(super) fn encode_into<'a, T: Serialize>(v: &T, buf: &'a mut Vec<u8>) -> &'a [u8] {
    buf.clear();
    *buf = postcard::to_extend(v, std::mem::take(buf)).expect("in-memory encoding cannot fail");
    buf
}

/// A stored [`KeyEntry`] or [`SourceMeta`]; `None` when it does not decode.
pub(super) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

/// A [`DeadLetter`] as stored.
pub(super) fn encode_dead_letter(letter: &DeadLetter) -> Vec<u8> {
    serde_json::to_vec(letter).expect("a dead letter encodes")
}

/// A stored [`DeadLetter`]; `None` when it does not decode.
pub(super) fn decode_dead_letter(bytes: &[u8]) -> Option<DeadLetter> {
    serde_json::from_slice(bytes).ok()
}

/// Create missing tables and the layout version.
pub(super) fn init_tables(db: &Database) -> Result<(), redb::Error> {
    let w = db.begin_write()?;
    {
        let mut meta = w.open_table(META)?;
        if meta.get("schema")?.is_none() {
            let empty = w.list_tables()?.count() <= 1;
            if empty {
                meta.insert("schema", SCHEMA)?;
            }
        }
        w.open_table(SOURCES)?;
        w.open_table(KEYS)?;
        w.open_table(CURSORS)?;
        w.open_table(PLUGIN_STATE)?;
        w.open_table(DEAD_LETTERS)?;
    }
    w.commit()?;
    Ok(())
}
