//! The open connections of a loopback test server, each resettable, so a
//! test can abort them all and wait until they are closed. Shared by the
//! fault proxy and the fake servers; it must not know what they serve.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long [`ConnRegistry::reset_all`] waits for connections to close.
const RESET_DEADLINE: Duration = Duration::from_secs(10);

/// Open connections, each with the sender that resets it (taken once used).
#[derive(Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, Option<oneshot::Sender<()>>>,
}

/// Every open connection of one server. The lock is never held across an
/// `.await`.
#[derive(Default)]
pub struct ConnRegistry {
    conns: Mutex<Conns>,
    /// Notified whenever a connection leaves `conns`.
    closed: Condvar,
}

/// A connection's place in the registry; dropping it (after the socket is
/// closed) removes the entry and wakes [`ConnRegistry::reset_all`].
pub struct Registered {
    registry: Arc<ConnRegistry>,
    id: u64,
}

impl ConnRegistry {
    /// A new, empty registry.
    pub fn new() -> Arc<ConnRegistry> {
        Arc::default()
    }

    /// Record a connection that `reset` aborts.
    pub fn register(self: &Arc<Self>, reset: oneshot::Sender<()>) -> Registered {
        let mut conns = self.conns.lock().expect("connections lock");
        let id = conns.next_id;
        conns.next_id += 1;
        conns.open.insert(id, Some(reset));
        Registered {
            registry: self.clone(),
            id,
        }
    }

    /// Reset every connection open now and wait until they are closed;
    /// panics naming `server` if they are not within the deadline.
    pub fn reset_all(&self, server: &str) {
        let mut conns = self.conns.lock().expect("connections lock");
        let ids: Vec<u64> = conns.open.keys().copied().collect();
        for reset in conns.open.values_mut() {
            if let Some(reset) = reset.take() {
                let _ = reset.send(());
            }
        }
        let (conns, timeout) = self
            .closed
            .wait_timeout_while(conns, RESET_DEADLINE, |c| {
                ids.iter().any(|id| c.open.contains_key(id))
            })
            .expect("connections lock");
        drop(conns);
        assert!(
            !timeout.timed_out(),
            "{server}: connections still open after {RESET_DEADLINE:?}"
        );
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.conns.lock().expect("connections lock").open.len()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.registry.conns.lock() {
            conns.open.remove(&self.id);
        }
        self.registry.closed.notify_all();
    }
}
