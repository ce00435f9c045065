//! Recipients are resolved as of the change on MongoDB (issue 11, item 11): the real
//! `mongodb` driver against the scripted wire peer, whose `find` answers from versioned
//! documents (the state at each cluster time) and records the read concern it got.
//!
//! The reproduction: 200 orders for business b100 (owner u100), then b100's owner becomes
//! u101; all 201 events are in the stream before the router reads any. The lookups must be
//! snapshot reads at each routed change's `clusterTime`, so u100 gets the 200 and u101
//! none. When the server refuses snapshot reads, the lookup reads the current state and
//! counts it.

mod common;
mod mongo_peer;

use std::collections::VecDeque;
use std::time::Duration;

use common::{SECRET, Ws};
use mongo_peer::{
    Reply, Script, Scripted, Versioned, change_event, first_batch, next_batch, read_concern_at,
};
use mongodb::bson::{Document, Timestamp, doc};
use tokio::net::TcpListener;

use changecast::config::Config;
use changecast::plan::Plan;
use changecast::server::Running;

const DB: &str = "mercury";
const CURSOR_NS: &str = "mercury.$cmd.aggregate";
const WAIT: Duration = Duration::from_secs(15);

fn ts(time: u32, increment: u32) -> Timestamp {
    Timestamp { time, increment }
}

/// The deployment as the test scripts it.
#[derive(Default)]
struct World {
    data: Versioned,
    /// Events handed out by the next getMore (or the next aggregate).
    pending: VecDeque<Document>,
    last_token: Option<Document>,
    cursor: i64,
    /// Refuse snapshot reads with this error code (e.g. 239 SnapshotTooOld).
    refuse_snapshots: Option<i32>,
}

impl World {
    fn new() -> World {
        let mut data = Versioned::default();
        let t0 = ts(1_000, 1);
        for (id, email) in [("u100", "u100@asof.example"), ("u101", "u101@asof.example")] {
            data.put("users", t0, doc! {"_id": id, "email": email});
        }
        data.put(
            "businesses",
            t0,
            doc! {"_id": "b100", "owner": {"_id": "u100"}},
        );
        data.put(
            "businesses",
            t0,
            doc! {"_id": "b101", "owner": {"_id": "u100"}},
        );
        World {
            data,
            cursor: 40,
            ..World::default()
        }
    }
}

impl Script for World {
    fn answer(&mut self, name: &str, body: &Document) -> Reply {
        match name {
            "collMod" => Reply::Ok(doc! {}),
            "aggregate" | "getMore" => {
                let events: Vec<Document> = self.pending.drain(..).collect();
                if let Some(last) = events.last() {
                    self.last_token = last.get_document("_id").ok().cloned();
                }
                if name == "aggregate" {
                    self.cursor += 1;
                    return Reply::Ok(first_batch(
                        self.cursor,
                        CURSOR_NS,
                        events,
                        self.last_token.clone(),
                    ));
                }
                let empty = events.is_empty();
                let reply = Reply::Ok(next_batch(
                    self.cursor,
                    CURSOR_NS,
                    events,
                    self.last_token.clone(),
                ));
                if empty {
                    // An awaitData getMore waits before answering an empty batch.
                    Reply::after(Duration::from_millis(50), reply)
                } else {
                    reply
                }
            }
            "find" if body.get_str("find") == Ok("changecast_checkpoints") => Reply::Ok(
                first_batch(0, &format!("{DB}.changecast_checkpoints"), vec![], None),
            ),
            "find" => match self.refuse_snapshots {
                Some(code) if read_concern_at(body).is_some() => Reply::error(
                    code,
                    "SnapshotTooOld",
                    "Read timestamp is older than the oldest available timestamp",
                ),
                _ => self.data.answer_find(DB, body),
            },
            "update" => Reply::Ok(doc! {"n": 1, "nModified": 1}),
            other => Reply::error(59, "CommandNotFound", &format!("unknown {other}")),
        }
    }
}

type Setup = Scripted<World>;

impl Setup {
    async fn start(&self) -> Running {
        let config = format!(
            r#"
[source]
type = "mongodb"
uri = "{uri}"
database = "{DB}"
max_await_time = "200ms"

[server]
send_queue = 1000

[history]
store = "memory"

[auth]
jwt_secret = "{SECRET}"
user = {{ claim = "user_id", lookup = "users", where = {{ email = "$claim" }}, pick = "_id" }}

[[route]]
name = "orders"
collection = "orders"
on = ["insert", "update", "delete"]
to = {{ lookup = "businesses", where = {{ _id = "$creator_id" }}, pick = "owner._id" }}
"#,
            uri = self.peer.uri()
        );
        let plan = Plan::compile(&Config::parse(&config).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::time::timeout(WAIT, changecast::server::start(plan, listener, None))
            .await
            .expect("starts in time")
            .unwrap()
    }

    /// Puts events in the stream; the next getMore hands them all out.
    fn push(&self, events: Vec<Document>) {
        self.world.lock().unwrap().pending.extend(events);
    }

    /// Changes the world at `at`, as a write the stream also reports.
    fn write(&self, f: impl FnOnce(&mut Versioned)) {
        f(&mut self.world.lock().unwrap().data);
    }
}

async fn client(running: &Running, user: &str) -> Ws {
    let (ws, ready) = Ws::by_email(running.local_addr, &format!("{user}@asof.example")).await;
    assert_eq!(ready["user"], user);
    ws
}

/// An order insert at cluster time `at`.
fn order(n: usize, id: &str, business: &str, at: Timestamp) -> Document {
    let d = doc! {"_id": id, "creator_id": business, "status": "paid"};
    let mut ev = change_event(
        &format!("t{n:05}"),
        "insert",
        DB,
        "orders",
        doc! {"_id": id},
        Some(d),
        None,
    );
    ev.insert("clusterTime", at);
    ev
}

/// An update of a business's owner at `at`, with pre- and post-images.
fn owner_change(n: usize, business: &str, from: &str, to: &str, at: Timestamp) -> Document {
    let mut ev = change_event(
        &format!("t{n:05}"),
        "update",
        DB,
        "businesses",
        doc! {"_id": business},
        Some(doc! {"_id": business, "owner": {"_id": to}}),
        Some(doc! {"_id": business, "owner": {"_id": from}}),
    );
    ev.insert(
        "updateDescription",
        doc! {"updatedFields": {"owner": {"_id": to}}, "removedFields": [], "truncatedArrays": []},
    );
    ev.insert("clusterTime", at);
    ev
}

async fn expect_order(ws: &mut Ws, key: &str) {
    let ev = ws.next().await;
    assert_eq!(ev["type"], "change", "expected order {key}, got {ev}");
    assert_eq!(ev["key"], key, "{ev}");
}

/// 200 orders for b100 at (2000, 1..=200), then b100 moves to u101 at (2001, 1).
/// Returns the events, already written into the world.
fn burst_then_move(setup: &Setup) -> Vec<Document> {
    let mut events: Vec<Document> = (0..200)
        .map(|i| order(i, &format!("o{i}"), "b100", ts(2_000, i as u32 + 1)))
        .collect();
    events.push(owner_change(200, "b100", "u100", "u101", ts(2_001, 1)));
    // The database is already past the move when the router reads the first order.
    setup.write(|d| {
        d.put(
            "businesses",
            ts(2_001, 1),
            doc! {"_id": "b100", "owner": {"_id": "u101"}},
        )
    });
    events
}

async fn stop(running: Running) {
    tokio::time::timeout(WAIT, running.stop())
        .await
        .expect("stops in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_snapshot_reads_at_each_changes_cluster_time() {
    let setup = Setup::new(World::new()).await;
    let running = setup.start().await;
    let mut u100 = client(&running, "u100").await;
    let mut u101 = client(&running, "u101").await;

    setup.push(burst_then_move(&setup));
    for i in 0..200 {
        expect_order(&mut u100, &format!("o{i}")).await;
    }
    // After the move: an order of b100 (u101's now) and one of b101 (still u100's). Each
    // client's next event is its own, so anything foreign before it fails the test.
    setup.push(vec![
        order(201, "after-move", "b100", ts(2_002, 1)),
        order(202, "marker-u100", "b101", ts(2_002, 2)),
    ]);
    expect_order(&mut u101, "after-move").await;
    expect_order(&mut u100, "marker-u100").await;

    // The driver sent each miss as a snapshot read at the clusterTime of the change being
    // routed: b100 at the first order (cached for the other 199 until the move
    // invalidated it), then b100 at the order after the move, then b101.
    let reads: Vec<(String, Option<Timestamp>)> = setup
        .peer
        .commands_named("find")
        .iter()
        .filter(|c| c.get_str("find") == Ok("businesses"))
        .map(|c| {
            let rc = c.get_document("readConcern").expect("a read concern");
            assert_eq!(rc.get_str("level"), Ok("snapshot"), "{c}");
            (
                c.get_document("filter")
                    .unwrap()
                    .get_str("_id")
                    .unwrap()
                    .to_string(),
                read_concern_at(c),
            )
        })
        .collect();
    assert_eq!(
        reads,
        vec![
            ("b100".to_string(), Some(ts(2_000, 1))),
            ("b100".to_string(), Some(ts(2_002, 1))),
            ("b101".to_string(), Some(ts(2_002, 2))),
        ]
    );
    // User resolution at connect time reads the current state.
    for c in setup.peer.commands_named("find") {
        if c.get_str("find") == Ok("users") {
            assert!(c.get("readConcern").is_none(), "{c}");
        }
    }
    stop(running).await;
}

/// The value of the counter with exactly this name and these labels (0 when absent).
fn counter(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

/// The only metrics test in this binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_snapshot_read_falls_back_to_the_current_state_and_is_counted() {
    let mut world = World::new();
    world.refuse_snapshots = Some(239);
    let setup = Setup::new(world).await;
    let running = setup.start().await;
    let metrics = || async {
        let url = format!("http://{}/metrics", running.local_addr);
        reqwest::get(url).await.unwrap().text().await.unwrap()
    };
    const NAME: &str =
        "changecast_lookups_not_as_of_total{collection=\"businesses\",reason=\"snapshot_too_old\"}";
    let before = counter(&metrics().await, NAME);
    let mut u100 = client(&running, "u100").await;
    let mut u101 = client(&running, "u101").await;

    // Only the current state is readable: every order goes to b100's owner of now, u101.
    setup.push(burst_then_move(&setup));
    for i in 0..200 {
        expect_order(&mut u101, &format!("o{i}")).await;
    }
    setup.push(vec![order(202, "marker-u100", "b101", ts(2_002, 2))]);
    expect_order(&mut u100, "marker-u100").await;
    // Two misses (b100, b101), each refused and read again without a snapshot.
    assert_eq!(counter(&metrics().await, NAME) - before, 2);
    let finds = setup.peer.commands_named("find");
    let businesses: Vec<&Document> = finds
        .iter()
        .filter(|c| c.get_str("find") == Ok("businesses"))
        .collect();
    assert_eq!(
        businesses.len(),
        4,
        "each miss: the snapshot read, then the current read"
    );
    assert!(read_concern_at(businesses[0]).is_some());
    assert!(businesses[1].get("readConcern").is_none());
    stop(running).await;
}
