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
//!
//! Supervision: every long-running task (source, router, pruning, HTTP, the JWKS refresh)
//! runs under a [`Supervisor`]. One that ends before shutdown — a panic, an error or a
//! plain return — is logged, counted (`changecast_task_failures_total{task}`) and makes
//! `/readyz` answer 503 with its reason until the process restarts; it never vanishes. The
//! source and the router are the pipeline: when either ends the gateway stops.
//!
//! Readiness: besides dead tasks, each component that can fail and recover — the source,
//! the history store (`persist`), pruning — sets and clears its own problem in [`Health`];
//! `/readyz` is ready only when none is set, and names them all.

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
use crate::source::{Batch, Component, Health, Lookup, Source};

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
    let tasks = Supervisor::new(shutdown.clone());
    // Publishing waits for the router; a small queue bounds how many wait.
    let (publish_tx, publish_rx) = mpsc::channel(64);
    let publish_keys = plan.publish_keys.clone();
    let auth = plan
        .auth
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
    });
    let router = Router::new(plan.routes, plan.alerts, lookup, plan.lookups.cache_entries);

    let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
    let (ack_tx, ack_rx) = watch::channel(None);
    let source_task = tasks.spawn(
        "source",
        source.run(batch_tx, ack_rx, health, shutdown.clone()),
    );
    let router_task = tasks.spawn(
        "router",
        route_changes(
            batch_rx,
            publish_rx,
            router,
            Arc::clone(&hub),
            ack_tx,
            Arc::clone(&app),
        )
        .map(Ok::<(), std::convert::Infallible>),
    );
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
        // The pipeline is the source and the router: when either ends (on shutdown, or by
        // itself after a fatal error or a panic, already logged), stop everything.
        let (mut source_task, mut router_task) = (source_task, router_task);
        let mut router_result = None;
        let source_result = tokio::select! {
            r = &mut source_task => r,
            r = &mut router_task => {
                // Nothing can be delivered any more: the source stops reading.
                app2.shutdown.cancel();
                router_result = Some(r);
                source_task.await
            }
        };
        app2.source_stopped.store(true, Ordering::Release);
        let source_result: anyhow::Result<()> = match source_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("source task {e}")),
            Err(e) => Err(anyhow::anyhow!("source task failed: {e}")),
        };
        if source_result.is_err() {
            tracing::error!("the source stopped; stopping");
        }
        app2.shutdown.cancel();
        let router_result = match router_result {
            Some(r) => r,
            None => router_task.await,
        };
        router_result?.map_err(|e| anyhow::anyhow!("router task {e}"))?;
        http_task
            .await?
            .map_err(|e| anyhow::anyhow!("http task {e}"))?;
        source_result
    });
    Ok(Running {
        local_addr,
        app,
        tasks: joined,
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
                app.health.up(Component::History);
                return true;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "{what} failed; retrying");
                app.health
                    .down(Component::History, format!("history: {what} failed: {e}"));
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} task failed; retrying");
                app.health.down(
                    Component::History,
                    format!("history: {what} task failed: {e}"),
                );
            }
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
