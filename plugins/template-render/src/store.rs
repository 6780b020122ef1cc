//! Keys and templates kept in the host's per-plugin state.
//!
//! The state survives instance recycling, so the plugin keeps everything it
//! has seen there rather than in memory. State has only get and set, so the
//! layout adds an index:
//!
//! - `index`: a JSON array of every known key (data and templates), sorted;
//! - `v:KEY`: the value of `KEY` as stored in the source;
//! - `d:TEMPLATE`: what the last render of `TEMPLATE` read (JSON
//!   [`Deps`]), so a data change re-renders only the templates it can
//!   affect.
//!
//! Writes are ordered so a trap between two of them leaves at worst an
//! unindexed value, which the next put of that key repairs: a put writes the
//! value before the index, a delete updates the index before the value.
//! This module owns that layout; it does not know about templates beyond
//! telling them apart from data.

use std::collections::{BTreeMap, BTreeSet};

use crate::host::Host;
use crate::template::{self, Data, Deps};

/// State key of the JSON index of known keys.
const INDEX_KEY: &str = "index";
/// Prefix of the state key holding a source key's value.
const VALUE_PREFIX: &str = "v:";
/// Prefix of the state key holding what a template's last render read.
const DEPS_PREFIX: &str = "d:";

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

    /// Every known key (data and templates) with its value, in key order.
    pub fn all(&self) -> BTreeMap<String, Vec<u8>> {
        self.index
            .iter()
            .filter_map(|k| Some((k.clone(), self.raw(k)?)))
            .collect()
    }

    /// The data keys with their values as text, as templates see them.
    pub fn data(&self) -> Data {
        self.index
            .iter()
            .filter(|k| !template::is_template(k))
            .filter_map(|k| {
                let v = self.raw(k)?;
                Some((k.clone(), String::from_utf8_lossy(&v).into_owned()))
            })
            .collect()
    }

    /// What the last render of template `tmpl` read; `None` before its
    /// first render (or when the record is unreadable).
    pub fn deps(&self, tmpl: &str) -> Option<Deps> {
        let bytes = self.host.state_get(&format!("{DEPS_PREFIX}{tmpl}"))?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records what the last render of `tmpl` read (`None`: forget it).
    ///
    /// # Errors
    ///
    /// The host's message when the state write fails.
    pub fn set_deps(&self, tmpl: &str, deps: Option<&Deps>) -> Result<(), String> {
        let json = deps
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| format!("cannot encode dependencies: {e}"))?;
        self.host
            .state_set(&format!("{DEPS_PREFIX}{tmpl}"), json.as_deref())
    }

    fn save_index(&self) -> Result<(), String> {
        let json = serde_json::to_vec(&self.index)
            .map_err(|e| format!("cannot encode the key index: {e}"))?;
        self.host.state_set(INDEX_KEY, Some(&json))
    }
}

/// State key holding the value of source key `key`.
fn value_key(key: &str) -> String {
    format!("{VALUE_PREFIX}{key}")
}
