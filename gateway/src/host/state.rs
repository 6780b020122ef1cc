//! The `state` capability: a small per-plugin key/value store kept by the
//! host.
//!
//! Owns the map and its quota. It outlives instances (a trap recycles the
//! instance, not the state), plugin replacement and, when durable, the
//! process: every change is written through to the [`Store`], and a durable
//! state starts from what the store holds.

use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::store::Store;

/// Most keys one plugin may keep.
pub const MAX_KEYS: usize = 10_000;
/// Most bytes (keys plus values) one plugin may keep.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// One plugin's state.
#[derive(Debug, Default)]
pub struct PluginState {
    map: DashMap<String, Vec<u8>>,
    bytes: Mutex<usize>,
    durable: Option<(Arc<Store>, String)>,
}

impl PluginState {
    /// The state of `plugin`, loaded from and written through to `store`.
    pub fn durable(store: Arc<Store>, plugin: &str) -> PluginState {
        let map = DashMap::new();
        let mut bytes = 0;
        for (k, v) in store.plugin_state(plugin) {
            bytes += k.len() + v.len();
            map.insert(k, v);
        }
        PluginState {
            map,
            bytes: Mutex::new(bytes),
            durable: Some((store, plugin.to_owned())),
        }
    }

    fn persist(&self, key: &str, value: Option<&[u8]>) {
        if let Some((store, plugin)) = &self.durable {
            store.set_plugin_state(plugin, key, value);
        }
    }

    /// Read a key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).map(|v| v.clone())
    }

    /// Set (`Some`) or remove (`None`) a key.
    ///
    /// # Errors
    /// A message when the quota would be exceeded.
    pub fn set(&self, key: String, value: Option<Vec<u8>>) -> Result<(), String> {
        let mut bytes = self.bytes.lock();
        let old = self.map.get(&key).map_or(0, |v| key.len() + v.len());
        match value {
            None => {
                if self.map.remove(&key).is_some() {
                    *bytes -= old;
                    self.persist(&key, None);
                }
                Ok(())
            }
            Some(v) => {
                let new = key.len() + v.len();
                let total = *bytes - old + new;
                if total > MAX_BYTES {
                    return Err(format!(
                        "state quota exceeded: {total} bytes > {MAX_BYTES} bytes"
                    ));
                }
                if old == 0 && !self.map.contains_key(&key) && self.map.len() >= MAX_KEYS {
                    return Err(format!("state quota exceeded: more than {MAX_KEYS} keys"));
                }
                self.persist(&key, Some(&v));
                self.map.insert(key, v);
                *bytes = total;
                Ok(())
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No keys?
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove_and_quota() {
        let s = PluginState::default();
        s.set("a".into(), Some(b"1".to_vec())).unwrap();
        assert_eq!(s.get("a"), Some(b"1".to_vec()));
        s.set("a".into(), None).unwrap();
        assert_eq!(s.get("a"), None);
        assert!(s.set("big".into(), Some(vec![0; MAX_BYTES])).is_err());
        s.set("k".into(), Some(vec![0; MAX_BYTES / 2])).unwrap();
        s.set("k".into(), Some(vec![0; MAX_BYTES / 2])).unwrap();
        assert_eq!(*s.bytes.lock(), 1 + MAX_BYTES / 2);
    }

    #[test]
    fn durable_state_survives_a_new_instance() {
        let store = Arc::new(Store::in_memory());
        let s = PluginState::durable(store.clone(), "p");
        s.set("a".into(), Some(b"1".to_vec())).unwrap();
        s.set("b".into(), Some(b"2".to_vec())).unwrap();
        s.set("b".into(), None).unwrap();
        store.flush();
        let again = PluginState::durable(store, "p");
        assert_eq!(again.get("a"), Some(b"1".to_vec()));
        assert_eq!(again.get("b"), None);
        assert_eq!(*again.bytes.lock(), 2);
    }
}
