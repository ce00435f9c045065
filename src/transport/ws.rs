//! `GET /v1/ws`: the WebSocket stream.
//!
//! In: an upgrade request with credentials in the `Authorization` header, `?token=`, or a
//! first `{"type":"auth",...}` frame within `server.auth_timeout`; `?since=` or `?last=`.
//! Out: `ready`, then `gap`, the replay after `since` or the user's newest `last` events,
//! then live events, one JSON text frame each; closed with the codes of SPEC.md. A bad
//! `last` is refused with `400` before the upgrade.
//!
//! One task per connection runs one `select!` loop over its queue, its socket and one
//! timer: it writes queued frames, answers client frames
//! (`ping`, `refresh`), sends keepalive pings and closes on a kick (4008; shutdown kicks
//! with 1012), token expiry (4001) or a dead peer. Every write that has to wait races the
//! kick and two keepalive periods, so a peer that stopped reading can delay neither. The
//! task holds only that loop's state (about 1.2 KiB): the opening and the close run boxed.
//!
//! Live events skip tungstenite's sink: a server frame is a 2–10 byte header and the
//! payload unmasked, so everything queued for the connection goes out as one vectored
//! write of headers and the hub's shared JSON bytes — no copy into a write buffer, no
//! per-frame `Bytes` handle. tungstenite does the rest (reading, pings, pongs, control
//! frames, the close handshake), always with its own buffer flushed first; the upgrade is
//! answered here so that the socket stays reachable for those writes. Bad
//! credentials are reported with a close frame after the upgrade, because a browser cannot
//! read the status of a refused upgrade.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::edge::ConnHandle;
use super::{StreamParams, bad_request, bearer, close_text, parse_last};
use crate::auth::{AuthError, Identity, now_secs};
use crate::event::{CloseReason, ServerEvent};
use crate::hub::{Frame, Opening, Start, Subscription};
use crate::server::App;

/// Frames a client may send (SPEC: `auth`, `refresh`, `ping`).
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientFrame {
    Auth {
        token: String,
        #[serde(default)]
        client_id: Option<String>,
    },
    Refresh {
        token: String,
    },
    Ping,
}

/// The upgraded connection, as tungstenite sees it.
type WebSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;
type WsError = tokio_tungstenite::tungstenite::Error;

/// Parses one client text frame. `None` for anything else: ignored and counted once the
/// connection is authenticated, refused (1008) as the first frame of one that is not.
pub fn parse_client_frame(text: &str) -> Option<ClientFrame> {
    serde_json::from_str(text).ok()
}

/// Socket buffers are per connection: kept small so idle connections stay cheap. Clients
/// send little (pongs, `ping`, a `refresh` now and then); a larger frame still goes
/// through, it just takes more reads, and the buffer grows to hold it.
const READ_BUFFER: usize = 128;
/// Frames are buffered up to this size and written with one flush per wake-up: under
/// fan-out one `sendto` carries every event queued for the connection, not one each.
const WRITE_BUFFER: usize = 16 * 1024;
/// Most queued events written per flush, so one busy connection yields to others.
const MAX_BATCH: usize = 64;
/// How long a closing connection waits for the peer's side of the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

pub async fn handler(
    State(app): State<Arc<App>>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
    conn: Option<Extension<ConnHandle>>,
    ws: Upgrade,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    let last = match parse_last(params.last.as_deref()) {
        Ok(last) => last,
        Err(reason) => return bad_request(reason),
    };
    let token = bearer(&headers).or(params.token);
    let max = app.server.max_client_frame;
    let opener = Opener {
        client_id: params.client_id,
        since: params.since,
        last,
        token,
        conn,
    };
    // Boxed before the upgrade: the upgrade task keeps what its callback captures for as long
    // as the connection lives.
    let pending = Box::new((app, opener));
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let Upgrade { key, on_upgrade } = ws;
    tokio::spawn(async move {
        // A failed upgrade (the client left) has nobody to tell.
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let (app, opener) = *pending;
        session(Box::new((app, socket, opener))).await;
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// A WebSocket upgrade request (HTTP/1.1, version 13), checked as axum's own extractor
/// checks it; answered by [`handler`].
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let refuse = |status: StatusCode, why: &'static str| (status, why).into_response();
        let headers = &parts.headers;
        let has = |name: header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
            })
        };
        if !has(header::CONNECTION, "upgrade") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !has(header::UPGRADE, "websocket") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if !has(header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(Upgrade { key, on_upgrade })
    }
}

/// What the request brought besides the socket: the token (from the header or the query),
/// the parameters, and the connection's place at the edge (held for as long as the socket
/// is open: it counts against the socket budget; admitted once subscribed).
struct Opener {
    client_id: Option<String>,
    since: Option<String>,
    last: Option<usize>,
    token: Option<String>,
    conn: Option<ConnHandle>,
}

/// One connection from upgrade to close.
///
/// The connection's task lives as long as the connection, so its state is kept to what
/// the live loop needs: the upgrade arrives boxed (a future keeps room for its arguments
/// for as long as it lives), and the opening (auth, subscribing, the replay) and the
/// closing handshake, which await large futures once, run boxed.
async fn session(upgraded: Box<(Arc<App>, WebSocket, Opener)>) {
    let Some(mut live) = Box::pin(open(upgraded)).await else {
        return;
    };
    let ended = live.run().await;
    Box::pin(live.finish(ended)).await;
}

/// An open, subscribed connection.
struct Live {
    app: Arc<App>,
    socket: WebSocket,
    sub: Subscription,
    identity: Identity,
    /// Live events being written (empty, without a buffer, in between).
    out: Batch,
    _conn: Option<ConnHandle>,
}

/// Authenticates, subscribes and sends the opening; `None` when the connection ended
/// (closed with its reason).
async fn open(upgraded: Box<(Arc<App>, WebSocket, Opener)>) -> Option<Live> {
    let (app, mut socket, opener) = *upgraded;
    let Opener {
        client_id,
        since,
        last,
        token,
        conn,
    } = opener;
    let (token, client_id) = match token {
        Some(t) => (t, client_id),
        None => match auth_frame(&mut socket, app.server.auth_timeout).await {
            Ok((t, c)) => (t, c.or(client_id)),
            Err(e) => {
                close(socket, e.close_reason(), &e.to_string(), CLOSE_WAIT).await;
                return None;
            }
        },
    };
    let identity = match app.auth.identify(&token, client_id.as_deref()).await {
        Ok(id) => id,
        Err(e) => {
            metrics::counter!("changecast_auth_failures_total", "reason" => e.close_reason().label())
                .increment(1);
            close(socket, e.close_reason(), &e.to_string(), CLOSE_WAIT).await;
            return None;
        }
    };

    app.learn_stream_head(since.as_deref()).await;
    let start = Start::new(since.as_deref(), last);
    let mut sub = match app.hub.subscribe_from(&identity.user, start) {
        Ok(sub) => sub,
        Err(reason) => {
            close(socket, reason, reason.text(), CLOSE_WAIT).await;
            return None;
        }
    };
    if let Some(conn) = &conn {
        conn.0.admit();
    }
    let opening = sub.opening().await;
    let mut live = Live {
        app,
        socket,
        sub,
        identity,
        out: Batch::default(),
        _conn: conn,
    };
    let patience = live.patience();
    let write = async {
        for item in opening {
            let text = match item {
                Opening::Control(json) => Utf8Bytes::from(json),
                Opening::Event(frame) => Utf8Bytes::from(frame.json.as_str()),
            };
            live.socket.feed(Message::Text(text)).await?;
        }
        live.socket.flush().await
    };
    let timer = std::pin::pin!(sleep_until(Instant::now()));
    let written = guarded(std::pin::pin!(write), &live.sub, timer, patience).await;
    if let Err(ended) = written {
        live.finish(ended).await;
        return None;
    }
    Some(live)
}

impl Live {
    /// A write that has not finished after this long is to a peer that stopped reading.
    fn patience(&self) -> Duration {
        self.app.server.keepalive * 2
    }

    /// Writes live events, answers client frames, pings, warns before the token expires,
    /// until a kick, expiry or a dead or departed peer ends the connection. One timer
    /// serves the keepalive ping, the expiry warning and the expiry: an idle connection is
    /// this loop waiting on its queue, its socket and that timer.
    async fn run(&mut self) -> Ended {
        let keepalive = self.app.server.keepalive;
        let patience = self.patience();
        let mut due = Due::new(&self.app, &self.identity, keepalive);
        let timer = sleep_until(due.next());
        tokio::pin!(timer);
        let mut last_heard = Instant::now();
        let mut last_write = None;
        loop {
            let Live {
                app,
                socket,
                sub,
                identity,
                out,
                ..
            } = self;
            let step = tokio::select! {
                biased;
                frame = sub.recv() => match frame {
                    Some(frame) => {
                        if let Some(pacer) = &app.pacer {
                            // Busy: what queues until the next tick goes out with this.
                            pacer.hold(last_write).await;
                        }
                        let write = std::pin::pin!(write_batch(socket, sub, out, frame));
                        let written = guarded(write, sub, timer.as_mut(), patience).await;
                        last_write = Some(Instant::now());
                        written
                    }
                    None => Err(Ended::Close(sub.kicked_for().unwrap_or(CloseReason::Internal))),
                },
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= due.expires {
                        Err(Ended::Close(CloseReason::TokenExpired))
                    } else if due.warn_at.is_some_and(|at| now >= at) {
                        due.warn_at = None;
                        let left = identity.expires_at.saturating_sub(now_secs());
                        let warning = ServerEvent::Expiring { expires_in: left }.to_json();
                        let write = socket.send(Message::Text(warning.into()));
                        guarded(std::pin::pin!(write), sub, timer.as_mut(), patience).await
                    } else if now >= due.ping {
                        if last_heard.elapsed() > patience {
                            Err(Ended::Dead)
                        } else {
                            due.ping = now + keepalive;
                            let write = socket.send(Message::Ping(Default::default()));
                            guarded(std::pin::pin!(write), sub, timer.as_mut(), patience).await
                        }
                    } else {
                        Ok(())
                    }
                }
                msg = socket.next() => {
                    last_heard = Instant::now();
                    match msg {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Err(Ended::Gone),
                        Some(Ok(Message::Text(text))) => {
                            let before = identity.expires_at;
                            // Boxed: a refresh may look the user up; the loop stays small.
                            let handled =
                                Box::pin(client_frame(app, identity, text.as_str())).await;
                            if identity.expires_at != before {
                                // A refresh: new deadlines, and a new warning before the new
                                // expiry.
                                due = Due::new(app, identity, keepalive).with_ping(due.ping);
                            }
                            match handled {
                                Ok(Some(reply)) => {
                                    let write = socket.send(Message::Text(reply.into()));
                                    guarded(std::pin::pin!(write), sub, timer.as_mut(), patience).await
                                }
                                Ok(None) => Ok(()),
                                Err(e) => Err(Ended::Close(e.close_reason())),
                            }
                        }
                        // Pings are answered by the protocol layer, which may leave the pong
                        // in its buffer: flushed before the next live events.
                        Some(Ok(Message::Ping(_))) => {
                            out.control_pending = true;
                            Ok(())
                        }
                        // Pongs only prove liveness.
                        Some(Ok(_)) => Ok(()),
                    }
                }
            };
            if let Err(ended) = step {
                return ended;
            }
            // A due ping or warning was handled, or a write borrowed the timer.
            if timer.deadline() != due.next() {
                timer.as_mut().reset(due.next());
            }
        }
    }

    /// Ends the connection as `ended` says: with a close frame, or, for a peer that is gone
    /// or dead, by dropping it (counted). A close leaves the hub at once (its queue is freed
    /// and nothing more is sent), then closes the socket with the reason: a peer that
    /// stopped reading has `patience` to take the close frame (after what its buffers
    /// already hold) before the connection is dropped; on shutdown only a moment.
    async fn finish(self, ended: Ended) {
        let patience = self.patience();
        let Live {
            app,
            mut socket,
            sub,
            mut out,
            ..
        } = self;
        match ended {
            Ended::Close(reason) => {
                metrics::counter!("changecast_disconnects_total", "reason" => reason.label())
                    .increment(1);
                drop(sub);
                let within = if app.shutdown.is_cancelled() {
                    CLOSE_WAIT
                } else {
                    patience
                };
                // A write given up on may have stopped inside a frame: its end goes first,
                // so that the close frame is read as one.
                let finished = tokio::time::timeout(within, out.finish_frame(socket.get_mut()));
                if matches!(finished.await, Ok(Ok(()))) {
                    close(socket, reason, reason.text(), within).await;
                }
            }
            Ended::Gone => {}
            Ended::Dead => metrics::counter!("changecast_dead_peers_total").increment(1),
        }
    }
}

/// What the connection's one timer waits for.
struct Due {
    /// The token's expiry: the connection closes with 4001.
    expires: Instant,
    /// The `expiring` warning, until sent.
    warn_at: Option<Instant>,
    /// The next keepalive ping (and the check that the peer was heard from).
    ping: Instant,
}

impl Due {
    fn new(app: &App, identity: &Identity, keepalive: Duration) -> Due {
        let (expires, warn_at) = deadlines(app, identity);
        Due {
            expires,
            warn_at: Some(warn_at),
            ping: Instant::now() + keepalive,
        }
    }

    fn with_ping(self, ping: Instant) -> Due {
        Due { ping, ..self }
    }

    fn next(&self) -> Instant {
        let first = self.expires.min(self.ping);
        self.warn_at.map_or(first, |w| first.min(w))
    }
}

/// Writes `first` and every event already queued after it (up to [`MAX_BATCH`]) with as
/// few vectored writes as the socket takes, after whatever tungstenite has buffered.
async fn write_batch(
    socket: &mut WebSocket,
    sub: &Subscription,
    out: &mut Batch,
    first: Arc<Frame>,
) -> Result<(), WsError> {
    // tungstenite may hold a pong (its control frames otherwise go out whole, awaited):
    // flushed first, only then, since a flush per batch costs a waker registration.
    if out.control_pending {
        socket.flush().await?;
        out.control_pending = false;
    }
    out.start(first, sub);
    let io = socket.get_mut();
    std::future::poll_fn(|cx| out.poll_write(Pin::new(&mut *io), cx)).await?;
    out.clear();
    Ok(())
}

/// Live events going out as WebSocket text frames, and how many of their bytes (headers
/// included) the socket has taken.
#[derive(Default)]
struct Batch {
    frames: Vec<Arc<Frame>>,
    written: usize,
    /// A ping was read since tungstenite's buffer was last flushed: its pong may be there.
    control_pending: bool,
}

/// Buffers handed to one vectored write: a header and a payload per frame.
const SLICES: usize = 2 * MAX_BATCH;

impl Batch {
    /// `first` and what is queued after it, up to [`MAX_BATCH`].
    fn start(&mut self, first: Arc<Frame>, sub: &Subscription) {
        self.frames.clear();
        self.written = 0;
        self.frames.reserve_exact(MAX_BATCH);
        self.frames.push(first);
        sub.try_recv_into(&mut self.frames, MAX_BATCH);
    }

    /// Frees the frames and the list (an idle connection holds no buffer).
    fn clear(&mut self) {
        self.frames = Vec::new();
        self.written = 0;
    }

    /// Writes until every frame is out, or the socket is full (`Pending`).
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        mut io: Pin<&mut W>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut headers = [[0u8; 10]; MAX_BATCH];
            let mut slices = [std::io::IoSlice::new(&[]); SLICES];
            let mut n = 0;
            let mut skip = self.written;
            for (frame, header) in self.frames.iter().zip(headers.iter_mut()) {
                let payload = frame.json.as_bytes();
                let len = frame_header(header, payload.len());
                for part in [&header[..len], payload] {
                    if skip >= part.len() {
                        skip -= part.len();
                    } else {
                        slices[n] = std::io::IoSlice::new(&part[skip..]);
                        skip = 0;
                        n += 1;
                    }
                }
            }
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            let wrote = std::task::ready!(io.as_mut().poll_write_vectored(cx, &slices[..n]))?;
            if wrote == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += wrote;
        }
    }

    /// Writes the rest of a frame the socket took only part of, and drops the frames not
    /// started (the client resumes from history after the close).
    async fn finish_frame<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> std::io::Result<()> {
        let mut end = 0;
        let mut header = [0u8; 10];
        let mut keep = 0;
        for frame in &self.frames {
            if end >= self.written {
                break;
            }
            end += frame_header(&mut header, frame.json.len()) + frame.json.len();
            keep += 1;
        }
        self.frames.truncate(keep);
        std::future::poll_fn(|cx| self.poll_write(Pin::new(&mut *io), cx)).await?;
        self.clear();
        Ok(())
    }
}

/// Writes the header of an unmasked, final text frame with a payload of `len` bytes into
/// `buf`; returns its length.
fn frame_header(buf: &mut [u8; 10], len: usize) -> usize {
    buf[0] = 0x81; // FIN, text
    if len < 126 {
        buf[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        buf[1] = 126;
        buf[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        buf[1] = 127;
        buf[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Why a session ends.
enum Ended {
    /// Close with this reason: a kick (4008, …), shutdown, token expiry, a bad client frame.
    Close(CloseReason),
    /// The peer is gone (a socket error, or its close frame): nothing left to send.
    Gone,
    /// The peer missed two keepalive periods, or took none of a write for that long: it
    /// stopped reading or is unreachable.
    Dead,
}

/// Runs a write unless the connection ends first: a kick (shutdown kicks too), or a peer
/// that has not taken the bytes within `patience`. A socket whose peer stopped reading
/// blocks the write once the kernel's buffers are full; without this the task would wait
/// on it for as long as the TCP connection lives, deaf to its kick. A write given up on
/// leaves whole frames in the socket's buffer (the sink takes a frame whole or not at all),
/// so a close frame can still follow them. A write that completes at once (a reader keeping
/// up) arms no timer.
///
/// `timer` is the connection's one timer, set to the patience's end when the write has to
/// wait; the caller sets it back to what it waits for next.
async fn guarded<W: Future<Output = Result<(), WsError>>>(
    mut write: Pin<&mut W>,
    sub: &Subscription,
    mut timer: Pin<&mut Sleep>,
    patience: Duration,
) -> Result<(), Ended> {
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(written) = first {
        return written.map_err(|_| Ended::Gone);
    }
    timer.as_mut().reset(Instant::now() + patience);
    tokio::select! {
        biased;
        written = write => written.map_err(|_| Ended::Gone),
        reason = sub.kicked() => Err(Ended::Close(reason)),
        _ = timer => Err(Ended::Dead),
    }
}

/// Handles one client text frame; returns a reply to send, or an error that ends the
/// connection.
async fn client_frame(
    app: &App,
    identity: &mut Identity,
    text: &str,
) -> Result<Option<String>, AuthError> {
    match parse_client_frame(text) {
        Some(ClientFrame::Ping) => Ok(Some(ServerEvent::Pong.to_json())),
        Some(ClientFrame::Refresh { token }) => {
            // The client id was checked on connect; a refresh does not repeat it.
            let fresh = app.auth.identify_token(&token).await?;
            if fresh.user != identity.user {
                return Err(AuthError::Invalid(
                    "refresh token is for another user".into(),
                ));
            }
            identity.expires_at = fresh.expires_at;
            Ok(None)
        }
        // Already authenticated: a repeated auth frame changes nothing.
        Some(ClientFrame::Auth { .. }) => Ok(None),
        None => {
            metrics::counter!("changecast_client_frames_ignored_total").increment(1);
            Ok(None)
        }
    }
}

/// Waits for the first frame to be `{"type":"auth",...}`.
async fn auth_frame(
    socket: &mut WebSocket,
    timeout: Duration,
) -> Result<(String, Option<String>), AuthError> {
    let deadline = Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| AuthError::Missing)?;
        match msg {
            Some(Ok(Message::Text(text))) => {
                return match parse_client_frame(text.as_str()) {
                    Some(ClientFrame::Auth { token, client_id }) => Ok((token, client_id)),
                    _ => Err(AuthError::Invalid(
                        "the first frame must be {\"type\":\"auth\",\"token\":...}".into(),
                    )),
                };
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return Err(AuthError::Missing),
        }
    }
}

/// When the token expires, and when to warn about it.
fn deadlines(app: &App, identity: &Identity) -> (Instant, Instant) {
    let left = identity.expires_at.saturating_sub(now_secs());
    let expires = Instant::now() + Duration::from_secs(left);
    let warn_at = expires
        .checked_sub(app.expiry_warning)
        .unwrap_or_else(Instant::now);
    (expires, warn_at)
}

/// Sends a close frame (the peer has `within` to take it), then gives the peer a moment
/// to answer the close handshake, without waiting on a dead one.
async fn close(mut socket: WebSocket, reason: CloseReason, text: &str, within: Duration) {
    let frame = CloseFrame {
        code: reason.code().into(),
        reason: close_text(text).into(),
    };
    let sent = tokio::time::timeout(within, socket.send(Message::Close(Some(frame)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<F, A>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle connection is its task: the session future holds the live loop only (the
    /// opening and the close run boxed). It was 4,152 bytes before that split; this keeps
    /// a change from quietly putting a large future back into every connection.
    #[test]
    fn an_idle_connection_s_task_state_stays_under_1_5_kib() {
        let session = future_size(session);
        let opening = future_size(open);
        eprintln!("session {session} B, opening (boxed, transient) {opening} B");
        assert!(session <= 1536, "session future is {session} bytes");
    }

    fn frame(json: String) -> Arc<Frame> {
        Arc::new(Frame::new("e-1".into(), 1, json))
    }

    /// The frames as tungstenite writes them: what every client has been reading.
    fn tungstenite_bytes(frames: &[Arc<Frame>]) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let mut out = Vec::new();
        for f in frames {
            let payload = f.json.as_str().as_bytes().to_vec();
            tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
                payload,
                OpCode::Data(Data::Text),
                true,
            )
            .format(&mut out)
            .unwrap();
        }
        out
    }

    /// A socket that takes at most `take` bytes per write, then is full until `room` more.
    struct Narrow {
        got: Vec<u8>,
        take: usize,
        room: usize,
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let me = self.get_mut();
            let n = buf.len().min(me.take).min(me.room);
            if n == 0 {
                return Poll::Pending;
            }
            me.room -= n;
            me.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn sizes() -> Vec<Arc<Frame>> {
        [0, 1, 125, 126, 127, 65535, 65536, 70000]
            .into_iter()
            .map(|n| frame("x".repeat(n)))
            .collect()
    }

    #[test]
    fn live_frames_are_the_bytes_tungstenite_would_write_even_in_small_pieces() {
        let frames = sizes();
        let mut io = Narrow {
            got: Vec::new(),
            take: 7,
            room: usize::MAX,
        };
        let mut out = Batch {
            frames: frames.clone(),
            written: 0,
            control_pending: false,
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(matches!(
            out.poll_write(Pin::new(&mut io), &mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.got, tungstenite_bytes(&frames));
    }

    #[tokio::test]
    async fn a_write_given_up_inside_a_frame_is_finished_before_anything_follows() {
        let frames = sizes();
        let all = tungstenite_bytes(&frames);
        // The socket fills 3 bytes into the fifth frame (header 126 + 2 length bytes).
        let first_four = tungstenite_bytes(&frames[..4]).len();
        let mut io = Narrow {
            got: Vec::new(),
            take: 1000,
            room: first_four + 3,
        };
        let mut out = Batch {
            frames: frames.clone(),
            written: 0,
            control_pending: false,
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(out.poll_write(Pin::new(&mut io), &mut cx).is_pending());
        io.room = usize::MAX;
        out.finish_frame(&mut io).await.unwrap();
        let through_fifth = tungstenite_bytes(&frames[..5]);
        assert_eq!(
            io.got, through_fifth,
            "the fifth frame whole, nothing after it"
        );
        assert!(all.starts_with(&io.got));
        assert!(out.frames.is_empty() && out.frames.capacity() == 0);
    }
}
