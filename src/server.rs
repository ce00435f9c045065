//! The running gateway: wires source → router → stream → gateway → transports, and stops
//! them in order.
//!
//! In: a [`Plan`] and a bound listener. Out: a [`Running`] handle with the address, the
//! hub, and `stop()`.
//!
//! One process (no `[cluster]`): the source (one blocking thread for SQLite) feeds batches
//! on a bounded channel to the one router task ([`router`]), whose stream is in-process
//! ([`Local`]: numbered by the hub, stored, delivered); the batch's end position is then
//! acknowledged back to the source for checkpointing.
//!
//! A cluster node (`[cluster]`): the same router runs only while this node holds the lease
//! ([`lead`]), and its stream is the JetStream stream ([`Publisher`]); every node's gateway
//! ([`gateway::follow`]) reads that stream into its own history and connections.
//!
//! Each client connection is one task (see `transport`). Shutdown is one
//! [`CancellationToken`]: the source stops reading, the router drains what was read, the
//! source writes its last checkpoint, every client gets 1012, and the listener closes.
//!
//! Supervision: every long-running task (source, router, gateway, pruning, HTTP, the JWKS
//! refresh) runs under a [`Supervisor`]. One that ends before shutdown — a panic, an error
//! or a plain return — is logged, counted (`changecast_task_failures_total{task}`) and
//! makes `/readyz` answer 503 with its reason until the process restarts; it never
//! vanishes. The pipeline's tasks (source and router; in a cluster the gateway, the router
//! role and the monitor) stop the gateway when one ends.
//!
//! Readiness: besides dead tasks, each component that can fail and recover — the source,
//! the history store (`persist`), pruning, NATS, catching up — sets and clears its own
//! problem in [`Health`]; `/readyz` is ready only when none is set, and names them all.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use anyhow::Context;

use futures_util::FutureExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::change::Position;
use crate::cluster::lease::Lease;
use crate::cluster::publish::{self, Publisher};
use crate::cluster::{self, Nats};
use crate::config::ServerConfig;
use crate::config::{HistoryConfig, HistoryKind};
use crate::gateway::{self, Deliver, Local};
use crate::hub::new_epoch;
use crate::hub::store::{HistoryStore, Opened};
use crate::hub::{Hub, HubConfig};
use crate::plan::{Plan, SourcePlan};
use crate::router::{self, EventStream, PublishRequest, StreamError};
use crate::source::mongodb::MongoSource;
use crate::source::sqlite::{SqliteLookup, SqliteSource};
use crate::source::{Component, Health, Lookup, Source, SourceError};

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
    /// What is failing now, by component (the source, the history store, pruning): a
    /// `/readyz` reason each, cleared when that component works again.
    pub health: Arc<Health>,
    /// Messages for the router from `POST /v1/publish`.
    pub publish: mpsc::Sender<PublishRequest>,
    /// API keys accepted by `POST /v1/publish`.
    pub publish_keys: Vec<String>,
    /// How long before a token expires its connection is warned.
    pub expiry_warning: Duration,
    pub metrics: PrometheusHandle,
    /// The background tasks' account: a task that died is a `/readyz` reason.
    pub tasks: Arc<Supervisor>,
    /// A cluster node's link to the stream.
    pub nats: Option<Nats>,
    /// `GET /v1/admin/explain`: the plan's rules on a router of their own (a dry run that
    /// never touches the routing task's cache or cooldowns).
    pub explain: Arc<crate::explain::Explainer>,
    /// Holds busy WebSocket connections to one write per `server.write_delay`.
    pub pacer: Option<Arc<crate::transport::pacer::Pacer>>,
}

impl App {
    /// Before a client resumes on a cluster node: when its `since` is newer than anything
    /// this node has seen of the stream (it came from a node a few milliseconds ahead),
    /// asks the stream how far it reaches, so the resume is honoured instead of a `gap`.
    pub async fn learn_stream_head(&self, since: Option<&str>) {
        let (Some(nats), Some(since)) = (&self.nats, since) else {
            return;
        };
        match self.hub.seq_of(since) {
            Some(seq) if seq > self.hub.known() => {}
            _ => return,
        }
        if let Ok(Ok((_, _, last))) =
            tokio::time::timeout(Duration::from_secs(2), nats.state()).await
        {
            self.hub.stream_holds(last);
        }
    }
}

/// Watches the tasks that must run until shutdown. Written only when a task ends.
pub struct Supervisor {
    shutdown: CancellationToken,
    /// Why each task that ended early did, in order.
    died: Mutex<Vec<String>>,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            shutdown,
            died: Mutex::new(Vec::new()),
        })
    }

    /// Spawns `fut` as the task `name`; its end is reported (see [`Supervisor::ended`]).
    /// The handle gives the outcome: `Err` with the reason when it failed or panicked.
    pub fn spawn<F, E>(
        self: &Arc<Self>,
        name: &'static str,
        fut: F,
    ) -> JoinHandle<Result<(), String>>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("failed: {e}")),
                Err(panic) => Err(format!("panicked: {}", panic_text(&*panic))),
            };
            this.ended(name, &outcome);
            outcome
        })
    }

    /// Watches a task spawned elsewhere (the JWKS refresh lives in `auth`); the returned
    /// watcher ends when it has reported.
    pub fn watch(self: &Arc<Self>, name: &'static str, task: JoinHandle<()>) -> JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = match task.await {
                Ok(()) => Ok(()),
                // Aborted: its owner was dropped, which happens on shutdown.
                Err(e) if e.is_cancelled() => Ok(()),
                Err(e) => Err(format!("panicked: {}", panic_text(&*e.into_panic()))),
            };
            this.ended(name, &outcome);
        })
    }

    /// Records how a task ended: a failure always, a plain return when it came before
    /// shutdown (these tasks run until then).
    pub fn ended(&self, name: &'static str, outcome: &Result<(), String>) {
        let why = match outcome {
            Ok(()) if self.shutdown.is_cancelled() => return,
            Ok(()) => "ended unexpectedly".to_string(),
            Err(why) => why.clone(),
        };
        tracing::error!(task = name, "{name} task {why}");
        metrics::counter!("changecast_task_failures_total", "task" => name).increment(1);
        self.died
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(format!("{name} task {why}"));
    }

    /// `None` while every task runs; otherwise why they ended, `; `-separated.
    pub fn problem(&self) -> Option<String> {
        let died = self.died.lock().unwrap_or_else(PoisonError::into_inner);
        (!died.is_empty()).then(|| died.join("; "))
    }
}

/// The message of a panic payload.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
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

/// Opens the history: the durable store (its epoch, head, floor and checkpoint) or none
/// (memory). `epoch` is the cluster stream's: a store of another epoch holds ids nobody
/// can resume from any more, and is started afresh.
async fn open_history(
    config: &HistoryConfig,
    epoch: Option<String>,
) -> anyhow::Result<Option<Opened>> {
    if config.store == HistoryKind::Memory {
        return Ok(None);
    }
    let path = config.path.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let want = epoch.clone();
        let opened = HistoryStore::open(&path, || want.unwrap_or_else(new_epoch))?;
        match epoch {
            Some(epoch) if opened.epoch != epoch => {
                tracing::warn!(
                    path = %path.display(), stored = %opened.epoch, stream = %epoch,
                    "history: the cluster stream is a new one (another epoch); starting this node's history afresh"
                );
                drop(opened);
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
                HistoryStore::open(&path, || epoch)
            }
            _ => Ok(opened),
        }
    })
    .await?
    .with_context(|| format!("cannot open the history at {}", config.path.display()))?;
    tracing::info!(
        path = %config.path.display(), epoch = %opened.epoch, head = opened.head,
        "history open"
    );
    Ok(Some(opened))
}

/// Opens the source, resuming after `from`; with the lookups it answers.
async fn open_source(
    plan: &Plan,
    from: Option<Position>,
) -> Result<(Box<dyn Source>, Arc<dyn Lookup>), SourceError> {
    match &plan.source {
        SourcePlan::Sqlite(config) => {
            let watched: Vec<String> = plan.watched().into_keys().collect();
            let config = config.clone();
            let json_columns = config.json_columns.clone();
            let source =
                tokio::task::spawn_blocking(move || SqliteSource::open(&config, &watched, from))
                    .await
                    .map_err(|e| SourceError::Setup(format!("opening the source: {e}")))??;
            tracing::info!(
                path = %source.path().display(),
                checkpoint = source.checkpoint(),
                "sqlite source open"
            );
            let lookup = Arc::new(SqliteLookup::with_json_columns(
                source.path(),
                &json_columns,
            ));
            Ok((Box::new(source), lookup))
        }
        SourcePlan::Mongodb(config) => {
            let from = from.map(|p| p.0);
            let source = MongoSource::connect(config, plan.stream_spec(config), from).await?;
            tracing::info!(database = %config.database, "mongodb source open");
            let lookup = Arc::new(source.lookup());
            Ok((Box::new(source), lookup))
        }
        SourcePlan::Postgres(config) => {
            let mut source = crate::source::postgres::PgSource::new(
                config,
                crate::source::postgres::Watch::of(plan),
                from,
            )?;
            // A missing table or one without a primary key stops the start here; the
            // slot exists from here on, so nothing written after `serve` is up is missed.
            source.prepare_at_start().await?;
            tracing::info!(
                db = %source.conn().describe(), slot = %config.slot, "postgres source open"
            );
            let lookup = Arc::new(crate::source::postgres::PgLookup::new(
                source.conn().clone(),
            ));
            Ok((Box::new(source), lookup))
        }
    }
}

/// Lookups without a source (a cluster node that does not route answers auth lookups;
/// `changecast explain`).
pub async fn open_lookup(plan: &Plan) -> Result<Arc<dyn Lookup>, SourceError> {
    Ok(match &plan.source {
        SourcePlan::Sqlite(config) => Arc::new(SqliteLookup::with_json_columns(
            &config.path,
            &config.json_columns,
        )),
        SourcePlan::Mongodb(config) => {
            Arc::new(crate::source::mongodb::MongoLookup::connect(config).await?)
        }
        SourcePlan::Postgres(config) => Arc::new(crate::source::postgres::PgLookup::new(
            crate::source::postgres::ConnInfo::parse(config)
                .map_err(|e| SourceError::Setup(format!("source.url: {e}")))?,
        )),
    })
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
    let shutdown = CancellationToken::new();
    // A cluster node numbers events by the stream: its epoch comes first.
    let nats = match &plan.cluster {
        Some(c) => {
            tracing::info!(node = %c.name, nats = %c.nats.list().join(","), "cluster: connecting");
            let nats = cluster::connect(c, &plan.history, &shutdown).await?;
            tracing::info!(stream = %nats.names.stream, epoch = %nats.epoch, "cluster: stream ready");
            Some(nats)
        }
        None => None,
    };
    // The durable history: in one process its checkpoint is where the source resumes,
    // because it was committed together with the events it covers.
    let history = open_history(&plan.history, nats.as_ref().map(|n| n.epoch.clone())).await?;
    let resume_from = history.as_ref().and_then(|h| h.checkpoint.clone());
    let (source, lookup) = match &nats {
        None => {
            let (source, lookup) = open_source(&plan, resume_from.clone()).await?;
            (Some(source), lookup)
        }
        // Opened by whichever node holds the router lease, when it takes it.
        Some(_) => (None, open_lookup(&plan).await?),
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
    let hub = Arc::new(match (&history, &nats) {
        (Some(opened), _) => Hub::durable(opened, hub_config),
        (None, Some(nats)) => Hub::with_epoch(nats.epoch.clone(), hub_config),
        (None, None) => Hub::new(hub_config),
    });
    let tasks = Supervisor::new(shutdown.clone());
    // Publishing waits for the stream; a small queue bounds how many wait.
    let (publish_tx, publish_rx) = mpsc::channel(64);
    let publish_keys = plan.publish_keys.clone();
    let auth = plan
        .auth
        .clone()
        .build(Arc::clone(&lookup))
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(refresh) = auth.take_refresh_task() {
        // The watcher ends with the task; nothing waits for it.
        drop(tasks.watch("jwks refresh", refresh));
    }
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
        tasks: Arc::clone(&tasks),
        nats: nats.clone(),
        explain: Arc::new(crate::explain::Explainer::new(&plan, Arc::clone(&lookup))),
        pacer: crate::transport::pacer::Pacer::start(plan.server.write_delay, shutdown.clone()),
    });
    // Shutdown closes every subscribed connection with 1012: the hub kicks them all (a
    // connection waits on its own queue only, not on the shutdown token too).
    tokio::spawn({
        let hub = Arc::clone(&hub);
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            hub.kick_all(crate::event::CloseReason::Restarting);
        }
    });
    let deliver = Deliver {
        hub: Arc::clone(&hub),
        health: Arc::clone(&health),
        shutdown: shutdown.clone(),
    };
    let pipeline = match (nats, source) {
        (None, Some(source)) => single_process(
            &tasks, &plan, source, lookup, deliver, publish_rx, &shutdown,
        ),
        (Some(nats), _) => cluster_node(
            &tasks,
            Arc::new(plan.clone()),
            nats,
            resume_from.as_ref().and_then(Position::as_seq),
            lookup,
            deliver,
            publish_rx,
            &shutdown,
        ),
        (None, None) => unreachable!("one process always opens its source"),
    };
    tasks.spawn(
        "pruning",
        prune(
            Arc::clone(&hub),
            plan.history.clone(),
            Arc::clone(&app.health),
            shutdown.clone(),
        )
        .map(Ok::<(), std::convert::Infallible>),
    );

    let http = crate::transport::router(Arc::clone(&app));
    let http = match extra {
        Some(extra) => http.merge(extra),
        None => http,
    };
    let edge = crate::transport::edge::EdgeConfig::new(&plan.server);
    let http_task = tasks.spawn(
        "http",
        crate::transport::edge::serve(listener, http, edge, shutdown.clone()),
    );

    let app2 = Arc::clone(&app);
    let joined = tokio::spawn(async move {
        let result = pipeline.await;
        app2.source_stopped.store(true, Ordering::Release);
        app2.shutdown.cancel();
        http_task
            .await?
            .map_err(|e| anyhow::anyhow!("http task {e}"))?;
        result
    });
    Ok(Running {
        local_addr,
        app,
        tasks: joined,
    })
}

/// The plan's router, its lookups waiting out an unreachable database until `shutdown`
/// ([`crate::source::patient`]) instead of skipping deliveries.
fn patient_router(
    plan: &Plan,
    lookup: Arc<dyn Lookup>,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> crate::route::Router {
    let patient =
        crate::source::patient::Patient::new(lookup, Arc::clone(health), shutdown.clone());
    let gave_up = patient.gave_up();
    plan.router(Arc::new(patient)).interrupted_by(gave_up)
}

/// The pipeline's end: `Ok` on shutdown, the first failure otherwise.
type Pipeline = futures_util::future::BoxFuture<'static, anyhow::Result<()>>;

/// One process: the source feeds the router, whose stream is this process's hub and
/// history ([`Local`]). When either task ends, everything stops.
fn single_process(
    tasks: &Arc<Supervisor>,
    plan: &Plan,
    source: Box<dyn Source>,
    lookup: Arc<dyn Lookup>,
    deliver: Deliver,
    publish_rx: mpsc::Receiver<PublishRequest>,
    shutdown: &CancellationToken,
) -> Pipeline {
    let health = Arc::clone(&deliver.health);
    let router = patient_router(plan, lookup, &health, shutdown);
    let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
    let (ack_tx, ack_rx) = watch::channel(None);
    let source_task = tasks.spawn(
        "source",
        source.run(batch_tx, ack_rx, health, shutdown.clone()),
    );
    let stream = Local(deliver);
    let router_task = tasks.spawn("router", async move {
        match router::run(batch_rx, Some(publish_rx), &router, &stream, ack_tx, None).await {
            // Stopped: shutting down while the store failed (already logged).
            Ok(()) | Err(StreamError::Stopped) => Ok(()),
            Err(e) => Err(e),
        }
    });
    let shutdown = shutdown.clone();
    Box::pin(async move {
        // The pipeline is the source and the router: when either ends (on shutdown, or by
        // itself after a fatal error or a panic, already logged), stop everything.
        let (mut source_task, mut router_task) = (source_task, router_task);
        let mut router_result = None;
        let source_result = tokio::select! {
            r = &mut source_task => r,
            r = &mut router_task => {
                // Nothing can be delivered any more: the source stops reading.
                shutdown.cancel();
                router_result = Some(r);
                source_task.await
            }
        };
        let source_result: anyhow::Result<()> = match source_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("source task {e}")),
            Err(e) => Err(anyhow::anyhow!("source task failed: {e}")),
        };
        if source_result.is_err() {
            tracing::error!("the source stopped; stopping");
        }
        shutdown.cancel();
        let router_result = match router_result {
            Some(r) => r,
            None => router_task.await,
        };
        router_result?.map_err(|e| anyhow::anyhow!("router task {e}"))?;
        source_result
    })
}

/// A cluster node: its gateway follows the stream; it routes while it holds the lease;
/// publish requests go to the stream; a monitor watches NATS. When the gateway or the
/// monitor fails (NATS's stream recreated under it), everything stops.
#[allow(clippy::too_many_arguments)]
fn cluster_node(
    tasks: &Arc<Supervisor>,
    plan: Arc<Plan>,
    nats: Nats,
    checkpoint: Option<u64>,
    lookup: Arc<dyn Lookup>,
    deliver: Deliver,
    mut publish_rx: mpsc::Receiver<PublishRequest>,
    shutdown: &CancellationToken,
) -> Pipeline {
    let Some(config) = plan.cluster.clone() else {
        unreachable!("a cluster node has [cluster]")
    };
    let caught_up = Arc::new(AtomicBool::new(false));
    // Not ready until the gateway knows how far behind the stream it is.
    deliver
        .health
        .down(Component::CatchUp, "cluster: starting to read the stream");
    let gateway = tasks.spawn(
        "gateway",
        gateway::follow(
            nats.clone(),
            deliver.clone(),
            checkpoint,
            Arc::clone(&caught_up),
        ),
    );
    let lease = Lease::new(nats.lease.clone(), &config.name, config.lease_ttl);
    let router = tasks.spawn(
        "router",
        lead(
            nats.clone(),
            lease.clone(),
            Arc::clone(&plan),
            lookup,
            Arc::clone(&deliver.health),
            shutdown.clone(),
        )
        .map(Ok::<(), std::convert::Infallible>),
    );
    let publisher = Publisher::new(nats.clone(), None);
    let s = shutdown.clone();
    tasks.spawn(
        "publish",
        async move {
            loop {
                let req = tokio::select! {
                    _ = s.cancelled() => return,
                    r = publish_rx.recv() => match r { Some(r) => r, None => return },
                };
                let (recipients, template, done) = req.into_parts();
                match publisher.publish(recipients, template).await {
                    Ok(id) => {
                        let _ = done.send(id);
                    }
                    // The caller gets 503 (its answer channel is dropped).
                    Err(e) => {
                        tracing::warn!(error = %e, "publish: the stream did not take the message")
                    }
                }
            }
        }
        .map(Ok::<(), std::convert::Infallible>),
    );
    let monitor = tasks.spawn(
        "cluster monitor",
        monitor(nats, lease, Arc::clone(&deliver.health), shutdown.clone()),
    );
    let shutdown = shutdown.clone();
    Box::pin(async move {
        let (mut gateway, mut router, mut monitor) = (gateway, router, monitor);
        let first = tokio::select! {
            r = &mut gateway => r,
            r = &mut monitor => r,
            r = &mut router => r,
        };
        shutdown.cancel();
        // The router releases its lease and its source writes its checkpoint.
        let _ = router.await;
        let _ = gateway.await;
        let _ = monitor.await;
        match first {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("cluster: {e}")),
            Err(e) => Err(anyhow::anyhow!("cluster task failed: {e}")),
        }
    })
}

/// Pause after a routing term failed before this node tries to take the lease again, so
/// that another node gets the chance.
const TERM_RETRY: Duration = Duration::from_secs(2);

/// The router role of a cluster node: takes the lease when it is free, routes while it
/// holds it, and gives it up when the source or the stream fails.
async fn lead(
    nats: Nats,
    lease: Lease,
    plan: Arc<Plan>,
    lookup: Arc<dyn Lookup>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let routing = metrics::gauge!("changecast_cluster_router");
    routing.set(0.0);
    while !shutdown.is_cancelled() {
        let held = match lease.acquire().await {
            Ok(Some(held)) => Arc::new(held),
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(lease.poll_interval()) => continue,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cluster: cannot reach the lease");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(lease.poll_interval()) => continue,
                }
            }
        };
        tracing::info!("cluster: this node holds the router lease; routing");
        metrics::counter!("changecast_cluster_takeovers_total").increment(1);
        routing.set(1.0);
        let term = shutdown.child_token();
        let keeper = {
            let (lease, held, term) = (lease.clone(), Arc::clone(&held), term.clone());
            tokio::spawn(async move { lease.keep(&held, &term).await })
        };
        let outcome = route_term(&nats, &held, &plan, &lookup, &health, &term).await;
        term.cancel();
        routing.set(0.0);
        // The source's trouble was this term's; a standby reads nothing.
        health.up(Component::Source);
        let revision = keeper.await.ok();
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "cluster: routing stopped");
        }
        if let Some(revision) = revision
            && held.valid()
        {
            lease.release(revision).await;
        }
        if outcome.is_err() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TERM_RETRY) => {}
            }
        }
    }
}

/// One routing term: from the stream's last position, until `term` ends (the lease or
/// shutdown) or the source or the stream fails.
async fn route_term(
    nats: &Nats,
    held: &Arc<crate::cluster::lease::Held>,
    plan: &Plan,
    lookup: &Arc<dyn Lookup>,
    health: &Arc<Health>,
    term: &CancellationToken,
) -> Result<(), String> {
    let from = publish::resume_position(nats)
        .await
        .map_err(|e| e.to_string())?;
    let router = patient_router(plan, Arc::clone(lookup), health, term);
    if let Some(window) = router.longest_cooldown() {
        let fired = publish::recent_alerts(nats, window)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            alerts = fired.len(),
            "cluster: alert cooldowns restored from the stream"
        );
        for (name, key, ago) in fired {
            router.restore_cooldown(&name, key, ago);
        }
    }
    if term.is_cancelled() {
        return Ok(());
    }
    let (source, _) = open_source(plan, from.clone())
        .await
        .map_err(|e| format!("cannot open the source: {e}"))?;
    let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
    let (ack_tx, ack_rx) = watch::channel(None);
    let source_task = tokio::spawn(source.run(batch_tx, ack_rx, Arc::clone(health), term.clone()));
    let stream = Publisher::new(nats.clone(), Some(Arc::clone(held)));
    let routed = router::run(batch_rx, None, &router, &stream, ack_tx, from).await;
    // The router stopped first (the stream failed): the source stops too.
    term.cancel();
    let sourced = match source_task.await {
        Ok(r) => r.map_err(|e| format!("source: {e}")),
        Err(e) => Err(format!("source task failed: {e}")),
    };
    match routed {
        Ok(()) => sourced,
        Err(e) => Err(format!("stream: {e}")),
    }
}

/// Watches the link to NATS every second: the connection (`/readyz`,
/// `changecast_cluster_connected`), the lease holder
/// (`changecast_cluster_lease_holder{node}`), and the stream's epoch — a stream deleted
/// and recreated under a running node ends it with an error (its ids belong to the old
/// one; a restart starts this node's history afresh and clients get `gap`).
async fn monitor(
    nats: Nats,
    lease: Lease,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let connected = metrics::gauge!("changecast_cluster_connected");
    let mut holder: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let state = nats.client.connection_state();
        let answer = match state {
            async_nats::connection::State::Connected => nats.state().await.map_err(|e| e.0),
            other => Err(format!("not connected to NATS ({other:?})")),
        };
        match answer {
            Ok((epoch, _, _)) => {
                if epoch != nats.epoch {
                    return Err(format!(
                        "the stream {} was recreated (epoch {} → {epoch}): restart this node",
                        nats.names.stream, nats.epoch
                    ));
                }
                connected.set(1.0);
                if health.is_down(Component::Nats) {
                    tracing::info!("cluster: NATS answers again");
                    health.up(Component::Nats);
                }
            }
            Err(why) => {
                connected.set(0.0);
                if !health.is_down(Component::Nats) {
                    tracing::warn!("cluster: {why}");
                }
                health.down(Component::Nats, format!("cluster: {why}"));
                continue;
            }
        }
        if let Ok(now) = lease.holder().await
            && now != holder
        {
            if let Some(old) = holder.take() {
                metrics::gauge!("changecast_cluster_lease_holder", "node" => old).set(0.0);
            }
            if let Some(new) = &now {
                metrics::gauge!("changecast_cluster_lease_holder", "node" => new.clone()).set(1.0);
            }
            holder = now;
        }
    }
}

/// Applies retention every `prune_interval` until shutdown: prunes the store, then drops
/// what expired from the hub's memory, with the users left with nothing (item 8 of issue
/// 11: memory for every user id ever published to was never released). Without a store,
/// events older than `max_age` are found from the head sampled at each tick. A pass that
/// fails is counted (`changecast_history_prune_failures_total`) and keeps `/readyz` down
/// (`Component::Pruning`) until a pass succeeds: retention never stops silently.
async fn prune(
    hub: Arc<Hub>,
    config: HistoryConfig,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Memory only: (when, head then); every event up to a head sampled `max_age` ago is
    // older than `max_age`.
    let mut heads: std::collections::VecDeque<(tokio::time::Instant, u64)> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let expired = match hub.store().cloned() {
            Some(store) => {
                let (age, per_user) = (config.max_age, config.max_per_user);
                let pass = match tokio::task::spawn_blocking(move || {
                    store
                        .prune(age, per_user)
                        .and_then(|p| Ok((p, store.len()?)))
                })
                .await
                {
                    Ok(pass) => pass.map_err(|e| format!("history pruning failed: {e}")),
                    Err(e) => Err(format!("history pruning task failed: {e}")),
                };
                match pass {
                    Ok((pruned, len)) => {
                        metrics::counter!("changecast_history_pruned_total")
                            .increment(pruned.events);
                        metrics::gauge!("changecast_history_events").set(len as f64);
                        if health.is_down(Component::Pruning) {
                            tracing::info!("history: pruning works again");
                            health.up(Component::Pruning);
                        }
                        pruned.floor
                    }
                    Err(why) => {
                        metrics::counter!("changecast_history_prune_failures_total").increment(1);
                        // Logged when it starts failing; every failure is counted.
                        if !health.is_down(Component::Pruning) {
                            tracing::warn!("{why}; retrying every prune_interval");
                        }
                        health.down(Component::Pruning, why);
                        continue;
                    }
                }
            }
            None => {
                let now = tokio::time::Instant::now();
                let head = hub.head();
                // An unchanged head keeps its first sample: those events are older.
                if heads.back().is_none_or(|&(_, h)| h != head) {
                    heads.push_back((now, head));
                }
                let mut expired = 0;
                while let Some(&(at, head)) = heads.front()
                    && now.saturating_duration_since(at) >= config.max_age
                {
                    expired = head;
                    heads.pop_front();
                }
                expired
            }
        };
        hub.expire(expired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn outcome(task: JoinHandle<Result<(), String>>) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends")
            .expect("the supervisor itself never panics")
    }

    #[tokio::test]
    async fn a_task_that_panics_errs_or_returns_early_is_reported() {
        let shutdown = CancellationToken::new();
        let tasks = Supervisor::new(shutdown.clone());
        assert_eq!(tasks.problem(), None);

        let panicked = tasks.spawn("pruning", async {
            if std::hint::black_box(true) {
                panic!("`period` must be non-zero.");
            }
            Ok::<(), String>(())
        });
        let why = outcome(panicked).await.unwrap_err();
        assert_eq!(why, "panicked: `period` must be non-zero.");
        let problem = tasks.problem().unwrap();
        assert_eq!(problem, "pruning task panicked: `period` must be non-zero.");

        let failed = tasks.spawn("router", async { Err::<(), _>("disk full") });
        assert_eq!(outcome(failed).await, Err("failed: disk full".to_string()));
        let returned = tasks.spawn("jwks refresh", async { Ok::<(), String>(()) });
        assert_eq!(outcome(returned).await, Ok(()));
        let problem = tasks.problem().unwrap();
        assert!(
            problem
                .ends_with("; router task failed: disk full; jwks refresh task ended unexpectedly"),
            "{problem}"
        );
    }

    #[tokio::test]
    async fn tasks_that_end_on_shutdown_are_not_failures() {
        let shutdown = CancellationToken::new();
        let tasks = Supervisor::new(shutdown.clone());
        let s = shutdown.clone();
        let runs = tasks.spawn("http", async move {
            s.cancelled().await;
            Ok::<(), String>(())
        });
        let watched = tokio::spawn(std::future::pending::<()>());
        let abort = watched.abort_handle();
        let watcher = tasks.watch("jwks refresh", watched);
        shutdown.cancel();
        abort.abort();
        assert_eq!(outcome(runs).await, Ok(()));
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("the watcher sees the abort")
            .unwrap();
        assert_eq!(tasks.problem(), None);
    }

    #[tokio::test]
    async fn a_watched_task_that_panics_is_reported() {
        let tasks = Supervisor::new(CancellationToken::new());
        let watcher = tasks.watch(
            "jwks refresh",
            tokio::spawn(async { panic!("refresh loop broke") }),
        );
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("the watcher sees the panic")
            .unwrap();
        assert_eq!(
            tasks.problem().unwrap(),
            "jwks refresh task panicked: refresh loop broke"
        );
    }
}
