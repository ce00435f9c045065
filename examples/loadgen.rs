//! Load generator for changecast and its peers (issue 7, `bench/run.sh`).
//!
//! Three modes:
//!
//! - `init`: creates the benchmark database (the demo's `businesses`, `users`, `orders`
//!   schema), with users `u0..u{M-1}`; user `uJ` belongs to business `b{J % B}`.
//! - `write`: inserts orders at a given rate for a given duration (the writer on its own).
//! - `run`: opens N authenticated WebSocket connections, waits for every `ready` (or every
//!   101 with `--ready-on-open`, for servers that send no `ready`), then writes
//!   orders from a thread of its own (the same writer as `write`) and measures every event.
//!   `--idle` only holds the connections (memory and connection-count measurements).
//!
//! What the writer puts in each row, and how it is checked:
//!
//! - `creator_id` is the stream key: the user id (`u7`, per-user workload: the route is
//!   `to = "$creator_id"`), or the business id (`b2`, account-wide workload: the route looks up
//!   every user with `business_id = $creator_id`). Rows go round-robin over the keys.
//! - `quantity` is the per-key sequence number, 1, 2, 3, … So every connection must see
//!   1..=final for its key, in order: a jump is a loss, a repeat or step back an error, and a
//!   final value short of the writer's last one counts the tail as lost.
//! - `status` is the insert time, microseconds since the Unix epoch, as decimal text, taken
//!   just before the row's INSERT (rows of one 1 ms tick share a transaction, committed right
//!   after). Latency = receive time − that, so it covers the commit, the server's change
//!   source, routing, fan-out, the socket and the client's parse.
//!
//! `--url` takes several URLs (comma-separated, the nodes of a cluster): each key's
//! connections go to them in turn, and the output counts connections and events per URL.
//!
//! Output: one JSON line on stdout.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "changecast load generator: WebSocket clients and an SQLite order writer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the benchmark database (schema, users, businesses).
    Init {
        #[arg(long)]
        db: String,
        #[arg(long)]
        users: usize,
        #[arg(long, default_value_t = 1)]
        businesses: usize,
    },
    /// Insert orders at a rate for a duration.
    Write {
        #[command(flatten)]
        w: WriterArgs,
        /// Stream keys: `u0..u{keys-1}` (`--key-prefix u`) or `b0..` (`--key-prefix b`).
        #[arg(long)]
        keys: usize,
        #[arg(long, default_value = "u")]
        key_prefix: String,
    },
    /// Connect, write, measure.
    Run(RunArgs),
}

#[derive(clap::Args, Clone)]
struct WriterArgs {
    /// The SQLite file the server tails.
    #[arg(long)]
    db: String,
    /// Orders per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
}

#[derive(clap::Args)]
struct RunArgs {
    /// WebSocket URL without the token, e.g. ws://127.0.0.1:8080/v1/ws; several,
    /// comma-separated (the nodes of a cluster): each stream key's connections go to them
    /// round-robin, so every audience is split evenly over the nodes, as behind a load
    /// balancer.
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// HS256 secret the tokens are signed with (claim `sub` = user id, expiry 1 h).
    #[arg(long)]
    secret: String,
    /// Connections to open.
    #[arg(long)]
    conns: usize,
    /// Connections per user, `A-B`: user j gets A + (j mod (B-A+1)) connections; users are
    /// taken in order until `--conns` are assigned.
    #[arg(long, default_value = "1-1")]
    per_user: String,
    /// Account-wide workload: user uJ receives the stream of business b{J % B}.
    #[arg(long)]
    businesses: Option<usize>,
    /// Source addresses to connect from, round-robin (bind before connect), e.g.
    /// 127.0.0.1,127.0.0.2 — for more connections than one address has ports.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    bind: Vec<IpAddr>,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    connect_timeout: f64,
    /// Only hold the connections for `--hold` seconds; report the count.
    #[arg(long)]
    idle: bool,
    /// Seconds to hold in `--idle` mode (the driver samples the server's memory meanwhile).
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Touch this file once every connection is ready (idle mode: while holding).
    #[arg(long)]
    ready_file: Option<String>,
    /// Count a connection as ready once its HTTP 101 handshake completes, without waiting for
    /// a `ready` event: for servers that send none (nginx + nchan), which must have
    /// subscribed the connection by the time they answer 101.
    #[arg(long)]
    ready_on_open: bool,
    /// Fraction of connections that never read after `ready` (slow consumers).
    #[arg(long, default_value_t = 0.0)]
    stall_fraction: f64,
    /// Seconds to wait after the writer stops for the last events.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Do not write; measure only (another process writes).
    #[arg(long)]
    no_write: bool,
    #[command(flatten)]
    w: WriterArgs,
    /// Label copied into the output.
    #[arg(long, default_value = "")]
    label: String,
}

/// SO_RCVBUF of the stalled connections (`--stall-fraction`).
const STALLED_RCVBUF: u32 = 4096;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init {
            db,
            users,
            businesses,
        } => init(&db, users, businesses),
        Cmd::Write {
            w,
            keys,
            key_prefix,
        } => {
            let keys: Vec<String> = (0..keys).map(|k| format!("{key_prefix}{k}")).collect();
            let out = write_orders(&w, &keys)?;
            println!("{}", out.json);
            Ok(())
        }
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(run(args))
        }
    }
}

fn init(db: &str, users: usize, businesses: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(db);
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{ext}"));
    }
    let mut conn = rusqlite::Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.execute_batch(
        "CREATE TABLE businesses (_id TEXT PRIMARY KEY, name TEXT NOT NULL, owner JSON NOT NULL);
         CREATE TABLE users (_id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                             business_id TEXT NOT NULL);
         CREATE INDEX users_business ON users(business_id);
         CREATE TABLE orders (_id TEXT PRIMARY KEY, creator_id TEXT NOT NULL, item_id TEXT NOT NULL,
                              quantity INTEGER NOT NULL, status TEXT NOT NULL);",
    )?;
    let tx = conn.transaction()?;
    for b in 0..businesses {
        tx.execute(
            "INSERT INTO businesses VALUES (?1, ?2, ?3)",
            (
                format!("b{b}"),
                format!("Business {b}"),
                json!({"_id": format!("u{b}")}).to_string(),
            ),
        )?;
    }
    for u in 0..users {
        tx.execute(
            "INSERT INTO users VALUES (?1, ?2, ?3, ?4)",
            (
                format!("u{u}"),
                format!("u{u}@bench.example"),
                format!("User {u}"),
                format!("b{}", u % businesses.max(1)),
            ),
        )?;
    }
    tx.commit()?;
    println!(
        "{}",
        json!({"init": db, "users": users, "businesses": businesses})
    );
    Ok(())
}

struct WriteOutcome {
    json: serde_json::Value,
    /// Last sequence number written per key (same order as the keys).
    finals: Vec<u64>,
    start_us: u64,
}

/// Open-loop writer: every millisecond, inserts the rows due by then in one transaction.
/// Row n goes to key n % K with sequence n / K + 1.
fn write_orders(w: &WriterArgs, keys: &[String]) -> anyhow::Result<WriteOutcome> {
    let conn = rusqlite::Connection::open(&w.db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let run = format!("{:x}", now_us());
    let mut stmt = conn.prepare(
        "INSERT INTO orders (_id, creator_id, item_id, quantity, status) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let k = keys.len().max(1) as u64;
    let total = (w.rate * w.duration).round() as u64;
    let start = Instant::now();
    let start_us = now_us();
    let mut n: u64 = 0;
    let mut busy_max = Duration::ZERO;
    while n < total {
        let due = ((start.elapsed().as_secs_f64() * w.rate) as u64).min(total);
        if due > n {
            let t0 = Instant::now();
            conn.execute_batch("BEGIN")?;
            while n < due {
                let key = &keys[(n % k) as usize];
                let seq = n / k + 1;
                stmt.execute((
                    format!("{run}-{n}"),
                    key,
                    "i1",
                    seq as i64,
                    now_us().to_string(),
                ))?;
                n += 1;
            }
            conn.execute_batch("COMMIT")?;
            busy_max = busy_max.max(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = start.elapsed().as_secs_f64();
    let finals = (0..k)
        .map(|i| {
            if total > i {
                (total - i).div_ceil(k)
            } else {
                0
            }
        })
        .collect();
    Ok(WriteOutcome {
        json: json!({"rows": n, "seconds": secs, "rows_per_s": n as f64 / secs,
                     "max_txn_ms": busy_max.as_secs_f64() * 1e3}),
        finals,
        start_us,
    })
}

fn mint(secret: &str, sub: &str) -> String {
    let now = now_us() / 1_000_000;
    let claims = json!({"sub": sub, "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing")
}

#[derive(Default)]
struct Shared {
    ready: AtomicU64,
    received: AtomicU64,
    last_recv_us: AtomicU64,
    connect_errors: AtomicU64,
    handshake_errors: AtomicU64,
    closed_early: AtomicU64,
    parse_errors: AtomicU64,
    out_of_order: AtomicU64,
    wrong_key: AtomicU64,
    gaps: AtomicU64,
}

#[derive(Default)]
struct ConnResult {
    connected: bool,
    stalled: bool,
    key: usize,
    /// Index into `--url`.
    url: usize,
    last_seq: u64,
    received: u64,
    close_code: Option<u16>,
}

/// Finds `"name":` in `s` and returns the text after it.
fn after<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    s.find(name).map(|i| &s[i + name.len()..])
}

/// (key, seq, ts_us) of a change event: a fast scan, not a full JSON parse.
fn parse_change(s: &str) -> Option<(&str, u64, u64)> {
    let key = after(s, "\"creator_id\":\"")?;
    let key = &key[..key.find('"')?];
    let q = after(s, "\"quantity\":")?;
    let q: u64 = q[..q.find(|c: char| !c.is_ascii_digit())?].parse().ok()?;
    let t = after(s, "\"status\":\"")?;
    let t: u64 = t[..t.find('"')?].parse().ok()?;
    Some((key, q, t))
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let (lo, hi) = match a.per_user.split_once('-') {
        Some((x, y)) => (x.parse::<usize>()?, y.parse::<usize>()?),
        None => {
            let x = a.per_user.parse::<usize>()?;
            (x, x)
        }
    };
    anyhow::ensure!(lo >= 1 && hi >= lo, "--per-user A-B with 1 <= A <= B");
    // Connection -> user index.
    let mut conn_user = Vec::with_capacity(a.conns);
    let mut j = 0;
    while conn_user.len() < a.conns {
        for _ in 0..lo + j % (hi - lo + 1) {
            if conn_user.len() < a.conns {
                conn_user.push(j);
            }
        }
        j += 1;
    }
    let users = j;
    // Stream keys and each user's key index.
    let (keys, user_key): (Vec<String>, Box<dyn Fn(usize) -> usize>) = match a.businesses {
        Some(b) => (
            (0..b).map(|i| format!("b{i}")).collect(),
            Box::new(move |u| u % b),
        ),
        None => (
            (0..users).map(|i| format!("u{i}")).collect(),
            Box::new(|u| u),
        ),
    };
    let key_ids: std::collections::HashMap<String, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), i))
        .collect();
    let key_ids = Arc::new(key_ids);

    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        120_000_000,
        3,
    )?));
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let release_stalled = CancellationToken::new();
    let sem = Arc::new(Semaphore::new(a.connect_concurrency));
    let stall_every = if a.stall_fraction > 0.0 {
        (1.0 / a.stall_fraction).round() as usize
    } else {
        0
    };
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let idle = a.idle;
    let ready_on_open = a.ready_on_open;
    let multi_bind = a.bind.len() > 1 || a.bind[0] != IpAddr::from([127, 0, 0, 1]);

    // Each key's connections take the URLs in turn (see `--url`).
    let mut key_conns = vec![0usize; keys.len()];
    let mut conn_url = Vec::with_capacity(a.conns);
    for &u in &conn_user {
        let k = user_key(u);
        conn_url.push(key_conns[k] % a.url.len());
        key_conns[k] += 1;
    }

    let t_connect = Instant::now();
    let mut handles = Vec::with_capacity(a.conns);
    let mut tokens: std::collections::HashMap<usize, Arc<str>> = Default::default();
    for (i, &u) in conn_user.iter().enumerate() {
        let token = tokens
            .entry(u)
            .or_insert_with(|| mint(&a.secret, &format!("u{u}")).into())
            .clone();
        let url_idx = conn_url[i];
        let url = format!("{}?token={}", a.url[url_idx], token);
        let bind = a.bind[i % a.bind.len()];
        let key = user_key(u);
        let stalled = stall_every > 0 && i % stall_every == stall_every / 2;
        let (hist, shared, stop, release, sem, key_ids) = (
            hist.clone(),
            shared.clone(),
            stop.clone(),
            release_stalled.clone(),
            sem.clone(),
            key_ids.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut r = ConnResult { key, stalled, url: url_idx, ..Default::default() };
            let permit = sem.acquire_owned().await.ok();
            let target: SocketAddr = {
                let rest = url.trim_start_matches("ws://");
                let hostport = &rest[..rest.find('/').unwrap_or(rest.len())];
                match tokio::net::lookup_host(hostport).await.ok().and_then(|mut x| x.next()) {
                    Some(s) => s,
                    None => {
                        shared.connect_errors.fetch_add(1, Relaxed);
                        return r;
                    }
                }
            };
            let sock = match TcpSocket::new_v4() {
                Ok(s) => s,
                Err(_) => {
                    shared.connect_errors.fetch_add(1, Relaxed);
                    return r;
                }
            };
            // Bind only when several source addresses are asked for: a bind to port 0 picks
            // the port before the destination is known, so ports in TIME_WAIT from earlier
            // runs would be off limits; SO_REUSEADDR lets the bind take those.
            if multi_bind {
                let _ = sock.set_reuseaddr(true);
                if sock.bind(SocketAddr::new(bind, 0)).is_err() {
                    shared.connect_errors.fetch_add(1, Relaxed);
                    return r;
                }
            }
            // A client that stops reading with a small receive window, as a frozen tab on a
            // real network has: on loopback the kernel would otherwise absorb megabytes per
            // socket before the server's own queue sees any of it.
            if stalled {
                let _ = sock.set_recv_buffer_size(STALLED_RCVBUF);
            }
            let stream = match sock.connect(target).await {
                Ok(s) => s,
                Err(_) => {
                    shared.connect_errors.fetch_add(1, Relaxed);
                    return r;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut ws = match tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(cfg)).await {
                Ok((ws, _)) => ws,
                Err(_) => {
                    shared.handshake_errors.fetch_add(1, Relaxed);
                    return r;
                }
            };
            // Wait for `ready` (unless the 101 is the signal).
            if !ready_on_open {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str().starts_with("{\"type\":\"ready\"") => break,
                        Some(Ok(Message::Text(_))) | Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
                        Some(Ok(Message::Close(f))) => {
                            r.close_code = f.map(|f| u16::from(f.code));
                            shared.handshake_errors.fetch_add(1, Relaxed);
                            return r;
                        }
                        _ => {
                            shared.handshake_errors.fetch_add(1, Relaxed);
                            return r;
                        }
                    }
                }
            }
            drop(permit);
            r.connected = true;
            shared.ready.fetch_add(1, Relaxed);
            if idle {
                // Keep reading (pings are answered while reading), until told to stop.
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        m = ws.next() => match m {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                shared.closed_early.fetch_add(1, Relaxed);
                                break;
                            }
                            Some(Ok(_)) => {}
                        }
                    }
                }
                return r;
            }
            if stalled {
                // Never read until told; then read what arrives for a moment to see the close.
                release.cancelled().await;
                let deadline = tokio::time::sleep(Duration::from_secs(1));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        m = ws.next() => match m {
                            Some(Ok(Message::Close(f))) => { r.close_code = f.map(|f| u16::from(f.code)); break; }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                }
                return r;
            }
            loop {
                let m = tokio::select! {
                    biased;
                    m = ws.next() => m,
                    _ = stop.cancelled() => break,
                };
                match m {
                    Some(Ok(Message::Text(t))) => {
                        let s = t.as_str();
                        if !s.starts_with("{\"type\":\"change\"") {
                            continue;
                        }
                        let now = now_us();
                        match parse_change(s) {
                            Some((k, seq, ts)) => {
                                if key_ids.get(k) != Some(&r.key) {
                                    shared.wrong_key.fetch_add(1, Relaxed);
                                    continue;
                                }
                                if seq <= r.last_seq {
                                    shared.out_of_order.fetch_add(1, Relaxed);
                                    continue;
                                }
                                if seq > r.last_seq + 1 {
                                    shared.gaps.fetch_add(seq - r.last_seq - 1, Relaxed);
                                }
                                r.last_seq = seq;
                                r.received += 1;
                                shared.received.fetch_add(1, Relaxed);
                                shared.last_recv_us.fetch_max(now, Relaxed);
                                hist.lock().unwrap().saturating_record(now.saturating_sub(ts).max(1));
                            }
                            None => {
                                shared.parse_errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        r.close_code = f.map(|f| u16::from(f.code));
                        shared.closed_early.fetch_add(1, Relaxed);
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        shared.closed_early.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
            r
        }));
    }

    // Wait until every connection is ready or failed, bounded by the connect timeout.
    let deadline = t_connect + Duration::from_secs_f64(a.connect_timeout);
    loop {
        let s = &shared;
        let done = s.ready.load(Relaxed)
            + s.connect_errors.load(Relaxed)
            + s.handshake_errors.load(Relaxed);
        if done >= a.conns as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let ready = shared.ready.load(Relaxed);
    if let Some(f) = &a.ready_file {
        std::fs::write(f, ready.to_string())?;
    }

    if a.idle {
        tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        // Still open at the end of the hold?
        let held = ready - shared.closed_early.load(Relaxed);
        stop.cancel();
        println!(
            "{}",
            json!({"label": a.label, "mode": "idle", "requested": a.conns, "connections": held,
                   "ready_on_open": a.ready_on_open,
                   "connect_errors": shared.connect_errors.load(Relaxed),
                   "handshake_errors": shared.handshake_errors.load(Relaxed),
                   "connect_seconds": connect_secs})
        );
        return Ok(());
    }

    // Write (unless another process does), then drain.
    let expected_per_key: Vec<u64>;
    let mut write_json = serde_json::Value::Null;
    let write_start_us;
    if a.no_write {
        write_start_us = now_us();
        tokio::time::sleep(Duration::from_secs_f64(a.w.duration)).await;
        expected_per_key = vec![];
    } else {
        let (w, keys2) = (a.w.clone(), keys.clone());
        let out = tokio::task::spawn_blocking(move || write_orders(&w, &keys2)).await??;
        write_start_us = out.start_us;
        write_json = out.json;
        expected_per_key = out.finals;
    }
    let mut conn_key = vec![];
    for &u in &conn_user {
        conn_key.push(user_key(u));
    }
    let expected_total: u64 = if expected_per_key.is_empty() {
        0
    } else {
        (0..a.conns)
            .filter(|&i| !(stall_every > 0 && i % stall_every == stall_every / 2))
            .map(|i| expected_per_key[conn_key[i]])
            .sum()
    };
    let drain_until = Instant::now() + Duration::from_secs_f64(a.drain);
    while Instant::now() < drain_until && shared.received.load(Relaxed) < expected_total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    release_stalled.cancel();
    // Connections still in their handshake (a server that never answered) do not see the
    // stop: give every task 2 s, then abort the rest and count them as not connected.
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut results = Vec::with_capacity(a.conns);
    for mut h in handles {
        match tokio::time::timeout_at(join_deadline, &mut h).await {
            Ok(r) => results.push(r.unwrap_or_default()),
            Err(_) => {
                h.abort();
                results.push(ConnResult::default());
            }
        }
    }

    let mut lost_tail = 0u64;
    let mut lost_conns = 0u64;
    let mut stalled = 0u64;
    let mut stalled_4008 = 0u64;
    let mut stalled_codes = std::collections::BTreeMap::<String, u64>::new();
    let mut measured = 0u64;
    // Per URL: connections ready and events received (per node of a cluster).
    let mut per_url = vec![(0u64, 0u64); a.url.len()];
    for r in &results {
        if r.connected {
            per_url[r.url].0 += 1;
            per_url[r.url].1 += r.received;
        }
        if r.stalled {
            stalled += 1;
            *stalled_codes
                .entry(r.close_code.map(|c| c.to_string()).unwrap_or("none".into()))
                .or_default() += 1;
            if r.close_code == Some(4008) {
                stalled_4008 += 1;
            }
            continue;
        }
        if !r.connected {
            continue;
        }
        measured += 1;
        if let Some(&fin) = expected_per_key.get(r.key)
            && fin > r.last_seq
        {
            lost_tail += fin - r.last_seq;
            lost_conns += 1;
        }
    }
    let h = hist.lock().unwrap();
    let received = shared.received.load(Relaxed);
    let span_s = (shared
        .last_recv_us
        .load(Relaxed)
        .saturating_sub(write_start_us)) as f64
        / 1e6;
    let gaps = shared.gaps.load(Relaxed);
    let errors = shared.connect_errors.load(Relaxed)
        + shared.handshake_errors.load(Relaxed)
        + shared.closed_early.load(Relaxed)
        + shared.parse_errors.load(Relaxed)
        + shared.out_of_order.load(Relaxed)
        + shared.wrong_key.load(Relaxed);
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "{}",
        json!({
            "label": a.label, "mode": "run", "connections": ready, "requested": a.conns,
            "ready_on_open": a.ready_on_open,
            "users": users, "keys": keys.len(), "measured_connections": measured,
            "connect_seconds": connect_secs,
            "writer": write_json,
            "expected": expected_total, "received": received,
            "events_per_s": if span_s > 0.0 { received as f64 / span_s } else { 0.0 },
            "lost": gaps + lost_tail, "lost_gaps": gaps, "lost_tail": lost_tail,
            "connections_with_loss": lost_conns,
            "p50_ms": ms(h.value_at_quantile(0.5)), "p99_ms": ms(h.value_at_quantile(0.99)),
            "p999_ms": ms(h.value_at_quantile(0.999)), "max_ms": ms(h.max()),
            "errors": errors,
            "connect_errors": shared.connect_errors.load(Relaxed),
            "handshake_errors": shared.handshake_errors.load(Relaxed),
            "closed_early": shared.closed_early.load(Relaxed),
            "parse_errors": shared.parse_errors.load(Relaxed),
            "out_of_order": shared.out_of_order.load(Relaxed),
            "wrong_key": shared.wrong_key.load(Relaxed),
            "stalled": stalled, "stalled_closed_4008": stalled_4008, "stalled_close_codes": stalled_codes,
            "per_url": a.url.iter().zip(&per_url)
                .map(|(u, (c, n))| json!({"url": u, "connections": c, "received": n}))
                .collect::<Vec<_>>(),
        })
    );
    Ok(())
}
