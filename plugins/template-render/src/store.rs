//! Keys and templates kept in the host's per-plugin state.
//!
//! The state survives instance recycling, so the plugin keeps everything it
//! has seen there rather than in memory. State has only get and set, so the
//! layout adds an index:
//!
//! - `index`: a JSON array of every known key (data and templates), sorted;
//! - `v:KEY`: the value of `KEY` as stored in the source.
//!
//! Writes are ordered so a trap between two of them leaves at worst an
//! unindexed value, which the next put of that key repairs: a put writes the
//! value before the index, a delete updates the index before the value.
//! This module owns that layout; it does not know about templates beyond
//! telling them apart from data.

use std::collections::BTreeSet;
use std::ops::Bound;

use crate::host::Host;
use crate::template::{self, Data};

/// State key of the JSON index of known keys.
const INDEX_KEY: &str = "index";
/// Prefix of the state key holding a source key's value.
const VALUE_PREFIX: &str = "v:";

/// The stored keys, read through a [`Host`].
pub struct Store<'h, H: Host> {
    host: &'h H,
    index: BTreeSet<String>,
}

impl<'h, H: Host> Store<'h, H> {
    /// Loads the index from state; an unset index is empty.
    ///
    /// # Errors
    ///
    /// Fails when the stored index is not a JSON array of strings.
    pub fn load(host: &'h H) -> Result<Self, String> {
        let index = match host.state_get(INDEX_KEY) {
            None => BTreeSet::new(),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("state key {INDEX_KEY:?} is corrupt: {e}"))?,
        };
        Ok(Self { host, index })
    }

    /// Stores `value` under `key` and indexes it.
    ///
    /// # Errors
    ///
    /// The host's message when a state write fails.
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.host.state_set(&value_key(key), Some(value))?;
        if self.index.insert(key.to_owned()) {
            self.save_index()?;
        }
        Ok(())
    }

    /// Forgets `key`. Returns whether it was known.
    ///
    /// # Errors
    ///
    /// The host's message when a state write fails.
    pub fn remove(&mut self, key: &str) -> Result<bool, String> {
        let known = self.index.remove(key);
        if known {
            self.save_index()?;
        }
        self.host.state_set(&value_key(key), None)?;
        Ok(known)
    }

    /// The stored bytes of `key`, data or template.
    pub fn raw(&self, key: &str) -> Option<Vec<u8>> {
        self.host.state_get(&value_key(key))
    }

    /// Every known template key, sorted.
    pub fn templates(&self) -> impl Iterator<Item = &str> {
        self.index
            .iter()
            .map(String::as_str)
            .filter(|k| template::is_template(k))
    }

    fn save_index(&self) -> Result<(), String> {
        let json = serde_json::to_vec(&self.index)
            .map_err(|e| format!("cannot encode the key index: {e}"))?;
        self.host.state_set(INDEX_KEY, Some(&json))
    }
}

impl<H: Host> Data for Store<'_, H> {
    fn get(&self, key: &str) -> Option<String> {
        if template::is_template(key) || !self.index.contains(key) {
            return None;
        }
        self.raw(key)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    fn under(&self, prefix: &str) -> Vec<(String, String)> {
        self.index
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .filter(|k| !template::is_template(k))
            .filter_map(|k| Some((k.clone(), self.get(k)?)))
            .collect()
    }
}

/// State key holding the value of source key `key`.
fn value_key(key: &str) -> String {
    format!("{VALUE_PREFIX}{key}")
}
