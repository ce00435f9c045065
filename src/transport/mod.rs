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
pub mod pacer;
pub mod publish;
pub mod sse;
pub mod ws;

use std::num::IntErrorKind;
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

use crate::hub::MAX_LAST;
use crate::server::App;

/// Query parameters of `/v1/ws` and `/v1/sse`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamParams {
    /// The JWT, for clients that cannot set headers (browsers' WebSocket).
    pub token: Option<String>,
    pub client_id: Option<String>,
    /// Resume after this event id.
    pub since: Option<String>,
    /// Open on the user's newest N events (see [`parse_last`]); `since` wins.
    pub last: Option<String>,
}

/// `?last=N`: a whole number of events. Above [`MAX_LAST`] (however large) it is
/// [`MAX_LAST`]; anything else is refused with a reason for a 400.
pub fn parse_last(raw: Option<&str>) -> Result<Option<usize>, String> {
    let Some(raw) = raw else { return Ok(None) };
    match raw.parse::<u64>() {
        Ok(n) => Ok(Some(usize::try_from(n).unwrap_or(MAX_LAST).min(MAX_LAST))),
        Err(e) if *e.kind() == IntErrorKind::PosOverflow => Ok(Some(MAX_LAST)),
        Err(_) => Err(format!(
            "last: expected a whole number of events (0 to {MAX_LAST}), got {:?}",
            close_text(raw)
        )),
    }
}

/// A refused stream request: `400` with a JSON reason.
pub fn bad_request(reason: String) -> Response {
    let body = json!({"error": reason, "code": 400});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
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
    fn last_is_a_whole_number_capped_at_max_last() {
        assert_eq!(parse_last(None), Ok(None));
        assert_eq!(parse_last(Some("0")), Ok(Some(0)));
        assert_eq!(parse_last(Some("20")), Ok(Some(20)));
        assert_eq!(parse_last(Some("1001")), Ok(Some(MAX_LAST)));
        assert_eq!(parse_last(Some(&"9".repeat(40))), Ok(Some(MAX_LAST)));
        for bad in ["", "x", "-1", "1.5", " 3", "0x10"] {
            let e = parse_last(Some(bad)).unwrap_err();
            assert!(e.starts_with("last: expected a whole number"), "{bad}: {e}");
        }
    }

    #[test]
    fn close_text_fits_a_close_frame() {
        let long = "é".repeat(100);
        let t = close_text(&long);
        assert!(t.len() <= 123 && long.starts_with(&t));
    }
}
