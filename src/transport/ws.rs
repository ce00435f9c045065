//! `GET /v1/ws`: the WebSocket stream.
//!
//! In: an upgrade request with credentials in the `Authorization` header, `?token=`, or a
//! first `{"type":"auth",...}` frame within `server.auth_timeout`; `?since=` or `?last=`.
//! Out: `ready`, then `gap`, the replay after `since` or the user's newest `last` events,
//! then live events, one JSON text frame each; closed with the codes of SPEC.md. A bad
//! `last` is refused with `400` before the upgrade.
//!
//! One task per connection runs one `select!` loop over its queue, its socket and one
//! timer: it writes queued frames (the hub's shared bytes, no copy), answers client frames
//! (`ping`, `refresh`), sends keepalive pings and closes on a kick (4008; shutdown kicks
//! with 1012), token expiry (4001) or a dead peer. Every write that has to wait races the
//! kick and two keepalive periods, so a peer that stopped reading can delay neither. The
//! task holds only that loop's state (about 1.2 KiB): the opening and the close run boxed.
//! Bad
//! credentials are reported with a close frame after the upgrade, because a browser cannot
//! read the status of a refused upgrade.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::SinkExt;
use serde::Deserialize;
use tokio::time::{Instant, Sleep, sleep_until};

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
    ws: WebSocketUpgrade,
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
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let (app, opener) = *pending;
            session(Box::new((app, socket, opener)))
        })
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
        _conn: conn,
    };
    let patience = live.patience();
    let write = async {
        for item in opening {
            let text = match item {
                Opening::Control(json) => Utf8Bytes::from(json),
                Opening::Event(frame) => frame.json.clone(),
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
        loop {
            let Live {
                app,
                socket,
                sub,
                identity,
                ..
            } = self;
            let step = tokio::select! {
                biased;
                frame = sub.recv() => match frame {
                    Some(frame) => {
                        let write = std::pin::pin!(write_batch(socket, sub, frame));
                        guarded(write, sub, timer.as_mut(), patience).await
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
                msg = socket.recv() => {
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
                        // Pings are answered by the protocol layer; pongs only prove liveness.
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
            app, socket, sub, ..
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
                close(socket, reason, reason.text(), within).await;
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

/// Writes `first` and every event already queued after it (up to [`MAX_BATCH`]) with one
/// flush.
async fn write_batch(
    socket: &mut WebSocket,
    sub: &Subscription,
    first: Arc<Frame>,
) -> Result<(), axum::Error> {
    let mut next = Some(first);
    let mut written = 0;
    while let Some(frame) = next.take() {
        socket.feed(Message::Text(frame.json.clone())).await?;
        written += 1;
        if written < MAX_BATCH {
            next = sub.try_recv();
        }
    }
    socket.flush().await
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
async fn guarded<W: Future<Output = Result<(), axum::Error>>>(
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
        let msg = tokio::time::timeout_at(deadline, socket.recv())
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
        code: reason.code(),
        reason: close_text(text).into(),
    };
    let sent = tokio::time::timeout(within, socket.send(Message::Close(Some(frame)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = socket.recv().await {
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
}
