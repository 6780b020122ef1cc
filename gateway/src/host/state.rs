//! The `state` capability: a small per-plugin key/value store kept by the
//! host.
//!
//! Owns the map and its quota. It outlives instances (a trap recycles the
//! instance, not the state), plugin replacement and, when durable, the
//! process: every change is written through to the [`Store`], and a durable
//! state starts from what the store holds. The store bounds the writes one
//! plugin may have waiting for its writer; a change that finds no room
//! waits as long as the caller allows and is refused after that, leaving
//! the map as it was.

use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::store::Store;

/// Most keys one plugin may keep.
pub const MAX_KEYS: usize = 10_000;
/// Most bytes (keys plus values) one plugin may keep.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// A refused change: the outcome to count (`quota` or `busy`) and the
/// message for the plugin.
pub type Refused = (&'static str, String);

/// How an accepted change went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    /// At once.
    Now,
    /// After waiting for the store to commit earlier writes of the plugin.
    AfterWait,
}

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

    /// Write a change through to the store, waiting until `until` for
    /// room; true when it had to wait.
    fn persist(&self, key: &str, value: Option<&[u8]>, until: Instant) -> Result<bool, Refused> {
        let Some((store, plugin)) = &self.durable else {
            return Ok(false);
        };
        match store.set_plugin_state(plugin, key, value, until) {
            Ok(queued) => Ok(queued.waited),
            Err(busy) => Err(("busy", busy.to_string())),
        }
    }

    /// Read a key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map.get(key).map(|v| v.clone())
    }

    /// Set (`Some`) or remove (`None`) a key, waiting until `until` when
    /// the store has as many of this plugin's writes waiting as it takes.
    ///
    /// # Errors
    /// `quota` when the quota would be exceeded, `busy` when the store had
    /// no room by `until`; either way nothing changed.
    pub fn set(&self, key: String, value: Option<Vec<u8>>, until: Instant) -> Result<Set, Refused> {
        let mut bytes = self.bytes.lock();
        let old = self.map.get(&key).map_or(0, |v| key.len() + v.len());
        let waited = match value {
            None => {
                if !self.map.contains_key(&key) {
                    return Ok(Set::Now);
                }
                let waited = self.persist(&key, None, until)?;
                self.map.remove(&key);
                *bytes -= old;
                waited
            }
            Some(v) => {
                let new = key.len() + v.len();
                let total = *bytes - old + new;
                if total > MAX_BYTES {
                    return Err((
                        "quota",
                        format!("state quota exceeded: {total} bytes > {MAX_BYTES} bytes"),
                    ));
                }
                if !self.map.contains_key(&key) && self.map.len() >= MAX_KEYS {
                    return Err((
                        "quota",
                        format!("state quota exceeded: more than {MAX_KEYS} keys"),
                    ));
                }
                let waited = self.persist(&key, Some(&v), until)?;
                self.map.insert(key, v);
                *bytes = total;
                waited
            }
        };
        Ok(if waited { Set::AfterWait } else { Set::Now })
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
    use std::time::Duration;

    use super::*;
    use crate::store::MAX_PENDING_BYTES;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn set_get_remove_and_quota() {
        let s = PluginState::default();
        s.set("a".into(), Some(b"1".to_vec()), soon()).unwrap();
        assert_eq!(s.get("a"), Some(b"1".to_vec()));
        s.set("a".into(), None, soon()).unwrap();
        assert_eq!(s.get("a"), None);
        let (outcome, message) = s
            .set("big".into(), Some(vec![0; MAX_BYTES]), soon())
            .unwrap_err();
        assert_eq!(outcome, "quota");
        assert!(message.contains("state quota exceeded"), "{message}");
        s.set("k".into(), Some(vec![0; MAX_BYTES / 2]), soon())
            .unwrap();
        s.set("k".into(), Some(vec![0; MAX_BYTES / 2]), soon())
            .unwrap();
        assert_eq!(*s.bytes.lock(), 1 + MAX_BYTES / 2);
    }

    #[test]
    fn durable_state_survives_a_new_instance() {
        let store = Arc::new(Store::in_memory());
        let s = PluginState::durable(store.clone(), "p");
        s.set("a".into(), Some(b"1".to_vec()), soon()).unwrap();
        s.set("b".into(), Some(b"2".to_vec()), soon()).unwrap();
        s.set("b".into(), None, soon()).unwrap();
        store.flush();
        let again = PluginState::durable(store, "p");
        assert_eq!(again.get("a"), Some(b"1".to_vec()));
        assert_eq!(again.get("b"), None);
        assert_eq!(*again.bytes.lock(), 2);
    }

    #[test]
    fn a_change_the_store_has_no_room_for_is_refused_and_leaves_the_map() {
        let store = Arc::new(Store::in_memory());
        let s = PluginState::durable(store.clone(), "p");
        // Two values that do not fit the store's queue together: the second
        // is refused at once (no time to wait) unless the writer took the
        // first meanwhile, which it does only after gathering for a while.
        let half = MAX_PENDING_BYTES / 2 + 1;
        let mut refused = None;
        for round in 0..1_000u32 {
            let byte = (round % 250) as u8;
            s.set("a".into(), Some(vec![byte; half]), soon()).unwrap();
            let before = s.get("b");
            match s.set("b".into(), Some(vec![byte; half]), Instant::now()) {
                Ok(_) => assert_eq!(s.get("b"), Some(vec![byte; half])),
                Err(e) => {
                    assert_eq!(s.get("b"), before, "a refused change reached the map");
                    refused = Some(e);
                    break;
                }
            }
        }
        let (outcome, message) = refused.expect("no change was refused in 1000 rounds");
        assert_eq!(outcome, "busy");
        assert!(
            message.contains("waiting for the state store")
                && message.contains(&format!("{MAX_PENDING_BYTES} bytes may wait")),
            "{message}"
        );
        // Given time, the same change waits for the writer and is made.
        let b = vec![7; half];
        s.set("b".into(), Some(b.clone()), soon()).unwrap();
        store.flush();
        let again = PluginState::durable(store, "p");
        assert_eq!(again.get("b"), Some(b));
    }
}
