//! Proves that the real `mongodb` driver accepts the scripted peer in `mongo_peer` as the primary
//! of a replica set: commands, change streams, automatic resume, and command errors.

mod mongo_peer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use mongodb::Client;
use mongodb::bson::{Bson, Document, doc};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::error::ErrorKind;
use mongodb::options::FullDocumentType;

use mongo_peer::{
    MongoPeer, Reply, change_event, change_stream_stage, first_batch, next_batch, token,
};

const NS: &str = "mercury.$cmd.aggregate";
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(20), test)
        .await
        .expect("test timed out after 20s");
}

async fn client(peer: &MongoPeer) -> Client {
    Client::with_uri_str(peer.uri())
        .await
        .expect("driver parses the peer's URI")
}

fn insert_event(tok: &str, id: &str) -> Document {
    change_event(
        tok,
        "insert",
        "mercury",
        "orders",
        doc! { "_id": id },
        Some(doc! { "_id": id, "owner": "u1", "total": 12 }),
        None,
    )
}

fn unexpected(name: &str) -> Reply {
    Reply::error(59, "CommandNotFound", &format!("no such command: '{name}'"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_succeeds() {
    bounded(async {
        let peer = MongoPeer::start(|name, _| unexpected(name)).await;
        let client = client(&peer).await;
        let reply = client
            .database("mercury")
            .run_command(doc! { "ping": 1 })
            .await
            .expect("ping through the driver");
        assert_eq!(reply.get("ok").and_then(Bson::as_f64), Some(1.0), "{reply}");
        // ping is handshake noise: not recorded.
        assert!(peer.commands_named("ping").is_empty());
        assert!(peer.handler_panics().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_stream_delivers_events_in_order() {
    bounded(async {
        let get_mores = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&get_mores);
        let peer = MongoPeer::start(move |name, _| match name {
            "aggregate" => Reply::Ok(first_batch(42, NS, vec![insert_event("tok1", "o1")], None)),
            "getMore" => match counter.fetch_add(1, Ordering::SeqCst) {
                0 => Reply::Ok(next_batch(
                    42,
                    NS,
                    vec![change_event(
                        "tok2",
                        "update",
                        "mercury",
                        "orders",
                        doc! { "_id": "o1" },
                        Some(doc! { "_id": "o1", "owner": "u1", "total": 13 }),
                        None,
                    )],
                    None,
                )),
                // A quiet awaitData getMore: empty batch with a post-batch resume token.
                _ => Reply::after(
                    Duration::from_millis(100),
                    Reply::Ok(next_batch(42, NS, vec![], Some(token("tok3")))),
                ),
            },
            other => unexpected(other),
        })
        .await;
        let client = client(&peer).await;

        let mut stream = client
            .database("mercury")
            .watch()
            .pipeline(vec![
                doc! { "$match": { "operationType": { "$in": ["insert", "update"] } } },
            ])
            .full_document(FullDocumentType::UpdateLookup)
            .await
            .expect("watch opens");

        let e1: ChangeStreamEvent<Document> = stream
            .next_if_any()
            .await
            .expect("first event")
            .expect("first batch has an event");
        assert_eq!(e1.operation_type, OperationType::Insert);
        assert_eq!(
            mongodb::bson::to_bson(&e1.id).unwrap(),
            Bson::Document(token("tok1"))
        );
        let ns = e1.ns.as_ref().expect("ns");
        assert_eq!(
            (ns.db.as_str(), ns.coll.as_deref()),
            ("mercury", Some("orders"))
        );
        assert_eq!(e1.document_key, Some(doc! { "_id": "o1" }));
        assert_eq!(
            e1.full_document.as_ref().unwrap().get_i32("total").unwrap(),
            12
        );

        let e2 = stream
            .next()
            .await
            .expect("stream open")
            .expect("second event");
        assert_eq!(e2.operation_type, OperationType::Update);
        assert_eq!(
            mongodb::bson::to_bson(&e2.id).unwrap(),
            Bson::Document(token("tok2"))
        );
        assert_eq!(
            e2.full_document.as_ref().unwrap().get_i32("total").unwrap(),
            13
        );
        assert!(e2.update_description.is_some());

        // An empty batch: next_if_any says so, and the cached token is the post-batch token.
        let quiet = stream.next_if_any().await.expect("empty getMore is fine");
        assert!(quiet.is_none(), "{quiet:?}");
        let cached = stream.resume_token().expect("post-batch token cached");
        assert_eq!(
            mongodb::bson::to_bson(&cached).unwrap(),
            Bson::Document(token("tok3"))
        );

        let aggregates = peer.commands_named("aggregate");
        assert_eq!(aggregates.len(), 1, "{aggregates:?}");
        let agg = &aggregates[0];
        assert_eq!(agg.get_str("$db").unwrap(), "mercury");
        assert_eq!(agg.get("aggregate"), Some(&Bson::Int32(1)), "{agg}");
        let stage = change_stream_stage(agg).expect("$changeStream first");
        assert_eq!(
            stage.get_str("fullDocument").unwrap(),
            "updateLookup",
            "{agg}"
        );
        let pipeline = agg.get_array("pipeline").unwrap();
        assert!(
            pipeline[1].as_document().unwrap().contains_key("$match"),
            "{agg}"
        );

        let get_more = &peer.commands_named("getMore")[0];
        assert_eq!(get_more.get_i64("getMore").unwrap(), 42, "{get_more}");
        assert_eq!(get_more.get_str("collection").unwrap(), "$cmd.aggregate");

        // Dropping the stream kills its cursor.
        drop(stream);
        let kills = peer.wait_for("killCursors", 1, WAIT).await;
        assert_eq!(
            kills[0].get_array("cursors").unwrap(),
            &vec![Bson::Int64(42)],
            "{}",
            kills[0]
        );
        assert!(peer.handler_panics().is_empty());
    })
    .await;
}

/// Aggregate 1 opens cursor 42 with `tok1`; aggregate 2 (the resume) opens cursor 43 with `tok2`.
/// `first_get_more` is what the first getMore on cursor 42 gets.
async fn resume_peer(first_get_more: Reply) -> MongoPeer {
    let aggregates = AtomicUsize::new(0);
    let get_mores = AtomicUsize::new(0);
    MongoPeer::start(move |name, body| match name {
        "aggregate" => match aggregates.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::Ok(first_batch(42, NS, vec![insert_event("tok1", "o1")], None)),
            _ => Reply::Ok(first_batch(43, NS, vec![insert_event("tok2", "o2")], None)),
        },
        "getMore"
            if body.get_i64("getMore").ok() == Some(42)
                && get_mores.fetch_add(1, Ordering::SeqCst) == 0 =>
        {
            first_get_more.clone()
        }
        "getMore" => {
            let id = body.get_i64("getMore").unwrap_or(0);
            Reply::after(
                Duration::from_millis(100),
                Reply::Ok(next_batch(id, NS, vec![], None)),
            )
        }
        other => unexpected(other),
    })
    .await
}

async fn watch_orders(
    client: &Client,
) -> mongodb::change_stream::ChangeStream<ChangeStreamEvent<Document>> {
    client
        .database("mercury")
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .expect("watch opens")
}

fn assert_resumed_after_tok1(peer: &MongoPeer) {
    let aggregates = peer.commands_named("aggregate");
    assert_eq!(aggregates.len(), 2, "{aggregates:?}");
    let first = change_stream_stage(&aggregates[0]).unwrap();
    assert!(!first.contains_key("resumeAfter"), "{first}");
    let second = change_stream_stage(&aggregates[1]).unwrap();
    assert_eq!(
        second.get_document("resumeAfter").unwrap(),
        &token("tok1"),
        "{second}"
    );
    assert_eq!(
        second.get_str("fullDocument").unwrap(),
        "updateLookup",
        "{second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_resumes_after_a_hang_up_on_get_more() {
    bounded(async {
        let peer = resume_peer(Reply::HangUp).await;
        let client = client(&peer).await;
        let mut stream = watch_orders(&client).await;

        let e1 = stream.next().await.unwrap().expect("first event");
        assert_eq!(
            mongodb::bson::to_bson(&e1.id).unwrap(),
            Bson::Document(token("tok1"))
        );
        // getMore gets a hang-up; the driver resumes by itself and the resumed cursor has tok2.
        let e2 = stream
            .next()
            .await
            .unwrap()
            .expect("event after the resume");
        assert_eq!(
            mongodb::bson::to_bson(&e2.id).unwrap(),
            Bson::Document(token("tok2"))
        );
        assert_resumed_after_tok1(&peer);
        assert!(peer.handler_panics().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_resumes_after_hang_up_all_mid_stream() {
    bounded(async {
        // The first getMore waits long (an awaitData getMore on a quiet database) and is cut off.
        let peer = resume_peer(Reply::after(
            Duration::from_secs(30),
            Reply::Ok(next_batch(42, NS, vec![], None)),
        ))
        .await;
        let client = client(&peer).await;
        let mut stream = watch_orders(&client).await;

        let e1 = stream.next().await.unwrap().expect("first event");
        assert_eq!(
            mongodb::bson::to_bson(&e1.id).unwrap(),
            Bson::Document(token("tok1"))
        );
        let (e2, ()) = tokio::join!(stream.next(), async {
            peer.wait_for("getMore", 1, WAIT).await;
            peer.hang_up_all();
        });
        let e2 = e2.unwrap().expect("event after the resume");
        assert_eq!(
            mongodb::bson::to_bson(&e2.id).unwrap(),
            Bson::Document(token("tok2"))
        );
        assert_resumed_after_tok1(&peer);
        assert!(peer.handler_panics().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_error_surfaces_with_its_code() {
    bounded(async {
        let peer = MongoPeer::start(|name, _| match name {
            "aggregate" => Reply::error(
                40573,
                "Location40573",
                "The $changeStream stage is only supported on replica sets",
            ),
            other => unexpected(other),
        })
        .await;
        let client = client(&peer).await;
        let err = client
            .database("mercury")
            .watch()
            .await
            .expect_err("aggregate fails");
        match err.kind.as_ref() {
            ErrorKind::Command(e) => {
                assert_eq!(e.code, 40573, "{err}");
                assert_eq!(e.code_name, "Location40573");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        // Not a retryable error: one aggregate only.
        assert_eq!(peer.commands_named("aggregate").len(), 1);
        assert!(peer.handler_panics().is_empty());
    })
    .await;
}
