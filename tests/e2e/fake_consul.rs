//! A fake Consul HTTP server on loopback, faithful to the parts of the
//! public Consul HTTP API that watchgate's Consul source uses, with switches
//! for the faults that source must survive.
//!
//! The fake is a [`LoopbackServer`], so the test drives it from synchronous
//! code ([`FakeConsul::register`], [`FakeConsul::kv_put`], …). It binds
//! `127.0.0.1` only. Dropping it stops the server and closes every
//! connection.
//!
//! # Modelled
//!
//! - **One raft-like index.** Every write through the API bumps a global
//!   index by one. Each resource reports the index of the last write that
//!   affected it in `X-Consul-Index` (never below 1), and blocking queries
//!   compare against that, so an unrelated write never ends a blocking query
//!   early.
//! - **Blocking queries** (docs: "Blocking Queries"). `index=N` with `N` at
//!   or above the resource's current index holds the request until the
//!   resource's index rises above `N` or `wait` passes, then answers with the
//!   current state and index (on a timeout: the same index, or a lower one
//!   if the client sent an index from the future). A lower `N` answers at
//!   once; `index=0` or none never blocks. `wait` uses Go's duration syntax
//!   (`100ms`, `30s`, `5m`, `1m30s`, …; a number without a unit is a 400);
//!   zero, negative or absent means 5 minutes, more than 10 minutes is
//!   clamped to 10, and up to `wait/16` random jitter is added. A malformed
//!   `index` or `wait` is a 400, as in Consul.
//! - **Idempotent writes wake blocked queries** ([`FakeConsul::touch`], and
//!   a [`FakeConsul::kv_put`] of the same value): the index rises while the
//!   content stays the same (a return is not a change).
//! - **`GET /v1/health/service/<name>`** with `passing` (present, or a Go
//!   boolean such as `true`/`1`; `passing=false` shows everything): only
//!   instances whose every check is passing, so `warning` hides an instance
//!   too. `tag=T` (repeatable) keeps instances carrying every given tag.
//!   Every instance lives on node `node1` (`127.0.0.1`, datacenter `dc1`)
//!   and has exactly one service check. An unknown or emptied service is
//!   `[]`, not a 404.
//! - **Service index.** A service reports the index of its last write, also
//!   after its last instance was deregistered. A service that was never
//!   written reports the catalog's index (the last write to any service), so
//!   a blocking query on it wakes on every catalog write with the same `[]`,
//!   as Consul's does.
//! - **`GET /v1/kv/<prefix>?recurse`**: every key starting with the prefix
//!   (a plain string prefix: `app` matches `apple`), sorted, values in
//!   base64 and `null` for an empty value, `LockIndex`/`Flags` 0 and no
//!   `Session` field (Consul omits it when no session holds the key). No
//!   key under the prefix is a 404 with an empty body that still carries
//!   `X-Consul-Index`. The index is the highest `ModifyIndex` or deletion
//!   (tombstone) index under the prefix; with neither, or for the empty
//!   prefix, it is the index of the last write to the whole KV store, as in
//!   Consul. Without `recurse` the path is one exact key, with the same
//!   index rule applied to that key.
//! - **Headers**: `X-Consul-Index`, `X-Consul-KnownLeader: true`,
//!   `X-Consul-LastContact: 0`, and `Content-Type: application/json` on JSON
//!   bodies. `stale`, `consistent`, `cached`, `near`, `token` and the
//!   `X-Consul-Token` header are accepted and have no effect (this fake is
//!   always a leader in contact). `dc` may be absent or `dc1`; any other
//!   datacenter is a 500 `No path to datacenter`.
//! - **Faults**: a forced `X-Consul-Index` (backwards, or 0) that also makes
//!   every blocking query answer at once ([`FakeConsul::force_index`]); an
//!   abort of every open connection with a TCP reset while state and port
//!   stay ([`FakeConsul::restart`]); a down mode that resets every open
//!   connection and every new one right after the accept
//!   ([`FakeConsul::set_down`]).
//! - **Observation**: requests counted per path ([`FakeConsul::requests`]),
//!   TCP connections accepted and open ([`FakeConsul::accepted`],
//!   [`FakeConsul::open_connections`]; a client that abandons a blocking
//!   query frees its connection at once), the largest `wait` asked for
//!   ([`FakeConsul::max_wait_seen`]).
//!
//! # Not modelled
//!
//! ACLs (tokens are ignored, nothing is ever a 403), multiple datacenters,
//! sessions and locks (`LockIndex` is always 0), writes over HTTP (every
//! method but `GET` is a 405; the test writes through the methods), CAS,
//! KV flags, tombstone reaping (tombstones live forever), the agent cache
//! and its `Age` headers, node-level checks such as `serfHealth`, more than
//! one node, health-check output, `Connect`/mesh endpoints, namespaces and
//! partitions, gzip. The parameters `filter`, `keys`, `separator` and `raw`
//! change the answer's shape and are rejected with a 400 that names them,
//! rather than silently ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::loopback::{HttpResponse, LoopbackServer, http_response};

/// Consul's default blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Consul's largest blocking wait.
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// Jitter is up to `wait / JITTER_FRACTION`.
const JITTER_FRACTION: u32 = 16;
/// The one node every instance lives on.
const NODE: &str = "node1";
/// Its ID (Consul node IDs are UUIDs).
const NODE_ID: &str = "0d5b8b5e-3c1f-4a57-9a0e-000000000001";
/// The one datacenter.
const DATACENTER: &str = "dc1";

/// A running fake Consul. See the module docs for what it models.
pub struct FakeConsul {
    server: LoopbackServer,
    shared: Arc<Shared>,
}

impl FakeConsul {
    /// Listen on `127.0.0.1:0` with an empty catalog and KV store (index 1).
    pub fn start() -> FakeConsul {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            changed: watch::Sender::new(0),
        });
        let server = LoopbackServer::start_http("fake Consul", {
            let shared = shared.clone();
            move |req| {
                let shared = shared.clone();
                async move { handle_request(&shared, req).await }
            }
        });
        FakeConsul { server, shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The listening address (to put a `FaultProxy` in front).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The current global index (the last write's).
    pub fn index(&self) -> u64 {
        self.shared.state().index
    }

    /// Register (or re-register) instance `id` of `service` on `node1`,
    /// with its one check `passing`.
    pub fn register(&self, service: &str, id: &str, address: &str, port: u16, tags: &[&str]) {
        self.shared.write(|st, index| {
            let svc = st.service_written(service, index);
            svc.instances.insert(
                id.to_owned(),
                Instance {
                    address: address.to_owned(),
                    port,
                    tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                    status: "passing".to_owned(),
                },
            );
        });
    }

    /// Set the status of instance `id`'s check: `passing`, `warning` or
    /// `critical`. Panics on another status or an unknown instance.
    pub fn set_check(&self, service: &str, id: &str, status: &str) {
        assert!(
            matches!(status, "passing" | "warning" | "critical"),
            "a Consul check status is passing, warning or critical, not {status:?}"
        );
        self.shared.write(|st, index| {
            let instance = st
                .services
                .get_mut(service)
                .and_then(|s| s.instances.get_mut(id))
                .unwrap_or_else(|| panic!("set_check: {service}/{id} is not registered"));
            instance.status = status.to_owned();
            st.service_written(service, index);
        });
    }

    /// Deregister instance `id` of `service` (and its check). Deregistering
    /// an unknown instance is a no-op write, as in Consul: the global index
    /// rises, no resource's does.
    pub fn deregister(&self, service: &str, id: &str) {
        self.shared.write(|st, index| {
            let known = st
                .services
                .get_mut(service)
                .is_some_and(|s| s.instances.remove(id).is_some());
            if known {
                st.service_written(service, index);
            }
        });
    }

    /// Write `key` (an empty value reads back as `null`). Writing the same
    /// value again still bumps its `ModifyIndex`, as in Consul.
    pub fn kv_put(&self, key: &str, value: &[u8]) {
        self.shared.write(|st, index| {
            let entry = st.kv.entry(key.to_owned()).or_insert(KvEntry {
                create_index: index,
                modify_index: index,
                value: Vec::new(),
            });
            entry.modify_index = index;
            entry.value = value.to_vec();
            st.kv_index = index;
        });
    }

    /// Delete `key`, leaving a tombstone at this write's index. Deleting a
    /// missing key is a no-op write, as in Consul.
    pub fn kv_delete(&self, key: &str) {
        self.shared.write(|st, index| {
            if st.kv.remove(key).is_some() {
                st.tombstones.insert(key.to_owned(), index);
                st.kv_index = index;
            }
        });
    }

    /// An idempotent write to `service`: its index rises, its content does
    /// not change (like a check's output being updated).
    pub fn touch(&self, service: &str) {
        self.shared.write(|st, index| {
            st.service_written(service, index);
        });
    }

    /// With `Some(i)`, every response's `X-Consul-Index` is `i` (to send an
    /// index backwards, or 0) and every blocking query, also one already
    /// waiting, answers at once. `None` restores normal behaviour.
    pub fn force_index(&self, index: Option<u64>) {
        self.shared.state().forced = index;
        self.shared.changed.send_modify(|g| *g += 1);
    }

    /// Abort every open connection with a TCP reset, as a crashing server
    /// would; in-flight blocking queries fail mid-poll. State and port stay
    /// and new connections are served. Returns once the resets went out.
    pub fn restart(&self) {
        self.server.reset_all();
    }

    /// While down, reset every new connection right after the accept (the
    /// nearest a listening socket gets to "connection refused"); going down
    /// also resets every open connection. State is kept.
    pub fn set_down(&self, down: bool) {
        self.server.set_down(down);
    }

    /// Requests whose path (as sent, before percent-decoding) starts with
    /// `path_prefix`.
    pub fn requests(&self, path_prefix: &str) -> u64 {
        self.shared
            .state()
            .requests
            .iter()
            .filter(|(path, _)| path.starts_with(path_prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Connections open now. A client that gives up on a blocking query
    /// (closes its connection) frees it at once, so a leak of watches shows
    /// here.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// TCP connections accepted so far, reset ones (while down) included.
    pub fn accepted(&self) -> u64 {
        self.server.accepted()
    }

    /// The largest `wait` any request asked for (before clamping to 10
    /// minutes; a negative one counts as zero), if any did.
    pub fn max_wait_seen(&self) -> Option<Duration> {
        self.shared.state().max_wait
    }
}

/// State shared by the test thread and the server's runtime.
struct Shared {
    /// Never held across an `.await`.
    state: Mutex<State>,
    /// Bumped after every write (and fault switch) so blocked queries look
    /// again.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not wedge the server for the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One write: bump the global index, apply `f` with it, wake blocked
    /// queries.
    fn write(&self, f: impl FnOnce(&mut State, u64)) {
        {
            let mut st = self.state();
            st.index += 1;
            let index = st.index;
            f(&mut st, index);
        }
        self.changed.send_modify(|g| *g += 1);
    }
}

/// The catalog, the KV store and the switches.
struct State {
    /// The global raft-like index: the last write's.
    index: u64,
    /// The last write to any service.
    catalog_index: u64,
    /// The last write (put, or delete of an existing key) to the KV store.
    kv_index: u64,
    services: BTreeMap<String, Service>,
    kv: BTreeMap<String, KvEntry>,
    /// Deleted key → the index of its deletion.
    tombstones: BTreeMap<String, u64>,
    forced: Option<u64>,
    /// Path → requests.
    requests: BTreeMap<String, u64>,
    max_wait: Option<Duration>,
}

impl State {
    fn new() -> State {
        State {
            index: 1,
            catalog_index: 1,
            kv_index: 1,
            services: BTreeMap::new(),
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            forced: None,
            requests: BTreeMap::new(),
            max_wait: None,
        }
    }

    /// Record a write to `service` at `index`; returns the service.
    fn service_written(&mut self, service: &str, index: u64) -> &mut Service {
        self.catalog_index = index;
        let svc = self
            .services
            .entry(service.to_owned())
            .or_insert_with(|| Service {
                index,
                instances: BTreeMap::new(),
            });
        svc.index = index;
        svc
    }
}

/// A service's instances (by service ID) and its last write.
struct Service {
    index: u64,
    instances: BTreeMap<String, Instance>,
}

/// One registered instance and its one check.
struct Instance {
    address: String,
    port: u16,
    tags: Vec<String>,
    status: String,
}

/// One KV entry.
struct KvEntry {
    create_index: u64,
    modify_index: u64,
    value: Vec<u8>,
}

/// What a read asks for.
enum Query {
    Health {
        service: String,
        passing: bool,
        tags: Vec<String>,
    },
    Kv {
        key: String,
        recurse: bool,
    },
}

/// A read's answer at one moment.
struct Answer {
    index: u64,
    status: StatusCode,
    /// JSON; `None` for an empty body.
    body: Option<Value>,
}

/// Route, validate and answer one request.
async fn handle_request(shared: &Shared, req: Request<Incoming>) -> HttpResponse {
    let raw_path = req.uri().path().to_owned();
    *shared.state().requests.entry(raw_path.clone()).or_default() += 1;
    let params = parse_query(req.uri().query().unwrap_or(""));
    let path = percent_decode(&raw_path, false);

    let query = if let Some(service) = path.strip_prefix("/v1/health/service/") {
        if service.is_empty() {
            return plain(StatusCode::BAD_REQUEST, "Missing service name");
        }
        let passing = match bool_param(&params, "passing") {
            Ok(p) => p,
            Err(()) => return plain(StatusCode::BAD_REQUEST, "Invalid value for ?passing"),
        };
        Query::Health {
            service: service.to_owned(),
            passing,
            tags: all(&params, "tag").map(str::to_owned).collect(),
        }
    } else if let Some(key) = path.strip_prefix("/v1/kv/") {
        Query::Kv {
            key: key.to_owned(),
            recurse: first(&params, "recurse").is_some(),
        }
    } else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    if req.method() != Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "method {} not allowed (the fake Consul only serves reads)",
                req.method()
            ),
        );
    }
    for p in ["filter", "keys", "separator", "raw"] {
        if first(&params, p).is_some() {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("fake Consul: parameter {p:?} is not modelled"),
            );
        }
    }
    if let Some(dc) = first(&params, "dc")
        && !dc.is_empty()
        && dc != DATACENTER
    {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }
    let min_index = match first(&params, "index") {
        None | Some("") => 0,
        Some(i) => match i.parse::<u64>() {
            Ok(i) => i,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "Invalid index"),
        },
    };
    let asked = match first(&params, "wait") {
        None | Some("") => None,
        Some(w) => match parse_go_duration(w) {
            Some(w) => Some(w),
            None => return plain(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };
    if let Some(asked) = asked {
        let mut st = shared.state();
        st.max_wait = st.max_wait.max(Some(asked));
    }
    let wait = match asked {
        None => DEFAULT_WAIT,
        Some(w) if w.is_zero() => DEFAULT_WAIT,
        Some(w) => w.min(MAX_WAIT),
    };
    let jitter = wait / JITTER_FRACTION;
    let jitter = Duration::from_nanos(rand::random_range(
        0..=u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX),
    ));

    let (answer, forced) = blocking_read(shared, &query, min_index, wait + jitter).await;
    let mut resp = match answer.body {
        Some(body) => http_response(answer.status, "application/json", body.to_string()),
        None => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = answer.status;
            r
        }
    };
    let headers = resp.headers_mut();
    headers.insert("X-Consul-Index", forced.unwrap_or(answer.index).into());
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    resp
}

/// Answer `query`, holding it while its index is at most `min_index` (when
/// above 0) for up to `wait`. Returns the answer and the forced index, if
/// any.
async fn blocking_read(
    shared: &Shared,
    query: &Query,
    min_index: u64,
    wait: Duration,
) -> (Answer, Option<u64>) {
    let deadline = Instant::now() + wait;
    let mut changes = shared.changed.subscribe();
    loop {
        changes.borrow_and_update();
        let (answer, forced) = {
            let st = shared.state();
            (read(&st, query), st.forced)
        };
        if forced.is_some()
            || min_index == 0
            || answer.index > min_index
            || Instant::now() >= deadline
        {
            return (answer, forced);
        }
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Evaluate `query` against the state now.
fn read(st: &State, query: &Query) -> Answer {
    match query {
        Query::Health {
            service,
            passing,
            tags,
        } => {
            let svc = st.services.get(service);
            let index = svc.map_or(st.catalog_index, |s| s.index);
            let entries: Vec<Value> = svc
                .into_iter()
                .flat_map(|s| &s.instances)
                .filter(|(_, i)| !passing || i.status == "passing")
                .filter(|(_, i)| tags.iter().all(|t| i.tags.contains(t)))
                .map(|(id, i)| health_entry(service, id, i))
                .collect();
            Answer {
                index: index.max(1),
                status: StatusCode::OK,
                body: Some(Value::Array(entries)),
            }
        }
        Query::Kv { key, recurse } => {
            let matches = |k: &str| {
                if *recurse {
                    k.starts_with(key.as_str())
                } else {
                    k == key
                }
            };
            let entries: Vec<(&String, &KvEntry)> = st
                .kv
                .range::<String, _>(key..)
                .take_while(|(k, _)| matches(k))
                .collect();
            let live = entries.iter().map(|(_, e)| e.modify_index).max();
            let tomb = st
                .tombstones
                .range::<String, _>(key..)
                .take_while(|(k, _)| matches(k))
                .map(|(_, i)| *i)
                .max();
            let index = match live.max(tomb) {
                Some(i) if !key.is_empty() => i,
                _ => st.kv_index,
            };
            if entries.is_empty() {
                return Answer {
                    index: index.max(1),
                    status: StatusCode::NOT_FOUND,
                    body: None,
                };
            }
            let b64 = base64::engine::general_purpose::STANDARD;
            let body = entries
                .into_iter()
                .map(|(k, e)| {
                    json!({
                        "Key": k,
                        "CreateIndex": e.create_index,
                        "ModifyIndex": e.modify_index,
                        "LockIndex": 0,
                        "Flags": 0,
                        "Value": (!e.value.is_empty()).then(|| b64.encode(&e.value)),
                    })
                })
                .collect();
            Answer {
                index: index.max(1),
                status: StatusCode::OK,
                body: Some(Value::Array(body)),
            }
        }
    }
}

/// One `/v1/health/service` entry: node, service, checks.
fn health_entry(service: &str, id: &str, i: &Instance) -> Value {
    json!({
        "Node": {
            "ID": NODE_ID,
            "Node": NODE,
            "Address": "127.0.0.1",
            "Datacenter": DATACENTER,
        },
        "Service": {
            "ID": id,
            "Service": service,
            "Tags": i.tags,
            "Address": i.address,
            "Port": i.port,
            "Meta": {},
            "Weights": { "Passing": 1, "Warning": 1 },
        },
        "Checks": [{
            "Node": NODE,
            "CheckID": format!("service:{id}"),
            "Name": format!("Service '{service}' check"),
            "Status": i.status,
            "ServiceID": id,
            "ServiceName": service,
        }],
    })
}

/// A plain-text answer without Consul's index headers (errors).
fn plain(status: StatusCode, body: &str) -> HttpResponse {
    http_response(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

/// Query parameters in order, decoded like Go's `url.ParseQuery` (`+` is a
/// space; a parameter without `=` has an empty value).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Every value of parameter `name`.
fn all<'a>(params: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
    params
        .iter()
        .filter(move |(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The first value of parameter `name`, if present.
fn first<'a>(params: &'a [(String, String)], name: &'a str) -> Option<&'a str> {
    all(params, name).next()
}

/// A boolean parameter the way Consul reads one: absent is false, present
/// without a value is true, otherwise Go's `strconv.ParseBool`.
fn bool_param(params: &[(String, String)], name: &str) -> Result<bool, ()> {
    match first(params, name) {
        None => Ok(false),
        Some("" | "1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(_) => Err(()),
    }
}

/// Decode `%XX` escapes (and `+` as a space in query strings); a malformed
/// escape is kept as it is.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|&b| char::from(b).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(u8::try_from(hi * 16 + lo).expect("two hex digits fit a byte"));
                i += 3;
            }
            (b'+', _, _) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse a Go duration (`time.ParseDuration`): an optional sign, then one
/// or more decimal numbers each with a unit (`ns`, `us`, `µs`, `ms`, `s`,
/// `m`, `h`), or a bare `0`. A negative duration is zero here (Consul then
/// uses its default). `None` when malformed or beyond Go's range.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        rest = after;
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return None;
        }
        let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mut nanos = int.checked_mul(scale)?;
        let mut place = scale;
        for digit in frac.bytes() {
            place /= 10;
            nanos += u128::from(digit - b'0') * place;
        }
        total = total.checked_add(nanos)?;
    }
    // Go's durations are an i64 of nanoseconds.
    if total > u128::from(i64::MAX.unsigned_abs()) {
        return None;
    }
    Some(if negative {
        Duration::ZERO
    } else {
        Duration::from_nanos(u64::try_from(total).ok()?)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use super::*;
    use crate::support::wait_for;

    /// One HTTP answer.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        index: Option<u64>,
        known_leader: Option<String>,
        last_contact: Option<String>,
        content_type: Option<String>,
        body: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
        }

        fn index(&self) -> u64 {
            self.index.expect("X-Consul-Index")
        }
    }

    /// A fresh client (no pooled connections) with generous timeouts.
    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build()
    }

    /// GET `path_and_query` with `agent`; `Err` only on a transport error.
    fn get_with(
        agent: &ureq::Agent,
        consul: &FakeConsul,
        path_and_query: &str,
    ) -> Result<Reply, Box<ureq::Transport>> {
        let resp = match agent
            .get(&format!("{}{path_and_query}", consul.url()))
            .call()
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(Box::new(t)),
        };
        let header = |name: &str| resp.header(name).map(str::to_owned);
        Ok(Reply {
            status: resp.status(),
            index: header("X-Consul-Index").map(|i| i.parse().expect("a numeric index")),
            known_leader: header("X-Consul-KnownLeader"),
            last_contact: header("X-Consul-LastContact"),
            content_type: header("Content-Type"),
            body: resp.into_string().expect("a readable body"),
        })
    }

    /// GET with a fresh client; panics on a transport error.
    fn get(consul: &FakeConsul, path_and_query: &str) -> Reply {
        get_with(&agent(), consul, path_and_query)
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}"))
    }

    /// The service IDs in a health answer, with their check status.
    fn instances(reply: &Reply) -> Vec<(String, String)> {
        reply
            .json()
            .as_array()
            .expect("an array")
            .iter()
            .map(|e| {
                (
                    e["Service"]["ID"].as_str().expect("ID").to_owned(),
                    e["Checks"][0]["Status"]
                        .as_str()
                        .expect("Status")
                        .to_owned(),
                )
            })
            .collect()
    }

    /// Run `query` on a thread and return once its request reached the
    /// fake (counted under `path_prefix`), so a test can then change what
    /// it waits for. The handle yields its result and how long it took.
    fn in_flight<T: Send + 'static>(
        consul: &Arc<FakeConsul>,
        path_prefix: &'static str,
        query: impl FnOnce(&FakeConsul) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<(T, Duration)> {
        let before = consul.requests(path_prefix);
        let handle = std::thread::spawn({
            let consul = consul.clone();
            move || {
                let started = StdInstant::now();
                let out = query(&consul);
                (out, started.elapsed())
            }
        });
        wait_for("the query to arrive", Duration::from_secs(10), || {
            (consul.requests(path_prefix) > before).then_some(())
        });
        handle
    }

    #[test]
    fn health_shape_and_passing_filter() {
        let consul = FakeConsul::start();
        assert!(consul.url().starts_with("http://127.0.0.1:"));
        let unknown = get(&consul, "/v1/health/service/web");
        assert_eq!(unknown.status, 200);
        assert_eq!(unknown.json(), json!([]), "an unknown service is empty");
        assert!(unknown.index() >= 1);

        consul.register("web", "web-1", "10.0.0.1", 8080, &["v1", "blue"]);
        consul.register("web", "web-2", "10.0.0.2", 8080, &["v1"]);
        consul.register("web", "web-3", "10.0.0.3", 8080, &[]);
        consul.set_check("web", "web-2", "critical");
        consul.set_check("web", "web-3", "warning");

        let all = get(&consul, "/v1/health/service/web?dc=dc1&stale");
        assert_eq!(all.status, 200);
        assert_eq!(all.content_type.as_deref(), Some("application/json"));
        assert_eq!(all.known_leader.as_deref(), Some("true"));
        assert_eq!(all.last_contact.as_deref(), Some("0"));
        assert_eq!(
            all.json()[0],
            json!({
                "Node": {"ID": NODE_ID, "Node": "node1", "Address": "127.0.0.1", "Datacenter": "dc1"},
                "Service": {
                    "ID": "web-1", "Service": "web", "Tags": ["v1", "blue"],
                    "Address": "10.0.0.1", "Port": 8080, "Meta": {},
                    "Weights": {"Passing": 1, "Warning": 1},
                },
                "Checks": [{
                    "Node": "node1", "CheckID": "service:web-1", "Name": "Service 'web' check",
                    "Status": "passing", "ServiceID": "web-1", "ServiceName": "web",
                }],
            })
        );
        let pair = |id: &str, s: &str| (id.to_owned(), s.to_owned());
        assert_eq!(
            instances(&all),
            [
                pair("web-1", "passing"),
                pair("web-2", "critical"),
                pair("web-3", "warning")
            ]
        );

        // `passing` present, true or 1: critical and warning instances vanish.
        for q in [
            "?passing",
            "?passing=true",
            "?passing=1",
            "?passing&token=x",
        ] {
            let passing = get(&consul, &format!("/v1/health/service/web{q}"));
            assert_eq!(instances(&passing), [pair("web-1", "passing")], "{q}");
            assert_eq!(passing.index(), all.index(), "{q}");
        }
        let not_filtered = get(&consul, "/v1/health/service/web?passing=false");
        assert_eq!(instances(&not_filtered).len(), 3);
        assert_eq!(
            get(&consul, "/v1/health/service/web?passing=maybe").status,
            400
        );
        // Tag filter.
        let blue = get(&consul, "/v1/health/service/web?tag=blue");
        assert_eq!(instances(&blue), [pair("web-1", "passing")]);

        // Critical, then deregistered: the passing list empties.
        consul.set_check("web", "web-1", "critical");
        assert_eq!(
            get(&consul, "/v1/health/service/web?passing").json(),
            json!([])
        );
        consul.set_check("web", "web-1", "passing");
        consul.deregister("web", "web-1");
        assert_eq!(
            get(&consul, "/v1/health/service/web?passing").json(),
            json!([])
        );
        assert_eq!(
            get(&consul, "/v1/health/service/web").json()[0]["Service"]["Tags"],
            json!(["v1"])
        );
    }

    #[test]
    fn every_write_raises_the_index_of_what_it_touches() {
        let consul = FakeConsul::start();
        let idx = |c: &FakeConsul| get(c, "/v1/health/service/web").index();
        consul.register("web", "web-1", "10.0.0.1", 80, &[]);
        let registered = idx(&consul);
        assert!(registered > 1);
        assert_eq!(registered, consul.index());

        consul.set_check("web", "web-1", "critical");
        let checked = idx(&consul);
        assert!(checked > registered);

        // A write to another service leaves this one's index alone.
        consul.register("db", "db-1", "10.0.0.9", 5432, &[]);
        assert_eq!(idx(&consul), checked);
        assert!(consul.index() > checked);

        consul.deregister("web", "web-1");
        let deregistered = get(&consul, "/v1/health/service/web");
        assert!(deregistered.index() > checked);
        assert_eq!(deregistered.json(), json!([]));

        // Deregistering what is not there changes nothing.
        consul.deregister("web", "web-1");
        assert_eq!(idx(&consul), deregistered.index());
    }

    #[test]
    fn blocking_query_returns_early_on_a_change() {
        let consul = Arc::new(FakeConsul::start());
        consul.register("web", "web-1", "10.0.0.1", 80, &[]);
        let before = get(&consul, "/v1/health/service/web?passing");
        let wait = Duration::from_secs(20);

        let q = format!(
            "/v1/health/service/web?passing&index={}&wait=20s",
            before.index()
        );
        let blocked = in_flight(&consul, "/v1/health/service/web", move |c| get(c, &q));
        consul.set_check("web", "web-1", "critical");
        let (after, took) = blocked.join().expect("the client thread");
        assert!(took < wait, "answered after {took:?}");
        assert!(after.index() > before.index());
        assert_eq!(after.json(), json!([]), "the change is in the answer");
        assert_eq!(consul.max_wait_seen(), Some(wait));
    }

    #[test]
    fn blocking_query_times_out_with_the_same_index() {
        let consul = FakeConsul::start();
        consul.register("web", "web-1", "10.0.0.1", 80, &[]);
        let before = get(&consul, "/v1/health/service/web");
        // A write elsewhere does not end the wait.
        consul.register("db", "db-1", "10.0.0.9", 5432, &[]);

        let started = StdInstant::now();
        let after = get(
            &consul,
            &format!("/v1/health/service/web?index={}&wait=200ms", before.index()),
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200),
            "answered after {took:?}"
        );
        assert!(took < Duration::from_secs(20), "answered after {took:?}");
        assert_eq!(after.index(), before.index());
        assert_eq!(after.body, before.body);
        assert_eq!(consul.max_wait_seen(), Some(Duration::from_millis(200)));

        // A lower index answers at once (no wait needed to tell: 10m).
        let lower = get(
            &consul,
            &format!(
                "/v1/health/service/web?index={}&wait=10m",
                before.index() - 1
            ),
        );
        assert_eq!(lower.index(), before.index());
        // Larger waits are recorded as asked, and served clamped.
        let _ = get(&consul, "/v1/health/service/web?index=1&wait=15m");
        assert_eq!(consul.max_wait_seen(), Some(Duration::from_secs(15 * 60)));
    }

    #[test]
    fn touch_raises_the_index_with_identical_content() {
        let consul = Arc::new(FakeConsul::start());
        consul.register("web", "web-1", "10.0.0.1", 80, &["a"]);
        let before = get(&consul, "/v1/health/service/web");

        let q = format!("/v1/health/service/web?index={}&wait=1m", before.index());
        let blocked = in_flight(&consul, "/v1/health/service/web", move |c| get(c, &q));
        consul.touch("web");
        let (after, took) = blocked.join().expect("the client thread");
        assert!(took < Duration::from_secs(60));
        assert!(after.index() > before.index(), "a return…");
        assert_eq!(after.body, before.body, "…is not a change");
    }

    #[test]
    fn kv_recurse_404_base64_and_deletes() {
        let consul = Arc::new(FakeConsul::start());
        let empty = get(&consul, "/v1/kv/app/?recurse");
        assert_eq!(empty.status, 404);
        assert_eq!(empty.body, "");
        assert!(empty.index() >= 1, "a 404 still carries the index");
        assert_eq!(empty.known_leader.as_deref(), Some("true"));

        consul.kv_put("app/b", b"two");
        consul.kv_put("app/a", b"one");
        consul.kv_put("app/empty", b"");
        consul.kv_put("other/x", b"x");
        let listed = get(&consul, "/v1/kv/app/?recurse");
        assert_eq!(listed.status, 200);
        assert_eq!(listed.content_type.as_deref(), Some("application/json"));
        let entries = listed.json();
        let keys: Vec<&str> = entries
            .as_array()
            .expect("an array")
            .iter()
            .map(|e| e["Key"].as_str().expect("Key"))
            .collect();
        assert_eq!(keys, ["app/a", "app/b", "app/empty"], "sorted by key");
        assert_eq!(entries[0]["Value"], json!("b25l"), "base64 of \"one\"");
        assert_eq!(entries[2]["Value"], Value::Null, "an empty value is null");
        assert_eq!(entries[0]["LockIndex"], json!(0));
        assert_eq!(entries[0]["Flags"], json!(0));
        assert!(entries[0].get("Session").is_none());
        let modify = |e: &Value| e["ModifyIndex"].as_u64().expect("ModifyIndex");
        assert_eq!(
            listed.index(),
            modify(&entries[2]),
            "the highest ModifyIndex under the prefix, not the later other/x"
        );
        assert!(consul.index() > listed.index());

        // Rewriting the same value is a write: ModifyIndex moves, CreateIndex
        // stays.
        consul.kv_put("app/a", b"one");
        let rewritten = get(&consul, "/v1/kv/app/a");
        assert_eq!(rewritten.json()[0]["Value"], json!("b25l"));
        assert_eq!(
            rewritten.json()[0]["CreateIndex"],
            entries[0]["CreateIndex"]
        );
        assert!(modify(&rewritten.json()[0]) > modify(&entries[0]));

        // A delete wakes a blocked query and shows in the list and index.
        let at = get(&consul, "/v1/kv/app/?recurse").index();
        let blocked = in_flight(&consul, "/v1/kv/app/", move |c| {
            get(c, &format!("/v1/kv/app/?recurse&index={at}&wait=1m"))
        });
        consul.kv_delete("app/b");
        let (deleted, _) = blocked.join().expect("the client thread");
        assert!(deleted.index() > at, "the tombstone's index");
        let keys: Vec<Value> = deleted
            .json()
            .as_array()
            .expect("an array")
            .iter()
            .map(|e| e["Key"].clone())
            .collect();
        assert_eq!(keys, [json!("app/a"), json!("app/empty")]);

        // Deleting everything: a 404 whose index is the last delete's.
        consul.kv_delete("app/a");
        consul.kv_delete("app/empty");
        let gone = get(&consul, "/v1/kv/app/?recurse");
        assert_eq!(gone.status, 404);
        assert_eq!(gone.index(), consul.index());
        assert_eq!(get(&consul, "/v1/kv/app/a").status, 404);
        assert_eq!(get(&consul, "/v1/kv/other/x").status, 200);
    }

    #[test]
    fn force_index_overrides_the_header_and_blocking() {
        let consul = FakeConsul::start();
        consul.register("web", "web-1", "10.0.0.1", 80, &[]);
        let normal = get(&consul, "/v1/health/service/web").index();

        consul.force_index(Some(0));
        let zero = get(
            &consul,
            &format!("/v1/health/service/web?index={normal}&wait=10m"),
        );
        assert_eq!(zero.index, Some(0), "returned at once, with index 0");
        assert_eq!(get(&consul, "/v1/kv/x?recurse").index, Some(0));

        consul.force_index(Some(1));
        assert_eq!(get(&consul, "/v1/health/service/web").index, Some(1));

        consul.force_index(None);
        assert_eq!(get(&consul, "/v1/health/service/web").index(), normal);
    }

    #[test]
    fn force_index_releases_a_waiting_query() {
        let consul = Arc::new(FakeConsul::start());
        consul.register("web", "web-1", "10.0.0.1", 80, &[]);
        let at = get(&consul, "/v1/health/service/web").index();
        let blocked = in_flight(&consul, "/v1/health/service/web", move |c| {
            get(c, &format!("/v1/health/service/web?index={at}&wait=1m"))
        });
        consul.force_index(Some(0));
        let (reply, took) = blocked.join().expect("the client thread");
        assert!(took < Duration::from_secs(60));
        assert_eq!(reply.index, Some(0));
    }

    #[test]
    fn restart_aborts_a_blocking_query_in_flight() {
        let consul = Arc::new(FakeConsul::start());
        consul.register("web", "web-1", "10.0.0.1", 80, &[]);
        let at = get(&consul, "/v1/health/service/web").index();
        let blocked = in_flight(&consul, "/v1/health/service/web", move |c| {
            get_with(
                &agent(),
                c,
                &format!("/v1/health/service/web?index={at}&wait=1m"),
            )
        });
        assert_eq!(consul.open_connections(), 1);
        consul.restart();
        assert_eq!(consul.open_connections(), 0, "restart returns once reset");
        let (result, took) = blocked.join().expect("the client thread");
        assert!(
            result.is_err(),
            "the client sees an error, not {:?}",
            result.ok()
        );
        assert!(took < Duration::from_secs(60));

        let after = get(&consul, "/v1/health/service/web");
        assert_eq!(after.index(), at, "state survives a restart");
        assert_eq!(instances(&after).len(), 1);
    }

    #[test]
    fn set_down_refuses_and_comes_back() {
        let consul = FakeConsul::start();
        consul.kv_put("k", b"v");
        let keep_alive = agent();
        assert_eq!(
            get_with(&keep_alive, &consul, "/v1/kv/k")
                .expect("up")
                .status,
            200
        );
        let served = consul.requests("/v1/kv/");

        consul.set_down(true);
        assert!(get_with(&agent(), &consul, "/v1/kv/k").is_err());
        assert!(
            get_with(&keep_alive, &consul, "/v1/kv/k").is_err(),
            "an open keep-alive connection is gone too"
        );
        assert_eq!(consul.requests("/v1/kv/"), served, "nothing was served");
        assert!(consul.accepted() >= 2);

        consul.set_down(false);
        let back = get(&consul, "/v1/kv/k");
        assert_eq!(back.status, 200);
        assert_eq!(back.json()[0]["Value"], json!("dg=="));
    }

    #[test]
    fn bad_requests_are_rejected_like_consul() {
        let consul = FakeConsul::start();
        assert_eq!(get(&consul, "/v1/health/service/web?wait=30").status, 400);
        assert_eq!(get(&consul, "/v1/health/service/web?index=-1").status, 400);
        assert_eq!(get(&consul, "/v1/health/service/").status, 400);
        assert_eq!(get(&consul, "/v1/health/service/web?dc=dc2").status, 500);
        assert_eq!(get(&consul, "/v1/kv/a?keys").status, 400);
        assert_eq!(get(&consul, "/v1/agent/self").status, 404);
        assert_eq!(get(&consul, "/").status, 404);
        let put = agent()
            .put(&format!("{}/v1/kv/a", consul.url()))
            .send_string("x");
        assert!(matches!(put, Err(ureq::Error::Status(405, _))));
        assert_eq!(consul.requests("/v1/"), 7);
        assert_eq!(consul.requests("/v1/health/"), 4);
        assert_eq!(consul.max_wait_seen(), None);
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        for (s, d) in [
            ("0", Duration::ZERO),
            ("100ms", ms(100)),
            ("30s", ms(30_000)),
            ("5m", ms(300_000)),
            ("1m30s", ms(90_000)),
            ("1.5h", ms(5_400_000)),
            (".5s", ms(500)),
            ("1.s", ms(1000)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("+2s", ms(2000)),
            ("-2s", Duration::ZERO),
        ] {
            assert_eq!(parse_go_duration(s), Some(d), "{s}");
        }
        for s in ["", "30", "s", "1x", ".s", "1..2s", "-", "3000000h"] {
            assert_eq!(parse_go_duration(s), None, "{s:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("/v1/kv/a%2Fb%20c+d", false),
            "/v1/kv/a/b c+d"
        );
        assert_eq!(percent_decode("a+b%3d%zz%", true), "a b=%zz%");
        assert_eq!(
            parse_query("passing&tag=a%20b&index=5"),
            [
                ("passing".to_owned(), String::new()),
                ("tag".to_owned(), "a b".to_owned()),
                ("index".to_owned(), "5".to_owned()),
            ]
        );
    }

    #[test]
    fn a_client_giving_up_frees_its_connection() {
        let consul = FakeConsul::start();
        let impatient = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(200))
            .build();
        let gave_up = get_with(&impatient, &consul, "/v1/kv/?recurse&index=1&wait=1m");
        assert!(gave_up.is_err(), "the client timed out");
        drop(impatient);
        wait_for(
            "the parked query's connection to close",
            Duration::from_secs(10),
            || (consul.open_connections() == 0).then_some(()),
        );
    }

    #[test]
    fn drop_stops_the_server() {
        let consul = FakeConsul::start();
        let addr = consul.addr();
        assert_eq!(get(&consul, "/v1/kv/?recurse").status, 404);
        drop(consul);
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
