//! etcd v3 source: a snapshot of one prefix, then one watch, resumed by
//! revision.
//!
//! Owns the connection to the etcd cluster (one endpoint at a time, moving
//! to the next after a failure), the range read that snapshots the prefix,
//! the watch from the snapshot's revision + 1, and the key index needed to
//! diff after compaction. It follows the rules in docs/RELIABILITY.md: resume
//! from the last fully delivered revision + 1 after any stream end (E1);
//! relist and synthesize deletes when that revision was compacted, never
//! retrying it (E2); back off on cancel reasons (E3); require a leader (E5);
//! HTTP/2 keepalive for dead connections (E6); a raised decoding limit for
//! large values (E7); no revision bookkeeping from progress replies (E8);
//! drop events below the resume revision and relist when the cluster id
//! changes or revisions go back (E9); cancel the watch explicitly on
//! shutdown (E10). It must not know about plugins or queues.

use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions, WatchStream,
};
use serde::Deserialize;

use super::{Source, SourceContext, SourceFuture};
use crate::backoff::Backoff;
use crate::client::etcd::{EtcdClientConfig, EtcdTlsConfig, connect_options};
use crate::event::Event;
use crate::telemetry::RepeatLog;

/// `kind = "etcd"`: one prefix of an etcd v3 cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSourceConfig {
    /// Unique source name.
    pub name: String,
    /// Always `"etcd"`.
    #[serde(default)]
    kind: Option<String>,
    /// Client URLs of the members, for example `["http://127.0.0.1:2379"]`.
    /// The source uses one at a time and moves to the next after a failure.
    pub endpoints: Vec<String>,
    /// Key prefix to snapshot and watch; empty (the default) means every
    /// key. Event keys are the full etcd keys.
    #[serde(default)]
    pub prefix: String,
    /// User name for etcd authentication (with `password`).
    pub username: Option<String>,
    /// Password for etcd authentication.
    pub password: Option<String>,
    /// TLS settings; omit for plain `http://` endpoints.
    pub tls: Option<EtcdTlsConfig>,
    /// HTTP/2 keepalive ping interval in seconds. At least 5 (etcd refuses
    /// more frequent pings with "too many pings"). Default 10.
    #[serde(default = "default_keepalive_interval_s")]
    pub keepalive_interval_s: u64,
    /// Seconds to wait for a keepalive answer before the connection counts
    /// as dead. Default 5, so a dead server is noticed within 15 s.
    #[serde(default = "default_keepalive_timeout_s")]
    pub keepalive_timeout_s: u64,
    /// Seconds to wait for a connection and for each read. Default 5.
    #[serde(default = "default_dial_timeout_s")]
    pub dial_timeout_s: u64,
    /// Largest gRPC message accepted, in bytes (etcd may send watch
    /// responses larger than gRPC's 4 MiB default). Default 64 MiB.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Keys of the first range request while reading the snapshot; later
    /// ones grow to about 8 MiB of keys and values each (at most 100,000
    /// keys), because etcd's cost per request grows with the keys left to
    /// list, not with the page. Default 1000.
    #[serde(default = "default_page_size")]
    pub page_size: i64,
    /// First reconnect delay in milliseconds; doubles up to
    /// `reconnect_max_ms`, with jitter. Default 200.
    #[serde(default = "super::default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay in milliseconds. Default 10 000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn default_keepalive_interval_s() -> u64 {
    10
}
fn default_keepalive_timeout_s() -> u64 {
    5
}
fn default_dial_timeout_s() -> u64 {
    5
}
fn default_max_message_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_page_size() -> i64 {
    1000
}
fn default_reconnect_max_ms() -> u64 {
    10_000
}

impl EtcdSourceConfig {
    /// A config with defaults, for tests and examples.
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        EtcdSourceConfig {
            name: name.into(),
            kind: None,
            endpoints,
            prefix: String::new(),
            username: None,
            password: None,
            tls: None,
            keepalive_interval_s: default_keepalive_interval_s(),
            keepalive_timeout_s: default_keepalive_timeout_s(),
            dial_timeout_s: default_dial_timeout_s(),
            max_message_bytes: default_max_message_bytes(),
            page_size: default_page_size(),
            reconnect_initial_ms: super::default_reconnect_initial_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
        }
    }

    /// The settings to connect with.
    pub fn client(&self) -> EtcdClientConfig {
        EtcdClientConfig {
            endpoints: self.endpoints.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            tls: self.tls.clone(),
            keepalive_interval: Duration::from_secs(self.keepalive_interval_s),
            keepalive_timeout: Duration::from_secs(self.keepalive_timeout_s),
            dial_timeout: Duration::from_secs(self.dial_timeout_s),
        }
    }

    /// Check values serde cannot. Relative TLS paths are left for the
    /// config loader, which knows what they are relative to.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("`endpoints` must list at least one client URL".into());
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!(
                    "endpoints: {e:?} must be a URL such as \"http://127.0.0.1:2379\""
                ));
            }
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("`username` and `password` go together".into());
        }
        if self.keepalive_interval_s < 5 {
            return Err(format!(
                "keepalive_interval_s = {} is below etcd's minimum of 5 (etcd would answer \"too many pings\")",
                self.keepalive_interval_s
            ));
        }
        if self.keepalive_timeout_s == 0 || self.dial_timeout_s == 0 {
            return Err("keepalive_timeout_s and dial_timeout_s must be at least 1".into());
        }
        if self.page_size < 1 {
            return Err("page_size must be at least 1".into());
        }
        super::check_reconnect(self.reconnect_initial_ms, self.reconnect_max_ms)?;
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err("tls: `cert_file` and `key_file` go together".into());
        }
        Ok(())
    }
}

/// The etcd source.
pub struct EtcdSource {
    config: EtcdSourceConfig,
}

impl EtcdSource {
    /// A source for `config` (already validated).
    pub fn new(config: EtcdSourceConfig) -> Self {
        EtcdSource { config }
    }
}

impl Source for EtcdSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture {
        Box::pin(async move {
            let options = connect_options(&self.config.client()).await?;
            let resume = ctx.resume;
            let mut watcher = Watcher {
                config: self.config,
                options,
                ctx,
                next_rev: resume.map(|r| r as i64 + 1),
                check_resume: resume.is_some(),
                sync_target: None,
                cluster_id: None,
                relist: false,
                endpoint: 0,
                errors: RepeatLog::new(Duration::from_secs(60)),
            };
            watcher.run().await;
            Ok(())
        })
    }
}

/// The key range `[start, end)` covering `prefix` (every key when empty).
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let start = prefix.as_bytes().to_vec();
    let mut end = start.clone();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (start, end);
        }
    }
    // All 0xff: to the end of the keyspace.
    (start, vec![0])
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection or stream failed (includes leader loss).
    Disconnected(String),
    /// The watch stream ended cleanly (server going away).
    StreamEnded,
    /// The resume revision was compacted: relist.
    Compacted(i64),
    /// The server cancelled the watch for a reason (auth, permission).
    Cancelled(String),
    /// The cluster id changed or revisions went back: relist.
    Inconsistent(String),
}

/// The limit of each range request of a listing. etcd 3.4 walks every
/// key from a page's start to the end of the range to answer it, whatever
/// the limit, so a listing costs it about keys² / (2 × page) steps: a
/// million keys in pages of 1000 keep it busy for minutes. Pages therefore
/// start at `page_size` keys and grow to what fits in [`PAGE_BYTES`] at the
/// sizes seen so far, never past a quarter of the message limit.
struct PageSize {
    first: i64,
    limit: i64,
    cap_bytes: usize,
    keys: usize,
    bytes: usize,
}

/// Bytes aimed at per range reply while listing.
const PAGE_BYTES: usize = 8 << 20;

/// Most keys per range request while listing.
const PAGE_KEYS_MAX: i64 = 100_000;

impl PageSize {
    fn new(first: i64, max_message_bytes: usize) -> PageSize {
        PageSize {
            first,
            limit: first,
            cap_bytes: PAGE_BYTES.min(max_message_bytes / 4),
            keys: 0,
            bytes: 0,
        }
    }

    fn next(&self) -> i64 {
        self.limit
    }

    fn observe(&mut self, kvs: &[KeyValue]) {
        self.keys += kvs.len();
        self.bytes += kvs
            .iter()
            .map(|kv| kv.key().len() + kv.value().len() + 32)
            .sum::<usize>();
        if let Some(per_key) = self.bytes.checked_div(self.keys) {
            let per_key = per_key.max(1);
            let fits = i64::try_from(self.cap_bytes / per_key).unwrap_or(i64::MAX);
            self.limit = fits.clamp(self.first, PAGE_KEYS_MAX.max(self.first));
        }
    }
}

struct Watcher {
    config: EtcdSourceConfig,
    options: ConnectOptions,
    ctx: SourceContext,
    /// The next revision to deliver; `None` before the first snapshot.
    next_rev: Option<i64>,
    /// Resumed from plugins' cursors: check on connecting that the store
    /// has not gone back before the resume revision.
    check_resume: bool,
    /// Resumed: the store's revision at connect; the source is synced once
    /// delivery reaches it.
    sync_target: Option<i64>,
    cluster_id: Option<u64>,
    relist: bool,
    endpoint: usize,
    errors: RepeatLog,
}

fn utf8_key(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

fn metadata(kv: &KeyValue) -> crate::event::Metadata {
    let mut m = thin_vec::thin_vec![
        (
            "create_revision".to_owned(),
            kv.create_revision().to_string(),
        ),
        ("version".to_owned(), kv.version().to_string()),
    ];
    if kv.lease() != 0 {
        m.push(("lease".to_owned(), kv.lease().to_string()));
    }
    m
}

impl Watcher {
    async fn run(&mut self) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_initial_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        loop {
            let endpoint =
                self.config.endpoints[self.endpoint % self.config.endpoints.len()].clone();
            let started = Instant::now();
            // The session watches the shutdown token itself, so that it can
            // cancel its watch explicitly before returning.
            let end = self.session(&endpoint).await;
            self.ctx.status.set_connected(false);
            let reason = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Disconnected(e) => format!("connection to {endpoint} failed: {e}"),
                SessionEnd::StreamEnded => format!("watch stream from {endpoint} ended"),
                SessionEnd::Compacted(rev) => {
                    self.relist = true;
                    format!("revision {rev} was compacted; relisting")
                }
                SessionEnd::Cancelled(r) => format!("{endpoint} cancelled the watch: {r}"),
                SessionEnd::Inconsistent(r) => {
                    self.relist = true;
                    format!("{r}; relisting")
                }
            };
            self.ctx.status.set_error(reason.clone());
            // A healthy session earns a fresh backoff; a flapping one does not.
            if started.elapsed() >= Duration::from_secs(10) {
                backoff.reset();
            }
            let delay = if self.relist && reason.contains("compacted") {
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            if let Some(suppressed) = self.errors.should_log(&reason) {
                tracing::warn!(
                    source = %self.ctx.name,
                    error = %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    repeated = suppressed,
                    "etcd watch interrupted; reconnecting."
                );
            } else {
                self.ctx.status.log_suppressed();
            }
            self.endpoint += 1;
            self.ctx.status.reconnecting();
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&mut self, endpoint: &str) -> SessionEnd {
        let dial = Duration::from_secs(self.config.dial_timeout_s);
        let shutdown = self.ctx.shutdown.clone();
        let connect = Client::connect([endpoint], Some(self.options.clone()));
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            c = tokio::time::timeout(dial, connect) => c,
        };
        let client = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return SessionEnd::Disconnected(e.to_string()),
            Err(_) => return SessionEnd::Disconnected(format!("no connection within {dial:?}")),
        };
        if self.check_resume && !self.relist {
            let checked = tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                c = self.check_resume(&client) => c,
            };
            if let Err(end) = checked {
                return end;
            }
        }
        if self.next_rev.is_none() || self.relist {
            let listed = tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                l = self.list(&client) => l,
            };
            if let Err(end) = listed {
                return end;
            }
        }
        let Some(start) = self.next_rev else {
            unreachable!("list sets next_rev")
        };
        let (range_start, range_end) = prefix_range(&self.config.prefix);
        let options = WatchOptions::new()
            .with_range(range_end)
            .with_start_revision(start)
            .with_prev_key();
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(self.config.max_message_bytes);
        let watch = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            w = tokio::time::timeout(dial, watch_client.watch(range_start, Some(options))) => w,
        };
        let mut stream = match watch {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return SessionEnd::Disconnected(e.to_string()),
            Err(_) => return SessionEnd::Disconnected(format!("no watch within {dial:?}")),
        };
        let mut watch_id = None;
        loop {
            let msg = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => {
                    cancel(&mut stream, watch_id).await;
                    return SessionEnd::Shutdown;
                }
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) => return SessionEnd::StreamEnded,
                Err(e) => return SessionEnd::Disconnected(e.to_string()),
            };
            if let Some(h) = resp.header() {
                match self.cluster_id {
                    Some(id) if id != h.cluster_id() && h.cluster_id() != 0 => {
                        let old = id;
                        self.cluster_id = Some(h.cluster_id());
                        return SessionEnd::Inconsistent(format!(
                            "cluster id changed from {old:x} to {:x}",
                            h.cluster_id()
                        ));
                    }
                    None if h.cluster_id() != 0 => self.cluster_id = Some(h.cluster_id()),
                    _ => {}
                }
            }
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return SessionEnd::Compacted(start.max(self.next_rev.unwrap_or(start)));
                }
                let reason = resp.cancel_reason();
                return SessionEnd::Cancelled(if reason.is_empty() {
                    "no reason given".to_owned()
                } else {
                    reason.to_owned()
                });
            }
            if resp.created() {
                watch_id = Some(resp.watch_id());
                self.ctx.status.set_connected(true);
                if self.sync_target.is_some() {
                    // Resumed: synced once the replay caught up. A progress
                    // reply comes once the server has sent everything up to
                    // its current revision.
                    let _ = stream.request_progress().await;
                    self.check_synced(None);
                } else {
                    self.ctx.status.set_synced();
                }
                continue;
            }
            if let Err(end) = self.deliver(resp.events()) {
                return end;
            }
            let progress = resp.events().is_empty();
            self.check_synced(
                resp.header()
                    .filter(|_| progress)
                    .map(etcd_client::ResponseHeader::revision),
            );
        }
    }

    /// Resuming from plugins' cursors: learn the store's current revision,
    /// and relist instead when it is below the resume point (a cluster
    /// restored from a backup, or a different one behind the address).
    async fn check_resume(&mut self, client: &Client) -> Result<(), SessionEnd> {
        let dial = Duration::from_secs(self.config.dial_timeout_s);
        let (start, end) = prefix_range(&self.config.prefix);
        let opts = GetOptions::new().with_range(end).with_count_only();
        let resp = match tokio::time::timeout(dial, client.kv_client().get(start, Some(opts))).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(SessionEnd::Disconnected(e.to_string())),
            Err(_) => {
                return Err(SessionEnd::Disconnected(format!(
                    "no answer within {dial:?}"
                )));
            }
        };
        let current = resp.header().map_or(0, |h| h.revision());
        if let Some(h) = resp.header() {
            self.cluster_id = Some(h.cluster_id());
        }
        let resume_after = self.next_rev.unwrap_or(1) - 1;
        self.check_resume = false;
        if current < resume_after {
            tracing::warn!(source = %self.ctx.name, current, resume_after, "etcd revision is below the plugins' cursors; relisting.");
            self.relist = true;
        } else {
            self.sync_target = Some(current);
        }
        Ok(())
    }

    /// Resumed: open the readiness latch once delivery (or a progress
    /// reply at `progress`) reached the revision seen at connect.
    fn check_synced(&mut self, progress: Option<i64>) {
        let Some(target) = self.sync_target else {
            return;
        };
        let delivered = self.next_rev.unwrap_or(0) - 1;
        if delivered >= target || progress.is_some_and(|p| p >= target) {
            self.sync_target = None;
            self.ctx.status.set_synced();
        }
    }

    /// Read the prefix at one revision, page by page, and hand it over as a
    /// snapshot; the dispatcher diffs it against its key index (everything
    /// is new the first time).
    async fn list(&mut self, client: &Client) -> Result<(), SessionEnd> {
        let dial = Duration::from_secs(self.config.dial_timeout_s);
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(self.config.max_message_bytes);
        let (mut start, end) = prefix_range(&self.config.prefix);
        let mut revision = 0i64;
        let name = self.ctx.name.clone();
        // etcd returns each page in key order and the next page starts past
        // the last key, so the pages concatenate into the sorted snapshot.
        let mut batch: Vec<Event> = Vec::new();
        let mut pages = PageSize::new(self.config.page_size, self.config.max_message_bytes);
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(pages.next());
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = match tokio::time::timeout(dial * 4, kv.get(start.clone(), Some(opts))).await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.to_string().contains("compacted") => {
                    // The snapshot revision was compacted mid-read: start over.
                    return Err(SessionEnd::Inconsistent(format!(
                        "snapshot interrupted: {e}"
                    )));
                }
                Ok(Err(e)) => return Err(SessionEnd::Disconnected(e.to_string())),
                Err(_) => {
                    return Err(SessionEnd::Disconnected(format!(
                        "range read timed out after {:?}",
                        dial * 4
                    )));
                }
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
                if let Some(h) = resp.header() {
                    if let Some(id) = self.cluster_id
                        && id != h.cluster_id()
                    {
                        tracing::warn!(source = %self.ctx.name, old = id, new = h.cluster_id(), "etcd cluster id changed; treating as a new cluster.");
                    }
                    self.cluster_id = Some(h.cluster_id());
                }
            }
            self.ctx.status.listed(resp.kvs().len());
            pages.observe(resp.kvs());
            batch.reserve(resp.kvs().len());
            for kv in resp.kvs() {
                let value = Bytes::copy_from_slice(kv.value());
                let mut e = Event::put(&name, utf8_key(kv), value, kv.mod_revision().max(1) as u64);
                e.metadata = metadata(kv);
                batch.push(e);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        if let Some(next) = self.next_rev
            && revision < next - 1
        {
            // The cluster went back in time (restored from a backup, or a
            // different cluster behind the same address): trust the new
            // snapshot, and diff against it.
            tracing::warn!(source = %self.ctx.name, snapshot = revision, delivered = next - 1, "etcd revision went backwards; resynchronizing.");
        }
        let first = self.next_rev.is_none();
        if !first {
            self.ctx.status.resynced();
            tracing::info!(source = %name, revision, keys = batch.len(), "etcd source relisted; the dispatcher diffs it.");
        }
        self.ctx.emit_snapshot_at(revision.max(0) as u64, batch);
        self.sync_target = None;
        self.ctx.status.set_revision(revision.max(0) as u64);
        self.next_rev = Some(revision + 1);
        self.relist = false;
        Ok(())
    }

    /// Emit the events of one watch response as one batch (whole revisions,
    /// in order), dropping anything below the resume revision.
    fn deliver(&mut self, events: &[etcd_client::Event]) -> Result<(), SessionEnd> {
        let next = self.next_rev.unwrap_or(0);
        let name = self.ctx.name.clone();
        let mut batch: Vec<Event> = Vec::new();
        let mut batch_rev = 0i64;
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let rev = kv.mod_revision();
            if rev < next {
                continue; // duplicate or replay (E9)
            }
            if rev < batch_rev {
                return Err(SessionEnd::Inconsistent(format!(
                    "watch revisions went back from {batch_rev} to {rev}"
                )));
            }
            // Every revision of one response goes in one delivery: whole
            // transactions, in order, and one dispatcher round for a
            // response that carries a backlog (a watch catching up).
            batch_rev = rev;
            let key = utf8_key(kv);
            // Without etcd's previous value (compacted away), the
            // dispatcher gives the one it indexed.
            let prev = ev.prev_kv().map(|p| Bytes::copy_from_slice(p.value()));
            let e = match ev.event_type() {
                EventType::Put => {
                    let value = Bytes::copy_from_slice(kv.value());
                    let mut e = Event::put(&name, key, value, rev as u64).with_prev(prev);
                    e.metadata = metadata(kv);
                    e
                }
                EventType::Delete => Event::delete(&name, key, rev as u64).with_prev(prev),
            };
            batch.push(e);
        }
        if !batch.is_empty() {
            self.flush(&mut batch, batch_rev);
        }
        Ok(())
    }

    fn flush(&mut self, batch: &mut Vec<Event>, rev: i64) {
        // A resumed watch replays what some plugin had not been given; the
        // dispatcher skips, per plugin, what it had.
        self.ctx.emit(std::mem::take(batch));
        self.next_rev = Some(rev + 1);
    }
}

/// Cancel the watch explicitly (E10), bounded in time.
async fn cancel(stream: &mut WatchStream, watch_id: Option<i64>) {
    if let Some(id) = watch_id {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.cancel(id)).await;
    }
}

#[cfg(test)]
mod tests;
