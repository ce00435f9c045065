//! The router lease: which node reads the source and publishes to the stream.
//!
//! In: the lease bucket (its `max_age` is the TTL) and this node's name. Out: a held lease
//! ([`Lease::acquire`]) and a task that renews it ([`Lease::keep`]) and cancels the
//! routing term before the lease can lapse.
//!
//! - Take: create-if-absent on the key `router`; the holder's name is the value.
//! - Renew: every TTL/4, compare-and-set on the revision the last write returned.
//! - Valid until: the send time of the last successful write plus TTL/2. The server lets
//!   the key lapse no earlier than TTL after it received that write, so the router stops
//!   at least TTL/2 before anyone else can take over: two routers never publish at once
//!   (and if a stalled one still did, message ids make its output a duplicate).
//! - Release on a clean end (shutdown, the source failed): a standby takes over at once.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::kv;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ClusterError;

const KEY: &str = "router";

/// The lease bucket, seen from one node.
#[derive(Clone)]
pub struct Lease {
    kv: kv::Store,
    name: String,
    ttl: Duration,
}

/// A lease this node holds.
pub struct Held {
    revision: u64,
    valid_until: Mutex<Instant>,
}

impl Held {
    /// Whether the lease is still certainly ours.
    pub fn valid(&self) -> bool {
        Instant::now()
            < *self
                .valid_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
    }

    fn extend(&self, until: Instant) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }

    fn until(&self) -> Instant {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Lease {
    pub fn new(kv: kv::Store, name: &str, ttl: Duration) -> Lease {
        Lease {
            kv,
            name: name.to_owned(),
            ttl,
        }
    }

    /// How often a standby tries to take the lease.
    pub fn poll_interval(&self) -> Duration {
        (self.ttl / 8).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// Takes the lease if nobody holds it: `Ok(None)` when another node does.
    pub async fn acquire(&self) -> Result<Option<Held>, ClusterError> {
        let sent = Instant::now();
        match self.kv.create(KEY, self.name.clone().into()).await {
            Ok(revision) => Ok(Some(Held {
                revision,
                valid_until: Mutex::new(sent + self.ttl / 2),
            })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(ClusterError::new("lease", e)),
        }
    }

    /// The node holding the lease now, if any.
    pub async fn holder(&self) -> Result<Option<String>, ClusterError> {
        let value = self
            .kv
            .get(KEY)
            .await
            .map_err(|e| ClusterError::new("lease", e))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Renews `held` until `term` ends; cancels `term` when the lease could not be renewed
    /// in time or was taken. Returns the last revision, for [`Lease::release`].
    pub async fn keep(&self, held: &Held, term: &CancellationToken) -> u64 {
        let mut revision = held.revision;
        let every = self.ttl / 4;
        let mut next = Instant::now() + every;
        loop {
            let deadline = held.until();
            tokio::select! {
                _ = term.cancelled() => return revision,
                _ = tokio::time::sleep_until(next.min(deadline)) => {}
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    "cluster: the router lease could not be renewed in time; this node stops routing"
                );
                term.cancel();
                return revision;
            }
            let sent = Instant::now();
            let renewed = tokio::time::timeout_at(
                deadline,
                self.kv.update(KEY, self.name.clone().into(), revision),
            )
            .await;
            match renewed {
                Ok(Ok(r)) => {
                    revision = r;
                    held.extend(sent + self.ttl / 2);
                    next = sent + every;
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::error!(
                        "cluster: the router lease was taken by another node; this node stops routing"
                    );
                    term.cancel();
                    return revision;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cluster: renewing the router lease failed; retrying");
                    next = Instant::now() + Duration::from_millis(100);
                }
                Err(_) => {} // the deadline: handled at the top of the loop
            }
        }
    }

    /// Gives the lease up (best effort): a standby takes over without waiting for the TTL.
    pub async fn release(&self, revision: u64) {
        let done = tokio::time::timeout(
            Duration::from_secs(2),
            self.kv.delete_expect_revision(KEY, Some(revision)),
        )
        .await;
        match done {
            Ok(Ok(())) => tracing::info!("cluster: router lease released"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cluster: releasing the router lease failed; it lapses after its TTL")
            }
            Err(_) => tracing::warn!(
                "cluster: releasing the router lease timed out; it lapses after its TTL"
            ),
        }
    }
}
