//! `GET /v1/ws`: the WebSocket stream.
//!
//! In: an upgrade request with credentials in the `Authorization` header, `?token=`, or a
//! first `{"type":"auth",...}` frame within `server.auth_timeout`; `?since=` or `?last=`.
//! Out: `ready`, then `gap`, the replay after `since` or the user's newest `last` events,
//! then live events, one JSON text frame each; closed with the codes of SPEC.md. A bad
//! `last` is refused with `400` before the upgrade.
//!
//! One task per connection runs one `select!` loop: it writes queued frames (the hub's
//! shared bytes, no copy), answers client frames (`ping`, `refresh`), sends keepalive
//! pings and closes on a kick (4008), token expiry (4001) or shutdown (1012). Every write
//! races the kick, shutdown and two keepalive periods, so a peer that stopped reading can
//! delay none of them. Bad
//! credentials are reported with a close frame after the upgrade, because a browser cannot
//! read the status of a refused upgrade.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::SinkExt;
use serde::Deserialize;
use tokio::time::{Instant, sleep_until};

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

/// Socket buffers are per connection: kept small so idle connections stay cheap. Event
/// frames are small JSON; larger ones still go through, they just take more reads/writes.
const READ_BUFFER: usize = 1024;
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
    let start = Opener {
        client_id: params.client_id,
        since: params.since,
        last,
    };
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| session(app, socket, conn, token, start))
}

/// What the request asked for besides the token.
struct Opener {
    client_id: Option<String>,
    since: Option<String>,
    last: Option<usize>,
}

/// `conn` is the connection's place at the edge: held for as long as the socket is open
/// (it counts against the socket budget), and admitted once subscribed.
async fn session(
    app: Arc<App>,
    mut socket: WebSocket,
    conn: Option<ConnHandle>,
    token: Option<String>,
    start: Opener,
) {
    let Opener {
        client_id,
        since,
        last,
    } = start;
    let (token, client_id) = match token {
        Some(t) => (t, client_id),
        None => match auth_frame(&mut socket, app.server.auth_timeout).await {
            Ok((t, c)) => (t, c.or(client_id)),
            Err(e) => return close(socket, e.close_reason(), &e.to_string(), CLOSE_WAIT).await,
        },
    };
    let mut identity = match app.auth.identify(&token, client_id.as_deref()).await {
        Ok(id) => id,
        Err(e) => {
            metrics::counter!("changecast_auth_failures_total", "reason" => e.close_reason().label())
                .increment(1);
            return close(socket, e.close_reason(), &e.to_string(), CLOSE_WAIT).await;
        }
    };

    app.learn_stream_head(since.as_deref()).await;
    let start = Start::new(since.as_deref(), last);
    let mut sub = match app.hub.subscribe_from(&identity.user, start) {
        Ok(sub) => sub,
        Err(reason) => return close(socket, reason, reason.text(), CLOSE_WAIT).await,
    };
    if let Some(conn) = &conn {
        conn.0.admit();
    }
    let kick = Arc::clone(&sub.kick);
    let keepalive = app.server.keepalive;
    // A write that has not finished after this long is to a peer that stopped reading.
    let patience = keepalive * 2;
    // The loop's futures live as long as the connection: made and registered once, not
    // once per wake-up (a busy connection wakes for every batch of events).
    let kicked = kick.kicked();
    let stopping = app.shutdown.cancelled();
    let (expires, warn_at) = deadlines(&app, &identity);
    let expiry = sleep_until(expires);
    let warning = sleep_until(warn_at);
    let ping = sleep_until(Instant::now() + keepalive);
    tokio::pin!(kicked, stopping, expiry, warning, ping);
    let opening = sub.opening().await;
    let write = async {
        for item in opening {
            let text = match item {
                Opening::Control(json) => Utf8Bytes::from(json),
                Opening::Event(frame) => frame.json.clone(),
            };
            socket.feed(Message::Text(text)).await?;
        }
        socket.flush().await
    };
    if let Err(ended) = guarded(write, kicked.as_mut(), stopping.as_mut(), patience).await {
        return finish(&app, socket, sub, ended, patience).await;
    }

    let mut last_heard = Instant::now();
    // The expiry a warning was sent for: a refresh moves the expiry, and a new warning is due.
    let mut warned_for = 0;
    let ended = loop {
        let step = tokio::select! {
            biased;
            reason = &mut kicked => Err(Ended::Close(reason)),
            _ = &mut stopping => Err(Ended::Close(CloseReason::Restarting)),
            _ = &mut expiry => Err(Ended::Close(CloseReason::TokenExpired)),
            _ = &mut warning, if warned_for != identity.expires_at => {
                warned_for = identity.expires_at;
                let left = identity.expires_at.saturating_sub(now_secs());
                let warning = ServerEvent::Expiring { expires_in: left }.to_json();
                let write = socket.send(Message::Text(warning.into()));
                guarded(write, kicked.as_mut(), stopping.as_mut(), patience).await
            }
            frame = sub.recv() => match frame {
                Some(frame) => {
                    let write = write_batch(&mut socket, &mut sub, frame);
                    guarded(write, kicked.as_mut(), stopping.as_mut(), patience).await
                }
                // The hub dropped this connection; the kick says why.
                None => Err(Ended::Close((&mut kicked).await)),
            },
            msg = socket.recv() => {
                last_heard = Instant::now();
                match msg {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Err(Ended::Gone),
                    Some(Ok(Message::Text(text))) => {
                        let before = identity.expires_at;
                        let handled = client_frame(&app, &mut identity, text.as_str()).await;
                        if identity.expires_at != before {
                            // A refresh: new deadlines, and a new warning before the new expiry.
                            let (expires, warn_at) = deadlines(&app, &identity);
                            expiry.as_mut().reset(expires);
                            warning.as_mut().reset(warn_at);
                        }
                        match handled {
                            Ok(Some(reply)) => {
                                let write = socket.send(Message::Text(reply.into()));
                                guarded(write, kicked.as_mut(), stopping.as_mut(), patience).await
                            }
                            Ok(None) => Ok(()),
                            Err(e) => Err(Ended::Close(e.close_reason())),
                        }
                    }
                    // Pings are answered by the protocol layer; pongs only prove liveness.
                    Some(Ok(_)) => Ok(()),
                }
            }
            _ = &mut ping => {
                if last_heard.elapsed() > patience {
                    Err(Ended::Dead)
                } else {
                    ping.as_mut().reset(Instant::now() + keepalive);
                    let write = socket.send(Message::Ping(Default::default()));
                    guarded(write, kicked.as_mut(), stopping.as_mut(), patience).await
                }
            }
        };
        if let Err(ended) = step {
            break ended;
        }
    };
    finish(&app, socket, sub, ended, patience).await
}

/// Ends the session as `ended` says: with a close frame, or, for a peer that is gone or
/// dead, by dropping the connection (counted).
async fn finish(app: &App, socket: WebSocket, sub: Subscription, ended: Ended, patience: Duration) {
    match ended {
        Ended::Close(reason) => end(app, socket, sub, reason, patience).await,
        Ended::Gone => {}
        Ended::Dead => metrics::counter!("changecast_dead_peers_total").increment(1),
    }
}

/// Ends a subscribed connection: leaves the hub at once (its queue is freed and nothing
/// more is sent), then closes the socket with `reason`. A peer that stopped reading has
/// `patience` to take the close frame (after what its buffers already hold) before the
/// connection is dropped; on shutdown only a moment.
async fn end(
    app: &App,
    socket: WebSocket,
    sub: Subscription,
    reason: CloseReason,
    patience: Duration,
) {
    metrics::counter!("changecast_disconnects_total", "reason" => reason.label()).increment(1);
    drop(sub);
    let within = if app.shutdown.is_cancelled() {
        CLOSE_WAIT
    } else {
        patience
    };
    close(socket, reason, reason.text(), within).await;
}

/// Writes `first` and every event already queued after it (up to [`MAX_BATCH`]) with one
/// flush.
async fn write_batch(
    socket: &mut WebSocket,
    sub: &mut Subscription,
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

/// Runs a write unless the connection ends first: a kick, shutdown, or a peer that has not
/// taken the bytes within `patience`. A socket whose peer stopped reading blocks the write
/// once the kernel's buffers are full; without this the task would wait on it for as long
/// as the TCP connection lives, deaf to its kick. A write given up on leaves whole frames in
/// the socket's buffer (the sink takes a frame whole or not at all), so a close frame can
/// still follow them.
async fn guarded(
    write: impl Future<Output = Result<(), axum::Error>>,
    kicked: Pin<&mut impl Future<Output = CloseReason>>,
    stopping: Pin<&mut impl Future<Output = ()>>,
    patience: Duration,
) -> Result<(), Ended> {
    tokio::select! {
        biased;
        written = write => written.map_err(|_| Ended::Gone),
        reason = kicked => Err(Ended::Close(reason)),
        _ = stopping => Err(Ended::Close(CloseReason::Restarting)),
        _ = tokio::time::sleep(patience) => Err(Ended::Dead),
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
