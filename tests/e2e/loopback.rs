//! A TCP server on `127.0.0.1` for tests, and the one place that knows how
//! to run one: it binds a free port, serves from its own thread with a
//! single-threaded tokio runtime (so synchronous tests can drive it), tracks
//! every open connection so a test can reset them all, can refuse new
//! connections, and stops on drop. The fakes built on it (the fault proxy,
//! the fake Consul, the fake Nacos, the HTTP sink) keep only their protocol;
//! this module must not know what they serve.
//!
//! Semantics shared by every server built here:
//! - Every connection is counted ([`LoopbackServer::accepted`]), refused
//!   ones included.
//! - A refused connection is reset right after the accept, the nearest a
//!   listening socket gets to "connection refused"; it never counts as open.
//! - A reset ([`LoopbackServer::reset_all`]) aborts a connection with a TCP
//!   RST (`SO_LINGER` 0); the call returns once those connections are
//!   closed.
//! - Dropping the server closes the listener and every connection (FIN).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// How long [`LoopbackServer::reset_all`] waits for connections to close.
const RESET_DEADLINE: Duration = Duration::from_secs(10);

/// Fires when the test asks for this connection to be reset; the serving
/// task then drops the connection with [`abort`].
pub type Reset = oneshot::Receiver<()>;

/// An HTTP answer, as the fakes build them.
pub type HttpResponse = Response<Full<Bytes>>;

/// A running loopback server. See the module docs for its semantics.
pub struct LoopbackServer {
    name: String,
    addr: SocketAddr,
    conns: Arc<Conns>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LoopbackServer {
    /// Listen on `127.0.0.1:0` and hand every admitted connection, with the
    /// signal that resets it, to `serve`, on one task each. `name` (such as
    /// `"fake Consul"`) names the thread and the panics.
    pub fn start<S, F>(name: &str, serve: S) -> LoopbackServer
    where
        S: Fn(TcpStream, Reset) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind the {name}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("listening address");
        let conns = Arc::new(Conns::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("the {name} runtime: {e}"));
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{}-{}", name.replace(' ', "-"), addr.port()))
            .spawn({
                let conns = conns.clone();
                move || {
                    runtime.block_on(async move {
                        let listener =
                            TcpListener::from_std(listener).expect("register the listener");
                        accept_loop(listener, conns, serve, stop).await;
                    });
                }
            })
            .unwrap_or_else(|e| panic!("spawn the {name} thread: {e}"));
        LoopbackServer {
            name: name.to_owned(),
            addr,
            conns,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// [`LoopbackServer::start`] for HTTP/1.1: every request goes to
    /// `handle`; a reset drops the request in flight.
    pub fn start_http<H, F>(name: &str, handle: H) -> LoopbackServer
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + Unpin + 'static,
        F: Future<Output = HttpResponse> + Send + 'static,
    {
        LoopbackServer::start(name, move |stream, reset| {
            serve_http(stream, reset, handle.clone())
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far, refused ones included.
    pub fn accepted(&self) -> u64 {
        self.conns.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (refused ones never count).
    pub fn open_connections(&self) -> usize {
        self.conns.lock().open.len()
    }

    /// Reset every connection open now and return once they are closed;
    /// panics if they are not within 10 seconds. New connections are not
    /// affected.
    pub fn reset_all(&self) {
        self.conns.reset_open(self.conns.lock(), &self.name);
    }

    /// While refusing, reset every new connection right after the accept;
    /// open ones stay.
    pub fn set_refusing(&self, refusing: bool) {
        self.conns.lock().refusing = refusing;
    }

    /// Going down refuses new connections and resets the open ones (in one
    /// step, so no connection slips in between); coming up accepts again.
    pub fn set_down(&self, down: bool) {
        let mut conns = self.conns.lock();
        conns.refusing = down;
        if down {
            self.conns.reset_open(conns, &self.name);
        }
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Close `stream` with a TCP RST instead of a FIN.
pub fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// A response with `status`, a `Content-Type` and `body`.
pub fn http_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> HttpResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Serve HTTP/1.1 on `stream` until the client leaves or `reset` fires; a
/// reset drops the request in flight and closes the socket with an RST.
async fn serve_http<H, F>(stream: TcpStream, mut reset: Reset, handle: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Unpin + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let answer = handle(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let mut conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = &mut conn => {}
        _ = &mut reset => abort(conn.into_parts().io.into_inner()),
    }
}

/// Accept until `stop` fires; every connection task belongs to `tasks` and
/// is aborted when the loop ends.
async fn accept_loop<S, F>(
    listener: TcpListener,
    conns: Arc<Conns>,
    serve: S,
    mut stop: oneshot::Receiver<()>,
) where
    S: Fn(TcpStream, Reset) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or similar: give open connections
                    // a moment to close instead of spinning on the error.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                conns.accepted.fetch_add(1, Ordering::SeqCst);
                let Some((registered, reset)) = conns.admit() else {
                    abort(stream);
                    continue;
                };
                let served = serve(stream, reset);
                tasks.spawn(async move {
                    served.await;
                    // After the socket is closed, so reset_all returns only
                    // once the resets went out.
                    drop(registered);
                });
            }
        }
    }
    tasks.shutdown().await;
}

/// Every open connection of one server. The lock is never held across an
/// `.await`.
#[derive(Default)]
struct Conns {
    state: Mutex<ConnState>,
    /// Notified whenever a connection leaves `state.open`.
    closed: Condvar,
    accepted: AtomicU64,
}

/// Open connections, each with the sender that resets it (taken once used),
/// and whether new ones are refused.
#[derive(Default)]
struct ConnState {
    next_id: u64,
    open: HashMap<u64, Option<oneshot::Sender<()>>>,
    refusing: bool,
}

/// A connection's place in [`Conns`]; dropping it (after the socket is
/// closed) removes the entry and wakes [`Conns::reset_open`].
struct Registered {
    conns: Arc<Conns>,
    id: u64,
}

impl Conns {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // A panicking test thread must not wedge the server for the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a new connection, unless new ones are refused.
    fn admit(self: &Arc<Self>) -> Option<(Registered, Reset)> {
        let mut state = self.lock();
        if state.refusing {
            return None;
        }
        let (reset_tx, reset) = oneshot::channel();
        let id = state.next_id;
        state.next_id += 1;
        state.open.insert(id, Some(reset_tx));
        let registered = Registered {
            conns: self.clone(),
            id,
        };
        Some((registered, reset))
    }

    /// Reset every connection in `state` and wait until they are closed;
    /// panics naming `server` if they are not within the deadline.
    fn reset_open(&self, mut state: MutexGuard<'_, ConnState>, server: &str) {
        let ids: Vec<u64> = state.open.keys().copied().collect();
        for reset in state.open.values_mut() {
            if let Some(reset) = reset.take() {
                let _ = reset.send(());
            }
        }
        let (state, timeout) = self
            .closed
            .wait_timeout_while(state, RESET_DEADLINE, |s| {
                ids.iter().any(|id| s.open.contains_key(id))
            })
            .unwrap_or_else(|e| e.into_inner());
        drop(state);
        assert!(
            !timeout.timed_out(),
            "{server}: connections still open {RESET_DEADLINE:?} after the reset"
        );
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
        self.conns.closed.notify_all();
    }
}
