//! A loopback HTTP server that records what it receives: the far end of
//! the `http` capability in tests. Paths starting with `/redirect/` answer
//! 302 to the URL after the prefix; everything else answers 200.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

/// The running server.
pub struct HttpSink {
    server: Arc<tiny_http::Server>,
    received: Arc<Mutex<Vec<Received>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpSink {
    /// Listen on a free loopback port.
    pub fn start() -> HttpSink {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind the sink"));
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (s, r) = (server.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                let mut body = String::new();
                let _ = req.as_reader().read_to_string(&mut body);
                let url = req.url().to_owned();
                r.lock().unwrap().push(Received {
                    method: req.method().to_string(),
                    url: url.clone(),
                    headers: req
                        .headers()
                        .iter()
                        .map(|h| {
                            (
                                h.field.as_str().as_str().to_ascii_lowercase(),
                                h.value.as_str().to_owned(),
                            )
                        })
                        .collect(),
                    body,
                });
                let response = match url.strip_prefix("/redirect/") {
                    Some(to) => tiny_http::Response::from_string("")
                        .with_status_code(302)
                        .with_header(
                            tiny_http::Header::from_bytes("Location", to.as_bytes())
                                .expect("header"),
                        ),
                    None => tiny_http::Response::from_string("ok"),
                };
                let _ = req.respond(response);
            }
        });
        HttpSink {
            server,
            received,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.server
            .server_addr()
            .to_ip()
            .expect("an IP listener")
            .to_string()
    }

    /// What arrived so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
