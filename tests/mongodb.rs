//! The MongoDB source with the real `mongodb` driver against the scripted wire peer
//! (`tests/mongo_peer`): the command it sends, delivery, checkpoints and every failure mode.

mod common;
mod mongo_peer;

use std::collections::VecDeque;
use std::time::Duration;

use common::{SECRET, Ws, counter, metrics_lock};
use mongo_peer::{
    Reply, Script, Scripted, change_event, change_stream_stage, filter_matches, first_batch,
    next_batch, token,
};
use mongodb::bson::{Document, doc};
use serde_json::Map;
use tokio::net::TcpListener;

use changecast::config::Config;
use changecast::plan::Plan;
use changecast::server::Running;

const DB: &str = "mercury";
const CURSOR_NS: &str = "mercury.$cmd.aggregate";
const WAIT: Duration = Duration::from_secs(15);

/// The deployment as the test scripts it.
#[derive(Default)]
struct World {
    businesses: Vec<Document>,
    users: Vec<Document>,
    /// Events handed out by the next getMore (or the next aggregate).
    pending: VecDeque<Document>,
    /// Replies that replace the next aggregate / getMore answers.
    aggregate_overrides: VecDeque<Reply>,
    getmore_overrides: VecDeque<Reply>,
    /// The checkpoint document as stored by changecast (`update` on the checkpoint collection).
    checkpoint: Option<Document>,
    /// The post-batch resume token: the last event's token.
    last_token: Option<Document>,
    cursor: i64,
}

impl World {
    fn mercury() -> World {
        World {
            businesses: vec![
                doc! {"_id": "b1", "name": "Kano Grains", "owner": {"_id": "u1"}},
                doc! {"_id": "b2", "name": "Lagos Fresh", "owner": {"_id": "u2"}},
            ],
            users: vec![
                doc! {"_id": "u1", "email": "amina@example.com", "business_id": "b1"},
                doc! {"_id": "u2", "email": "tunde@example.com", "business_id": "b2"},
            ],
            cursor: 40,
            ..World::default()
        }
    }

    fn batch(&mut self) -> (Vec<Document>, Option<Document>) {
        let events: Vec<Document> = self.pending.drain(..).collect();
        if let Some(last) = events.last() {
            self.last_token = last.get_document("_id").ok().cloned();
        }
        (events, self.last_token.clone())
    }
}

impl Script for World {
    fn answer(&mut self, name: &str, body: &Document) -> Reply {
        match name {
            "collMod" => Reply::Ok(doc! {}),
            "aggregate" => {
                if let Some(r) = self.aggregate_overrides.pop_front() {
                    return r;
                }
                self.cursor += 1;
                let (events, pbrt) = self.batch();
                Reply::Ok(first_batch(self.cursor, CURSOR_NS, events, pbrt))
            }
            "getMore" => {
                if let Some(r) = self.getmore_overrides.pop_front() {
                    return r;
                }
                let (events, pbrt) = self.batch();
                let reply = Reply::Ok(next_batch(self.cursor, CURSOR_NS, events.clone(), pbrt));
                if events.is_empty() {
                    // An awaitData getMore waits before answering an empty batch.
                    Reply::After(Duration::from_millis(50), Box::new(reply))
                } else {
                    reply
                }
            }
            "find" => {
                let coll = body.get_str("find").unwrap_or_default();
                let filter = body.get_document("filter").cloned().unwrap_or_default();
                let docs: Vec<Document> = match coll {
                    "businesses" => self.businesses.clone(),
                    "users" => self.users.clone(),
                    "changecast_checkpoints" => self.checkpoint.iter().cloned().collect(),
                    _ => vec![],
                };
                let found = docs
                    .into_iter()
                    .filter(|d| filter_matches(d, &filter))
                    .collect();
                Reply::Ok(first_batch(0, &format!("{DB}.{coll}"), found, None))
            }
            "update" if body.get_str("update") == Ok("changecast_checkpoints") => {
                let update = body.get_array("updates").unwrap()[0]
                    .as_document()
                    .unwrap()
                    .clone();
                let set = update
                    .get_document("u")
                    .unwrap()
                    .get_document("$set")
                    .unwrap();
                let mut stored =
                    doc! {"_id": update.get_document("q").unwrap().get_str("_id").unwrap()};
                stored.insert("token", set.get_document("token").unwrap().clone());
                self.checkpoint = Some(stored);
                Reply::Ok(doc! {"n": 1, "nModified": 1})
            }
            other => Reply::error(
                59,
                "CommandNotFound",
                &format!("the scripted peer does not know {other}"),
            ),
        }
    }
}

type Setup = Scripted<World>;

impl Setup {
    fn config(&self, extra_source: &str) -> String {
        let source = format!("max_await_time = \"200ms\"\n{extra_source}");
        common::mongo_config(&self.peer.uri(), DB, &source, "orders")
    }

    async fn start(&self, extra_source: &str) -> anyhow::Result<Running> {
        let plan = Plan::compile(&Config::parse(&self.config(extra_source)).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tokio::time::timeout(WAIT, changecast::server::start(plan, listener, None))
            .await
            .expect("starts in time")
    }

    /// Replaces the next getMore's answer (an error, a hang-up).
    fn answer_next_get_more(&self, reply: Reply) {
        self.world
            .lock()
            .unwrap()
            .getmore_overrides
            .push_back(reply);
    }

    fn push(&self, event: Document) {
        self.world.lock().unwrap().pending.push_back(event);
    }

    /// The `$changeStream` stage of the `n`th aggregate (1-based), waiting for it.
    async fn stream_stage(&self, n: usize) -> Document {
        let aggs = self.peer.wait_for("aggregate", n, WAIT).await;
        change_stream_stage(&aggs[n - 1])
            .expect("a $changeStream stage")
            .clone()
    }

    /// Waits until the stored checkpoint token is `{_data: t}`.
    async fn checkpoint_becomes(&self, t: &str) {
        let want = token(t);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.world.lock().unwrap().checkpoint.clone();
            if now.as_ref().and_then(|d| d.get_document("token").ok()) == Some(&want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "checkpoint is {now:?}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn client(running: &Running, email: &str) -> Ws {
    Ws::by_email(running.local_addr, email).await.0
}

/// The gateway's `/metrics` text. Metrics are process-wide: the tests that move and
/// measure `changecast_source_skipped_total` and `changecast_source_missing_preimages_total`
/// hold [`metrics_lock`] so that their before/after differences are their own.
async fn metrics(running: &Running) -> String {
    let url = format!("http://{}/metrics", running.local_addr);
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

fn order(tok: &str, op: &str, id: &str, business: &str) -> Document {
    let d = doc! {"_id": id, "creator_id": business, "status": "paid"};
    let (after, before) = match op {
        "delete" => (None, Some(d)),
        "insert" => (Some(d), None),
        _ => (Some(d.clone()), Some(d)),
    };
    change_event(tok, op, DB, "orders", doc! {"_id": id}, after, before)
}

async fn stop(running: Running) {
    tokio::time::timeout(WAIT, running.stop())
        .await
        .expect("stops in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregate_command_is_generated_from_the_rules() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let aggs = setup.peer.wait_for("aggregate", 1, WAIT).await;
    let pipeline = aggs[0].get_array("pipeline").unwrap();
    let stage = pipeline[0]
        .as_document()
        .unwrap()
        .get_document("$changeStream")
        .unwrap();
    assert_eq!(stage.get_str("fullDocument"), Ok("whenAvailable"));
    assert_eq!(
        stage.get_str("fullDocumentBeforeChange"),
        Ok("whenAvailable")
    );
    assert!(
        !stage.contains_key("resumeAfter"),
        "no checkpoint yet: from now"
    );
    assert_eq!(aggs[0].get_str("$db"), Ok(DB));

    let matched = pipeline[1]
        .as_document()
        .unwrap()
        .get_document("$match")
        .unwrap();
    let colls: Vec<&str> = matched
        .get_array("$or")
        .unwrap()
        .iter()
        .filter_map(|c| c.as_document().and_then(|c| c.get_str("ns.coll").ok()))
        .collect();
    assert_eq!(colls, vec!["businesses", "inventory_items", "orders"]);
    let project = pipeline[2]
        .as_document()
        .unwrap()
        .get_document("$project")
        .unwrap();
    assert!(
        project.contains_key("fullDocument"),
        "routes send whole documents"
    );
    assert!(!project.contains_key("_id"), "the resume token is kept");

    // ensure: collMod on every watched collection, as the seed did by hand.
    let mods: Vec<String> = setup
        .peer
        .commands_named("collMod")
        .iter()
        .map(|c| c.get_str("collMod").unwrap().to_owned())
        .collect();
    assert_eq!(mods, vec!["businesses", "inventory_items", "orders"]);
    for c in setup.peer.commands_named("collMod") {
        assert_eq!(
            c.get_document("changeStreamPreAndPostImages")
                .unwrap()
                .get_bool("enabled"),
            Ok(true)
        );
    }
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_their_owners_and_tokens_are_checkpointed_then_resumed() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let mut u1 = client(&running, "amina@example.com").await;
    let mut u2 = client(&running, "tunde@example.com").await;

    setup.push(order("t1", "insert", "o1", "b1"));
    setup.push(order("t2", "delete", "o19", "b2"));
    let ev = u1.next().await;
    assert_eq!(
        (ev["op"].as_str(), ev["key"].as_str()),
        (Some("insert"), Some("o1")),
        "{ev}"
    );
    let ev = u2.next().await;
    assert_eq!(
        (ev["op"].as_str(), ev["key"].as_str()),
        (Some("delete"), Some("o19")),
        "routed by pre-image: {ev}"
    );
    setup.checkpoint_becomes("t2").await;
    stop(running).await;

    // A restart resumes right after the checkpointed event.
    let running = setup.start("").await.unwrap();
    let stage = setup.stream_stage(2).await;
    assert_eq!(stage.get_document("resumeAfter"), Ok(&token("t2")));
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_streams_checkpoint_the_post_batch_token() {
    let setup = Setup::new(World::mercury()).await;
    setup.world.lock().unwrap().last_token = Some(token("quiet-1"));
    let running = setup.start("").await.unwrap();
    setup.checkpoint_becomes("quiet-1").await;
    setup.world.lock().unwrap().last_token = Some(token("quiet-2"));
    setup.checkpoint_becomes("quiet-2").await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_mid_stream_resumes_without_losing_or_repeating() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let mut u1 = client(&running, "amina@example.com").await;
    setup.push(order("t1", "insert", "o1", "b1"));
    assert_eq!(u1.next().await["key"], "o1");

    // The driver's own resume fails too (the retry of aggregate hangs up twice): changecast
    // reopens the stream itself, from its last token.
    {
        let mut w = setup.world.lock().unwrap();
        w.getmore_overrides.push_back(Reply::HangUp);
        w.aggregate_overrides.push_back(Reply::HangUp);
        w.aggregate_overrides.push_back(Reply::HangUp);
    }
    let n = setup.peer.commands_named("aggregate").len();
    let stage = setup.stream_stage(n + 3).await;
    assert_eq!(stage.get_document("resumeAfter"), Ok(&token("t1")));
    setup.push(order("t2", "insert", "o2", "b1"));
    let ev = u1.next().await;
    assert_eq!(ev["key"], "o2", "the next event, o1 not repeated: {ev}");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_starts_from_now_and_tells_clients_about_the_gap() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let mut u1 = client(&running, "amina@example.com").await;
    setup.push(order("t1", "insert", "o1", "b1"));
    let first = u1.next().await;
    setup.answer_next_get_more(Reply::error(
        286,
        "ChangeStreamHistoryLost",
        "resume point no longer in the oplog",
    ));
    let n = setup.peer.commands_named("aggregate").len();
    let stage = setup.stream_stage(n + 1).await;
    assert!(
        !stage.contains_key("resumeAfter") && !stage.contains_key("startAfter"),
        "never a retry of the dead token: {stage}"
    );
    let gap = u1.next().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    // A client resuming from before the loss gets a gap too.
    let mut claims = Map::new();
    claims.insert("user_id".into(), "amina@example.com".into());
    let token = changecast::auth::mint(SECRET.as_bytes(), "a", 600, &claims);
    let since = first["id"].as_str().unwrap();
    let mut late = Ws::connect(&format!(
        "ws://{}/v1/ws?token={token}&since={since}",
        running.local_addr
    ))
    .await;
    assert_eq!(late.next().await["resumed"], false);
    assert_eq!(late.next().await["type"], "gap");
    // And delivery goes on from the new stream.
    setup.push(order("t9", "insert", "o9", "b1"));
    assert_eq!(u1.next().await["key"], "o9");
    assert_eq!(
        setup.peer.commands_named("aggregate").len(),
        n + 1,
        "exactly one new stream, no loop"
    );
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_reopens_with_start_after() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let mut u1 = client(&running, "amina@example.com").await;
    setup.push(change_event(
        "d1",
        "dropDatabase",
        DB,
        "",
        doc! {},
        None,
        None,
    ));
    setup.push(change_event(
        "inv1",
        "invalidate",
        DB,
        "",
        doc! {},
        None,
        None,
    ));
    let stage = setup.stream_stage(2).await;
    assert_eq!(stage.get_document("startAfter"), Ok(&token("inv1")));
    assert!(!stage.contains_key("resumeAfter"));
    setup.push(order("t2", "insert", "o2", "b1"));
    assert_eq!(u1.next().await["key"], "o2");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_47_missing_pre_image_reopens_from_the_last_token() {
    let _metrics = metrics_lock().await;
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let before = metrics(&running).await;
    let mut u1 = client(&running, "amina@example.com").await;
    setup.push(order("t1", "insert", "o1", "b1"));
    assert_eq!(u1.next().await["key"], "o1");
    setup.answer_next_get_more(Reply::error(
        47,
        "NoMatchingDocument",
        "pre-image not found",
    ));
    let n = setup.peer.commands_named("aggregate").len();
    let stage = setup.stream_stage(n + 1).await;
    assert_eq!(stage.get_document("resumeAfter"), Ok(&token("t1")));
    setup.push(order("t2", "insert", "o2", "b1"));
    assert_eq!(u1.next().await["key"], "o2");
    let after = metrics(&running).await;
    let missing = "changecast_source_missing_preimages_total";
    assert_eq!(
        counter(&after, missing, &[]) - counter(&before, missing, &[]),
        1.0,
        "error 47 counted once"
    );
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_and_deletes_without_pre_images_are_skipped_not_fatal() {
    let _metrics = metrics_lock().await;
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let before = metrics(&running).await;
    let mut u1 = client(&running, "amina@example.com").await;
    let mut broken = order("t1", "insert", "o1", "b1");
    broken.remove("documentKey");
    setup.push(broken);
    setup.push(change_event(
        "t2",
        "delete",
        DB,
        "orders",
        doc! {"_id": "o7"},
        None,
        None,
    ));
    setup.push(order("t3", "insert", "o3", "b1"));
    assert_eq!(u1.next().await["key"], "o3", "the next good event arrives");
    setup.checkpoint_becomes("t3").await;
    let after = metrics(&running).await;
    let diff = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    let malformed = [("reason", "malformed")];
    assert_eq!(diff("changecast_source_skipped_total", &malformed), 1.0);
    assert_eq!(
        diff("changecast_source_missing_preimages_total", &[]),
        1.0,
        "the delete without its pre-image"
    );
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_crossing_raises_one_alert() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let mut u1 = client(&running, "amina@example.com").await;
    let item = |q: i32| doc! {"_id": "i1", "name": "Rice", "owned_by": "b1", "quantity_in_stock": q, "reorder_point": 5};
    let update = |t: &str, before: i32, after: i32| {
        let mut e = change_event(
            t,
            "update",
            DB,
            "inventory_items",
            doc! {"_id": "i1"},
            Some(item(after)),
            Some(item(before)),
        );
        e.insert(
            "updateDescription",
            doc! {"updatedFields": {"quantity_in_stock": after}, "removedFields": [], "truncatedArrays": []},
        );
        e
    };
    setup.push(update("t1", 10, 3));
    setup.push(update("t2", 3, 2));
    setup.push(order("t3", "insert", "o3", "b1"));
    let alert = u1.next().await;
    assert_eq!(alert["type"], "alert", "{alert}");
    assert_eq!(alert["message"], "Stock low: Rice has 3 left.");
    assert_eq!(u1.next().await["key"], "o3", "no second alert for 3 -> 2");
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_a_replica_set_is_a_clear_startup_error() {
    let mut world = World::mercury();
    world.aggregate_overrides.push_back(Reply::error(
        40573,
        "Location40573",
        "The $changeStream stage is only supported on replica sets",
    ));
    let setup = Setup::new(world).await;
    let err = setup.start("").await.err().expect("start fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("not a replica set"), "{msg}");
    assert!(
        msg.contains("--replSet") && msg.contains("rs.initiate()"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_checkpoints_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resume.token");
    let extra = format!(
        "checkpoint = \"file\"\ncheckpoint_file = \"{}\"",
        file.display()
    );
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start(&extra).await.unwrap();
    let mut u1 = client(&running, "amina@example.com").await;
    setup.push(order("f1", "insert", "o1", "b1"));
    assert_eq!(u1.next().await["key"], "o1");
    stop(running).await;
    assert!(file.exists());
    let running = setup.start(&extra).await.unwrap();
    let stage = setup.stream_stage(2).await;
    assert_eq!(stage.get_document("resumeAfter"), Ok(&token("f1")));
    assert!(
        setup.world.lock().unwrap().checkpoint.is_none(),
        "nothing written to the database"
    );
    stop(running).await;
}

/// `event` as the server splits it with `$changeStreamSplitLargeEvent`: fragment 1 holds
/// everything but the pre-image, fragment 2 the pre-image; each has its own token.
fn split_in_two(event: &Document, first_token: &str, last_token: &str) -> (Document, Document) {
    let mut first = doc! {
        "_id": token(first_token),
        "splitEvent": {"fragment": 1, "of": 2},
    };
    let mut last = doc! {
        "_id": token(last_token),
        "splitEvent": {"fragment": 2, "of": 2},
    };
    for (k, v) in event {
        match k.as_str() {
            "_id" => {}
            "fullDocumentBeforeChange" => {
                last.insert(k, v.clone());
            }
            _ => {
                first.insert(k, v.clone());
            }
        }
    }
    (first, last)
}

/// The value of the exactly named series in `/metrics` text (0 when absent).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// The last stage of an `aggregate`'s pipeline.
fn last_stage(aggregate: &Document) -> Document {
    let pipeline = aggregate.get_array("pipeline").unwrap();
    pipeline.last().unwrap().as_document().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_large_event_is_reassembled_and_checkpointed_at_its_last_fragment() {
    let setup = Setup::new(World::mercury()).await;
    let running = setup.start("").await.unwrap();
    let aggs = setup.peer.wait_for("aggregate", 1, WAIT).await;
    assert!(
        last_stage(&aggs[0]).contains_key("$changeStreamSplitLargeEvent"),
        "the split stage is last: {}",
        aggs[0]
    );
    let mut u1 = client(&running, "amina@example.com").await;

    let mut big = order("unused", "update", "o-big", "b1");
    big.get_document_mut("fullDocument")
        .unwrap()
        .insert("notes", "n".repeat(4096));
    let (first, last) = split_in_two(&big, "big-1", "big-2");
    // Fragment 1 alone, then at least one empty getMore whose post-batch token is big-1
    // (mid-event: it must not be checkpointed), then fragment 2.
    setup.push(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !setup.world.lock().unwrap().pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fragment 1 never read"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let n = setup.peer.commands_named("getMore").len();
    setup.peer.wait_for("getMore", n + 2, WAIT).await;
    setup.push(last);

    let ev = u1.change().await;
    assert_eq!(
        (ev["op"].as_str(), ev["key"].as_str()),
        (Some("update"), Some("o-big")),
        "{ev}"
    );
    assert_eq!(
        ev["doc"]["notes"].as_str().map(str::len),
        Some(4096),
        "{ev}"
    );
    setup.checkpoint_becomes("big-2").await;
    let checkpointed: Vec<Document> = setup
        .peer
        .commands_named("update")
        .iter()
        .filter_map(|u| {
            let u = u.get_array("updates").ok()?[0].as_document()?;
            u.get_document("u")
                .ok()?
                .get_document("$set")
                .ok()?
                .get_document("token")
                .ok()
                .cloned()
        })
        .collect();
    assert!(
        !checkpointed.contains(&token("big-1")),
        "never a token from inside a split event: {checkpointed:?}"
    );

    setup.push(order("t3", "insert", "o3", "b1"));
    assert_eq!(u1.change().await["key"], "o3");
    assert_eq!(
        setup.peer.commands_named("aggregate").len(),
        1,
        "one stream throughout"
    );
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_on_a_server_without_split_is_skipped_with_a_gap_never_a_loop() {
    let setup = Setup::new(World::mercury()).await;
    // A server before 6.0.9 / 7.0 refuses the stage: the stream is opened without it.
    setup
        .world
        .lock()
        .unwrap()
        .aggregate_overrides
        .push_back(Reply::error(
            40324,
            "Location40324",
            "Unrecognized pipeline stage name: '$changeStreamSplitLargeEvent'",
        ));
    let skipped = "changecast_source_skipped_total{reason=\"too_large\"}";
    let before = series(&changecast::server::metrics_handle().render(), skipped);
    let running = setup.start("").await.unwrap();
    let aggs = setup.peer.wait_for("aggregate", 2, WAIT).await;
    assert!(last_stage(&aggs[0]).contains_key("$changeStreamSplitLargeEvent"));
    assert!(
        !last_stage(&aggs[1]).contains_key("$changeStreamSplitLargeEvent"),
        "opened again without the stage: {}",
        aggs[1]
    );
    let mut u1 = client(&running, "amina@example.com").await;
    setup.push(order("t1", "insert", "o1", "b1"));
    assert_eq!(u1.change().await["key"], "o1");

    // The next event is over 16 MB: the getMore fails with 10334. The identifying stream
    // (no images) shows it small, with its token.
    let n = setup.peer.commands_named("aggregate").len();
    {
        let mut w = setup.world.lock().unwrap();
        let mut slim = order("big", "update", "o-big", "b1");
        slim.remove("fullDocument");
        slim.remove("fullDocumentBeforeChange");
        slim.remove("updateDescription");
        w.aggregate_overrides.push_back(Reply::Ok(first_batch(
            77,
            CURSOR_NS,
            vec![slim],
            Some(token("big")),
        )));
        w.getmore_overrides.push_back(Reply::error(
            10334,
            "BSONObjectTooLarge",
            "BSONObj size: 17825792 (0x1100000) is invalid. Size must be between 0 and 16793600(16MB)",
        ));
    }
    let gap = u1.next().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    let aggs = setup.peer.wait_for("aggregate", n + 2, WAIT).await;
    let identify = &aggs[n];
    let stage = change_stream_stage(identify).unwrap();
    assert_eq!(stage.get_document("resumeAfter"), Ok(&token("t1")));
    assert!(!stage.contains_key("fullDocumentBeforeChange"), "{stage}");
    let project = identify.get_array("pipeline").unwrap()[2]
        .as_document()
        .unwrap()
        .get_document("$project")
        .unwrap();
    assert!(!project.contains_key("fullDocument"), "{project}");
    let reopened = change_stream_stage(&aggs[n + 1]).unwrap();
    assert_eq!(reopened.get_document("resumeAfter"), Ok(&token("big")));

    // Later events flow, and no further stream was opened: no loop.
    setup.push(order("t3", "insert", "o3", "b1"));
    assert_eq!(u1.change().await["key"], "o3");
    setup.checkpoint_becomes("t3").await;
    assert_eq!(setup.peer.commands_named("aggregate").len(), n + 2);
    let after = series(&metrics(&running).await, skipped);
    assert_eq!(after - before, 1.0);
    stop(running).await;
}
