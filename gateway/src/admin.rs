//! The admin HTTP server: liveness, readiness, metrics and a JSON view.
//!
//! Owns the hyper server and the routes `GET /livez`, `/readyz`,
//! `/metrics`, `/v1/plugins` and `/v1/sources`. Handlers only read shared
//! status; they must never wait on a source or a plugin, so the admin port
//! answers even while everything else is stuck.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, PluginReport};
use crate::plugin_dir::{LoaderStatus, Rejection};
use crate::source::{SourceReport, SourceStatus};
use crate::telemetry::Metrics;

/// What the handlers read.
pub struct AdminState {
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Running plugins.
    pub dispatcher: Arc<Dispatcher>,
    /// Plugin directory status.
    pub loader: Arc<LoaderStatus>,
    /// Every configured source.
    pub sources: Vec<Arc<SourceStatus>>,
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
    /// Initial sync delivered.
    pub synced: bool,
    /// Connected now.
    pub connected: bool,
    /// Why not, when known.
    pub last_error: Option<String>,
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
}

impl AdminState {
    /// Current readiness.
    pub fn readiness(&self) -> Readiness {
        let sources: Vec<SourceReadiness> = self
            .sources
            .iter()
            .map(|s| {
                let r = s.report();
                SourceReadiness {
                    name: r.name,
                    synced: r.synced,
                    connected: r.connected,
                    last_error: r.last_error,
                }
            })
            .collect();
        let plugins = PluginsReadiness {
            loaded: self.loader.is_loaded(),
            running: self.dispatcher.plugin_names(),
            rejected: self.loader.rejected(),
        };
        Readiness {
            ready: plugins.loaded && sources.iter().all(|s| s.synced),
            sources,
            plugins,
        }
    }
}

/// The `/v1/plugins` body.
#[derive(Debug, Serialize)]
struct PluginsBody {
    plugins: Vec<PluginReport>,
    rejected: Vec<Rejection>,
}

/// The `/v1/sources` body.
#[derive(Debug, Serialize)]
struct SourcesBody {
    sources: Vec<SourceReport>,
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

/// Answer one request.
pub fn route(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let known = [
        "/livez",
        "/readyz",
        "/metrics",
        "/v1/plugins",
        "/v1/sources",
    ];
    if !known.contains(&path) {
        return json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: "no such endpoint",
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
        "/v1/plugins" => json(
            StatusCode::OK,
            &PluginsBody {
                plugins: state.dispatcher.reports(),
                rejected: state.loader.rejected(),
            },
        ),
        _ => json(
            StatusCode::OK,
            &SourcesBody {
                sources: state.sources.iter().map(|s| s.report()).collect(),
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
                let r = route(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
    connections.shutdown().await;
}
