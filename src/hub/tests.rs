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
    let a = hub.subscribe("u1", None).unwrap();
    let b = hub.subscribe("u1", None).unwrap();
    let other = hub.subscribe("u2", None).unwrap();
    publish(&hub, &["u1"], 1);
    let fa = a.recv().await.unwrap();
    let fb = b.recv().await.unwrap();
    assert!(
        Arc::ptr_eq(&fa, &fb),
        "one encoding shared by all connections"
    );
    assert_eq!(fa.id.as_ref(), "e1-1");
    assert!(other.try_recv().is_none());
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
async fn kick_all_closes_every_connection_and_every_later_one() {
    let hub = hub(10, 4);
    let before = hub.subscribe("u1", None).unwrap();
    hub.kick_all(CloseReason::Restarting);
    let after = hub.subscribe("u2", None).unwrap();
    for sub in [&before, &after] {
        assert_eq!(sub.kicked_for(), Some(CloseReason::Restarting));
        assert!(
            sub.recv().await.is_none(),
            "a kicked connection reads nothing"
        );
    }
}

#[tokio::test]
async fn full_queue_kicks_only_that_connection() {
    let hub = hub(10, 2);
    let slow = hub.subscribe("u1", None).unwrap();
    let fast = hub.subscribe("u1", None).unwrap();
    for n in 1..=3 {
        publish(&hub, &["u1"], n);
        fast.recv().await.unwrap();
    }
    assert!(slow.kicked_for().is_some());
    assert_eq!(slow.kicked_for(), Some(CloseReason::TooSlow));
    assert!(fast.kicked_for().is_none());
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
    let reader = hub.subscribe("u1", None).unwrap();
    let big = "x".repeat(40);
    for _ in 0..3 {
        hub.publish(&["u1"], |id| format!("{{\"id\":\"{id}\",\"p\":\"{big}\"}}"));
        // The reader keeps up: its queued bytes go back down as it reads.
        reader.recv().await.unwrap();
    }
    assert!(slow.kicked_for().is_some(), "over 100 bytes queued");
    assert!(reader.kicked_for().is_none());
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
    let live = hub.subscribe("u1", None).unwrap();
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

/// The ids in an opening after `ready`, and the `ready` itself.
async fn recent(sub: &mut Subscription) -> (serde_json::Value, Vec<String>) {
    let o = opening(sub).await;
    assert_eq!(o[0].0, "ready", "{o:?}");
    let ready = serde_json::from_str(&o[0].1).unwrap();
    (ready, o[1..].iter().map(|(k, _)| k.clone()).collect())
}

#[tokio::test]
async fn last_n_opens_on_the_newest_n_of_the_users_events_then_live() {
    let hub = hub(10, 10);
    for n in 1..=5 {
        publish(&hub, &["u1"], n);
        publish(&hub, &["u2"], n);
    }
    // u1's events are the odd ones.
    let mut sub = hub.subscribe_from("u1", Start::Last(3)).unwrap();
    let (ready, ids) = recent(&mut sub).await;
    assert_eq!(ids, ["e1-5", "e1-7", "e1-9"]);
    assert_eq!(ready["last"], 3, "{ready}");
    assert_eq!(ready["resumed"], false, "{ready}");
    assert_eq!(ready["position"], "e1-10", "{ready}");
    publish(&hub, &["u1"], 6);
    assert_eq!(sub.recv().await.unwrap().id.as_ref(), "e1-11");
    assert!(sub.try_recv().is_none(), "nothing twice at the seam");

    // More than there is: all of it. None asked: none, and `ready` says so.
    let mut all = hub.subscribe_from("u1", Start::Last(100)).unwrap();
    let (ready, ids) = recent(&mut all).await;
    assert_eq!(ids.len(), 6);
    assert_eq!(ready["last"], 6);
    let mut zero = hub.subscribe_from("u1", Start::Last(0)).unwrap();
    let (ready, ids) = recent(&mut zero).await;
    assert!(ids.is_empty());
    assert_eq!(ready["last"], 0);
    // A user with no events at all.
    let mut nobody = hub.subscribe_from("u9", Start::Last(5)).unwrap();
    let (ready, ids) = recent(&mut nobody).await;
    assert!(ids.is_empty());
    assert_eq!(ready["last"], 0);
}

#[tokio::test]
async fn since_wins_over_last_and_plain_connections_say_nothing_of_last() {
    let hub = hub(10, 10);
    for n in 1..=4 {
        publish(&hub, &["u1"], n);
    }
    let start = Start::new(Some("e1-3"), Some(1));
    let mut sub = hub.subscribe_from("u1", start).unwrap();
    let (ready, ids) = recent(&mut sub).await;
    assert_eq!(ids, ["e1-4"]);
    assert_eq!(ready["resumed"], true);
    assert!(ready.get("last").is_none(), "{ready}");
    let mut plain = hub.subscribe("u1", None).unwrap();
    let (ready, ids) = recent(&mut plain).await;
    assert!(ids.is_empty());
    assert!(ready.get("last").is_none(), "{ready}");
}

#[tokio::test]
async fn last_is_bounded_by_max_last() {
    let hub = hub(MAX_LAST + 10, MAX_LAST + 10);
    for n in 1..=(MAX_LAST as u64 + 5) {
        publish(&hub, &["u1"], n);
    }
    let mut sub = hub.subscribe_from("u1", Start::Last(usize::MAX)).unwrap();
    let (ready, ids) = recent(&mut sub).await;
    assert_eq!(ids.len(), MAX_LAST);
    assert_eq!(ready["last"], MAX_LAST);
    assert_eq!(ids.last().unwrap(), &format!("e1-{}", MAX_LAST + 5));
}

/// Prepares, stores and delivers one event for `users`, as the router does.
fn route(hub: &Hub, store: &store::HistoryStore, users: &[&str]) -> String {
    let p = hub
        .prepare(users.iter().map(|u| UserId::from(*u)).collect(), |id| {
            format!("{{\"id\":\"{id}\"}}")
        })
        .unwrap();
    let json = p.frame.json.to_string();
    let recipients = p.recipients.clone();
    store
        .append(
            &[store::Record {
                seq: p.frame.seq,
                json: &json,
                recipients: &recipients,
            }],
            None,
        )
        .unwrap();
    hub.deliver(&p);
    p.frame.id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_reads_the_store_for_what_memory_does_not_hold_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.db");
    let opened = store::HistoryStore::open(&path, new_epoch).unwrap();
    let hub = Arc::new(Hub::durable(&opened, config(2, 10)));
    let mut mine = Vec::new();
    for _ in 1..=6 {
        mine.push(route(&hub, &opened.store, &["u1"]));
        route(&hub, &opened.store, &["u2"]);
    }
    // Memory keeps 2 of u1's 6; the other 2 asked for come from the store.
    let mut sub = hub.subscribe_from("u1", Start::Last(4)).unwrap();
    let (ready, ids) = recent(&mut sub).await;
    assert_eq!(ids, mine[2..]);
    assert_eq!(ready["last"], 4);
    let next = route(&hub, &opened.store, &["u1"]);
    assert_eq!(sub.recv().await.unwrap().id.as_ref(), next);
    assert!(sub.try_recv().is_none());
    mine.push(next);
    drop((sub, hub, opened));

    // A new process: nothing in memory, all from the store, then live.
    let opened = store::HistoryStore::open(&path, || panic!("kept")).unwrap();
    let hub = Arc::new(Hub::durable(&opened, config(2, 10)));
    let mut sub = hub.subscribe_from("u1", Start::Last(3)).unwrap();
    let (ready, ids) = recent(&mut sub).await;
    assert_eq!(ids, mine[4..]);
    assert_eq!(ready["last"], 3);
    let next = route(&hub, &opened.store, &["u1"]);
    assert_eq!(sub.recv().await.unwrap().id.as_ref(), next);
    assert!(sub.try_recv().is_none());
    // After one new event: one from memory, the rest from the store.
    let mut sub = hub.subscribe_from("u1", Start::Last(3)).unwrap();
    let (_, ids) = recent(&mut sub).await;
    assert_eq!(ids, [mine[5].clone(), mine[6].clone(), next]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_races_delivery_without_a_gap_or_a_repeat_at_the_seam() {
    // The router delivers continuously while clients subscribe with `last`: each client's
    // opening and live events together are consecutive events of the user, each once.
    let dir = tempfile::tempdir().unwrap();
    let opened = store::HistoryStore::open(&dir.path().join("history.db"), new_epoch).unwrap();
    let hub = Arc::new(Hub::durable(&opened, config(4, 10_000)));
    const TOTAL: usize = 3000;
    let router = {
        let (hub, store) = (Arc::clone(&hub), Arc::clone(&opened.store));
        std::thread::spawn(move || {
            (0..TOTAL)
                .map(|_| route(&hub, &store, &["u1"]))
                .collect::<Vec<_>>()
        })
    };
    let mut checked = 0;
    while !router.is_finished() {
        let mut sub = hub.subscribe_from("u1", Start::Last(8)).unwrap();
        let (ready, mut ids) = recent(&mut sub).await;
        assert_eq!(ready["last"], ids.len());
        let opened_with = ids.len();
        // Read live events for a while: they continue right after the opening.
        while ids.len() < opened_with + 20 {
            match tokio::time::timeout(std::time::Duration::from_secs(1), sub.recv()).await {
                Ok(Some(f)) => ids.push(f.id.to_string()),
                _ => break, // the router finished
            }
        }
        let seqs: Vec<u64> = ids
            .iter()
            .map(|id| id.rsplit_once('-').unwrap().1.parse().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive, none twice (opening of {opened_with}): {seqs:?}"
        );
        if opened_with > 0 && ids.len() > opened_with {
            checked += 1;
        }
    }
    let all = router.join().unwrap();
    assert_eq!(all.len(), TOTAL);
    assert!(checked > 0, "no connection opened mid-stream");
}

/// Delivers event `n` to `audience`, the same list every time (as the router's lookup
/// cache hands on an account's users).
fn deliver_to(hub: &Hub, audience: &Recipients, n: u64) {
    let p = hub
        .prepare(Arc::clone(audience), |id| {
            format!("{{\"id\":\"{id}\",\"n\":{n}}}")
        })
        .unwrap();
    hub.deliver(&p);
}

#[tokio::test]
async fn a_repeated_audience_reaches_users_that_left_memory_came_back_or_connected_since() {
    let hub = hub(10, 10);
    let audience: Recipients = (0..2 * CACHED_AUDIENCE)
        .map(|i| UserId::from(format!("u{i}")))
        .collect();
    let a = hub.subscribe("u0", None).unwrap();
    deliver_to(&hub, &audience, 1);
    assert_eq!(a.recv().await.unwrap().seq, 1);
    // Everyone but u0 leaves memory while the audience is known.
    assert_eq!(hub.expire(1), 1);
    deliver_to(&hub, &audience, 2);
    assert_eq!(a.recv().await.unwrap().seq, 2);
    assert_eq!(hub.user_count(), audience.len(), "every user is back");
    // Their history is the one a resume reads.
    let mut back = hub.subscribe("u5", Some("e1-1")).unwrap();
    assert_eq!(kinds(&opening(&mut back).await), vec!["ready", "e1-2"]);
    // A connection that came after the audience was first seen gets its events.
    let late = hub.subscribe("u7", None).unwrap();
    drop(a);
    let again = hub.subscribe("u0", None).unwrap();
    deliver_to(&hub, &audience, 3);
    for sub in [&back, &late, &again] {
        assert_eq!(sub.recv().await.unwrap().seq, 3);
    }
    // And a user whose last connection left (with nothing in memory) is made again.
    assert_eq!(hub.expire(3), 3, "the three connected users stay");
    drop(late);
    assert_eq!(hub.user_count(), 2, "u7 left with its connection");
    deliver_to(&hub, &audience, 4);
    let mut resumed = hub.subscribe("u7", Some("e1-3")).unwrap();
    assert_eq!(kinds(&opening(&mut resumed).await), vec!["ready", "e1-4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_connection_gets_every_event_after_its_ready_position_while_a_shared_audience_is_delivered()
 {
    // The router delivers to one shared audience (the cached path, which takes no shard
    // lock) while a member connects live again and again: nothing after the position its
    // `ready` names may be missing from its queue.
    let hub = hub(4, 100_000);
    let audience: Recipients = (1..=8).map(|i| UserId::from(format!("u{i}"))).collect();
    const TOTAL: u64 = 200_000;
    let router = {
        let (hub, audience) = (Arc::clone(&hub), Arc::clone(&audience));
        std::thread::spawn(move || (1..=TOTAL).for_each(|n| deliver_to(&hub, &audience, n)))
    };
    let mut checked = 0;
    while !router.is_finished() {
        let mut sub = hub.subscribe("u1", None).unwrap();
        let o = opening(&mut sub).await;
        let ready: serde_json::Value = serde_json::from_str(&o[0].1).unwrap();
        let position: u64 = ready["position"]
            .as_str()
            .unwrap()
            .rsplit_once('-')
            .unwrap()
            .1
            .parse()
            .unwrap();
        let Ok(Some(first)) =
            tokio::time::timeout(std::time::Duration::from_secs(1), sub.recv()).await
        else {
            break; // the router finished
        };
        assert!(
            first.seq <= position + 1,
            "ready named {position}, the first live event is {}: the ones between are lost",
            first.seq
        );
        checked += 1;
    }
    router.join().unwrap();
    assert!(
        checked > 100,
        "only {checked} connections opened mid-stream"
    );
}
