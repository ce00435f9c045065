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

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::change::Position;
use crate::config::ServerConfig;
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
    let (source, lookup): (Box<dyn Source>, Arc<dyn Lookup>) = match &plan.source {
        SourcePlan::Sqlite(config) => {
            let watched: Vec<String> = plan.watched().into_keys().collect();
            let config = config.clone();
            let source = tokio::task::spawn_blocking(move || SqliteSource::open(&config, &watched))
                .await??;
            tracing::info!(
                path = %source.path().display(),
                checkpoint = source.checkpoint(),
                "sqlite source open"
            );
            let lookup = Arc::new(SqliteLookup::new(source.path()));
            (Box::new(source), lookup)
        }
        SourcePlan::Mongodb(config) => {
            let source = MongoSource::connect(config, plan.stream_spec(config)).await?;
            tracing::info!(database = %config.database, "mongodb source open");
            let lookup = Arc::new(source.lookup());
            (Box::new(source), lookup)
        }
    };
    let health = Arc::new(Health::default());

    let hub = Arc::new(Hub::new(HubConfig {
        history_per_user: plan.history.max_per_user,
        queue_capacity: plan.server.send_queue,
    }));
    let shutdown = CancellationToken::new();
    let app = Arc::new(App {
        hub: Arc::clone(&hub),
        auth: plan.auth.build(Arc::clone(&lookup)),
        server: plan.server.clone(),
        shutdown: shutdown.clone(),
        source_stopped: AtomicBool::new(false),
        health: Arc::clone(&health),
        metrics,
    });
    let router = Router::new(plan.routes, plan.alerts, lookup, plan.lookups.cache_entries);

    let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
    let (ack_tx, ack_rx) = watch::channel(None);
    let source_task = tokio::spawn(source.run(batch_tx, ack_rx, health, shutdown.clone()));
    let router_task = tokio::spawn(route_changes(batch_rx, router, hub, ack_tx));

    let http = crate::transport::router(Arc::clone(&app));
    let http = match extra {
        Some(extra) => http.merge(extra),
        None => http,
    };
    let serve_shutdown = shutdown.clone();
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

/// The router task: every change of every batch is routed and published before the batch's
/// end position is acknowledged.
async fn route_changes(
    mut batches: mpsc::Receiver<Batch>,
    router: Router,
    hub: Arc<Hub>,
    acks: watch::Sender<Option<Position>>,
) {
    while let Some(batch) = batches.recv().await {
        if batch.lost_history {
            hub.history_lost();
        }
        for change in &batch.changes {
            for d in router.route(change).await {
                hub.publish(&d.recipients, |id| d.encode(id, change));
            }
        }
        acks.send_replace(Some(batch.end));
    }
}
