//! Consul source: healthy service instances and a KV prefix as put/delete
//! events, through blocking queries.
//!
//! Owns one blocking-query loop per watched service (`/v1/health/service`,
//! passing instances only) and one for the KV prefix (`/v1/kv?recurse`).
//! Each loop keeps the last answer and emits the difference, so an
//! instance that is deregistered or turns critical yields a delete, and the
//! empty list is a real state (C5). It follows docs/RELIABILITY.md: the index is
//! reset when it goes backwards and never used below 1 (C1); a return
//! without a change emits nothing (C2); the HTTP timeout exceeds wait plus
//! jitter (C3); polls are rate limited and errors back off (C4). It must not
//! know about plugins or queues.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::{Source, SourceContext, SourceFuture, WatchGroup, diff_snapshot};
use crate::backoff::Backoff;
use crate::telemetry::RepeatLog;

/// `kind = "consul"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSourceConfig {
    /// Unique source name.
    pub name: String,
    /// Always `"consul"`.
    #[serde(default)]
    kind: Option<String>,
    /// Agent or server URL, for example `"http://127.0.0.1:8500"`.
    pub address: String,
    /// Services whose passing instances become keys
    /// `services/<service>/<instance-id>`.
    #[serde(default)]
    pub services: Vec<String>,
    /// A KV prefix whose keys become events (the full Consul key, the
    /// `ModifyIndex` as revision).
    pub kv_prefix: Option<String>,
    /// ACL token, sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Datacenter to query; default the agent's.
    pub datacenter: Option<String>,
    /// Longest a blocking query waits, at most 10 minutes. Default `"5m"`.
    #[serde(default = "default_wait", with = "humantime_serde")]
    pub wait: Duration,
    /// Allow stale reads from any server (faster, possibly behind; a lost
    /// leader is logged).
    #[serde(default)]
    pub stale: bool,
    /// Least time between two queries of one watch, so churn cannot become a
    /// busy loop. Default `"100ms"`.
    #[serde(default = "super::default_min_interval", with = "humantime_serde")]
    pub min_interval: Duration,
    /// First delay after a failed query; doubles up to `reconnect_max_ms`,
    /// with jitter. Default 200.
    #[serde(default = "super::default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest delay after failures. Default 30 000.
    #[serde(default = "super::default_http_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn default_wait() -> Duration {
    Duration::from_secs(300)
}

impl ConsulSourceConfig {
    /// Check what serde cannot.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&mut self) -> Result<(), String> {
        self.address = super::http_base_url("address", &self.address, "http://127.0.0.1:8500")?;
        if self.services.is_empty() && self.kv_prefix.is_none() {
            return Err("nothing to watch: set `services`, `kv_prefix`, or both".into());
        }
        if self.wait.is_zero() || self.wait > Duration::from_secs(600) {
            return Err(format!(
                "wait = {:?} must be between 1ms and 10m (Consul caps blocking queries at 10 minutes)",
                self.wait
            ));
        }
        if self.min_interval.is_zero() {
            return Err("min_interval must be above zero".into());
        }
        super::check_reconnect(self.reconnect_initial_ms, self.reconnect_max_ms)
    }
}

/// The Consul source.
pub struct ConsulSource {
    config: ConsulSourceConfig,
}

impl ConsulSource {
    /// A source for `config` (already validated).
    pub fn new(config: ConsulSourceConfig) -> Self {
        ConsulSource { config }
    }
}

/// What one loop watches.
#[derive(Debug, Clone)]
enum Target {
    Service(String),
    Kv(String),
}

impl Target {
    fn path(&self) -> String {
        match self {
            Target::Service(s) => format!("/v1/health/service/{s}"),
            Target::Kv(p) => format!("/v1/kv/{p}"),
        }
    }
}

impl Source for ConsulSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture {
        Box::pin(async move {
            let c = Arc::new(self.config);
            // C3: longer than the longest blocking query plus its jitter.
            let client = reqwest::Client::builder()
                .timeout(c.wait + c.wait / 16 + Duration::from_secs(10))
                .connect_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
            let mut targets: Vec<Target> =
                c.services.iter().cloned().map(Target::Service).collect();
            if let Some(p) = &c.kv_prefix {
                targets.push(Target::Kv(p.clone()));
            }
            let group = WatchGroup::new(ctx.status.clone(), targets.len());
            let mut loops = JoinSet::new();
            for (i, target) in targets.into_iter().enumerate() {
                let w = Watch {
                    i,
                    target,
                    config: c.clone(),
                    client: client.clone(),
                    ctx: ctx.clone(),
                    group: group.clone(),
                };
                loops.spawn(w.run());
            }
            ctx.shutdown.cancelled().await;
            loops.shutdown().await;
            Ok(())
        })
    }
}

/// One entry of `/v1/health/service`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: Node,
    service: Service,
    #[serde(default)]
    checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    node: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    datacenter: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
}

/// One entry of `/v1/kv?recurse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    modify_index: u64,
}

/// The value of a `services/<service>/<id>` key.
#[derive(Debug, Serialize)]
struct InstanceValue<'a> {
    id: &'a str,
    service: &'a str,
    address: &'a str,
    port: u16,
    tags: &'a [String],
    meta: BTreeMap<String, String>,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    datacenter: Option<&'a str>,
    status: &'a str,
}

/// The blocking-query index to send next (C1): reset to 0 when it went
/// backwards, never below 1 otherwise.
fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned.max(1)
    }
}

struct Watch {
    i: usize,
    target: Target,
    config: Arc<ConsulSourceConfig>,
    client: reqwest::Client,
    ctx: SourceContext,
    group: Arc<WatchGroup>,
}

/// A fetched state: keys and per-key revisions, and the response index.
struct Fetched {
    index: u64,
    keys: BTreeMap<String, (Bytes, u64)>,
    known_leader: bool,
}

impl Watch {
    async fn run(self) {
        let mut index = 0u64;
        let mut known: BTreeMap<String, Bytes> = BTreeMap::new();
        let mut backoff = Backoff::new(
            Duration::from_millis(self.config.reconnect_initial_ms),
            Duration::from_millis(self.config.reconnect_max_ms),
        );
        let mut errors = RepeatLog::new(Duration::from_secs(60));
        let every = NonZeroU32::new(1).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(self.config.min_interval)
            .unwrap_or_else(|| Quota::per_second(every))
            .allow_burst(every);
        let limiter = RateLimiter::direct(quota);
        let mut failed = false;
        let mut first = true;
        // The keys this watch owns within the source, for its first answer:
        // delivered as a snapshot of them, so a restarted source reports
        // only what changed meanwhile.
        let services: Vec<String> = self
            .config
            .services
            .iter()
            .map(|s| format!("services/{s}/"))
            .collect();
        let scope = |key: &str| -> bool {
            match &self.target {
                Target::Service(s) => key.starts_with(&format!("services/{s}/")),
                Target::Kv(p) => {
                    key.starts_with(p.as_str())
                        && !services.iter().any(|s| key.starts_with(s.as_str()))
                }
            }
        };
        loop {
            // C4: at most one query per min_interval, whatever the server does.
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = limiter.until_ready() => {}
            }
            let fetched = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                f = self.fetch(index) => f,
            };
            match fetched {
                Ok(f) => {
                    if !f.known_leader
                        && let Some(n) = errors.should_log("no known leader")
                    {
                        tracing::warn!(source = %self.ctx.name, watch = %self.target.path(), repeated = n, "Consul answered without a known leader; the data may be stale.");
                    }
                    if f.index < index {
                        tracing::info!(source = %self.ctx.name, watch = %self.target.path(), from = index, to = f.index, "Consul index went backwards; resetting it.");
                    }
                    let revision = f.index.max(1);
                    let new: BTreeMap<String, Bytes> = f
                        .keys
                        .iter()
                        .map(|(k, (v, _))| (k.clone(), v.clone()))
                        .collect();
                    // C2: a return is not a change; only differences are emitted.
                    let mut events = diff_snapshot(&self.ctx.name, &known, &new, revision, false);
                    for e in &mut events {
                        if let Some((_, rev)) = f.keys.get(&*e.key) {
                            e.revision = (*rev).max(1);
                        }
                    }
                    known = new;
                    if std::mem::take(&mut first) {
                        self.ctx.emit_snapshot_of(&scope, events);
                    } else {
                        self.ctx.emit(events);
                    }
                    self.group.succeeded(self.i);
                    if failed {
                        failed = false;
                        backoff.reset();
                        tracing::info!(source = %self.ctx.name, watch = %self.target.path(), "Consul watch recovered.");
                    }
                    index = next_index(index, f.index);
                }
                Err(e) => {
                    let reason = format!("{}: {e}", self.target.path());
                    failed = true;
                    // The next query after a failure is a fresh read.
                    index = 0;
                    let waited = self
                        .ctx
                        .wait_after_failure(&self.group, self.i, reason, &mut backoff, &mut errors)
                        .await;
                    if !waited {
                        return;
                    }
                }
            }
        }
    }

    async fn fetch(&self, index: u64) -> Result<Fetched, String> {
        let c = &self.config;
        let url = format!("{}{}", c.address, self.target.path());
        let mut query: Vec<(&str, String)> = Vec::new();
        match &self.target {
            Target::Service(_) => query.push(("passing", "true".into())),
            Target::Kv(_) => query.push(("recurse", "true".into())),
        }
        if index > 0 {
            query.push(("index", index.to_string()));
            query.push(("wait", format!("{}ms", c.wait.as_millis())));
        }
        if let Some(dc) = &c.datacenter {
            query.push(("dc", dc.clone()));
        }
        if c.stale {
            query.push(("stale", "true".into()));
        }
        let mut req = self.client.get(&url).query(&query);
        if let Some(t) = &c.token {
            req = req.header("X-Consul-Token", t);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let returned = header("X-Consul-Index")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let known_leader = header("X-Consul-KnownLeader").is_none_or(|v| v == "true");
        let empty_kv =
            status == reqwest::StatusCode::NOT_FOUND && matches!(self.target, Target::Kv(_));
        if !status.is_success() && !empty_kv {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", body.trim()));
        }
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        let mut keys = BTreeMap::new();
        match &self.target {
            Target::Service(_) if !body.is_empty() => {
                let entries: Vec<HealthEntry> =
                    serde_json::from_slice(&body).map_err(|e| format!("bad health answer: {e}"))?;
                for e in entries {
                    if !e.checks.iter().all(|c| c.status == "passing") {
                        continue;
                    }
                    let address = if e.service.address.is_empty() {
                        &e.node.address
                    } else {
                        &e.service.address
                    };
                    let value = InstanceValue {
                        id: &e.service.id,
                        service: &e.service.service,
                        address,
                        port: e.service.port,
                        tags: e.service.tags.as_deref().unwrap_or_default(),
                        meta: e.service.meta.clone().unwrap_or_default(),
                        node: &e.node.node,
                        datacenter: e.node.datacenter.as_deref(),
                        status: "passing",
                    };
                    let json = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
                    keys.insert(
                        format!("services/{}/{}", e.service.service, e.service.id),
                        (Bytes::from(json), returned),
                    );
                }
            }
            Target::Kv(_) if !empty_kv && !body.is_empty() => {
                let entries: Vec<KvEntry> =
                    serde_json::from_slice(&body).map_err(|e| format!("bad KV answer: {e}"))?;
                for e in entries {
                    let value = match e.value {
                        Some(v) => base64::engine::general_purpose::STANDARD
                            .decode(v)
                            .map_err(|err| format!("bad base64 in {:?}: {err}", e.key))?,
                        None => Vec::new(),
                    };
                    keys.insert(e.key, (Bytes::from(value), e.modify_index));
                }
            }
            _ => {}
        }
        Ok(Fetched {
            index: returned,
            keys,
            known_leader,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_resets_when_backwards_and_is_never_below_one() {
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(10, 10), 10);
        assert_eq!(next_index(10, 3), 0);
        assert_eq!(next_index(5, 0), 0);
        assert_eq!(next_index(0, 7), 7);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c: ConsulSourceConfig =
            toml::from_str("name = \"c\"\naddress = \"127.0.0.1:8500\"\nservices = [\"web\"]\n")
                .unwrap();
        assert!(c.validate().unwrap_err().contains("URL"));
        let mut c: ConsulSourceConfig =
            toml::from_str("name = \"c\"\naddress = \"http://127.0.0.1:8500/\"\n").unwrap();
        assert!(c.validate().unwrap_err().contains("nothing to watch"));
        let mut c: ConsulSourceConfig = toml::from_str(
            "name = \"c\"\naddress = \"http://127.0.0.1:8500/\"\nservices = [\"web\"]\nwait = \"11m\"\n",
        )
        .unwrap();
        assert!(c.validate().unwrap_err().contains("10m"));
    }
}
