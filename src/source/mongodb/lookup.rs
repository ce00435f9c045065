//! Lookups for the rules through the driver's `find`.
//!
//! In: a [`Query`] (equality on dotted paths). Out: matching documents as JSON. Results
//! are cached by the router and invalidated from the same change stream.
//!
//! As of a change (`Query::as_of` = the event's `clusterTime`), the `find` is a snapshot
//! read: `readConcern: {level: "snapshot", atClusterTime}`, so the answer is the
//! collection as it was when the change was made, whenever the router gets to it. The
//! typed `find` cannot set `atClusterTime`, so the command is sent as it is through
//! `run_cursor_command`. When the server refuses it — `SnapshotTooOld` (239: the change
//! is older than the server's snapshot history, `minSnapshotHistoryWindowInSeconds`, 300 s
//! by default, e.g. while catching up after a long outage), `SnapshotUnavailable` (246),
//! or any other command error (servers before 5.0 allow snapshot reads only in
//! transactions) — the lookup reads the current state instead, counted in
//! `changecast_lookups_not_as_of_total{collection, reason}` and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use mongodb::Database;
use mongodb::bson::{Document, Timestamp, doc};

use super::code;
use super::decode::{document_to_json, filter_value};
use crate::change::AsOf;
use crate::source::{Lookup, LookupError, Query};

/// `find` on the watched database.
#[derive(Clone)]
pub struct MongoLookup {
    db: Database,
    /// Whether a fallback to the current state was logged at warn already (then at debug:
    /// on a server without snapshot reads every lookup falls back).
    warned: Arc<AtomicBool>,
}

impl MongoLookup {
    pub fn new(db: Database) -> Self {
        MongoLookup {
            db,
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Lookups on a client of their own (a cluster node that does not read the stream).
    pub async fn connect(
        config: &crate::config::MongoSourceConfig,
    ) -> Result<Self, crate::source::SourceError> {
        let client = mongodb::Client::with_uri_str(&config.uri)
            .await
            .map_err(|e| crate::source::SourceError::Mongo(format!("bad uri: {e}")))?;
        Ok(MongoLookup::new(client.database(&config.database)))
    }

    /// The current state, through the typed `find`.
    async fn find_now(&self, query: &Query) -> mongodb::error::Result<Vec<serde_json::Value>> {
        let coll = self.db.collection::<Document>(&query.collection);
        let mut find = coll.find(filter_of(query));
        if let Some(limit) = query.limit {
            find = find.limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let mut cursor = find.await?;
        let mut out = Vec::new();
        while cursor.advance().await? {
            out.push(document_to_json(&cursor.deserialize_current()?));
        }
        Ok(out)
    }

    /// A snapshot read at `at`.
    async fn find_at(
        &self,
        query: &Query,
        at: Timestamp,
    ) -> mongodb::error::Result<Vec<serde_json::Value>> {
        let mut command = doc! {
            "find": &query.collection,
            "filter": filter_of(query),
            "readConcern": { "level": "snapshot", "atClusterTime": at },
        };
        if let Some(limit) = query.limit {
            command.insert("limit", i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let mut cursor = self.db.run_cursor_command(command).await?;
        let mut out = Vec::new();
        while cursor.advance().await? {
            out.push(document_to_json(&cursor.deserialize_current()?));
        }
        Ok(out)
    }
}

/// The filter document of a query.
pub fn filter_of(query: &Query) -> Document {
    query
        .filter
        .iter()
        .map(|(path, value)| (path.to_string(), filter_value(value)))
        .collect()
}

/// Why a snapshot read was refused, as the metric's `reason` label.
fn refusal(code: i32) -> &'static str {
    match code {
        239 => "snapshot_too_old",
        246 => "snapshot_unavailable",
        _ => "refused",
    }
}

impl Lookup for MongoLookup {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<serde_json::Value>, LookupError>> {
        Box::pin(async move {
            let fail = |e: mongodb::error::Error| {
                let (collection, message) = (query.collection.clone(), e.to_string());
                // No answer from a server (network, no server selectable, a pool cleared
                // by a failover): ask again later; a server's answer is about the query.
                match &*e.kind {
                    mongodb::error::ErrorKind::Io(_)
                    | mongodb::error::ErrorKind::ServerSelection { .. }
                    | mongodb::error::ErrorKind::ConnectionPoolCleared { .. } => {
                        LookupError::Unavailable {
                            collection,
                            message,
                        }
                    }
                    _ => LookupError::Failed {
                        collection,
                        message,
                    },
                }
            };
            if let Some(AsOf::ClusterTime { time, increment }) = query.as_of {
                match self.find_at(&query, Timestamp { time, increment }).await {
                    Ok(docs) => return Ok(docs),
                    // The server answered, and not with the documents: read the current
                    // state. Network errors fail the lookup as any other would.
                    Err(e) if code(&e).is_some() => {
                        let reason = refusal(code(&e).unwrap_or_default());
                        if self.warned.swap(true, Ordering::Relaxed) {
                            tracing::debug!(collection = %query.collection, reason,
                                "lookup: snapshot read refused ({e}); reading the current state");
                        } else {
                            tracing::warn!(collection = %query.collection, reason,
                                "lookup: snapshot read refused ({e}); reading the current state, \
                                 so recipients are those of now, not of the change");
                        }
                        metrics::counter!("changecast_lookups_not_as_of_total",
                            "collection" => query.collection.clone(), "reason" => reason)
                        .increment(1);
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
            self.find_now(&query).await.map_err(fail)
        })
    }
}
