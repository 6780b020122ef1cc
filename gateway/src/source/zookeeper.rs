//! ZooKeeper source: every znode of one subtree as a key, followed through
//! a persistent recursive watch.
//!
//! Owns one ZooKeeper session at a time, the watch armed on the root before
//! each listing, and the state it last delivered per znode (value and
//! mzxid), which decides whether a fetched value is news. ZooKeeper keeps
//! no history to resume from, so every (re)connection lists the subtree
//! again and hands the listing to the dispatcher as a snapshot, whose diff
//! against the key index yields the `resync` changes and the deletes of
//! vanished znodes (including ephemeral znodes whose owner's session
//! expired). The rules it follows are Z1–Z6 in docs/RELIABILITY.md. It must
//! not know about plugins or queues.

mod tree;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Deserialize;
use zookeeper_client::{AddWatchMode, Client, EventType, PersistentWatcher, SessionState};

use super::{Source, SourceContext, SourceFuture};
use crate::backoff::Backoff;
use crate::event::Event;
use crate::telemetry::RepeatLog;
use tree::{Fetched, Node, fetch, list, removal_zxid};

/// `kind = "zookeeper"`: one subtree of a ZooKeeper ensemble.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZookeeperSourceConfig {
    /// Unique source name.
    pub name: String,
    /// Always `"zookeeper"`.
    #[serde(default)]
    kind: Option<String>,
    /// The ensemble's client addresses as `host:port`, for example
    /// `["127.0.0.1:2181"]`. The client picks one and moves to another
    /// when it fails.
    pub servers: Vec<String>,
    /// The znode whose whole subtree is watched, the root included, for
    /// example `"/config"`. Event keys are full znode paths.
    pub root: String,
    /// The session timeout asked of the server (which clamps it between
    /// 2 and 20 ticks). Default `"10s"`.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// User name for ZooKeeper digest authentication (with `password`).
    pub username: Option<String>,
    /// Password for digest authentication.
    pub password: Option<String>,
    /// First delay after a failed session in milliseconds; doubles up to
    /// `reconnect_max_ms`, with jitter. Default 200.
    #[serde(default = "super::default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest delay after failures in milliseconds. Default 10 000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_reconnect_max_ms() -> u64 {
    10_000
}

impl ZookeeperSourceConfig {
    /// Check what serde cannot.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("`servers` must list at least one \"host:port\"".into());
        }
        for s in &self.servers {
            check_server(s)?;
        }
        check_root(&self.root)?;
        if self.session_timeout < Duration::from_millis(100)
            || self.session_timeout > Duration::from_secs(3600)
        {
            return Err(format!(
                "session_timeout = {:?} must be between 100ms and 1h",
                self.session_timeout
            ));
        }
        match (&self.username, &self.password) {
            (Some(u), Some(_)) if u.is_empty() || u.contains(':') => {
                return Err(format!(
                    "username = {u:?} must be non-empty and must not contain ':' (digest auth sends \"user:password\")"
                ));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err("`username` and `password` go together".into());
            }
            _ => {}
        }
        super::check_reconnect(self.reconnect_initial_ms, self.reconnect_max_ms)
    }

    /// The connect string the client takes: the servers, comma-separated.
    fn connect_string(&self) -> String {
        self.servers.join(",")
    }
}

/// `host:port` with a non-zero port and nothing else.
fn check_server(s: &str) -> Result<(), String> {
    let bad = || format!("servers: {s:?} must be \"host:port\", for example \"127.0.0.1:2181\"");
    if s.contains("://") || s.contains('/') || s.contains(',') {
        return Err(bad());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.is_empty() => Ok(()),
        _ => Err(bad()),
    }
}

/// An absolute znode path: `/`, or `/`-separated names without empty,
/// `.` or `..` parts and without a trailing `/`.
fn check_root(root: &str) -> Result<(), String> {
    if root == "/" {
        return Ok(());
    }
    let ok = root.starts_with('/')
        && root[1..]
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\0'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "root = {root:?} must be an absolute znode path such as \"/config\" (no trailing '/', no empty, '.' or '..' parts)"
        ))
    }
}

/// The ZooKeeper source.
pub struct ZookeeperSource {
    config: ZookeeperSourceConfig,
}

impl ZookeeperSource {
    /// A source for `config` (already validated).
    pub fn new(config: ZookeeperSourceConfig) -> Self {
        ZookeeperSource { config }
    }
}

impl Source for ZookeeperSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture {
        Box::pin(async move {
            let mut watcher = Watcher {
                backoff: Backoff::new(
                    Duration::from_millis(self.config.reconnect_initial_ms),
                    Duration::from_millis(self.config.reconnect_max_ms),
                ),
                config: self.config,
                ctx,
                nodes: BTreeMap::new(),
                errors: RepeatLog::new(Duration::from_secs(60)),
            };
            watcher.run().await;
            Ok(())
        })
    }
}

/// A session that lasted this long was healthy: the next failure starts
/// the backoff from its first delay again.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// At most this many fetch rounds settle one batch (Z3); what is still
/// pending then goes into the next batch.
const MAX_ROUNDS: usize = 32;

/// Why a session, or one synced stretch of it, ended.
#[derive(Debug)]
enum End {
    /// Shutdown was requested.
    Shutdown,
    /// The connection dropped; the client reconnects on its own, keeping
    /// the session, but notifications in between may be lost (Z4).
    Disconnected,
    /// The session is over (expired, closed or refused authentication).
    Terminal(SessionState),
    /// A request failed in another way.
    Failed(String),
}

impl End {
    /// The end a failed request means, judged by the session's state.
    fn of(client: &Client, e: &zookeeper_client::Error) -> End {
        match client.state() {
            s @ (SessionState::Expired | SessionState::Closed | SessionState::AuthFailed) => {
                End::Terminal(s)
            }
            SessionState::Disconnected => End::Disconnected,
            _ => End::Failed(e.to_string()),
        }
    }

    /// A failure while reading `path` names it (a missing permission is
    /// per znode).
    fn reading(self, path: &str) -> End {
        match self {
            End::Failed(e) => End::Failed(format!("cannot read {path:?}: {e}")),
            other => other,
        }
    }
}

struct Watcher {
    config: ZookeeperSourceConfig,
    ctx: SourceContext,
    /// What was delivered last per znode path (value and mzxid).
    nodes: BTreeMap<String, Node>,
    backoff: Backoff,
    errors: RepeatLog,
}

impl Watcher {
    /// Sessions one after another until shutdown.
    async fn run(&mut self) {
        loop {
            let started = Instant::now();
            let end = match self.connect().await {
                Ok(client) => {
                    let end = self.session(&client).await;
                    // Dropping the last handle closes the session and ends
                    // the client's connection task.
                    drop(client);
                    end
                }
                Err(end) => end,
            };
            self.ctx.status.set_connected(false);
            let reason = match end {
                End::Shutdown => return,
                End::Terminal(state) => format!("ZooKeeper session ended: {state:?}"),
                End::Disconnected => "disconnected from ZooKeeper".to_owned(),
                End::Failed(e) => e,
            };
            if started.elapsed() >= HEALTHY_SESSION {
                self.backoff.reset();
            }
            if !self.wait_after_failure(reason).await {
                return;
            }
        }
    }

    /// Record `reason`, log it (a repeat once a minute, the rest counted)
    /// and wait the next backoff delay. `false` when shutdown came first.
    async fn wait_after_failure(&mut self, reason: String) -> bool {
        self.ctx.status.set_error(reason.clone());
        let delay = self.backoff.next_delay();
        match self.errors.should_log(&reason) {
            Some(repeated) => tracing::warn!(
                source = %self.ctx.name,
                error = %reason,
                retry_in_ms = delay.as_millis() as u64,
                repeated,
                "ZooKeeper session failed; starting a new one."
            ),
            None => self.ctx.status.log_suppressed(),
        }
        self.ctx.status.reconnecting();
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Open a new session, bounded in time (Z5).
    async fn connect(&self) -> Result<Client, End> {
        let c = &self.config;
        let mut connector = Client::connector()
            .with_session_timeout(c.session_timeout)
            .with_fail_eagerly();
        if let (Some(u), Some(p)) = (&c.username, &c.password) {
            connector = connector.with_auth("digest", format!("{u}:{p}").as_bytes());
        }
        let limit = c.session_timeout + Duration::from_secs(5);
        let servers = c.connect_string();
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => Err(End::Shutdown),
            r = tokio::time::timeout(limit, connector.connect(&servers)) => match r {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(e)) => Err(End::Failed(format!("cannot open a ZooKeeper session with {servers}: {e}"))),
                Err(_) => Err(End::Failed(format!("no ZooKeeper session with {servers} within {limit:?}"))),
            },
        }
    }

    /// One session: arm the watch, then list and follow, arming and
    /// listing again after every reconnection, until the session ends.
    async fn session(&mut self, client: &Client) -> End {
        let mut state = client.state_watcher();
        let mut lost_logged = false;
        loop {
            let end = match self.watch(client).await {
                Ok(mut watch) => match self.sync(client, &mut watch).await {
                    Ok(()) => {
                        self.ctx.status.set_connected(true);
                        self.ctx.status.set_synced();
                        lost_logged = false;
                        self.follow(client, &mut watch).await
                    }
                    Err(end) => end,
                },
                Err(end) => end,
            };
            match end {
                // Z4: the client reconnects by itself, keeping the
                // session, but what changed meanwhile was never notified:
                // wait for the connection, then arm and list again.
                End::Disconnected => {
                    self.ctx.status.set_connected(false);
                    self.ctx
                        .status
                        .set_error("connection to ZooKeeper lost; reconnecting");
                    if !lost_logged {
                        lost_logged = true;
                        match self.errors.should_log("disconnected") {
                            Some(repeated) => tracing::warn!(
                                source = %self.ctx.name,
                                repeated,
                                "Lost the connection to ZooKeeper; the session is kept while the client reconnects."
                            ),
                            None => self.ctx.status.log_suppressed(),
                        }
                        self.ctx.status.reconnecting();
                    }
                    loop {
                        match state.state() {
                            SessionState::SyncConnected | SessionState::ConnectedReadOnly => break,
                            s @ (SessionState::Expired
                            | SessionState::Closed
                            | SessionState::AuthFailed) => return End::Terminal(s),
                            SessionState::Disconnected => {}
                        }
                        tokio::select! {
                            _ = self.ctx.shutdown.cancelled() => return End::Shutdown,
                            _ = state.changed() => {}
                        }
                    }
                    tracing::debug!(source = %self.ctx.name, "Reconnected to ZooKeeper; listing again.");
                }
                other => return other,
            }
        }
    }

    /// Z1: arm the persistent recursive watch on the root, before any
    /// listing, so nothing that changes while listing goes unnoticed. Armed
    /// anew after every reconnection (Z4): zookeeper-client 0.11.2 re-sends
    /// only one-shot watches when it reconnects (its `resend_watches`
    /// never picks SetWatches2), so the server would otherwise forget the
    /// persistent watch. The previous watcher is dropped before this is
    /// called, so a removal it may send reaches the server first; adding
    /// the same watch twice is harmless either way.
    async fn watch(&self, client: &Client) -> Result<PersistentWatcher, End> {
        let root = &self.config.root;
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => Err(End::Shutdown),
            w = client.watch(root, AddWatchMode::PersistentRecursive) => w.map_err(|e| {
                match End::of(client, &e) {
                    End::Failed(e) => End::Failed(format!("cannot watch {root:?}: {e}")),
                    other => other,
                }
            }),
        }
    }

    /// List the subtree, settle what changed meanwhile and hand the result
    /// to the dispatcher as a snapshot (Z1, Z4).
    async fn sync(&mut self, client: &Client, watch: &mut PersistentWatcher) -> Result<(), End> {
        let root = self.config.root.clone();
        // Each level of the listing is progress for the start-up deadline.
        let status = self.ctx.status.clone();
        let mut on_level = |n| status.listed(n);
        let listed = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => return Err(End::Shutdown),
            l = list(client, &root, &mut on_level) => {
                l.map_err(|e| End::of(client, &e).reading(&root))?
            }
        };
        let mut nodes = listed.nodes;
        let mut revision = listed.revision;
        // The listing's deletes (made by the dispatcher's diff) need a
        // revision no lower than the removal of the root itself.
        revision = revision.max(
            self.call(client, &root, removal_zxid(client, &root))
                .await?,
        );
        let mut fetched = BTreeMap::new();
        self.settle(client, watch, BTreeSet::new(), &mut fetched)
            .await?;
        for (path, f) in fetched {
            match f {
                Fetched::Present(node) => {
                    revision = revision.max(node.mzxid);
                    nodes.insert(path, node);
                }
                Fetched::Absent(zxid) => {
                    revision = revision.max(zxid);
                    nodes.remove(&path);
                }
            }
        }
        let events = nodes
            .iter()
            .map(|(path, n)| Event::put(&self.ctx.name, path.as_str(), n.value.clone(), n.mzxid))
            .collect();
        self.nodes = nodes;
        tracing::debug!(source = %self.ctx.name, znodes = self.nodes.len(), revision, "Listed the subtree.");
        self.ctx.emit_snapshot_at(revision, events);
        Ok(())
    }

    /// Deliver notified changes until the connection drops, the session
    /// ends or shutdown.
    async fn follow(&mut self, client: &Client, watch: &mut PersistentWatcher) -> End {
        loop {
            let event = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return End::Shutdown,
                e = watch.changed() => e,
            };
            let mut pending = BTreeSet::new();
            if let Err(end) = take(event, &mut pending) {
                return end;
            }
            let mut fetched = BTreeMap::new();
            if let Err(end) = self.settle(client, watch, pending, &mut fetched).await {
                return end;
            }
            let events = self.changes(fetched);
            self.ctx.emit(events);
        }
    }

    /// Z3: fetch `pending`, then whatever was notified while fetching,
    /// round after round, until nothing more is pending (or after
    /// `MAX_ROUNDS`). A reply is sent after every notification of a change
    /// it reflects, so once the last round finds nothing new, every change
    /// up to the highest zxid fetched is in `fetched`: the batch can be
    /// delivered in zxid order without a later batch going back.
    async fn settle(
        &self,
        client: &Client,
        watch: &mut PersistentWatcher,
        mut pending: BTreeSet<String>,
        fetched: &mut BTreeMap<String, Fetched>,
    ) -> Result<(), End> {
        for _ in 0..MAX_ROUNDS {
            for path in std::mem::take(&mut pending) {
                let f = self.call(client, &path, fetch(client, &path)).await?;
                fetched.insert(path, f);
            }
            drain(watch, &mut pending)?;
            if pending.is_empty() {
                return Ok(());
            }
        }
        for path in pending {
            let f = self.call(client, &path, fetch(client, &path)).await?;
            fetched.insert(path, f);
        }
        Ok(())
    }

    /// Await one request about `path`, or shutdown.
    async fn call<T>(
        &self,
        client: &Client,
        path: &str,
        request: impl Future<Output = Result<T, zookeeper_client::Error>>,
    ) -> Result<T, End> {
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => Err(End::Shutdown),
            r = request => r.map_err(|e| End::of(client, &e).reading(path)),
        }
    }

    /// The events that turn what was delivered into `fetched`, in zxid
    /// order, recording them as delivered. A value not newer than the one
    /// delivered is dropped (Z2).
    fn changes(&mut self, fetched: BTreeMap<String, Fetched>) -> Vec<Event> {
        let name = &self.ctx.name;
        let mut events = Vec::new();
        for (path, f) in fetched {
            match (self.nodes.get(&path), f) {
                (Some(old), Fetched::Present(new)) => {
                    if new.mzxid > old.mzxid {
                        events.push(
                            Event::put(name, path.as_str(), new.value.clone(), new.mzxid)
                                .with_prev(Some(old.value.clone())),
                        );
                        self.nodes.insert(path, new);
                    }
                }
                (None, Fetched::Present(new)) => {
                    events.push(Event::put(
                        name,
                        path.as_str(),
                        new.value.clone(),
                        new.mzxid,
                    ));
                    self.nodes.insert(path, new);
                }
                (Some(old), Fetched::Absent(zxid)) => {
                    // The removal's zxid is above the removed node's mzxid;
                    // the max only guards against a server that says
                    // otherwise.
                    let revision = zxid.max(old.mzxid);
                    events.push(
                        Event::delete(name, path.as_str(), revision)
                            .with_prev(Some(old.value.clone())),
                    );
                    self.nodes.remove(&path);
                }
                (None, Fetched::Absent(_)) => {}
            }
        }
        events.sort_by(|a, b| a.revision.cmp(&b.revision).then_with(|| a.key.cmp(&b.key)));
        events
    }
}

/// Note a watch event: a node event's path becomes pending; a connection
/// loss or the session's end ends the stretch.
fn take(event: zookeeper_client::WatchedEvent, pending: &mut BTreeSet<String>) -> Result<(), End> {
    match event.event_type {
        EventType::Session => match event.session_state {
            SessionState::Disconnected => Err(End::Disconnected),
            s @ (SessionState::Expired | SessionState::Closed | SessionState::AuthFailed) => {
                Err(End::Terminal(s))
            }
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => Ok(()),
        },
        EventType::NodeCreated | EventType::NodeDeleted | EventType::NodeDataChanged => {
            pending.insert(event.path);
            Ok(())
        }
        // A recursive watch reports children by their own events.
        EventType::NodeChildrenChanged => Ok(()),
    }
}

/// Take every watch event already received, without waiting.
fn drain(watch: &mut PersistentWatcher, pending: &mut BTreeSet<String>) -> Result<(), End> {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        // `changed` takes from the client's queue; a future that is not
        // ready has taken nothing, so dropping it loses no event.
        let mut next = std::pin::pin!(watch.changed());
        match next.as_mut().poll(&mut cx) {
            Poll::Ready(event) => take(event, pending)?,
            Poll::Pending => return Ok(()),
        }
    }
}
