//! A scripted MongoDB wire-protocol peer that the real `mongodb` driver accepts as the primary of
//! the one-node replica set `rs0`.
//!
//! The peer speaks OP_MSG only (the driver sends nothing else, handshake included). It answers the
//! handshake and monitoring commands (`hello`, `isMaster`, `ismaster`), `ping`, `endSessions`,
//! `killCursors` and `buildInfo` itself and hands every other command to the test's handler, which
//! scripts the reply (a body, a command error, a hang-up, or a delayed reply).
//! [`Scripted`] pairs a peer with the test's model of the deployment (a [`Script`]), kept
//! behind a mutex the test scripts it through as it runs.
//!
//! [`MongoPeer::start_as`] starts it as a standalone server or a mongos instead (what
//! `changecast check --connect` must tell apart).
//!
//! Notes on what the driver needs (checked against mongodb 3.9.1):
//! - `maxBsonObjectSize` and `maxMessageSizeBytes` are required in the hello reply; without them the
//!   reply does not deserialize and the server stays Unknown until server selection times out.
//! - `hosts`/`me`/`primary` must be exactly `127.0.0.1:PORT`, the address the driver connected to.
//! - `electionId` must not go backwards between hello replies (a stale primary is marked Unknown),
//!   so one ObjectId is used for the peer's whole life.
//! - `topologyVersion` is left out, so the driver polls with plain hellos (no streaming/exhaust).
//! - A network error on a pooled connection clears the pool and marks the server Unknown until the
//!   monitor's next hello; `hang_up_all` also closes the monitoring connections.
//! - `aggregate` is a retryable read: a hang-up on `aggregate` is retried once by the driver.

#![allow(dead_code)] // each test binary uses part of the peer

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mongodb::bson::oid::ObjectId;
use mongodb::bson::{Bson, DateTime, Document, Timestamp, doc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// OP_MSG opcode; the only opcode the driver sends.
const OP_MSG: i32 = 2013;
const HEADER_LEN: usize = 16;
/// Largest message the peer accepts (the hello reply advertises the same limit).
const MAX_MESSAGE_SIZE: i32 = 48_000_000;
const FLAG_CHECKSUM_PRESENT: u32 = 1;
const FLAG_MORE_TO_COME: u32 = 1 << 1;

/// Commands that are handshake or monitoring noise: answered by the peer and not recorded.
const NOISE: &[&str] = &[
    "hello",
    "isMaster",
    "ismaster",
    "ping",
    "endSessions",
    "buildInfo",
    "buildinfo",
];

/// What the peer answers to one command.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Reply with this body; `ok: 1.0` is added when the body has no `ok`.
    Ok(Document),
    /// A command error: {ok: 0, code, codeName, errmsg, errorLabels}.
    Error {
        code: i32,
        code_name: String,
        message: String,
        labels: Vec<String>,
    },
    /// Close the connection without replying (a network error for the driver).
    HangUp,
    /// Wait, then reply (e.g. to emulate an awaitData getMore waiting maxAwaitTimeMS).
    After(Duration, Box<Reply>),
}

impl Reply {
    /// A command error without error labels.
    pub fn error(code: i32, code_name: &str, message: &str) -> Reply {
        Reply::Error {
            code,
            code_name: code_name.to_string(),
            message: message.to_string(),
            labels: Vec::new(),
        }
    }

    /// A command error with error labels (e.g. `ResumableChangeStreamError`).
    pub fn error_with_labels(code: i32, code_name: &str, message: &str, labels: &[&str]) -> Reply {
        Reply::Error {
            code,
            code_name: code_name.to_string(),
            message: message.to_string(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        }
    }

    /// `reply`, sent after waiting `delay`.
    pub fn after(delay: Duration, reply: Reply) -> Reply {
        Reply::After(delay, Box::new(reply))
    }
}

type Handler = Box<dyn FnMut(&str, &Document) -> Reply + Send>;

/// What the peer says it is in its `hello` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// The primary of the one-node replica set `rs0`.
    ReplicaSet,
    /// A standalone `mongod`: no `setName` (change streams refuse it with 40573).
    Standalone,
    /// A `mongos` router of a sharded cluster: `msg: "isdbgrid"`.
    Mongos,
}

struct Shared {
    port: u16,
    topology: Topology,
    election_id: ObjectId,
    handler: Mutex<Handler>,
    commands: Mutex<Vec<Document>>,
    handler_panics: Mutex<Vec<String>>,
    connections: Mutex<HashMap<u64, AbortHandle>>,
    next_conn: AtomicU64,
    next_request_id: AtomicI64,
}

/// Locks a mutex even if a panicking test thread poisoned it.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scripted MongoDB peer on 127.0.0.1. Dropping it stops the listener and closes every connection.
pub struct MongoPeer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl MongoPeer {
    /// Starts a peer on 127.0.0.1:0 that the driver accepts as the primary of replica set "rs0".
    /// It answers hello/isMaster/ismaster, ping, endSessions, killCursors, buildInfo itself;
    /// every other command goes to `handler(command_name, &body)`.
    pub async fn start<H>(handler: H) -> MongoPeer
    where
        H: FnMut(&str, &Document) -> Reply + Send + 'static,
    {
        MongoPeer::start_as(Topology::ReplicaSet, handler).await
    }

    /// Like [`MongoPeer::start`], as the given kind of deployment.
    pub async fn start_as<H>(topology: Topology, handler: H) -> MongoPeer
    where
        H: FnMut(&str, &Document) -> Reply + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mongo_peer: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mongo_peer: local_addr");
        let shared = Arc::new(Shared {
            port: addr.port(),
            topology,
            election_id: ObjectId::new(),
            handler: Mutex::new(Box::new(handler)),
            commands: Mutex::new(Vec::new()),
            handler_panics: Mutex::new(Vec::new()),
            connections: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            next_request_id: AtomicI64::new(1),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        MongoPeer {
            addr,
            shared,
            accept_task,
        }
    }

    /// mongodb URI for the driver, with short timeouts so tests fail fast (`replicaSet=rs0`
    /// only when the peer is a replica set: the driver would never select another kind).
    pub fn uri(&self) -> String {
        let set = match self.shared.topology {
            Topology::ReplicaSet => "replicaSet=rs0&",
            Topology::Standalone | Topology::Mongos => "",
        };
        format!(
            "mongodb://127.0.0.1:{}/?{set}serverSelectionTimeoutMS=2000\
             &connectTimeoutMS=2000&heartbeatFrequencyMS=500",
            self.addr.port()
        )
    }

    /// Every command received so far in order (full bodies incl. `$db`), excluding the
    /// handshake/monitoring noise (hello, isMaster, ismaster, ping, endSessions, buildInfo).
    pub fn commands(&self) -> Vec<Document> {
        lock(&self.shared.commands).clone()
    }

    /// Commands whose name (first key) is `name`.
    pub fn commands_named(&self, name: &str) -> Vec<Document> {
        lock(&self.shared.commands)
            .iter()
            .filter(|c| command_name(c) == name)
            .cloned()
            .collect()
    }

    /// Waits (polling, bounded by `timeout`) until at least `n` commands named `name` were
    /// received; returns them. Panics, listing the commands seen, if the timeout passes.
    pub async fn wait_for(&self, name: &str, n: usize, timeout: Duration) -> Vec<Document> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.commands_named(name);
            if seen.len() >= n {
                return seen;
            }
            if Instant::now() >= deadline {
                let all = self.commands();
                let listing: Vec<String> = all.iter().map(|c| format!("  {c}")).collect();
                panic!(
                    "mongo_peer: waited {timeout:?} for {n} `{name}` command(s), got {}; \
                     all {} commands seen:\n{}\nhandler panics: {:?}",
                    seen.len(),
                    all.len(),
                    listing.join("\n"),
                    self.handler_panics()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes every currently open connection (simulates a network drop).
    pub fn hang_up_all(&self) {
        let conns: Vec<AbortHandle> = lock(&self.shared.connections)
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in conns {
            h.abort();
        }
    }

    /// Panics caught in the handler so far (the connection that ran it was closed). A peer whose
    /// handler panicked panics when dropped, so assertions inside a handler fail the test.
    pub fn handler_panics(&self) -> Vec<String> {
        lock(&self.shared.handler_panics).clone()
    }

    /// How many connections are currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.connections)
            .values()
            .filter(|h| !h.is_finished())
            .count()
    }
}

impl Drop for MongoPeer {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.hang_up_all();
        let panics = self.handler_panics();
        if !panics.is_empty() && !std::thread::panicking() {
            panic!("mongo_peer: the handler panicked: {panics:?}");
        }
    }
}

/// A test's model of the deployment: it answers every command the peer does not answer
/// itself.
pub trait Script: Send + 'static {
    fn answer(&mut self, name: &str, body: &Document) -> Reply;
}

/// A peer answering from a script the test keeps a handle to, to change it as it runs.
pub struct Scripted<W> {
    pub peer: MongoPeer,
    pub world: Arc<Mutex<W>>,
}

impl<W: Script> Scripted<W> {
    pub async fn new(world: W) -> Scripted<W> {
        Scripted::new_as(Topology::ReplicaSet, world).await
    }

    /// A peer of the given kind answering from `world`.
    pub async fn new_as(topology: Topology, world: W) -> Scripted<W> {
        let world = Arc::new(Mutex::new(world));
        let w = Arc::clone(&world);
        let peer = MongoPeer::start_as(topology, move |name, body| {
            w.lock().unwrap().answer(name, body)
        })
        .await;
        Scripted { peer, world }
    }
}

/// The name of a command: its first key.
pub fn command_name(body: &Document) -> &str {
    body.keys().next().map(String::as_str).unwrap_or("")
}

/// The `$changeStream` stage of a recorded `aggregate` command, if it has one as first stage.
pub fn change_stream_stage(aggregate: &Document) -> Option<&Document> {
    aggregate
        .get_array("pipeline")
        .ok()?
        .first()?
        .as_document()?
        .get_document("$changeStream")
        .ok()
}

/// A reply to `aggregate` that opens a cursor.
pub fn first_batch(
    cursor_id: i64,
    ns: &str,
    batch: Vec<Document>,
    post_batch_resume_token: Option<Document>,
) -> Document {
    cursor_reply("firstBatch", cursor_id, ns, batch, post_batch_resume_token)
}

/// A reply to `getMore`.
pub fn next_batch(
    cursor_id: i64,
    ns: &str,
    batch: Vec<Document>,
    post_batch_resume_token: Option<Document>,
) -> Document {
    cursor_reply("nextBatch", cursor_id, ns, batch, post_batch_resume_token)
}

fn cursor_reply(
    key: &str,
    cursor_id: i64,
    ns: &str,
    batch: Vec<Document>,
    post_batch_resume_token: Option<Document>,
) -> Document {
    let mut cursor = doc! { "id": cursor_id, "ns": ns };
    cursor.insert(key, batch);
    if let Some(t) = post_batch_resume_token {
        cursor.insert("postBatchResumeToken", t);
    }
    doc! { "cursor": cursor, "ok": 1.0 }
}

/// A resume token as the server sends it: `{_data: t}`.
pub fn token(t: &str) -> Document {
    doc! { "_data": t }
}

/// A change event in MongoDB's documented shape with `_id` = `{_data: token}`.
///
/// `documentKey` is left out when `document_key` is empty (drop, rename, dropDatabase,
/// invalidate), `ns.coll` when `coll` is empty (dropDatabase), and `update` events get an empty
/// `updateDescription` (replace it with `insert("updateDescription", ..)` as needed).
pub fn change_event(
    token: &str,
    op: &str,
    db: &str,
    coll: &str,
    document_key: Document,
    full_document: Option<Document>,
    full_document_before_change: Option<Document>,
) -> Document {
    let now = DateTime::now();
    let secs = u32::try_from(now.timestamp_millis() / 1000).unwrap_or(u32::MAX);
    let mut ns = doc! { "db": db };
    if !coll.is_empty() {
        ns.insert("coll", coll);
    }
    let mut ev = doc! {
        "_id": self::token(token),
        "operationType": op,
        "clusterTime": Timestamp { time: secs, increment: 1 },
        "wallTime": now,
        "ns": ns,
    };
    if !document_key.is_empty() {
        ev.insert("documentKey", document_key);
    }
    if op == "update" {
        ev.insert(
            "updateDescription",
            doc! {
                "updatedFields": {},
                "removedFields": [],
                "truncatedArrays": [],
            },
        );
    }
    if let Some(d) = full_document {
        ev.insert("fullDocument", d);
    }
    if let Some(d) = full_document_before_change {
        ev.insert("fullDocumentBeforeChange", d);
    }
    ev
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("mongo_peer: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        // Hold the map's lock while spawning so the task's own removal comes after the insertion.
        let mut conns = lock(&shared.connections);
        let task = tokio::spawn(serve_connection(stream, Arc::clone(&shared), id));
        conns.insert(id, task.abort_handle());
    }
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>, conn_id: u64) {
    if let Err(e) = serve_messages(&mut stream, &shared, conn_id).await {
        eprintln!("mongo_peer: connection {conn_id}: {e}; closing it");
    }
    lock(&shared.connections).remove(&conn_id);
}

/// An OP_MSG request: its requestID, flags and body (document sequences merged in).
struct Request {
    request_id: i32,
    flags: u32,
    body: Document,
}

async fn serve_messages(
    stream: &mut TcpStream,
    shared: &Shared,
    conn_id: u64,
) -> Result<(), String> {
    loop {
        let Some(req) = read_message(stream).await? else {
            return Ok(()); // the driver closed the connection
        };
        let name = command_name(&req.body).to_string();
        if !NOISE.contains(&name.as_str()) {
            lock(&shared.commands).push(req.body.clone());
        }
        let mut reply = match builtin_reply(shared, conn_id, &name, &req.body) {
            Some(reply) => reply,
            None => {
                let handler = &shared.handler;
                let body = &req.body;
                std::panic::catch_unwind(AssertUnwindSafe(|| (lock(handler))(&name, body)))
                    .map_err(|p| {
                        let text = format!("the handler panicked on `{name}`: {}", panic_text(&*p));
                        lock(&shared.handler_panics).push(text.clone());
                        text
                    })?
            }
        };
        let body = loop {
            match reply {
                Reply::After(delay, next) => {
                    tokio::time::sleep(delay).await;
                    reply = *next;
                }
                Reply::HangUp => return Ok(()),
                Reply::Ok(mut body) => {
                    if !body.contains_key("ok") {
                        body.insert("ok", 1.0);
                    }
                    break body;
                }
                Reply::Error {
                    code,
                    code_name,
                    message,
                    labels,
                } => {
                    break doc! {
                        "ok": 0.0,
                        "code": code,
                        "codeName": code_name,
                        "errmsg": message,
                        "errorLabels": labels,
                    };
                }
            }
        };
        if req.flags & FLAG_MORE_TO_COME != 0 {
            continue; // the driver expects no reply
        }
        let request_id = shared.next_request_id.fetch_add(1, Ordering::Relaxed) as i32;
        let bytes = encode_reply(request_id, req.request_id, &body)?;
        stream
            .write_all(&bytes)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
    }
}

/// Replies the peer gives itself; `None` for commands that go to the handler.
fn builtin_reply(shared: &Shared, conn_id: u64, name: &str, body: &Document) -> Option<Reply> {
    let reply = match name {
        "hello" | "isMaster" | "ismaster" => hello_reply(shared, conn_id, name != "hello"),
        "ping" | "endSessions" => doc! { "ok": 1.0 },
        "buildInfo" | "buildinfo" => doc! {
            "version": "6.0.0",
            "versionArray": [6, 0, 0, 0],
            "maxBsonObjectSize": 16_777_216,
            "ok": 1.0,
        },
        "killCursors" => {
            let cursors = body.get_array("cursors").cloned().unwrap_or_default();
            doc! {
                "cursorsKilled": cursors,
                "cursorsNotFound": [],
                "cursorsAlive": [],
                "cursorsUnknown": [],
                "ok": 1.0,
            }
        }
        _ => return None,
    };
    Some(Reply::Ok(reply))
}

fn hello_reply(shared: &Shared, conn_id: u64, legacy: bool) -> Document {
    let me = format!("127.0.0.1:{}", shared.port);
    let mut reply = doc! {
        "isWritablePrimary": true,
        "helloOk": true,
        "maxWireVersion": 17,
        "minWireVersion": 0,
        "maxBsonObjectSize": 16_777_216,
        "maxMessageSizeBytes": MAX_MESSAGE_SIZE,
        "maxWriteBatchSize": 100_000,
    };
    match shared.topology {
        Topology::ReplicaSet => {
            reply.insert("setName", "rs0");
            reply.insert("hosts", vec![me.clone()]);
            reply.insert("me", me.clone());
            reply.insert("primary", me);
            reply.insert("setVersion", 1);
            reply.insert("electionId", shared.election_id);
        }
        Topology::Standalone => {}
        Topology::Mongos => {
            reply.insert("msg", "isdbgrid");
        }
    }
    reply.insert("logicalSessionTimeoutMinutes", 30);
    reply.insert("localTime", DateTime::now());
    reply.insert("connectionId", i64::try_from(conn_id).unwrap_or(i64::MAX));
    reply.insert("readOnly", false);
    reply.insert("ok", 1.0);
    if legacy {
        reply.insert("ismaster", true);
    }
    reply
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".to_string()
    }
}

/// Reads one OP_MSG. `Ok(None)` on a clean end of stream before a header.
async fn read_message(stream: &mut TcpStream) -> Result<Option<Request>, String> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("read failed: {e}")),
    }
    let field =
        |i: usize| i32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (length, request_id, op_code) = (field(0), field(4), field(12));
    if op_code != OP_MSG {
        return Err(format!(
            "unsupported opcode {op_code} (only OP_MSG {OP_MSG} is spoken)"
        ));
    }
    // header + flagBits + one section kind byte + the smallest BSON document (5 bytes)
    if length < (HEADER_LEN + 4 + 1 + 5) as i32 || length > MAX_MESSAGE_SIZE {
        return Err(format!("bad messageLength {length}"));
    }
    let mut rest = vec![0u8; length as usize - HEADER_LEN];
    stream
        .read_exact(&mut rest)
        .await
        .map_err(|e| format!("read of a {length}-byte message failed: {e}"))?;
    let (flags, body) = parse_op_msg(&rest)?;
    Ok(Some(Request {
        request_id,
        flags,
        body,
    }))
}

fn read_i32(buf: &[u8], at: usize) -> Result<i32, String> {
    buf.get(at..at + 4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("truncated message: no i32 at offset {at}"))
}

/// Reads one BSON document at `at`; returns it and the offset after it.
fn read_document(buf: &[u8], at: usize, end: usize) -> Result<(Document, usize), String> {
    let len = read_i32(buf, at)?;
    let len = usize::try_from(len).map_err(|_| format!("negative BSON length {len}"))?;
    if len < 5 || at + len > end {
        return Err(format!(
            "BSON document of {len} bytes at offset {at} overruns its section"
        ));
    }
    let doc = Document::from_reader(&mut &buf[at..at + len])
        .map_err(|e| format!("invalid BSON at offset {at}: {e}"))?;
    Ok((doc, at + len))
}

/// Parses an OP_MSG after its header: flagBits, then sections (and a checksum to ignore).
fn parse_op_msg(buf: &[u8]) -> Result<(u32, Document), String> {
    let flags = read_i32(buf, 0)? as u32;
    let end = if flags & FLAG_CHECKSUM_PRESENT != 0 {
        buf.len()
            .checked_sub(4)
            .ok_or("checksum flag set on a message too short for one")?
    } else {
        buf.len()
    };
    let mut at = 4;
    let mut body: Option<Document> = None;
    let mut sequences: Vec<(String, Vec<Bson>)> = Vec::new();
    while at < end {
        let kind = buf[at];
        at += 1;
        match kind {
            0 => {
                let (doc, next) = read_document(buf, at, end)?;
                if body.replace(doc).is_some() {
                    return Err("OP_MSG with more than one kind-0 section".into());
                }
                at = next;
            }
            1 => {
                let size = read_i32(buf, at)?;
                let size =
                    usize::try_from(size).map_err(|_| format!("negative section size {size}"))?;
                let section_end = at
                    .checked_add(size)
                    .filter(|&e| e <= end && size >= 5)
                    .ok_or_else(|| {
                        format!("kind-1 section of {size} bytes overruns the message")
                    })?;
                let mut p = at + 4;
                let nul = buf[p..section_end]
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or("kind-1 section identifier is not NUL-terminated")?;
                let identifier = std::str::from_utf8(&buf[p..p + nul])
                    .map_err(|_| "kind-1 section identifier is not UTF-8")?
                    .to_string();
                p += nul + 1;
                let mut docs = Vec::new();
                while p < section_end {
                    let (doc, next) = read_document(buf, p, section_end)?;
                    docs.push(Bson::Document(doc));
                    p = next;
                }
                sequences.push((identifier, docs));
                at = section_end;
            }
            other => return Err(format!("unknown OP_MSG section kind {other}")),
        }
    }
    let mut body = body.ok_or("OP_MSG without a kind-0 section")?;
    for (identifier, docs) in sequences {
        body.insert(identifier, docs);
    }
    Ok((flags, body))
}

fn encode_reply(request_id: i32, response_to: i32, body: &Document) -> Result<Vec<u8>, String> {
    let mut doc_bytes = Vec::new();
    body.to_writer(&mut doc_bytes)
        .map_err(|e| format!("cannot encode reply {body}: {e}"))?;
    let length = HEADER_LEN + 4 + 1 + doc_bytes.len();
    let length =
        i32::try_from(length).map_err(|_| format!("reply of {length} bytes is too long"))?;
    let mut out = Vec::with_capacity(length as usize);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&OP_MSG.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    out.extend_from_slice(&doc_bytes);
    Ok(out)
}

/// The `readConcern.atClusterTime` of a recorded command (a snapshot read), if it has one.
pub fn read_concern_at(command: &Document) -> Option<Timestamp> {
    match command
        .get_document("readConcern")
        .ok()?
        .get("atClusterTime")?
    {
        Bson::Timestamp(ts) => Some(*ts),
        _ => None,
    }
}

fn ts_key(ts: Timestamp) -> (u32, u32) {
    (ts.time, ts.increment)
}

/// Collections whose documents keep every version by cluster time, so that the peer
/// answers `find` as a server does: a snapshot read (`readConcern: {level: "snapshot",
/// atClusterTime: T}`) sees the latest version at or before T, any other read the latest.
#[derive(Debug, Default, Clone)]
pub struct Versioned {
    /// collection → (cluster time, `_id`, the document from then on; `None`: deleted), in
    /// the order written (times must not go backwards per collection).
    versions: HashMap<String, Vec<(Timestamp, Bson, Option<Document>)>>,
}

impl Versioned {
    /// From `at` on, the document of `coll` with `doc`'s `_id` is `doc`.
    pub fn put(&mut self, coll: &str, at: Timestamp, doc: Document) {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        self.versions
            .entry(coll.to_string())
            .or_default()
            .push((at, id, Some(doc)));
    }

    /// From `at` on, the document `id` of `coll` is gone.
    pub fn delete(&mut self, coll: &str, at: Timestamp, id: impl Into<Bson>) {
        self.versions
            .entry(coll.to_string())
            .or_default()
            .push((at, id.into(), None));
    }

    /// The documents of `coll` as of `at` (`None`: the latest), in first-written order.
    pub fn state(&self, coll: &str, at: Option<Timestamp>) -> Vec<Document> {
        let mut ids: Vec<Bson> = Vec::new();
        let mut now: HashMap<String, Option<Document>> = HashMap::new();
        for (t, id, doc) in self.versions.get(coll).into_iter().flatten() {
            if at.is_some_and(|at| ts_key(*t) > ts_key(at)) {
                continue;
            }
            let k = id.to_string();
            if !now.contains_key(&k) {
                ids.push(id.clone());
            }
            now.insert(k, doc.clone());
        }
        ids.iter()
            .filter_map(|id| now.get(&id.to_string()).cloned().flatten())
            .collect()
    }

    /// The reply to a `find` on database `db`: equality and `$in` on top-level fields,
    /// `limit`, and the snapshot time of its read concern.
    pub fn answer_find(&self, db: &str, body: &Document) -> Reply {
        let coll = body.get_str("find").unwrap_or_default();
        let filter = body.get_document("filter").cloned().unwrap_or_default();
        let limit = match body.get("limit") {
            Some(Bson::Int64(n)) => usize::try_from(*n).ok().filter(|n| *n > 0),
            Some(Bson::Int32(n)) => usize::try_from(*n).ok().filter(|n| *n > 0),
            _ => None,
        };
        let mut found: Vec<Document> = self
            .state(coll, read_concern_at(body))
            .into_iter()
            .filter(|d| filter_matches(d, &filter))
            .collect();
        if let Some(n) = limit {
            found.truncate(n);
        }
        Reply::Ok(first_batch(0, &format!("{db}.{coll}"), found, None))
    }
}

/// Equality on top-level and dotted fields, `{$in: [...]}` included: what changecast's
/// lookups send.
pub fn filter_matches(d: &Document, filter: &Document) -> bool {
    filter.iter().all(|(k, v)| {
        let mut actual: Option<&Bson> = None;
        let mut at = Some(d);
        for part in k.split('.') {
            actual = at.and_then(|doc| doc.get(part));
            at = actual.and_then(Bson::as_document);
        }
        match v {
            Bson::Document(op) if op.contains_key("$in") => op
                .get_array("$in")
                .map(|a| a.iter().any(|x| Some(x) == actual))
                .unwrap_or(false),
            other => actual == Some(other),
        }
    })
}
