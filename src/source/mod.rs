//! Sources: where changes come from.
//!
//! In: a database. Out: [`Batch`]es of [`Change`]s on a bounded channel to the router, and
//! answers to [`Query`]s the rules make (owner lookups). The router reports back, through a
//! `watch` channel, the position up to which every change has been handed to the hub; the
//! source checkpoints that position, so a restart neither loses nor repeats changes.
//!
//! Each implementation lives in its own folder (`sqlite/`, `mongodb/`, `postgres/`) behind the [`Source`] and
//! [`Lookup`] traits; nothing downstream knows which database it is reading.

pub mod mongodb;
pub mod patient;
pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{AsOf, Change, Op, Position};
use crate::path::FieldPath;

/// Retry delays after consecutive failures.
pub type Retry = Box<dyn Iterator<Item = Duration> + Send>;

/// Delays between retries of a failing read, reconnect, repair or lookup: 50 ms doubling
/// to 5 s, with jitter, for as long as it fails (so at most ~20 attempts a minute once it
/// keeps failing). Callers start a fresh one after a success.
pub fn retry_backoff() -> Retry {
    Box::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build(),
    )
}

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

/// A part of the gateway that can be unable to do its work while the process runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// The source: reading the database's changes.
    Source,
    /// The durable history: storing events before they are delivered.
    History,
    /// Retention: the periodic pruning pass.
    Pruning,
    /// A cluster node's link to NATS.
    Nats,
    /// A cluster node reading the stream up to where it stood when the node started.
    CatchUp,
    /// The routing loop's lookups, waiting for an unreachable database.
    Lookups,
}

impl Component {
    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// What is wrong now, for `/readyz`: at most one problem per [`Component`], each set
/// (`down`) and cleared (`up`) only by its own component, so one recovering never hides
/// another still failing. Ready when none is set.
#[derive(Debug, Default)]
pub struct Health {
    /// One bit per component that is down: `up` on the hot path (every stored batch)
    /// is one atomic load while all is well. Changed only under `problems`' lock.
    down: AtomicU8,
    problems: Mutex<BTreeMap<Component, String>>,
}

impl Health {
    /// `component` cannot do its work, because of `reason` (replacing its earlier one).
    pub fn down(&self, component: Component, reason: impl Into<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        problems.insert(component, reason.into());
        self.down.fetch_or(component.bit(), Ordering::Release);
    }

    /// `component` works (again).
    pub fn up(&self, component: Component) {
        if !self.is_down(component) {
            return;
        }
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        problems.remove(&component);
        self.down.fetch_and(!component.bit(), Ordering::Release);
    }

    pub fn is_down(&self, component: Component) -> bool {
        self.down.load(Ordering::Acquire) & component.bit() != 0
    }

    /// `None` when every component is up; otherwise every reason, `; `-separated, in
    /// [`Component`] order.
    pub fn problem(&self) -> Option<String> {
        if self.down.load(Ordering::Acquire) == 0 {
            return None;
        }
        let problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        let reasons: Vec<&str> = problems.values().map(String::as_str).collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
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
    /// `health`'s [`Component::Source`] is down (with a reason) while the source cannot
    /// deliver, and only the source sets or clears it.
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

    /// The document of `collection` whose change key is `key` (as events carry it), as it
    /// is now; for `explain`. By default the document whose `_id` is `key` (as a string,
    /// else as an integer when it reads as one).
    fn document<'a>(
        &'a self,
        collection: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, LookupError>> {
        Box::pin(async move {
            let id = FieldPath::parse("_id").expect("a valid path");
            let mut candidates = vec![Value::String(key.to_owned())];
            if let Ok(n) = key.parse::<i64>() {
                candidates.push(Value::from(n));
            }
            for value in candidates {
                let found = self
                    .find(Query {
                        collection: collection.to_owned(),
                        filter: vec![(id.clone(), value)],
                        limit: Some(1),
                        as_of: None,
                    })
                    .await?;
                if let Some(doc) = found.into_iter().next() {
                    return Ok(Some(doc));
                }
            }
            Ok(None)
        })
    }
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
    /// The query failed on the data (a type mismatch, a table gone): the rule skips this
    /// delivery.
    #[error("lookup in `{collection}` failed: {message}")]
    Failed { collection: String, message: String },
    /// The database could not be asked (connection refused or lost, server restarting):
    /// the routing loop waits and asks again ([`patient::Patient`]).
    #[error("lookup in `{collection}`: the database cannot be reached: {message}")]
    Unavailable { collection: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_every_component_and_names_each_one_down() {
        let health = Health::default();
        assert_eq!(health.problem(), None);
        health.down(Component::History, "history: history append failed: locked");
        health.down(
            Component::Source,
            "sqlite source: the change log cannot be read",
        );
        assert_eq!(
            health.problem().as_deref(),
            Some(
                "sqlite source: the change log cannot be read; \
                 history: history append failed: locked"
            )
        );

        // One recovers: still not ready, and the reason names only the other.
        health.up(Component::History);
        assert!(!health.is_down(Component::History));
        assert!(health.is_down(Component::Source));
        assert_eq!(
            health.problem().as_deref(),
            Some("sqlite source: the change log cannot be read")
        );

        // A component's new reason replaces its old one; `up` of one never down is a no-op.
        health.down(Component::Source, "sqlite source: trigger missing");
        health.up(Component::Pruning);
        assert_eq!(
            health.problem().as_deref(),
            Some("sqlite source: trigger missing")
        );
        health.up(Component::Source);
        assert_eq!(health.problem(), None);
    }
}
