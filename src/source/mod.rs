//! Sources: where changes come from.
//!
//! In: a database. Out: [`Batch`]es of [`Change`]s on a bounded channel to the router, and
//! answers to [`Query`]s the rules make (owner lookups). The router reports back, through a
//! `watch` channel, the position up to which every change has been handed to the hub; the
//! source checkpoints that position, so a restart neither loses nor repeats changes.
//!
//! Each implementation lives in its own folder (`sqlite/`) behind the [`Source`] and
//! [`Lookup`] traits; nothing downstream knows which database it is reading.

pub mod sqlite;

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Position};
use crate::path::FieldPath;

/// Changes read together, and the position that covers all of them (including rows that
/// were read but skipped as malformed, so a bad row never pins the checkpoint).
#[derive(Debug, Clone)]
pub struct Batch {
    pub changes: Vec<Change>,
    pub end: Position,
}

/// A running change feed.
pub trait Source: Send + 'static {
    /// Reads changes into `out` until `shutdown` fires, checkpointing each position that
    /// arrives on `acks`. On shutdown it stops reading, drops `out`, waits for the ack
    /// sender to close (the router has drained), writes the last checkpoint and returns.
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Batch>,
        acks: watch::Receiver<Option<Position>>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// A document query: equality on each field path, ANDed.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub collection: String,
    pub filter: Vec<(FieldPath, Value)>,
    /// At most this many documents; `None` for all.
    pub limit: Option<usize>,
}

/// The source's own query capability, used by routes and user resolution.
pub trait Lookup: Send + Sync + 'static {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>>;
}

/// What a source can say about its schema, for validating a config before it starts.
pub trait Catalog {
    /// Collections and, where the source knows them, their top-level fields.
    fn collections(&self) -> &BTreeMap<String, Option<Vec<String>>>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("lookup in `{collection}` failed: {message}")]
    Failed { collection: String, message: String },
}
