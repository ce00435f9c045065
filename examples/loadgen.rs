//! Load generator for changecast and its peers (issue 7, `bench/run.sh`).
//!
//! Three modes (and `parse-cost`, below):
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
//! Receiving: after the HTTP upgrade (by hand, so the frames that come with the 101 are kept),
//! each connection reads into the thread's one 64 KiB buffer and handles every complete
//! WebSocket frame of the read in place (`WsConn`, `parse_ws_frame`): one receive time per
//! read, no allocation per frame, only an incomplete tail kept per connection; pings are
//! answered with a masked pong; fragmented, masked, oversized or reserved frames end the
//! connection (`closed_early`). Each text frame is read in one pass over its bytes, without allocating
//! (`read_frame`): it must be one well-formed JSON object, and only `type` and, for `change`,
//! `doc.creator_id`, `doc.quantity` and `doc.status` are taken from it. A malformed frame counts
//! as `parse_errors`, a well-formed one of another type after `ready` as `unexpected`; both are
//! errors. `loadgen parse-cost` times that reader. The output's `client_busy` is the load
//! generator's own CPU share from the first write to the end of the drain: near 1.0, the load
//! generator (its one core), not the server, may be what limits the run.
//!
//! `--url` takes several URLs (comma-separated, the nodes of a cluster): each key's
//! connections go to them in turn, and the output counts connections and events per URL.
//!
//! `--db` is an SQLite file, or a PostgreSQL database (`postgres://user@host:port/db`, for
//! the PostgreSQL source, `bench/postgres.sh`): `init` makes the same tables there (`owner`
//! as jsonb), and the writer inserts each tick's rows with one `INSERT ... SELECT FROM
//! unnest(...)` (one transaction per tick, as on SQLite).
//!
//! Output: one JSON line on stdout.

#![recursion_limit = "256"]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;
use std::cell::RefCell;
use std::ops::ControlFlow;

use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
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
    /// Times the receive path's frame reader on a `change` event (ns per frame).
    ParseCost {
        #[arg(long, default_value_t = 2_000_000)]
        frames: u32,
    },
}

#[derive(clap::Args, Clone)]
struct WriterArgs {
    /// The SQLite file the server tails, or a `postgres://` URL.
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
        Cmd::ParseCost { frames } => {
            let t = Instant::now();
            let mut sum = 0u64;
            for _ in 0..frames {
                if let Some(Frame::Change { seq, .. }) =
                    read_frame(std::hint::black_box(SAMPLE_CHANGE))
                {
                    sum = sum.wrapping_add(seq);
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(frames.max(1));
            println!(
                "{}",
                json!({"frames": frames, "bytes": SAMPLE_CHANGE.len(), "ns_per_frame": ns, "check": sum})
            );
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
    if is_pg(db) {
        return init_pg(db, users, businesses);
    }
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
    if is_pg(&w.db) {
        return write_orders_pg(w, keys);
    }
    let conn = rusqlite::Connection::open(&w.db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let run = format!("{:x}", now_us());
    let mut stmt = conn.prepare(
        "INSERT INTO orders (_id, creator_id, item_id, quantity, status) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let k = keys.len().max(1) as u64;
    open_loop(w, k, |rows| {
        conn.execute_batch("BEGIN")?;
        for n in rows {
            let key = &keys[(n % k) as usize];
            let seq = n / k + 1;
            stmt.execute((
                format!("{run}-{n}"),
                key,
                "i1",
                seq as i64,
                now_us().to_string(),
            ))?;
        }
        conn.execute_batch("COMMIT")?;
        Ok(())
    })
}

/// The schedule both writers keep: every millisecond, `tick(rows)` writes the rows due by
/// then (`w.rate` a second, `w.duration` seconds in all) in one transaction. `k`: how many
/// keys the rows go round.
fn open_loop(
    w: &WriterArgs,
    k: u64,
    mut tick: impl FnMut(std::ops::Range<u64>) -> anyhow::Result<()>,
) -> anyhow::Result<WriteOutcome> {
    let total = (w.rate * w.duration).round() as u64;
    let start = Instant::now();
    let start_us = now_us();
    let mut n: u64 = 0;
    let mut busy_max = Duration::ZERO;
    while n < total {
        let due = ((start.elapsed().as_secs_f64() * w.rate) as u64).min(total);
        if due > n {
            let t0 = Instant::now();
            tick(n..due)?;
            n = due;
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

/// `--db` names a PostgreSQL database rather than an SQLite file.
fn is_pg(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A current-thread runtime for the PostgreSQL client (the writer runs on a thread of its
/// own, outside the receiving runtime) and a connection on it.
fn pg_connect(url: &str) -> anyhow::Result<(tokio::runtime::Runtime, tokio_postgres::Client)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        anyhow::Ok(client)
    })?;
    Ok((rt, client))
}

/// [`init`] on PostgreSQL: the same tables (fresh), users and businesses.
fn init_pg(url: &str, users: usize, businesses: usize) -> anyhow::Result<()> {
    let (rt, c) = pg_connect(url)?;
    rt.block_on(async {
        c.batch_execute(
            "DROP TABLE IF EXISTS orders, users, businesses;
             CREATE TABLE businesses (_id text PRIMARY KEY, name text NOT NULL, owner jsonb NOT NULL);
             CREATE TABLE users (_id text PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
                                 business_id text NOT NULL);
             CREATE INDEX users_business ON users(business_id);
             CREATE TABLE orders (_id text PRIMARY KEY, creator_id text NOT NULL, item_id text NOT NULL,
                                  quantity integer NOT NULL, status text NOT NULL);",
        )
        .await?;
        c.execute(
            "INSERT INTO businesses SELECT 'b' || i, 'Business ' || i, jsonb_build_object('_id', 'u' || i)
             FROM generate_series(0, $1::int4 - 1) i",
            &[&(businesses as i32)],
        )
        .await?;
        c.execute(
            "INSERT INTO users SELECT 'u' || i, 'u' || i || '@bench.example', 'User ' || i,
                    'b' || (i % $2::int4) FROM generate_series(0, $1::int4 - 1) i",
            &[&(users as i32), &(businesses.max(1) as i32)],
        )
        .await?;
        anyhow::Ok(())
    })?;
    println!(
        "{}",
        json!({"init": url, "users": users, "businesses": businesses})
    );
    Ok(())
}

/// [`write_orders`] on PostgreSQL: the same rows and ticks; each tick's rows are one
/// statement (`unnest` of arrays), so one transaction, one round trip.
fn write_orders_pg(w: &WriterArgs, keys: &[String]) -> anyhow::Result<WriteOutcome> {
    let (rt, client) = pg_connect(&w.db)?;
    let insert = rt.block_on(client.prepare(
        "INSERT INTO orders (_id, creator_id, item_id, quantity, status)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[])",
    ))?;
    let run = format!("{:x}", now_us());
    let k = keys.len().max(1) as u64;
    open_loop(w, k, |rows| {
        let (mut ids, mut ks, mut items, mut seqs, mut statuses) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for n in rows {
            ids.push(format!("{run}-{n}"));
            ks.push(keys[(n % k) as usize].clone());
            items.push("i1");
            seqs.push((n / k + 1) as i32);
            statuses.push(now_us().to_string());
        }
        rt.block_on(client.execute(&insert, &[&ids, &ks, &items, &seqs, &statuses]))?;
        Ok(())
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
    /// Well-formed frames other than `change` after `ready` (and binary frames).
    unexpected: AtomicU64,
    out_of_order: AtomicU64,
    wrong_key: AtomicU64,
    gaps: AtomicU64,
    /// Socket reads of the receive loops (events per read: how much each read batches).
    reads: AtomicU64,
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

/// A text frame as the receive loop sees it: read in one pass over the bytes, without
/// allocating and without building a JSON tree, yet checked to be one well-formed JSON object.
#[derive(Debug, PartialEq)]
enum Frame<'a> {
    /// A `change` event: `doc.creator_id` (the stream key), `doc.quantity` (the per-key
    /// sequence) and `doc.status` (the insert time, µs, as decimal text).
    Change { key: &'a str, seq: u64, ts_us: u64 },
    /// A well-formed event of another `type` (`ready`, `gap`, …).
    Other(&'a str),
}

/// A `change` event as changecast writes it in this benchmark (`parse-cost`, the tests).
const SAMPLE_CHANGE: &str = r#"{"type":"change","id":"mio3k2x1a-7","route":"orders","op":"insert","collection":"orders","key":"19a-7","at":"2026-12-01T22:30:00.123Z","doc":{"_id":"19a-7","creator_id":"b2","item_id":"i1","quantity":12345,"status":"1764628200123456"}}"#;

/// Nesting allowed in the values the scanner skips (a hostile frame cannot recurse deeper).
const MAX_DEPTH: u32 = 32;

/// Reads a frame; `None` for anything that is not one JSON object with a string `type` (and,
/// for `change`, a `doc` object with a string `creator_id`, an unsigned integer `quantity`
/// and a `status` of decimal digits), or that has anything after the object.
fn read_frame(s: &str) -> Option<Frame<'_>> {
    let mut c = Scan { s, i: 0 };
    let (mut ty, mut doc) = (None, None);
    c.expect(b'{')?;
    if !c.eat(b'}') {
        loop {
            let name = c.string()?;
            c.expect(b':')?;
            match name {
                "type" => ty = Some(c.string()?),
                "doc" if c.peek() == Some(b'{') => doc = Some(c.doc()?),
                _ => c.skip(MAX_DEPTH)?,
            }
            if c.eat(b'}') {
                break;
            }
            c.expect(b',')?;
        }
    }
    c.ws();
    if c.i != s.len() {
        return None;
    }
    match ty? {
        "change" => {
            let (key, seq, status) = doc?;
            Some(Frame::Change {
                key: key?,
                seq: seq?,
                ts_us: status?.parse().ok()?,
            })
        }
        other => Some(Frame::Other(other)),
    }
}

/// The bytes a JSON string holds as they are: all but `"`, `\` and control characters.
const PLAIN: [bool; 256] = {
    let mut t = [true; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = false;
        i += 1;
    }
    t[b'"' as usize] = false;
    t[b'\\' as usize] = false;
    t
};

/// The high bit of each byte of `w` that is `"`, `\\` or a control character (and perhaps of
/// bytes above the first such one: only the lowest is used).
fn not_plain(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x;
    let (quote, backslash) = (w ^ (ONES * u64::from(b'"')), w ^ (ONES * u64::from(b'\\')));
    (zero_byte(quote) | zero_byte(backslash) | (w.wrapping_sub(ONES * 0x20) & !w)) & HIGH
}

/// A cursor over a frame's text: the smallest JSON reader the receive path needs.
struct Scan<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.as_bytes().get(self.i).copied()
    }
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.s.as_bytes().get(self.i) {
            self.i += 1;
        }
    }
    /// Consumes `b` if it is next.
    fn eat(&mut self, b: u8) -> bool {
        let next = self.peek() == Some(b);
        if next {
            self.i += 1;
        }
        next
    }
    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }
    /// A string's text as written (escapes checked, left as they are: the fields read here
    /// never need one, and a key written with one is simply another key).
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let (b, start) = (self.s.as_bytes(), self.i);
        let mut i = start;
        loop {
            // Eight bytes at a time to the next byte that is not plain: this loop is most of
            // the frame; then byte by byte for the tail.
            while let Some(w) = b.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
                let m = not_plain(u64::from_le_bytes(w));
                if m != 0 {
                    i += (m.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
            }
            while i < b.len() && PLAIN[usize::from(b[i])] {
                i += 1;
            }
            match *b.get(i)? {
                b'"' => {
                    self.i = i + 1;
                    // Both ends are ASCII quotes, so this is a char boundary.
                    return self.s.get(start..i);
                }
                b'\\' => match *b.get(i + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                    b'u' if b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => i += 6,
                    _ => return None,
                },
                _ => return None, // a control character
            }
        }
    }
    /// An unsigned integer (no sign, fraction or exponent), without overflow.
    fn uint(&mut self) -> Option<u64> {
        self.ws();
        let (b, start) = (self.s.as_bytes(), self.i);
        let mut v: u64 = 0;
        while let Some(d @ b'0'..=b'9') = b.get(self.i) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        let more = matches!(b.get(self.i), Some(b'.' | b'e' | b'E'));
        (self.i > start && !more).then_some(v)
    }
    /// The `doc` object: the three fields the writer put there, each `None` if absent.
    #[allow(clippy::type_complexity)]
    fn doc(&mut self) -> Option<(Option<&'a str>, Option<u64>, Option<&'a str>)> {
        let (mut key, mut seq, mut status) = (None, None, None);
        self.expect(b'{')?;
        if self.eat(b'}') {
            return Some((key, seq, status));
        }
        loop {
            let name = self.string()?;
            self.expect(b':')?;
            match name {
                "creator_id" => key = Some(self.string()?),
                "quantity" => seq = Some(self.uint()?),
                "status" => status = Some(self.string()?),
                _ => self.skip(MAX_DEPTH - 1)?,
            }
            if self.eat(b'}') {
                return Some((key, seq, status));
            }
            self.expect(b',')?;
        }
    }
    /// Skips one value, checking its syntax.
    fn skip(&mut self, depth: u32) -> Option<()> {
        let close = match self.peek()? {
            b'"' => return self.string().map(drop),
            b'{' => b'}',
            b'[' => b']',
            b't' => return self.literal("true"),
            b'f' => return self.literal("false"),
            b'n' => return self.literal("null"),
            b'-' | b'0'..=b'9' => return self.number(),
            _ => return None,
        };
        let depth = depth.checked_sub(1)?;
        self.i += 1;
        if self.eat(close) {
            return Some(());
        }
        loop {
            if close == b'}' {
                self.string()?;
                self.expect(b':')?;
            }
            self.skip(depth)?;
            if self.eat(close) {
                return Some(());
            }
            self.expect(b',')?;
        }
    }
    fn literal(&mut self, word: &str) -> Option<()> {
        let end = self.i + word.len();
        (self.s.get(self.i..end)? == word).then(|| self.i = end)
    }
    /// A JSON number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        let b = self.s.as_bytes();
        let digits = |i: &mut usize| {
            let from = *i;
            while let Some(b'0'..=b'9') = b.get(*i) {
                *i += 1;
            }
            *i > from
        };
        let mut i = self.i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return None,
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i).then_some(())?;
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            digits(&mut i).then_some(())?;
        }
        self.i = i;
        Some(())
    }
}

/// What the receive loops see of a server's WebSocket frames (pings and pongs are handled by
/// [`WsConn`] itself: a ping is answered with a pong after the read it came in).
#[derive(Debug, PartialEq)]
enum WsEvent<'a> {
    /// A text frame's payload, checked to be UTF-8 (invalid UTF-8 is a protocol error).
    Text(&'a str),
    Binary,
    /// A close frame and its status code, if it has one.
    Close(Option<u16>),
}

/// One frame at the start of a buffer, its payload borrowed from it.
#[derive(Debug, PartialEq)]
enum WsFrame<'a> {
    Text(&'a [u8]),
    Binary,
    Ping(&'a [u8]),
    Pong,
    Close(Option<u16>),
}

/// Frames this client refuses (the connection is then counted as closed early).
#[derive(Debug, PartialEq)]
enum WsError {
    /// A continuation frame or one without FIN: the servers measured never fragment.
    Fragmented,
    /// Reserved bits (no extension is negotiated), a reserved opcode, a masked server frame,
    /// a control frame over 125 bytes, a close payload of one byte, text that is not UTF-8.
    Protocol,
    /// A payload over [`MAX_FRAME`].
    TooLong,
    /// The peer closed the TCP connection, or a socket error.
    Io,
}

/// The largest frame accepted (tungstenite's default, 16 MiB).
const MAX_FRAME: usize = 16 << 20;

/// Reads one server→client frame (unmasked) at the start of `buf`: the frame and its length
/// in bytes, `Ok(None)` if `buf` holds only part of it.
fn parse_ws_frame(buf: &[u8]) -> Result<Option<(WsFrame<'_>, usize)>, WsError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0f);
    if rsv != 0 || b1 & 0x80 != 0 {
        return Err(WsError::Protocol);
    }
    if opcode == 0 || !fin {
        return Err(WsError::Fragmented);
    }
    let (len, head) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(l) => (u64::from(u16::from_be_bytes([l[0], l[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|l| <[u8; 8]>::try_from(l).ok()) {
            Some(l) => (u64::from_be_bytes(l), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(WsError::TooLong)?;
    if opcode >= 8 && len > 125 {
        return Err(WsError::Protocol);
    }
    let Some(payload) = buf.get(head..head + len) else {
        return Ok(None);
    };
    let frame = match opcode {
        1 => WsFrame::Text(payload),
        2 => WsFrame::Binary,
        8 => match *payload {
            [] => WsFrame::Close(None),
            [_] => return Err(WsError::Protocol),
            [a, b, ..] => WsFrame::Close(Some(u16::from_be_bytes([a, b]))),
        },
        9 => WsFrame::Ping(payload),
        10 => WsFrame::Pong,
        _ => return Err(WsError::Protocol),
    };
    Ok(Some((frame, head + len)))
}

/// Hands every complete frame of `buf` to `f` (all with the receive time `now`), answering
/// pings into `pong`; returns how many bytes were used and whether `f` asked to stop.
fn parse_frames(
    buf: &[u8],
    now: u64,
    pong: &mut Option<Vec<u8>>,
    f: &mut impl FnMut(WsEvent<'_>, u64) -> ControlFlow<()>,
) -> Result<(usize, ControlFlow<()>), WsError> {
    let mut at = 0;
    while let Some((frame, n)) = parse_ws_frame(&buf[at..])? {
        at += n;
        let ev = match frame {
            WsFrame::Text(t) => {
                WsEvent::Text(std::str::from_utf8(t).map_err(|_| WsError::Protocol)?)
            }
            WsFrame::Binary => WsEvent::Binary,
            WsFrame::Close(c) => WsEvent::Close(c),
            WsFrame::Ping(p) => {
                // Only the latest ping needs its pong (RFC 6455 §5.5.3).
                *pong = Some(masked_frame(0xA, p));
                continue;
            }
            WsFrame::Pong => continue,
        };
        if f(ev, now).is_break() {
            return Ok((at, ControlFlow::Break(())));
        }
    }
    Ok((at, ControlFlow::Continue(())))
}

/// A client→server frame (FIN, `opcode`, masked) carrying `payload` (at most 125 bytes).
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    // Any mask will do for this benchmark client (RFC 6455 wants it unpredictable to keep
    // proxies from being poisoned by a browser's script; no proxy sits in between here).
    let mask = (now_us() as u32 | 1).to_le_bytes();
    let mut v = Vec::with_capacity(6 + payload.len());
    v.push(0x80 | opcode);
    v.push(0x80 | payload.len().min(125) as u8);
    v.extend_from_slice(&mask);
    v.extend(
        payload
            .iter()
            .take(125)
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m),
    );
    v
}

/// Bytes read from the socket at most per read.
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The one read buffer of this thread's connections: a connection reads into it only
    /// between two awaits, and keeps just the incomplete tail of its last read.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A client WebSocket connection read in large reads: every complete frame of a read is
/// handed over in place, with one receive timestamp per read and no allocation per frame.
struct WsConn {
    stream: TcpStream,
    /// Bytes of a frame not yet complete; or, with `unread`, frames not yet handed over.
    pending: Vec<u8>,
    /// `pending` may hold complete frames (left by the handshake or by a stop in `read_batch`).
    unread: bool,
    pong: Option<Vec<u8>>,
}

impl WsConn {
    /// The HTTP upgrade, done by hand so the bytes after the 101 (the first frames) are kept.
    async fn handshake(mut stream: TcpStream, url: &str) -> anyhow::Result<WsConn> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow::anyhow!("not ws://"))?;
        let (host, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let key = generate_key();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            anyhow::ensure!(buf.len() < 16 * 1024, "response head too long");
            if stream.read_buf(&mut buf).await? == 0 {
                anyhow::bail!("closed during the handshake");
            }
        };
        let head = std::str::from_utf8(&buf[..end])?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("");
        anyhow::ensure!(status.split(' ').nth(1) == Some("101"), "no 101: {status}");
        let accept = derive_accept_key(key.as_bytes());
        let accepted = lines.filter_map(|l| l.split_once(':')).any(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept
        });
        anyhow::ensure!(accepted, "wrong or missing Sec-WebSocket-Accept");
        let pending = buf[end..].to_vec();
        Ok(WsConn {
            stream,
            unread: !pending.is_empty(),
            pending,
            pong: None,
        })
    }

    /// Waits for one read and hands its complete frames to `f`, which may stop early (the
    /// frames after that one stay for the next call). `Continue` = read again.
    /// Cancel-safe: it waits only for the socket to be readable (and for a pong to go out).
    async fn read_batch(
        &mut self,
        f: &mut impl FnMut(WsEvent<'_>, u64) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, WsError> {
        if self.unread {
            self.unread = false;
            let (used, flow) = parse_frames(&self.pending, now_us(), &mut self.pong, f)?;
            self.pending.drain(..used);
            if flow.is_break() {
                self.unread = true;
                return Ok(flow);
            }
        }
        if let Some(p) = self.pong.take() {
            self.stream.write_all(&p).await.map_err(|_| WsError::Io)?;
        }
        // `poll_read` rather than `readable` + `try_read`: after a short read tokio marks the
        // socket not ready, so the next wait goes straight to epoll instead of costing a
        // read that would block. The buffer is borrowed only within one poll.
        let flow = std::future::poll_fn(|cx| {
            SCRATCH.with_borrow_mut(|scratch| {
                let p = self.pending.len();
                if scratch.len() < p + READ_CHUNK {
                    scratch.resize(p + READ_CHUNK, 0);
                }
                let mut rb = ReadBuf::new(&mut scratch[p..p + READ_CHUNK]);
                match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(WsError::Io)),
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        return Poll::Ready(Err(WsError::Io));
                    }
                    Poll::Ready(Ok(())) => {}
                }
                let n = rb.filled().len();
                scratch[..p].copy_from_slice(&self.pending);
                let buf = &scratch[..p + n];
                let (used, flow) = match parse_frames(buf, now_us(), &mut self.pong, f) {
                    Ok(x) => x,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                self.pending.clear();
                self.pending.extend_from_slice(&buf[used..]);
                // A connection's idle tail buffer stays small.
                if self.pending.is_empty() && self.pending.capacity() > 4096 {
                    self.pending = Vec::new();
                }
                self.unread = flow.is_break() && !self.pending.is_empty();
                Poll::Ready(Ok(flow))
            })
        })
        .await?;
        if let Some(p) = self.pong.take() {
            self.stream.write_all(&p).await.map_err(|_| WsError::Io)?;
        }
        Ok(flow)
    }

    /// Reads until the `ready` event; `Err` with the close code if the connection closes or
    /// fails first.
    async fn wait_ready(&mut self) -> Result<(), Option<u16>> {
        loop {
            let mut close = None;
            let b = self
                .read_batch(&mut |ev, _| match ev {
                    WsEvent::Text(t) if read_frame(t) == Some(Frame::Other("ready")) => {
                        ControlFlow::Break(())
                    }
                    WsEvent::Close(c) => {
                        close = Some(c);
                        ControlFlow::Break(())
                    }
                    _ => ControlFlow::Continue(()),
                })
                .await;
            match b {
                Ok(ControlFlow::Continue(())) => {}
                Ok(ControlFlow::Break(())) => return close.map_or(Ok(()), Err),
                Err(_) => return Err(None),
            }
        }
    }
}

/// CPU time this process has used so far, in seconds (utime + stime from /proc/self/stat,
/// 100 ticks a second as on Linux here); `None` where there is no /proc.
fn self_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut f = stat.rsplit_once(") ")?.1.split(' ').skip(11);
    let (u, s): (u64, u64) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    Some((u + s) as f64 / 100.0)
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
        // The key this connection must see: compared byte for byte with each event's.
        let my_key: Arc<str> = keys[key].as_str().into();
        let (hist, shared, stop, release, sem) = (
            hist.clone(),
            shared.clone(),
            stop.clone(),
            release_stalled.clone(),
            sem.clone(),
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
            let mut ws = match WsConn::handshake(stream, &url).await {
                Ok(ws) => ws,
                Err(_) => {
                    shared.handshake_errors.fetch_add(1, Relaxed);
                    return r;
                }
            };
            // Wait for `ready` (unless the 101 is the signal).
            if !ready_on_open && let Err(code) = ws.wait_ready().await {
                r.close_code = code;
                shared.handshake_errors.fetch_add(1, Relaxed);
                return r;
            }
            drop(permit);
            r.connected = true;
            shared.ready.fetch_add(1, Relaxed);
            if idle {
                // Keep reading (pings are answered while reading), until told to stop.
                let mut on = |ev: WsEvent<'_>, _| match ev {
                    WsEvent::Close(_) => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                };
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        b = ws.read_batch(&mut on) => if !matches!(b, Ok(ControlFlow::Continue(()))) {
                            shared.closed_early.fetch_add(1, Relaxed);
                            break;
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
                let mut code = None;
                let mut on = |ev: WsEvent<'_>, _| match ev {
                    WsEvent::Close(c) => {
                        code = c;
                        ControlFlow::Break(())
                    }
                    _ => ControlFlow::Continue(()),
                };
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        b = ws.read_batch(&mut on) => if !matches!(b, Ok(ControlFlow::Continue(()))) { break; }
                    }
                }
                r.close_code = code;
                return r;
            }
            // One cancellation future for the whole loop: a new one per event would register
            // (and unregister) a waiter with the token on every wake-up.
            let stopped = stop.cancelled();
            tokio::pin!(stopped);
            // Counted per read, added to the shared counters once per read.
            let (mut wrong_key, mut out_of_order, mut gaps, mut unexpected, mut parse_errors) =
                (0u64, 0u64, 0u64, 0u64, 0u64);
            let mut reads = 0u64;
            let mut close = None;
            loop {
                let before = r.received;
                let mut latest = 0u64;
                let mut on = |ev: WsEvent<'_>, now: u64| {
                        match ev {
                            WsEvent::Text(t) => match read_frame(t) {
                                Some(Frame::Change { key, seq, ts_us }) => {
                                    if key != &*my_key {
                                        wrong_key += 1;
                                    } else if seq <= r.last_seq {
                                        out_of_order += 1;
                                    } else {
                                        gaps += seq - r.last_seq - 1;
                                        r.last_seq = seq;
                                        r.received += 1;
                                        latest = now;
                                        hist.lock().unwrap().saturating_record(now.saturating_sub(ts_us).max(1));
                                    }
                                }
                                // Nothing but `change` is expected once `ready` has come.
                                Some(Frame::Other(_)) => unexpected += 1,
                                None => parse_errors += 1,
                            },
                            WsEvent::Binary => unexpected += 1,
                            WsEvent::Close(c) => {
                                close = Some(c);
                                return ControlFlow::Break(());
                            }
                        }
                        ControlFlow::Continue(())
                };
                let b = tokio::select! {
                    biased;
                    b = ws.read_batch(&mut on) => b,
                    _ = &mut stopped => break,
                };
                reads += 1;
                if r.received > before {
                    shared.received.fetch_add(r.received - before, Relaxed);
                    shared.last_recv_us.fetch_max(latest, Relaxed);
                }
                if !matches!(b, Ok(ControlFlow::Continue(()))) {
                    r.close_code = close.flatten();
                    shared.closed_early.fetch_add(1, Relaxed);
                    break;
                }
            }
            for (c, n) in [
                (&shared.wrong_key, wrong_key),
                (&shared.out_of_order, out_of_order),
                (&shared.gaps, gaps),
                (&shared.unexpected, unexpected),
                (&shared.parse_errors, parse_errors),
                (&shared.reads, reads),
            ] {
                c.fetch_add(n, Relaxed);
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
    // The load generator's own CPU from the first write to the end of the drain: near one
    // second per second means it, not the server, may be what limits the run.
    let (cpu_w0, wall_w0) = (self_cpu_s(), Instant::now());
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
    let client_write = self_cpu_s()
        .zip(cpu_w0)
        .map(|(c1, c0)| (c1 - c0, (c1 - c0) / wall_w0.elapsed().as_secs_f64()));
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
        + shared.unexpected.load(Relaxed)
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
            "writer": write_json, "rate": a.w.rate,
            "client_cpu_s": self_cpu_s(),
            "client_write_cpu_s": client_write.map(|c| c.0),
            "client_busy": client_write.map(|c| c.1),
            "expected": expected_total, "received": received,
            "client_reads": shared.reads.load(Relaxed),
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
            "unexpected": shared.unexpected.load(Relaxed),
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHANGE: &str = SAMPLE_CHANGE;

    fn change(key: &str, seq: u64, ts_us: u64) -> Option<Frame<'_>> {
        Some(Frame::Change { key, seq, ts_us })
    }

    #[test]
    fn reads_the_three_fields_of_a_change_in_any_order() {
        assert_eq!(read_frame(CHANGE), change("b2", 12345, 1764628200123456));
        let reordered = r#" { "doc" : { "status" : "5", "quantity" : 3, "x" : [1, -2.5e+3, {"a": null}], "creator_id" : "u7" } , "n": 0, "ok": true, "type" : "change" } "#;
        assert_eq!(read_frame(reordered), change("u7", 3, 5));
        let escaped = r#"{"type":"change","note":"a \"quoted\" \\ \u00e9 é","doc":{"creator_id":"b0","quantity":1,"status":"9"}}"#;
        assert_eq!(read_frame(escaped), change("b0", 1, 9));
    }

    #[test]
    fn other_event_types_are_read_as_other() {
        let ready = r#"{"type":"ready","user":"u1","position":"e7-1042","resumed":false}"#;
        assert_eq!(read_frame(ready), Some(Frame::Other("ready")));
        let gap = r#"{"type":"gap","since":"e7-12","position":"e7-1042"}"#;
        assert_eq!(read_frame(gap), Some(Frame::Other("gap")));
    }

    #[test]
    fn malformed_frames_are_refused() {
        let deep = format!(
            r#"{{"type":"change","x":{}{},"doc":{{"creator_id":"b2","quantity":1,"status":"1"}}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        let mut bad = vec![
            "",
            "[]",
            "{",
            r#"{"type":"change"}"#,
            r#"{"type":7,"doc":{"creator_id":"b2","quantity":1,"status":"1"}}"#,
            r#"{"doc":{"creator_id":"b2","quantity":1,"status":"1"}}"#,
            r#"{"type":"change","doc":{"quantity":1,"status":"1"}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","status":"1"}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":1}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":1.5,"status":"1"}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":-1,"status":"1"}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":99999999999999999999,"status":"1"}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":1,"status":"1x"}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":1,"status":1}}"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":1,"status":"1"}} x"#,
            r#"{"type":"change","doc":{"creator_id":"b2","quantity":1,"status":"1"},}"#,
            r#"{"type":"change","n":01,"doc":{"creator_id":"b2","quantity":1,"status":"1"}}"#,
            r#"{"type":"change","n":1.,"doc":{"creator_id":"b2","quantity":1,"status":"1"}}"#,
            r#"{"type":"change","s":"\x","doc":{"creator_id":"b2","quantity":1,"status":"1"}}"#,
            r#"{"type":"change","b":tru,"doc":{"creator_id":"b2","quantity":1,"status":"1"}}"#,
            "{\"type\":\"change\",\"s\":\"a\u{1}b\",\"doc\":{\"creator_id\":\"b2\",\"quantity\":1,\"status\":\"1\"}}",
            &deep,
        ];
        // Every proper prefix of a good frame is refused too (a frame cut short).
        let prefixes: Vec<&str> = (0..CHANGE.len()).map(|n| &CHANGE[..n]).collect();
        bad.extend(prefixes);
        for f in bad {
            assert_eq!(read_frame(f), None, "accepted: {f}");
        }
        // Nesting up to the limit is fine.
        let nested = format!(
            r#"{{"type":"change","x":{}{},"doc":{{"creator_id":"b2","quantity":1,"status":"1"}}}}"#,
            "[".repeat(30),
            "]".repeat(30)
        );
        assert_eq!(read_frame(&nested), change("b2", 1, 1));
    }

    /// A server→client frame: FIN (unless `fin` is false), `opcode`, unmasked.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => v.push(n as u8),
            n if n <= 0xffff => {
                v.push(126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(payload);
        v
    }

    /// Every event of `buf`, as owned values, and the bytes used.
    fn events(buf: &[u8], pong: &mut Option<Vec<u8>>) -> Result<(Vec<String>, usize), WsError> {
        let mut out = vec![];
        let (used, flow) = parse_frames(buf, 7, pong, &mut |ev, now| {
            assert_eq!(now, 7, "one timestamp per read");
            out.push(match ev {
                WsEvent::Text(t) => format!("text:{t}"),
                WsEvent::Binary => "binary".into(),
                WsEvent::Close(c) => format!("close:{c:?}"),
            });
            ControlFlow::Continue(())
        })?;
        assert!(flow.is_continue());
        Ok((out, used))
    }

    #[test]
    fn several_frames_in_one_read_are_all_read_in_place() {
        let mut buf = server_frame(true, 1, CHANGE.as_bytes());
        buf.extend(server_frame(true, 1, b"{\"type\":\"ready\"}"));
        buf.extend(server_frame(true, 8, &4008u16.to_be_bytes()));
        let (ev, used) = events(&buf, &mut None).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(
            ev,
            [
                format!("text:{CHANGE}"),
                "text:{\"type\":\"ready\"}".into(),
                "close:Some(4008)".into()
            ]
        );
    }

    #[test]
    fn a_frame_split_across_reads_waits_for_its_rest() {
        let mut buf = server_frame(true, 1, b"first");
        let second = server_frame(true, 1, CHANGE.as_bytes());
        buf.extend(&second);
        let one = server_frame(true, 1, b"first").len();
        // Cut anywhere inside the second frame (header included): only the first is read.
        for cut in one..buf.len() {
            let (ev, used) = events(&buf[..cut], &mut None).unwrap();
            assert_eq!((ev.len(), used), (1, one), "cut at {cut}");
        }
        // Cut inside the first frame: nothing is read.
        for cut in 0..one {
            assert_eq!(events(&buf[..cut], &mut None).unwrap(), (vec![], 0));
        }
    }

    #[test]
    fn sixteen_and_sixty_four_bit_lengths_are_read() {
        for n in [125usize, 126, 300, 0xffff, 0x1_0000, 200_000] {
            let text = "x".repeat(n);
            let f = server_frame(true, 1, text.as_bytes());
            let head = match n {
                0..126 => 2,
                126..=0xffff => 4,
                _ => 10,
            };
            assert_eq!(f.len(), head + n);
            let (ev, used) = events(&f, &mut None).unwrap();
            assert_eq!(
                (ev, used),
                (vec![format!("text:{text}")], f.len()),
                "length {n}"
            );
            assert_eq!(events(&f[..f.len() - 1], &mut None).unwrap(), (vec![], 0));
        }
        // A length over the limit (or one that does not fit) is refused before any payload.
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_ws_frame(&huge), Err(WsError::TooLong));
    }

    #[test]
    fn a_ping_is_answered_with_a_masked_pong_of_its_payload() {
        let mut buf = server_frame(true, 9, b"hb-1");
        buf.extend(server_frame(true, 10, b"ignored"));
        buf.extend(server_frame(true, 1, b"after"));
        let mut pong = None;
        let (ev, used) = events(&buf, &mut pong).unwrap();
        assert_eq!((ev, used), (vec!["text:after".to_string()], buf.len()));
        let pong = pong.expect("a pong is due");
        assert_eq!(pong[0], 0x8A, "FIN + pong");
        assert_eq!(pong[1], 0x80 | 4, "masked, 4 bytes");
        let mask = &pong[2..6];
        let unmasked: Vec<u8> = pong[6..]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        assert_eq!(unmasked, b"hb-1");
    }

    #[test]
    fn close_frames_carry_their_code() {
        let with = server_frame(true, 8, &[0x0f, 0xa8, b'b', b'y', b'e']);
        assert_eq!(events(&with, &mut None).unwrap().0, ["close:Some(4008)"]);
        let without = server_frame(true, 8, b"");
        assert_eq!(events(&without, &mut None).unwrap().0, ["close:None"]);
        let one_byte = server_frame(true, 8, b"x");
        assert_eq!(parse_ws_frame(&one_byte), Err(WsError::Protocol));
    }

    #[test]
    fn fragments_and_protocol_violations_are_refused() {
        // A first fragment (no FIN) and a continuation frame.
        assert_eq!(
            parse_ws_frame(&server_frame(false, 1, b"par")),
            Err(WsError::Fragmented)
        );
        assert_eq!(
            parse_ws_frame(&server_frame(true, 0, b"t")),
            Err(WsError::Fragmented)
        );
        // Reserved bits, reserved opcodes, a masked server frame, a long control frame.
        assert_eq!(parse_ws_frame(&[0xC1, 0]), Err(WsError::Protocol));
        assert_eq!(parse_ws_frame(&[0x83, 0]), Err(WsError::Protocol));
        assert_eq!(parse_ws_frame(&[0x8B, 0]), Err(WsError::Protocol));
        assert_eq!(
            parse_ws_frame(&[0x81, 0x81, 1, 2, 3, 4, b'a']),
            Err(WsError::Protocol)
        );
        assert_eq!(
            parse_ws_frame(&server_frame(true, 9, &[0; 126])),
            Err(WsError::Protocol)
        );
        // Text that is not UTF-8.
        assert_eq!(
            events(&server_frame(true, 1, &[0xff, 0xfe]), &mut None),
            Err(WsError::Protocol)
        );
        // A binary frame is read (and counted as unexpected by the receive loop).
        assert_eq!(
            events(&server_frame(true, 2, b"\x00\x01"), &mut None)
                .unwrap()
                .0,
            ["binary"]
        );
    }

    #[test]
    fn a_stop_leaves_the_following_frames_unread() {
        let mut buf = server_frame(true, 1, b"{\"type\":\"ready\"}");
        let rest = server_frame(true, 1, b"next");
        buf.extend(&rest);
        let (used, flow) =
            parse_frames(&buf, 0, &mut None, &mut |_, _| ControlFlow::Break(())).unwrap();
        assert!(flow.is_break());
        assert_eq!(&buf[used..], &rest[..]);
    }

    /// A real loopback socket: the frames sent with the 101 are kept, `ready` is found, a
    /// change split over two writes is read whole, a ping gets its pong, a close its code.
    #[tokio::test]
    async fn a_connection_reads_frames_from_the_101_on_and_answers_pings() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                assert!(s.read_buf(&mut req).await.unwrap() > 0);
            }
            let req = String::from_utf8(req).unwrap();
            assert!(req.starts_with("GET /v1/ws?token=t HTTP/1.1\r\n"), "{req}");
            let key = req
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 sec-websocket-accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
            .into_bytes();
            out.extend(server_frame(true, 1, br#"{"type":"ready"}"#));
            out.extend(server_frame(true, 1, CHANGE.as_bytes()));
            s.write_all(&out).await.unwrap();
            let change = server_frame(true, 1, CHANGE.as_bytes());
            s.write_all(&change[..5]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.write_all(&change[5..]).await.unwrap();
            s.write_all(&server_frame(true, 9, b"hb")).await.unwrap();
            let mut pong = [0u8; 8];
            s.read_exact(&mut pong).await.unwrap();
            let body: Vec<u8> = pong[6..]
                .iter()
                .zip(&pong[2..6])
                .map(|(b, m)| b ^ m)
                .collect();
            assert_eq!((pong[0], pong[1], &body[..]), (0x8A, 0x82, &b"hb"[..]));
            s.write_all(&server_frame(true, 8, &4008u16.to_be_bytes()))
                .await
                .unwrap();
        });
        // Bounded: a lost frame would otherwise leave the reads waiting.
        let client = async {
            let stream = TcpStream::connect(addr).await.unwrap();
            let mut ws = WsConn::handshake(stream, &format!("ws://{addr}/v1/ws?token=t"))
                .await
                .unwrap();
            ws.wait_ready().await.unwrap();
            let (mut changes, mut close) = (0, None);
            while close.is_none() {
                ws.read_batch(&mut |ev, _| {
                    match ev {
                        WsEvent::Text(t) => {
                            assert_eq!(read_frame(t), change("b2", 12345, 1764628200123456));
                            changes += 1;
                        }
                        WsEvent::Close(c) => close = Some(c),
                        WsEvent::Binary => panic!("binary"),
                    }
                    ControlFlow::Continue(())
                })
                .await
                .unwrap();
            }
            assert_eq!((changes, close), (2, Some(Some(4008))));
        };
        tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .expect("every frame read within 10 s");
        server.await.unwrap();
    }
}
