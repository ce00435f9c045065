//! The router: source → routed events → the stream.
//!
//! In: [`Batch`]es of changes from the source, and `POST /v1/publish` messages. Out:
//! [`RoutedBatch`]es appended to an [`EventStream`] — each event with its audience, its
//! JSON (with an empty id: the stream numbers it) and the source position it came from —
//! and, once the stream holds a batch, the batch's end position acknowledged back to the
//! source for checkpointing.
//!
//! The stream is where ids come from and what makes events durable. In one process it is
//! in-process ([`crate::gateway::Local`]: the hub numbers, the history store keeps, the
//! hub delivers); in a cluster it is a NATS JetStream stream
//! ([`crate::cluster::publish::Publisher`]) that every node's gateway reads. The router is
//! the same in both.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

use crate::change::{Position, Recipients, UserId};
use crate::cluster::wire::Kind;
use crate::event::ServerEvent;
use crate::route::{DeliveryKind, Router};
use crate::source::Batch;

/// One routed event, before the stream gives it an id.
#[derive(Debug, Clone)]
pub struct RoutedEvent {
    pub kind: Kind,
    /// Distinct user ids, sorted.
    pub recipients: Recipients,
    /// The event's JSON with `"id":""` (see [`crate::cluster::wire::with_id`]).
    pub template: String,
    /// The change's own position and the rule that made the event: together unique and
    /// the same every time the change is routed again.
    pub position: Position,
    pub rule: Arc<str>,
    /// For alerts: the document key (the cooldown clock's key).
    pub key: Option<String>,
}

/// A source batch, routed.
#[derive(Debug, Clone)]
pub struct RoutedBatch {
    /// The source lost changes before these (clients are told: `gap`).
    pub lost_history: bool,
    pub events: Vec<RoutedEvent>,
    /// Where reading resumes to reproduce this batch: the previous batch's end (`None`: the
    /// source's own start).
    pub start: Option<Position>,
    /// The position the batch brings the source to.
    pub end: Position,
}

/// Why the stream did not take a batch.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Shutting down (in one process: while the history store was failing).
    #[error("stopped")]
    Stopped,
    /// This node's router lease is not certainly valid any more.
    #[error("the router lease is not held")]
    LostLease,
    #[error("{0}")]
    Failed(String),
}

/// Where routed events go; ids come from here.
pub trait EventStream: Send + Sync + 'static {
    /// Appends a batch's events, in order. `Ok(Some(p))`: the stream now holds everything up
    /// to source position `p` (acknowledge it); `Ok(None)`: held, but nothing to
    /// acknowledge yet (a cluster batch without events, see `cluster::publish`).
    fn append(&self, batch: RoutedBatch) -> BoxFuture<'_, Result<Option<Position>, StreamError>>;

    /// Appends one published message; its id.
    fn publish(
        &self,
        recipients: Recipients,
        template: String,
    ) -> BoxFuture<'_, Result<String, StreamError>>;
}

/// A message for `POST /v1/publish`; `done` gets the event's id once the stream holds it.
pub struct PublishRequest {
    pub to: Vec<String>,
    pub event: serde_json::Value,
    pub done: oneshot::Sender<String>,
}

impl PublishRequest {
    /// The audience (sorted, distinct) and the JSON template.
    pub fn into_parts(self) -> (Recipients, String, oneshot::Sender<String>) {
        let mut to = self.to;
        to.sort();
        to.dedup();
        let recipients = to.into_iter().map(UserId::from).collect();
        let template = ServerEvent::Message {
            id: "",
            event: &self.event,
        }
        .to_json();
        (recipients, template, self.done)
    }
}

/// Every event one change makes, in rule order.
pub async fn route(router: &Router, change: &crate::change::Change) -> Vec<RoutedEvent> {
    let mut out = Vec::new();
    for mut d in router.route(change).await {
        let recipients = std::mem::take(&mut d.recipients);
        let template = d.encode("", change);
        let (kind, rule, key) = match &d.kind {
            DeliveryKind::Change(r) => (Kind::Change, Arc::clone(&r.name), None),
            DeliveryKind::Alert { alert, .. } => (
                Kind::Alert,
                Arc::clone(&alert.name),
                Some(change.key.clone()),
            ),
        };
        out.push(RoutedEvent {
            kind,
            recipients,
            template,
            position: change.position.clone(),
            rule,
            key,
        });
    }
    out
}

/// Most changes routed into one append when batches wait for the router.
const GROUP_CHANGES: usize = 1024;

/// The routing loop: until the source stops (its channel closes) or the stream refuses a
/// batch. `start` is where the source began reading (the stream's resume position).
/// Publishing requests are served between batches (one process: one writer keeps ids in
/// order); `None` when they go to the stream elsewhere (a cluster node's publisher).
pub async fn run(
    mut batches: mpsc::Receiver<Batch>,
    mut publishes: Option<mpsc::Receiver<PublishRequest>>,
    router: &Router,
    stream: &dyn EventStream,
    acks: watch::Sender<Option<Position>>,
    mut start: Option<Position>,
) -> Result<(), StreamError> {
    // A batch after a loss, taken while grouping: it starts the next group.
    let mut next_group: Option<Batch> = None;
    loop {
        let mut batch = match next_group.take() {
            Some(b) => b,
            None => tokio::select! {
                // Changes first: they hold the source's checkpoint back.
                biased;
                batch = batches.recv() => match batch {
                    Some(b) => b,
                    None => return Ok(()), // the source stopped
                },
                Some(req) = async {
                    match publishes.as_mut() {
                        Some(p) => p.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (recipients, template, done) = req.into_parts();
                    let id = stream.publish(recipients, template).await?;
                    let _ = done.send(id);
                    continue;
                }
            },
        };
        // Group commit: batches that queued while the last one was stored (the router fell
        // behind the source) go into one append: one history transaction and one
        // acknowledgement instead of one each, which is what lets a busy router catch up.
        // Taken only when already waiting, so a router that keeps up adds no delay. A batch
        // after a loss starts a group of its own: its `gap` comes before its changes.
        while batch.changes.len() < GROUP_CHANGES {
            match batches.try_recv() {
                Ok(next) if next.lost_history => {
                    next_group = Some(next);
                    break;
                }
                Ok(next) => {
                    batch.changes.extend(next.changes);
                    batch.end = next.end;
                }
                Err(_) => break,
            }
        }
        let mut events = Vec::new();
        for change in &batch.changes {
            events.extend(route(router, change).await);
        }
        if router.gave_up() {
            // Shutting down while a lookup waited for the database: this batch is not
            // stored or acknowledged, and the source reads it again after the restart.
            return Err(StreamError::Stopped);
        }
        let end = batch.end.clone();
        let routed = RoutedBatch {
            lost_history: batch.lost_history,
            events,
            start: start.clone(),
            end: batch.end,
        };
        if let Some(held) = stream.append(routed).await? {
            acks.send_replace(Some(held));
        }
        start = Some(end);
    }
}
