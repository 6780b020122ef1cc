//! The `kv` capability: writes back into etcd sources, only under granted
//! prefixes.
//!
//! Owns the grant check, the bounds on one write's key and value, and one
//! writer task per plugin that performs the writes in order, with a timeout
//! and retries, on its own connection per source. A plugin's call returns
//! once the write is checked and queued; it never waits on the network.
//! What it logs of a write (the key, the error) is the plugin's text and cut
//! to [`MAX_TEXT`](crate::text::MAX_TEXT). It must not read, and must not
//! write outside the granted prefixes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::client::etcd::{EtcdClientConfig, connect_client};
use crate::telemetry::{Metrics, PluginCounter};
use crate::text::{clip, clip_owned};

/// Writes one plugin may have queued.
pub const QUEUE: usize = 256;
/// Longest key one write may name.
pub const MAX_KEY_BYTES: usize = 8 * 1024;
/// Largest value one write may carry. etcd refuses requests over 1.5 MiB
/// unless told otherwise, so a larger value would only be retried and
/// fail, while its copies waited in the queue.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most characters of a refused source name repeated in an error message.
const SHOWN: usize = 64;
/// Attempts per write, the first included.
const ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled after each further one.
const BACKOFF: Duration = Duration::from_millis(200);

/// One `[[grants.kv]]` entry: `source` may be written under `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvGrant {
    /// An etcd source of the gateway config.
    pub source: String,
    /// Key prefix; must not be empty (grant a whole store explicitly with
    /// `"/"` when keys start with `/`).
    pub prefix: String,
}

/// One write: a put, or a delete when `value` is `None`.
#[derive(Debug, Clone)]
pub struct Write {
    /// Source name.
    pub source: String,
    /// The full key.
    pub key: String,
    /// New value; `None` deletes.
    pub value: Option<Vec<u8>>,
}

impl Write {
    /// The write as JSON, for `plugin test`.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "op": if self.value.is_some() { "put" } else { "delete" },
            "source": self.source,
            "key": self.key,
            "value": self.value.as_deref().map(String::from_utf8_lossy),
        })
    }
}

/// The `kv` grants of one plugin and its writer.
#[derive(Debug)]
pub struct KvWriter {
    grants: Vec<KvGrant>,
    tx: Option<mpsc::Sender<Write>>,
}

impl KvWriter {
    /// Grants `grants` (validated by the sidecar parser), writing to each
    /// granted source through its entry in `targets` (source name → how to
    /// connect). With a runtime, starts the plugin's writer task on it;
    /// without one (a dry run) writes can only be checked.
    pub fn new(
        grants: Vec<KvGrant>,
        targets: HashMap<String, EtcdClientConfig>,
        runtime: Option<&tokio::runtime::Handle>,
        plugin: &str,
        metrics: &Arc<Metrics>,
    ) -> KvWriter {
        let tx = runtime.map(|rt| {
            let (tx, rx) = mpsc::channel(QUEUE);
            rt.spawn(writer(rx, targets, plugin.to_owned(), metrics.clone()));
            tx
        });
        KvWriter { grants, tx }
    }

    /// Check a write against the size bounds, then the grants.
    ///
    /// # Errors
    /// `("too_large", message)` naming the bound when the key or value is
    /// past it; `("denied", message)` when no grant covers the source and
    /// key.
    pub fn check(&self, write: &Write) -> Result<(), (&'static str, String)> {
        let Write { source, key, value } = write;
        if key.len() > MAX_KEY_BYTES {
            return Err((
                "too_large",
                format!(
                    "key of {} bytes is over the limit of {MAX_KEY_BYTES} bytes",
                    key.len()
                ),
            ));
        }
        if let Some(v) = value
            && v.len() > MAX_VALUE_BYTES
        {
            return Err((
                "too_large",
                format!(
                    "value of {} bytes is over the limit of {MAX_VALUE_BYTES} bytes",
                    v.len()
                ),
            ));
        }
        if self
            .grants
            .iter()
            .any(|g| g.source == *source && key.starts_with(&g.prefix))
        {
            Ok(())
        } else {
            let source = match source.char_indices().nth(SHOWN) {
                Some((cut, _)) => format!("{:?}…", &source[..cut]),
                None => format!("{source:?}"),
            };
            Err((
                "denied",
                format!("writing {key:?} in source {source} is not granted to this plugin"),
            ))
        }
    }

    /// Queue a checked write.
    ///
    /// # Errors
    /// `("busy", message)` when the plugin's queue is full, `("error", …)`
    /// when there is no writer.
    pub fn submit(&self, write: Write) -> Result<(), (&'static str, String)> {
        let Some(tx) = &self.tx else {
            return Err(("error", "no writer in this mode".into()));
        };
        tx.try_send(write).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => (
                "busy",
                format!("{QUEUE} writes already queued; try again later"),
            ),
            mpsc::error::TrySendError::Closed(_) => ("error", "the writer has stopped".into()),
        })
    }
}

async fn writer(
    mut rx: mpsc::Receiver<Write>,
    targets: HashMap<String, EtcdClientConfig>,
    plugin: String,
    metrics: Arc<Metrics>,
) {
    let mut clients: HashMap<String, etcd_client::Client> = HashMap::new();
    while let Some(w) = rx.recv().await {
        let Some(target) = targets.get(&w.source) else {
            continue;
        };
        let dial = target.dial_timeout;
        let mut result = Err(String::new());
        for attempt in 1..=ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(BACKOFF * (1 << (attempt - 2))).await;
            }
            let mut client = match clients.get(&w.source) {
                Some(c) => c.clone(),
                None => match tokio::time::timeout(dial, connect_client(target)).await {
                    Ok(Ok(c)) => {
                        clients.insert(w.source.clone(), c.clone());
                        c
                    }
                    Ok(Err(e)) => {
                        result = Err(format!("{e:#}"));
                        continue;
                    }
                    Err(_) => {
                        result = Err(format!("no connection within {dial:?}"));
                        continue;
                    }
                },
            };
            let op = async {
                match &w.value {
                    Some(v) => client
                        .put(w.key.as_bytes(), v.as_slice(), None)
                        .await
                        .map(drop),
                    None => client.delete(w.key.as_bytes(), None).await.map(drop),
                }
            };
            match tokio::time::timeout(dial, op).await {
                Ok(Ok(())) => {
                    result = Ok(());
                    break;
                }
                Ok(Err(e)) => result = Err(e.to_string()),
                Err(_) => result = Err(format!("no answer within {dial:?}")),
            }
            clients.remove(&w.source);
        }
        let key = clip(&w.key);
        let mut truncated = matches!(key, std::borrow::Cow::Owned(_));
        match result {
            Ok(()) => {
                metrics.capability(&plugin, "kv", "written");
                tracing::debug!(plugin = %plugin, source = %w.source, key = %key, "kv write done.");
            }
            Err(e) => {
                metrics.capability(&plugin, "kv", "failed");
                let (error, cut) = clip_owned(e);
                truncated |= cut;
                tracing::warn!(plugin = %plugin, source = %w.source, key = %key, error = %error,
                    "kv write failed after retries.");
            }
        }
        if truncated {
            metrics.count_plugin(PluginCounter::TextTruncated, &plugin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> KvWriter {
        KvWriter {
            grants: vec![KvGrant {
                source: "main".into(),
                prefix: "/app/".into(),
            }],
            tx: None,
        }
    }

    fn put(key: String, value: usize) -> Write {
        Write {
            source: "main".into(),
            key,
            value: Some(vec![b'v'; value]),
        }
    }

    #[test]
    fn key_and_value_bounds_allow_their_limit_and_refuse_one_more() {
        let w = writer();
        let key = |n: usize| format!("/app/{}", "k".repeat(n - 5));
        assert!(w.check(&put(key(MAX_KEY_BYTES), MAX_VALUE_BYTES)).is_ok());
        assert_eq!(
            w.check(&put(key(MAX_KEY_BYTES + 1), 1)).unwrap_err(),
            (
                "too_large",
                "key of 8193 bytes is over the limit of 8192 bytes".to_owned()
            )
        );
        assert_eq!(
            w.check(&put(key(10), MAX_VALUE_BYTES + 1)).unwrap_err(),
            (
                "too_large",
                "value of 1048577 bytes is over the limit of 1048576 bytes".to_owned()
            )
        );
        // A delete carries no value: only its key is bounded.
        let mut delete = put(key(MAX_KEY_BYTES + 1), 0);
        delete.value = None;
        assert_eq!(w.check(&delete).unwrap_err().0, "too_large");
    }

    #[test]
    fn writes_outside_the_grants_are_denied() {
        let w = writer();
        assert_eq!(w.check(&put("/other/k".into(), 1)).unwrap_err().0, "denied");
        let mut elsewhere = put("/app/k".into(), 1);
        elsewhere.source = "s".repeat(1 << 20);
        let (outcome, message) = w.check(&elsewhere).unwrap_err();
        assert_eq!(outcome, "denied");
        assert!(message.len() < 200, "{} bytes: {message}", message.len());
    }
}
