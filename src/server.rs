//! The running gateway: wires source → router → hub → transports, and stops them in order.
//!
//! In: a [`Plan`] and a bound listener. Out: a [`Running`] handle with the address, the
//! hub, and `stop()`.
//!
//! Tasks: the source (one blocking thread for SQLite) feeds batches on a bounded channel to
//! the one router task, which resolves recipients, publishes to the hub and then
//! acknowledges the batch's end position back to the source for checkpointing. Each client
//! connection is one task (see `transport`). Shutdown is one [`CancellationToken`]: the
//! source stops reading, the router drains what was read, the source writes its last
//! checkpoint, every client gets 1012, and the listener closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;

use axum::serve::ListenerExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::change::{Position, UserId};
use crate::config::ServerConfig;
use crate::config::{HistoryConfig, HistoryKind};
use crate::event::ServerEvent;
use crate::hub::Prepared;
use crate::hub::new_epoch;
use crate::hub::store::{HistoryStore, Record};
use crate::hub::{Hub, HubConfig};
use crate::plan::{Plan, SourcePlan};
use crate::route::Router;
use crate::source::mongodb::MongoSource;
use crate::source::sqlite::{SqliteLookup, SqliteSource};
use crate::source::{Batch, Health, Lookup, Source};

/// Batches in flight between the source and the router: enough to keep both busy, small
/// enough that a stalled router stops the source from reading ahead.
const BATCH_QUEUE: usize = 4;

/// What every request handler and connection task shares.
pub struct App {
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub server: ServerConfig,
    /// Fires once, when the gateway stops.
    pub shutdown: CancellationToken,
    /// Set when the source task has ended.
    pub source_stopped: AtomicBool,
    /// The source's own account of whether it is delivering.
    pub health: Arc<Health>,
    /// Messages for the router from `POST /v1/publish`.
    pub publish: mpsc::Sender<PublishRequest>,
    /// API keys accepted by `POST /v1/publish`.
    pub publish_keys: Vec<String>,
    /// How long before a token expires its connection is warned.
    pub expiry_warning: Duration,
    pub metrics: PrometheusHandle,
}

/// The process-wide Prometheus recorder (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (an embedding application's);
            // then its recorder gets the metrics and /metrics shows ours empty.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// A started gateway.
pub struct Running {
    pub local_addr: SocketAddr,
    pub app: Arc<App>,
    tasks: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops the gateway and waits until the last checkpoint is written.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.app.shutdown.cancel();
        self.tasks.await?
    }

    /// Waits until the gateway stops by itself (a fatal source error) or `stop` is called
    /// through `app.shutdown`.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.tasks.await?
    }
}

/// Opens the source and starts every task. `extra` routes (the demo page) are merged into
/// the HTTP router.
pub async fn start(
    plan: Plan,
    listener: TcpListener,
    extra: Option<axum::Router>,
) -> anyhow::Result<Running> {
    let local_addr = listener.local_addr()?;
    // Installed before anything resolves its metric handles.
    let metrics = metrics_handle();
    // The durable history, first: its checkpoint is where the source resumes, because it
    // was committed together with the events it covers.
    let history = match plan.history.store {
        HistoryKind::Sqlite => {
            let path = plan.history.path.clone();
            let opened = tokio::task::spawn_blocking(move || HistoryStore::open(&path, new_epoch))
                .await?
                .with_context(|| {
                    format!("cannot open the history at {}", plan.history.path.display())
                })?;
            tracing::info!(
                path = %plan.history.path.display(), epoch = %opened.epoch, head = opened.head,
                "history open"
            );
            Some(opened)
        }
        HistoryKind::Memory => None,
    };
    let resume_from = history.as_ref().and_then(|h| h.checkpoint.clone());
    let (source, lookup): (Box<dyn Source>, Arc<dyn Lookup>) = match &plan.source {
        SourcePlan::Sqlite(config) => {
            let watched: Vec<String> = plan.watched().into_keys().collect();
            let config = config.clone();
            let config_json_columns = config.json_columns.clone();
            let from = resume_from.clone();
            let source =
                tokio::task::spawn_blocking(move || SqliteSource::open(&config, &watched, from))
                    .await??;
            tracing::info!(
                path = %source.path().display(),
                checkpoint = source.checkpoint(),
                "sqlite source open"
            );
            let lookup = Arc::new(SqliteLookup::with_json_columns(
                source.path(),
                &config_json_columns,
            ));
            (Box::new(source), lookup)
        }
        SourcePlan::Mongodb(config) => {
            let from = resume_from.map(|p| p.0);
            let source = MongoSource::connect(config, plan.stream_spec(config), from).await?;
            tracing::info!(database = %config.database, "mongodb source open");
            let lookup = Arc::new(source.lookup());
            (Box::new(source), lookup)
        }
    };
    let health = Arc::new(Health::default());

    let hub_config = HubConfig {
        history_per_user: match &history {
            Some(_) => plan.history.memory_per_user.min(plan.history.max_per_user),
            None => plan.history.max_per_user,
        },
        queue_capacity: plan.server.send_queue,
        queue_bytes: plan.server.send_queue_bytes,
        max_connections: plan.server.max_connections,
        max_connections_per_user: plan.server.max_connections_per_user,
    };
    let hub = Arc::new(match &history {
        Some(opened) => Hub::durable(opened, hub_config),
        None => Hub::new(hub_config),
    });
    let shutdown = CancellationToken::new();
    // Publishing waits for the router; a small queue bounds how many wait.
    let (publish_tx, publish_rx) = mpsc::channel(64);
    let publish_keys = plan.publish_keys.clone();
    let auth = plan
        .auth
        .build(Arc::clone(&lookup))
        .await
        .map_err(anyhow::Error::msg)?;
    let app = Arc::new(App {
        hub: Arc::clone(&hub),
        auth,
        server: plan.server.clone(),
        shutdown: shutdown.clone(),
        source_stopped: AtomicBool::new(false),
        health: Arc::clone(&health),
        metrics,
        publish: publish_tx,
        publish_keys,
        expiry_warning: plan.expiry_warning,
    });
    let router = Router::new(plan.routes, plan.alerts, lookup, plan.lookups.cache_entries);

    let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
    let (ack_tx, ack_rx) = watch::channel(None);
    let source_task = tokio::spawn(source.run(batch_tx, ack_rx, health, shutdown.clone()));
    let router_task = tokio::spawn(route_changes(
        batch_rx,
        publish_rx,
        router,
        Arc::clone(&hub),
        ack_tx,
        Arc::clone(&app),
    ));
    if hub.store().is_some() {
        tokio::spawn(prune(
            Arc::clone(&hub),
            plan.history.clone(),
            shutdown.clone(),
        ));
    }

    let http = crate::transport::router(Arc::clone(&app));
    let http = match extra {
        Some(extra) => http.merge(extra),
        None => http,
    };
    let serve_shutdown = shutdown.clone();
    let send_buffer = plan.server.socket_send_buffer;
    let listener = listener.tap_io(move |tcp: &mut tokio::net::TcpStream| {
        if send_buffer > 0
            && let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(send_buffer)
        {
            tracing::debug!("SO_SNDBUF not set: {e}");
        }
    });
    let http_task = tokio::spawn(async move {
        axum::serve(listener, http)
            .with_graceful_shutdown(async move { serve_shutdown.cancelled().await })
            .await
    });

    let app2 = Arc::clone(&app);
    let tasks = tokio::spawn(async move {
        // The source ends on shutdown, or by itself on a fatal error: then stop everything.
        let source_result = source_task.await;
        app2.source_stopped.store(true, Ordering::Release);
        let source_result: anyhow::Result<()> = match source_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("source failed: {e}")),
            Err(e) => Err(anyhow::anyhow!("source task failed: {e}")),
        };
        if let Err(e) = &source_result {
            tracing::error!("{e:#}; stopping");
        }
        app2.shutdown.cancel();
        router_task.await?;
        http_task.await??;
        source_result
    });
    Ok(Running {
        local_addr,
        app,
        tasks,
    })
}

/// A message for `POST /v1/publish`, stored and delivered by the router like routed
/// events (one writer keeps ids in order); `done` gets the event's id.
pub struct PublishRequest {
    pub to: Vec<String>,
    pub event: serde_json::Value,
    pub done: oneshot::Sender<String>,
}

/// The router task: every change of a batch is routed, stored with the batch's end
/// position in one transaction, then delivered; only then is the position acknowledged to
/// the source. Published messages take the same path. With the in-memory history the
/// store step is skipped.
async fn route_changes(
    mut batches: mpsc::Receiver<Batch>,
    mut publishes: mpsc::Receiver<PublishRequest>,
    router: Router,
    hub: Arc<Hub>,
    acks: watch::Sender<Option<Position>>,
    app: Arc<App>,
) {
    loop {
        let batch = tokio::select! {
            // Changes first: they hold the source's checkpoint back.
            biased;
            batch = batches.recv() => match batch {
                Some(b) => b,
                None => return, // the source stopped: shutdown
            },
            Some(req) = publishes.recv() => {
                let mut sorted = req.to;
                sorted.sort();
                sorted.dedup();
                let sorted = sorted.into_iter().map(UserId::from).collect();
                if let Some(p) = hub.prepare(sorted, |id| ServerEvent::Message { id, event: &req.event }.to_json()) {
                    let id = p.frame.id.to_string();
                    if !store_and_deliver(&app, &hub, vec![p], None).await {
                        return; // shutting down with the store failing: the publisher gets 503
                    }
                    let _ = req.done.send(id);
                }
                continue;
            }
        };
        if batch.lost_history {
            let floor = hub.history_lost();
            if let Some(store) = hub.store().cloned()
                && !persist(&app, "history floor", move || store.set_floor(floor)).await
            {
                return;
            }
        }
        let mut prepared = Vec::new();
        for change in &batch.changes {
            for mut d in router.route(change).await {
                let recipients = std::mem::take(&mut d.recipients);
                if let Some(p) = hub.prepare(recipients, |id| d.encode(id, change)) {
                    prepared.push(p);
                }
            }
        }
        if !store_and_deliver(&app, &hub, prepared, Some(batch.end.clone())).await {
            // Not stored, so not delivered and not acknowledged: the source reads these
            // changes again after the restart.
            return;
        }
        acks.send_replace(Some(batch.end));
    }
}

/// Stores prepared events (and the source position they bring the history to), then
/// delivers them. False when the store kept failing until shutdown: nothing delivered.
async fn store_and_deliver(
    app: &App,
    hub: &Hub,
    prepared: Vec<Prepared>,
    end: Option<Position>,
) -> bool {
    let prepared = Arc::new(prepared);
    if let Some(store) = hub.store().cloned() {
        let events = Arc::clone(&prepared);
        if !persist(app, "history append", move || {
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
        hub.deliver(p);
    }
    true
}

/// Runs a store write on a blocking thread until it succeeds: an event is never delivered
/// before it is stored, and never dropped. While it fails, `/readyz` says why. Gives up
/// (false) only when the gateway is shutting down.
async fn persist<F>(app: &App, what: &'static str, write: F) -> bool
where
    F: Fn() -> rusqlite::Result<()> + Send + Sync + 'static,
{
    let write = Arc::new(write);
    let mut delay = Duration::from_millis(100);
    loop {
        let w = Arc::clone(&write);
        match tokio::task::spawn_blocking(move || w()).await {
            Ok(Ok(())) => {
                if app
                    .health
                    .problem()
                    .is_some_and(|p| p.starts_with("history"))
                {
                    app.health.up();
                }
                return true;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "{what} failed; retrying");
                app.health.down(format!("history: {what} failed: {e}"));
            }
            Err(e) => tracing::error!(error = %e, "{what} task failed; retrying"),
        }
        metrics::counter!("changecast_history_errors_total").increment(1);
        if app.shutdown.is_cancelled() {
            tracing::error!(
                "{what}: giving up on shutdown; the source re-reads these changes on restart"
            );
            return false;
        }
        tokio::select! {
            _ = app.shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Applies retention every `prune_interval` until shutdown.
async fn prune(hub: Arc<Hub>, config: HistoryConfig, shutdown: CancellationToken) {
    let Some(store) = hub.store().cloned() else {
        return;
    };
    let mut tick = tokio::time::interval(config.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = Arc::clone(&store);
        let (age, per_user) = (config.max_age, config.max_per_user);
        match tokio::task::spawn_blocking(move || {
            s.prune(age, per_user).and_then(|p| Ok((p, s.len()?)))
        })
        .await
        {
            Ok(Ok((pruned, len))) => {
                metrics::counter!("changecast_history_pruned_total").increment(pruned.events);
                metrics::gauge!("changecast_history_events").set(len as f64);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "history: pruning failed"),
            Err(e) => tracing::warn!(error = %e, "history: pruning task failed"),
        }
    }
}
