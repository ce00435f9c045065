//! Transports: how events leave the process.
//!
//! In: HTTP requests. Out: WebSocket (`ws`) and Server-Sent Events (`sse`) streams fed by
//! the hub, plus the operational endpoints (`/healthz`, `/readyz`, `/metrics`), server-side
//! publishing (`publish`) and `GET /v1/admin/explain` (`admin`).
//!
//! Both streams follow one sequence: authenticate, subscribe to the hub, send `ready`
//! (and `gap` or the replay), then live events from the connection's bounded queue. A
//! connection task writes only to its own socket; nothing shared is locked while it waits.

pub mod admin;
pub mod edge;
pub mod publish;
pub mod sse;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::server::App;

/// Query parameters of `/v1/ws` and `/v1/sse`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamParams {
    /// The JWT, for clients that cannot set headers (browsers' WebSocket).
    pub token: Option<String>,
    pub client_id: Option<String>,
    /// Resume after this event id.
    pub since: Option<String>,
}

/// The HTTP routes of the gateway.
pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/v1/ws", get(ws::handler))
        .route("/v1/sse", get(sse::handler))
        .route(
            "/v1/publish",
            post(publish::handler).layer(DefaultBodyLimit::max(publish::MAX_BODY)),
        )
        .route("/v1/admin/explain", get(admin::explain))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(app)
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
        .filter(|t| !t.is_empty())
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    // A task that died says why, even while the gateway stops because of it.
    if app.shutdown.is_cancelled() && app.tasks.problem().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    // Every problem at once: tasks that died, then each failing component.
    let problems: Vec<String> = [
        app.tasks.problem(),
        app.source_stopped
            .load(Ordering::Acquire)
            .then(|| "source stopped".to_string()),
        app.health.problem(),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !problems.is_empty() {
        let reason = problems.join("; ");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response();
    }
    Json(json!({"ready": true})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

/// Truncates a close reason to the 123 bytes a close frame can carry, on a char boundary.
pub(crate) fn close_text(s: &str) -> String {
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_is_parsed_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc".into()));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn close_text_fits_a_close_frame() {
        let long = "é".repeat(100);
        let t = close_text(&long);
        assert!(t.len() <= 123 && long.starts_with(&t));
    }
}
