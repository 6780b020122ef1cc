//! A fake Nacos server on loopback, speaking the v1 HTTP open API for
//! configs and naming, for tests of watchgate's Nacos source without a JVM.
//!
//! It is a [`LoopbackServer`] (it binds `127.0.0.1` only), so the test
//! drives it from synchronous code. It models the
//! endpoints of the Nacos 2.x Open API guide (the v1 HTTP API that 2.x
//! servers still serve) and, where the guide is silent, what the 2.x
//! server's v1 handlers (`ConfigController`, `LongPollingService`,
//! `MD5Util`, `InstanceController`) do:
//!
//! - `GET /nacos/v1/cs/configs?dataId&group[&tenant]`: `200`
//!   `text/plain;charset=UTF-8` with the content and a `Content-MD5`
//!   header, or `404` `config data not exist\n` (Nacos writes it with
//!   `println`). A blank `dataId` or `group` is a `400`.
//! - `POST /nacos/v1/cs/configs` (form `dataId`, `group`, `content`,
//!   `tenant`) and `DELETE /nacos/v1/cs/configs?dataId&group[&tenant]`
//!   publish and delete, answering `true`, like
//!   [`FakeNacos::publish_config`] and [`FakeNacos::delete_config`].
//! - `POST /nacos/v1/cs/configs/listener`: the form field
//!   `Listening-Configs` (parameters are read from the query string and,
//!   only with `Content-Type: application/x-www-form-urlencoded`, from the
//!   body, as a servlet container does) holds entries
//!   `dataId^2group^2md5^1` or `dataId^2group^2md5^2tenant^1`. An entry
//!   whose MD5 differs from the server's (the empty string for an absent
//!   config) is changed. Changed entries are answered at once, `200` with
//!   the body `URLEncoder.encode("dataId^2group[^2tenant]^1…") + "\n"`
//!   (tenant only when not empty). Otherwise, with the `Long-Pulling-Timeout:
//!   <ms>` header (sic), the request is parked until one of its configs
//!   changes, answered with just that key, or until the timeout, answered
//!   `200` with an empty body; with `Long-Pulling-No-Hangup: true` as well
//!   it is answered at once with an empty body. Without the timeout header
//!   it is a short poll: `200` at once, empty body, the result in the
//!   `Probe-Modify-Response` (`dataId:group;…`) and
//!   `Probe-Modify-Response-New` (encoded as above) headers, as 2.x does
//!   for clients that send no `Client-Version`. A missing, blank or
//!   malformed field is a `400`.
//! - A config "changes" when its MD5 changes: publishing the same content
//!   again wakes nobody (Nacos fires `LocalDataChangeEvent` only on a new
//!   MD5); a delete does, and its MD5 becomes empty.
//! - `GET /nacos/v1/ns/instance/list?serviceName[&groupName][&namespaceId]
//!   [&clusters][&healthyOnly]`: the 2.x JSON shape (`name` is
//!   `group@@service`, `hosts` with `instanceId` `ip#port#DEFAULT#group@@service`);
//!   `groupName` defaults to `DEFAULT_GROUP`, a `serviceName` of the form
//!   `group@@service` is taken as is, `healthyOnly=true` leaves out
//!   unhealthy hosts, an unknown service has `hosts: []`. Instances live in
//!   the `public` namespace (the default) in cluster `DEFAULT`.
//! - Other paths are `404`; a known path with another method is `405`.
//!
//! Deliberate differences from a real server:
//! - A parked poll waits exactly `Long-Pulling-Timeout` ms; Nacos waits
//!   `max(10 s, timeout - 500 ms)`. Tests can then use short timeouts.
//! - `Listening-Configs` is form-decoded once; Nacos decodes it a second
//!   time, which only matters for names containing `%` or `+`.
//! - A parked poll whose client hangs up is dropped at once (hyper notices
//!   the closed connection); Nacos holds it until its timeout.
//! - [`FakeNacos::restart`] keeps every instance; a real restart loses
//!   ephemeral instances until their clients register again.
//!
//! Not modelled: the 2.x gRPC long connections (port 9848) and UDP push,
//! the v2/v3 HTTP APIs, auth (`accessToken`, `username` are ignored),
//! clusters (raft, distro), beta/tag/gray configs, config history, instance
//! registration over HTTP, heartbeats and ephemeral expiry, the protection
//! threshold, and namespaces for naming other than `public`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode};
use md5::{Digest, Md5};
use tokio::sync::oneshot;

use crate::loopback::{HttpResponse, LoopbackServer, http_response};

/// Separates the words of a `Listening-Configs` entry (`%02`).
const WORD_SEPARATOR: char = '\u{2}';
/// Ends a `Listening-Configs` entry (`%01`).
const LINE_SEPARATOR: char = '\u{1}';
/// The group a naming query without `groupName` means.
const DEFAULT_GROUP: &str = "DEFAULT_GROUP";
/// The only naming namespace.
const PUBLIC_NAMESPACE: &str = "public";
/// The only cluster.
const DEFAULT_CLUSTER: &str = "DEFAULT";

/// Lower-case hex MD5 of the UTF-8 bytes of `content`, as Nacos computes a
/// config's MD5 (`MD5Utils.md5Hex(content, "UTF-8")`).
pub fn md5_hex(content: &str) -> String {
    Md5::digest(content.as_bytes())
        .iter()
        .fold(String::with_capacity(32), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// A running fake Nacos. See the module docs for what it models.
pub struct FakeNacos {
    server: LoopbackServer,
    shared: Arc<Shared>,
}

impl FakeNacos {
    /// Listen on `127.0.0.1:0` and serve until dropped.
    pub fn start() -> FakeNacos {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            listen_requests: AtomicU64::new(0),
        });
        let server = LoopbackServer::start_http("fake Nacos", {
            let shared = shared.clone();
            move |req| {
                let shared = shared.clone();
                async move { route(&shared, req).await }
            }
        });
        FakeNacos { server, shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Create or update a config; wakes the parked listeners holding it if
    /// its MD5 changed. `tenant` `""` is the default namespace.
    pub fn publish_config(&self, data_id: &str, group: &str, tenant: &str, content: &str) {
        self.shared
            .store()
            .publish(ConfigKey::new(data_id, group, tenant), content);
    }

    /// Delete a config (a no-op if absent); wakes the parked listeners
    /// holding it.
    pub fn delete_config(&self, data_id: &str, group: &str, tenant: &str) {
        self.shared
            .store()
            .delete(&ConfigKey::new(data_id, group, tenant));
    }

    /// Register an instance of `group@@service` in the `public` namespace,
    /// or update its health if it is registered.
    pub fn register_instance(
        &self,
        service: &str,
        group: &str,
        ip: &str,
        port: u16,
        healthy: bool,
    ) {
        self.shared
            .store()
            .services
            .entry(ServiceKey::new(service, group))
            .or_default()
            .insert((ip.to_owned(), port), healthy);
    }

    /// Set an instance's health. Panics if it is not registered.
    pub fn set_healthy(&self, service: &str, group: &str, ip: &str, port: u16, healthy: bool) {
        let mut store = self.shared.store();
        let instance = store
            .services
            .get_mut(&ServiceKey::new(service, group))
            .and_then(|hosts| hosts.get_mut(&(ip.to_owned(), port)))
            .unwrap_or_else(|| panic!("{group}@@{service} has no instance {ip}:{port}"));
        *instance = healthy;
    }

    /// Remove an instance (a no-op if absent).
    pub fn deregister_instance(&self, service: &str, group: &str, ip: &str, port: u16) {
        let mut store = self.shared.store();
        let key = ServiceKey::new(service, group);
        if let Some(hosts) = store.services.get_mut(&key) {
            hosts.remove(&(ip.to_owned(), port));
            if hosts.is_empty() {
                store.services.remove(&key);
            }
        }
    }

    /// Abort every open connection with a TCP RST, parked long polls
    /// included (their clients see an error mid-poll), and return once they
    /// are closed. The state and the port are kept; new connections are
    /// served as before.
    pub fn restart(&self) {
        self.server.reset_all();
    }

    /// While down, every new connection is accepted and reset at once (the
    /// nearest a listening socket gets to "connection refused"); going down
    /// also aborts the open connections, as [`FakeNacos::restart`] does.
    pub fn set_down(&self, down: bool) {
        self.server.set_down(down);
    }

    /// Long-poll listener requests parked right now.
    pub fn parked_listeners(&self) -> usize {
        self.shared.store().parked.len()
    }

    /// Listener POSTs received so far, malformed ones included.
    pub fn listen_requests(&self) -> u64 {
        self.shared.listen_requests.load(Ordering::SeqCst)
    }

    /// The keys of the most recent well-formed listener request, as
    /// `dataId^2group` or `dataId^2group^2tenant` (tenant only when not
    /// empty), sorted.
    pub fn listened_keys_last(&self) -> Vec<String> {
        self.shared.store().listened_last.clone()
    }

    /// `GET /nacos/v1/cs/configs` requests for `data_id` so far (any group,
    /// tenant or outcome).
    pub fn config_gets(&self, data_id: &str) -> u64 {
        self.shared
            .store()
            .config_gets
            .get(data_id)
            .copied()
            .unwrap_or(0)
    }
}

/// State shared by the test thread and the server's runtime.
struct Shared {
    /// Never held across an `.await`.
    store: Mutex<Store>,
    listen_requests: AtomicU64,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().expect("fake Nacos store lock")
    }
}

/// A config's identity. `tenant` `""` is the default namespace, the same as
/// no tenant at all (Nacos' `GroupKey2`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ConfigKey {
    data_id: String,
    group: String,
    tenant: String,
}

impl ConfigKey {
    fn new(data_id: &str, group: &str, tenant: &str) -> ConfigKey {
        ConfigKey {
            data_id: data_id.to_owned(),
            group: group.to_owned(),
            tenant: tenant.to_owned(),
        }
    }

    /// `dataId^2group[^2tenant]`, the form the listener answers with.
    fn words(&self) -> String {
        let mut s = format!("{}{WORD_SEPARATOR}{}", self.data_id, self.group);
        if !self.tenant.is_empty() {
            s.push(WORD_SEPARATOR);
            s.push_str(&self.tenant);
        }
        s
    }
}

/// A service's identity in the `public` namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServiceKey {
    group: String,
    service: String,
}

impl ServiceKey {
    fn new(service: &str, group: &str) -> ServiceKey {
        ServiceKey {
            group: group.to_owned(),
            service: service.to_owned(),
        }
    }
}

/// A stored config.
struct Config {
    content: String,
    md5: String,
}

/// A parked long poll: the keys it holds and how to wake it with the one
/// that changed.
struct Parked {
    keys: HashSet<ConfigKey>,
    wake: oneshot::Sender<ConfigKey>,
}

/// Everything the server knows.
#[derive(Default)]
struct Store {
    configs: HashMap<ConfigKey, Config>,
    parked: HashMap<u64, Parked>,
    next_parked: u64,
    listened_last: Vec<String>,
    config_gets: HashMap<String, u64>,
    /// `(ip, port)` → healthy, per service.
    services: HashMap<ServiceKey, BTreeMap<(String, u16), bool>>,
}

impl Store {
    /// The server's MD5 of `key`, empty when absent.
    fn md5(&self, key: &ConfigKey) -> &str {
        self.configs.get(key).map_or("", |c| c.md5.as_str())
    }

    fn publish(&mut self, key: ConfigKey, content: &str) {
        let md5 = md5_hex(content);
        let changed = self.md5(&key) != md5;
        self.configs.insert(
            key.clone(),
            Config {
                content: content.to_owned(),
                md5,
            },
        );
        if changed {
            self.changed(&key);
        }
    }

    fn delete(&mut self, key: &ConfigKey) {
        if self.configs.remove(key).is_some() {
            self.changed(key);
        }
    }

    /// Answer every parked poll holding `key` with just `key`, as Nacos'
    /// `DataChangeTask` does.
    fn changed(&mut self, key: &ConfigKey) {
        let woken: Vec<u64> = self
            .parked
            .iter()
            .filter(|(_, p)| p.keys.contains(key))
            .map(|(id, _)| *id)
            .collect();
        for id in woken {
            if let Some(parked) = self.parked.remove(&id) {
                let _ = parked.wake.send(key.clone());
            }
        }
    }
}

/// Removes a parked poll from the store when its request ends, however it
/// ends (answered, timed out, or its connection aborted).
struct ParkGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ParkGuard {
    fn drop(&mut self) {
        if let Ok(mut store) = self.shared.store.lock() {
            store.parked.remove(&self.id);
        }
    }
}

/// A response under construction.
type Reply = HttpResponse;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    http_response(status, "text/plain;charset=UTF-8", body)
}

/// Set a header, leaving it out if the value is not a valid header value.
fn set_header(r: &mut Reply, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
        r.headers_mut().insert(name, v);
    }
}

/// Mark a response uncacheable, as Nacos does for every config answer.
fn no_cache(mut r: Reply) -> Reply {
    set_header(&mut r, "Pragma", "no-cache");
    set_header(&mut r, "Expires", "Thu, 01 Jan 1970 00:00:00 GMT");
    set_header(&mut r, "Cache-Control", "no-cache,no-store");
    r
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (path.as_str(), method) {
        ("/nacos/v1/cs/configs", Method::GET) => get_config(shared, &req),
        ("/nacos/v1/cs/configs", Method::POST) => match params(req).await {
            Ok(p) => post_config(shared, &p),
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        ("/nacos/v1/cs/configs", Method::DELETE) => delete_config(shared, &req),
        ("/nacos/v1/cs/configs/listener", Method::POST) => {
            shared.listen_requests.fetch_add(1, Ordering::SeqCst);
            listener(shared, req).await
        }
        ("/nacos/v1/ns/instance/list", Method::GET) => instance_list(shared, &req),
        (
            "/nacos/v1/cs/configs" | "/nacos/v1/cs/configs/listener" | "/nacos/v1/ns/instance/list",
            m,
        ) => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Request method '{m}' not supported"),
        ),
        _ => text(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// The decoded query parameters of `req`.
fn query(req: &Request<Incoming>) -> Result<Params, String> {
    Params::parse(req.uri().query().unwrap_or(""))
}

/// Query parameters, then body parameters if the body is a form, as a
/// servlet's `getParameter` sees them.
async fn params(req: Request<Incoming>) -> Result<Params, String> {
    let mut p = query(&req)?;
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    if is_form {
        let body = std::str::from_utf8(&body).map_err(|_| "the form is not UTF-8".to_owned())?;
        p.0.extend(Params::parse(body)?.0);
    }
    Ok(p)
}

/// `key=value` pairs in order; [`Params::get`] returns the first, as
/// `getParameter` does.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(s: &str) -> Result<Params, String> {
        s.split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((form_decode(k)?, form_decode(v)?))
            })
            .collect::<Result<_, String>>()
            .map(Params)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value, `None` when absent or blank.
    fn non_blank(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.trim().is_empty())
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a
/// byte, and the bytes must be UTF-8.
fn form_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// Java's `URLEncoder.encode(s, "UTF-8")`: alphanumerics and `.-*_` stay,
/// a space becomes `+`, every other byte `%XX` (upper-case hex).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'*' | b'_' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The config key named by `dataId`, `group` and `tenant`, or the `400`.
fn config_key(p: &Params) -> Result<ConfigKey, Box<Reply>> {
    let (Some(data_id), Some(group)) = (p.non_blank("dataId"), p.non_blank("group")) else {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "caused: Required parameters 'dataId' and 'group' are missing or blank;",
        )));
    };
    Ok(ConfigKey::new(
        data_id,
        group,
        p.get("tenant").unwrap_or(""),
    ))
}

fn get_config(shared: &Shared, req: &Request<Incoming>) -> Reply {
    let p = match query(req) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let mut store = shared.store();
    if let Some(data_id) = p.get("dataId") {
        *store.config_gets.entry(data_id.to_owned()).or_default() += 1;
    }
    let key = match config_key(&p) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let Some(config) = store.configs.get(&key) else {
        return no_cache(text(StatusCode::NOT_FOUND, "config data not exist\n"));
    };
    let mut r = text(StatusCode::OK, config.content.clone());
    set_header(&mut r, "Content-MD5", &config.md5);
    set_header(&mut r, "Config-Type", "text");
    no_cache(r)
}

fn post_config(shared: &Shared, p: &Params) -> Reply {
    let key = match config_key(p) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let Some(content) = p.non_blank("content") else {
        return text(
            StatusCode::BAD_REQUEST,
            "caused: Required parameter 'content' is missing or blank;",
        );
    };
    shared.store().publish(key, content);
    text(StatusCode::OK, "true")
}

fn delete_config(shared: &Shared, req: &Request<Incoming>) -> Reply {
    let p = match query(req) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    match config_key(&p) {
        Ok(key) => {
            shared.store().delete(&key);
            text(StatusCode::OK, "true")
        }
        Err(r) => *r,
    }
}

/// `Listening-Configs` as Nacos' `MD5Util.getClientMd5Map` reads it: the
/// entries in order (a repeated key keeps its first place and its last
/// MD5), text after the last `^1` ignored.
fn parse_listening(s: &str) -> Result<Vec<(ConfigKey, String)>, String> {
    let mut entries: Vec<(ConfigKey, String)> = Vec::new();
    let mut words: Vec<&str> = Vec::with_capacity(3);
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c == WORD_SEPARATOR {
            words.push(&s[start..i]);
            start = i + 1;
            if words.len() > 3 {
                return Err("invalid protocol,too much key".to_owned());
            }
        } else if c == LINE_SEPARATOR {
            let last = &s[start..i];
            start = i + 1;
            let (key, md5) = match words[..] {
                [data_id, group] => (ConfigKey::new(data_id, group, ""), last),
                [data_id, group, md5] => (ConfigKey::new(data_id, group, last), md5),
                _ => return Err("invalid probeModify".to_owned()),
            };
            match entries.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = md5.to_owned(),
                None => entries.push((key, md5.to_owned())),
            }
            words.clear();
        }
    }
    Ok(entries)
}

/// The listener's answer for `changed`: `URLEncoder.encode` of the entries,
/// and the line end of Java's `println`.
fn changed_body(changed: &[ConfigKey]) -> String {
    let raw: String = changed
        .iter()
        .map(|k| format!("{}{LINE_SEPARATOR}", k.words()))
        .collect();
    format!("{}\n", form_encode(&raw))
}

async fn listener(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    let timeout = req
        .headers()
        .get("Long-Pulling-Timeout")
        .map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()));
    let no_hang_up = req
        .headers()
        .get("Long-Pulling-No-Hangup")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let timeout = match timeout {
        None => None,
        Some(Some(ms)) => Some(Duration::from_millis(ms)),
        Some(None) => {
            return text(
                StatusCode::BAD_REQUEST,
                "caused: Long-Pulling-Timeout is not a number;",
            );
        }
    };
    let p = match params(req).await {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let Some(probe) = p.non_blank("Listening-Configs") else {
        return text(StatusCode::BAD_REQUEST, "caused: invalid probeModify;");
    };
    let entries = match parse_listening(probe) {
        Ok(e) => e,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("caused: {e};")),
    };

    let (wake, woken) = oneshot::channel();
    let (guard, timeout) = {
        let mut store = shared.store();
        let mut keys: Vec<String> = entries.iter().map(|(k, _)| k.words()).collect();
        keys.sort();
        store.listened_last = keys;
        let changed: Vec<ConfigKey> = entries
            .iter()
            .filter(|(k, md5)| store.md5(k) != md5)
            .map(|(k, _)| k.clone())
            .collect();
        if !changed.is_empty() && timeout.is_some() {
            return no_cache(text(StatusCode::OK, changed_body(&changed)));
        }
        let Some(timeout) = timeout else {
            return short_poll(&changed);
        };
        if no_hang_up {
            return no_cache(text(StatusCode::OK, ""));
        }
        let id = store.next_parked;
        store.next_parked += 1;
        store.parked.insert(
            id,
            Parked {
                keys: entries.into_iter().map(|(k, _)| k).collect(),
                wake,
            },
        );
        let guard = ParkGuard {
            shared: shared.clone(),
            id,
        };
        (guard, timeout)
    };
    let body = tokio::select! {
        key = woken => key.map(|k| changed_body(&[k])).unwrap_or_default(),
        () = tokio::time::sleep(timeout) => String::new(),
    };
    drop(guard);
    no_cache(text(StatusCode::OK, body))
}

/// A listener request without `Long-Pulling-Timeout`: the result goes into
/// headers, the body stays empty.
fn short_poll(changed: &[ConfigKey]) -> Reply {
    let old: String = changed
        .iter()
        .map(|k| format!("{}:{};", k.data_id, k.group))
        .collect();
    let new = changed_body(changed);
    let mut r = text(StatusCode::OK, "");
    set_header(&mut r, "Probe-Modify-Response", &old);
    set_header(&mut r, "Probe-Modify-Response-New", new.trim_end());
    no_cache(r)
}

fn instance_list(shared: &Shared, req: &Request<Incoming>) -> Reply {
    let p = match query(req) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let Some(service_name) = p.non_blank("serviceName") else {
        return text(
            StatusCode::BAD_REQUEST,
            "caused: Param 'serviceName' is required.;",
        );
    };
    let (group, service) = match service_name.split_once("@@") {
        Some((g, s)) => (g, s),
        None => (
            p.non_blank("groupName").unwrap_or(DEFAULT_GROUP),
            service_name,
        ),
    };
    let namespace = p.non_blank("namespaceId").unwrap_or(PUBLIC_NAMESPACE);
    let clusters = p.get("clusters").unwrap_or("");
    let in_cluster =
        clusters.trim().is_empty() || clusters.split(',').any(|c| c.trim() == DEFAULT_CLUSTER);
    let healthy_only = p
        .get("healthyOnly")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let grouped = format!("{group}@@{service}");

    let store = shared.store();
    let hosts: Vec<serde_json::Value> = store
        .services
        .get(&ServiceKey::new(service, group))
        .filter(|_| namespace == PUBLIC_NAMESPACE && in_cluster)
        .into_iter()
        .flatten()
        .filter(|(_, healthy)| **healthy || !healthy_only)
        .map(|((ip, port), healthy)| {
            serde_json::json!({
                "instanceId": format!("{ip}#{port}#{DEFAULT_CLUSTER}#{grouped}"),
                "ip": ip,
                "port": port,
                "weight": 1.0,
                "healthy": healthy,
                "enabled": true,
                "ephemeral": true,
                "clusterName": DEFAULT_CLUSTER,
                "serviceName": grouped,
                "metadata": {},
                "instanceHeartBeatInterval": 5000,
                "instanceHeartBeatTimeOut": 15000,
                "ipDeleteTimeout": 30000,
                "instanceIdGenerator": "simple",
            })
        })
        .collect();
    drop(store);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let body = serde_json::json!({
        "name": grouped,
        "groupName": group,
        "clusters": clusters,
        "cacheMillis": 10000,
        "hosts": hosts,
        "lastRefTime": now_ms,
        "checksum": "",
        "allIPs": false,
        "reachProtectionThreshold": false,
        "valid": true,
    });
    http_response(StatusCode::OK, "application/json", body.to_string())
}

#[cfg(test)]
mod tests {
    use std::thread;
    use std::time::Instant;

    use serde_json::Value;

    use super::*;
    use crate::support::wait_for;

    /// Generous deadline for anything that should happen promptly.
    const PROMPT: Duration = Duration::from_secs(10);

    /// A fresh agent per test, so no pooled connection crosses tests.
    fn new_agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build()
    }

    /// Status and body of a response or an HTTP error status.
    fn status_body(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
        match r {
            Ok(r) => (r.status(), r.into_string().expect("body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
            Err(e) => panic!("transport error: {e}"),
        }
    }

    fn get_config(
        nacos: &FakeNacos,
        agent: &ureq::Agent,
        data_id: &str,
        group: &str,
        tenant: &str,
    ) -> (u16, String) {
        status_body(
            agent
                .get(&format!("{}/nacos/v1/cs/configs", nacos.url()))
                .query("dataId", data_id)
                .query("group", group)
                .query("tenant", tenant)
                .call(),
        )
    }

    /// One `Listening-Configs` entry, `dataId^2group^2md5[^2tenant]^1`.
    fn entry(data_id: &str, group: &str, md5: &str, tenant: &str) -> String {
        let mut s = format!("{data_id}\u{2}{group}\u{2}{md5}");
        if !tenant.is_empty() {
            s.push('\u{2}');
            s.push_str(tenant);
        }
        s.push('\u{1}');
        s
    }

    /// POST a listener request (form-encoded by ureq), with the
    /// `Long-Pulling-Timeout` header when `timeout_ms` is given; panics
    /// unless it is answered `200`.
    fn listen(
        nacos: &FakeNacos,
        agent: &ureq::Agent,
        configs: &str,
        timeout_ms: Option<u64>,
    ) -> ureq::Response {
        let mut req = agent.post(&format!("{}/nacos/v1/cs/configs/listener", nacos.url()));
        if let Some(ms) = timeout_ms {
            req = req.set("Long-Pulling-Timeout", &ms.to_string());
        }
        let r = req
            .send_form(&[("Listening-Configs", configs)])
            .unwrap_or_else(|e| panic!("listener request failed: {e}"));
        assert_eq!(r.status(), 200);
        r
    }

    /// POST a 30 s long poll for `configs` on a thread and return once the
    /// fake parked it. The handle yields how long the poll took and its
    /// body, or the kind of error it ended with.
    fn parked_poll(
        nacos: &FakeNacos,
        configs: &str,
    ) -> thread::JoinHandle<(Duration, Result<String, ureq::ErrorKind>)> {
        let url = format!("{}/nacos/v1/cs/configs/listener", nacos.url());
        let configs = configs.to_owned();
        let before = nacos.parked_listeners();
        let poll = thread::spawn(move || {
            let started = Instant::now();
            let body = new_agent()
                .post(&url)
                .set("Long-Pulling-Timeout", "30000")
                .send_form(&[("Listening-Configs", &configs)])
                .map(|r| r.into_string().expect("a readable body"))
                .map_err(|e| e.kind());
            (started.elapsed(), body)
        });
        wait_for("the listener to park", PROMPT, || {
            (nacos.parked_listeners() > before).then_some(())
        });
        poll
    }

    /// Decode a listener answer into its `dataId^2group[^2tenant]` entries.
    fn changed_keys(body: &str) -> Vec<String> {
        let raw = form_decode(body.trim_end()).expect("a form-encoded answer");
        assert!(
            raw.is_empty() || raw.ends_with('\u{1}'),
            "entries end with ^1: {raw:?}"
        );
        raw.split_terminator('\u{1}').map(str::to_owned).collect()
    }

    fn instances(nacos: &FakeNacos, agent: &ureq::Agent, query: &[(&str, &str)]) -> Value {
        let mut req = agent.get(&format!("{}/nacos/v1/ns/instance/list", nacos.url()));
        for (k, v) in query {
            req = req.query(k, v);
        }
        let (code, body) = status_body(req.call());
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    #[test]
    fn md5_matches_known_digests() {
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex("hello"), "5d41402abc4b2a76b9719d911017c592");
        // UTF-8 bytes, as Nacos hashes them.
        assert_eq!(md5_hex("é"), "66ddcd97cfdeabb2f6fb8a999b4bc76f");
    }

    #[test]
    fn config_get_404_after_delete_and_400_without_group() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        assert_eq!(
            get_config(&nacos, &agent, "app.yaml", "G", ""),
            (404, "config data not exist\n".to_owned())
        );
        nacos.publish_config("app.yaml", "G", "", "a: 1");
        nacos.publish_config("app.yaml", "G", "ns1", "a: 2");
        let r = agent
            .get(&format!("{}/nacos/v1/cs/configs", nacos.url()))
            .query("dataId", "app.yaml")
            .query("group", "G")
            .call()
            .expect("200");
        assert_eq!(r.header("Content-MD5"), Some(md5_hex("a: 1").as_str()));
        assert!(r.content_type().starts_with("text/plain"));
        assert_eq!(r.into_string().unwrap(), "a: 1");
        assert_eq!(
            get_config(&nacos, &agent, "app.yaml", "G", "ns1"),
            (200, "a: 2".to_owned())
        );

        nacos.delete_config("app.yaml", "G", "");
        assert_eq!(get_config(&nacos, &agent, "app.yaml", "G", "").0, 404);
        assert_eq!(get_config(&nacos, &agent, "app.yaml", "G", "ns1").0, 200);

        let (code, _) = status_body(
            agent
                .get(&format!(
                    "{}/nacos/v1/cs/configs?dataId=app.yaml",
                    nacos.url()
                ))
                .call(),
        );
        assert_eq!(code, 400, "a missing group is a bad request");
        let (code, _) = status_body(
            agent
                .get(&format!("{}/nacos/v1/cs/configs?group=G", nacos.url()))
                .call(),
        );
        assert_eq!(code, 400, "a missing dataId is a bad request");
        assert_eq!(nacos.config_gets("app.yaml"), 6);
        assert_eq!(nacos.config_gets("other"), 0);

        let (code, _) = status_body(agent.get(&format!("{}/nacos/v1/nope", nacos.url())).call());
        assert_eq!(code, 404);
    }

    #[test]
    fn config_publish_and_delete_over_http() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        let url = format!("{}/nacos/v1/cs/configs", nacos.url());
        let (code, body) = status_body(agent.post(&url).send_form(&[
            ("dataId", "d"),
            ("group", "G"),
            ("content", "x y+z"),
        ]));
        assert_eq!((code, body.as_str()), (200, "true"));
        assert_eq!(
            get_config(&nacos, &agent, "d", "G", ""),
            (200, "x y+z".into())
        );
        let (code, _) = status_body(
            agent
                .delete(&url)
                .query("dataId", "d")
                .query("group", "G")
                .call(),
        );
        assert_eq!(code, 200);
        assert_eq!(get_config(&nacos, &agent, "d", "G", "").0, 404);
    }

    #[test]
    fn listener_answers_at_once_when_an_md5_differs() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        nacos.publish_config("a", "G", "", "one");
        nacos.publish_config("b", "G", "", "two");
        nacos.publish_config("c", "G", "t1", "three");
        let configs = entry("a", "G", &md5_hex("one"), "")
            + &entry("b", "G", "stale", "")
            + &entry("c", "G", "", "t1")
            + &entry("absent", "G", "", "");
        let started = Instant::now();
        let r = listen(&nacos, &agent, &configs, Some(30_000));
        assert!(started.elapsed() < Duration::from_secs(20), "not parked");
        let body = r.into_string().unwrap();
        assert_eq!(body, "b%02G%01c%02G%02t1%01\n", "the exact wire form");
        assert_eq!(changed_keys(&body), ["b\u{2}G", "c\u{2}G\u{2}t1"]);
        assert_eq!(nacos.parked_listeners(), 0);
    }

    #[test]
    fn listener_parks_and_returns_early_on_publish() {
        let nacos = FakeNacos::start();
        nacos.publish_config("a", "G", "", "one");
        let configs = entry("a", "G", &md5_hex("one"), "") + &entry("b", "G", "", "t1");
        let poll = parked_poll(&nacos, &configs);
        assert_eq!(nacos.listen_requests(), 1);
        assert_eq!(nacos.listened_keys_last(), ["a\u{2}G", "b\u{2}G\u{2}t1"]);

        nacos.publish_config("b", "G", "t1", "new");
        let (elapsed, body) = poll.join().expect("poll thread");
        let body = body.expect("200");
        assert!(
            elapsed < Duration::from_secs(25),
            "returned early: {elapsed:?}"
        );
        assert_eq!(changed_keys(&body), ["b\u{2}G\u{2}t1"]);
        assert_eq!(nacos.parked_listeners(), 0);
    }

    #[test]
    fn listener_times_out_with_an_empty_body() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        nacos.publish_config("a", "G", "", "one");
        let started = Instant::now();
        let r = listen(
            &nacos,
            &agent,
            &entry("a", "G", &md5_hex("one"), ""),
            Some(300),
        );
        let elapsed = started.elapsed();
        assert_eq!(r.into_string().unwrap(), "");
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert_eq!(nacos.parked_listeners(), 0);
    }

    #[test]
    fn listener_without_the_header_answers_at_once_in_headers() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        nacos.publish_config("a", "G", "", "one");
        let started = Instant::now();
        let r = listen(&nacos, &agent, &entry("a", "G", &md5_hex("one"), ""), None);
        assert_eq!(r.header("Probe-Modify-Response-New"), Some(""));
        assert_eq!(r.into_string().unwrap(), "");

        let r = listen(&nacos, &agent, &entry("a", "G", "stale", ""), None);
        assert_eq!(r.header("Probe-Modify-Response"), Some("a:G;"));
        assert_eq!(r.header("Probe-Modify-Response-New"), Some("a%02G%01"));
        assert_eq!(
            r.into_string().unwrap(),
            "",
            "short polls answer in headers"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "never parked");
        assert_eq!(nacos.listen_requests(), 2);
    }

    #[test]
    fn listener_no_hang_up_answers_at_once() {
        let nacos = FakeNacos::start();
        let r = new_agent()
            .post(&format!("{}/nacos/v1/cs/configs/listener", nacos.url()))
            .set("Long-Pulling-Timeout", "30000")
            .set("Long-Pulling-No-Hangup", "true")
            .send_form(&[("Listening-Configs", &entry("a", "G", "", ""))])
            .expect("200");
        assert_eq!(r.into_string().unwrap(), "");
    }

    #[test]
    fn listener_reports_a_deleted_config_to_its_old_md5() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        nacos.publish_config("a", "G", "", "one");
        let old = entry("a", "G", &md5_hex("one"), "");

        // Deleted between two polls: reported at once.
        nacos.delete_config("a", "G", "");
        let body = listen(&nacos, &agent, &old, Some(30_000))
            .into_string()
            .unwrap();
        assert_eq!(changed_keys(&body), ["a\u{2}G"]);
        // The empty MD5 is up to date for an absent config.
        let r = listen(&nacos, &agent, &entry("a", "G", "", ""), Some(300));
        assert_eq!(r.into_string().unwrap(), "");

        // Deleted during a poll: the parked poll is woken.
        nacos.publish_config("a", "G", "", "one");
        let poll = parked_poll(&nacos, &old);
        nacos.delete_config("a", "G", "");
        let body = poll.join().unwrap().1.expect("200");
        assert_eq!(changed_keys(&body), ["a\u{2}G"]);
    }

    #[test]
    fn listener_rejects_bad_requests() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        let url = format!("{}/nacos/v1/cs/configs/listener", nacos.url());
        // Hand-encoded: the field is read only from a form body.
        let body = "Listening-Configs=a%02G%02%01";
        let (code, _) = status_body(agent.post(&url).send_string(body));
        assert_eq!(code, 400, "no form content type, no field");
        let (code, body) = status_body(
            agent
                .post(&url)
                .set("Content-Type", "application/x-www-form-urlencoded")
                .set("Long-Pulling-Timeout", "300")
                .send_string(body),
        );
        assert_eq!((code, body.as_str()), (200, ""), "hand-encoded form");
        let (code, _) = status_body(
            agent
                .post(&url)
                .send_form(&[("Listening-Configs", "a\u{1}")]),
        );
        assert_eq!(code, 400, "an entry without a group");
        let (code, _) = status_body(agent.post(&url).send_form(&[("other", "x")]));
        assert_eq!(code, 400, "no Listening-Configs");
        let (code, _) = status_body(agent.get(&url).call());
        assert_eq!(code, 405);
        assert_eq!(nacos.listen_requests(), 4);
        assert_eq!(nacos.listened_keys_last(), ["a\u{2}G"]);
    }

    #[test]
    fn restart_aborts_a_parked_listener_and_keeps_serving() {
        let nacos = FakeNacos::start();
        nacos.publish_config("a", "G", "", "one");
        let configs = entry("a", "G", &md5_hex("one"), "");
        let poll = parked_poll(&nacos, &configs);
        let port = nacos.addr().port();
        nacos.restart();
        assert_eq!(nacos.parked_listeners(), 0);
        match poll.join().unwrap().1 {
            Err(kind) if kind != ureq::ErrorKind::HTTP => {}
            other => panic!("the parked poll should fail mid-poll, got {other:?}"),
        }

        assert_eq!(nacos.addr().port(), port);
        let agent = new_agent();
        assert_eq!(
            get_config(&nacos, &agent, "a", "G", ""),
            (200, "one".into())
        );
        let r = listen(&nacos, &agent, &entry("a", "G", "stale", ""), Some(30_000));
        assert_eq!(changed_keys(&r.into_string().unwrap()), ["a\u{2}G"]);
        assert_eq!(nacos.listen_requests(), 2);
    }

    #[test]
    fn a_client_that_gives_up_is_no_longer_parked() {
        let nacos = FakeNacos::start();
        let impatient = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(300))
            .build();
        let r = impatient
            .post(&format!("{}/nacos/v1/cs/configs/listener", nacos.url()))
            .set("Long-Pulling-Timeout", "30000")
            .send_form(&[("Listening-Configs", &entry("a", "G", "", ""))]);
        assert!(r.is_err(), "the client timed out first");
        drop(impatient);
        wait_for("the abandoned poll to be dropped", PROMPT, || {
            (nacos.parked_listeners() == 0).then_some(())
        });
    }

    #[test]
    fn down_resets_connections_until_up() {
        let nacos = FakeNacos::start();
        nacos.publish_config("a", "G", "", "one");
        let agent = new_agent();
        nacos.set_down(true);
        let r = agent
            .get(&format!(
                "{}/nacos/v1/cs/configs?dataId=a&group=G",
                nacos.url()
            ))
            .call();
        assert!(matches!(r, Err(ureq::Error::Transport(_))), "{r:?}");
        nacos.set_down(false);
        assert_eq!(
            get_config(&nacos, &agent, "a", "G", ""),
            (200, "one".into())
        );
    }

    #[test]
    fn instance_list_filters_unhealthy_hosts() {
        let nacos = FakeNacos::start();
        let agent = new_agent();
        nacos.register_instance("svc", "DEFAULT_GROUP", "10.0.0.1", 8080, true);
        nacos.register_instance("svc", "DEFAULT_GROUP", "10.0.0.2", 8080, false);
        nacos.register_instance("svc", "other", "10.0.0.9", 9090, true);

        let all = instances(&nacos, &agent, &[("serviceName", "svc")]);
        assert_eq!(all["name"], "DEFAULT_GROUP@@svc");
        assert_eq!(all["groupName"], "DEFAULT_GROUP");
        assert_eq!(all["cacheMillis"], 10000);
        assert_eq!(all["valid"], true);
        assert!(all["lastRefTime"].as_u64().unwrap() > 0);
        let hosts = all["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            hosts[0]["instanceId"],
            "10.0.0.1#8080#DEFAULT#DEFAULT_GROUP@@svc"
        );
        assert_eq!(hosts[0]["ip"], "10.0.0.1");
        assert_eq!(hosts[0]["port"], 8080);
        assert_eq!(hosts[0]["healthy"], true);
        assert_eq!(hosts[0]["enabled"], true);
        assert_eq!(hosts[0]["weight"], 1.0);
        assert_eq!(hosts[0]["clusterName"], "DEFAULT");
        assert_eq!(hosts[0]["serviceName"], "DEFAULT_GROUP@@svc");
        assert_eq!(hosts[1]["healthy"], false);

        let healthy = |nacos: &FakeNacos| {
            instances(
                nacos,
                &agent,
                &[
                    ("serviceName", "svc"),
                    ("groupName", "DEFAULT_GROUP"),
                    ("namespaceId", "public"),
                    ("healthyOnly", "true"),
                ],
            )["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["ip"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(healthy(&nacos), ["10.0.0.1"]);
        nacos.set_healthy("svc", "DEFAULT_GROUP", "10.0.0.2", 8080, true);
        assert_eq!(healthy(&nacos), ["10.0.0.1", "10.0.0.2"]);
        nacos.deregister_instance("svc", "DEFAULT_GROUP", "10.0.0.1", 8080);
        assert_eq!(healthy(&nacos), ["10.0.0.2"]);

        let other = instances(
            &nacos,
            &agent,
            &[("serviceName", "svc"), ("groupName", "other")],
        );
        assert_eq!(other["name"], "other@@svc");
        assert_eq!(other["hosts"][0]["ip"], "10.0.0.9");
        let grouped = instances(&nacos, &agent, &[("serviceName", "other@@svc")]);
        assert_eq!(grouped["hosts"][0]["ip"], "10.0.0.9");

        let unknown = instances(&nacos, &agent, &[("serviceName", "nobody")]);
        assert_eq!(unknown["hosts"], serde_json::json!([]));
        let elsewhere = instances(
            &nacos,
            &agent,
            &[("serviceName", "svc"), ("namespaceId", "dev")],
        );
        assert_eq!(elsewhere["hosts"], serde_json::json!([]));
        let (code, _) = status_body(
            agent
                .get(&format!("{}/nacos/v1/ns/instance/list", nacos.url()))
                .call(),
        );
        assert_eq!(code, 400, "serviceName is required");
    }

    #[test]
    fn form_encoding_matches_java_url_encoder() {
        assert_eq!(
            form_encode("a b*c.d-e_f~g+h\u{2}é"),
            "a+b*c.d-e_f%7Eg%2Bh%02%C3%A9"
        );
        assert_eq!(form_decode("a+b%2Bc%02").unwrap(), "a b+c\u{2}");
        assert!(form_decode("%zz").is_err());
    }
}
