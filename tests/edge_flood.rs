//! Issue 11 item 3, the measurement: 20,000 idle sockets against the real binary, and
//! `/healthz`, `/readyz` and `/metrics` still answer.
//!
//! The binary runs under `prlimit --nofile=2048:2048`, so the flood is ten times its
//! descriptor limit. Its idle and header timeouts are set to a minute so that only the
//! pending cap, the socket budget and eviction protect it. This test raises its own
//! descriptor limit to hold the flood; where its hard limit is too low for all 20,000
//! (20,000 here, less the descriptors the test itself needs), a helper process
//! (`python3`, from 127.0.0.5–8) holds the rest, so the server always faces 20,000.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Db;
use common::binary::{BINARY, Served};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const FLOOD: u64 = 20_000;
const SERVER_NOFILE: u64 = 2048;
/// The whole flood must be open within this.
const FLOOD_WITHIN: Duration = Duration::from_secs(90);
/// Each probe must be answered within this (several attempts allowed).
const PROBE_WITHIN: Duration = Duration::from_secs(15);

/// Starts the binary under `prlimit`, its log lines going to `log`.
fn start(config: &std::path::Path, log: Arc<Mutex<Vec<String>>>) -> (Served, SocketAddr) {
    let mut prlimit = Command::new("prlimit");
    prlimit
        .arg(format!("--nofile={SERVER_NOFILE}:{SERVER_NOFILE}"))
        .arg(BINARY);
    Served::start(prlimit, config, log, Duration::from_secs(30))
}

/// Opens an idle connection from one of 127.0.0.1..=4 (more ports than one address has).
async fn idle_connection(i: u64, to: SocketAddr) -> Option<TcpStream> {
    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 4) as u8));
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(from, 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
        .await
        .ok()?
        .ok()
}

/// Holds `n` idle connections to `to` in a separate process (its own descriptor limit),
/// until dropped. Returns how many connected.
struct Holder(Child);

/// Connects sequentially from 127.0.0.5..=8, prints how many connected, then waits for
/// its standard input to close.
const HOLDER: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, failed = [], 0
for i in range(n):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.bind(("127.0.0.%d" % (5 + i % 4), 0))
        s.connect((host, port))
        held.append(s)
    except OSError:
        failed += 1
        s.close()
print(len(held), flush=True)
sys.stdin.read()
"#;

impl Holder {
    fn start(to: SocketAddr, n: u64) -> (Holder, u64) {
        let mut child = Command::new("python3")
            .args(["-c", HOLDER, &to.ip().to_string(), &to.port().to_string()])
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts (the helper that holds the rest of the flood)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let held = line
            .trim()
            .parse()
            .expect("the helper reports its connections");
        (Holder(child), held)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing its input ends it; kill in case it is stuck connecting.
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on a new connection, retried until answered or `PROBE_WITHIN`.
async fn probe(client: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, String, u32) {
    let deadline = Instant::now() + PROBE_WITHIN;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.get(format!("http://{addr}{path}")).send(),
        )
        .await;
        if let Ok(Ok(res)) = res {
            let status = res.status().as_u16();
            if let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(5), res.text()).await {
                return (status, body, attempts);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} not answered within {PROBE_WITHIN:?} ({attempts} attempts)"
        );
    }
}

/// A counter's value by exact name and labels, summed over nothing else.
fn value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == series).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer_during_a_20000_socket_flood() {
    // Room for the flood in this process: raise the limit (as root, the hard one too).
    let wanted = FLOOD + 1024;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, wanted).is_err() {
        let _ = rlimit::increase_nofile_limit(wanted);
    }
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    // What this process holds; a helper process holds the rest.
    let own = FLOOD.min(soft.saturating_sub(1024));
    let rest = FLOOD - own;
    assert!(
        rest < 16_000,
        "a helper's default limit holds the rest: {rest}"
    );

    let db = Db::new();
    let config = db.dir.path().join("changecast.toml");
    std::fs::write(
        &config,
        db.config("idle_timeout = \"60s\"\nheader_read_timeout = \"60s\"", 10),
    )
    .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (server, addr) = start(&config, Arc::clone(&log));

    // The flood: idle connections that never send a byte, 500 connects in flight.
    let started = Instant::now();
    let mut held = Vec::with_capacity(own as usize);
    let mut failed = 0u64;
    for batch in (0..own).collect::<Vec<_>>().chunks(500) {
        let opened =
            futures_util::future::join_all(batch.iter().map(|&i| idle_connection(i, addr))).await;
        for c in opened {
            match c {
                Some(c) => held.push(c),
                None => failed += 1,
            }
        }
        assert!(
            started.elapsed() < FLOOD_WITHIN,
            "the flood did not open within {FLOOD_WITHIN:?}"
        );
    }
    let (holder, held_elsewhere) = match rest {
        0 => (None, 0),
        n => {
            let (h, held) = Holder::start(addr, n);
            (Some(h), held)
        }
    };
    let connected = held.len() as u64 + held_elsewhere;
    eprintln!(
        "flood: {connected} of {FLOOD} connected ({held_elsewhere} by a helper process), \
         {failed} failed here, in {:?}",
        started.elapsed()
    );
    assert!(
        connected >= FLOOD * 9 / 10,
        "the flood connected: {connected} of {FLOOD}"
    );

    // With every flood socket still open on this side, the probes are answered.
    let client = reqwest::Client::new();
    let (status, body, attempts) = probe(&client, addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    eprintln!("/healthz answered after {attempts} attempt(s)");
    let (status, body, _) = probe(&client, addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, page, _) = probe(&client, addr, "/metrics").await;
    assert_eq!(status, 200);
    // The caps did the work (this server's own metrics: nothing else shares them).
    let evicted = value(&page, "changecast_edge_evicted_total");
    let refused = value(&page, "changecast_edge_refused_total");
    // (Some of the flood may still wait in the listen backlog, not yet accepted.)
    eprintln!("evicted {evicted}, refused {refused}");
    assert!(
        evicted + refused >= (FLOOD / 2) as f64,
        "most of the flood, beyond the descriptor limit, was evicted or refused: \
         {evicted} + {refused}\n{page}"
    );
    let open = value(&page, "changecast_edge_open_connections");
    assert!(
        open < SERVER_NOFILE as f64,
        "open connections stay under the descriptor limit: {open}"
    );
    // No descriptor ran out, so accept never failed.
    let errors: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("accept failed") || l.contains("Too many open files"))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    drop(held);
    drop(holder);
    drop(server);
}
