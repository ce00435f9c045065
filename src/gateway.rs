//! The gateway: the stream → this node's history and connections.
//!
//! In: numbered events — from the router directly in one process ([`Local`], the
//! in-process stream), or read from the JetStream stream in a cluster ([`follow`]). Out:
//! each event stored in this node's history (one transaction per batch, with the position
//! it brings the history to) and then fanned out by the [`Hub`] to the connections it is
//! for. An event is never delivered before it is stored, and never dropped: a failing store
//! is retried (and `/readyz` says why) until shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::change::{Position, Recipients};
use crate::cluster::wire::{self, Kind};
use crate::cluster::{ClusterError, Nats};
use crate::hub::store::Record;
use crate::hub::{Hub, Prepared};
use crate::router::{EventStream, RoutedBatch, StreamError};
use crate::source::{Component, Health};

/// Stores and delivers on this node.
#[derive(Clone)]
pub struct Deliver {
    pub hub: Arc<Hub>,
    pub health: Arc<Health>,
    pub shutdown: CancellationToken,
}

impl Deliver {
    /// Stores prepared events (and the position they bring the history to), then delivers
    /// them. False when the store kept failing until shutdown: nothing delivered.
    pub async fn store_and_deliver(&self, prepared: Vec<Prepared>, end: Option<Position>) -> bool {
        if prepared.is_empty() && end.is_none() {
            return true;
        }
        let prepared = Arc::new(prepared);
        if let Some(store) = self.hub.store().cloned() {
            let events = Arc::clone(&prepared);
            if !self
                .persist("history append", move || {
                    let records: Vec<Record> = events
                        .iter()
                        .map(|p| Record {
                            seq: p.frame.seq,
                            json: p.frame.json.as_str(),
                            recipients: &p.recipients,
                        })
                        .collect();
                    store.append(&records, end.as_ref())
                })
                .await
            {
                return false;
            }
        }
        for p in prepared.iter() {
            self.hub.deliver(p);
        }
        true
    }

    /// Stores and delivers what came before a loss (`prepared`, bringing the history to
    /// `before`), then records the loss ([`Deliver::history_lost`]), in stream order.
    /// False when the store kept failing until shutdown.
    async fn lost_after(&self, prepared: &mut Vec<Prepared>, before: u64) -> bool {
        let prepared = std::mem::take(prepared);
        self.store_and_deliver(prepared, Some(Position::from_seq(before)))
            .await
            && self.history_lost().await
    }

    /// The source (or the stream) lost changes: connected clients get `gap`, and nobody
    /// resumes from before now. False when the store kept failing until shutdown.
    pub async fn history_lost(&self) -> bool {
        let floor = self.hub.history_lost();
        match self.hub.store().cloned() {
            Some(store) => {
                self.persist("history floor", move || store.set_floor(floor))
                    .await
            }
            None => true,
        }
    }

    /// Runs a store write on a blocking thread until it succeeds. While it fails,
    /// `/readyz` says why. Gives up (false) only when the gateway is shutting down.
    pub async fn persist<F>(&self, what: &'static str, write: F) -> bool
    where
        F: Fn() -> rusqlite::Result<()> + Send + Sync + 'static,
    {
        let write = Arc::new(write);
        let mut delay = Duration::from_millis(100);
        loop {
            let w = Arc::clone(&write);
            match tokio::task::spawn_blocking(move || w()).await {
                Ok(Ok(())) => {
                    self.health.up(Component::History);
                    return true;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "{what} failed; retrying");
                    self.health
                        .down(Component::History, format!("history: {what} failed: {e}"));
                }
                Err(e) => {
                    tracing::error!(error = %e, "{what} task failed; retrying");
                    self.health.down(
                        Component::History,
                        format!("history: {what} task failed: {e}"),
                    );
                }
            }
            metrics::counter!("changecast_history_errors_total").increment(1);
            if self.shutdown.is_cancelled() {
                tracing::error!(
                    "{what}: giving up on shutdown; the source re-reads these changes on restart"
                );
                return false;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// The in-process stream of a single node: the hub numbers each event, the history store
/// keeps it with the source position in one transaction, the hub delivers it.
pub struct Local(pub Deliver);

impl EventStream for Local {
    fn append(&self, batch: RoutedBatch) -> BoxFuture<'_, Result<Option<Position>, StreamError>> {
        Box::pin(async move {
            if batch.lost_history && !self.0.history_lost().await {
                return Err(StreamError::Stopped);
            }
            let hub = &self.0.hub;
            let prepared = batch
                .events
                .into_iter()
                .filter_map(|e| hub.prepare(e.recipients, |id| wire::with_id(&e.template, id)))
                .collect();
            if !self
                .0
                .store_and_deliver(prepared, Some(batch.end.clone()))
                .await
            {
                // Not stored, so not delivered and not acknowledged: the source reads
                // these changes again after the restart.
                return Err(StreamError::Stopped);
            }
            Ok(Some(batch.end))
        })
    }

    fn publish(
        &self,
        recipients: Recipients,
        template: String,
    ) -> BoxFuture<'_, Result<String, StreamError>> {
        Box::pin(async move {
            let Some(p) = self
                .0
                .hub
                .prepare(recipients, |id| wire::with_id(&template, id))
            else {
                return Err(StreamError::Failed("no recipients".into()));
            };
            let id = p.frame.id.to_string();
            if !self.0.store_and_deliver(vec![p], None).await {
                return Err(StreamError::Stopped);
            }
            Ok(id)
        })
    }
}

/// Most stream messages stored in one transaction.
const FOLLOW_BATCH: usize = 512;

/// A cluster node's gateway: reads the stream from after this node's head, stores and
/// delivers every event, until shutdown. `/readyz` says `catching up` until the node has
/// what the stream held when it started (`caught_up` is set then). Returns an error when
/// the stream was deleted or recreated: this node's ids are then of another epoch.
pub async fn follow(
    nats: Nats,
    deliver: Deliver,
    checkpoint: Option<u64>,
    caught_up: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), ClusterError> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    use std::sync::atomic::Ordering;

    let hub = Arc::clone(&deliver.hub);
    let (epoch, first, last) = loop {
        match nats.state().await {
            Ok(state) => break state,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot read the stream's state; retrying");
                tokio::select! {
                    _ = deliver.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    if epoch != hub.epoch() {
        return Err(ClusterError(format!(
            "the stream's epoch changed ({} → {epoch}) before this node started reading it",
            hub.epoch()
        )));
    }
    // Where this node's history stands in the stream: the last message it stored or
    // passed (marks and gaps are not events, but were read).
    let mut head = hub.head().max(hub.floor_seq()).max(checkpoint.unwrap_or(0));
    // Events the stream no longer has (its max age) and this node never stored: resuming
    // from before them is a gap.
    if first > head + 1 && last > 0 {
        let floor = first - 1;
        tracing::warn!(
            head,
            first,
            "cluster: the stream no longer holds events this node never read; \
             clients resuming from before {floor} get gap"
        );
        hub.expire(floor);
        if let Some(store) = hub.store().cloned()
            && !deliver
                .persist("history floor", move || store.set_floor(floor))
                .await
        {
            return Ok(());
        }
        head = floor;
    }
    let target = last;
    hub.stream_holds(last);
    let lag = metrics::gauge!("changecast_cluster_stream_lag");
    let redelivered = metrics::counter!("changecast_cluster_redeliveries_total");
    let catching_up =
        |behind: u64| format!("cluster: catching up on the stream ({behind} events behind)");
    if head < target {
        deliver
            .health
            .down(Component::CatchUp, catching_up(target - head));
    } else {
        caught_up.store(true, Ordering::Release);
        deliver.health.up(Component::CatchUp);
    }
    tracing::info!(from = head + 1, target, epoch = %epoch, "cluster: reading the stream");
    // The ordered consumer is ephemeral: a restarted NATS server forgets it, and the
    // client notices only after missed heartbeats. A reconnect starts a new one at once.
    let open = |from: u64| {
        let stream = nats.stream.clone();
        async move {
            stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::new("cannot read the stream", e))?
                .messages()
                .await
                .map_err(|e| ClusterError::new("cannot read the stream", e))
        }
    };
    let stats = nats.client.statistics();
    let mut connects = stats.connects.load(Ordering::Relaxed);
    let mut messages = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut audiences = wire::Audiences::default();
    loop {
        let reconnected = stats.connects.load(Ordering::Relaxed);
        if reconnected != connects {
            connects = reconnected;
            tracing::info!(
                from = head + 1,
                "cluster: reconnected to NATS; reading the stream again"
            );
            messages = None;
        }
        let stream = match &mut messages {
            Some(m) => m,
            None => match open(head + 1).await {
                Ok(m) => messages.insert(m),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: retrying");
                    tokio::select! {
                        _ = deliver.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let first = tokio::select! {
            _ = deliver.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => continue,
            m = stream.next() => m,
        };
        let mut batch = match first {
            Some(Ok(m)) => vec![m],
            Some(Err(e)) => {
                // The ordered consumer recreates itself; say what happened and go on.
                tracing::warn!(error = %e, "cluster: reading the stream failed; retrying");
                continue;
            }
            None => {
                messages = None;
                continue;
            }
        };
        // Whatever else has arrived goes into the same transaction.
        while batch.len() < FOLLOW_BATCH {
            match futures_util::FutureExt::now_or_never(stream.next()) {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let mut prepared = Vec::with_capacity(batch.len());
        let mut pending = 0;
        for m in &batch {
            let Ok(info) = m.info() else {
                tracing::warn!("cluster: a stream message without metadata; skipped");
                continue;
            };
            let seq = info.stream_sequence;
            pending = info.pending;
            hub.stream_holds(seq + pending);
            if seq <= head {
                redelivered.increment(1);
                continue;
            }
            if seq > head + 1 {
                // Sequences are contiguous: messages this node never read left the stream
                // (its max age passed while the node was away). Its clients are told, as
                // when the source loses changes.
                tracing::warn!(
                    from = head + 1,
                    to = seq - 1,
                    "cluster: stream messages expired before this node read them; clients get gap"
                );
                metrics::counter!("changecast_cluster_missed_total").increment(seq - head - 1);
                if !deliver.lost_after(&mut prepared, head).await {
                    return Ok(());
                }
            }
            head = seq;
            match Kind::of_subject(&m.subject) {
                Some(Kind::Change | Kind::Alert | Kind::Message) => {
                    match wire::parse_with(&m.payload, &mut audiences) {
                        Ok((recipients, template)) => {
                            if let Some(p) =
                                hub.prepare_at(seq, recipients, |id| wire::with_id(template, id))
                            {
                                prepared.push(p);
                            }
                        }
                        Err(e) => {
                            metrics::counter!("changecast_cluster_skipped_total").increment(1);
                            tracing::warn!(seq, error = %e, "cluster: a malformed stream message; skipped");
                        }
                    }
                }
                Some(Kind::Gap) => {
                    // Everything before it first, then the gap, in stream order.
                    if !deliver
                        .lost_after(&mut prepared, seq.saturating_sub(1))
                        .await
                    {
                        return Ok(());
                    }
                }
                Some(Kind::Mark) => {}
                None => {
                    metrics::counter!("changecast_cluster_skipped_total").increment(1);
                    tracing::warn!(seq, subject = %m.subject, "cluster: a message on an unknown subject; skipped");
                }
            }
        }
        if !deliver
            .store_and_deliver(prepared, Some(Position::from_seq(head)))
            .await
        {
            return Ok(());
        }
        lag.set(pending as f64);
        if !caught_up.load(Ordering::Acquire) {
            if head >= target {
                tracing::info!(head, "cluster: caught up with the stream");
                caught_up.store(true, Ordering::Release);
                deliver.health.up(Component::CatchUp);
            } else {
                deliver
                    .health
                    .down(Component::CatchUp, catching_up(target - head));
            }
        }
    }
}
