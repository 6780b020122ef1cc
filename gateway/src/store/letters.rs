//! Dead letters in the store: each plugin's letters held within a count and
//! a byte cap, and read a page at a time.
//!
//! The store keeps, in memory, the id and stored size of every dead letter
//! of every plugin, so a cap is enforced, and a plugin's letters counted or
//! forgotten, without reading a letter back. Adding a letter past a cap
//! drops the oldest ones (a letter larger than the whole byte cap is not
//! kept at all) and says what it dropped; whether to log or count that is
//! the caller's business. This module must not decide the caps: the
//! dispatcher passes each plugin's.

use std::collections::{BTreeMap, HashMap};

use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;

use super::schema::{DEAD_LETTERS, decode_dead_letter, encode_dead_letter};
use super::writer::Op;
use super::{DeadLetter, Store, now_secs};

/// How many dead letters one plugin may keep, and how many bytes of them
/// (as stored: the event, its values, the error and the bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterCap {
    /// Most letters kept.
    pub count: u64,
    /// Most bytes kept.
    pub bytes: u64,
}

impl Default for DeadLetterCap {
    fn default() -> Self {
        DeadLetterCap {
            count: 1000,
            bytes: 16 << 20,
        }
    }
}

/// A number of dead letters and their stored bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LetterTally {
    /// Letters.
    pub count: u64,
    /// Their stored bytes.
    pub bytes: u64,
}

/// What [`Store::add_dead_letter`] did.
#[derive(Debug, Clone)]
pub struct AddedLetter {
    /// The letter, with its id and time.
    pub letter: DeadLetter,
    /// False when the letter alone is over the byte cap (or the count cap
    /// is 0): it was dropped instead of the older ones.
    pub kept: bool,
    /// The letters dropped to stay within the caps (this one included when
    /// it was not kept).
    pub dropped: LetterTally,
}

/// One page of a plugin's dead letters, oldest first.
#[derive(Debug, Clone, Default)]
pub struct LetterPage {
    /// The letters.
    pub letters: Vec<DeadLetter>,
    /// When more letters follow: the id to read on from (the last one
    /// read).
    pub next_after: Option<u64>,
}

/// The ids and stored sizes of one plugin's dead letters, oldest (lowest
/// id) first.
#[derive(Debug, Default)]
pub(super) struct Letters {
    sizes: BTreeMap<u64, u64>,
    bytes: u64,
}

impl Letters {
    fn tally(&self) -> LetterTally {
        LetterTally {
            count: self.sizes.len() as u64,
            bytes: self.bytes,
        }
    }

    fn insert(&mut self, id: u64, size: u64) {
        if let Some(old) = self.sizes.insert(id, size) {
            self.bytes -= old;
        }
        self.bytes += size;
    }

    fn remove(&mut self, id: u64) -> Option<u64> {
        let size = self.sizes.remove(&id)?;
        self.bytes -= size;
        Some(size)
    }

    /// Drop the oldest letters until `cap` holds; returns their ids and
    /// what they were.
    fn trim(&mut self, cap: DeadLetterCap) -> (Vec<u64>, LetterTally) {
        let mut ids = Vec::new();
        let mut dropped = LetterTally::default();
        while self.sizes.len() as u64 > cap.count || self.bytes > cap.bytes {
            let Some((id, size)) = self.sizes.pop_first() else {
                break;
            };
            self.bytes -= size;
            ids.push(id);
            dropped.count += 1;
            dropped.bytes += size;
        }
        (ids, dropped)
    }
}

/// Every plugin's [`Letters`], by plugin.
pub(super) type LetterIndex = HashMap<String, Letters>;

/// Read the ids and sizes of every stored dead letter; also the next free
/// id.
pub(super) fn load_index(db: &Database) -> Result<(LetterIndex, u64), redb::Error> {
    let r = db.begin_read()?;
    let t = r.open_table(DEAD_LETTERS)?;
    let mut index = LetterIndex::new();
    let mut max = 0;
    for item in t.iter()? {
        let (k, v) = item?;
        let (plugin, id) = k.value();
        max = max.max(id);
        index
            .entry(plugin.to_owned())
            .or_default()
            .insert(id, v.value().len() as u64);
    }
    Ok((index, max + 1))
}

impl Store {
    /// Record a new dead letter of `plugin`, keeping its letters within
    /// `cap`: the oldest are dropped to make room, and a letter over the
    /// whole byte cap is dropped itself.
    pub fn add_dead_letter(
        &self,
        plugin: &str,
        mut letter: DeadLetter,
        cap: DeadLetterCap,
    ) -> AddedLetter {
        letter.id = self
            .next_dead_letter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        letter.at = now_secs();
        let bytes = encode_dead_letter(&letter);
        let size = bytes.len() as u64;
        // Under the lock, so the writer gets each plugin's inserts and
        // removals in the order the index made them.
        let mut index = self.letters.lock();
        let letters = index.entry(plugin.to_owned()).or_default();
        if cap.count == 0 || size > cap.bytes {
            return AddedLetter {
                letter,
                kept: false,
                dropped: LetterTally {
                    count: 1,
                    bytes: size,
                },
            };
        }
        letters.insert(letter.id, size);
        self.send(Op::DeadLetter(plugin.to_owned(), letter.id, Some(bytes)));
        let (ids, dropped) = letters.trim(cap);
        for id in ids {
            self.send(Op::DeadLetter(plugin.to_owned(), id, None));
        }
        AddedLetter {
            letter,
            kept: true,
            dropped,
        }
    }

    /// Drop the oldest dead letters of `plugin` until `cap` holds (a
    /// lowered cap, or letters kept before caps); returns what was dropped.
    pub fn trim_dead_letters(&self, plugin: &str, cap: DeadLetterCap) -> LetterTally {
        let mut index = self.letters.lock();
        let Some(letters) = index.get_mut(plugin) else {
            return LetterTally::default();
        };
        let (ids, dropped) = letters.trim(cap);
        for id in ids {
            self.send(Op::DeadLetter(plugin.to_owned(), id, None));
        }
        dropped
    }

    /// How many dead letters `plugin` has, and their stored bytes.
    pub fn dead_letter_tally(&self, plugin: &str) -> LetterTally {
        self.letters
            .lock()
            .get(plugin)
            .map(Letters::tally)
            .unwrap_or_default()
    }

    /// Forget a dead letter (replayed successfully, or deleted). Nothing
    /// happens when it is already gone (dropped by a cap meanwhile).
    pub fn remove_dead_letter(&self, plugin: &str, id: u64) {
        let mut index = self.letters.lock();
        if let Some(letters) = index.get_mut(plugin)
            && letters.remove(id).is_some()
        {
            self.send(Op::DeadLetter(plugin.to_owned(), id, None));
        }
    }

    /// Forget every dead letter of `plugin`; returns how many there were.
    pub fn clear_dead_letters(&self, plugin: &str) -> u64 {
        let mut index = self.letters.lock();
        let Some(letters) = index.remove(plugin) else {
            return 0;
        };
        for id in letters.sizes.keys() {
            self.send(Op::DeadLetter(plugin.to_owned(), *id, None));
        }
        letters.sizes.len() as u64
    }

    /// Every dead letter of `plugin`, oldest first.
    pub fn dead_letters(&self, plugin: &str) -> Vec<DeadLetter> {
        self.dead_letter_page(plugin, 0, usize::MAX, usize::MAX)
            .letters
    }

    /// The dead letters of `plugin` with ids above `after`, oldest first:
    /// at most `limit`, and at most `max_bytes` as stored (but one letter at
    /// least, however large). Only the page is read.
    pub fn dead_letter_page(
        &self,
        plugin: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> LetterPage {
        let Some(from) = after.checked_add(1) else {
            return LetterPage::default();
        };
        self.read(|r| {
            let t = r.open_table(DEAD_LETTERS)?;
            let mut page = LetterPage::default();
            let (mut read, mut bytes, mut last) = (0usize, 0usize, None);
            for item in t.range((plugin, from)..=(plugin, u64::MAX))? {
                let (k, v) = item?;
                let size = v.value().len();
                if read >= limit || (read > 0 && bytes.saturating_add(size) > max_bytes) {
                    page.next_after = last;
                    break;
                }
                read += 1;
                bytes = bytes.saturating_add(size);
                last = Some(k.value().1);
                if let Some(d) = decode_dead_letter(v.value()) {
                    page.letters.push(d);
                }
            }
            Ok(page)
        })
        .unwrap_or_default()
    }

    /// The newest `limit` dead letters of `plugin`, newest first (only
    /// they are read).
    pub fn newest_dead_letters(&self, plugin: &str, limit: usize) -> Vec<DeadLetter> {
        self.read(|r| {
            let t = r.open_table(DEAD_LETTERS)?;
            let mut out = Vec::new();
            for item in t.range((plugin, 0)..=(plugin, u64::MAX))?.rev().take(limit) {
                let (_, v) = item?;
                out.extend(decode_dead_letter(v.value()));
            }
            Ok(out)
        })
        .unwrap_or_default()
    }
}
