//! `POST /v1/publish`: server-side publishing.
//!
//! In: `{"to": ["<user id>", ...], "event": {...}}` with `Authorization: Bearer <API key>`.
//! Out: a `message` event for every listed user, stored in history like routed events (so
//! it is resumable) and delivered live; the answer carries its id once it is stored.
//! Refusals are JSON: 401 (no or wrong key), 403 (publishing not enabled), 400 (a bad
//! body, with the reason), 413 (too large), 503 (shutting down).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::bearer;
use crate::router::PublishRequest;
use crate::server::App;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Most recipients in one request.
const MAX_RECIPIENTS: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    to: Vec<String>,
    event: Value,
}

pub(crate) fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    (status, Json(json!({"error": reason.into()}))).into_response()
}

/// The publish API key check, shared with `GET /v1/admin/explain`: the refusal to send
/// (403 when publishing is off, 401 without a known key), or `None` to go on.
pub fn refusal(app: &App, headers: &HeaderMap) -> Option<Response> {
    if app.publish_keys.is_empty() {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "publishing is not enabled: set [publish] api_keys_env",
        ));
    }
    let Some(key) = bearer(headers) else {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
        ));
    };
    // Compare against every key in constant time: no early exit tells which prefix matched.
    let known = app.publish_keys.iter().fold(0u8, |hit, k| {
        hit | k.as_bytes().ct_eq(key.as_bytes()).unwrap_u8()
    });
    if known == 0 {
        metrics::counter!("changecast_publish_refused_total", "reason" => "bad_key").increment(1);
        return Some(refuse(StatusCode::UNAUTHORIZED, "unknown API key"));
    }
    None
}

pub async fn handler(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refusal(&app, &headers) {
        return refused;
    }
    let body: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    if body.to.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "`to` must name at least one user id",
        );
    }
    if body.to.len() > MAX_RECIPIENTS {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("`to` names more than {MAX_RECIPIENTS} users"),
        );
    }
    if body.to.iter().any(|u| u.is_empty()) {
        return refuse(StatusCode::BAD_REQUEST, "`to` has an empty user id");
    }
    if !body.event.is_object() {
        return refuse(StatusCode::BAD_REQUEST, "`event` must be a JSON object");
    }
    let (done, stored) = oneshot::channel();
    let request = PublishRequest {
        to: body.to,
        event: body.event,
        done,
    };
    if app.publish.send(request).await.is_err() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match tokio::time::timeout(Duration::from_secs(30), stored).await {
        Ok(Ok(id)) => {
            metrics::counter!("changecast_published_total").increment(1);
            Json(json!({"id": id})).into_response()
        }
        _ => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "not stored in time; it may still be delivered",
        ),
    }
}
