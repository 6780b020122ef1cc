//! Cluster mode: several replicas, each plugin run by exactly one of them,
//! coordinated through etcd leases and transactions (no consensus of its
//! own).
//!
//! Owns this replica's lease, its membership record and its plugin
//! ownerships. Under `PREFIX` in the coordination etcd:
//!
//! * `members/NAME`: one per live replica, bound to its lease;
//! * `owners/PLUGIN`: the owning replica's name, created by a transaction
//!   that succeeds only when the key is absent, bound to the owner's lease
//!   (so it vanishes with it). Its create revision is the fencing token,
//!   handed to the plugin in every event's metadata as `fencing_token`;
//! * `cursors/PLUGIN`: the owner's cursors (source → revision), written only
//!   by a transaction that checks the owner key is still this replica's,
//!   with this lease and this token, so a stale owner cannot overwrite it.
//!
//! Every plugin has a desired owner among the live replicas (rendezvous
//! hashing), so plugins spread and move when replicas join or leave. The
//! owner of a plugin that should move parks it (waiting for its call in
//! flight), writes its final cursors and deletes its owner key; the new
//! owner claims it and resumes from those cursors: the sources with a
//! history replay from there. A replica counts its lease as valid until the
//! time it *sent* its last acknowledged renewal plus the TTL (the server's
//! expiry is later than that), minus a margin; past it, it parks every
//! plugin it owns before anyone else can claim them, and claims again only
//! with a new lease. This module must not run plugins or watch sources.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use parking_lot::RwLock;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::etcd::{EtcdClientConfig, connect_client};
use crate::config::ClusterConfig;
use crate::dispatch::Dispatcher;
use crate::telemetry::{Metrics, RepeatLog};

/// How often ownership is reconciled.
const TICK: Duration = Duration::from_millis(250);

/// What `GET /v1/cluster` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterReport {
    /// This replica's name.
    pub name: String,
    /// Holding a lease it may act on.
    pub lease_valid: bool,
    /// The lease id (0: none).
    pub lease: i64,
    /// Live replicas and the plugins each owns.
    pub replicas: Vec<ReplicaReport>,
    /// Plugins this replica owns.
    pub owned: Vec<String>,
}

/// One replica in a [`ClusterReport`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaReport {
    /// Replica name.
    pub name: String,
    /// Plugins it owns.
    pub owns: Vec<String>,
}

/// The cluster member of this gateway.
pub struct Cluster {
    config: ClusterConfig,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    report: Arc<RwLock<ClusterReport>>,
    replay: mpsc::UnboundedSender<Vec<String>>,
}

/// A lease and the connection renewing it.
struct Session {
    client: Client,
    lease: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// Acting on ownership is safe until then.
    valid_until: Instant,
    next_renew: Instant,
}

/// One owner record as read.
struct Owner {
    name: String,
    lease: i64,
    token: i64,
}

/// The desired owner of `plugin` among `members`: the highest score of a
/// stable hash (rendezvous hashing).
pub fn desired_owner<'a>(plugin: &str, members: &'a BTreeSet<String>) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| {
            let d = Sha256::new()
                .chain_update(plugin.as_bytes())
                .chain_update([0u8])
                .chain_update(m.as_bytes())
                .finalize();
            u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
        })
        .map(String::as_str)
}

impl Cluster {
    /// A member for `config`; activations that need a source replay are
    /// sent on `replay`, and the state is published in `report`.
    pub fn new(
        config: ClusterConfig,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        report: Arc<RwLock<ClusterReport>>,
        replay: mpsc::UnboundedSender<Vec<String>>,
    ) -> Cluster {
        report.write().name = config.name.clone();
        Cluster {
            config,
            dispatcher,
            metrics,
            report,
            replay,
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.config.prefix)
    }

    /// How long an etcd request may take.
    fn call_timeout(&self) -> Duration {
        (self.config.lease_ttl / 4).min(Duration::from_secs(2))
    }

    /// Before the lease's end, stop acting as owner.
    fn margin(&self) -> Duration {
        (self.config.lease_ttl / 5).max(Duration::from_millis(300))
    }

    /// Keep membership and ownership until `shutdown`, then hand every
    /// owned plugin over and revoke the lease.
    ///
    /// # Errors
    /// Never at run time (failures are retried); kept for the task table.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut session: Option<Session> = None;
        let mut owned: BTreeMap<String, i64> = BTreeMap::new();
        let mut written: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut errors = RepeatLog::new(Duration::from_secs(60));
        let mut retry_at = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Wake at the lease deadline too, not only on the next tick.
            let deadline = session.as_ref().map(|s| s.valid_until - self.margin());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            if let Some(s) = &session
                && Instant::now() + self.margin() >= s.valid_until
            {
                tracing::warn!(
                    replica = %self.config.name,
                    lease = s.lease,
                    owned = owned.len(),
                    "Cluster lease not renewed in time; stopping every owned plugin until a new lease is held."
                );
                self.park_all(&mut owned).await;
                written.clear();
                session = None;
            }
            if session.is_none() {
                if Instant::now() < retry_at {
                    continue;
                }
                match tokio::time::timeout(self.config.lease_ttl, self.open()).await {
                    Ok(Ok(s)) => {
                        tracing::info!(replica = %self.config.name, lease = s.lease, "Joined the cluster.");
                        session = Some(s);
                    }
                    Ok(Err(e)) => {
                        self.log_error(&mut errors, &format!("cannot join the cluster: {e}"));
                        retry_at = Instant::now() + Duration::from_secs(1);
                        continue;
                    }
                    Err(_) => {
                        self.log_error(&mut errors, "cannot join the cluster: timed out");
                        retry_at = Instant::now() + Duration::from_secs(1);
                        continue;
                    }
                }
            }
            let Some(s) = session.as_mut() else { continue };
            // Nothing in a round may run past the deadline: a hung etcd
            // call must not keep this replica acting as owner.
            let until = s.valid_until - self.margin();
            let round = tokio::time::timeout_at(
                until.into(),
                self.round(s, &mut owned, &mut written, &mut errors),
            )
            .await;
            if round == Ok(false) {
                tracing::warn!(replica = %self.config.name, lease = s.lease, "Cluster lease expired; stopping every owned plugin.");
                self.park_all(&mut owned).await;
                written.clear();
                session = None;
            }
            self.metrics.cluster_owned_plugins.set(owned.len() as i64);
        }
        if let Some(mut s) = session {
            let names: Vec<String> = owned.keys().cloned().collect();
            for p in names {
                let token = owned[&p];
                let _ = self.release(&mut s, &p, token).await;
                owned.remove(&p);
            }
            let _ = tokio::time::timeout(self.call_timeout(), s.client.lease_revoke(s.lease)).await;
            tracing::info!(replica = %self.config.name, "Left the cluster; owned plugins handed over.");
        }
        self.metrics.cluster_owned_plugins.set(0);
        Ok(())
    }

    /// Renew when due, then reconcile. `false`: the lease is gone.
    async fn round(
        &self,
        s: &mut Session,
        owned: &mut BTreeMap<String, i64>,
        written: &mut BTreeMap<String, BTreeMap<String, u64>>,
        errors: &mut RepeatLog,
    ) -> bool {
        match self.renew(s).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => self.log_error(errors, &format!("lease renewal failed: {e}")),
        }
        if Instant::now() + self.margin() >= s.valid_until {
            return true;
        }
        if let Err(e) = self.reconcile(s, owned, written).await {
            self.log_error(errors, &format!("ownership update failed: {e}"));
        }
        true
    }

    fn log_error(&self, errors: &mut RepeatLog, reason: &str) {
        if let Some(repeated) = errors.should_log(reason) {
            tracing::warn!(replica = %self.config.name, error = %reason, repeated, "Cluster coordination problem; retrying.");
        } else {
            self.metrics.suppressed("cluster");
        }
    }

    /// Connect, take a lease and register as a member.
    async fn open(&self) -> anyhow::Result<Session> {
        let mut client = connect_client(&EtcdClientConfig {
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(2),
            dial_timeout: self.call_timeout(),
            ..EtcdClientConfig::new(self.config.etcd.clone())
        })
        .await?;
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let sent = Instant::now();
        let grant = client.lease_grant(ttl, None).await?;
        let lease = grant.id();
        let (keeper, stream) = client.lease_client().keep_alive(lease).await?;
        let member = serde_json::json!({ "name": self.config.name }).to_string();
        client
            .put(
                self.key("members", &self.config.name),
                member,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(Session {
            client,
            lease,
            keeper,
            stream,
            valid_until: sent + Duration::from_secs(grant.ttl().max(0) as u64),
            next_renew: Instant::now() + self.config.lease_ttl / 3,
        })
    }

    /// Renew the lease when due. `Ok(false)`: the lease is gone.
    async fn renew(&self, s: &mut Session) -> anyhow::Result<bool> {
        let now = Instant::now();
        if now < s.next_renew {
            return Ok(true);
        }
        s.next_renew = now + self.config.lease_ttl / 3;
        let sent = Instant::now();
        let round = async {
            s.keeper.keep_alive().await?;
            s.stream.message().await
        };
        match tokio::time::timeout(self.call_timeout(), round).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                s.valid_until = sent + Duration::from_secs(r.ttl() as u64);
                Ok(true)
            }
            Ok(Ok(Some(_))) => Ok(false),
            Ok(Ok(None)) => {
                // The keepalive stream ended: open a new one for the same
                // lease (the lease lives on until its TTL).
                let (keeper, stream) = s.client.lease_client().keep_alive(s.lease).await?;
                s.keeper = keeper;
                s.stream = stream;
                s.next_renew = Instant::now();
                anyhow::bail!("keepalive stream ended")
            }
            Ok(Err(e)) => {
                if let Ok((keeper, stream)) = s.client.lease_client().keep_alive(s.lease).await {
                    s.keeper = keeper;
                    s.stream = stream;
                }
                s.next_renew = Instant::now();
                Err(e.into())
            }
            Err(_) => {
                s.next_renew = Instant::now();
                anyhow::bail!("no renewal answer within {:?}", self.call_timeout())
            }
        }
    }

    async fn list(
        &self,
        s: &mut Session,
        kind: &str,
    ) -> anyhow::Result<Vec<(String, String, i64, i64)>> {
        let prefix = format!("{}{kind}/", self.config.prefix);
        let resp = tokio::time::timeout(
            self.call_timeout(),
            s.client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| anyhow::anyhow!("listing {prefix} timed out"))??;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix)?;
                let value = String::from_utf8_lossy(kv.value()).into_owned();
                Some((key.to_owned(), value, kv.lease(), kv.create_revision()))
            })
            .collect())
    }

    /// One round: see who is alive and who owns what; claim, keep, hand
    /// over or give up plugins accordingly.
    async fn reconcile(
        &self,
        s: &mut Session,
        owned: &mut BTreeMap<String, i64>,
        written: &mut BTreeMap<String, BTreeMap<String, u64>>,
    ) -> anyhow::Result<()> {
        let members: BTreeSet<String> = self
            .list(s, "members")
            .await?
            .into_iter()
            .map(|(name, ..)| name)
            .collect();
        let owners: BTreeMap<String, Owner> = self
            .list(s, "owners")
            .await?
            .into_iter()
            .map(|(plugin, name, lease, token)| (plugin, Owner { name, lease, token }))
            .collect();
        self.metrics.cluster_replicas.set(members.len() as i64);
        let me = self.config.name.as_str();
        let lease = s.lease;
        let mine = |o: &Owner| o.name == me && o.lease == lease;
        let plugins: BTreeSet<String> = self.dispatcher.single_plugins().into_iter().collect();

        // Lost: taken by another, gone with an old lease, or unloaded here.
        let held: Vec<(String, i64)> = owned.iter().map(|(p, t)| (p.clone(), *t)).collect();
        for (p, token) in held {
            let still = owners.get(&p).is_some_and(|o| mine(o) && o.token == token);
            if !still {
                tracing::warn!(replica = %me, plugin = %p, "Lost the ownership of a plugin; stopped it here.");
                self.park(&p).await;
                owned.remove(&p);
                written.remove(&p);
            } else if !plugins.contains(&p) {
                let _ = self.release(s, &p, token).await;
                owned.remove(&p);
                written.remove(&p);
            }
        }

        let mut replay: BTreeSet<String> = BTreeSet::new();
        for p in &plugins {
            let desired = desired_owner(p, &members);
            match owners.get(p) {
                Some(o) if mine(o) => {
                    if !owned.contains_key(p) {
                        // Ours from before (a lost round trip): resume it.
                        let cursors = self.read_cursors(s, p).await?;
                        replay.extend(self.dispatcher.activate(
                            p,
                            cursors.as_ref(),
                            o.token as u64,
                        ));
                        owned.insert(p.clone(), o.token);
                    }
                    if desired.is_some_and(|d| d != me) {
                        self.release(s, p, o.token).await?;
                        owned.remove(p);
                        written.remove(p);
                    } else {
                        self.write_cursors(s, p, o.token, written).await?;
                    }
                }
                Some(_) if owned.remove(p).is_some() => {
                    self.park(p).await;
                    written.remove(p);
                }
                Some(_) => {}
                None if desired == Some(me) => {
                    if let Some((token, cursors)) = self.claim(s, p).await? {
                        if cursors.is_some() {
                            self.metrics.cluster_handovers.inc();
                        }
                        tracing::info!(replica = %me, plugin = %p, token, resumed = cursors.is_some(), "Took ownership of a plugin.");
                        replay.extend(self.dispatcher.activate(p, cursors.as_ref(), token as u64));
                        owned.insert(p.clone(), token);
                    }
                }
                None => {}
            }
        }
        if !replay.is_empty() {
            let _ = self.replay.send(replay.into_iter().collect());
        }
        let mut by_owner: BTreeMap<String, Vec<String>> =
            members.iter().map(|m| (m.clone(), Vec::new())).collect();
        for (p, o) in &owners {
            by_owner.entry(o.name.clone()).or_default().push(p.clone());
        }
        let mut r = self.report.write();
        r.lease_valid = true;
        r.lease = s.lease;
        r.owned = owned.keys().cloned().collect();
        r.replicas = by_owner
            .into_iter()
            .map(|(name, owns)| ReplicaReport { name, owns })
            .collect();
        Ok(())
    }

    async fn read_cursors(
        &self,
        s: &mut Session,
        plugin: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, u64>>> {
        let resp = tokio::time::timeout(
            self.call_timeout(),
            s.client.get(self.key("cursors", plugin), None),
        )
        .await
        .map_err(|_| anyhow::anyhow!("reading cursors timed out"))??;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Claim `plugin` if nobody owns it; returns the fencing token and the
    /// previous owner's cursors.
    async fn claim(
        &self,
        s: &mut Session,
        plugin: &str,
    ) -> anyhow::Result<Option<(i64, Option<BTreeMap<String, u64>>)>> {
        let owner = self.key("owners", plugin);
        let txn = Txn::new()
            .when([Compare::create_revision(owner.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    owner,
                    self.config.name.clone(),
                    Some(PutOptions::new().with_lease(s.lease)),
                ),
                TxnOp::get(self.key("cursors", plugin), None),
            ]);
        let resp = tokio::time::timeout(self.call_timeout(), s.client.txn(txn))
            .await
            .map_err(|_| anyhow::anyhow!("claim timed out"))??;
        if !resp.succeeded() {
            return Ok(None);
        }
        let token = resp.header().map_or(0, |h| h.revision());
        let cursors = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice(kv.value()).ok()),
            _ => None,
        });
        Ok(Some((token, cursors)))
    }

    /// The compares that hold only while this replica owns `plugin` with
    /// this lease and this token.
    fn fence(&self, s: &Session, plugin: &str, token: i64) -> Vec<Compare> {
        let owner = self.key("owners", plugin);
        vec![
            Compare::value(owner.clone(), CompareOp::Equal, self.config.name.clone()),
            Compare::lease(owner.clone(), CompareOp::Equal, s.lease),
            Compare::create_revision(owner, CompareOp::Equal, token),
        ]
    }

    /// Store the plugin's cursors when they moved, fenced.
    async fn write_cursors(
        &self,
        s: &mut Session,
        plugin: &str,
        token: i64,
        written: &mut BTreeMap<String, BTreeMap<String, u64>>,
    ) -> anyhow::Result<()> {
        let Some(cursors) = self.dispatcher.cluster_cursors(plugin) else {
            return Ok(());
        };
        if cursors.is_empty() || written.get(plugin) == Some(&cursors) {
            return Ok(());
        }
        let txn = Txn::new()
            .when(self.fence(s, plugin, token))
            .and_then([TxnOp::put(
                self.key("cursors", plugin),
                serde_json::to_string(&cursors)?,
                None,
            )]);
        let resp = tokio::time::timeout(self.call_timeout(), s.client.txn(txn))
            .await
            .map_err(|_| anyhow::anyhow!("cursor write timed out"))??;
        if resp.succeeded() {
            written.insert(plugin.to_owned(), cursors);
        }
        Ok(())
    }

    /// Hand `plugin` over: park it, store its final cursors and give up the
    /// owner key, in one fenced transaction.
    async fn release(&self, s: &mut Session, plugin: &str, token: i64) -> anyhow::Result<()> {
        let cursors = self.park(plugin).await.unwrap_or_default();
        let mut ops = vec![TxnOp::delete(self.key("owners", plugin), None)];
        if !cursors.is_empty() {
            ops.push(TxnOp::put(
                self.key("cursors", plugin),
                serde_json::to_string(&cursors)?,
                None,
            ));
        }
        let txn = Txn::new().when(self.fence(s, plugin, token)).and_then(ops);
        tokio::time::timeout(self.call_timeout(), s.client.txn(txn))
            .await
            .map_err(|_| anyhow::anyhow!("hand-over timed out"))??;
        tracing::info!(replica = %self.config.name, plugin = %plugin, "Handed a plugin over.");
        Ok(())
    }

    /// Park `plugin` off the async workers; returns its cursors.
    async fn park(&self, plugin: &str) -> Option<BTreeMap<String, u64>> {
        let d = self.dispatcher.clone();
        let p = plugin.to_owned();
        tokio::task::spawn_blocking(move || d.park(&p))
            .await
            .ok()
            .flatten()
    }

    async fn park_all(&self, owned: &mut BTreeMap<String, i64>) {
        let names: Vec<String> = std::mem::take(owned).into_keys().collect();
        let d = self.dispatcher.clone();
        // Every plugin stops taking events at once; then the calls in
        // flight are waited for.
        let _ = tokio::task::spawn_blocking(move || d.park_many(&names)).await;
        let mut r = self.report.write();
        r.lease_valid = false;
        r.owned.clear();
        self.metrics.cluster_owned_plugins.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_and_moves_only_what_it_must() {
        let three: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let plugins: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
        let owner = |p: &str, m: &BTreeSet<String>| desired_owner(p, m).unwrap().to_owned();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for p in &plugins {
            *counts.entry(owner(p, &three)).or_default() += 1;
        }
        assert!(counts.values().all(|&n| n > 60), "{counts:?}");
        // c leaves: only c's plugins move.
        let two: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        for p in &plugins {
            let before = owner(p, &three);
            if before != "c" {
                assert_eq!(owner(p, &two), before);
            }
        }
        assert_eq!(desired_owner("p", &BTreeSet::new()), None);
    }
}
