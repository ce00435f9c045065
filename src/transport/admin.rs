//! `GET /v1/admin/explain`: `changecast explain` over HTTP, behind a publish API key.
//!
//! In: `?collection=C&key=K[&user=U][&op=update]` — the document is read from the source
//! by its change key and the decision traced by the router's own code
//! ([`crate::explain`]) — or `?id=<event id>` (also `?event=`): a delivered event as the
//! durable history stores it, with its audience. `Authorization: Bearer <API key>`, the
//! same check as `POST /v1/publish`. Out: JSON; refusals are JSON `{"error": ...}`: 401 (no
//! or wrong key), 403 (no API keys configured), 400 (a bad query), 404 (no such
//! collection, document or stored event), 502 (the lookup failed).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::publish::{refusal, refuse};
use crate::change::Op;
use crate::explain::{Document, ExplainError};
use crate::server::App;

/// The query string.
#[derive(Debug, Deserialize)]
pub struct Params {
    collection: Option<String>,
    key: Option<String>,
    user: Option<String>,
    op: Option<String>,
    id: Option<String>,
    event: Option<String>,
}

pub async fn explain(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    if let Some(refused) = refusal(&app, &headers) {
        return refused;
    }
    if let Some(id) = params.id.or(params.event) {
        return audience(&app, &id).await;
    }
    let (Some(collection), Some(key)) = (params.collection, params.key) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "give `collection` and `key` (and optionally `user`, `op`), or `id`",
        );
    };
    let op = match params.op.as_deref() {
        None => Op::Update,
        Some(s) => match Op::parse(s) {
            Some(op) => op,
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!("`op`: `{s}` is not one of insert, update, replace, delete"),
                );
            }
        },
    };
    match app
        .explain
        .explain(&collection, Document::Key(key), op, params.user.as_deref())
        .await
    {
        Ok(e) => Json(e).into_response(),
        Err(e @ (ExplainError::UnknownCollection { .. } | ExplainError::NoDocument { .. })) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e @ ExplainError::NotAnObject) => {
            refuse(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Err(e @ ExplainError::Lookup(_)) => refuse(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// A delivered event's stored audience.
async fn audience(app: &App, id: &str) -> Response {
    let Some(seq) = app.hub.seq_of(id) else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "`{id}` is not an event id of this history (epoch {})",
                app.hub.epoch()
            ),
        );
    };
    let Some(store) = app.hub.store().cloned() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "the history is kept in memory ([history] store = \"memory\"): audiences are not stored",
        );
    };
    match tokio::task::spawn_blocking(move || store.event(seq)).await {
        Ok(Ok(Some((text, users)))) => {
            let mut event: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if let Some(obj) = event.as_object_mut() {
                obj.insert("id".into(), Value::String(id.to_owned()));
            }
            Json(json!({"id": id, "audience": users, "event": event})).into_response()
        }
        Ok(Ok(None)) => refuse(
            StatusCode::NOT_FOUND,
            format!("the history does not hold `{id}` (pruned, or never stored)"),
        ),
        Ok(Err(e)) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("history read failed: {e}"),
        ),
        Err(e) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("history read failed: {e}"),
        ),
    }
}
