//! Nacos source: configs through the v1 long-polling listener, service
//! instances by polling, as put/delete events.
//!
//! Owns one listener loop for all configured configs (one upstream listen
//! per config, however many plugins subscribe: N5) and one polling loop per
//! service. It follows docs/RELIABILITY.md: every listen carries the MD5 of what
//! was delivered, so a change between polls is never lost (N1); a deleted
//! config (404) yields a delete and its MD5 resets to empty (N2); after a
//! failure the full listen set is re-sent at once (N3); plugins never run
//! here, so a slow one cannot stall the loop (N4). It must not know about
//! plugins or queues.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use governor::{Quota, RateLimiter};
use md5::{Digest as _, Md5};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::{Source, SourceContext, SourceFuture, WatchGroup, diff_snapshot};
use crate::backoff::Backoff;
use crate::event::Event;
use crate::telemetry::RepeatLog;

/// `kind = "nacos"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NacosSourceConfig {
    /// Unique source name.
    pub name: String,
    /// Always `"nacos"`.
    #[serde(default)]
    kind: Option<String>,
    /// Server URL, for example `"http://127.0.0.1:8848"`.
    pub server: String,
    /// Namespace (tenant) id; empty is the public namespace.
    #[serde(default)]
    pub namespace: String,
    /// Configs to listen to; key `<group>/<data-id>`, value the content,
    /// metadata `md5`.
    #[serde(default)]
    pub configs: Vec<NacosConfigRef>,
    /// Services whose healthy instances become keys
    /// `services/<service>/<ip>:<port>`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Group of the services. Default `DEFAULT_GROUP`.
    #[serde(default = "default_group")]
    pub service_group: String,
    /// User name (with `password`) for servers with auth enabled.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// How long the server may park a listen. Default `"30s"`.
    #[serde(default = "default_long_poll", with = "humantime_serde")]
    pub long_poll_timeout: Duration,
    /// How often service instance lists are read. Default `"5s"`.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Least time between two listens, so a misbehaving server cannot
    /// cause a busy loop. Default `"100ms"`.
    #[serde(default = "super::default_min_interval", with = "humantime_serde")]
    pub min_interval: Duration,
    /// First delay after a failure; doubles up to `reconnect_max_ms`, with
    /// jitter. Default 200.
    #[serde(default = "super::default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest delay after failures. Default 30 000.
    #[serde(default = "super::default_http_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// One config to listen to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NacosConfigRef {
    /// The data id.
    pub data_id: String,
    /// The group. Default `DEFAULT_GROUP`.
    #[serde(default = "default_group")]
    pub group: String,
}

fn default_group() -> String {
    "DEFAULT_GROUP".to_owned()
}
fn default_long_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}

impl NacosSourceConfig {
    /// Check what serde cannot.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn validate(&mut self) -> Result<(), String> {
        self.server = super::http_base_url("server", &self.server, "http://127.0.0.1:8848")?;
        if self.configs.is_empty() && self.services.is_empty() {
            return Err("nothing to watch: set `configs`, `services`, or both".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.configs {
            if c.data_id.is_empty() || c.group.is_empty() {
                return Err("configs: `data_id` and `group` must not be empty".into());
            }
            if !seen.insert(c.clone()) {
                return Err(format!(
                    "configs: {}/{} is listed twice",
                    c.group, c.data_id
                ));
            }
        }
        if self.username.is_some() != self.password.is_some() {
            return Err("`username` and `password` go together".into());
        }
        if self.long_poll_timeout < Duration::from_millis(100)
            || self.poll_interval.is_zero()
            || self.min_interval.is_zero()
        {
            return Err(
                "long_poll_timeout must be at least 100ms; poll_interval and min_interval above zero"
                    .into(),
            );
        }
        super::check_reconnect(self.reconnect_initial_ms, self.reconnect_max_ms)
    }
}

/// The Nacos source.
pub struct NacosSource {
    config: NacosSourceConfig,
}

impl NacosSource {
    /// A source for `config` (already validated).
    pub fn new(config: NacosSourceConfig) -> Self {
        NacosSource { config }
    }
}

/// Lower-case hex MD5, as Nacos computes it.
fn md5_hex(content: &[u8]) -> String {
    Md5::digest(content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Shared {
    config: NacosSourceConfig,
    client: reqwest::Client,
    ctx: SourceContext,
    group: Arc<WatchGroup>,
    token: tokio::sync::Mutex<Option<String>>,
}

impl Source for NacosSource {
    fn run(self: Box<Self>, ctx: SourceContext) -> SourceFuture {
        Box::pin(async move {
            let config = self.config;
            let client = reqwest::Client::builder()
                .timeout(config.long_poll_timeout + Duration::from_secs(10))
                .connect_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
            let watches = usize::from(!config.configs.is_empty()) + config.services.len();
            let shared = Arc::new(Shared {
                group: WatchGroup::new(ctx.status.clone(), watches),
                client,
                ctx: ctx.clone(),
                token: tokio::sync::Mutex::new(None),
                config,
            });
            let mut loops = JoinSet::new();
            let mut i = 0;
            if !shared.config.configs.is_empty() {
                loops.spawn(configs_loop(shared.clone(), i));
                i += 1;
            }
            for service in shared.config.services.clone() {
                loops.spawn(service_loop(shared.clone(), i, service));
                i += 1;
            }
            ctx.shutdown.cancelled().await;
            loops.shutdown().await;
            Ok(())
        })
    }
}

impl Shared {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.server)
    }

    /// The access token, logging in first when credentials are set.
    async fn token(&self) -> Result<Option<String>, String> {
        let (Some(user), Some(pass)) = (&self.config.username, &self.config.password) else {
            return Ok(None);
        };
        let mut token = self.token.lock().await;
        if token.is_none() {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Login {
                access_token: String,
            }
            let resp = self
                .client
                .post(self.url("/nacos/v1/auth/login"))
                .form(&[("username", user.as_str()), ("password", pass.as_str())])
                .send()
                .await
                .map_err(|e| format!("login: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("login: HTTP {}", resp.status()));
            }
            let login: Login = resp.json().await.map_err(|e| format!("login: {e}"))?;
            *token = Some(login.access_token);
        }
        Ok(token.clone())
    }

    /// Forget the token after the server refused it.
    async fn refused(&self, status: reqwest::StatusCode) {
        if status == reqwest::StatusCode::FORBIDDEN || status == reqwest::StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
        }
    }

    /// Read one config: `Some(content)`, or `None` when it does not exist.
    async fn get_config(&self, c: &NacosConfigRef) -> Result<Option<Bytes>, String> {
        let mut query = vec![("dataId", c.data_id.clone()), ("group", c.group.clone())];
        if !self.config.namespace.is_empty() {
            query.push(("tenant", self.config.namespace.clone()));
        }
        if let Some(t) = self.token().await? {
            query.push(("accessToken", t));
        }
        let resp = self
            .client
            .get(self.url("/nacos/v1/cs/configs"))
            .query(&query)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match resp.status() {
            s if s.is_success() => Ok(Some(resp.bytes().await.map_err(|e| e.to_string())?)),
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            s => {
                self.refused(s).await;
                Err(format!("GET config {}/{}: HTTP {s}", c.group, c.data_id))
            }
        }
    }

    /// One listen: the configs whose MD5 differs from `md5s`, as
    /// `(data_id, group)` pairs; empty when the poll timed out.
    async fn listen(
        &self,
        md5s: &BTreeMap<NacosConfigRef, String>,
    ) -> Result<Vec<(String, String)>, String> {
        let tenant = &self.config.namespace;
        let mut listening = String::new();
        for (c, md5) in md5s {
            listening.push_str(&c.data_id);
            listening.push('\u{2}');
            listening.push_str(&c.group);
            listening.push('\u{2}');
            listening.push_str(md5);
            if !tenant.is_empty() {
                listening.push('\u{2}');
                listening.push_str(tenant);
            }
            listening.push('\u{1}');
        }
        let mut req = self
            .client
            .post(self.url("/nacos/v1/cs/configs/listener"))
            .header(
                "Long-Pulling-Timeout",
                self.config.long_poll_timeout.as_millis().to_string(),
            )
            .form(&[("Listening-Configs", listening.as_str())]);
        if let Some(t) = self.token().await? {
            req = req.query(&[("accessToken", t)]);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        if !status.is_success() {
            self.refused(status).await;
            return Err(format!("listen: HTTP {status}"));
        }
        let body = resp.text().await.map_err(|e| e.to_string())?;
        let decoded = percent_encoding::percent_decode_str(&body.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        Ok(decoded
            .split('\u{1}')
            .filter(|e| !e.trim().is_empty())
            .filter_map(|e| {
                let mut parts = e.split('\u{2}');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            })
            .collect())
    }
}

fn config_key(c: &NacosConfigRef) -> String {
    format!("{}/{}", c.group, c.data_id)
}

fn backoff_for(c: &NacosSourceConfig) -> Backoff {
    Backoff::new(
        Duration::from_millis(c.reconnect_initial_ms),
        Duration::from_millis(c.reconnect_max_ms),
    )
}

async fn configs_loop(s: Arc<Shared>, i: usize) {
    let mut backoff = backoff_for(&s.config);
    let mut errors = RepeatLog::new(Duration::from_secs(60));
    let quota = Quota::with_period(s.config.min_interval)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::MIN);
    let limiter = RateLimiter::direct(quota);
    // What was delivered: MD5 ("" when absent) and content per config.
    let mut md5s: BTreeMap<NacosConfigRef, String> = s
        .config
        .configs
        .iter()
        .map(|c| (c.clone(), String::new()))
        .collect();
    let mut contents: BTreeMap<NacosConfigRef, Bytes> = BTreeMap::new();
    let mut revision = s.ctx.revision_base;
    // The first read of every config, as the initial snapshot.
    let mut pending: Vec<NacosConfigRef> = s.config.configs.clone();
    let mut first = true;
    let keys: Vec<String> = s.config.configs.iter().map(config_key).collect();
    let scope = |key: &str| keys.iter().any(|k| k == key);
    loop {
        if !pending.is_empty() {
            let mut events = Vec::new();
            let mut error = None;
            for c in &pending {
                let fetched = tokio::select! {
                    _ = s.ctx.shutdown.cancelled() => return,
                    f = s.get_config(c) => f,
                };
                match fetched {
                    Ok(new) => {
                        let md5 = new.as_ref().map_or(String::new(), |b| md5_hex(b));
                        if md5 == md5s[c] {
                            continue;
                        }
                        let key = config_key(c);
                        let prev = contents.get(c).cloned();
                        let e = match &new {
                            Some(b) => {
                                contents.insert(c.clone(), b.clone());
                                let mut e = Event::put(&s.ctx.name, key, b.clone(), revision + 1)
                                    .with_prev(prev);
                                e.metadata = thin_vec::thin_vec![("md5".to_owned(), md5.clone())];
                                e
                            }
                            None => {
                                contents.remove(c);
                                Event::delete(&s.ctx.name, key, revision + 1).with_prev(prev)
                            }
                        };
                        md5s.insert(c.clone(), md5);
                        events.push(e);
                    }
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if first && error.is_none() {
                // The whole initial state, as a snapshot of the configs.
                first = false;
                revision += 1;
                s.ctx.emit_snapshot_of(&scope, events);
            } else if !events.is_empty() {
                revision += 1;
                s.ctx.emit(events);
            }
            if let Some(e) = error {
                // Re-read everything after the failure: the listen that
                // follows compares every MD5 anyway.
                pending = s.config.configs.clone();
                if !s
                    .ctx
                    .wait_after_failure(&s.group, i, e, &mut backoff, &mut errors)
                    .await
                {
                    return;
                }
                continue;
            }
            pending.clear();
            s.group.succeeded(i);
            backoff.reset();
        }
        tokio::select! {
            _ = s.ctx.shutdown.cancelled() => return,
            _ = limiter.until_ready() => {}
        }
        let listened = tokio::select! {
            _ = s.ctx.shutdown.cancelled() => return,
            l = s.listen(&md5s) => l,
        };
        match listened {
            Ok(changed) => {
                s.group.succeeded(i);
                backoff.reset();
                pending = s
                    .config
                    .configs
                    .iter()
                    .filter(|c| {
                        changed
                            .iter()
                            .any(|(d, g)| *d == c.data_id && *g == c.group)
                    })
                    .cloned()
                    .collect();
            }
            Err(e) => {
                if !s
                    .ctx
                    .wait_after_failure(&s.group, i, e, &mut backoff, &mut errors)
                    .await
                {
                    return;
                }
            }
        }
    }
}

/// One instance of `/nacos/v1/ns/instance/list`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Host {
    ip: String,
    port: u16,
    #[serde(default = "yes")]
    healthy: bool,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    weight: f64,
    #[serde(default)]
    cluster_name: String,
    #[serde(default)]
    instance_id: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct InstanceList {
    #[serde(default)]
    hosts: Vec<Host>,
}

/// The value of a `services/<service>/<ip>:<port>` key.
#[derive(Debug, Serialize)]
struct InstanceValue<'a> {
    service: &'a str,
    ip: &'a str,
    port: u16,
    healthy: bool,
    weight: f64,
    cluster: &'a str,
    instance_id: &'a str,
    metadata: &'a BTreeMap<String, String>,
}

async fn service_loop(s: Arc<Shared>, i: usize, service: String) {
    let mut backoff = backoff_for(&s.config);
    let mut errors = RepeatLog::new(Duration::from_secs(60));
    let mut known: BTreeMap<String, Bytes> = BTreeMap::new();
    let mut revision = s.ctx.revision_base;
    let mut first = true;
    let prefix = format!("services/{service}/");
    let scope = |key: &str| key.starts_with(&prefix);
    loop {
        let fetched = tokio::select! {
            _ = s.ctx.shutdown.cancelled() => return,
            f = fetch_instances(&s, &service) => f,
        };
        match fetched {
            Ok(now) => {
                let events = diff_snapshot(&s.ctx.name, &known, &now, revision + 1, false);
                if std::mem::take(&mut first) {
                    revision += 1;
                    s.ctx.emit_snapshot_of(&scope, events);
                } else if !events.is_empty() {
                    revision += 1;
                    s.ctx.emit(events);
                }
                known = now;
                s.group.succeeded(i);
                backoff.reset();
                tokio::select! {
                    _ = s.ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(s.config.poll_interval) => {}
                }
            }
            Err(e) => {
                let reason = format!("service {service}: {e}");
                let group = &s.group;
                if !s
                    .ctx
                    .wait_after_failure(group, i, reason, &mut backoff, &mut errors)
                    .await
                {
                    return;
                }
            }
        }
    }
}

async fn fetch_instances(s: &Shared, service: &str) -> Result<BTreeMap<String, Bytes>, String> {
    let mut query = vec![
        ("serviceName", service.to_owned()),
        ("groupName", s.config.service_group.clone()),
        ("healthyOnly", "true".to_owned()),
    ];
    if !s.config.namespace.is_empty() {
        query.push(("namespaceId", s.config.namespace.clone()));
    }
    if let Some(t) = s.token().await? {
        query.push(("accessToken", t));
    }
    let resp = s
        .client
        .get(s.url("/nacos/v1/ns/instance/list"))
        .query(&query)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        s.refused(status).await;
        return Err(format!("HTTP {status}"));
    }
    let list: InstanceList = resp.json().await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for h in &list.hosts {
        // The healthy flag is honoured even if the server ignored
        // healthyOnly; disabled instances take no traffic either.
        if !h.healthy || !h.enabled {
            continue;
        }
        let value = InstanceValue {
            service,
            ip: &h.ip,
            port: h.port,
            healthy: h.healthy,
            weight: h.weight,
            cluster: &h.cluster_name,
            instance_id: &h.instance_id,
            metadata: &h.metadata,
        };
        let json = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
        out.insert(
            format!("services/{service}/{}:{}", h.ip, h.port),
            Bytes::from(json),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_nacos() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"hello"), "5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn validation_names_the_problem() {
        let parse = |t: &str| -> NacosSourceConfig { toml::from_str(t).unwrap() };
        let mut c = parse("name = \"n\"\nserver = \"127.0.0.1:8848\"\nservices = [\"a\"]\n");
        assert!(c.validate().unwrap_err().contains("URL"));
        let mut c = parse("name = \"n\"\nserver = \"http://h\"\n");
        assert!(c.validate().unwrap_err().contains("nothing to watch"));
        let mut c = parse(
            "name = \"n\"\nserver = \"http://h\"\nconfigs = [{ data_id = \"a\" }, { data_id = \"a\", group = \"DEFAULT_GROUP\" }]\n",
        );
        assert!(c.validate().unwrap_err().contains("twice"));
    }
}
