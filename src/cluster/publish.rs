//! The cluster's stream, seen from a writer: the router's batches and the publish API's
//! messages become JetStream messages (format: [`super::wire`]).
//!
//! In: [`RoutedBatch`]es from the router (only while this node holds the lease) and
//! published messages (any node). Out: messages on the stream, each acknowledged by
//! JetStream before the batch counts as appended; the source position to acknowledge.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::Nats;
use super::lease::Held;
use super::wire::{self, Kind};
use crate::change::{Position, Recipients};
use crate::router::{EventStream, RoutedBatch, StreamError};

/// A batch without events still records its position (a `mark`), but at most this often:
/// the changes since the last mark are re-read after a failover and make no events, while
/// the source keeps its change log from that mark on.
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Writes to the stream.
pub struct Publisher {
    nats: Nats,
    /// The router's lease: appends are refused once it is not certainly held. `None` for
    /// a publisher of published messages only.
    held: Option<Arc<Held>>,
    last_mark: Mutex<Option<Instant>>,
}

impl Publisher {
    pub fn new(nats: Nats, held: Option<Arc<Held>>) -> Publisher {
        Publisher {
            nats,
            held,
            last_mark: Mutex::new(None),
        }
    }

    async fn send(&self, messages: Vec<(Kind, HeaderMap, Bytes)>) -> Result<u64, StreamError> {
        let mut acks = Vec::with_capacity(messages.len());
        // One connection, one task: JetStream numbers them in this order.
        for (kind, headers, payload) in messages {
            let ack = self
                .nats
                .js
                .publish_with_headers(self.nats.names.subject(kind), headers, payload)
                .await
                .map_err(|e| StreamError::Failed(format!("publish to the stream: {e}")))?;
            acks.push(std::future::IntoFuture::into_future(ack));
        }
        // Awaited together: each ack has its own timeout, and a partition must not cost
        // one timeout per message.
        let acks = futures_util::future::try_join_all(acks)
            .await
            .map_err(|e| StreamError::Failed(format!("the stream did not take an event: {e}")))?;
        Ok(acks.last().map_or(0, |a| a.sequence))
    }
}

impl EventStream for Publisher {
    fn append(&self, batch: RoutedBatch) -> BoxFuture<'_, Result<Option<Position>, StreamError>> {
        Box::pin(async move {
            let Some(held) = &self.held else {
                return Err(StreamError::LostLease);
            };
            if !held.valid() {
                return Err(StreamError::LostLease);
            }
            let end_hex = wire::hex(&batch.end);
            let start = batch.start.as_ref().map(wire::hex);
            let mut messages: Vec<(Kind, HeaderMap, Bytes)> = Vec::new();
            if batch.lost_history {
                // Named by where reading started: a router that starts there again finds
                // the same loss, and the same message id.
                let mut h = HeaderMap::new();
                let at = start.as_deref().unwrap_or("start");
                h.insert("Nats-Msg-Id", format!("{at}:gap").as_str());
                messages.push((Kind::Gap, h, Bytes::new()));
            }
            for e in &batch.events {
                let mut h = HeaderMap::new();
                let tag = if e.kind == Kind::Alert { "a" } else { "c" };
                h.insert(
                    "Nats-Msg-Id",
                    format!("{}:{tag}:{}", wire::hex(&e.position), e.rule).as_str(),
                );
                if let Some(key) = &e.key {
                    h.insert(wire::ALERT, &*e.rule);
                    h.insert(wire::KEY, key.as_str());
                }
                messages.push((e.kind, h, wire::payload(&e.recipients, &e.template)));
            }
            let now = Instant::now();
            if messages.is_empty() {
                let mut last = self
                    .last_mark
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if last.is_some_and(|t| now.duration_since(t) < MARK_EVERY) {
                    return Ok(None);
                }
                *last = Some(now);
                drop(last);
                let mut h = HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("{end_hex}:mark").as_str());
                messages.push((Kind::Mark, h, Bytes::new()));
            }
            // Re-reading from `start` reproduces a message and all after it; from `end`,
            // only what follows the last one.
            let n = messages.len();
            for (i, (_, h, _)) in messages.iter_mut().enumerate() {
                if i + 1 == n {
                    h.insert(wire::RESUME, end_hex.as_str());
                } else if let Some(s) = &start {
                    h.insert(wire::RESUME, s.as_str());
                }
            }
            self.send(messages).await?;
            *self
                .last_mark
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(now);
            Ok(Some(batch.end))
        })
    }

    fn publish(
        &self,
        recipients: Recipients,
        template: String,
    ) -> BoxFuture<'_, Result<String, StreamError>> {
        Box::pin(async move {
            let payload = wire::payload(&recipients, &template);
            let seq = self
                .send(vec![(Kind::Message, HeaderMap::new(), payload)])
                .await?;
            Ok(format!("{}-{seq}", self.nats.epoch))
        })
    }
}

/// Where a new router resumes the source: the [`wire::RESUME`] position of the newest
/// routed message (the publish API's messages carry none). `None`: the stream has no
/// routed message; the source starts from its own checkpoint.
pub async fn resume_position(nats: &Nats) -> Result<Option<Position>, super::ClusterError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let mut newest: Option<(u64, Option<Position>)> = None;
    for kind in [Kind::Change, Kind::Alert, Kind::Gap, Kind::Mark] {
        match nats
            .stream
            .get_last_raw_message_by_subject(&nats.names.subject(kind))
            .await
        {
            Ok(m) => {
                if newest.as_ref().is_none_or(|(seq, _)| m.sequence > *seq) {
                    let p = m
                        .headers
                        .get(wire::RESUME)
                        .and_then(|v| wire::unhex(v.as_str()));
                    newest = Some((m.sequence, p));
                }
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => {
                return Err(super::ClusterError::new(
                    "reading the stream's last position",
                    e,
                ));
            }
        }
    }
    Ok(newest.and_then(|(_, p)| p))
}

/// The alerts that fired within `window`, newest last: (alert name, document key, how long
/// ago). A new router restores its cooldown clocks from them, so a failover neither repeats
/// an alert inside its cooldown nor needs a second store.
pub async fn recent_alerts(
    nats: &Nats,
    window: Duration,
) -> Result<Vec<(String, String, Duration)>, super::ClusterError> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    use futures_util::StreamExt;
    let now = time_now();
    let start_time = now - window;
    let consumer = nats
        .stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: nats.names.subject(Kind::Alert),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| super::ClusterError::new("reading recent alerts", e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| super::ClusterError::new("reading recent alerts", e))?;
    let mut out = Vec::new();
    // No message within the wait: there are none (an ordered consumer never ends by itself).
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let Ok(info) = m.info() else { break };
        let pending = info.pending;
        let ago = (now - info.published).unsigned_abs();
        if let Some(h) = &m.headers
            && let (Some(name), Some(key)) = (h.get(wire::ALERT), h.get(wire::KEY))
        {
            out.push((name.to_string(), key.to_string(), ago));
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

fn time_now() -> async_nats::datetime::DateTime {
    async_nats::datetime::DateTime::now_utc()
}
