//! Lookups that wait out an unavailable database instead of skipping deliveries.
//!
//! In: the routing loop's lookups. Out: the source's answers, after as many retries as
//! the database needs to come back.
//!
//! A lookup fails in one of two ways ([`LookupError`]): the query itself is wrong for the
//! data (a type mismatch, a table gone), and the rule skips that delivery, counted; or the
//! database cannot be reached now (`Unavailable`: the connection refused or lost, the
//! server restarting), and skipping would drop events that are fine. [`Patient`] retries
//! those with backoff (50 ms doubling to 5 s, with jitter) until the database answers,
//! while `/readyz` names the collection and the error. The router waits meanwhile, so the
//! source's checkpoint waits too: nothing is acknowledged that was not routed.
//!
//! On shutdown a waiting lookup gives up, and [`Patient::gave_up`] says so: the routing
//! loop then stops without storing or acknowledging the batch it was routing, which the
//! source reads again after the restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Component, Health, Lookup, LookupError, Query, retry_backoff};

/// The routing loop's lookups: see the module doc.
pub struct Patient {
    inner: Arc<dyn Lookup>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    gave_up: Arc<AtomicBool>,
}

impl Patient {
    pub fn new(inner: Arc<dyn Lookup>, health: Arc<Health>, shutdown: CancellationToken) -> Self {
        Patient {
            inner,
            health,
            shutdown,
            gave_up: Arc::default(),
        }
    }

    /// Set once a lookup stopped waiting because of shutdown: what the router was routing
    /// then is incomplete and must not be stored.
    pub fn gave_up(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.gave_up)
    }
}

impl Lookup for Patient {
    fn find(&self, query: Query) -> BoxFuture<'_, Result<Vec<Value>, LookupError>> {
        Box::pin(async move {
            let mut delays = retry_backoff();
            let mut waited = false;
            loop {
                let error = match self.inner.find(query.clone()).await {
                    Ok(docs) => {
                        if waited {
                            tracing::info!(collection = %query.collection,
                                "lookups answer again");
                            self.health.up(Component::Lookups);
                        }
                        return Ok(docs);
                    }
                    Err(e @ LookupError::Failed { .. }) => return Err(e),
                    Err(e @ LookupError::Unavailable { .. }) => e,
                };
                if !waited {
                    tracing::warn!(error = %error,
                        "lookup: the database cannot be reached; routing waits until it answers");
                }
                waited = true;
                self.health
                    .down(Component::Lookups, format!("lookups: {error}"));
                metrics::counter!("changecast_lookup_retries_total",
                    "collection" => query.collection.clone())
                .increment(1);
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = self.shutdown.cancelled() => {
                        self.gave_up.store(true, Ordering::Release);
                        return Err(error);
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        })
    }

    fn document<'a>(
        &'a self,
        collection: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, LookupError>> {
        self.inner.document(collection, key)
    }
}
