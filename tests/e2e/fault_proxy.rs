//! A TCP fault proxy on loopback: put it between a client under test and a
//! server (etcd, Consul, …) and switch it between passing, blackholing,
//! refusing, delaying and idle-dropping, or reset every connection at once.
//!
//! The proxy is a [`LoopbackServer`], so the test drives it from
//! synchronous code. It only ever connects to the one
//! upstream address it was given, which must be on loopback. It does not
//! parse what it forwards.
//!
//! Semantics worth knowing:
//! - The mode is read per chunk as it arrives (and again before a held chunk
//!   is written), so a switch affects open connections at once.
//! - [`Mode::Blackhole`] discards what arrives; switching back to
//!   [`Mode::Pass`] makes the same connections forward again, but bytes that
//!   arrived during the blackhole are gone, never delivered late. A peer's
//!   close (FIN) or reset is still passed on, so the proxy never holds on to
//!   a connection the client gave up.
//! - New connections are accepted in every mode and the proxy connects the
//!   upstream for them at once (also in a blackhole), except in
//!   [`Mode::Refuse`], where they are reset right after the accept (the
//!   nearest a listening socket gets to "connection refused"). If the
//!   upstream cannot be reached the client's connection is reset too.
//! - An error on either side (a reset, a broken pipe) resets both sides; an
//!   orderly close on both sides closes both sides.
//! - Dropping the proxy closes the listener and every connection (FIN).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::loopback::{LoopbackServer, Reset, abort};

/// Bytes read at once from one side.
const CHUNK: usize = 32 * 1024;
/// Chunks held per direction (in a delay) before the proxy stops reading
/// that side; bounds memory to `CHUNK * CHUNKS_HELD` per direction.
const CHUNKS_HELD: usize = 64;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Keep connections open and accept new ones, but forward nothing in
    /// either direction and discard what arrives: a partition, or a peer
    /// that was SIGSTOPped (HTTP/2 pings get no answer). The proxy keeps
    /// reading, so senders never feel backpressure; switching back to
    /// [`Mode::Pass`] does not deliver what was discarded.
    Blackhole,
    /// Reset new connections right after accepting them; existing ones keep
    /// passing (use [`FaultProxy::reset_all`] to end them).
    Refuse,
    /// Forward, but hold every chunk for this long after it arrived (added
    /// latency in each direction, not a throughput limit).
    Delay(Duration),
    /// Forward, but close (FIN) any connection with no traffic in either
    /// direction for longer than this, the way a NAT or load balancer drops
    /// idle flows. Idle time counts from the last byte that arrived, also
    /// before the switch to this mode.
    IdleDrop(Duration),
}

/// A running fault proxy. See the module docs for its exact semantics.
pub struct FaultProxy {
    server: LoopbackServer,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listen on `127.0.0.1:0` and forward to `upstream` in [`Mode::Pass`].
    ///
    /// Panics unless `upstream` is a loopback address.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the fault proxy only forwards to loopback, not {upstream}"
        );
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
        });
        let server = LoopbackServer::start("fault proxy", {
            let shared = shared.clone();
            move |client, reset| {
                let shared = shared.clone();
                async move { serve(&shared, client, reset).await }
            }
        });
        FaultProxy { server, shared }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT`, for clients that want a URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Switch the mode; open connections follow at once.
    pub fn set_mode(&self, mode: Mode) {
        self.server.set_refusing(mode == Mode::Refuse);
        self.shared.mode.send_replace(mode);
    }

    /// Abort every open connection with a TCP RST (`SO_LINGER` 0) on both
    /// sides; returns once they are closed. New connections are not
    /// affected.
    pub fn reset_all(&self) {
        self.server.reset_all();
    }

    /// Connections currently relayed (refused ones never count).
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// Connections accepted so far, refused ones included.
    pub fn accepted(&self) -> u64 {
        self.server.accepted()
    }
}

/// State shared by the test thread and the proxy's runtime.
struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

/// How a relayed connection ended.
enum End {
    /// Both sides closed, or the idle limit passed: close both (FIN).
    Close,
    /// An error on one side, or a reset was asked for: reset both.
    Reset,
}

/// Connect the upstream for `client` and relay until the connection ends.
async fn serve(shared: &Shared, mut client: TcpStream, mut reset: Reset) {
    let connected = tokio::select! {
        _ = &mut reset => None,
        upstream = TcpStream::connect(shared.upstream) => upstream.ok(),
    };
    let Some(mut upstream) = connected else {
        abort(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match relay(shared, &mut client, &mut upstream, &mut reset).await {
        End::Close => {}
        End::Reset => {
            abort(client);
            abort(upstream);
        }
    }
}

/// Relay both directions until both end, one fails, a reset is asked for or
/// the idle limit passes.
async fn relay(
    shared: &Shared,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    reset: &mut Reset,
) -> End {
    let activity = Activity::new();
    let (client_in, client_out) = client.split();
    let (upstream_in, upstream_out) = upstream.split();
    let both = async {
        tokio::try_join!(
            pipe(shared, client_in, upstream_out, &activity),
            pipe(shared, upstream_in, client_out, &activity),
        )
    };
    tokio::select! {
        r = both => if r.is_ok() { End::Close } else { End::Reset },
        _ = reset => End::Reset,
        () = idle_limit(shared.mode.subscribe(), &activity) => End::Close,
    }
}

/// One direction: read chunks from `from` and write them to `to`, as the
/// mode says; on end of input, shut down `to`'s write side.
async fn pipe(
    shared: &Shared,
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    activity: &Activity,
) -> std::io::Result<()> {
    let (held, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_HELD);
    let read = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            activity.touch();
            let at = match shared.mode() {
                Mode::Blackhole => continue,
                Mode::Delay(d) => Instant::now() + d,
                Mode::Pass | Mode::Refuse | Mode::IdleDrop(_) => Instant::now(),
            };
            if held.send((at, buf[..n].to_vec())).await.is_err() {
                // The writer failed; its error ends the pipe.
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if shared.mode() == Mode::Blackhole {
                continue;
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Resolve once the mode is [`Mode::IdleDrop`] and nothing arrived for
/// longer than its limit.
async fn idle_limit(mut mode: watch::Receiver<Mode>, activity: &Activity) {
    loop {
        let current = *mode.borrow_and_update();
        if let Mode::IdleDrop(limit) = current {
            let idle = activity.idle();
            if idle > limit {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(limit - idle + Duration::from_millis(1)) => {}
                changed = mode.changed() => if changed.is_err() { return std::future::pending().await },
            }
        } else if mode.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// When a connection last saw a byte arrive, from either side.
struct Activity {
    start: std::time::Instant,
    last_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: std::time::Instant::now(),
            last_nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::SeqCst);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_nanos(self.last_nanos.load(Ordering::SeqCst));
        self.start.elapsed().saturating_sub(last)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream as StdStream;
    use std::time::Instant as StdInstant;

    use super::*;
    use crate::support::wait_for;

    /// An echo server on `127.0.0.1:0`.
    fn echo_server() -> LoopbackServer {
        LoopbackServer::start("echo", |mut stream: TcpStream, _reset| async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
    }

    /// A client connection through `proxy`, with a read timeout.
    fn connect(proxy: &FaultProxy, read_timeout: Duration) -> StdStream {
        let s = StdStream::connect(proxy.addr()).expect("connect to the proxy");
        s.set_read_timeout(Some(read_timeout))
            .expect("read timeout");
        s
    }

    /// Write `msg` and read exactly as many bytes back.
    fn round_trip(s: &mut StdStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).expect("write");
        let mut back = vec![0; msg.len()];
        s.read_exact(&mut back).expect("echo comes back");
        back
    }

    /// Whether the read ended the connection (EOF or reset), as opposed to
    /// timing out or returning data.
    fn read_ends(s: &mut StdStream) -> bool {
        let mut buf = [0; 64];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    #[test]
    fn pass_echoes_and_counts_connections() {
        let echo = echo_server();
        let proxy = FaultProxy::start(echo.addr());
        assert_eq!(
            proxy.url(),
            format!("http://127.0.0.1:{}", proxy.addr().port())
        );

        let mut a = connect(&proxy, Duration::from_secs(10));
        let mut b = connect(&proxy, Duration::from_secs(10));
        assert_eq!(round_trip(&mut a, b"hello"), b"hello");
        assert_eq!(round_trip(&mut b, b"world"), b"world");
        let big = vec![7u8; 256 * 1024];
        assert_eq!(round_trip(&mut a, &big), big);
        assert_eq!(proxy.accepted(), 2);
        assert_eq!(proxy.open_connections(), 2);

        drop(a);
        wait_for("one connection to close", Duration::from_secs(10), || {
            (proxy.open_connections() == 1).then_some(())
        });
        assert_eq!(round_trip(&mut b, b"still"), b"still");
        drop(b);
        wait_for("all connections to close", Duration::from_secs(10), || {
            (proxy.open_connections() == 0).then_some(())
        });
        assert_eq!(proxy.accepted(), 2);
    }

    #[test]
    fn blackhole_swallows_and_pass_resumes_the_same_connection() {
        let echo = echo_server();
        let proxy = FaultProxy::start(echo.addr());
        let mut s = connect(&proxy, Duration::from_millis(300));
        assert_eq!(round_trip(&mut s, b"before"), b"before");

        proxy.set_mode(Mode::Blackhole);
        s.write_all(b"lost").expect("write into the blackhole");
        let mut buf = [0; 16];
        let err = s.read(&mut buf).expect_err("nothing comes back");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        // New connections are still accepted, and swallowed too.
        let mut fresh = connect(&proxy, Duration::from_millis(300));
        fresh.write_all(b"lost too").expect("write");
        assert!(fresh.read(&mut buf).is_err(), "nothing comes back");
        assert_eq!(proxy.open_connections(), 2);

        proxy.set_mode(Mode::Pass);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(
            round_trip(&mut s, b"after"),
            b"after",
            "the blackholed bytes are dropped, not delivered late"
        );
        fresh
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(round_trip(&mut fresh, b"again"), b"again");
    }

    #[test]
    fn refuse_closes_new_connections_only() {
        let echo = echo_server();
        let proxy = FaultProxy::start(echo.addr());
        let mut old = connect(&proxy, Duration::from_secs(10));
        assert_eq!(round_trip(&mut old, b"x"), b"x");

        proxy.set_mode(Mode::Refuse);
        let mut refused = connect(&proxy, Duration::from_secs(10));
        // The write may or may not fail depending on timing; the read must
        // see the end.
        let _ = refused.write_all(b"anyone?");
        assert!(read_ends(&mut refused), "a refused connection is closed");
        assert_eq!(proxy.accepted(), 2);
        assert_eq!(proxy.open_connections(), 1);
        assert_eq!(round_trip(&mut old, b"old"), b"old", "existing ones pass");

        proxy.set_mode(Mode::Pass);
        let mut new = connect(&proxy, Duration::from_secs(10));
        assert_eq!(round_trip(&mut new, b"new"), b"new");
    }

    #[test]
    fn reset_all_aborts_open_connections() {
        let echo = echo_server();
        let proxy = FaultProxy::start(echo.addr());
        let mut a = connect(&proxy, Duration::from_secs(10));
        let mut b = connect(&proxy, Duration::from_secs(10));
        assert_eq!(round_trip(&mut a, b"a"), b"a");
        assert_eq!(round_trip(&mut b, b"b"), b"b");

        proxy.reset_all();
        assert_eq!(proxy.open_connections(), 0);
        let mut buf = [0; 8];
        let err = a.read(&mut buf).expect_err("a reset, not a clean EOF");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        assert!(read_ends(&mut b));

        let mut c = connect(&proxy, Duration::from_secs(10));
        assert_eq!(round_trip(&mut c, b"c"), b"c");
        assert_eq!(proxy.accepted(), 3);
    }

    #[test]
    fn idle_drop_closes_idle_connections() {
        let echo = echo_server();
        let proxy = FaultProxy::start(echo.addr());
        let limit = Duration::from_millis(300);
        proxy.set_mode(Mode::IdleDrop(limit));

        let mut s = connect(&proxy, Duration::from_secs(10));
        let started = StdInstant::now();
        assert_eq!(round_trip(&mut s, b"ping"), b"ping");
        let mut buf = [0; 8];
        assert_eq!(s.read(&mut buf).expect("a clean close"), 0);
        assert!(started.elapsed() >= limit);
        wait_for("the proxy to forget it", Duration::from_secs(10), || {
            (proxy.open_connections() == 0).then_some(())
        });
    }

    #[test]
    fn delay_holds_each_chunk() {
        let echo = echo_server();
        let proxy = FaultProxy::start(echo.addr());
        let delay = Duration::from_millis(200);
        proxy.set_mode(Mode::Delay(delay));

        let mut s = connect(&proxy, Duration::from_secs(10));
        let started = StdInstant::now();
        assert_eq!(round_trip(&mut s, b"slow"), b"slow");
        // Held once on the way there and once on the way back.
        assert!(
            started.elapsed() >= delay * 2,
            "round trip took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn unreachable_upstream_resets_the_client() {
        // A port nobody listens on.
        let upstream = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let proxy = FaultProxy::start(upstream);
        let mut s = connect(&proxy, Duration::from_secs(10));
        assert!(read_ends(&mut s));
        wait_for("the proxy to forget it", Duration::from_secs(10), || {
            (proxy.open_connections() == 0).then_some(())
        });
    }

    #[test]
    #[should_panic(expected = "only forwards to loopback")]
    fn refuses_non_loopback_upstreams() {
        FaultProxy::start("192.0.2.1:80".parse().unwrap());
    }
}
