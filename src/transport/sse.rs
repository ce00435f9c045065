//! `GET /v1/sse`: the Server-Sent Events stream.
//!
//! In: a request with `Authorization: Bearer` or `?token=`, and `?since=` or the
//! `Last-Event-ID` header (what `EventSource` sends when it reconnects), or `?last=N` (the
//! user's newest N events first; a resume point wins, so an `EventSource` reconnecting on
//! the same URL resumes). Out: the same events as the WebSocket, one `data:` line each,
//! with `id:` on events that have one. A bad `last` is refused with `400`.
//!
//! Refusals are plain HTTP (401 bad credentials, 403 unknown user or client id) with a
//! JSON reason: `EventSource` stops on them. Everything that the WebSocket closes with a
//! "reconnect" code (4008, 4001, 1012, 1011) ends the stream after a `: close <code>`
//! comment; `EventSource` then reconnects with `Last-Event-ID` by itself.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::edge::ConnHandle;
use super::{StreamParams, bad_request, bearer, parse_last};
use crate::auth::{AuthError, now_secs};
use crate::event::CloseReason;
use crate::hub::{Opening, Start, Subscription};
use crate::server::App;

/// How long a closing comment may wait on shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

pub async fn handler(
    State(app): State<Arc<App>>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
    conn: Option<Extension<ConnHandle>>,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    let last = match parse_last(params.last.as_deref()) {
        Ok(last) => last,
        Err(reason) => return bad_request(reason),
    };
    let Some(token) = bearer(&headers).or(params.token) else {
        return refuse(AuthError::Missing);
    };
    let identity = match app.auth.identify(&token, params.client_id.as_deref()).await {
        Ok(id) => id,
        Err(e) => {
            metrics::counter!("changecast_auth_failures_total", "reason" => e.close_reason().label())
                .increment(1);
            return refuse(e);
        }
    };
    let since = params.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    app.learn_stream_head(since.as_deref()).await;
    let start = Start::new(since.as_deref(), last);
    let mut sub = match app.hub.subscribe_from(&identity.user, start) {
        Ok(sub) => sub,
        Err(reason) => {
            let body = json!({"error": reason.text(), "code": reason.code()});
            return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
        }
    };
    let opening: Vec<Bytes> = sub
        .opening()
        .await
        .into_iter()
        .map(|o| match o {
            Opening::Control(json) => data_only(&json),
            Opening::Event(frame) => frame.sse(),
        })
        .collect();

    if let Some(conn) = &conn {
        conn.0.admit();
    }

    let left = identity.expires_at.saturating_sub(now_secs());
    let expires = Instant::now() + Duration::from_secs(left);
    // The body pulls from a one-chunk channel; the pump writes to it with bounded waits.
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(pump(app, sub, opening, expires, tx, conn));
    let chunks = stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(chunk), rx))
    });
    let mut res = Body::from_stream(chunks).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // The connection ends with the stream, so its end is the connection's (see `pump`);
    // `EventSource` reconnects on a new one anyway.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// Why a stream ends.
enum Ended {
    /// With a `: close <code>` comment: a kick (4008, …), shutdown, token expiry.
    Close(CloseReason),
    /// The response was dropped: the peer is gone.
    Gone,
    /// A chunk was not taken for two keepalive periods: the peer stopped reading.
    Dead,
}

/// Feeds one stream: the opening, then live events, keepalive comments, and the closing
/// comment. Every send races the kick (shutdown kicks too) and the patience of two keepalive periods
/// (the same rule as the WebSocket's writes): a peer that stopped reading holds up none of
/// them. On a kick the subscription is dropped at once (the connection leaves the hub and
/// frees its slots), and a connection whose peer takes nothing is closed at the edge.
async fn pump(
    app: Arc<App>,
    sub: Subscription,
    opening: Vec<Bytes>,
    expires: Instant,
    tx: mpsc::Sender<Bytes>,
    conn: Option<ConnHandle>,
) {
    let keepalive = app.server.keepalive;
    let patience = keepalive * 2;
    let ended = {
        let kicked = sub.kicked();
        let expiry = sleep_until(expires);
        let comment = sleep_until(Instant::now() + keepalive);
        tokio::pin!(kicked, expiry, comment);

        let mut ended = None;
        for chunk in opening {
            if let Err(e) = send(&tx, chunk, kicked.as_mut(), patience).await {
                ended = Some(e);
                break;
            }
        }
        match ended {
            Some(e) => e,
            None => {
                // The response body was dropped (the peer went away): leave the hub now, not
                // at the next write, which may be a keepalive period away.
                let gone = tx.closed();
                tokio::pin!(gone);
                loop {
                    let chunk = tokio::select! {
                        biased;
                        reason = &mut kicked => break Ended::Close(reason),
                        _ = &mut expiry => break Ended::Close(CloseReason::TokenExpired),
                        _ = &mut gone => break Ended::Gone,
                        frame = sub.recv() => match frame {
                            Some(frame) => frame.sse(),
                            // Kicked: the kick says why.
                            None => break Ended::Close(sub.kicked_for().unwrap_or(CloseReason::Internal)),
                        },
                        _ = &mut comment => {
                            comment.as_mut().reset(Instant::now() + keepalive);
                            Bytes::from_static(b": keepalive\n\n")
                        }
                    };
                    if let Err(e) = send(&tx, chunk, kicked.as_mut(), patience).await {
                        break e;
                    }
                }
            }
        }
    };
    // Leave the hub first: queue, per-user and global slots are free from here on.
    drop(sub);
    let closed_cleanly = match ended {
        Ended::Gone => return,
        Ended::Dead => {
            metrics::counter!("changecast_dead_peers_total").increment(1);
            false
        }
        Ended::Close(reason) => {
            metrics::counter!("changecast_disconnects_total", "reason" => reason.label())
                .increment(1);
            let text = Bytes::from(format!(": close {} {}\n\n", reason.code(), reason.text()));
            let within = if app.shutdown.is_cancelled() {
                CLOSE_WAIT
            } else {
                patience
            };
            matches!(
                tokio::time::timeout(within, tx.send(text)).await,
                Ok(Ok(()))
            )
        }
    };
    drop(tx); // the body ends after what it holds
    let Some(conn) = conn else { return };
    // A peer that took the closing comment gets the end of the response; one that stopped
    // reading would hold the socket (and a descriptor) for as long as TCP lets it: cut it.
    if !closed_cleanly
        || tokio::time::timeout(patience, conn.0.finished())
            .await
            .is_err()
    {
        conn.0.close();
    }
}

/// Hands `chunk` to the response body unless the stream ends first.
async fn send(
    tx: &mpsc::Sender<Bytes>,
    chunk: Bytes,
    kicked: Pin<&mut impl Future<Output = CloseReason>>,
    patience: Duration,
) -> Result<(), Ended> {
    // The common case, a reader keeping up: no timer armed per event.
    let chunk = match tx.try_send(chunk) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(Ended::Gone),
        Err(mpsc::error::TrySendError::Full(chunk)) => chunk,
    };
    tokio::select! {
        biased;
        sent = tx.send(chunk) => sent.map_err(|_| Ended::Gone),
        reason = kicked => Err(Ended::Close(reason)),
        _ = tokio::time::sleep(patience) => Err(Ended::Dead),
    }
}

fn data_only(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn refuse(e: AuthError) -> Response {
    let body = json!({"error": e.to_string(), "code": e.close_reason().code()});
    (e.status(), Json(body)).into_response()
}
