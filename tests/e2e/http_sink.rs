//! A loopback HTTP server that records what it receives: the far end of
//! the `http` capability in tests. Paths starting with `/redirect/` answer
//! 302 to the URL after the prefix; a path starting with `/flaky/` answers
//! 503 the first time it is asked for; everything else answers 200. A
//! [`LoopbackServer`] (hyper, the gateway's own HTTP stack, one task per
//! connection), so concurrent requests never wait for each other.

use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

use crate::loopback::{HttpResponse, LoopbackServer};

/// One received request.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query.
    pub url: String,
    /// Headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Body as text.
    pub body: String,
}

/// The running server; stops when dropped.
pub struct HttpSink {
    server: LoopbackServer,
    received: Arc<Mutex<Vec<Received>>>,
}

async fn answer(req: Request<Incoming>, received: Arc<Mutex<Vec<Received>>>) -> HttpResponse {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let url = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let first = {
        let all = received.lock().unwrap();
        !all.iter().any(|r| r.url == url)
    };
    received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        url: url.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    });
    let response = match url.strip_prefix("/redirect/") {
        Some(to) => Response::builder()
            .status(302)
            .header("location", to)
            .body(Full::new(Bytes::new())),
        None if first && url.starts_with("/flaky/") => Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(b"try again"))),
        None => Response::builder().body(Full::new(Bytes::from_static(b"ok"))),
    };
    response.expect("a valid response")
}

impl HttpSink {
    /// Listen on a free loopback port.
    pub fn start() -> HttpSink {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let server = LoopbackServer::start_http("http sink", {
            let received = received.clone();
            move |req| answer(req, received.clone())
        });
        HttpSink { server, received }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.server.addr().to_string()
    }

    /// What arrived so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}
