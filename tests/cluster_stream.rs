//! The router's writes to the stream against a real nats-server: a router killed in the
//! middle of a batch leaves a stream whose newest message says where to re-read from, and
//! the router that re-reads it adds exactly what was missing — nothing twice.

mod common;

use std::sync::Arc;
use std::time::Duration;

use changecast::change::{Position, UserId};
use changecast::cluster::Nats;
use changecast::cluster::lease::Lease;
use changecast::cluster::publish::{Publisher, resume_position};
use changecast::cluster::wire::{self, Kind};
use changecast::router::{EventStream, RoutedBatch, RoutedEvent};

use common::nats::NatsServer;

async fn connect(url: &str) -> Nats {
    common::nats::connect(url, "r1", "batches", "1m").await
}

/// An event of the change at log position `at`, made by route `orders`, for `user`.
fn event(at: u64, user: &str) -> RoutedEvent {
    RoutedEvent {
        kind: Kind::Change,
        recipients: Arc::from(vec![UserId::from(user)]),
        template: format!(r#"{{"type":"change","id":"","key":"o{at}"}}"#),
        position: Position::from_seq(at),
        rule: Arc::from("orders"),
        key: None,
    }
}

fn batch(from: u64, to: u64) -> RoutedBatch {
    RoutedBatch {
        lost_history: false,
        events: (from + 1..=to).map(|at| event(at, "u1")).collect(),
        start: Some(Position::from_seq(from)),
        end: Position::from_seq(to),
    }
}

/// The stream's messages: (sequence, the event's key, its resume position).
async fn messages(nats: &Nats) -> Vec<(u64, String, Option<u64>)> {
    let (_, first, last) = nats.state().await.unwrap();
    let mut out = Vec::new();
    for seq in first.max(1)..=last {
        let Ok(m) = nats.stream.get_raw_message(seq).await else {
            continue; // deleted
        };
        let (_, template) = wire::parse(&m.payload).unwrap();
        let v: serde_json::Value = serde_json::from_str(template).unwrap();
        let resume = m
            .headers
            .get(wire::RESUME)
            .and_then(|h| wire::unhex(h.as_str()))
            .and_then(|p| p.as_seq());
        out.push((seq, v["key"].as_str().unwrap().to_owned(), resume));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_short_by_a_crash_is_completed_by_the_next_router_without_duplicates() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await;
    let lease = Lease::new(nats.lease.clone(), "r1", Duration::from_secs(60));
    let held = Arc::new(lease.acquire().await.unwrap().expect("the lease is free"));
    let router = Publisher::new(nats.clone(), Some(Arc::clone(&held)));

    // Changes 1..=3: every message but the batch's last says "re-read from the batch's
    // start"; its last says "from its end".
    assert_eq!(
        router.append(batch(0, 3)).await.unwrap(),
        Some(Position::from_seq(3))
    );
    let keys = |m: &[(u64, String, Option<u64>)]| -> Vec<String> {
        m.iter().map(|(_, k, _)| k.clone()).collect()
    };
    let written = messages(&nats).await;
    assert_eq!(keys(&written), ["o1", "o2", "o3"]);
    let resumes: Vec<Option<u64>> = written.iter().map(|m| m.2).collect();
    assert_eq!(resumes, [Some(0), Some(0), Some(3)]);
    assert_eq!(
        resume_position(&nats).await.unwrap(),
        Some(Position::from_seq(3))
    );

    // The next batch, 4..=6: the router dies after publishing o4 and o5. What reached the
    // stream is exactly that: two messages, each saying "re-read from 3".
    let mut cut_short = batch(3, 6);
    cut_short.events.truncate(2);
    cut_short.end = Position::from_seq(3);
    router.append(cut_short).await.unwrap();
    assert_eq!(keys(&messages(&nats).await), ["o1", "o2", "o3", "o4", "o5"]);
    // The next router re-reads from the batch's start...
    let from = resume_position(&nats).await.unwrap();
    assert_eq!(from, Some(Position::from_seq(3)));
    // ...and routes 4..=7 (one more change came meanwhile): o4 and o5 are dropped as
    // duplicates, o6 and o7 are added.
    router.append(batch(3, 7)).await.unwrap();
    let after = messages(&nats).await;
    assert_eq!(keys(&after), ["o1", "o2", "o3", "o4", "o5", "o6", "o7"]);
    assert_eq!(
        resume_position(&nats).await.unwrap(),
        Some(Position::from_seq(7))
    );

    // A batch routed twice (two routers at once, or a re-read of a whole batch) adds nothing.
    let (_, _, before) = nats.state().await.unwrap();
    router.append(batch(3, 7)).await.unwrap();
    let (_, _, again) = nats.state().await.unwrap();
    assert_eq!(before, again, "a repeated batch added messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_the_lease_cannot_append() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await;
    let publisher = Publisher::new(nats.clone(), None);
    let refused = publisher.append(batch(0, 1)).await;
    assert!(
        matches!(refused, Err(changecast::router::StreamError::LostLease)),
        "{refused:?}"
    );
    // The publish API's messages need no lease and carry no resume position.
    let id = publisher
        .publish(
            Arc::from(vec![UserId::from("u1")]),
            r#"{"type":"message","id":"","event":{}}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!(id, format!("{}-1", nats.epoch));
    assert_eq!(resume_position(&nats).await.unwrap(), None);
}
