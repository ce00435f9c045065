//! Test harness: the real server on 127.0.0.1:0 over a real SQLite file, and real
//! WebSocket and SSE clients.

#![allow(dead_code)] // each test binary uses part of the harness

pub mod backend;
pub mod binary;
pub mod cluster;
pub mod nats;
pub mod pg;
pub mod proxy;
pub mod resume;
pub mod server_log;

use std::path::{Path, PathBuf};
use std::time::Duration;

use eventsource_stream::{Event as SseEvent, Eventsource};
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use changecast::config::Config;
use changecast::plan::Plan;
use changecast::server::{self, Running};

pub const SECRET: &str = "e2e-secret";
/// How long any single expected thing may take before the test fails (never hangs).
pub const WAIT: Duration = Duration::from_secs(10);

/// A database with the Mercury schema and seed data in a temp folder.
pub struct Db {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Db {
    pub fn new() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mercury.db");
        changecast::demo::create_database(&path).unwrap();
        Db { dir, path }
    }

    /// Runs SQL on a connection of its own, as the application would.
    pub fn exec(&self, sql: &str) {
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    /// Runs SQL from a separate process (Python's sqlite3 module).
    pub fn exec_in_other_process(&self, sql: &str) {
        let status = std::process::Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=5); c.executescript(sys.argv[2]); c.commit()")
            .arg(&self.path)
            .arg(sql)
            .status()
            .expect("python3 runs");
        assert!(status.success(), "python3 sqlite3 write failed");
    }

    /// The Mercury config for this database, with `extra` TOML appended to `[server]`.
    pub fn config(&self, server_extra: &str, history: usize) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
{server_extra}

[source]
type = "sqlite"
path = "{db}"
poll_interval = "2ms"

[auth]
jwt_secret = "{SECRET}"
user = {{ claim = "user_id", lookup = "users", where = {{ email = "$claim" }}, pick = "_id" }}

[history]
max_per_user = {history}
path = "{history_path}"

[[route]]
name = "orders"
collection = "orders"
on = ["insert", "update", "delete"]
to = {{ lookup = "businesses", where = {{ _id = "$creator_id" }}, pick = "owner._id" }}

[[route]]
name = "inventory"
collection = "inventory_items"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}

[[alert]]
name = "stock_low"
collection = "inventory_items"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}
message = "Stock low: {{{{ doc.name }}}} has {{{{ doc.quantity_in_stock }}}} left. Restock to keep issuing orders."
"#,
            db = self.path.display(),
            history_path = self.dir.path().join("history.db").display(),
        )
    }
}

/// A running gateway.
pub struct Gateway {
    pub running: Running,
    pub addr: std::net::SocketAddr,
}

impl Gateway {
    pub async fn start(config: &str) -> Gateway {
        let plan = Plan::compile(&Config::parse(config).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = server::start(plan, listener, None).await.unwrap();
        let addr = running.local_addr;
        Gateway { running, addr }
    }

    pub async fn stop(self) {
        tokio::time::timeout(WAIT, self.running.stop())
            .await
            .expect("stops in time")
            .unwrap();
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/ws?{query}", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `/readyz`'s status and body.
    pub async fn readyz(&self) -> (u16, String) {
        let res = reqwest::get(self.http("/readyz")).await.unwrap();
        (res.status().as_u16(), res.text().await.unwrap_or_default())
    }

    /// Waits until `/readyz` says ready (the source streams), within [`WAIT`].
    pub async fn ready(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.readyz().await;
            if status == 200 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not ready within {WAIT:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/readyz` is down (503) with a reason containing `text`, within
    /// [`WAIT`]; returns the body.
    pub async fn down_saying(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.readyz().await;
            if status == 503 && body.contains(text) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz did not say {text:?} within {WAIT:?}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Demo emails: u1 owns b1, u2 owns b2, u3 owns b3.
pub fn email_of(user: &str) -> &'static str {
    match user {
        "u1" => "amina@kanograins.example",
        "u2" => "tunde@lagosfresh.example",
        "u3" => "chioma@abujamart.example",
        "u4" => "musa@kanograins.example",
        _ => "nobody@example.com",
    }
}

pub fn token_for(user: &str) -> String {
    token_with_ttl(user, 3600)
}

pub fn token_with_ttl(user: &str, ttl: u64) -> String {
    token_for_email(email_of(user), ttl)
}

/// A token for `email`, in the `user_id` claim every test config looks users up by.
pub fn token_for_email(email: &str, ttl: u64) -> String {
    let mut claims = Map::new();
    claims.insert("user_id".into(), json!(email));
    changecast::auth::mint(SECRET.as_bytes(), email, ttl, &claims)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client.
pub struct Ws {
    pub socket: Socket,
}

/// How a WebSocket read ended.
#[derive(Debug, PartialEq)]
pub enum WsEnd {
    Closed(u16, String),
    Dropped,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        Self::connect_with(url, None).await
    }

    pub async fn connect_with(url: &str, bearer: Option<&str>) -> Ws {
        let mut req = url.into_client_request().unwrap();
        if let Some(t) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connects in time")
            .expect("upgrade accepted");
        Ws { socket }
    }

    /// Connects as `user` with `?token=` and reads `ready`.
    pub async fn user(gw: &Gateway, user: &str, since: Option<&str>) -> (Ws, Value) {
        let mut q = format!("token={}", token_for(user));
        if let Some(s) = since {
            q.push_str(&format!("&since={s}"));
        }
        let mut ws = Ws::connect(&gw.ws_url(&q)).await;
        let ready = ws.next().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        assert_eq!(ready["user"], user);
        (ws, ready)
    }

    /// Connects to the gateway at `addr` as the user whose email is `email` (a token of
    /// 600 s) and reads `ready`.
    pub async fn by_email(addr: std::net::SocketAddr, email: &str) -> (Ws, Value) {
        let token = token_for_email(email, 600);
        let mut ws = Ws::connect(&format!("ws://{addr}/v1/ws?token={token}")).await;
        let ready = ws.next().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        (ws, ready)
    }

    pub async fn send(&mut self, v: Value) {
        self.socket
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON event; panics on close or after [`WAIT`].
    pub async fn next(&mut self) -> Value {
        match self.next_or_end().await {
            Ok(v) => v,
            Err(end) => panic!("expected an event, got {end:?}"),
        }
    }

    /// The next JSON event, or how the connection ended.
    pub async fn next_or_end(&mut self) -> Result<Value, WsEnd> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("no event within the wait");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(Some(f)))) => {
                    return Err(WsEnd::Closed(u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(Message::Close(None))) => {
                    return Err(WsEnd::Closed(u16::from(CloseCode::Status), String::new()));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(WsEnd::Dropped),
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.next_or_end().await {
                Ok(_) => continue,
                Err(WsEnd::Closed(code, _)) => return code,
                Err(WsEnd::Dropped) => panic!("connection dropped without a close frame"),
            }
        }
    }

    /// The next `change` event (skipping nothing else: any other event fails the test).
    pub async fn change(&mut self) -> Value {
        let v = self.next().await;
        assert_eq!(v["type"], "change", "{v}");
        v
    }
}

/// An SSE client over a real HTTP connection.
pub struct Sse {
    pub stream: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, String>> + Send>>,
}

impl Sse {
    /// Opens `/v1/sse`; returns the HTTP status and, on 200, the stream.
    pub async fn open(
        gw: &Gateway,
        bearer: Option<&str>,
        query: &str,
        last_event_id: Option<&str>,
    ) -> (u16, Option<Sse>, String) {
        let mut req = reqwest::Client::new().get(gw.http(&format!("/v1/sse?{query}")));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("responds in time")
            .unwrap();
        let status = res.status().as_u16();
        if status != 200 {
            let body = res.text().await.unwrap_or_default();
            return (status, None, body);
        }
        let stream = res
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()));
        (
            status,
            Some(Sse {
                stream: Box::pin(stream),
            }),
            String::new(),
        )
    }

    pub async fn user(gw: &Gateway, user: &str) -> (Sse, Value) {
        let (status, sse, body) = Sse::open(gw, Some(&token_for(user)), "", None).await;
        assert_eq!(status, 200, "{body}");
        let mut sse = sse.unwrap();
        let ready = sse.next().await.1;
        assert_eq!(ready["type"], "ready");
        (sse, ready)
    }

    /// The next event: its SSE `id` and its JSON data.
    pub async fn next(&mut self) -> (String, Value) {
        let ev = tokio::time::timeout(WAIT, self.stream.next())
            .await
            .expect("no SSE event within the wait")
            .expect("stream open")
            .expect("well-formed SSE");
        (ev.id, serde_json::from_str(&ev.data).unwrap())
    }
}

/// An SSE stream of `user` that will not read: a raw socket with a 4 KiB receive buffer,
/// so that its stall reaches the server quickly; returned once the `200` head arrived.
pub async fn stalled_sse_reader(gw: &Gateway, user: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut raw = socket.connect(gw.addr).await.unwrap();
    let request = format!(
        "GET /v1/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        token_for(user)
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = raw.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    raw
}

/// Orders in business `b` (owned by u1/u2/u3 for b1/b2/b3).
pub fn insert_order(id: &str, business: &str) -> String {
    format!("INSERT INTO orders VALUES ('{id}', '{business}', 'i1', 1, 'pending');")
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// The gateway's `/metrics` text.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    let res = tokio::time::timeout(WAIT, reqwest::get(format!("http://{addr}/metrics")))
        .await
        .expect("/metrics answers in time")
        .unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

/// The value of the sample named exactly `name` with exactly the labels `labels` (in any
/// order) in Prometheus text `metrics`; `None` when there is no such sample. A prefix or a
/// subset of the labels never matches: `changecast_connections` is not
/// `changecast_connections_refused_total`, and `{limit="total"}` is not `{}`.
///
/// Metrics are process-wide: tests in one binary run in parallel, so compare the
/// difference before/after an action, and only for a quantity no other test in the
/// binary moves (or in a binary of its own, or under [`metrics_lock`]).
pub fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| v)
}

/// A counter's value; a counter never incremented is absent, which is 0.
pub fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(metrics, name, labels).unwrap_or(0.0)
}

/// A sample's label set, sorted by name.
type Labels = Vec<(String, String)>;

/// One exposition line: `name{k="v",...} value` → (name, sorted labels, value).
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        };
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    labels.sort();
    Some((name.to_owned(), labels, value))
}

/// Serialises the tests of one binary that produce and measure the same process-wide
/// counters, so that before/after differences are theirs alone. Every test in the binary
/// that moves a measured counter must hold it.
pub async fn metrics_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// An event id `EPOCH-SEQ` as (epoch, seq), to compare positions numerically (as strings
/// `e-9` sorts after `e-10`).
pub fn id_parts(id: &str) -> (String, u64) {
    let (epoch, seq) = id
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("not an event id: {id}"));
    (
        epoch.to_owned(),
        seq.parse()
            .unwrap_or_else(|_| panic!("not an event id: {id}")),
    )
}

/// The Mercury config on MongoDB that the scripted-peer tests share: orders (in the
/// `orders` collection) routed to their business's owner, deletes too; a stock alert; users
/// by email; history in memory. `extra_source` goes into `[source]`.
pub fn mongo_config(uri: &str, database: &str, extra_source: &str, orders: &str) -> String {
    format!(
        r#"
[source]
type = "mongodb"
uri = "{uri}"
database = "{database}"
{extra_source}

[history]
store = "memory"

[auth]
jwt_secret = "{SECRET}"
user = {{ claim = "user_id", lookup = "users", where = {{ email = "$claim" }}, pick = "_id" }}

[[route]]
name = "orders"
collection = "{orders}"
on = ["insert", "update", "delete"]
to = {{ lookup = "businesses", where = {{ _id = "$creator_id" }}, pick = "owner._id" }}

[[alert]]
name = "stock_low"
collection = "inventory_items"
when = "doc.quantity_in_stock <= doc.reorder_point"
to = {{ lookup = "businesses", where = {{ _id = "$owned_by" }}, pick = "owner._id" }}
message = "Stock low: {{{{ doc.name }}}} has {{{{ doc.quantity_in_stock }}}} left."
"#
    )
}
