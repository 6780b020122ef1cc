//! The admin HTTP server: liveness, readiness, metrics and a JSON view.
//!
//! Owns the hyper server and the routes `GET /livez`, `/readyz`,
//! `/metrics`, `/v1/plugins`, `/v1/sources`, `/v1/cluster`,
//! `/v1/plugins/NAME/dead-letters`, `/v1/trace` ([`trace`]), the live
//! tail `/v1/events/stream` ([`stream`]), the console under `/ui/` ([`ui`]),
//! and, with the bearer token, `POST /v1/reload`,
//! `POST /v1/plugins/NAME/dead-letters/replay` and
//! `DELETE /v1/plugins/NAME/dead-letters`. Read handlers only read shared status; they must never
//! wait on a source or a plugin, so the admin port answers even while
//! everything else is stuck. A reload is handed to the app and answered
//! with what it changed. Every listing (`/v1/plugins`, `/v1/sources`, the
//! dead letters) answers one page at a time (`?limit=N&after=CURSOR`, at
//! most [`MAX_PAGE`] items and, for dead letters, [`PAGE_BYTES`]), with a
//! `next` link while more follow, so no answer grows with what plugins
//! produce.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod stream;
mod trace;
mod ui;

use crate::dispatch::{Dispatcher, PluginReport};
use crate::plugin_dir::{CompilingNow, LoaderStatus, Rejection};
use crate::source::{SourceReport, SourceStatus};
use crate::store::LetterTally;
use crate::telemetry::Metrics;

/// A reload request from `POST /v1/reload`, answered on the enclosed
/// channel.
pub type ReloadRequest = oneshot::Sender<Result<serde_json::Value, String>>;

/// Settings the admin server reads and a reload may change.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// Bearer token for mutating endpoints; `None` disables them.
    pub token: Option<String>,
    /// Whether a degraded source makes `/readyz` answer 503.
    pub degraded_is_unready: bool,
    /// Whether the live tail shows values.
    pub reveal_values: bool,
}

/// What the handlers read.
pub struct AdminState {
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Running plugins.
    pub dispatcher: Arc<Dispatcher>,
    /// Plugin directory status.
    pub loader: Arc<LoaderStatus>,
    /// Every running source (replaced on reload).
    pub sources: RwLock<Vec<Arc<SourceStatus>>>,
    /// Token and readiness policy (replaced on reload).
    pub settings: RwLock<AdminSettings>,
    /// Where reload requests go.
    pub reload: mpsc::Sender<ReloadRequest>,
    /// Cluster membership and ownership, in cluster mode.
    pub cluster: Option<Arc<RwLock<crate::cluster::ClusterReport>>>,
    /// True until the configured sources have been started (before that the
    /// source list is incomplete and readiness would be vacuous).
    pub starting: std::sync::atomic::AtomicBool,
    /// Live tail streams open now.
    pub streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// The `/readyz` body.
#[derive(Debug, Serialize)]
pub struct Readiness {
    /// True when every source finished its initial sync and the plugin
    /// directory is loaded.
    pub ready: bool,
    /// Per source.
    pub sources: Vec<SourceReadiness>,
    /// The plugin directory.
    pub plugins: PluginsReadiness,
}

/// One source in `/readyz`.
#[derive(Debug, Serialize)]
pub struct SourceReadiness {
    /// Source name.
    pub name: String,
    /// `syncing` (initial sync not done), `ready`, or `degraded` (synced
    /// once, connection lost since).
    pub state: &'static str,
    /// Initial sync delivered.
    pub synced: bool,
    /// Connected now.
    pub connected: bool,
    /// Why not, when known.
    pub last_error: Option<String>,
    /// How far the initial sync got, while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::source::SyncProgress>,
}

/// The plugin directory in `/readyz`.
#[derive(Debug, Serialize)]
pub struct PluginsReadiness {
    /// Initial directory contents processed.
    pub loaded: bool,
    /// Running plugins.
    pub running: Vec<String>,
    /// Files rejected (the gateway is still ready: they are reported, not
    /// waited for).
    pub rejected: Vec<Rejection>,
    /// Plugins whose newest file is compiling; past `[plugins]
    /// compile_ready_wait` they no longer hold readiness.
    pub compiling: Vec<CompilingNow>,
}

impl AdminState {
    /// Current readiness.
    pub fn readiness(&self) -> Readiness {
        let degraded_is_unready = self.settings.read().degraded_is_unready;
        let sources: Vec<SourceReadiness> = self
            .sources
            .read()
            .iter()
            .map(|s| {
                let r = s.report();
                SourceReadiness {
                    name: r.name,
                    state: match (r.synced, r.connected) {
                        (false, _) => "syncing",
                        (true, true) => "ready",
                        (true, false) => "degraded",
                    },
                    synced: r.synced,
                    connected: r.connected,
                    last_error: r.last_error,
                    sync: r.sync,
                }
            })
            .collect();
        let plugins = PluginsReadiness {
            loaded: self.loader.is_loaded(),
            running: self.dispatcher.plugin_names(),
            rejected: self.loader.rejected(),
            compiling: self.loader.compiling(),
        };
        Readiness {
            ready: plugins.loaded
                && !self.starting.load(std::sync::atomic::Ordering::SeqCst)
                && sources.iter().all(|s| match s.state {
                    "ready" => true,
                    "degraded" => !degraded_is_unready,
                    _ => false,
                }),
            sources,
            plugins,
        }
    }
}

/// Items in a page of a listing when the request gives no `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// Most items in one page of a listing.
pub const MAX_PAGE: usize = 1000;
/// Most bytes of dead letters (as stored) in one page; a larger letter
/// comes in a page of its own.
pub const PAGE_BYTES: usize = 1 << 20;

/// Which page of a listing: `?limit=N&after=CURSOR`. The cursor is the
/// last name (plugins, sources) or id (dead letters) of the page before.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Page {
    limit: usize,
    after: Option<String>,
}

impl Page {
    /// Read the query string of a listing request.
    fn parse(query: Option<&str>) -> Result<Page, String> {
        let mut page = Page {
            limit: DEFAULT_PAGE,
            after: None,
        };
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "limit" => {
                    page.limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "limit {value:?}: give a whole number from 1 to {MAX_PAGE} (default {DEFAULT_PAGE})"
                            )
                        })?;
                }
                "after" => page.after = Some(value.into_owned()),
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?}; listings take limit and after"
                    ));
                }
            }
        }
        Ok(page)
    }

    /// Whether `name` comes after the cursor.
    fn follows(&self, name: &str) -> bool {
        self.after.as_deref().is_none_or(|a| name > a)
    }

    /// The link to the page after the one ending at `last`, on `path`.
    fn next(&self, path: &str, last: &str) -> String {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("limit", &self.limit.to_string())
            .append_pair("after", last)
            .finish();
        format!("{path}?{query}")
    }
}

/// The `/v1/plugins` body: a page of plugin names, each with its running
/// report and its rejected file, when it has them.
#[derive(Debug, Serialize)]
struct PluginsBody {
    plugins: Vec<PluginReport>,
    rejected: Vec<Rejection>,
    /// The next page, when more plugins follow.
    next: Option<String>,
}

/// A source in `/v1/sources`: its report, and how far its plugins are
/// behind it.
#[derive(Debug, Serialize)]
struct SourceRow {
    #[serde(flatten)]
    report: SourceReport,
    #[serde(flatten)]
    lag: crate::dispatch::trace::SourceLag,
}

/// The `/v1/sources` body.
#[derive(Debug, Serialize)]
struct SourcesBody {
    sources: Vec<SourceRow>,
    /// The next page, when more sources follow.
    next: Option<String>,
}

/// A page of dead letters.
#[derive(Debug, Serialize)]
struct DeadLettersBody<'a> {
    plugin: &'a str,
    /// All of the plugin's letters: how many, and their bytes as stored.
    total: LetterTally,
    dead_letters: Vec<crate::store::DeadLetter>,
    /// The next page, when more letters follow.
    next: Option<String>,
}

fn bad_request(error: &str) -> Response<Full<Bytes>> {
    json(StatusCode::BAD_REQUEST, &ErrorBody { error })
}

/// A page of `/v1/plugins`: the running plugins and rejected files whose
/// names follow the cursor, in name order.
fn plugins_page(state: &AdminState, path: &str, page: &Page) -> Response<Full<Bytes>> {
    let rejected = state.loader.rejected();
    let mut names: Vec<String> = state
        .dispatcher
        .plugin_names()
        .into_iter()
        .chain(rejected.iter().map(|r| r.name.clone()))
        .filter(|n| page.follows(n))
        .collect();
    names.sort_unstable();
    names.dedup();
    let more = names.len() > page.limit;
    names.truncate(page.limit);
    let body = PluginsBody {
        plugins: names
            .iter()
            .filter_map(|n| state.dispatcher.report(n))
            .collect(),
        rejected: rejected
            .into_iter()
            .filter(|r| names.binary_search(&r.name).is_ok())
            .collect(),
        next: more
            .then(|| names.last().map(|last| page.next(path, last)))
            .flatten(),
    };
    json(StatusCode::OK, &body)
}

/// A page of `/v1/sources`, in name order.
fn sources_page(state: &AdminState, path: &str, page: &Page) -> Response<Full<Bytes>> {
    let mut sources: Vec<SourceReport> = state
        .sources
        .read()
        .iter()
        .map(|s| s.report())
        .filter(|r| page.follows(&r.name))
        .collect();
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    let more = sources.len() > page.limit;
    sources.truncate(page.limit);
    let next = more
        .then(|| sources.last().map(|last| page.next(path, &last.name)))
        .flatten();
    let sources = sources
        .into_iter()
        .map(|report| SourceRow {
            lag: state.dispatcher.source_lag(&report.name),
            report,
        })
        .collect();
    json(StatusCode::OK, &SourcesBody { sources, next })
}

/// A page of `plugin`'s dead letters, oldest first: at most the page's
/// limit and [`PAGE_BYTES`] (one letter at least).
fn dead_letters_page(
    state: &AdminState,
    plugin: &str,
    path: &str,
    page: &Page,
) -> Response<Full<Bytes>> {
    let after = match page.after.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(id)) => id,
        Some(Err(_)) => {
            return bad_request("after: give the id of the last dead letter of the page before");
        }
    };
    let letters = state
        .dispatcher
        .dead_letters(plugin, after, page.limit, PAGE_BYTES);
    let body = DeadLettersBody {
        plugin,
        total: state.dispatcher.dead_letter_tally(plugin),
        dead_letters: letters.letters,
        next: letters
            .next_after
            .map(|last| page.next(path, &last.to_string())),
    };
    json(StatusCode::OK, &body)
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

/// Whether the request carries the admin token.
fn authorized(
    settings: &AdminSettings,
    authorization: Option<&str>,
) -> Result<(), Box<Response<Full<Bytes>>>> {
    let Some(token) = &settings.token else {
        return Err(Box::new(json(
            StatusCode::FORBIDDEN,
            &ErrorBody {
                error: "mutating endpoints are disabled: set [admin] token or WATCHGATE_ADMIN_TOKEN",
            },
        )));
    };
    let given = authorization.and_then(|h| h.strip_prefix("Bearer "));
    // Compare without stopping at the first difference.
    let ok = given.is_some_and(|g| {
        let (a, b) = (g.as_bytes(), token.as_bytes());
        let mut diff = a.len() ^ b.len();
        for i in 0..a.len().max(b.len()) {
            diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
        }
        diff == 0
    });
    if ok {
        return Ok(());
    }
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        &ErrorBody {
            error: "missing or wrong bearer token",
        },
    );
    r.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    Err(Box::new(r))
}

/// Answer `POST /v1/reload`.
async fn reload(state: &AdminState, authorization: Option<&str>) -> Response<Full<Bytes>> {
    let settings = state.settings.read().clone();
    if let Err(r) = authorized(&settings, authorization) {
        return *r;
    }
    let closing = || {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &ErrorBody {
                error: "the gateway is shutting down",
            },
        )
    };
    let (tx, rx) = oneshot::channel();
    if state.reload.send(tx).await.is_err() {
        return closing();
    }
    match rx.await {
        Ok(Ok(report)) => json(StatusCode::OK, &report),
        Ok(Err(reason)) => json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({
                "error": "the new configuration was refused; the running one stays",
                "reason": reason,
            }),
        ),
        Err(_) => closing(),
    }
}

/// Answer the dead-letter endpoints under `/v1/plugins/NAME/`, or `None`
/// for any other path.
fn dead_letters(
    state: &AdminState,
    method: &Method,
    path: &str,
    query: Option<&str>,
    authorization: Option<&str>,
) -> Option<Response<Full<Bytes>>> {
    let rest = path.strip_prefix("/v1/plugins/")?;
    let (plugin, action) = rest.split_once('/')?;
    let plugin = percent_encoding::percent_decode_str(plugin).decode_utf8_lossy();
    let plugin = &*plugin;
    let replay = match action {
        "dead-letters" => false,
        "dead-letters/replay" => true,
        _ => return None,
    };
    let mutating = |f: &dyn Fn() -> Response<Full<Bytes>>| {
        let settings = state.settings.read().clone();
        match authorized(&settings, authorization) {
            Ok(()) => f(),
            Err(r) => *r,
        }
    };
    let wrong_method = |allowed: &str| {
        json(
            StatusCode::METHOD_NOT_ALLOWED,
            &ErrorBody { error: allowed },
        )
    };
    Some(match (replay, method) {
        (false, &Method::GET | &Method::HEAD) => match Page::parse(query) {
            Ok(page) => dead_letters_page(state, plugin, path, &page),
            Err(e) => bad_request(&e),
        },
        (false, &Method::DELETE) => mutating(&|| {
            let n = state.dispatcher.delete_dead_letters(plugin);
            json(
                StatusCode::OK,
                &serde_json::json!({ "plugin": plugin, "deleted": n }),
            )
        }),
        (true, &Method::POST) => mutating(&|| match state.dispatcher.replay_dead_letters(plugin) {
            Some(n) => json(
                StatusCode::OK,
                &serde_json::json!({ "plugin": plugin, "replayed": n }),
            ),
            None => json(
                StatusCode::NOT_FOUND,
                &ErrorBody {
                    error: "no such plugin is running; dead letters replay into a running plugin",
                },
            ),
        }),
        (false, _) => wrong_method("use GET, or DELETE with the admin bearer token"),
        (true, _) => wrong_method("use POST, with the admin bearer token"),
    })
}

/// Answer one request that changes nothing; `query` is the request's
/// query string (the page of a listing).
pub fn route(
    state: &AdminState,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<Full<Bytes>> {
    let known = [
        "/livez",
        "/readyz",
        "/metrics",
        "/v1/plugins",
        "/v1/sources",
        "/v1/reload",
        "/v1/cluster",
    ];
    if !known.contains(&path) {
        return json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: "no such endpoint",
            },
        );
    }
    if path == "/v1/reload" {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &ErrorBody {
                error: "use POST, with the admin bearer token",
            },
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &ErrorBody {
                error: "only GET is allowed here",
            },
        );
    }
    match path {
        "/livez" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let r = state.readiness();
            let code = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &r)
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/v1/plugins" | "/v1/sources" => match Page::parse(query) {
            Ok(page) if path == "/v1/plugins" => plugins_page(state, path, &page),
            Ok(page) => sources_page(state, path, &page),
            Err(e) => bad_request(&e),
        },
        "/v1/cluster" => match &state.cluster {
            Some(c) => json(StatusCode::OK, &*c.read()),
            None => json(
                StatusCode::NOT_FOUND,
                &ErrorBody {
                    error: "not in cluster mode: this gateway runs alone (no [cluster] in its config)",
                },
            ),
        },
        _ => json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: "no such endpoint",
            },
        ),
    }
}

/// Serve until `shutdown`; open connections are closed then.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "Admin server could not accept a connection.");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let auth = req
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let (path, query) = (req.uri().path(), req.uri().query());
                    let read = req.method() == Method::GET || req.method() == Method::HEAD;
                    if read && path == "/v1/events/stream" {
                        return Ok::<_, Infallible>(stream::stream(&state));
                    }
                    let r = if req.method() == Method::POST && path == "/v1/reload" {
                        reload(&state, auth.as_deref()).await
                    } else if read && path == "/v1/trace" {
                        trace::trace(&state, query)
                    } else if let Some(r) = ui::route(req.method(), path) {
                        r
                    } else if let Some(r) =
                        dead_letters(&state, req.method(), path, query, auth.as_deref())
                    {
                        r
                    } else {
                        route(&state, req.method(), path, query)
                    };
                    Ok::<_, Infallible>(r.map(http_body_util::BodyExt::boxed))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    connections.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_read_from_the_query_and_links_to_the_next() {
        let page = Page::parse(None).unwrap();
        assert_eq!(page.limit, DEFAULT_PAGE);
        assert!(page.follows(""));
        let page = Page::parse(Some("limit=2&after=fault%2Dx+y")).unwrap();
        assert_eq!(page.limit, 2);
        assert_eq!(page.after.as_deref(), Some("fault-x y"));
        assert!(!page.follows("fault-x y") && page.follows("fault-z"));
        let next = page.next("/v1/plugins", "a&b=c");
        assert_eq!(next, "/v1/plugins?limit=2&after=a%26b%3Dc");
        let again = Page::parse(next.split_once('?').map(|(_, q)| q)).unwrap();
        assert_eq!(again.after.as_deref(), Some("a&b=c"));
    }

    #[test]
    fn a_bad_page_names_the_limit() {
        for bad in ["limit=0", "limit=1001", "limit=many"] {
            let e = Page::parse(Some(bad)).unwrap_err();
            assert!(e.contains("from 1 to 1000"), "{bad}: {e}");
        }
        let e = Page::parse(Some("offset=3")).unwrap_err();
        assert!(e.contains("\"offset\""), "{e}");
    }
}
