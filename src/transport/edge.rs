//! The network edge: accepts TCP connections and serves HTTP/1 on them, within limits
//! that keep a flood of sockets from taking the process down.
//!
//! In: the listener, the HTTP router, the limits ([`EdgeConfig`]) and the shutdown token.
//! Out: one task per connection running hyper's HTTP/1 (with upgrades, for WebSocket),
//! and a [`Conn`] handle in every request's extensions, by which a stream handler marks
//! its connection authenticated ([`Conn::admit`]) or closes it ([`Conn::close`]).
//!
//! What each limit defends (issue 11 item 3: 20,000 idle sockets took every file
//! descriptor, and slowloris held connections forever):
//! - `idle_timeout`: a connection that sends nothing at all is closed (the cheapest flood:
//!   connect and wait).
//! - `header_read_timeout`: hyper's timer; a request head must be complete this long after
//!   the server starts waiting for it (slowloris: a partial request line, trickled
//!   headers; also an idle keep-alive connection between requests).
//! - `max_pending_connections`: connections not yet authenticated (not a registered
//!   WebSocket/SSE session). At the cap a new connection evicts the oldest *idle* pending
//!   one (no request in flight), so a health probe still gets in during a flood; with none
//!   idle it is refused (accepted and closed at once). Authenticated sessions do not count.
//! - the socket budget, `RLIMIT_NOFILE` minus `fd_reserve`: every open connection counts;
//!   at the budget the same eviction applies, so descriptors are never exhausted and the
//!   reserve stays for the databases, the history file and the listener's next accept.
//! - accept errors (out of descriptors or memory) back off up to a second and are logged
//!   at most every 10 s with a count, instead of spinning or logging each one.
//!
//! Nothing here is per event: the bookkeeping is per connection and per request.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long connections get to finish after shutdown before they are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Longest pause after an accept error.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Accept errors are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The edge's limits, from `[server]` and the process's descriptor limit.
#[derive(Debug, Clone, Copy)]
pub struct EdgeConfig {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pending: usize,
    /// Connections open at once before new ones must evict an idle pending one (the
    /// socket budget).
    pub max_open: usize,
    /// Past this (half the reserve above the budget) new connections are refused without
    /// evicting: evicted ones may not have closed yet.
    pub hard_open: usize,
    /// `SO_SNDBUF` of each client socket; 0 leaves it to the OS.
    pub send_buffer: usize,
}

impl EdgeConfig {
    /// The limits of `server`, with the socket budget derived from `RLIMIT_NOFILE`.
    pub fn new(server: &crate::config::ServerConfig) -> EdgeConfig {
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
        let max_open = nofile.saturating_sub(server.fd_reserve).max(1);
        EdgeConfig {
            hard_open: max_open.saturating_add(server.fd_reserve / 2),
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_pending: server.max_pending_connections.max(1),
            max_open,
            send_buffer: server.socket_send_buffer,
        }
    }
}

/// Connection counts and the idle pending connections, oldest first.
struct Edge {
    config: EdgeConfig,
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Pending connections with no request in flight, by accept order: eviction takes the
    /// first.
    idle: Mutex<BTreeMap<u64, Weak<Conn>>>,
    next_id: AtomicU64,
    m: Metrics,
}

/// Metric handles, resolved once.
struct Metrics {
    open: metrics::Gauge,
    pending: metrics::Gauge,
    evicted: metrics::Counter,
    refused: metrics::Counter,
    idle_timeouts: metrics::Counter,
    header_timeouts: metrics::Counter,
    accept_errors: metrics::Counter,
}

impl Edge {
    fn idle(&self) -> MutexGuard<'_, BTreeMap<u64, Weak<Conn>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the oldest idle pending connection; false when there is none.
    fn evict_oldest(&self) -> bool {
        let Some((_, conn)) = self.idle().pop_first() else {
            return false;
        };
        // Taken out of the map first: `close` is not called under the map's lock.
        if let Some(conn) = conn.upgrade() {
            conn.close();
        }
        self.m.evicted.increment(1);
        true
    }

    /// Whether a new connection may be served: at a cap, the oldest idle pending
    /// connection makes room. Evicted connections close in their own tasks, so a flood
    /// faster than they run is refused at the hard limits rather than overshooting them.
    fn admit_new(&self) -> bool {
        let (open, pending) = (
            self.open.load(Ordering::Acquire),
            self.pending.load(Ordering::Acquire),
        );
        let over = open >= self.config.max_open || pending >= self.config.max_pending;
        if !over {
            return true;
        }
        let hard =
            open >= self.config.hard_open || pending >= self.config.max_pending.saturating_mul(2);
        !hard && self.evict_oldest()
    }
}

/// One connection's place at the edge, shared by its task and (through the request's
/// extensions) by the handler that may make it a session.
pub struct Conn {
    edge: Arc<Edge>,
    id: u64,
    /// Set to close the connection: evicted, or a session that gave up on its peer.
    close: Signal,
    /// An authenticated session: no longer pending, never evicted.
    admitted: AtomicBool,
    /// Set when the connection's task ends (the socket is closed or upgraded).
    done: Signal,
}

impl Conn {
    /// The connection is an authenticated session: it leaves the pending count.
    pub fn admit(&self) {
        if !self.admitted.swap(true, Ordering::AcqRel) {
            self.edge.idle().remove(&self.id);
            self.edge.pending.fetch_sub(1, Ordering::AcqRel);
            self.edge.m.pending.decrement(1.0);
        }
    }

    /// Closes the connection now, whatever it is doing (a response it is writing is cut).
    pub fn close(&self) {
        self.close.fire();
    }

    /// Resolves once the connection's HTTP task has ended (for a WebSocket: once upgraded).
    pub async fn finished(&self) {
        self.done.wait().await
    }

    fn is_admitted(&self) -> bool {
        self.admitted.load(Ordering::Acquire)
    }

    /// A request started: not evictable while it runs.
    fn busy(&self) {
        self.edge.idle().remove(&self.id);
    }

    /// A response was sent and the connection waits for the next request.
    fn idle(self: &Arc<Self>) {
        if !self.is_admitted() && !self.close.is_set() {
            self.edge.idle().insert(self.id, Arc::downgrade(self));
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.is_admitted() {
            self.edge.idle().remove(&self.id);
            self.edge.pending.fetch_sub(1, Ordering::AcqRel);
            self.edge.m.pending.decrement(1.0);
        }
        self.edge.open.fetch_sub(1, Ordering::AcqRel);
        self.edge.m.open.decrement(1.0);
    }
}

/// The [`Conn`] of a request, in its extensions (absent when the router is served some
/// other way, as in unit tests).
#[derive(Clone)]
pub struct ConnHandle(pub Arc<Conn>);

/// Accepts and serves connections until `shutdown`, then gives open connections
/// [`SHUTDOWN_GRACE`] to finish and returns.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    config: EdgeConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let edge = Arc::new(Edge {
        config,
        open: AtomicUsize::new(0),
        pending: AtomicUsize::new(0),
        idle: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(0),
        m: Metrics {
            open: metrics::gauge!("changecast_edge_open_connections"),
            pending: metrics::gauge!("changecast_edge_pending_connections"),
            evicted: metrics::counter!("changecast_edge_evicted_total"),
            refused: metrics::counter!("changecast_edge_refused_total"),
            idle_timeouts: metrics::counter!("changecast_edge_timeouts_total", "kind" => "idle"),
            header_timeouts: metrics::counter!("changecast_edge_timeouts_total", "kind" => "header"),
            accept_errors: metrics::counter!("changecast_edge_accept_errors_total"),
        },
    });
    tracing::info!(
        max_open = config.max_open,
        max_pending = config.max_pending,
        "edge limits"
    );
    // Every connection task holds a receiver: `closed()` resolves when all have ended.
    let (tasks_tx, tasks_rx) = watch::channel(());
    let mut backoff = Duration::ZERO;
    let mut errors_unlogged = 0u64;
    let mut last_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                backoff = Duration::ZERO;
                tcp
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: free one if we can, and pause so
                // the loop does not spin on an error that persists.
                edge.m.accept_errors.increment(1);
                edge.evict_oldest();
                errors_unlogged += 1;
                if last_logged.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY) {
                    tracing::warn!(error = %e, errors = errors_unlogged, "accept failed; backing off");
                    errors_unlogged = 0;
                    last_logged = Some(Instant::now());
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
        };
        if !edge.admit_new() {
            edge.m.refused.increment(1);
            drop(tcp); // closed at once: never left to hold a descriptor
            continue;
        }
        if config.send_buffer > 0
            && let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(config.send_buffer)
        {
            tracing::debug!("SO_SNDBUF not set: {e}");
        }
        let id = edge.next_id.fetch_add(1, Ordering::Relaxed);
        edge.open.fetch_add(1, Ordering::AcqRel);
        edge.pending.fetch_add(1, Ordering::AcqRel);
        edge.m.open.increment(1.0);
        edge.m.pending.increment(1.0);
        let conn = Arc::new(Conn {
            edge: Arc::clone(&edge),
            id,
            close: Signal::default(),
            admitted: AtomicBool::new(false),
            done: Signal::default(),
        });
        conn.idle();
        tokio::spawn(connection(
            tcp,
            conn,
            router.clone(),
            shutdown.clone(),
            tasks_rx.clone(),
        ));
    }
    drop(listener);
    drop(tasks_rx);
    tasks_tx.closed().await;
    Ok(())
}

/// Errors about one connection that the listener can carry on after at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, is closed through its [`Conn`], times out idle,
/// or shutdown's grace runs out.
async fn connection(
    tcp: TcpStream,
    conn: Arc<Conn>,
    router: axum::Router,
    shutdown: CancellationToken,
    _running: watch::Receiver<()>,
) {
    let _done = Done(Arc::clone(&conn));
    let heard = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(Heard {
        inner: tcp,
        heard: Arc::clone(&heard),
    });
    let service_conn = Arc::clone(&conn);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let conn = Arc::clone(&service_conn);
        let router = router.clone();
        async move {
            conn.busy();
            req.extensions_mut().insert(ConnHandle(Arc::clone(&conn)));
            let res = router.oneshot(req.map(Body::new)).await;
            // An upgraded connection belongs to its WebSocket session now.
            if res
                .as_ref()
                .is_ok_and(|r| r.status() != StatusCode::SWITCHING_PROTOCOLS)
            {
                conn.idle();
            }
            res
        }
    });
    let config = conn.edge.config;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    let http = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(http);
    let idle_deadline = tokio::time::sleep(config.idle_timeout);
    tokio::pin!(idle_deadline);
    let mut idle_checked = false;
    let mut stopping = false;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            result = http.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() {
                        conn.edge.m.header_timeouts.increment(1);
                    }
                    tracing::trace!("connection ended: {e}");
                }
                return;
            }
            _ = conn.close.wait() => return,
            _ = &mut idle_deadline, if !idle_checked => {
                idle_checked = true;
                if !heard.load(Ordering::Acquire) {
                    conn.edge.m.idle_timeouts.increment(1);
                    return;
                }
            }
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                http.as_mut().graceful_shutdown();
                grace.as_mut().reset(Instant::now() + SHUTDOWN_GRACE);
            }
            _ = &mut grace => return,
        }
    }
}

/// Marks the connection's task ended ([`Conn::finished`]) when dropped.
struct Done(Arc<Conn>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.done.fire();
    }
}

/// A flag set once, that tasks can wait for. Held inline: every connection has two for as
/// long as it is open, and a `CancellationToken` would be an allocation of its own each.
#[derive(Default)]
struct Signal {
    set: AtomicBool,
    notify: Notify,
}

impl Signal {
    fn fire(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set (at once if it is).
    async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a `fire` in between still wakes this.
        notified.as_mut().enable();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

/// The socket, noting whether the peer has sent anything yet (for `idle_timeout`).
struct Heard {
    inner: TcpStream,
    heard: Arc<AtomicBool>,
}

impl AsyncRead for Heard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Release);
        }
        polled
    }
}

impl AsyncWrite for Heard {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
