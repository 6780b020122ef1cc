//! A real NATS server with JetStream for end-to-end tests ([`Nats`]), on a
//! free loopback port with its store and its log in a temporary directory,
//! and a test's own key-value client ([`Kv`]).
//!
//! This module owns the processes it starts and must never leave one
//! behind: [`Nats`] kills and reaps its process on drop. A missing
//! `nats-server` binary fails the test loudly; it is never a skip.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::support::free_port;

/// How long a server may take to say it is ready.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a test's client keeps retrying an operation.
const RETRY_DEADLINE: Duration = Duration::from_secs(60);

/// The `nats-server` binary: `$NATS_SERVER`, else the one on `PATH`, else
/// Debian's `/usr/sbin/nats-server` (not on a non-root `PATH`).
fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    let bin = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"));
    assert!(
        bin.is_file(),
        "nats-server not found (set NATS_SERVER, or install Debian package nats-server); \
         the NATS tests need a real server"
    );
    bin
}

/// One `nats-server -js` process: its temporary directory (`store/` and
/// `nats.log`) and its port, kept across [`Nats::kill`] and
/// [`Nats::restart`].
pub struct Nats {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Nats {
    /// A server on a free loopback port with an empty store; returns once
    /// it accepts clients.
    pub fn start() -> Nats {
        let mut n = Nats {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            child: None,
        };
        n.spawn();
        n
    }

    /// A server that is not running, on a port nothing listens on: for
    /// tests that start the gateway first.
    pub fn not_started() -> Nats {
        Nats {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            child: None,
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Start the server (again) on the same port and store.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open nats log");
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(binary())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("nats-server exited with {status}; log:\n{}", self.log());
            }
            let text = self.log();
            let ready = text.get(offset as usize..).unwrap_or_default();
            if ready.contains("Server is ready") && TcpStream::connect(self.addr()).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < READY_DEADLINE,
                "nats-server not ready after {READY_DEADLINE:?}; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL the server (a crash) and reap it; the store stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the killed server again with the same store.
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test's own client of one bucket, blocking on a runtime of its own.
pub struct Kv {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
    store: kv::Store,
    bucket: String,
    history: i64,
}

impl Kv {
    /// Connect to `url` and create `bucket` (or open it) keeping `history`
    /// values per key.
    pub fn connect(url: &str, bucket: &str, history: i64) -> Kv {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (js, store) = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(url)
                .await
                .expect("connect to nats");
            let js = jetstream::new(client);
            let store = create(&js, bucket, history).await;
            (js, store)
        });
        Kv {
            rt,
            js,
            store,
            bucket: bucket.to_owned(),
            history,
        }
    }

    /// Put `value` at `key`; its revision.
    pub fn put(&self, key: &str, value: &str) -> Result<u64, async_nats::Error> {
        let v = Bytes::copy_from_slice(value.as_bytes());
        Ok(self.rt.block_on(self.store.put(key, v))?)
    }

    /// Delete `key` (a delete marker).
    pub fn delete(&self, key: &str) -> Result<(), async_nats::Error> {
        Ok(self.rt.block_on(self.store.delete(key))?)
    }

    /// Purge `key` (a purge marker; its older revisions go).
    pub fn purge(&self, key: &str) -> Result<(), async_nats::Error> {
        Ok(self.rt.block_on(self.store.purge(key))?)
    }

    /// Delete the bucket and create it again, empty.
    pub fn recreate(&mut self) {
        self.rt.block_on(async {
            self.js
                .delete_stream(format!("KV_{}", self.bucket))
                .await
                .expect("delete bucket");
        });
        self.store = self
            .rt
            .block_on(create(&self.js, &self.bucket, self.history));
    }

    /// The bucket's last revision.
    pub fn last_revision(&self) -> u64 {
        self.rt.block_on(async {
            let mut s = self
                .js
                .get_stream(format!("KV_{}", self.bucket))
                .await
                .expect("stream");
            s.info().await.expect("stream info").state.last_sequence
        })
    }

    /// The bucket's history from revision 1 up to and including `last`'s
    /// entry: (kind, key, value, revision), deletes and purges as
    /// `"delete"`.
    pub fn history(&self, last: &str) -> Vec<(String, String, Option<String>, u64)> {
        use futures_util::StreamExt;
        self.rt.block_on(async {
            let mut w = self
                .store
                .watch_from_revision(">", 1)
                .await
                .expect("watch history");
            let mut out = Vec::new();
            loop {
                let e = tokio::time::timeout(RETRY_DEADLINE, w.next())
                    .await
                    .expect("history replay stalled")
                    .expect("history ended")
                    .expect("history entry");
                let put = e.operation == kv::Operation::Put;
                out.push((
                    if put { "put" } else { "delete" }.to_owned(),
                    e.key.clone(),
                    put.then(|| String::from_utf8_lossy(&e.value).into_owned()),
                    e.revision,
                ));
                if e.key == last {
                    return out;
                }
            }
        })
    }

    /// Retry `op` until the server accepts it (it may be restarting).
    pub fn retry<T>(&self, mut op: impl FnMut(&Kv) -> Result<T, async_nats::Error>) -> T {
        let start = Instant::now();
        loop {
            match op(self) {
                Ok(v) => return v,
                Err(e) => {
                    assert!(start.elapsed() < RETRY_DEADLINE, "nats kept failing: {e}");
                    // The pace of the retries, not a wait for an outcome.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Create `bucket` as a KV bucket's stream, then open it. The stream is
/// made directly, with the settings a KV bucket has (one subject per key,
/// `history` messages kept per subject, rollups for purges): async-nats
/// 0.51's own bucket creation first reads account fields that a 2.9 server
/// does not send (`reserved_memory`, `reserved_storage`).
async fn create(js: &jetstream::Context, bucket: &str, history: i64) -> kv::Store {
    let config = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    let start = Instant::now();
    loop {
        let made = match js.get_or_create_stream(config.clone()).await {
            Ok(_) => js.get_key_value(bucket).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match made {
            Ok(s) => return s,
            // JetStream may still be recovering its store after a restart.
            Err(e) => {
                assert!(
                    start.elapsed() < RETRY_DEADLINE,
                    "cannot create bucket {bucket}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
