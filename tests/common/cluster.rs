//! Cluster nodes for the tests: the real `changecast` binary, one process per node, all
//! on one shared SQLite file ([`Db`]) and one NATS server. In: a [`Db`], NATS URL(s), a
//! node name and a stream prefix; out: a [`Node`] that can be killed (SIGKILL) and
//! restarted with the same config, and readers of its `/readyz` and `/metrics`.
//! [`wait_until`] and [`wait_for`] poll with a deadline and fail naming what never happened.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Db;
use super::binary::{BINARY, Served};

/// The router lease's TTL in every cluster test: short, so that takeovers are quick.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// The publish API key every node accepts.
pub const API_KEY: &str = "cluster-test-key";
/// How long a node may take to log that it listens.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How long a node may take to start and catch up, or another node to take over.
pub const NODE_WAIT: Duration = Duration::from_secs(30);

/// The config of node `name`: the Mercury config of `db` with the node's own history
/// file, the publish API on, and a `[cluster]` block.
pub fn node_config(db: &Db, nats: &[String], name: &str, stream: &str) -> String {
    let shared_history = db.dir.path().join("history.db").display().to_string();
    let own_history = db
        .dir
        .path()
        .join(format!("history-{name}.db"))
        .display()
        .to_string();
    let base = db.config("", 5000);
    assert!(
        base.contains(&shared_history),
        "Db::config names its history file"
    );
    let nats = nats
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"{}
[publish]
api_keys = ["{API_KEY}"]

[cluster]
nats = [{nats}]
name = "{name}"
stream = "{stream}"
lease_ttl = "{}s"
"#,
        base.replace(&shared_history, &own_history),
        LEASE_TTL.as_secs()
    )
}

/// One node: the binary serving `config`, or nothing while it is killed.
pub struct Node {
    pub name: String,
    pub config: PathBuf,
    served: Option<Served>,
    /// Where it listens; changes on each restart (port 0).
    pub addr: SocketAddr,
    /// Every log line of every run of this node.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Writes the node's config next to the database and starts it.
    pub fn start(db: &Db, nats: &[String], name: &str, stream: &str) -> Node {
        Node::start_with(db, name, &node_config(db, nats, name, stream))
    }

    /// Starts node `name` with `config` (usually [`node_config`], edited).
    pub fn start_with(db: &Db, name: &str, config_text: &str) -> Node {
        let config = db.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, config_text).unwrap();
        let log = Arc::default();
        let (served, addr) = spawn(&config, &log);
        Node {
            name: name.to_owned(),
            config,
            served: Some(served),
            addr,
            log,
        }
    }

    /// SIGKILL: no shutdown, the lease is not released.
    pub fn kill(&mut self) {
        if let Some(s) = self.served.take() {
            s.kill();
        }
    }

    /// Kills it if it runs, then starts it again with the same config (a new address).
    pub fn restart(&mut self) {
        self.kill();
        let (served, addr) = spawn(&self.config, &self.log);
        self.served = Some(served);
        self.addr = addr;
    }

    pub fn is_running(&self) -> bool {
        self.served.is_some()
    }

    /// The last `n` log lines, each prefixed with the node's name.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..]
            .iter()
            .map(|l| format!("[{}] {l}", self.name))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Log lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/ws?{query}", self.addr)
    }

    /// `/readyz`: status and body; `None` when it does not answer within a second.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        readyz(self.addr).await
    }

    /// The value of the metric named exactly `name` with exactly `labels`; `None` when the
    /// node does not answer or has no such sample.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_of(self.addr, name, labels).await
    }

    /// `changecast_cluster_router`: `Some(true)` routing, `Some(false)` not, `None` no answer.
    pub async fn routes(&self) -> Option<bool> {
        self.metric("changecast_cluster_router", &[])
            .await
            .map(|v| v == 1.0)
    }

    /// Waits until `/readyz` is 200.
    pub async fn wait_ready(&self, within: Duration) {
        wait_until(&format!("{} is ready", self.name), within, || async move {
            matches!(self.readyz().await, Some((200, _)))
        })
        .await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- node {} (last 40 log lines) ---\n{}",
                self.name,
                self.log_tail(40)
            );
        }
    }
}

fn spawn(config: &std::path::Path, log: &Arc<Mutex<Vec<String>>>) -> (Served, SocketAddr) {
    Served::start(Command::new(BINARY), config, Arc::clone(log), START_WITHIN)
}

/// A client with a short timeout: a killed or partitioned node must not stall a poll.
fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap()
    });
    &CLIENT
}

/// `/readyz` of the node at `addr`: status and body.
pub async fn readyz(addr: SocketAddr) -> Option<(u16, String)> {
    let res = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .ok()?;
    let status = res.status().as_u16();
    Some((status, res.text().await.ok()?))
}

/// One exact metric of the node at `addr` (see [`super::metric`]).
pub async fn metric_of(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let res = http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .ok()?;
    if res.status() != 200 {
        return None;
    }
    super::metric(&res.text().await.ok()?, name, labels)
}

/// Polls `f` every 50 ms until it is true; fails naming `what` after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, within, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `f` every 50 ms until it returns `Some`; fails naming `what` after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        // Each poll is bounded too: a hung check must not outlive the deadline.
        let left = within.saturating_sub(started.elapsed());
        if let Ok(Some(v)) = tokio::time::timeout(left, f()).await {
            return v;
        }
        assert!(
            started.elapsed() < within,
            "never happened within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one routing node among `nodes`, once exactly one of the running ones says so.
pub async fn router(nodes: &[Node], within: Duration) -> usize {
    wait_for("exactly one node routes", within, || async move {
        let mut routing = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.is_running() && n.routes().await == Some(true) {
                routing.push(i);
            }
        }
        (routing.len() == 1).then(|| routing[0])
    })
    .await
}

/// POST /v1/publish on the node at `addr`; the stored event's id.
pub async fn publish(addr: SocketAddr, to: &[&str], event: serde_json::Value) -> String {
    let res = tokio::time::timeout(
        super::WAIT,
        reqwest::Client::new()
            .post(format!("http://{addr}/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"to": to, "event": event}))
            .send(),
    )
    .await
    .expect("publish answers in time")
    .unwrap();
    let status = res.status().as_u16();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(status, 200, "publish refused: {body}");
    body["id"].as_str().expect("an id").to_owned()
}

/// Waits until the SQLite source has installed its triggers on `orders` (the first router
/// does, once it holds the lease): a write before that is not captured by design, and a
/// node says it is ready as soon as it has read the stream, whichever node routes.
pub async fn wait_capturing(db: &Db) {
    let path = db.path.clone();
    wait_until(
        "the router installed its triggers on orders",
        NODE_WAIT,
        move || {
            let path = path.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(path).ok()?;
                    conn.query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' \
                     AND name IN ('_changecast_orders_insert', '_changecast_orders_update')",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .ok()
                })
                .await
                .ok()
                .flatten()
                    == Some(2)
            }
        },
    )
    .await;
}
