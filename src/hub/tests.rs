use super::*;
use crate::change::Position;

fn config(history: usize, queue: usize) -> HubConfig {
    HubConfig {
        history_per_user: history,
        queue_capacity: queue,
        queue_bytes: 1 << 20,
        max_connections: 1000,
        max_connections_per_user: 100,
    }
}

fn hub(history: usize, queue: usize) -> Arc<Hub> {
    Arc::new(Hub::with_epoch("e1", config(history, queue)))
}

fn publish(hub: &Hub, users: &[&str], n: u64) -> u64 {
    hub.publish(users, |id| format!("{{\"id\":\"{id}\",\"n\":{n}}}"))
        .unwrap()
}

/// The opening as (kind, text): ("ready" | "gap" | event id, json).
async fn opening(sub: &mut Subscription) -> Vec<(String, String)> {
    sub.opening()
        .await
        .into_iter()
        .map(|o| match o {
            Opening::Control(json) => {
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                (v["type"].as_str().unwrap().to_owned(), json)
            }
            Opening::Event(f) => (f.id.to_string(), f.json.to_string()),
        })
        .collect()
}

fn kinds(o: &[(String, String)]) -> Vec<&str> {
    o.iter().map(|(k, _)| k.as_str()).collect()
}

#[tokio::test]
async fn every_connection_of_a_user_gets_the_same_bytes() {
    let hub = hub(10, 10);
    let mut a = hub.subscribe("u1", None).unwrap();
    let mut b = hub.subscribe("u1", None).unwrap();
    let mut other = hub.subscribe("u2", None).unwrap();
    publish(&hub, &["u1"], 1);
    let fa = a.recv().await.unwrap();
    let fb = b.recv().await.unwrap();
    assert!(
        Arc::ptr_eq(&fa, &fb),
        "one encoding shared by all connections"
    );
    assert_eq!(fa.id.as_ref(), "e1-1");
    assert!(other.rx.try_recv().is_err());
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed() {
    let hub = hub(10, 10);
    for n in 1..=5 {
        publish(&hub, &["u1"], n);
    }
    publish(&hub, &["u2"], 6);
    let mut sub = hub.subscribe("u1", Some("e1-2")).unwrap();
    let o = opening(&mut sub).await;
    assert_eq!(kinds(&o), vec!["ready", "e1-3", "e1-4", "e1-5"]);
    assert!(o[0].1.contains("\"resumed\":true"));
    assert!(o[0].1.contains("\"position\":\"e1-6\""));
}

#[tokio::test]
async fn since_older_than_history_or_from_another_epoch_is_a_gap() {
    let hub = hub(2, 10);
    for n in 1..=5 {
        publish(&hub, &["u1"], n);
    }
    for since in ["e1-2", "e0-4", "e1-99", "garbage", "e1-x"] {
        let mut sub = hub.subscribe("u1", Some(since)).unwrap();
        let o = opening(&mut sub).await;
        assert_eq!(kinds(&o), vec!["ready", "gap"], "{since}");
        assert!(o[0].1.contains("\"resumed\":false"));
    }
    // The oldest kept is e1-4, so resuming after e1-3 is complete.
    let mut sub = hub.subscribe("u1", Some("e1-3")).unwrap();
    assert_eq!(
        kinds(&opening(&mut sub).await),
        vec!["ready", "e1-4", "e1-5"]
    );
}

#[tokio::test]
async fn a_user_with_no_history_resumes_from_anywhere_in_the_epoch() {
    let hub = hub(2, 10);
    publish(&hub, &["u2"], 1);
    let mut sub = hub.subscribe("u1", Some("e1-0")).unwrap();
    assert_eq!(kinds(&opening(&mut sub).await), vec!["ready"]);
}

#[tokio::test]
async fn full_queue_kicks_only_that_connection() {
    let hub = hub(10, 2);
    let slow = hub.subscribe("u1", None).unwrap();
    let mut fast = hub.subscribe("u1", None).unwrap();
    for n in 1..=3 {
        publish(&hub, &["u1"], n);
        fast.recv().await.unwrap();
    }
    assert!(slow.kick.token.is_cancelled());
    assert_eq!(slow.kick.reason.get(), Some(&CloseReason::TooSlow));
    assert!(!fast.kick.token.is_cancelled());
    assert_eq!(hub.connection_count(), 1);
}

#[tokio::test]
async fn queued_bytes_are_bounded_too() {
    let hub = Arc::new(Hub::with_epoch(
        "e1",
        HubConfig {
            history_per_user: 10,
            queue_capacity: 100,
            queue_bytes: 100,
            max_connections: 1000,
            max_connections_per_user: 100,
        },
    ));
    let slow = hub.subscribe("u1", None).unwrap();
    let mut reader = hub.subscribe("u1", None).unwrap();
    let big = "x".repeat(40);
    for _ in 0..3 {
        hub.publish(&["u1"], |id| format!("{{\"id\":\"{id}\",\"p\":\"{big}\"}}"));
        // The reader keeps up: its queued bytes go back down as it reads.
        reader.recv().await.unwrap();
    }
    assert!(slow.kick.token.is_cancelled(), "over 100 bytes queued");
    assert!(!reader.kick.token.is_cancelled());
}

#[tokio::test]
async fn dropping_a_subscription_unregisters_it() {
    let hub = hub(10, 10);
    let a = hub.subscribe("u1", None).unwrap();
    assert_eq!(hub.connection_count(), 1);
    drop(a);
    assert_eq!(hub.connection_count(), 0);
    assert_eq!(hub.publish(&[] as &[&str], |_| String::new()), None);
}

#[tokio::test]
async fn lost_history_sends_gap_and_refuses_older_resumes() {
    let hub = hub(10, 10);
    publish(&hub, &["u1"], 1);
    let mut live = hub.subscribe("u1", None).unwrap();
    assert_eq!(hub.history_lost(), 2);
    let gap = live.recv().await.unwrap();
    assert_eq!(
        &*gap.json,
        r#"{"type":"gap","since":"e1-1","position":"e1-1"}"#
    );
    for (user, since) in [("u1", "e1-0"), ("u2", "e1-0"), ("u1", "e1-1")] {
        let mut sub = hub.subscribe(user, Some(since)).unwrap();
        assert_eq!(
            kinds(&opening(&mut sub).await),
            vec!["ready", "gap"],
            "{user} {since}"
        );
    }
    publish(&hub, &["u1"], 2);
    let mut sub = hub.subscribe("u1", Some("e1-2")).unwrap();
    assert_eq!(
        kinds(&opening(&mut sub).await),
        vec!["ready"],
        "saw an event after the loss"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_hub_resumes_from_the_store_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    let opened = store::HistoryStore::open(&path, new_epoch).unwrap();
    let hub = Arc::new(Hub::durable(&opened, config(2, 10)));
    let mut stored = Vec::new();
    for n in 1..=5 {
        let p = hub
            .prepare(Arc::from([UserId::from("u1")]), |id| {
                format!("{{\"id\":\"{id}\",\"n\":{n}}}")
            })
            .unwrap();
        let json = p.frame.json.to_string();
        let recipients = p.recipients.clone();
        opened
            .store
            .append(
                &[store::Record {
                    seq: p.frame.seq,
                    json: &json,
                    recipients: &recipients,
                }],
                Some(&Position::from_seq(n)),
            )
            .unwrap();
        hub.deliver(&p);
        stored.push(p.frame.id.to_string());
    }
    let epoch = hub.epoch().to_owned();
    // Memory keeps 2; the store has all 5.
    let mut sub = hub.subscribe("u1", Some(&stored[0])).unwrap();
    let o = opening(&mut sub).await;
    assert_eq!(
        kinds(&o),
        vec!["ready", &stored[1], &stored[2], &stored[3], &stored[4]]
    );
    drop((sub, hub, opened));

    // A new process over the same store: same epoch, same ids, nothing in memory yet.
    let opened = store::HistoryStore::open(&path, || panic!("kept")).unwrap();
    let hub = Arc::new(Hub::durable(&opened, config(2, 10)));
    assert_eq!(hub.epoch(), epoch);
    assert_eq!(hub.head(), 5);
    let mut sub = hub.subscribe("u1", Some(&stored[2])).unwrap();
    let o = opening(&mut sub).await;
    assert_eq!(kinds(&o), vec!["ready", &stored[3], &stored[4]]);
    let next = hub
        .prepare(Arc::from([UserId::from("u1")]), |id| id.to_owned())
        .unwrap();
    assert_eq!(next.frame.seq, 6, "ids continue, never repeat");
}

#[test]
fn epochs_are_short_and_dashless() {
    let e = new_epoch();
    assert!(
        e.starts_with('e') && !e.contains('-') && e.len() <= 10,
        "{e}"
    );
}

#[tokio::test]
async fn connection_limits_refuse_with_try_again_later() {
    let hub = Arc::new(Hub::with_epoch(
        "e1",
        HubConfig {
            max_connections: 3,
            max_connections_per_user: 2,
            ..config(10, 10)
        },
    ));
    let a = hub.subscribe("u1", None).unwrap();
    let _b = hub.subscribe("u1", None).unwrap();
    assert_eq!(
        hub.subscribe("u1", None).err(),
        Some(CloseReason::TryAgainLater)
    );
    let _c = hub.subscribe("u2", None).unwrap();
    assert_eq!(
        hub.subscribe("u3", None).err(),
        Some(CloseReason::TryAgainLater)
    );
    drop(a);
    assert!(hub.subscribe("u3", None).is_ok(), "a slot freed up");
}

#[tokio::test]
async fn expired_users_leave_memory_and_resuming_from_before_the_cut_is_a_gap() {
    let hub = hub(10, 10);
    for n in 1..=3 {
        publish(&hub, &["u1", "u2"], n);
    }
    let mut connected = hub.subscribe("u2", None).unwrap();
    assert_eq!(hub.user_count(), 2);
    assert_eq!(hub.expire(2), 2, "u1 still has event 3");
    assert_eq!(hub.expire(3), 1, "u1 has nothing left; u2 is connected");
    drop(connected.opening().await);
    drop(connected);
    assert_eq!(hub.user_count(), 0, "u2 leaves with its last connection");

    // Dropped entries lose nothing: after the cut, a resume is complete; before it, a gap.
    let mut after = hub.subscribe("u1", Some("e1-3")).unwrap();
    assert_eq!(kinds(&opening(&mut after).await), vec!["ready"]);
    let mut before = hub.subscribe("u1", Some("e1-2")).unwrap();
    assert_eq!(kinds(&opening(&mut before).await), vec!["ready", "gap"]);
    // New events are kept and replayed as before.
    publish(&hub, &["u1"], 4);
    let mut again = hub.subscribe("u1", Some("e1-3")).unwrap();
    assert_eq!(kinds(&opening(&mut again).await), vec!["ready", "e1-4"]);
}

/// Delivers an event numbered `seq` (a cluster node numbers by the stream).
fn deliver_at(hub: &Hub, users: &[&str], seq: u64) {
    let recipients = users.iter().map(|u| UserId::from(*u)).collect();
    let p = hub
        .prepare_at(seq, recipients, |id| format!("{{\"id\":\"{id}\"}}"))
        .unwrap();
    hub.deliver(&p);
}

#[tokio::test]
async fn a_since_the_stream_holds_but_this_node_has_not_read_yet_resumes_without_repeats() {
    // This node has read up to 3; the client saw 5 on a node that is further along.
    let hub = hub(10, 10);
    for seq in 1..=3 {
        deliver_at(&hub, &["u1"], seq);
    }
    hub.stream_holds(5);
    let mut sub = hub.subscribe("u1", Some("e1-5")).unwrap();
    let open = opening(&mut sub).await;
    assert_eq!(kinds(&open), ["ready"]);
    let ready: serde_json::Value = serde_json::from_str(&open[0].1).unwrap();
    assert_eq!(ready["resumed"], true);
    assert_eq!(ready["position"], "e1-5");
    // 4 and 5 arrive here later; the client has them: only 6 reaches it.
    for seq in 4..=6 {
        deliver_at(&hub, &["u1"], seq);
    }
    assert_eq!(sub.recv().await.unwrap().id.as_ref(), "e1-6");
    assert!(sub.try_recv().is_none());

    // Beyond anything the stream holds: not honoured.
    let mut ahead = hub.subscribe("u1", Some("e1-9")).unwrap();
    assert_eq!(kinds(&opening(&mut ahead).await), ["ready", "gap"]);
}
