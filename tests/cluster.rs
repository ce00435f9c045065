//! Cluster mode end to end (issue 12): a real nats-server with JetStream and up to three
//! real `changecast` processes on one shared SQLite file, with real WebSocket and SSE
//! clients. A writer plays the application; what each client must receive is derived from
//! what the writer wrote and the Mercury seed data (the owner of b1 is u1, of b2 u2, of b3
//! u3; u4 is staff and owns nothing), never from what a server sent.
//!
//! The tests run one at a time ([`serial`]): each starts its own nats-server and nodes,
//! and takeover times on two cores mean nothing when six clusters share them. Every wait
//! has a deadline; each test is bounded in changes, kills and time.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use common::cluster::{
    LEASE_TTL, NODE_WAIT, Node, node_config, publish, router, wait_capturing, wait_for, wait_until,
};
use common::nats::NatsServer;
use common::proxy::Proxy;
use common::{Db, Ws, id_parts, token_for};

/// Serialises the tests of this binary (see the module doc).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The owner of each Mercury business: the one user its orders are routed to.
const OWNERS: [(&str, &str); 3] = [("b1", "u1"), ("b2", "u2"), ("b3", "u3")];

fn owner_of(business: &str) -> &'static str {
    OWNERS.iter().find(|(b, _)| *b == business).unwrap().1
}

// ---------------------------------------------------------------------------------------
// The application: a writer of orders.

/// One change the application committed: an order inserted or updated.
#[derive(Clone, Debug)]
struct Written {
    op: &'static str,
    key: String,
    business: &'static str,
}

/// What the writer does.
struct WritePlan {
    /// Order keys are this and a number (distinct per writer of one database).
    prefix: &'static str,
    /// Changes written at least.
    changes: usize,
    /// Pause after each transaction.
    pace: Duration,
    /// While set, the writer keeps writing past `changes` (up to four times as many).
    keep_going: Option<Arc<AtomicBool>>,
    /// Writes one `end-bN` order per business last, which ends its owner's clients.
    end_markers: bool,
}

/// The application's writes, on a thread of its own with its own connection: orders
/// spread at random over b1–b3, in transactions of one to three changes; every seventh
/// order also updates the order five before it (each order is updated at most once, so
/// (op, key) names one event). Returns what it committed, in commit order; `progress`
/// counts committed changes.
fn write_orders(
    path: PathBuf,
    plan: WritePlan,
    progress: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<Written>> {
    std::thread::spawn(move || {
        let seed = fastrand::u64(..);
        println!("writer seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let mut written: Vec<Written> = Vec::new();
        let mut orders: Vec<&'static str> = Vec::new(); // business of o{i}
        let more = |n: usize| {
            n < plan.changes
                || (n < plan.changes * 4
                    && plan
                        .keep_going
                        .as_ref()
                        .is_some_and(|k| k.load(Ordering::SeqCst)))
        };
        while more(written.len()) {
            let mut tx: Vec<Written> = Vec::new();
            for _ in 0..rng.usize(1..=3) {
                let i = orders.len();
                let business = OWNERS[rng.usize(0..3)].0;
                orders.push(business);
                tx.push(Written {
                    op: "insert",
                    key: format!("{}{i}", plan.prefix),
                    business,
                });
                if i.is_multiple_of(7) && i >= 5 {
                    tx.push(Written {
                        op: "update",
                        key: format!("{}{}", plan.prefix, i - 5),
                        business: orders[i - 5],
                    });
                }
            }
            commit(&conn, &tx);
            written.extend(tx);
            progress.store(written.len(), Ordering::SeqCst);
            std::thread::sleep(plan.pace);
        }
        if plan.end_markers {
            for (business, _) in OWNERS {
                let end = [Written {
                    op: "insert",
                    key: format!("end-{business}"),
                    business,
                }];
                commit(&conn, &end);
                written.extend(end);
            }
            progress.store(written.len(), Ordering::SeqCst);
        }
        written
    })
}

fn commit(conn: &rusqlite::Connection, changes: &[Written]) {
    let mut sql = String::from("BEGIN;");
    for w in changes {
        match w.op {
            "insert" => sql.push_str(&format!(
                "INSERT INTO orders VALUES ('{}', '{}', 'i1', 1, 'pending');",
                w.key, w.business
            )),
            _ => sql.push_str(&format!(
                "UPDATE orders SET status = 'paid' WHERE _id = '{}';",
                w.key
            )),
        }
    }
    sql.push_str("COMMIT;");
    conn.execute_batch(&sql).unwrap();
}

/// The events `user` must receive, in order: (op, key) of its businesses' changes.
fn expected(written: &[Written], user: &str) -> Vec<(String, String)> {
    written
        .iter()
        .filter(|w| owner_of(w.business) == user)
        .map(|w| (w.op.to_owned(), w.key.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Clients.

/// Where clients may connect: each node's address, `None` while it is down.
type Addrs = Arc<Mutex<Vec<Option<SocketAddr>>>>;

fn addrs_of(nodes: &[Node]) -> Addrs {
    Arc::new(Mutex::new(nodes.iter().map(|n| Some(n.addr)).collect()))
}

/// One event a client received, and the node it came from.
#[derive(Clone, Debug)]
struct Seen {
    op: String,
    key: String,
    id: String,
    node: usize,
}

/// Everything one client saw.
#[derive(Debug, Default)]
struct Run {
    seen: Vec<Seen>,
    /// The id of the `message` that ended it, if a publish did.
    end_message: Option<String>,
    /// Connections it opened that reached `ready`.
    connections: usize,
}

/// How a client behaves.
#[derive(Clone)]
struct Behaviour {
    user: &'static str,
    /// The node it connects to while that node is up (else any node that is up).
    prefer: Option<usize>,
    /// Hangs up now and then by itself and resumes on a node picked at random.
    hop: bool,
    /// A drop or close ends the test instead of a resume.
    never_drops: bool,
    /// How long a live connection may stay silent before the test fails.
    silent: Duration,
    /// When it gives up (the test then fails on what it has).
    deadline: Instant,
}

/// Shared progress: clients that have read their first `ready`, and events received.
#[derive(Clone, Default)]
struct Progress {
    connected: Arc<AtomicUsize>,
    events: Arc<AtomicUsize>,
}

/// The next text frame as JSON, or why there is none: `Err(true)` the connection ended,
/// `Err(false)` it was silent for `silent`.
async fn read(ws: &mut Ws, silent: Duration) -> Result<Value, bool> {
    // One deadline for the whole read: the server's pings must not keep a silent wait alive.
    let deadline = tokio::time::Instant::now() + silent;
    loop {
        match tokio::time::timeout_at(deadline, ws.socket.next()).await {
            Err(_) => return Err(false),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => return Err(true),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A WebSocket client of `b.user`: connects to a node that is up, resumes with `since`
/// (the first `ready`'s position, then the last event id), until an `end-` order or a
/// publish with `{"end": true}` reaches it, or its deadline passes.
async fn ws_client(b: Behaviour, addrs: Addrs, progress: Progress) -> Run {
    let mut run = Run::default();
    let mut since: Option<String> = None;
    let token = token_for(b.user);
    let user = b.user;
    while Instant::now() < b.deadline {
        let node = {
            let addrs = addrs.lock().unwrap();
            let up: Vec<usize> = (0..addrs.len()).filter(|&i| addrs[i].is_some()).collect();
            match b.prefer {
                Some(p) if addrs[p].is_some() && !(b.hop && run.connections > 0) => Some(p),
                _ if up.is_empty() => None,
                _ => Some(up[fastrand::usize(0..up.len())]),
            }
            .map(|i| (i, addrs[i].unwrap()))
        };
        let Some((node, addr)) = node else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Some(mut ws) = common::resume::connect(addr, &token, since.as_deref()).await else {
            assert!(!b.never_drops || run.connections == 0, "{user}: reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(ready) = read(&mut ws, b.silent).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        assert_eq!(ready["type"], "ready", "{user} on node {node}: {ready}");
        match &since {
            Some(s) => assert_eq!(
                ready["resumed"], true,
                "{user} resuming on node {node} from {s} was refused a replay: events lost ({ready})"
            ),
            None => {
                since = Some(ready["position"].as_str().unwrap().to_owned());
                progress.connected.fetch_add(1, Ordering::SeqCst);
            }
        }
        run.connections += 1;
        loop {
            let ev = match read(&mut ws, b.silent).await {
                Ok(ev) => ev,
                Err(ended) => {
                    assert!(
                        ended,
                        "{user}: no event for {:?} on a live connection to node {node} after {} events; last {:?}",
                        b.silent,
                        run.seen.len(),
                        run.seen.last()
                    );
                    assert!(
                        !b.never_drops,
                        "{user}: node {node} dropped the connection after {} events",
                        run.seen.len()
                    );
                    break;
                }
            };
            let id = ev["id"].as_str().unwrap_or_default().to_owned();
            match ev["type"].as_str() {
                Some("change") => {
                    let key = ev["key"].as_str().unwrap().to_owned();
                    let end = key.starts_with("end-");
                    run.seen.push(Seen {
                        op: ev["op"].as_str().unwrap().to_owned(),
                        key,
                        id: id.clone(),
                        node,
                    });
                    progress.events.fetch_add(1, Ordering::SeqCst);
                    since = Some(id);
                    if end {
                        return run;
                    }
                }
                Some("message") if ev["event"]["end"] == true => {
                    run.end_message = Some(id);
                    return run;
                }
                _ => panic!("{user} on node {node}: unexpected {ev}"),
            }
            if b.hop && fastrand::u32(0..150) == 0 {
                break; // hang up by itself, resume elsewhere
            }
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
    }
    run
}

/// An SSE client of `user` on one node, never resuming: until the publish `{"end": true}`.
async fn sse_client(user: &'static str, node: usize, addr: SocketAddr, progress: Progress) -> Run {
    let res = tokio::time::timeout(
        common::WAIT,
        reqwest::Client::new()
            .get(format!("http://{addr}/v1/sse"))
            .bearer_auth(token_for(user))
            .send(),
    )
    .await
    .expect("SSE answers in time")
    .unwrap();
    assert_eq!(res.status(), 200);
    let mut events = res.bytes_stream().eventsource();
    let mut run = Run {
        connections: 1,
        ..Run::default()
    };
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .unwrap_or_else(|_| panic!("{user} (SSE): silent after {} events", run.seen.len()))
            .unwrap_or_else(|| panic!("{user} (SSE): stream ended"))
            .unwrap();
        let data: Value = serde_json::from_str(&ev.data).unwrap();
        match data["type"].as_str() {
            Some("ready") => {
                progress.connected.fetch_add(1, Ordering::SeqCst);
            }
            Some("change") => {
                assert_eq!(
                    ev.id,
                    data["id"].as_str().unwrap(),
                    "SSE id is the event id"
                );
                run.seen.push(Seen {
                    op: data["op"].as_str().unwrap().to_owned(),
                    key: data["key"].as_str().unwrap().to_owned(),
                    id: ev.id,
                    node,
                });
                progress.events.fetch_add(1, Ordering::SeqCst);
            }
            Some("message") if data["event"]["end"] == true => {
                run.end_message = Some(ev.id);
                return run;
            }
            _ => panic!("{user} (SSE) on node {node}: unexpected {data}"),
        }
    }
}

/// Every client received exactly its user's events, in order, once, with increasing ids;
/// and one event has one id, whichever node delivered it to whichever client.
fn check(runs: &[(&'static str, Run)], written: &[Written]) {
    let mut ids: HashMap<(String, String), String> = HashMap::new();
    for (user, run) in runs {
        let got: Vec<(String, String)> = run
            .seen
            .iter()
            .map(|s| (s.op.clone(), s.key.clone()))
            .collect();
        let want = expected(written, user);
        assert_eq!(
            got.len(),
            want.len(),
            "{user}: {} of {} events (last {:?})",
            got.len(),
            want.len(),
            run.seen.last()
        );
        assert_eq!(got, want, "{user}: exactly its events, in order, once each");
        let parts: Vec<(String, u64)> = run.seen.iter().map(|s| id_parts(&s.id)).collect();
        assert!(
            parts
                .windows(2)
                .all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
            "{user}: ids of one epoch, increasing: {:?}",
            run.seen.iter().map(|s| &s.id).collect::<Vec<_>>()
        );
        for s in &run.seen {
            let id = ids
                .entry((s.op.clone(), s.key.clone()))
                .or_insert_with(|| s.id.clone());
            assert_eq!(
                *id, s.id,
                "{} {} has two ids (node {} sent {})",
                s.op, s.key, s.node, s.id
            );
        }
    }
}

/// Starts `names` as nodes of `stream` on `nats`, one after the other.
fn start_nodes(db: &Db, nats: &[String], stream: &str, names: &[&str]) -> Vec<Node> {
    tokio::task::block_in_place(|| {
        names
            .iter()
            .map(|n| Node::start(db, nats, n, stream))
            .collect()
    })
}

async fn all_ready(nodes: &[Node]) {
    for n in nodes {
        n.wait_ready(NODE_WAIT).await;
    }
}

/// Waits until the clients spawned have read their first `ready`.
async fn clients_connected(progress: &Progress, n: usize) {
    wait_count(
        &format!("{n} clients connected"),
        &progress.connected,
        n,
        NODE_WAIT,
    )
    .await;
}

/// The client tasks of a test; aborted if the test fails first, so that they do not
/// report the teardown (its nodes killed) as failures of their own.
#[derive(Default)]
struct Clients(Vec<(&'static str, tokio::task::JoinHandle<Run>)>);

impl std::ops::Deref for Clients {
    type Target = Vec<(&'static str, tokio::task::JoinHandle<Run>)>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Clients {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for (_, h) in &self.0 {
            h.abort();
        }
    }
}

/// Joins the client tasks, each bounded by its own deadline.
async fn join(mut clients: Clients) -> Vec<(&'static str, Run)> {
    let mut runs = Vec::new();
    for (user, h) in std::mem::take(&mut clients.0) {
        runs.push((user, h.await.unwrap()));
    }
    runs
}

/// What the writer wrote, once it is done.
async fn written_by(writer: std::thread::JoinHandle<Vec<Written>>) -> Vec<Written> {
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap()
}

/// Every client's run, once each has ended; they end by `deadline` (a margin added).
async fn ended(clients: Clients, deadline: Instant) -> Vec<(&'static str, Run)> {
    tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5),
        join(clients),
    )
    .await
    .expect("every client ends in time")
}

/// Waits until `count` reaches `n`; fails naming `what` and how far it got.
async fn wait_count(what: &str, count: &AtomicUsize, n: usize, within: Duration) {
    let started = Instant::now();
    while count.load(Ordering::SeqCst) < n {
        assert!(
            started.elapsed() < within,
            "never happened within {within:?}: {what}: {} of {n}",
            count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_each_client_exactly_its_events_with_the_same_ids_everywhere() {
    let _serial = serial().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(100);
    let nats = NatsServer::start();
    let db = Db::new();
    let nodes = start_nodes(&db, &[nats.url()], "t1", &["n1", "n2", "n3"]);
    all_ready(&nodes).await;
    router(&nodes, NODE_WAIT).await;
    wait_capturing(&db).await;

    let addrs = addrs_of(&nodes);
    let progress = Progress::default();
    let mut handles = Clients::default();
    // u1–u3 on every node by WebSocket; u1 and u3 also by SSE; u4 (owns nothing) on n3.
    let mut spawn_ws = |user: &'static str, node: usize| {
        let b = Behaviour {
            user,
            prefer: Some(node),
            hop: false,
            never_drops: true,
            silent: Duration::from_secs(20),
            deadline,
        };
        handles.push((
            user,
            tokio::spawn(ws_client(b, Arc::clone(&addrs), progress.clone())),
        ));
    };
    for node in 0..3 {
        for (_, user) in OWNERS {
            spawn_ws(user, node);
        }
    }
    spawn_ws("u4", 2);
    for (user, node) in [("u1", 1), ("u3", 0)] {
        handles.push((
            user,
            tokio::spawn(sse_client(user, node, nodes[node].addr, progress.clone())),
        ));
    }
    clients_connected(&progress, handles.len()).await;

    let written = write_orders(
        db.path.clone(),
        WritePlan {
            prefix: "o",
            changes: 2000,
            pace: Duration::ZERO,
            keep_going: None,
            end_markers: false,
        },
        Arc::default(),
    );
    let written = tokio::task::spawn_blocking(move || written.join().unwrap())
        .await
        .unwrap();
    // The end: once the clients have had as many events as were written for them (the
    // router reads the writes after they commit), one publish on n2 to every user, which
    // every client must read last: an event repeated or foreign comes before it.
    let want: usize = handles
        .iter()
        .map(|(u, _)| expected(&written, u).len())
        .sum();
    wait_count(
        &format!("{want} events delivered"),
        &progress.events,
        want,
        Duration::from_secs(60),
    )
    .await;
    let end = publish(
        nodes[1].addr,
        &["u1", "u2", "u3", "u4"],
        json!({"end": true}),
    )
    .await;

    let runs = ended(handles, deadline).await;
    check(&runs, &written);
    for (user, run) in &runs {
        assert_eq!(
            run.end_message.as_deref(),
            Some(end.as_str()),
            "{user}: the published message, with the id the publish answered, on every node"
        );
        assert_eq!(run.connections, 1, "{user}: one connection");
    }
    // The same user's clients on the three nodes saw the same ids (check() also compares
    // across users); u4 saw no change at all.
    for (_, user) in OWNERS {
        let lists: Vec<Vec<&str>> = runs
            .iter()
            .filter(|(u, _)| *u == user)
            .map(|(_, r)| r.seen.iter().map(|s| s.id.as_str()).collect())
            .collect();
        assert!(lists.len() >= 3);
        assert!(
            lists.windows(2).all(|w| w[0] == w[1]),
            "{user}: same ids everywhere"
        );
    }

    // `ready`'s position is a valid `since` on every node: u1's position on each node,
    // used on the next one, replays nothing and misses nothing (the next publish is the
    // first event each gets).
    let mut resumed = Vec::new();
    for i in 0..3 {
        let (_, ready) = by_user(&nodes[i], "u1", None).await;
        let position = ready["position"].as_str().unwrap().to_owned();
        let next = &nodes[(i + 1) % 3];
        let (ws, ready) = by_user(next, "u1", Some(&position)).await;
        assert_eq!(
            ready["resumed"], true,
            "{}'s position {position} on {}: {ready}",
            nodes[i].name, next.name
        );
        resumed.push(ws);
    }
    let after = publish(nodes[0].addr, &["u1"], json!({"after": true})).await;
    for ws in &mut resumed {
        let ev = ws.next().await;
        assert_eq!(ev["type"], "message", "{ev}");
        assert_eq!(ev["id"], after.as_str(), "{ev}");
    }

    // A node started now reads the whole stream before it says it is ready: its replay of
    // u1's history is what u1's clients received live, with the same ids.
    let live = &runs.iter().find(|(u, _)| *u == "u1").unwrap().1.seen;
    let mut nodes = nodes;
    nodes.extend(start_nodes(&db, &[nats.url()], "t1", &["n4"]));
    nodes[3].wait_ready(NODE_WAIT).await;
    let (mut ws, ready) = by_user(&nodes[3], "u1", Some(&live[0].id)).await;
    assert_eq!(ready["resumed"], true, "{ready}");
    for s in &live[1..] {
        let ev = ws.change().await;
        assert_eq!(
            (&ev["op"], &ev["key"], &ev["id"]),
            (&json!(s.op), &json!(s.key), &json!(s.id)),
            "the fresh node's replay"
        );
    }
    for id in [&end, &after] {
        let ev = ws.next().await;
        assert_eq!((&ev["type"], &ev["id"]), (&json!("message"), &json!(id)));
    }
    println!(
        "{} changes to {} clients on 3 nodes in {:?}",
        written.len(),
        runs.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routing_node_killed_repeatedly_loses_and_repeats_nothing() {
    const KILLS: usize = 3;
    let _serial = serial().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let nats = NatsServer::start();
    let db = Db::new();
    let mut nodes = start_nodes(&db, &[nats.url()], "t2", &["n1", "n2", "n3"]);
    all_ready(&nodes).await;
    router(&nodes, NODE_WAIT).await;
    wait_capturing(&db).await;

    let addrs = addrs_of(&nodes);
    let progress = Progress::default();
    let mut handles = Clients::default();
    for (_, user) in OWNERS {
        for _ in 0..2 {
            let b = Behaviour {
                user,
                prefer: None,
                hop: true,
                never_drops: false,
                silent: Duration::from_secs(20),
                deadline,
            };
            handles.push((
                user,
                tokio::spawn(ws_client(b, Arc::clone(&addrs), progress.clone())),
            ));
        }
    }
    clients_connected(&progress, handles.len()).await;

    let kills_pending = Arc::new(AtomicBool::new(true));
    let writer = write_orders(
        db.path.clone(),
        WritePlan {
            prefix: "o",
            changes: 1200,
            pace: Duration::from_millis(15),
            keep_going: Some(Arc::clone(&kills_pending)),
            end_markers: true,
        },
        Arc::default(),
    );

    let mut takeovers = Vec::new();
    for k in 1..=KILLS {
        let r = router(&nodes, NODE_WAIT).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..800))).await;
        addrs.lock().unwrap()[r] = None;
        nodes[r].kill();
        let killed = Instant::now();
        let others = &nodes;
        let next = wait_for(
            &format!(
                "another node routes within 15 s of kill {k} (of {})",
                nodes[r].name
            ),
            Duration::from_secs(15),
            || async move {
                for (i, n) in others.iter().enumerate() {
                    if i != r && n.is_running() && n.routes().await == Some(true) {
                        return Some(i);
                    }
                }
                None
            },
        )
        .await;
        let took = killed.elapsed();
        println!(
            "kill {k}: {} (routing) killed; {} routes {took:?} later",
            nodes[r].name, nodes[next].name
        );
        takeovers.push(took);
        tokio::task::block_in_place(|| nodes[r].restart());
        // As a load balancer would: clients go to it once it says it is ready.
        nodes[r].wait_ready(NODE_WAIT).await;
        addrs.lock().unwrap()[r] = Some(nodes[r].addr);
    }
    kills_pending.store(false, Ordering::SeqCst);
    let written = written_by(writer).await;

    let runs = ended(handles, deadline).await;
    check(&runs, &written);
    let hops: usize = runs.iter().map(|(_, r)| r.connections).sum();
    println!(
        "{} changes, {KILLS} router kills, takeovers {takeovers:?}, {hops} client connections, {:?}",
        written.len(),
        started.elapsed()
    );
    assert!(
        takeovers.iter().all(|t| *t < Duration::from_secs(15)),
        "{takeovers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_s_clients_resume_on_another_node_exactly() {
    let _serial = serial().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let nats = NatsServer::start();
    let db = Db::new();
    let mut nodes = start_nodes(&db, &[nats.url()], "t3", &["n1", "n2", "n3"]);
    all_ready(&nodes).await;
    let r = router(&nodes, NODE_WAIT).await;
    wait_capturing(&db).await;
    let victim = (r + 1) % 3;
    let other = (r + 2) % 3;

    let addrs = addrs_of(&nodes);
    let progress = Progress::default();
    let victim_progress = Progress::default();
    let mut handles = Clients::default();
    for (_, user) in OWNERS {
        for (node, progress) in [(victim, &victim_progress), (other, &progress)] {
            let b = Behaviour {
                user,
                prefer: Some(node),
                hop: false,
                never_drops: false,
                silent: Duration::from_secs(20),
                deadline,
            };
            handles.push((
                user,
                tokio::spawn(ws_client(b, Arc::clone(&addrs), progress.clone())),
            ));
        }
    }
    clients_connected(&victim_progress, 3).await;
    clients_connected(&progress, 3).await;

    let writer = write_orders(
        db.path.clone(),
        WritePlan {
            prefix: "o",
            changes: 900,
            pace: Duration::from_millis(5),
            keep_going: None,
            end_markers: true,
        },
        Arc::default(),
    );
    // Mid-stream: the victim's clients have had events from it.
    wait_count(
        "the victim's clients received 90 events",
        &victim_progress.events,
        90,
        NODE_WAIT,
    )
    .await;
    addrs.lock().unwrap()[victim] = None;
    nodes[victim].kill();
    println!("killed {} (not routing)", nodes[victim].name);

    let written = written_by(writer).await;
    let runs = ended(handles, deadline).await;
    check(&runs, &written);
    // Handles alternate victim, other: the victim's clients were served by both nodes.
    for (i, (user, run)) in runs.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let before = run.seen.iter().filter(|s| s.node == victim).count();
        assert!(before > 0, "client {i} ({user}) had events from the victim");
        assert!(
            run.seen.iter().skip(before).all(|s| s.node != victim)
                && run.seen.len() > before
                && run.connections >= 2,
            "client {i} ({user}) resumed on another node after the kill"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restarted_mid_run_loses_nothing() {
    let _serial = serial().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let mut nats = NatsServer::start();
    let db = Db::new();
    let nodes = start_nodes(&db, &[nats.url()], "t4", &["n1", "n2"]);
    all_ready(&nodes).await;
    router(&nodes, NODE_WAIT).await;
    wait_capturing(&db).await;

    let addrs = addrs_of(&nodes);
    let progress = Progress::default();
    let mut handles = Clients::default();
    for node in 0..2 {
        for (_, user) in OWNERS {
            let b = Behaviour {
                user,
                prefer: Some(node),
                hop: false,
                never_drops: false,
                silent: Duration::from_secs(30),
                deadline,
            };
            handles.push((
                user,
                tokio::spawn(ws_client(b, Arc::clone(&addrs), progress.clone())),
            ));
        }
    }
    clients_connected(&progress, handles.len()).await;

    let written_so_far = Arc::new(AtomicUsize::new(0));
    let writer = write_orders(
        db.path.clone(),
        WritePlan {
            prefix: "o",
            changes: 900,
            pace: Duration::from_millis(5),
            keep_going: None,
            end_markers: true,
        },
        Arc::clone(&written_so_far),
    );
    wait_count("300 changes written", &written_so_far, 300, NODE_WAIT).await;
    tokio::task::block_in_place(|| {
        nats.kill();
        println!(
            "nats-server killed after {} changes",
            written_so_far.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(fastrand::u64(500..1500)));
        nats.restart();
    });
    println!(
        "nats-server restarted after {} changes",
        written_so_far.load(Ordering::SeqCst)
    );
    let written = written_by(writer).await;
    all_ready(&nodes).await;
    let runs = ended(handles, deadline).await;
    check(&runs, &written);
    router(&nodes, NODE_WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_nats_stops_routing_and_reports_not_ready() {
    let _serial = serial().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(100);
    let nats = NatsServer::start();
    let proxy = Proxy::start(nats.addr()).await;
    let db = Db::new();
    // n1 reaches NATS through the proxy and starts first, so it routes.
    let mut nodes = start_nodes(&db, &[proxy.url()], "t5", &["n1"]);
    nodes[0].wait_ready(NODE_WAIT).await;
    assert_eq!(router(&nodes, NODE_WAIT).await, 0, "n1 routes");
    wait_capturing(&db).await;
    nodes.extend(start_nodes(&db, &[nats.url()], "t5", &["n2", "n3"]));
    all_ready(&nodes).await;
    assert_eq!(router(&nodes, NODE_WAIT).await, 0, "n1 still routes");

    let addrs = addrs_of(&nodes);
    let on_n1 = Progress::default();
    let elsewhere = Progress::default();
    let mut handles = Clients::default();
    for (i, (_, user)) in OWNERS.iter().enumerate() {
        for (node, progress) in [(0, &on_n1), (1 + i % 2, &elsewhere)] {
            let b = Behaviour {
                user,
                prefer: Some(node),
                hop: false,
                // n1 keeps its clients through the cut: a drop fails the test.
                never_drops: true,
                silent: Duration::from_secs(60),
                deadline,
            };
            handles.push((
                *user,
                tokio::spawn(ws_client(b, Arc::clone(&addrs), progress.clone())),
            ));
        }
    }
    clients_connected(&on_n1, 3).await;
    clients_connected(&elsewhere, 3).await;
    // Where u1 stands on n1 before any change: resumed from during the cut below.
    let (_, ready) = by_user(&nodes[0], "u1", None).await;
    let before = ready["position"].as_str().unwrap().to_owned();

    // Phase 1, everything connected: every client gets its events.
    let phase = |prefix, changes| WritePlan {
        prefix,
        changes,
        pace: Duration::from_millis(5),
        keep_going: None,
        end_markers: false,
    };
    let first = write_orders(db.path.clone(), phase("o", 60), Arc::default());
    let first = tokio::task::spawn_blocking(move || first.join().unwrap())
        .await
        .unwrap();
    let n = first.len();
    for p in [&on_n1, &elsewhere] {
        wait_count(&format!("phase 1: {n} events"), &p.events, n, common::WAIT).await;
    }

    proxy.cut();
    let cut = Instant::now();
    let (n1, rest) = nodes.split_at(1);
    let n1 = &n1[0];
    // Watch the gauges: the others are read before n1, so seeing another at 1 and then n1
    // still at 1 means two routers at once.
    let mut n1_stopped: Option<Duration> = None;
    let mut other_routes: Option<(usize, Duration)> = None;
    while n1_stopped.is_none() || other_routes.is_none() {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "after {:?}: n1 stopped routing {n1_stopped:?}, another routes {other_routes:?}",
            cut.elapsed()
        );
        if other_routes.is_none() {
            for (i, n) in rest.iter().enumerate() {
                if n.routes().await == Some(true) {
                    other_routes = Some((i + 1, cut.elapsed()));
                }
            }
        }
        let n1_routes = n1.routes().await;
        assert_ne!(n1_routes, None, "n1 answers /metrics while cut off");
        if n1_routes == Some(false) && n1_stopped.is_none() {
            n1_stopped = Some(cut.elapsed());
        }
        assert!(
            !(other_routes.is_some() && n1_routes == Some(true)),
            "two routers: {other_routes:?} routes and n1 still does"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (n1_stopped, (next, took)) = (n1_stopped.unwrap(), other_routes.unwrap());
    println!(
        "cut: n1 stopped routing after {n1_stopped:?}; {} routes after {took:?}",
        nodes[next].name
    );
    assert!(
        n1_stopped <= LEASE_TTL + Duration::from_secs(1),
        "n1 stopped routing within the lease TTL ({LEASE_TTL:?}, +1 s of polling): {n1_stopped:?}"
    );
    wait_until(
        "n1's /readyz is 503 naming cluster",
        common::WAIT,
        || async move {
            matches!(n1.readyz().await, Some((503, body)) if body.contains("cluster"))
        },
    )
    .await;
    println!("n1 not ready: {:?}", n1.readyz().await);
    // Cut off, n1 still serves what it has: a client resuming there is replayed phase 1
    // (read at the end, with everything after it).
    let (mut late, ready) = by_user(n1, "u1", Some(&before)).await;
    assert_eq!(
        ready["resumed"], true,
        "resumed on n1 while cut off: {ready}"
    );

    // Phase 2, n1 cut off: the clients of the other nodes get the new events.
    let second = write_orders(db.path.clone(), phase("p", 60), Arc::default());
    let second = tokio::task::spawn_blocking(move || second.join().unwrap())
        .await
        .unwrap();
    let n = first.len() + second.len();
    wait_count(
        &format!("phase 2: {n} events on n2 and n3"),
        &elsewhere.events,
        n,
        common::WAIT,
    )
    .await;

    // NATS reachable again: n1 is ready and its clients, still connected, get what they
    // missed.
    proxy.restore();
    let restored = Instant::now();
    n1.wait_ready(NODE_WAIT).await;
    println!("n1 ready {:?} after restore", restored.elapsed());
    wait_count(
        &format!("phase 2: {n} events on n1 after restore"),
        &on_n1.events,
        n,
        NODE_WAIT,
    )
    .await;

    // Phase 3 ends every client.
    let third = write_orders(
        db.path.clone(),
        WritePlan {
            end_markers: true,
            ..phase("q", 30)
        },
        Arc::default(),
    );
    let third = tokio::task::spawn_blocking(move || third.join().unwrap())
        .await
        .unwrap();
    let runs = ended(handles, deadline).await;
    let written: Vec<Written> = [first, second, third].concat();
    let mut runs = runs;
    for (user, run) in &runs {
        assert_eq!(run.connections, 1, "{user}: kept its one connection");
    }
    // The client that resumed on n1 during the cut: all of u1's events, once, same ids.
    let mut seen = Vec::new();
    loop {
        let ev = late.change().await;
        let key = ev["key"].as_str().unwrap().to_owned();
        seen.push(Seen {
            op: ev["op"].as_str().unwrap().to_owned(),
            key: key.clone(),
            id: ev["id"].as_str().unwrap().to_owned(),
            node: 0,
        });
        if key.starts_with("end-") {
            break;
        }
    }
    runs.push((
        "u1",
        Run {
            seen,
            ..Run::default()
        },
    ));
    check(&runs, &written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_gives_gap() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let db = Db::new();
    let mut nodes = start_nodes(&db, &[nats.url()], "t6", &["n1"]);
    all_ready(&nodes).await;
    wait_capturing(&db).await;
    let (mut u1, _) = by_user(&nodes[0], "u1", None).await;
    let mut last = String::new();
    for i in 0..5 {
        db.exec(&common::insert_order(&format!("o{i}"), "b1"));
        let ev = u1.change().await;
        assert_eq!(ev["key"], format!("o{i}"));
        last = ev["id"].as_str().unwrap().to_owned();
    }
    let (old_epoch, _) = id_parts(&last);
    drop(u1);

    // Every node stopped; the stream deleted (the KV buckets, streams named KV_*, stay).
    nodes[0].kill();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let names: Vec<String> = js
        .stream_names()
        .map(|n| n.unwrap())
        .collect::<Vec<_>>()
        .await;
    let deleted: Vec<&String> = names.iter().filter(|n| n.starts_with("t6")).collect();
    assert!(!deleted.is_empty(), "a stream named t6…: {names:?}");
    for name in &deleted {
        js.delete_stream(name.as_str()).await.unwrap();
    }
    println!("deleted {deleted:?} of {names:?}");

    // The same node (its history holds the old epoch) and a fresh one.
    tokio::task::block_in_place(|| nodes[0].restart());
    nodes.extend(start_nodes(&db, &[nats.url()], "t6", &["n2"]));
    all_ready(&nodes).await;
    router(&nodes, NODE_WAIT).await;
    wait_capturing(&db).await;
    for (i, node) in nodes.iter().enumerate() {
        let (mut client, ready) = by_user(node, "u1", Some(&last)).await;
        assert_eq!(ready["resumed"], false, "{}: {ready}", node.name);
        let gap = client.next().await;
        assert_eq!(gap["type"], "gap", "{}: {gap}", node.name);
        assert_eq!(gap["since"], last.as_str());
        assert_eq!(gap["position"], ready["position"]);
        // Then the new stream's events, in a new epoch.
        let key = format!("new{i}");
        db.exec(&common::insert_order(&key, "b1"));
        let ev = loop {
            let ev = client.change().await;
            if ev["key"] == key.as_str() {
                break ev;
            }
        };
        let (epoch, _) = id_parts(ev["id"].as_str().unwrap());
        assert_ne!(epoch, old_epoch, "a recreated stream is a new epoch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_left_the_stream_before_a_node_read_them_give_its_clients_gap() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let db = Db::new();
    let mut nodes = start_nodes(&db, &[nats.url()], "t8", &["n1", "n2"]);
    all_ready(&nodes).await;
    assert_eq!(router(&nodes, NODE_WAIT).await, 0, "n1 routes");
    wait_capturing(&db).await;
    let (mut u1, _) = by_user(&nodes[1], "u1", None).await;
    db.exec(&common::insert_order("o1", "b1"));
    let seen = u1.change().await["id"].as_str().unwrap().to_owned();
    drop(u1);

    // n2 is down while o2..o4 are routed; o2's message leaves the stream before n2 reads it
    // (as the stream's max age would remove it).
    nodes[1].kill();
    let (mut on_n1, _) = by_user(&nodes[0], "u1", Some(&seen)).await;
    let mut ids = Vec::new();
    for key in ["o2", "o3", "o4"] {
        db.exec(&common::insert_order(key, "b1"));
        let ev = on_n1.change().await;
        assert_eq!(ev["key"], key);
        ids.push(ev["id"].as_str().unwrap().to_owned());
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("t8").await.unwrap();
    stream.delete_message(id_parts(&ids[0]).1).await.unwrap();

    // n2 comes back and reads on: its history has a hole, so a client resuming from before
    // it is told (gap), never handed o3 and o4 as if nothing were missing.
    tokio::task::block_in_place(|| nodes[1].restart());
    nodes[1].wait_ready(NODE_WAIT).await;
    let (mut resumed, ready) = by_user(&nodes[1], "u1", Some(&seen)).await;
    assert_eq!(ready["resumed"], false, "{ready}");
    let gap = resumed.next().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    assert_eq!(gap["since"], seen.as_str());
    // After the hole, resuming works: from o3's id, o4 follows.
    let (mut after, ready) = by_user(&nodes[1], "u1", Some(&ids[1])).await;
    assert_eq!(ready["resumed"], true, "{ready}");
    assert_eq!(after.change().await["id"], ids[2].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_cooldowns_hold_across_a_router_failover() {
    let _serial = serial().await;
    let nats = NatsServer::start();
    let db = Db::new();
    // stock_low with a cooldown far longer than the test.
    let config = |name: &str| {
        let c = node_config(&db, &[nats.url()], name, "t7");
        let named = "name = \"stock_low\"\n";
        assert!(c.contains(named));
        c.replace(named, &format!("{named}cooldown = \"10m\"\n"))
    };
    let mut nodes = vec![Node::start_with(&db, "n1", &config("n1"))];
    nodes[0].wait_ready(NODE_WAIT).await;
    assert_eq!(router(&nodes, NODE_WAIT).await, 0, "n1 routes");
    wait_capturing(&db).await;
    nodes.push(tokio::task::block_in_place(|| {
        Node::start_with(&db, "n2", &config("n2"))
    }));
    all_ready(&nodes).await;

    // u1 (owner of b1, whose items are i1–i3) on n2, which does not route.
    let (mut u1, _) = by_user(&nodes[1], "u1", None).await;
    let stock = |item: &str, qty: u32| {
        db.exec(&format!(
            "UPDATE inventory_items SET quantity_in_stock = {qty} WHERE _id = '{item}';"
        ))
    };
    // Rice (i1, reorder point 5) falls to 3: the alert fires, on n1.
    stock("i1", 3);
    let mut first = [u1.next().await, u1.next().await];
    first.sort_by_key(|e| e["type"].as_str().unwrap().to_owned());
    assert_eq!(
        (&first[0]["type"], &first[0]["key"]),
        (&json!("alert"), &json!("i1"))
    );
    assert_eq!(
        (&first[1]["type"], &first[1]["key"]),
        (&json!("change"), &json!("i1"))
    );
    // Restocked: a change, no alert.
    stock("i1", 10);
    let ev = u1.next().await;
    assert_eq!(
        (&ev["type"], &ev["key"]),
        (&json!("change"), &json!("i1")),
        "{ev}"
    );

    // The router dies; n2 takes over.
    nodes[0].kill();
    let n2 = &nodes[1];
    wait_until("n2 routes", NODE_WAIT, || async move {
        n2.routes().await == Some(true)
    })
    .await;

    // Rice falls again within its cooldown: no alert. Millet (i2, reorder point 4) falls
    // for the first time: its alert fires, from the new router.
    stock("i1", 2);
    stock("i2", 1);
    let mut seen = Vec::new();
    while !seen.contains(&("alert".to_owned(), "i2".to_owned())) {
        let ev = u1.next().await;
        seen.push((
            ev["type"].as_str().unwrap().to_owned(),
            ev["key"].as_str().unwrap().to_owned(),
        ));
        assert!(seen.len() <= 3, "{seen:?}");
    }
    let alerts: Vec<&(String, String)> = seen.iter().filter(|(t, _)| t == "alert").collect();
    assert_eq!(
        alerts,
        [&("alert".to_owned(), "i2".to_owned())],
        "Rice's alert is not repeated within its cooldown after a failover: {seen:?}"
    );
    let changes: Vec<&str> = seen
        .iter()
        .filter(|(t, _)| t == "change")
        .map(|(_, k)| k.as_str())
        .collect();
    assert_eq!(changes, ["i1", "i2"], "{seen:?}");
}

/// A WebSocket client of `user` on `node`, after its `ready`.
async fn by_user(node: &Node, user: &str, since: Option<&str>) -> (Ws, Value) {
    let mut q = format!("token={}", token_for(user));
    if let Some(s) = since {
        q.push_str(&format!("&since={s}"));
    }
    let mut ws = Ws::connect(&node.ws_url(&q)).await;
    let ready = ws.next().await;
    assert_eq!(ready["type"], "ready", "{ready}");
    (ws, ready)
}
