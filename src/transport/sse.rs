//! `GET /v1/sse`: the Server-Sent Events stream.
//!
//! In: a request with `Authorization: Bearer` or `?token=`, and `?since=` or the
//! `Last-Event-ID` header (what `EventSource` sends when it reconnects). Out: the same
//! events as the WebSocket, one `data:` line each, with `id:` on events that have one.
//!
//! Refusals are plain HTTP (401 bad credentials, 403 unknown user or client id) with a
//! JSON reason: `EventSource` stops on them. Everything that the WebSocket closes with a
//! "reconnect" code (4008, 4001, 1012, 1011) ends the stream after a `: close <code>`
//! comment; `EventSource` then reconnects with `Last-Event-ID` by itself.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream;
use serde_json::json;
use tokio::time::{Instant, sleep_until};

use super::{StreamParams, bearer};
use crate::auth::{AuthError, now_secs};
use crate::event::CloseReason;
use crate::hub::{Opening, Subscription};
use crate::server::App;

pub async fn handler(
    State(app): State<Arc<App>>,
    Query(params): Query<StreamParams>,
    headers: HeaderMap,
) -> Response {
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
    let mut sub = match app.hub.subscribe(&identity.user, since.as_deref()) {
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

    let left = identity.expires_at.saturating_sub(now_secs());
    let state = StreamState {
        opening: opening.into_iter(),
        kick: Arc::clone(&sub.kick),
        sub,
        app: Arc::clone(&app),
        expires: Instant::now() + Duration::from_secs(left),
        next_comment: Instant::now() + app.server.keepalive,
        done: false,
    };
    let body = Body::from_stream(stream::unfold(state, next_chunk));
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

struct StreamState {
    opening: std::vec::IntoIter<Bytes>,
    sub: Subscription,
    kick: Arc<crate::hub::Kick>,
    app: Arc<App>,
    expires: Instant,
    next_comment: Instant,
    done: bool,
}

/// Produces the stream's next chunk; `None` ends it (and drops the subscription).
async fn next_chunk(mut st: StreamState) -> Option<(Result<Bytes, Infallible>, StreamState)> {
    if st.done {
        return None;
    }
    if let Some(chunk) = st.opening.next() {
        return Some((Ok(chunk), st));
    }
    let reason = tokio::select! {
        biased;
        reason = st.kick.kicked() => reason,
        _ = st.app.shutdown.cancelled() => CloseReason::Restarting,
        _ = sleep_until(st.expires) => CloseReason::TokenExpired,
        frame = st.sub.recv() => match frame {
            Some(frame) => return Some((Ok(frame.sse()), st)),
            None => st.kick.kicked().await,
        },
        _ = sleep_until(st.next_comment) => {
            st.next_comment = Instant::now() + st.app.server.keepalive;
            return Some((Ok(Bytes::from_static(b": keepalive\n\n")), st));
        }
    };
    metrics::counter!("changecast_disconnects_total", "reason" => reason.label()).increment(1);
    st.done = true;
    let comment = format!(": close {} {}\n\n", reason.code(), reason.text());
    Some((Ok(Bytes::from(comment)), st))
}

fn data_only(json: &str) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

fn refuse(e: AuthError) -> Response {
    let body = json!({"error": e.to_string(), "code": e.close_reason().code()});
    (e.status(), Json(body)).into_response()
}
