//! Sources: where changes come from.
//!
//! In: a database. Out: [`Batch`]es of [`Change`]s on a bounded channel to the router, and
//! answers to [`Query`]s the rules make (owner lookups). The router reports back, through a
//! `watch` channel, the position up to which every change has been handed to the hub; the
//! source checkpoints that position, so a restart neither loses nor repeats changes.
//!
//! Each implementation lives in its own folder (`sqlite/`) behind the [`Source`] and
//! [`Lookup`] traits; nothing downstream knows which database it is reading.

pub mod mongodb;
pub mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{AsOf, Change, Op, Position};
use crate::path::FieldPath;

/// Changes read together, and the position that covers all of them (including rows that
/// were read but skipped as malformed, so a bad row never pins the checkpoint).
#[derive(Debug, Clone)]
pub struct Batch {
    pub changes: Vec<Change>,
    pub end: Position,
    /// The source lost its place before these changes (MongoDB history rolled off the
    /// oplog): changes in between are gone, and clients must be told (`gap`).
    pub lost_history: bool,
}

impl Batch {
    pub fn new(changes: Vec<Change>, end: Position) -> Self {
        Batch {
            changes,
            end,
            lost_history: false,
        }
    }
}

/// Whether the source is connected and delivering, for `/readyz`.
#[derive(Debug)]
pub struct Health {
    ok: AtomicBool,
    reason: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            ok: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
        }
    }
}

impl Health {
    pub fn up(&self) {
        self.ok.store(true, Ordering::Release);
    }

    pub fn down(&self, reason: impl Into<String>) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason.into();
        }
        self.ok.store(false, Ordering::Release);
    }

    /// `None` when up, the reason when down.
    pub fn problem(&self) -> Option<String> {
        if self.ok.load(Ordering::Acquire) {
            return None;
        }
        Some(self.reason.lock().map(|r| r.clone()).unwrap_or_default())
    }
}

/// `changecast_changes_total{collection, op}` with handles resolved once per pair.
#[derive(Default)]
pub struct ChangeCounters(HashMap<String, [Option<metrics::Counter>; 4]>);

impl ChangeCounters {
    pub fn count(&mut self, change: &Change) {
        let slots = match self.0.get_mut(change.collection.as_str()) {
            Some(s) => s,
            None => self.0.entry(change.collection.clone()).or_default(),
        };
        slots[change.op as usize]
            .get_or_insert_with(|| {
                metrics::counter!("changecast_changes_total",
                    "collection" => change.collection.clone(), "op" => change.op.as_str())
            })
            .increment(1);
    }
}

const _: () = assert!(
    Op::Delete as usize == 3,
    "ChangeCounters has one slot per Op"
);

/// A running change feed.
pub trait Source: Send + 'static {
    /// Reads changes into `out` until `shutdown` fires, checkpointing each position that
    /// arrives on `acks`. On shutdown it stops reading, drops `out`, waits for the ack
    /// sender to close (the router has drained), writes the last checkpoint and returns.
    /// `health` is set down (with a reason) while the source cannot deliver.
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Batch>,
        acks: watch::Receiver<Option<Position>>,
        health: std::sync::Arc<Health>,
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
    /// Read the documents as they were at this point of the source's history (routing a
    /// change); `None` reads the current state (user resolution at connect time). Not part
    /// of the lookup cache's key.
    pub as_of: Option<AsOf>,
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
    #[error("mongodb: {0}")]
    Mongo(String),
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("lookup in `{collection}` failed: {message}")]
    Failed { collection: String, message: String },
}
